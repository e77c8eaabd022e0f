"""`python -m fusedtrain bench`: run the families' benchmarks, print a table, write CSV/JSON/PNG."""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

import torch

from . import bench_frugal, bench_linear_spherical, bench_mining, bench_sae, bench_spherical, harness, plot

# family -> module with
#   run(device, quick, *, env, copy_gbps) -> rows (dicts with the module's ROW_FIELDS keys)
#   acceptance(rows, device) -> lines ("... MET" / "... NOT MET")
#   optional: TABLE (printed columns, as below) and plot(rows, path, title) (default: plot.plot)
# A new family is one import and one entry here.
FAMILIES = {"spherical": bench_spherical, "linear": bench_linear_spherical, "sae": bench_sae,
            "frugal": bench_frugal, "mining": bench_mining}

# Columns of the printed table (the CSV and JSON hold every field).
TABLE = [("kind", "kind"), ("N", "N"), ("D", "D"), ("dtype", "dtype"), ("impl", "impl"), ("pass", "pass"),
         ("median_ms", "median ms"), ("p20_ms", "p20"), ("p80_ms", "p80"), ("peak_extra_mib", "peak MiB"),
         ("gbps", "GB/s"), ("fraction_of_copy_bw", "of copy"), ("speedup_vs_cross_entropy", "x CE"),
         ("speedup_vs_reference", "x ref"), ("used_kernel", "kernel"), ("note", "note")]


def default_out_dir() -> str:
    """benchmarks/results of a source checkout (editable install), else ./fusedtrain-bench-results."""
    root = harness.source_checkout()
    if root is not None:
        return os.path.join(root, "benchmarks", "results")
    return os.path.abspath("fusedtrain-bench-results")


def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], table: list[tuple[str, str]] = TABLE) -> str:
    """Plain-text table, numbers right-aligned, text left-aligned (a family may name its own columns)."""
    cells = [[_fmt(r.get(key)) for key, _ in table] for r in rows]
    widths = [max([len(title)] + [len(row[i]) for row in cells]) for i, (_, title) in enumerate(table)]
    numeric = [all(isinstance(r.get(key), (int, float)) or r.get(key) is None for r in rows)
               for key, _ in table]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line([title for _, title in table])] + [line(row) for row in cells])


def write_outputs(family: str, rows: list[dict], meta: dict, out_dir: str, plotter=plot.plot) -> list[str]:
    """<family>_<device>_<time>.csv/.json/.png under out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    env = meta["environment"]
    stem = os.path.join(out_dir, f"{family}_{env['device']}_{time.strftime('%Y%m%d-%H%M%S')}")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(stem + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    written = [stem + ".csv", stem + ".json"]
    title = f"{family} on {env['device_name']}, torch {env['torch']}, commit {env['commit']}"
    if plotter(rows, stem + ".png", title):
        written.append(stem + ".png")
    elif not plot.matplotlib_available():
        print("(matplotlib is not installed: no PNG plot; `pip install matplotlib`, or install fusedtrain "
              "with its `bench` extra, for one)")
    else:
        print("(no timed row to plot: no PNG)")
    return written


def run(families: list[str] | None, device: str, quick: bool, out_dir: str | None) -> list[dict]:
    """Run the families' benchmarks on `device`, print them, write their files; returns all rows."""
    families = families or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown benchmark families {unknown}; known: {sorted(FAMILIES)}")
    out_dir = out_dir or default_out_dir()
    env = harness.environment(device)
    # Measured once, first, while nothing else holds the memory system: the ceiling for GB/s.
    copy_gbps = harness.measure_copy_bandwidth(device)
    print(f"{env['device_name']}: torch {env['torch']}, CUDA {env['cuda']}, fusedtrain {env['fusedtrain']}, "
          f"commit {env['commit']}; measured copy bandwidth {copy_gbps:.1f} GB/s (read + write)")
    all_rows = []
    for family in families:
        module = FAMILIES[family]
        start = time.perf_counter()
        rows = module.run(device, quick, env=env, copy_gbps=copy_gbps)
        seconds = time.perf_counter() - start
        lines = module.acceptance(rows, device)
        print(f"\n== {family} ({device}{', quick' if quick else ''}): {seconds:.0f} s")
        print(format_table(rows, getattr(module, "TABLE", TABLE)))  # a family may define its columns
        print("Acceptance:")
        for line in lines or ["(no acceptance figure at these shapes)"]:
            print("  " + line)
        meta = {"family": family, "environment": env, "copy_bandwidth_gbps": copy_gbps, "quick": quick,
                "seconds": seconds, "acceptance": lines}
        for path in write_outputs(family, rows, meta, out_dir, getattr(module, "plot", plot.plot)):
            print(f"wrote {path}")
        all_rows += rows
    return all_rows


def main(argv: list[str] | None = None, prog: str = "python -m fusedtrain bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Benchmark fusedtrain's ops against their references, the softmax baselines and the installed "
        "peers; print a table per family and write CSV/JSON/PNG files."))
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES),
                        help="benchmark only this family (repeatable); default: all")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--quick", action="store_true", help="the acceptance shapes only, few repeats")
    parser.add_argument("--out", default=None,
                        help="output folder (default: benchmarks/results/ of a source checkout, "
                             "else ./fusedtrain-bench-results)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible")
    run(args.family, args.device, args.quick, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
