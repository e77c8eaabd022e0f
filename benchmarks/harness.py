"""Timing and memory measurement shared by every family's benchmark.

Times are medians over many repeats after warm-up, with 20th/80th percentiles: CUDA events on the
GPU, `torch.utils.benchmark.Timer` (one call per sample) on the CPU. Peak extra memory is what the
call allocates beyond what was live before it: `max_memory_allocated` on CUDA; on the CPU the peak
resident set size sampled every 0.5 ms by a thread during one call, minus the size before it (RSS
is the only measure that sees every allocator; the sampling can miss spikes shorter than 0.5 ms).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.benchmark as tbench


@dataclass
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_mib: float
    repeats: int


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_peak_extra_mib(fn: Callable[[], object]) -> float:
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak = max(peak, _rss_bytes())
    return (peak - base) / 2**20


def _cuda_peak_extra_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(fn: Callable[[], object], *, device: str, warmup: int = 3, repeats: int = 20,
            setup: Callable[[], object] | None = None) -> Measurement:
    """Time `fn` (after `setup`, untimed, before each call) and its peak extra memory."""
    setup = setup or (lambda: None)

    def call():
        setup()
        return fn()

    for _ in range(warmup):
        call()
    samples = []
    if device == "cuda":
        # Back to back, one sync at the end (as triton's do_bench): the host runs ahead as in
        # training, so per-call launch overhead hides under the GPU work instead of being timed
        # as idle GPU before every sample.
        events = []
        for _ in range(repeats):
            setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) for start, end in events]
        setup()
        peak = _cuda_peak_extra_mib(fn)
    else:
        timer = tbench.Timer(stmt="fn()", globals={"fn": fn})
        for _ in range(repeats):
            setup()
            samples.append(timer.timeit(1).median * 1e3)
        setup()
        peak = _cpu_peak_extra_mib(fn)
    samples.sort()
    return Measurement(statistics.median(samples), _percentile(samples, 0.2),
                       _percentile(samples, 0.8), peak, repeats)


def measure_copy_bandwidth(device: str) -> float:
    """The device's measured memory ceiling in GB/s: a large copy, bytes read + written."""
    numel = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(numel, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), device=device, warmup=2, repeats=10 if device == "cuda" else 5)
    return 2 * numel / (m.median_ms * 1e-3) / 1e9


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short commit of the checkout (+"-dirty"); FUSEDTRAIN_COMMIT overrides it, for copies of the
    tree without their git history (the GPU machine gets the working tree only)."""
    if os.environ.get("FUSEDTRAIN_COMMIT"):
        return os.environ["FUSEDTRAIN_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    import fusedtrain
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fusedtrain": fusedtrain.__version__,
        "commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
