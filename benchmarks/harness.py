"""Timing and memory measurement shared by every family's benchmark.

Times are medians over many repeats after warm-up, with 20th/80th percentiles (nearest rank):
CUDA events on the GPU, the standard library's `timeit` (one call per sample) on the CPU.

Peak extra memory is what one call allocates beyond what was live before it (so the inputs are not
counted): `max_memory_allocated` minus `memory_allocated` on CUDA. On the CPU a thread samples the
resident set size (/proc/self/statm) every 0.5 ms during one call and reports the peak minus the
size before it. RSS is the only measure that sees every allocator (torch's, MKL's, OpenMP's) and,
unlike `getrusage().ru_maxrss`, it goes down again, so one process can measure many calls. Limits:
spikes shorter than 0.5 ms can be missed. Memory the C allocator keeps after a free (blocks below
glibc's dynamic mmap threshold, up to 32 MiB) would not show when reused, so the heap's free pages
are handed back (`malloc_trim`) before the measured call.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import platform
import statistics
import subprocess
import threading
import time
import timeit
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

_POLL_S = 0.0005
_T = TypeVar("_T")


@dataclass
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_mib: float
    repeats: int


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# ---------------------------------------------------------------------------------------------
# Peak extra memory of one call

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`), so a call that reuses
    memory freed by an earlier one (blocks under glibc's dynamic mmap threshold, up to 32 MiB: e.g.
    tiles) touches fresh pages and shows in the RSS; without it such a call reads as ~0 MiB."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def cpu_peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak resident-set growth of this process during fn(), in MiB (NaN where /proc is missing).

    The CPU measure of `measure` (see the module docstring: RSS sampled every 0.5 ms from a
    thread, the C heap's free pages handed back first). Public so that tests bound memory with
    the very quantity the benchmarks report.
    """
    if not os.path.exists("/proc/self/statm"):  # not Linux: no cheap RSS reading
        return float("nan")
    _release_free_heap()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():  # torch ops release the GIL, so this runs while they do
            peak = max(peak, _rss_bytes())
            time.sleep(_POLL_S)

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


# ---------------------------------------------------------------------------------------------
# Timing

def _cuda_samples_ms(fn, setup, repeats: int) -> list[float]:
    # Back to back with one sync at the end (as triton's do_bench): the host runs ahead as in
    # training, so per-call launch overhead hides under the GPU work instead of being timed as
    # idle GPU before every sample. `setup` runs between the events, untimed on the GPU.
    # Inputs that fit in L2 (50 MiB on an H100) would need rotating among several input sets
    # to avoid timing warm-cache reruns; the benchmark's shapes are all larger (see l2_bytes).
    events = []
    for _ in range(repeats):
        setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def _cpu_samples_ms(fn, setup, repeats: int) -> list[float]:
    # The standard library's timeit: one call per sample, `setup` untimed right before it, garbage
    # collection off while timed. torch.utils.benchmark.Timer wraps this same timeit.Timer but does
    # not fit here: its timeit(1) adds two untimed calls before every sample (tripling the cost of
    # baselines that take seconds a call, and those calls accumulate into `.grad` without setup),
    # blocked_autorange runs setup once per block of calls, and it defaults to one thread.
    timer = timeit.Timer(stmt=fn, setup=setup, timer=time.perf_counter)
    return [timer.timeit(1) * 1e3 for _ in range(repeats)]


def measure(fn: Callable[[], object], *, device: str, warmup: int = 3, repeats: int = 20,
            setup: Callable[[], object] | None = None) -> Measurement:
    """Time `fn` and measure its peak extra memory; `setup` runs, untimed, before every call.

    warmup: untimed calls before the timed ones (at least one): the first of them is the one whose
    peak memory is measured, so the slow CPU baselines pay for no extra call.
    """
    setup = setup or (lambda: None)
    cuda = _is_cuda(device)
    setup()
    peak = _cuda_peak_extra_mib(fn) if cuda else cpu_peak_extra_mib(fn)
    for _ in range(warmup - 1):
        setup()
        fn()
    samples = sorted(_cuda_samples_ms(fn, setup, repeats) if cuda else _cpu_samples_ms(fn, setup, repeats))
    _PROGRESS.tick()
    return Measurement(statistics.median(samples), _percentile(samples, 0.2),
                       _percentile(samples, 0.8), peak, repeats)


def measure_copy_bandwidth(device: str) -> float:
    """The device's measured memory ceiling in GB/s: a large copy, bytes read + written, median.

    1 GiB on CUDA (far beyond L2), 256 MiB on the CPU (far beyond the last-level cache).
    """
    numel = (1 << 30) if _is_cuda(device) else (256 << 20)
    src = torch.empty(numel, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), device=device, warmup=2,
                repeats=10 if _is_cuda(device) else 5)
    return 2 * numel / (m.median_ms * 1e-3) / 1e9


def l2_bytes(device: str) -> int | None:
    """L2 size of the GPU (inputs smaller than about this are timed warm); None on the CPU."""
    if not _is_cuda(device):
        return None
    return getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", None)


# ---------------------------------------------------------------------------------------------
# Progress lines: a family's shapes take seconds to minutes each, and the table comes at the end

class _Progress:
    """The case being measured and when something was last printed (one per process)."""

    HEARTBEAT_S = 15.0  # a line at least this often while one case is measured

    def __init__(self) -> None:
        self.label: str | None = None
        self.start = self.last = 0.0
        self.timings = 0

    def begin(self, label: str, description: str) -> None:
        self.label, self.timings = label, 0
        self.start = self.last = time.perf_counter()
        print(f"  {label} {description}", flush=True)

    def tick(self) -> None:
        if self.label is None:
            return
        self.timings += 1
        now = time.perf_counter()
        if now - self.last >= self.HEARTBEAT_S:
            self.last = now
            print(f"  {self.label} ... {self.timings} timings done in {now - self.start:.0f} s", flush=True)

    def end(self) -> None:
        self.label = None


_PROGRESS = _Progress()


def cases(family: str, items: Iterable[_T], describe: Callable[[_T], str]) -> Iterator[_T]:
    """Yield a family's cases, printing a progress line as each starts (and every 15 s while it is
    measured), so a run that takes minutes is not silent until its table."""
    items = list(items)
    try:
        for i, item in enumerate(items, 1):
            _PROGRESS.begin(f"[{family} {i}/{len(items)}]", describe(item))
            yield item
    finally:
        _PROGRESS.end()


# ---------------------------------------------------------------------------------------------
# Environment recorded with every result

def device_name(device: str) -> str:
    if _is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    threads = f"{torch.get_num_threads()} threads"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({threads})"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({threads})"


def source_checkout() -> str | None:
    """Root of the source checkout this package runs from, else None (an installed copy).

    A checkout keeps this file in `benchmarks/` next to `python/` (an editable install maps the
    package there; realpath follows a development symlink).
    """
    here = os.path.dirname(os.path.realpath(__file__))
    root = os.path.dirname(here)
    if os.path.basename(here) == "benchmarks" and os.path.isdir(os.path.join(root, "python", "fusedtrain")):
        return root
    return None


def git_commit() -> str:
    """Short commit of the checkout, "-dirty" when tracked files differ from it, else "unknown".

    FUSEDTRAIN_COMMIT overrides it, for copies of the tree without their git history (a GPU
    machine that gets the working tree only). An installed copy reports "unknown" rather than the
    commit of whatever repository its site-packages happens to sit in.
    """
    if os.environ.get("FUSEDTRAIN_COMMIT"):
        return os.environ["FUSEDTRAIN_COMMIT"]
    root = source_checkout()
    if root is None:
        return "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        # Untracked files (new result files among them) do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment(device: str | None = None) -> dict:
    """What the numbers depend on (no host name): device, versions, commit, time."""
    import fusedtrain

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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


# ---------------------------------------------------------------------------------------------
# Shared by the families' modules

def kernel_built(op: str, device: str) -> bool:
    """Whether this build of fusedtrain has a compiled `device` kernel for `op` (else the op runs its
    reference, and the benchmark row says so)."""
    from fusedtrain._core import backend

    return ("CUDA" if _is_cuda(device) else "CPU") in backend.backends_for(op)


def optional_import(label: str, *modules: str):
    """The imported `modules` (a list), or why they are unavailable (a string, for a row's
    "skipped: ..." note): `label` not installed, or its import failed (a broken install is
    reported, not fatal)."""
    try:
        return [importlib.import_module(name) for name in modules]
    except ModuleNotFoundError:
        return f"{label} not installed"
    except Exception as exc:  # noqa: BLE001
        return f"{label} import failed ({type(exc).__name__}: {exc})"


def failure_note(exc: BaseException, width: int = 160) -> str:
    """A row's note for a measurement that raised (out of memory included): the rows go on."""
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:width]}"


def verdict(ok: bool) -> str:
    """An acceptance line's ending."""
    return "MET" if ok else "NOT MET"


def speedup_line(what: str, speedup: float, base: str, target: float) -> str:
    """An acceptance line for a speedup of ours over `base` against a target factor."""
    return (f"{what}: ours {speedup:.2f}x faster than {base} (target >= {target:g}x): "
            f"{verdict(speedup >= target)}")


def run_as_script(family: str) -> int:
    """A family's module run as a script: `python -m fusedtrain bench --family <family>` with
    the script's own options."""
    import sys

    from . import run

    return run.main(["--family", family, *sys.argv[1:]])
