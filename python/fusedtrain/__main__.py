"""`python -m fusedtrain info | bench | selftest | sae train`."""
from __future__ import annotations

import argparse
import sys

import torch

from . import __version__
from ._core import backend


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
    if not backend.has_extension():
        print(f"compiled kernels: none ({backend.extension_error()}); every op runs its reference")
    else:
        cuda = (f"CUDA {build.get('BUILT_WITH_CUDA')} for archs {build.get('CUDA_ARCHS')}"
                if build.get("WITH_CUDA") else "no CUDA")
        print(f"compiled kernels: CPU, {cuda} (built against torch {build.get('BUILT_WITH_TORCH')})")
        capability = getattr(torch.ops.fusedtrain, "_cpu_capability", None)
        if capability is not None:
            print(f"CPU vector paths: {capability()} (FUSEDTRAIN_CPU_CAPABILITY=default: the generic ones)")
    print("ops:")
    for op in backend.public_ops():
        backends = backend.backends_for(op)
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
    """A fast end-to-end check of every op family on every available device (see selftest.py)."""
    from . import selftest as checks

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return 1 if checks.run(devices) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sae"]:  # `sae train ...` has its own parser and --help (integrations/sae_train.py)
        from .integrations import sae_train
        return sae_train.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fusedtrain")
    parser.add_argument("command", choices=["info", "bench", "selftest", "sae"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return info() if args.command == "info" else selftest()


if __name__ == "__main__":
    sys.exit(main())
