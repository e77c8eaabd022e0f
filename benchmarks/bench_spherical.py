"""Benchmark of the logits-level spherical loss: ours vs the pure-PyTorch reference vs
F.cross_entropy (the softmax baseline) vs Liger's cross-entropy (CUDA, when installed).

Bytes that must move: forward reads the logits once; forward + backward also writes their
gradient once. GB/s is those bytes over the median time, and its fraction of the measured copy
bandwidth says how close to the memory ceiling an implementation runs. (On a CPU a copy's writes
also cost a read for ownership of each cache line, so a read-only forward can pass 1.0.)
Run: `python -m fusedtrain bench --family spherical [--device cpu|cuda] [--quick]`, or this file as a
script with the same options.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain.reference.spherical import spherical_loss as reference_loss

if __package__:
    from . import harness
else:  # run as a script: no parent package for a relative import
    from fusedtrain.benchmarks import harness

OP = "spherical_loss"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

# (N, D, dtype, kinds). The first shape of each list is the acceptance shape; the kinds after "z"
# are measured there only (ours and the reference; the softmax baselines do not depend on kind).
CPU_SHAPES = [(4096, 32768, "float32", ("z", "spherical", "taylor", "mse")),
              (1024, 32768, "float32", ("z",)), (8192, 4096, "bfloat16", ("z",)),
              (65536, 128, "float32", ("z",))]
CPU_QUICK = [(4096, 32768, "float32", ("z",))]
# All CUDA inputs are >= 64 MiB, beyond the 50 MiB L2 of an H100/H200, so repeats need no rotation
# among input sets (a row notes it when the input does fit in the device's L2).
CUDA_SHAPES = [(8192, 131072, "bfloat16", ("z", "spherical", "taylor", "mse")),
               (8192, 32768, "bfloat16", ("z",)), (4096, 131072, "float32", ("z",)),
               (16384, 50257, "bfloat16", ("z",)), (65536, 1024, "bfloat16", ("z",)),
               (1 << 22, 8, "bfloat16", ("z",))]
CUDA_QUICK = CUDA_SHAPES[:2]

# Every row has these keys, in this order (the CSV columns).
ROW_FIELDS = ["family", "op", "impl", "kind", "N", "D", "dtype", "device_name", "torch", "cuda", "commit",
              "pass", "median_ms", "p20_ms", "p80_ms", "peak_extra_mib", "repeats", "bytes_moved", "gbps",
              "copy_gbps", "fraction_of_copy_bw", "speedup_vs_cross_entropy", "speedup_vs_reference",
              "used_kernel", "note"]


def _liger():
    """Liger's functional cross-entropy, or why it is unavailable (a string)."""
    liger = harness.optional_import("liger_kernel", "liger_kernel.transformers.functional")
    if isinstance(liger, str):
        return liger
    (functional,) = liger

    def loss(x, t):
        out = functional.liger_cross_entropy(x, t)
        return out[0] if isinstance(out, tuple) else out  # some versions also return z_loss
    return loss


def _implementations(device: str, kind: str, baselines: bool) -> dict:
    """impl name -> loss(logits, target), or a string saying why it is skipped.

    Ours and the reference for `kind`; the kind-independent softmax baselines only when
    `baselines` (once per shape).
    """
    impls = {
        "ours": lambda x, t: fusedtrain.spherical_loss(x, t, kind),
        # check_target=False: no read-back of the out-of-range flag. On CUDA that read-back is a
        # host sync, which exposes the CPU's launch overhead of the rest of the step.
        "ours_unchecked": lambda x, t: fusedtrain.spherical_loss(x, t, kind, check_target=False),
        "reference": lambda x, t: reference_loss(x, t, kind),
    }
    if baselines:
        impls["cross_entropy"] = lambda x, t: F.cross_entropy(x, t)
        if device == "cuda":
            impls["liger"] = _liger()
    return impls


def _schedule(device: str, n: int, d: int, impl: str) -> tuple[int, int]:
    """(warmup, repeats). On the CPU the reference and cross_entropy take seconds a call at the
    big shapes: one warm-up (the peak-memory call) and 3 samples there."""
    if device == "cuda":
        return 3, 20
    if n * d < 1 << 26:
        return 2, 10
    return (1, 5) if impl.startswith("ours") else (1, 3)


def _row(**fields) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(fields)
    return row


def _measure_impl(fn, logits, target, device: str, warmup: int, repeats: int, in_place: bool) -> list[tuple]:
    """[(pass, Measurement)] for the forward alone (no grad) and forward + backward.

    Forward + backward reuses one leaf across repeats, its `.grad` cleared (untimed) before each
    call, so every call writes a fresh gradient as a training step would.
    `in_place`: the implementation overwrites its input (Liger writes the gradient into the
    logits), so it gets its own copy for the forward too.
    """
    fwd_input = logits.clone() if in_place else logits
    with torch.no_grad():
        fwd = harness.measure(lambda: fn(fwd_input, target), device=device, warmup=warmup, repeats=repeats)
    del fwd_input
    x = logits.clone().requires_grad_()

    def clear_grad():
        x.grad = None

    both = harness.measure(lambda: fn(x, target).backward(), device=device, warmup=warmup,
                           repeats=repeats, setup=clear_grad)
    return [("fwd", fwd), ("fwd+bwd", both)]


def _impl_rows(impl: str, fn, logits, target, device: str, copy_gbps: float, used_kernel: bool,
               note: str) -> list[dict]:
    n, d = logits.shape
    if isinstance(fn, str):
        return [_row(impl=impl, pass_="fwd+bwd", used_kernel=False, note=f"skipped: {fn}")]
    warmup, repeats = _schedule(device, n, d, impl)
    try:
        measured = _measure_impl(fn, logits, target, device, warmup, repeats, in_place=impl == "liger")
    except RuntimeError as exc:  # out of memory included: report it, keep the other rows
        failure = harness.failure_note(exc, width=200)
    else:
        failure = None
    if failure:
        if device == "cuda":
            torch.cuda.empty_cache()  # after the except block, which kept the failed call's tensors
        return [_row(impl=impl, pass_="fwd+bwd", used_kernel=used_kernel, note=failure)]
    rows = []
    for pass_, m in measured:
        # Must-move bytes: read the logits; fwd+bwd also writes their gradient.
        bytes_moved = (1 if pass_ == "fwd" else 2) * logits.numel() * logits.element_size()
        gbps = bytes_moved / (m.median_ms * 1e-3) / 1e9
        rows.append(_row(impl=impl, pass_=pass_, median_ms=m.median_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms,
                         peak_extra_mib=m.peak_extra_mib, repeats=m.repeats, bytes_moved=bytes_moved,
                         gbps=gbps, fraction_of_copy_bw=gbps / copy_gbps, used_kernel=used_kernel,
                         note=note))
    return rows


def _add_speedups(case_rows: list[dict], shape_rows: list[dict]) -> None:
    """Speedups against cross_entropy (same shape and pass, any kind) and this kind's reference."""
    for row in case_rows:
        if row["median_ms"] is None:
            continue
        for base, pool in (("cross_entropy", shape_rows), ("reference", case_rows)):
            other = next((r for r in pool if r["impl"] == base and r["pass_"] == row["pass_"]
                          and r["median_ms"] is not None), None)
            row[f"speedup_vs_{base}"] = other["median_ms"] / row["median_ms"] if other else None


def _input_note(logits: torch.Tensor, device: str) -> str:
    l2 = harness.l2_bytes(device)
    if l2 and logits.numel() * logits.element_size() <= l2:
        return "input fits in L2: repeats may run warm"
    return ""


def _shape_rows(n: int, d: int, dtype_name: str, kinds, device: str, copy_gbps: float,
                kernel: bool) -> list[dict]:
    """Rows of every kind and implementation at one shape."""
    gen = torch.Generator(device).manual_seed(0)
    logits = torch.randn(n, d, generator=gen, dtype=DTYPES[dtype_name], device=device)
    target = torch.randint(0, d, (n,), generator=gen, device=device)
    input_note = _input_note(logits, device)
    ours_note = "; ".join(filter(None, [input_note, "" if kernel else "reference fallback: no compiled kernel"]))
    shape_rows = []
    for kind in kinds:
        case_rows = []
        for impl, fn in _implementations(device, kind, baselines=kind == kinds[0]).items():
            ours = impl.startswith("ours")
            case_rows += _impl_rows(impl, fn, logits, target, device, copy_gbps,
                                    used_kernel=kernel if ours else False,
                                    note=ours_note if ours else input_note)
        for row in case_rows:
            row.update(kind=kind, N=n, D=d, dtype=dtype_name)
        shape_rows += case_rows
        _add_speedups(case_rows, shape_rows)
    return shape_rows


def _describe(s) -> str:
    """The progress line of one case (a tuple of CPU_/CUDA_ shapes)."""
    return f"{s[0]}x{s[1]} {s[2]} kind={','.join(s[3])}"


def run(device: str, quick: bool, *, env: dict | None = None, copy_gbps: float | None = None) -> list[dict]:
    """Every row of this family on `device` (see ROW_FIELDS). `env` and `copy_gbps` are measured
    here when not given (run.py measures them once for all families)."""
    if device == "cuda":
        shapes = CUDA_QUICK if quick else CUDA_SHAPES
    else:
        shapes = CPU_QUICK if quick else CPU_SHAPES
    env = env or harness.environment(device)
    copy_gbps = copy_gbps or harness.measure_copy_bandwidth(device)
    kernel = harness.kernel_built(OP, device)
    rows = []
    for n, d, dtype_name, kinds in harness.cases("spherical", shapes, _describe):
        rows += _shape_rows(n, d, dtype_name, kinds, device, copy_gbps, kernel)
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["pass"] = row.pop("pass_")
        row.update(family="spherical", op=OP, device_name=env["device_name"], torch=env["torch"],
                   cuda=env["cuda"], commit=env["commit"], copy_gbps=copy_gbps)
    return [{k: row[k] for k in ROW_FIELDS} for row in rows]


def acceptance(rows: list[dict], device: str) -> list[str]:
    """The acceptance figures, measured: one line each, ratio vs target, MET / NOT MET."""
    def find(n, d, dtype, impl):
        return next((r for r in rows if (r["N"], r["D"], r["dtype"], r["impl"], r["pass"], r["kind"]) ==
                     (n, d, dtype, impl, "fwd+bwd", "z") and r["median_ms"] is not None), None)

    lines = []
    if device == "cpu":
        ours = find(4096, 32768, "float32", "ours")
        for base, target in (("cross_entropy", 2.0), ("reference", 3.0)):
            s = ours and ours[f"speedup_vs_{base}"]
            if s is not None:
                lines.append(harness.speedup_line("CPU 4096x32768 float32 z fwd+bwd", s, base, target))
    else:
        for impl in ("ours", "ours_unchecked"):
            ours = find(8192, 131072, "bfloat16", impl)
            if ours:
                f = ours["fraction_of_copy_bw"]
                lines.append(f"CUDA 8192x131072 bfloat16 z fwd+bwd: {impl} {ours['gbps']:.0f} GB/s = {f:.1%} "
                             f"of measured copy bandwidth {ours['copy_gbps']:.0f} GB/s (target >= 80%): "
                             f"{harness.verdict(f >= 0.8)}")
    return lines


if __name__ == "__main__":
    raise SystemExit(harness.run_as_script("spherical"))
