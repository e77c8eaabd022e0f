"""Benchmark of the SAE training step and the routing ops: ours vs a pure-PyTorch dense step
(`torch.topk` + dense masks + dense decode, the way SAEs are written without a sparse kernel) vs
sparsify's `SparseCoder` (TopK, when installed).

Step rows ("step"): forward + backward of ‖decode(encode(x)) − x‖² with gradients for every
parameter, for TopK, feature choice (m = ceil(k·B/F)) and mutual choice (budget k·B).
Route rows ("route"): the routing alone on given pre-activations; GB/s counts one read of the
(B, F) matrix, so its fraction of the copy bandwidth says how close routing runs to a single read.
Run: `python -m fusedtrain bench --family sae [--device cpu|cuda] [--quick]`, or this file as a script.
"""
from __future__ import annotations

import math

import torch

from fusedtrain import sae
from fusedtrain.sae.codec import encode_with_cutoff
from fusedtrain.sae.routing import route

if __package__:
    from . import harness
    from . import plot as _plot
else:  # run as a script: no parent package for a relative import
    from fusedtrain.benchmarks import harness
    from fusedtrain.benchmarks import plot as _plot

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUTINGS = ("topk", "feature_choice", "mutual_choice")
# (B, d, F, k, dtype); the first shape is the acceptance shape.
CPU_SHAPES = [(4096, 512, 16384, 32, "float32"), (2048, 768, 8192, 64, "float32")]
CUDA_SHAPES = [(8192, 4096, 131072, 64, "bfloat16"), (4096, 768, 32768, 32, "bfloat16"),
               (16384, 2048, 65536, 32, "float32")]

ROW_FIELDS = ["family", "op", "impl", "routing", "B", "d", "F", "k", "dtype", "device_name", "torch", "cuda",
              "commit", "pass", "median_ms", "p20_ms", "p80_ms", "peak_extra_mib", "repeats", "gbps",
              "copy_gbps", "fraction_of_copy_bw", "speedup_vs_reference", "speedup_vs_sparsify",
              "ratio_vs_ours_topk", "used_kernel", "note"]
# Printed columns (run.py uses a family's TABLE when it has one).
TABLE = [("routing", "routing"), ("B", "B"), ("d", "d"), ("F", "F"), ("k", "k"), ("dtype", "dtype"),
         ("impl", "impl"), ("pass", "pass"), ("median_ms", "median ms"), ("p20_ms", "p20"), ("p80_ms", "p80"),
         ("peak_extra_mib", "peak MiB"), ("gbps", "GB/s"), ("fraction_of_copy_bw", "of copy"),
         ("speedup_vs_reference", "x ref"), ("speedup_vs_sparsify", "x sparsify"),
         ("ratio_vs_ours_topk", "/ topk"), ("used_kernel", "kernel"), ("note", "note")]


def _row(**fields) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(fields)
    return row


def _routing_param(routing: str, B: int, F: int, k: int) -> int:
    return {"topk": k, "feature_choice": math.ceil(k * B / F), "mutual_choice": k * B}[routing]


def _dense_route(pre: torch.Tensor, routing: str, param: int) -> torch.Tensor:
    """Dense masked activations the pure-PyTorch way (torch.topk, ties unordered)."""
    if routing == "topk":
        values, idx = pre.topk(param, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter(1, idx, values.relu())
    if routing == "feature_choice":
        values, idx = pre.topk(min(param, pre.shape[0]), dim=0, sorted=False)
        return torch.zeros_like(pre).scatter(0, idx, values.relu())
    values, idx = pre.reshape(-1).topk(param, sorted=False)
    return torch.zeros_like(pre).reshape(-1).scatter(0, idx, values.relu()).reshape(pre.shape)


def _params(B, d, F, dtype, device):
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, d, generator=gen, device=device, dtype=dtype)
    W = torch.randn(F, d, generator=gen, device=device, dtype=dtype) / math.sqrt(d)
    # W_enc is a (d, F) view of (F, d) memory: SparseAutoencoder's layout.
    leaves = dict(W_enc=W.clone().t(), b_enc=torch.zeros(F, device=device, dtype=dtype), W_dec=W.clone(),
                  b_dec=torch.zeros(d, device=device, dtype=dtype))
    return x, {name: t.requires_grad_() for name, t in leaves.items()}


def _steps(routing, x, p, k):
    B, F = x.shape[0], p["W_enc"].shape[1]
    param = _routing_param(routing, B, F, k)

    def ours():
        acts = encode_with_cutoff(x, p["W_enc"], p["b_enc"], p["b_dec"], routing, param)[0]
        out = sae.sparse_decode(acts, p["W_dec"], p["b_dec"], check_indices=False)
        (out - x).pow(2).sum().backward()

    def reference():
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        acts = _dense_route(pre, routing, param)
        ((acts @ p["W_dec"] + p["b_dec"]) - x).pow(2).sum().backward()

    return {"ours": ours, "reference": reference}


def _sparsify_step(x, p, k):
    """sparsify's SparseCoder (TopK) forward + backward with the same weights, or why not."""
    try:
        import sparsify.sparse_coder
        import sparsify.utils
        from sparsify import SparseCoder, SparseCoderConfig
    except Exception as exc:  # noqa: BLE001 - missing or broken install: a note, not a failure
        return f"sparsify unavailable ({type(exc).__name__}: {str(exc)[:80]})"
    if x.device.type == "cpu":  # sparsify takes its Triton decoder whenever triton imports: no CPU driver
        sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode
    d, F = p["W_enc"].shape
    coder = SparseCoder(d, SparseCoderConfig(num_latents=F, k=k), device=x.device, dtype=x.dtype)
    with torch.no_grad():
        coder.encoder.weight.copy_(p["W_enc"].t())
        coder.W_dec.copy_(p["W_dec"])

    def step():
        coder(x).fvu.backward()
    return step


def _schedule(device: str) -> tuple[int, int]:
    return (2, 10) if device == "cuda" else (1, 3)


def _measure(fn, device, copy_gbps, bytes_read=None, **fields) -> dict:
    warmup, repeats = _schedule(device)
    try:
        m = harness.measure(fn, device=device, warmup=warmup, repeats=repeats)
    except RuntimeError as exc:  # out of memory included: report it, keep the other rows
        if device == "cuda":
            torch.cuda.empty_cache()
        return _row(note=harness.failure_note(exc), **fields)
    gbps = bytes_read / (m.median_ms * 1e-3) / 1e9 if bytes_read else None
    return _row(median_ms=m.median_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms, peak_extra_mib=m.peak_extra_mib,
                repeats=m.repeats, gbps=gbps, fraction_of_copy_bw=gbps / copy_gbps if gbps else None, **fields)


def _shape_rows(B, d, F, k, dtype_name, device, copy_gbps, kernel, quick):
    x, p = _params(B, d, F, DTYPES[dtype_name], device)
    shape = dict(B=B, d=d, F=F, k=k, dtype=dtype_name)
    rows = []

    def clear():
        for t in p.values():
            t.grad = None

    for routing in ROUTINGS:
        for impl, fn in _steps(routing, x, p, k).items():
            if quick and impl == "reference" and routing != "topk":
                continue
            rows.append(_measure(lambda fn=fn: (clear(), fn()), device, copy_gbps, impl=impl, routing=routing,
                                 pass_="step", used_kernel=kernel if impl == "ours" else False, **shape))
        if device == "cuda":
            torch.cuda.empty_cache()
    spars = _sparsify_step(x, p, k)
    if isinstance(spars, str):
        rows.append(_row(impl="sparsify", routing="topk", pass_="step", note=f"skipped: {spars}", **shape))
    else:
        rows.append(_measure(lambda: (clear(), spars()), device, copy_gbps, impl="sparsify", routing="topk",
                             pass_="step", **shape))
    # Routing alone on given pre-activations: bandwidth of the single read the routing needs.
    with torch.no_grad():
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        bytes_read = pre.numel() * pre.element_size()
        for routing in ROUTINGS:
            param = _routing_param(routing, B, F, k)
            rows.append(_measure(lambda: route(pre, routing, param), device, copy_gbps, bytes_read,
                                 impl="ours", routing=routing, pass_="route", used_kernel=kernel, **shape))
            rows.append(_measure(lambda: _dense_route(pre, routing, param), device, copy_gbps, bytes_read,
                                 impl="reference", routing=routing, pass_="route", **shape))
    del pre
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    def find(impl, routing, pass_):
        return next((r for r in rows if (r["impl"], r["routing"], r["pass_"]) == (impl, routing, pass_)
                     and r["median_ms"] is not None), None)

    for row in rows:
        if row["impl"] != "ours" or row["median_ms"] is None:
            continue
        ref = find("reference", row["routing"], row["pass_"])
        row["speedup_vs_reference"] = ref["median_ms"] / row["median_ms"] if ref else None
        spars = find("sparsify", "topk", row["pass_"]) if row["routing"] == "topk" else None
        row["speedup_vs_sparsify"] = spars["median_ms"] / row["median_ms"] if spars else None
        topk = find("ours", "topk", row["pass_"])
        row["ratio_vs_ours_topk"] = row["median_ms"] / topk["median_ms"] if topk else None


def _describe(s) -> str:
    """The progress line of one case (a tuple of CPU_/CUDA_ shapes)."""
    return f"B={s[0]} d={s[1]} F={s[2]} k={s[3]} {s[4]}"


def run(device: str, quick: bool, *, env: dict | None = None, copy_gbps: float | None = None) -> list[dict]:
    """Every row of this family on `device` (see ROW_FIELDS)."""
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    if quick:
        shapes = shapes[:1]
    env = env or harness.environment(device)
    copy_gbps = copy_gbps or harness.measure_copy_bandwidth(device)
    kernel = harness.kernel_built("sae_encode", device)
    rows = []
    for shape in harness.cases("sae", shapes, _describe):
        rows += _shape_rows(*shape, device, copy_gbps, kernel, quick)
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["pass"] = row.pop("pass_")
        row.update(family="sae", op="sae_step", device_name=env["device_name"], torch=env["torch"],
                   cuda=env["cuda"], commit=env["commit"], copy_gbps=copy_gbps)
    return [{k: row[k] for k in ROW_FIELDS} for row in rows]


def acceptance(rows: list[dict], device: str) -> list[str]:
    """The issue's acceptance figures, measured: one line each, MET / NOT MET."""
    shape = (4096, 512, 16384, 32, "float32") if device == "cpu" else (8192, 4096, 131072, 64, "bfloat16")

    def find(impl, routing):
        return next((r for r in rows if (r["B"], r["d"], r["F"], r["k"], r["dtype"]) == shape and
                     (r["impl"], r["routing"], r["pass"]) == (impl, routing, "step") and r["median_ms"]), None)

    lines = []
    label = "CPU" if device == "cpu" else "CUDA"
    name = "x".join(str(v) for v in shape[:4]) + " " + shape[4]
    ours = find("ours", "topk")
    if ours is None:
        return lines
    base, target = ("reference", 2.0) if device == "cpu" else ("sparsify", 1.3)
    s = ours[f"speedup_vs_{base}"]
    if s is not None:
        lines.append(harness.speedup_line(f"{label} {name} TopK step", s, base, target))
    else:
        lines.append(f"{label} {name} TopK step: no {base} measurement (not installed?)")
    limit = 1.5 if device == "cpu" else 1.25
    for routing in ("feature_choice", "mutual_choice"):
        r = find("ours", routing)
        if r and r["ratio_vs_ours_topk"] is not None:
            lines.append(f"{label} {name} {routing} step: {r['ratio_vs_ours_topk']:.2f}x our TopK step "
                         f"(target <= {limit:g}x): {harness.verdict(r['ratio_vs_ours_topk'] <= limit)}")
    return lines


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Median time of the step and routing rows, one group per (shape, routing, pass), one bar per
    implementation (log scale); None without matplotlib. (The shared plot draws fwd+bwd rows only.)"""
    return _plot.bar_chart(rows, lambda r: f"{r['B']}x{r['F']} {r['dtype']} {r['routing']} {r['pass']}", path,
                           title, ylabel="median (ms, log scale)", case_width=1.2)


if __name__ == "__main__":
    raise SystemExit(harness.run_as_script("sae"))
