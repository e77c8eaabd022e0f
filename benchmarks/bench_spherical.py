"""Benchmark of the logits-level spherical loss: ours vs the pure-PyTorch reference vs
F.cross_entropy (the softmax baseline) vs Liger's cross-entropy (CUDA, when installed).

Bytes that must move: forward reads the logits once; forward + backward also writes their
gradient once. GB/s is those bytes over the median time, and its fraction of the measured copy
bandwidth says how close to the memory ceiling an implementation runs.
Run: `python -m fusedtrain bench --family spherical [--device cpu|cuda] [--quick]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain import _backend
from fusedtrain.reference.spherical import spherical_loss as reference_loss

from . import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

# (N, D, dtype, kinds). The first shape of each list is the acceptance shape.
CPU_SHAPES = [(4096, 32768, "float32", ("z", "spherical", "taylor", "mse")),
              (1024, 32768, "float32", ("z",)), (8192, 4096, "bfloat16", ("z",)),
              (65536, 128, "float32", ("z",))]
CPU_QUICK = [(4096, 32768, "float32", ("z",))]
CUDA_SHAPES = [(8192, 131072, "bfloat16", ("z", "spherical", "taylor", "mse")),
               (8192, 32768, "bfloat16", ("z",)), (4096, 131072, "float32", ("z",)),
               (16384, 50257, "bfloat16", ("z",)), (65536, 1024, "bfloat16", ("z",)),
               (1 << 22, 8, "bfloat16", ("z",))]
CUDA_QUICK = CUDA_SHAPES[:2]


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
        return liger_cross_entropy
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"liger_kernel not importable ({type(exc).__name__})"


def _implementations(device: str, kind: str, baselines: bool) -> dict:
    """Ours and the reference for `kind`; the kind-independent softmax baselines once per shape."""
    impls = {
        "ours": lambda x, t: fusedtrain.spherical_loss(x, t, kind),
        # check_target=False: no read-back of the out-of-range flag. On CUDA that read-back is a
        # host sync, which exposes the CPU's launch overhead of the rest of the step.
        "ours_unchecked": lambda x, t: fusedtrain.spherical_loss(x, t, kind, check_target=False),
        "reference": lambda x, t: reference_loss(x, t, kind),
    }
    if not baselines:
        return impls
    impls["cross_entropy"] = lambda x, t: F.cross_entropy(x, t)
    if device == "cuda":
        liger = _liger()
        impls["liger"] = liger if isinstance(liger, str) else (lambda x, t: liger(x, t))
    return impls


def _repeats(device: str, n: int, d: int, impl: str) -> tuple[int, int]:
    if device == "cuda":
        return 3, 20
    big = n * d >= 1 << 26  # the slow baselines take seconds a call there: no warm-up, 3 samples
    return (0, 3) if big and not impl.startswith("ours") else (1, 5) if big else (2, 10)


def run(device: str, quick: bool) -> list[dict]:
    shapes = (CUDA_QUICK if quick else CUDA_SHAPES) if device == "cuda" else (CPU_QUICK if quick else CPU_SHAPES)
    copy_bw = harness.measure_copy_bandwidth(device)
    env = harness.environment(device)
    kernel = ("CUDA" if device == "cuda" else "CPU") in _backend.backends_for("spherical_loss")
    rows = []
    for n, d, dtype_name, kinds in shapes:
        dtype = DTYPES[dtype_name]
        logits = torch.randn(n, d, device=device, dtype=dtype)
        target = torch.randint(0, d, (n,), device=device)
        elem = logits.element_size()
        shape_rows = []  # every kind's rows of this shape: the baselines are measured once
        for kind in kinds:
            case_rows = []
            for impl, fn in _implementations(device, kind, baselines=kind == kinds[0]).items():
                if isinstance(fn, str):
                    case_rows.append(dict(impl=impl, pass_="fwd+bwd", note=f"skipped: {fn}"))
                    continue
                warmup, repeats = _repeats(device, n, d, impl)
                x = logits.clone().requires_grad_()

                def clear_grad(x=x):
                    x.grad = None

                for pass_, bytes_moved in (("fwd", n * d * elem), ("fwd+bwd", 2 * n * d * elem)):
                    if pass_ == "fwd":
                        with torch.no_grad():
                            m = harness.measure(lambda: fn(logits, target), device=device,
                                                warmup=warmup, repeats=repeats)
                    else:
                        m = harness.measure(lambda: fn(x, target).backward(), device=device,
                                            warmup=warmup, repeats=repeats, setup=clear_grad)
                    gbps = bytes_moved / (m.median_ms * 1e-3) / 1e9
                    case_rows.append(dict(impl=impl, pass_=pass_, median_ms=m.median_ms, p20_ms=m.p20_ms,
                                          p80_ms=m.p80_ms, peak_extra_mib=m.peak_extra_mib,
                                          repeats=m.repeats, bytes_moved=bytes_moved, gbps=gbps,
                                          fraction_of_copy_bw=gbps / copy_bw,
                                          used_kernel=kernel if impl.startswith("ours") else None,
                                          note=""))
                del x
            shape_rows += case_rows
            _add_speedups(case_rows, shape_rows)
            for row in case_rows:
                rows.append(dict(family="spherical", op="spherical_loss", kind=kind, N=n, D=d,
                                 dtype=dtype_name, device_name=env["device_name"], torch=env["torch"],
                                 cuda=env["cuda"], commit=env["commit"], copy_gbps=copy_bw,
                                 **{("pass" if k == "pass_" else k): v for k, v in row.items()}))
        del logits, target
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _add_speedups(case_rows: list[dict], shape_rows: list[dict]) -> None:
    """Speedups against cross_entropy (same shape, any kind) and this kind's reference."""
    for row in case_rows:
        if "median_ms" not in row:
            continue
        for base, pool in (("cross_entropy", shape_rows), ("reference", case_rows)):
            other = next((r for r in pool if r["impl"] == base and r["pass_"] == row["pass_"]
                          and "median_ms" in r), None)
            row[f"speedup_vs_{base}"] = other["median_ms"] / row["median_ms"] if other else None


def acceptance(rows: list[dict], device: str) -> list[str]:
    """The issue's acceptance figures, measured."""
    def find(n, d, dtype, impl, pass_="fwd+bwd", kind="z"):
        return next((r for r in rows if (r["N"], r["D"], r["dtype"], r["impl"], r["pass"], r["kind"]) ==
                     (n, d, dtype, impl, pass_, kind) and "median_ms" in r), None)

    lines = []
    if device == "cpu":
        ours = find(4096, 32768, "float32", "ours")
        if ours:
            for base, target in (("cross_entropy", 2.0), ("reference", 3.0)):
                s = ours.get(f"speedup_vs_{base}")
                if s is not None:
                    lines.append(f"CPU 4096x32768 fp32 fwd+bwd: {s:.2f}x faster than {base} "
                                 f"(target >= {target}x): {'MET' if s >= target else 'NOT MET'}")
    else:
        for impl in ("ours_unchecked", "ours"):
            ours = find(8192, 131072, "bfloat16", impl)
            if ours:
                f = ours["fraction_of_copy_bw"]
                lines.append(f"CUDA 8192x131072 bf16 fwd+bwd, {impl}: {ours['gbps']:.0f} GB/s = {f:.1%} of "
                             f"measured copy bandwidth {ours['copy_gbps']:.0f} GB/s (target >= 80%): "
                             f"{'MET' if f >= 0.8 else 'NOT MET'}")
    return lines


if __name__ == "__main__":
    import sys

    from fusedtrain.benchmarks import run as _run

    raise SystemExit(_run.main(["--family", "spherical", *sys.argv[1:]]))
