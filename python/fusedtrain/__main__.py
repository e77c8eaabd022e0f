"""`python -m fusedtrain info | bench | selftest`."""
from __future__ import annotations

import argparse
import sys

import torch

from . import __version__, _backend



def _build_info() -> dict:
    try:
        from . import _build_info as info
    except ImportError:
        return {}
    return {k: getattr(info, k) for k in ("WITH_CUDA", "CUDA_ARCHS", "BUILT_WITH_TORCH", "BUILT_WITH_CUDA")}


def info() -> int:
    build = _build_info()
    print(f"fusedtrain {__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("GPU: none visible")
    if not _backend.has_extension():
        print(f"compiled kernels: none ({_backend.extension_error()}); every op runs its reference")
    else:
        cuda = (f"CUDA {build.get('BUILT_WITH_CUDA')} for archs {build.get('CUDA_ARCHS')}"
                if build.get("WITH_CUDA") else "no CUDA")
        print(f"compiled kernels: CPU, {cuda} (built against torch {build.get('BUILT_WITH_TORCH')})")
    print("ops:")
    for op in _backend.OPS:
        backends = _backend.backends_for(op)
        served = ", ".join(backends + ["reference (other devices)"]) if backends else "reference only"
        print(f"  {op:24s} {served}")
    return 0


def bench(argv: list[str]) -> int:
    try:
        from .benchmarks import run
    except ImportError as exc:
        print(f"the benchmarks are not installed with this copy of fusedtrain ({exc})", file=sys.stderr)
        return 1
    return run.main(argv) or 0


def selftest() -> int:
    """A fast end-to-end check on every available device: forward + backward against the reference."""
    from .reference.spherical import spherical_loss as reference
    from .spherical import spherical_loss

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failures = 0
    for device in devices:
        gen = torch.Generator(device="cpu").manual_seed(0)
        logits = torch.randn(64, 1000, generator=gen, dtype=torch.float32).to(device)
        target = torch.randint(0, 1000, (64,), generator=gen).to(device)
        for kind in ("z", "spherical", "taylor", "mse"):
            x = logits.clone().requires_grad_()
            spherical_loss(x, target, kind).backward()
            x64 = logits.double().requires_grad_()
            reference(x64, target, kind).backward()
            err = ((x.grad.double() - x64.grad).norm() / x64.grad.norm()).item()
            ok = err < 1e-5
            failures += not ok
            print(f"{device:5s} spherical_loss kind={kind:9s} grad rel. error {err:.2e} {'ok' if ok else 'FAIL'}")
        failures += _selftest_frugal(device)
    return 1 if failures else 0


def _selftest_frugal(device: str) -> int:
    """FRUGAL (fused step) against the reference optimizer in fp64: 30 steps, refreshes included."""
    from .optim import FRUGAL
    from .reference.frugal import FRUGALReference

    failures = 0
    for proj in ("columns", "rows", "block", "svd", "random"):
        gen = torch.Generator(device="cpu").manual_seed(0)
        ours = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in ((48, 64), (64,))]
        theirs = [p.clone() for p in ours]
        opts = [cls(ps, lr=1e-2, density=0.25, proj=proj, update_gap=10, seed=0)
                for cls, ps in ((FRUGAL, ours), (FRUGALReference, theirs))]
        for _ in range(30):
            grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device) for p in ours]
            for ps, opt in zip((ours, theirs), opts):
                for p, g in zip(ps, grads):
                    p.grad = g
                opt.step()
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, theirs))
        ok = err < 1e-10
        failures += not ok
        print(f"{device:5s} FRUGAL proj={proj:8s} rel. error vs reference {err:.2e} {'ok' if ok else 'FAIL'}")
    return failures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fusedtrain")
    parser.add_argument("command", choices=["info", "bench", "selftest"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return info() if args.command == "info" else selftest()


if __name__ == "__main__":
    sys.exit(main())
