"""One PNG per run: median fwd+bwd time per shape and implementation (log scale)."""
from __future__ import annotations


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Write the plot to `path`; returns None (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in rows if r.get("pass") == "fwd+bwd" and r.get("median_ms")]
    cases = list(dict.fromkeys(f"{r['N']}x{r['D']} {r['dtype']} {r['kind']}" for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, case in enumerate(cases):
            row = next((r for r in timed if r["impl"] == impl and
                        f"{r['N']}x{r['D']} {r['dtype']} {r['kind']}" == case), None)
            if row:
                xs.append(j + i * width)
                ys.append(row["median_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_yscale("log")
    ax.set_ylabel("fwd+bwd median (ms, log)")
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
