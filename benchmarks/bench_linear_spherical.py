"""Benchmark of the fused linear spherical loss (family "linear"): forward + backward of the loss of
`F.linear(h, W)` against the softmax baselines that also compute dL/dh and dL/dW:

  ours                    fusedtrain.linear_spherical_loss (Gram matrix computed in the call)
  ours_cached_stats       the same with the Gram matrix given (SphericalHead's reuse across
                          micro-batches: the cost of every micro-batch after the first)
  linear_cross_entropy    eager F.linear + F.cross_entropy (the N x D logits and their gradient)
  torch_chunked_lce       F.linear_cross_entropy with torch.nn.LinearCrossEntropyOptions() (batch
                          chunked, never the whole logits), when this torch has it
  logits_spherical        F.linear + fusedtrain.spherical_loss (the logits-level op)
  liger, cce              Liger's and Cut Cross-Entropy's fused linear cross-entropy (CUDA, when
                          installed)

All use the Z-loss for the spherical rows. Work model (multiply-adds x 2): ours ≈ 4·D·d² (Q = WᵀW as a
GEMM, W·M) + 4·N·d² (H·Q, HᵀβH); a softmax linear cross-entropy ≈ 6·N·D·d. TFLOP/s is that model
over the median time; `of_gemm` its fraction of the device's measured GEMM rate (one large mm in
the same dtype), the ceiling of either.
Run: `python -m fusedtrain bench --family linear [--device cpu|cuda] [--quick]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedtrain

if __package__:
    from . import harness
else:  # run as a script
    from fusedtrain.benchmarks import harness

OP = "linear_spherical_loss"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# (N, d, D, dtype, baselines). The first shape is the acceptance shape. At the memory shape the
# logits alone would take 8 GiB, more than this benchmark may ask of a shared machine: ours only.
CPU_SHAPES = [(8192, 256, 65536, "float32", True), (8192, 64, 262144, "float32", False),
              (2048, 512, 32768, "float32", True)]
CPU_QUICK = CPU_SHAPES[:1]
CUDA_SHAPES = [(16384, 4096, 131072, "bfloat16", True), (8192, 2048, 65536, "bfloat16", True),
               (8192, 1024, 262144, "bfloat16", True), (4096, 1024, 32768, "float32", True)]
CUDA_QUICK = CUDA_SHAPES[:1]

ROW_FIELDS = ["family", "op", "impl", "kind", "N", "d", "D", "dtype", "device_name", "torch", "cuda", "commit",
              "pass", "median_ms", "p20_ms", "p80_ms", "peak_extra_mib", "repeats", "model_tflop", "tflops",
              "gemm_tflops", "fraction_of_gemm", "speedup_vs_cross_entropy", "speedup_vs_logits_spherical",
              "used_kernel", "note"]

# The printed table (run.py prints these columns for this family).
TABLE = [("N", "N"), ("d", "d"), ("D", "D"), ("dtype", "dtype"), ("impl", "impl"), ("median_ms", "median ms"),
         ("p20_ms", "p20"), ("p80_ms", "p80"), ("peak_extra_mib", "peak MiB"), ("tflops", "TFLOP/s"),
         ("fraction_of_gemm", "of gemm"), ("speedup_vs_cross_entropy", "x CE"),
         ("speedup_vs_logits_spherical", "x logits-sph"), ("used_kernel", "kernel"), ("note", "note")]


def _liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - missing or broken: reported, not fatal
        return f"liger_kernel unavailable ({type(exc).__name__})"
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: loss(w, h, t)  # Liger takes (lin_weight, _input, target)


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:  # noqa: BLE001
        return f"cut_cross_entropy unavailable ({type(exc).__name__})"
    return lambda h, w, t: linear_cross_entropy(h, w, t)


def _torch_chunked():
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None or not hasattr(F, "linear_cross_entropy"):
        return "this torch has no chunked F.linear_cross_entropy"
    return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options())


def _implementations(device: str, baselines: bool, stats) -> dict:
    impls = {
        "ours": lambda h, w, t: fusedtrain.linear_spherical_loss(h, w, t, kind="z"),
        "ours_cached_stats": lambda h, w, t: fusedtrain.linear_spherical_loss(h, w, t, kind="z", stats=stats),
    }
    if baselines:
        impls["linear_cross_entropy"] = lambda h, w, t: F.cross_entropy(F.linear(h, w), t)
        impls["torch_chunked_lce"] = _torch_chunked()
        impls["logits_spherical"] = lambda h, w, t: fusedtrain.spherical_loss(F.linear(h, w), t, "z")
        cuda_only = "CUDA only (Triton)"
        impls["liger"] = _liger() if device == "cuda" else cuda_only
        impls["cce"] = _cce() if device == "cuda" else cuda_only
    return impls


def _schedule(device: str, impl: str, n: int, d: int, D: int) -> tuple[int, int]:
    """(warmup, repeats): the CPU baselines take seconds a call at the big shapes."""
    if device == "cuda":
        return 2, 10
    if impl.startswith("ours"):
        return 2, 7
    return (1, 3) if n * D * d > 1 << 32 else (2, 5)


def gemm_tflops(device: str, dtype: torch.dtype) -> float:
    """Measured rate of one large square mm in `dtype`: the ceiling of every row here."""
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    m = harness.measure(lambda: a @ b, device=device, warmup=2, repeats=5)
    return 2 * size**3 / (m.median_ms * 1e-3) / 1e12


def _model_tflop(impl: str, n: int, d: int, D: int) -> float:
    if impl.startswith("ours"):
        gram = 0 if impl == "ours_cached_stats" else 2 * D * d * d
        return (gram + 2 * D * d * d + 4 * n * d * d) / 1e12
    return 6 * n * D * d / 1e12


def _shape_rows(n, d, D, dtype_name, baselines, device, gemm) -> list[dict]:
    gen = torch.Generator(device).manual_seed(0)
    dtype = DTYPES[dtype_name]
    h0 = torch.randn(n, d, generator=gen, device=device, dtype=dtype)
    w0 = (torch.randn(D, d, generator=gen, device=device, dtype=dtype) / d**0.5)
    t = torch.randint(0, D, (n,), generator=gen, device=device)
    stats = fusedtrain.linear_spherical_stats(w0)
    kernel = harness.kernel_built(OP, device)
    rows = []
    for impl, fn in _implementations(device, baselines, stats).items():
        row = dict.fromkeys(ROW_FIELDS)
        row.update(impl=impl, kind="z", N=n, d=d, D=D, dtype=dtype_name, pass_="fwd+bwd",
                   used_kernel=kernel if impl.startswith("ours") or impl == "logits_spherical" else False)
        rows.append(row)
        if isinstance(fn, str):
            row["note"] = f"skipped: {fn}"
            continue
        h = h0.clone().requires_grad_()
        w = w0.clone().requires_grad_()

        def clear():
            h.grad = None
            w.grad = None

        warmup, repeats = _schedule(device, impl, n, d, D)
        try:
            m = harness.measure(lambda: fn(h, w, t).backward(), device=device, warmup=warmup, repeats=repeats,
                                setup=clear)
        except (RuntimeError, ValueError) as exc:  # out of memory included: reported, the rest goes on
            row["note"] = harness.failure_note(exc)
            del h, w
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        model = _model_tflop(impl, n, d, D)
        tflops = model / (m.median_ms * 1e-3)
        row.update(median_ms=m.median_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms, peak_extra_mib=m.peak_extra_mib,
                   repeats=m.repeats, model_tflop=model, tflops=tflops, gemm_tflops=gemm,
                   fraction_of_gemm=tflops / gemm)
        del h, w
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        for base in ("cross_entropy", "logits_spherical"):
            key = "linear_cross_entropy" if base == "cross_entropy" else base
            other = next((r for r in rows if r["impl"] == key and r["median_ms"]), None)
            if other and row["median_ms"]:
                row[f"speedup_vs_{base}"] = other["median_ms"] / row["median_ms"]
    return rows


def _describe(s) -> str:
    """The progress line of one case (a tuple of CPU_/CUDA_ shapes)."""
    return f"N={s[0]} d={s[1]} D={s[2]} {s[3]}"


def run(device: str, quick: bool, *, env: dict | None = None, copy_gbps: float | None = None) -> list[dict]:
    """Every row of this family on `device` (see ROW_FIELDS)."""
    shapes = (CUDA_QUICK if quick else CUDA_SHAPES) if device == "cuda" else (CPU_QUICK if quick else CPU_SHAPES)
    env = env or harness.environment(device)
    gemm = {name: gemm_tflops(device, DTYPES[name]) for name in sorted({s[3] for s in shapes})}
    rows = []
    for n, d, D, dtype_name, baselines in harness.cases("linear", shapes, _describe):
        rows += _shape_rows(n, d, D, dtype_name, baselines, device, gemm[dtype_name])
    for row in rows:
        row["pass"] = row.pop("pass_")
        row.update(family="linear", op=OP, device_name=env["device_name"], torch=env["torch"], cuda=env["cuda"],
                   commit=env["commit"])
    return [{k: row[k] for k in ROW_FIELDS} for row in rows]


def acceptance(rows: list[dict], device: str) -> list[str]:
    def find(n, d, D, dtype, impl):
        return next((r for r in rows if (r["N"], r["d"], r["D"], r["dtype"], r["impl"]) == (n, d, D, dtype, impl)
                     and r["median_ms"] is not None), None)

    lines = []
    if device == "cpu":
        ours = find(8192, 256, 65536, "float32", "ours")
        if ours and ours["speedup_vs_cross_entropy"]:
            s = ours["speedup_vs_cross_entropy"]
            lines.append(f"CPU 8192x256 -> 65536 float32 fwd+bwd: ours {s:.1f}x faster than eager F.linear + "
                         f"F.cross_entropy (target >= 10x): {harness.verdict(s >= 10)}")
        mem = find(8192, 64, 262144, "float32", "ours")
        if mem:
            lines.append(f"CPU 8192x64 -> 262144 float32 fwd+bwd: peak extra memory {mem['peak_extra_mib']:.0f} "
                         f"MiB (logits would be 8192 MiB; target < 1024 MiB): "
                         f"{harness.verdict(mem['peak_extra_mib'] < 1024)}")
    else:
        ours = find(16384, 4096, 131072, "bfloat16", "ours")
        if ours:
            for base, target in (("linear_cross_entropy", 3.0), ("liger", 2.0), ("cce", 2.0)):
                other = find(16384, 4096, 131072, "bfloat16", base)
                if other:
                    s = other["median_ms"] / ours["median_ms"]
                    lines.append(harness.speedup_line("CUDA 16384x4096 -> 131072 bf16 fwd+bwd", s, base, target))
            lines.append(f"CUDA 16384x4096 -> 131072 bf16: ours peak extra {ours['peak_extra_mib']:.0f} MiB "
                         f"(N·d + d² terms; the weight gradient alone is "
                         f"{131072 * 4096 * 2 / 2**20:.0f} MiB)")
    return lines


if __name__ == "__main__":
    raise SystemExit(harness.run_as_script("linear"))
