"""One PNG per run: median time per shape and implementation (log scale); `plot` draws the
fwd+bwd rows of a family whose rows have N, D, dtype and kind, `bar_chart` any timed rows."""
from __future__ import annotations

import importlib.util
import math


def matplotlib_available() -> bool:
    """Whether a plot can be drawn at all (run.py says why a family wrote no PNG)."""
    return importlib.util.find_spec("matplotlib") is not None


def _case(row: dict) -> str:
    return f"{row['N']}x{row['D']} {row['dtype']} {row['kind']}"


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Write the plot to `path` and return it; None (nothing written) when matplotlib is missing
    or no fwd+bwd row was timed."""
    return bar_chart([r for r in rows if r.get("pass") == "fwd+bwd"], _case, path, title,
                     ylabel="fwd+bwd median (ms, log scale)", case_width=1.8)


def bar_chart(rows: list[dict], case, path: str, title: str, *, ylabel: str, case_width: float) -> str | None:
    """Median time of the timed rows, one group of bars per case(row), one bar per impl, on a log
    axis; written to `path` and returned, or None when matplotlib is missing or nothing was timed."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in rows if r.get("median_ms")]
    if not timed:
        return None
    cases = list(dict.fromkeys(case(r) for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    median = {(r["impl"], case(r)): r["median_ms"] for r in timed}
    fig, ax = plt.subplots(figsize=(max(6, case_width * len(cases)), 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs = [j + i * width for j, c in enumerate(cases) if (impl, c) in median]
        ys = [median[impl, c] for c in cases if (impl, c) in median]
        bars = ax.bar(xs, ys, width, label=impl)
        labels = [f"{y:.3g}" if y < 1000 else f"{y:.0f}" for y in ys]
        ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
    # A log axis clips the bars at its lower limit: start a decade below the fastest bar so its
    # height stays comparable with the others, and leave room above for the labels and the legend.
    low, high = min(median.values()), max(median.values())
    ax.set_yscale("log")
    ax.set_ylim(10 ** math.floor(math.log10(low) - 0.5), high * 30)
    ax.set_ylabel(ylabel)
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=min(len(impls), 5), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
