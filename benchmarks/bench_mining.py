"""Benchmark of the fused Multi-Similarity mining + loss: ours vs pytorch-metric-learning 2.9.0
(`MultiSimilarityMiner` + `MultiSimilarityLoss`, when installed) vs our pure-PyTorch reference.

Each row is one forward + backward training step (mining included) over B anchors against M
reference embeddings of dimension d (M = B in-batch). Peak memory is the extra over the inputs.
The work is GEMM-bound: `tflops` is the useful matrix-product work (S = Ê·R̂ᵀ and the gradient
products, 2·B·M·d flops each) over the median time; the recomputation of S in backward is not counted.
Run: `python -m fusedtrain bench --family mining [--device cpu|cuda] [--quick]`, or this file as a
script with the same options.
"""
from __future__ import annotations

import torch

import fusedtrain
from fusedtrain.reference import mining as reference

if __package__:
    from . import harness
    from . import plot as _plot
else:  # run as a script: no parent package for a relative import
    from fusedtrain.benchmarks import harness
    from fusedtrain.benchmarks import plot as _plot

OP = "multi_similarity_loss"

# (B, M or None for in-batch, d, impls). The first shape is the acceptance shape of each device.
CPU_SHAPES = [(4096, None, 256, ("ours", "pml", "reference")), (1024, 65536, 128, ("ours", "pml")),
              (8192, None, 128, ("ours",))]
CPU_QUICK = CPU_SHAPES[:1]
CUDA_SHAPES = [(8192, None, 512, ("ours", "pml", "reference")), (1024, 65536, 128, ("ours", "pml")),
               (32768, None, 512, ("ours", "pml")), (65536, None, 512, ("ours",))]
CUDA_QUICK = CUDA_SHAPES[:1]

ROW_FIELDS = ["family", "op", "impl", "B", "M", "d", "dtype", "device_name", "torch", "cuda", "commit", "pass",
              "median_ms", "p20_ms", "p80_ms", "peak_extra_mib", "repeats", "tflops", "speedup_vs_pml",
              "memory_ratio_vs_pml", "used_kernel", "note"]

# Columns of the printed table (run.py reads TABLE from the family's module).
TABLE = [("B", "B"), ("M", "M"), ("d", "d"), ("dtype", "dtype"), ("impl", "impl"), ("pass", "pass"),
         ("median_ms", "median ms"), ("p20_ms", "p20"), ("p80_ms", "p80"), ("peak_extra_mib", "peak MiB"),
         ("tflops", "TFLOP/s"), ("speedup_vs_pml", "x PML"), ("memory_ratio_vs_pml", "PML mem / ours"),
         ("used_kernel", "kernel"), ("note", "note")]


def _pml():
    """PML's miner + loss as one step function, or why it is unavailable (a string)."""
    pml = harness.optional_import("pytorch-metric-learning", "pytorch_metric_learning",
                                  "pytorch_metric_learning.losses", "pytorch_metric_learning.miners")
    if isinstance(pml, str):
        return pml
    pytorch_metric_learning, losses, miners = pml
    miner, loss_fn = miners.MultiSimilarityMiner(0.1), losses.MultiSimilarityLoss()
    note = f"pytorch-metric-learning {pytorch_metric_learning.__version__}"

    def step(x, labels, r, rl):
        return loss_fn(x, labels, miner(x, labels, r, rl), r, rl)
    return step, note


def _implementations(impls) -> dict:
    """impl -> (step(x, labels, ref_emb, ref_labels) -> loss, note), or a string saying why skipped."""
    out = {}
    for impl in impls:
        if impl == "ours":
            out[impl] = (lambda x, l, r, rl: fusedtrain.multi_similarity_loss(x, l, r, rl), "")
        elif impl == "reference":
            out[impl] = (lambda x, l, r, rl: reference.multi_similarity_loss(x, l, r, rl), "")
        elif impl == "pml":
            out[impl] = _pml()
    return out


def _schedule(device: str, B: int, M: int, impl: str) -> tuple[int, int]:
    if device == "cuda":
        return 3, 20
    if impl == "ours":
        return 2, 5
    return 1, 3  # the matrix-materializing baselines take seconds a step on the CPU


def _row(**fields) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(fields)
    return row


def _shape_rows(B, M, d, impls, device) -> list[dict]:
    gen = torch.Generator(device).manual_seed(0)
    in_batch = M is None
    classes = max(2, B // 4)  # ~4 samples a class, as in PK sampling
    x0 = torch.randn(B, d, generator=gen, device=device)
    labels = torch.randint(0, classes, (B,), generator=gen, device=device)
    r = None if in_batch else torch.randn(M, d, generator=gen, device=device)
    rl = None if in_batch else torch.randint(0, classes, (M,), generator=gen, device=device)
    M_eff = B if in_batch else M
    kernel = harness.kernel_built(OP, device)
    x = x0.clone().requires_grad_()

    def clear():
        x.grad = None

    rows = []
    for impl, spec in _implementations(impls).items():
        base = dict(impl=impl, B=B, M=M_eff, d=d, dtype="float32", pass_="fwd+bwd")
        if isinstance(spec, str):
            rows.append(_row(**base, note=f"skipped: {spec}"))
            continue
        fn, note = spec
        warmup, repeats = _schedule(device, B, M_eff, impl)
        try:
            m = harness.measure(lambda: fn(x, labels, r, rl).backward(), device=device, warmup=warmup,
                                repeats=repeats, setup=clear)
        except (RuntimeError, MemoryError) as exc:  # out of memory included: report, keep the other rows
            rows.append(_row(**base, note=harness.failure_note(exc)))
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        flops = 2 * 2 * B * M_eff * d  # S and the gradient product (the reference set needs no gradient)
        if impl == "ours" and not kernel:
            note = "reference fallback: no compiled kernel"
        rows.append(_row(**base, median_ms=m.median_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms,
                         peak_extra_mib=m.peak_extra_mib, repeats=m.repeats,
                         tflops=flops / (m.median_ms * 1e-3) / 1e12, used_kernel=kernel if impl == "ours" else False,
                         note=note))
    pml = next((row for row in rows if row["impl"] == "pml" and row["median_ms"] is not None), None)

    for row in rows:
        if pml and row["median_ms"] is not None:
            row["speedup_vs_pml"] = pml["median_ms"] / row["median_ms"]
            if row["peak_extra_mib"]:
                row["memory_ratio_vs_pml"] = pml["peak_extra_mib"] / row["peak_extra_mib"]
    return rows


def _describe(s) -> str:
    """The progress line of one case (a tuple of CPU_/CUDA_ shapes)."""
    return f"B={s[0]} M={s[1] or s[0]} d={s[2]} ({', '.join(s[3])})"


def run(device: str, quick: bool, *, env: dict | None = None, copy_gbps: float | None = None) -> list[dict]:
    """Every row of this family on `device` (see ROW_FIELDS)."""
    if device == "cuda":
        shapes = CUDA_QUICK if quick else CUDA_SHAPES
    else:
        shapes = CPU_QUICK if quick else CPU_SHAPES
    env = env or harness.environment(device)
    rows = []
    for B, M, d, impls in harness.cases("mining", shapes, _describe):
        rows += _shape_rows(B, M, d, impls, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["pass"] = row.pop("pass_")
        row.update(family="mining", op=OP, device_name=env["device_name"], torch=env["torch"],
                   cuda=env["cuda"], commit=env["commit"])
    return [{k: row[k] for k in ROW_FIELDS} for row in rows]


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """The shared bar plot (plot.plot), one group per (B, M, d)."""
    return _plot.plot([{**r, "N": r["B"], "D": r["M"], "kind": f"d={r['d']}"} for r in rows], path, title)


def acceptance(rows: list[dict], device: str) -> list[str]:
    """The issue's acceptance figures, measured: one line each, MET / NOT MET."""
    def find(B, M, d, impl):
        return next((r for r in rows if (r["B"], r["M"], r["d"], r["impl"]) == (B, M, d, impl)
                     and r["median_ms"] is not None), None)

    lines = []
    if device == "cpu":
        shape, speed, memory = (4096, 4096, 256), 5.0, 20.0
    else:
        shape, speed, memory = (8192, 8192, 512), 10.0, 50.0
    ours = find(*shape, "ours")
    label = f"{device.upper()} B={shape[0]} in-batch d={shape[2]} float32 mining+loss fwd+bwd"
    if ours and ours["speedup_vs_pml"] is not None:
        s = ours["speedup_vs_pml"]
        lines.append(f"{label}: {s:.1f}x faster than PML (target >= {speed:g}x): {harness.verdict(s >= speed)}")
    if ours and ours["memory_ratio_vs_pml"] is not None:
        q = ours["memory_ratio_vs_pml"]
        lines.append(f"{label}: {ours['peak_extra_mib']:.0f} MiB extra vs PML's "
                     f"{q * ours['peak_extra_mib']:.0f} MiB = 1/{q:.0f} (target <= 1/{memory:g}): "
                     f"{harness.verdict(q >= memory)}")
    if device == "cuda":
        big = find(65536, 65536, 512, "ours")
        lines.append(f"CUDA B=65536 in-batch d=512 runs: {harness.verdict(big is not None)}")
    return lines


if __name__ == "__main__":
    raise SystemExit(harness.run_as_script("mining"))
