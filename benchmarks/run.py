"""`python -m fusedtrain bench`: run the families' benchmarks, print a table, write CSV/JSON/PNG."""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

import torch

from . import bench_spherical, harness, plot

# family -> module with run(device, quick) -> rows and acceptance(rows, device) -> lines
FAMILIES = {"spherical": bench_spherical}

COLUMNS = ["op", "kind", "N", "D", "dtype", "impl", "pass", "median_ms", "p20_ms", "p80_ms",
           "peak_extra_mib", "gbps", "fraction_of_copy_bw", "speedup_vs_cross_entropy",
           "speedup_vs_reference", "note"]


def default_out_dir() -> str:
    """benchmarks/results of a source checkout (editable install), else ./fusedtrain-bench-results."""
    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(here)
    if os.path.basename(here) == "benchmarks" and os.path.isdir(os.path.join(checkout, "python")):
        return os.path.join(here, "results")
    return os.path.abspath("fusedtrain-bench-results")


def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    cells = [[_fmt(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_outputs(family: str, device: str, rows: list[dict], env: dict, extra: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{family}_{device}_{time.strftime('%Y%m%d-%H%M%S')}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, **extra, "rows": rows}, f, indent=1)
    written = [stem + ".csv", stem + ".json"]
    png = plot.plot(rows, stem + ".png", f"{family} on {env['device_name']}, torch {env['torch']}, "
                                          f"commit {env['commit']}")
    if png:
        written.append(png)
    else:
        print("(matplotlib not installed: no PNG plot)")
    return written


def run(families: list[str] | None, device: str, quick: bool, out_dir: str | None) -> list[dict]:
    out_dir = out_dir or default_out_dir()
    all_rows = []
    for family in families or list(FAMILIES):
        module = FAMILIES[family]
        start = time.perf_counter()
        rows = module.run(device, quick)
        env = harness.environment(device)
        lines = module.acceptance(rows, device)
        print(f"\n== {family} on {env['device_name']} (torch {env['torch']}, CUDA {env['cuda']}, "
              f"commit {env['commit']}), {time.perf_counter() - start:.0f} s")
        print_table(rows)
        print("Acceptance:")
        for line in lines or ["(no acceptance figure at these shapes)"]:
            print("  " + line)
        for path in write_outputs(family, device, rows, env, {"acceptance": lines, "quick": quick}, out_dir):
            print(f"wrote {path}")
        all_rows += rows
    return all_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedtrain bench")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES),
                        help="benchmark only this family (repeatable); default: all")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the acceptance shapes only, few repeats")
    parser.add_argument("--out", default=None, help="output folder (default: %(default)s -> see docs)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible")
    run(args.family, args.device, args.quick, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
