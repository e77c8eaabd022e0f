"""Benchmark of the FRUGAL optimizer step: ours (fused op) vs the pure-PyTorch reference optimizer vs
torch.optim.AdamW (foreach; fused too on CUDA) vs GaLore (`galore-torch`, when it imports).

Parameter sets are the weight matrices of transformer blocks (qkv, out, MLP up and down), e.g.
d_model 1024 x 4 layers = 50.3M parameters. Every implementation gets its own copy of the weights
and a fixed random gradient; one untimed warm-up step draws the subspaces (update_gap=200, so the
timed steps are steady-state steps without a refresh). Reported per row: step time (median, p20,
p80), optimizer-state bytes (every tensor in `optimizer.state`) and their ratio to AdamW's, and the
bytes a step must move (p, g read; p written; moments read and written where they exist) over the
median time, against the device's measured copy bandwidth.
Run: `python -m fusedtrain bench --family frugal [--device cpu|cuda] [--quick]`.
"""
from __future__ import annotations

import torch

from fusedtrain.optim import FRUGAL
from fusedtrain.reference.frugal import FRUGALReference

if __package__:
    from . import harness
    from . import plot as _plot
else:  # run as a script
    from fusedtrain.benchmarks import harness
    from fusedtrain.benchmarks import plot as _plot

OP = "frugal_step_"
DENSITY = 0.25

# (name, d_model, layers, dtype). The first of each list is the acceptance set.
CPU_SETS = [("d1024x4", 1024, 4, "float32")]
CUDA_SETS = [("d1024x4", 1024, 4, "float32"), ("d2048x4", 2048, 4, "float32"), ("d2048x4", 2048, 4, "bfloat16")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

ROW_FIELDS = ["family", "op", "impl", "proj", "density", "set", "params_M", "tensors", "dtype",
              "device_name", "torch", "cuda", "commit", "median_ms", "p20_ms", "p80_ms", "peak_extra_mib",
              "repeats", "state_mib", "state_vs_adamw", "bytes_moved", "gbps", "copy_gbps",
              "fraction_of_copy_bw", "speedup_vs_reference", "speedup_vs_adamw", "used_kernel", "note"]

# Columns of the printed table (run.py uses a module's TABLE when it has one).
TABLE = [("set", "set"), ("dtype", "dtype"), ("impl", "impl"), ("proj", "proj"), ("median_ms", "median ms"),
         ("p20_ms", "p20"), ("p80_ms", "p80"), ("state_mib", "state MiB"), ("state_vs_adamw", "x AdamW state"),
         ("gbps", "GB/s"), ("fraction_of_copy_bw", "of copy"), ("speedup_vs_adamw", "x AdamW"),
         ("speedup_vs_reference", "x ref"), ("used_kernel", "kernel"), ("note", "note")]


def transformer_shapes(d_model: int, layers: int) -> list[tuple[int, int]]:
    """(out, in) of the linear layers of `layers` pre-norm blocks with a 4x MLP."""
    return [(3 * d_model, d_model), (d_model, d_model), (4 * d_model, d_model), (d_model, 4 * d_model)] * layers


def _galore():
    try:
        from galore_torch import GaLoreAdamW
    except Exception as exc:  # noqa: BLE001 - not installed, or its imports (transformers, bitsandbytes) fail
        return f"galore_torch unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"

    def make(params):
        rank = max(1, round(DENSITY * min(params[0].shape)))
        return GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 200, "scale": 1.0,
                             "proj_type": "std"}], lr=1e-3)
    return make


def _implementations(device: str) -> dict:
    """impl name -> (proj, factory(params) -> optimizer), or a string saying why it is skipped."""
    impls = {
        "ours": ("columns", lambda ps: FRUGAL(ps, density=DENSITY, proj="columns", seed=0)),
        "ours_rows": ("rows", lambda ps: FRUGAL(ps, density=DENSITY, proj="rows", seed=0)),
        "ours_block": ("block", lambda ps: FRUGAL(ps, density=DENSITY, proj="block", seed=0)),
        "ours_svd": ("svd", lambda ps: FRUGAL(ps, density=DENSITY, proj="svd", seed=0)),
        "reference": ("columns", lambda ps: FRUGALReference(ps, density=DENSITY, proj="columns", seed=0)),
        "adamw_foreach": ("", lambda ps: torch.optim.AdamW(ps, foreach=True)),
    }
    if device == "cuda":
        impls["adamw_fused"] = ("", lambda ps: torch.optim.AdamW(ps, fused=True))
    galore = _galore()
    impls["galore"] = ("svd", galore)  # a string when unavailable: reported as skipped
    return impls


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _must_move_bytes(params, impl: str, proj: str) -> int:
    """p and g read, p written; the moments read and written on the state-full part."""
    elem = params[0].element_size()
    numel = sum(p.numel() for p in params)
    full = 1.0 if impl.startswith("adamw") else DENSITY
    return int(numel * elem * (3 + 4 * full))


def _schedule(device: str, impl: str) -> tuple[int, int]:
    if device == "cuda":
        return 3, 20
    return (2, 3) if impl in ("reference", "galore", "ours_svd") else (2, 10)


def _measure(impl, proj, make, shapes, dtype, device, copy_gbps) -> dict:
    gen = torch.Generator(device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 1e-3
    opt = make(params)
    warmup, repeats = _schedule(device, impl)
    m = harness.measure(opt.step, device=device, warmup=warmup, repeats=repeats)
    moved = _must_move_bytes(params, impl, proj)
    gbps = moved / (m.median_ms * 1e-3) / 1e9
    return dict(impl=impl, proj=proj, median_ms=m.median_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms,
                peak_extra_mib=m.peak_extra_mib, repeats=m.repeats, state_mib=state_bytes(opt) / 2**20,
                bytes_moved=moved, gbps=gbps, fraction_of_copy_bw=gbps / copy_gbps)


def _set_rows(name, d_model, layers, dtype_name, device, copy_gbps, kernel, quick) -> list[dict]:
    shapes = transformer_shapes(d_model, layers)
    dtype = DTYPES[dtype_name]
    rows = []
    for impl, (proj, make) in _implementations(device).items():
        if quick and impl not in ("ours", "reference", "adamw_foreach", "adamw_fused"):
            continue
        ours = impl.startswith("ours")
        note = "" if kernel or not ours else "reference fallback: no compiled kernel"
        if isinstance(make, str):
            rows.append(dict(impl=impl, proj=proj, note=f"skipped: {make}"))
            continue
        if impl == "reference" and device == "cuda" and d_model > 1024:
            rows.append(dict(impl=impl, proj=proj, note="skipped: measured on the first set only"))
            continue
        try:
            row = _measure(impl, proj, make, shapes, dtype, device, copy_gbps)
        except (RuntimeError, ValueError) as exc:  # out of memory included: report, keep the rest
            row = dict(impl=impl, proj=proj, note=harness.failure_note(exc))
        row["used_kernel"] = kernel if ours else False
        row["note"] = "; ".join(filter(None, [row.get("note"), note]))
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    params_m = sum(a * b for a, b in shapes) / 1e6
    by_impl = {r["impl"]: r for r in rows if r.get("median_ms")}
    adamw = by_impl.get("adamw_fused") or by_impl.get("adamw_foreach")
    for r in rows:
        r.update(set=name, dtype=dtype_name, params_M=round(params_m, 1), tensors=len(shapes),
                 density=DENSITY if r["impl"] not in ("adamw_foreach", "adamw_fused") else 1.0)
        if r.get("median_ms"):
            ref = by_impl.get("reference")
            r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"] if ref else None
            r["speedup_vs_adamw"] = adamw["median_ms"] / r["median_ms"] if adamw else None
            r["state_vs_adamw"] = r["state_mib"] / adamw["state_mib"] if adamw else None
    return rows


def _describe(s) -> str:
    """The progress line of one case (a tuple of CPU_/CUDA_ shapes)."""
    return f"{s[0]} (d_model={s[1]}, {s[2]} layers) {s[3]}"


def run(device: str, quick: bool, *, env: dict | None = None, copy_gbps: float | None = None) -> list[dict]:
    env = env or harness.environment(device)
    copy_gbps = copy_gbps or harness.measure_copy_bandwidth(device)
    kernel = harness.kernel_built(OP, device)
    sets = CUDA_SETS if device == "cuda" else CPU_SETS
    rows = []
    for name, d_model, layers, dtype_name in harness.cases("frugal", sets[:1] if quick else sets, _describe):
        rows += _set_rows(name, d_model, layers, dtype_name, device, copy_gbps, kernel, quick)
    for row in rows:
        row.update(family="frugal", op=OP, device_name=env["device_name"], torch=env["torch"], cuda=env["cuda"],
                   commit=env["commit"], copy_gbps=copy_gbps)
    return [{k: row.get(k) for k in ROW_FIELDS} for row in rows]


def acceptance(rows: list[dict], device: str) -> list[str]:
    def find(impl):
        return next((r for r in rows if r["set"] == "d1024x4" and r["dtype"] == "float32" and r["impl"] == impl
                     and r["median_ms"] is not None), None)

    ours = find("ours")
    if ours is None:
        return []
    lines = []
    if device == "cpu":
        for base, target in (("reference", 2.0), ("adamw_foreach", 1.0)):
            other = find(base)
            if other:
                s = other["median_ms"] / ours["median_ms"]
                lines.append(f"CPU 50.3M fp32, density 0.25, columns: ours {ours['median_ms']:.1f} ms, {s:.2f}x faster "
                             f"than {base} ({other['median_ms']:.1f} ms; target >= {target:g}x): "
                             f"{harness.verdict(s >= target)}")
    else:
        fused = find("adamw_fused")
        if fused:
            ratio = ours["median_ms"] / fused["median_ms"]
            lines.append(f"CUDA 50.3M fp32, density 0.25, columns: ours {ours['median_ms']:.3f} ms = {ratio:.2f}x the time "
                         f"of AdamW(fused=True) {fused['median_ms']:.3f} ms (target <= 0.7x): "
                         f"{harness.verdict(ratio <= 0.7)}")
    if ours.get("state_vs_adamw") is not None:
        s = ours["state_vs_adamw"]
        lines.append(f"optimizer state: ours {ours['state_mib']:.1f} MiB = {s:.3f}x AdamW's (target <= {DENSITY + 0.01:g}x): "
                     f"{harness.verdict(s <= DENSITY + 0.01)}")
    return lines


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Median step time per implementation and parameter set (log scale); None without matplotlib."""
    return _plot.bar_chart(rows, lambda r: f"{r['set']} {r['dtype']}", path, title,
                           ylabel="optimizer step median (ms, log scale)", case_width=2.5)


if __name__ == "__main__":
    raise SystemExit(harness.run_as_script("frugal"))
