"""`python -m fusedtrain COMMAND [options]`: info, selftest, bench, sae train (`COMMAND --help` for its
options)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from . import __version__
from ._core import backend


def _build_info() -> dict:
    try:
        from . import _build_info as info
    except ImportError:
        return {}
    keys = ("WITH_CUDA", "CUDA_ARCHS", "BUILT_WITH_TORCH", "BUILT_WITH_CUDA", "BUILT_BY")
    return {k: getattr(info, k, None) for k in keys}


def info() -> int:
    """Print the versions, the GPU, what was built, and which backend serves each op."""
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
        by = f" by {build['BUILT_BY']}" if build.get("BUILT_BY") else ""
        print(f"compiled kernels: CPU, {cuda} (built{by} against torch {build.get('BUILT_WITH_TORCH')})")
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
    """Hands every option to the benchmarks' own parser (benchmarks/run.py), `--help` included."""
    try:
        from .benchmarks import run
    except ImportError as exc:
        print(f"the benchmarks are not installed with this copy of fusedtrain ({exc})", file=sys.stderr)
        return 1
    return run.main(argv, prog="python -m fusedtrain bench") or 0


def selftest(argv: list[str]) -> int:
    """A fast end-to-end check of every op family on every available device (see selftest.py);
    exit status 1 when any check fails."""
    from . import selftest as checks

    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser = _command_parser("selftest", selftest.__doc__)
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="check only this device (repeatable); default: " + ", ".join(available))
    parser.add_argument("--family", action="append", choices=list(checks.CHECKS),
                        help="check only this family (repeatable); default: all")
    args = parser.parse_args(argv)
    if "cuda" in (args.device or []) and "cuda" not in available:
        parser.error("--device cuda but no CUDA GPU is visible")
    return 1 if checks.run(args.device or available, args.family) else 0


def _info(argv: list[str]) -> int:
    _command_parser("info", info.__doc__).parse_args(argv)
    return info()


def _sae(argv: list[str]) -> int:
    # `sae train ...` has its own parser and --help; transformers is imported only when it runs.
    from .integrations import sae_train
    return sae_train.main(argv)


def _command_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m fusedtrain {name}", description=(doc or "").strip())


# command -> (one-line help, handler(argv) -> exit status). Each handler parses its own options, so
# `python -m fusedtrain COMMAND --help` shows that command's. A new command is one entry here.
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "info": ("what was built, and which backend serves each op", _info),
    "selftest": ("check every op against its float64 reference on each device", selftest),
    "bench": ("benchmark the ops against baselines and peers (see `bench --help`)", bench),
    "sae": ("`sae train`: train an SAE on a Hugging Face model's activations (see `sae train --help`)", _sae),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fusedtrain",
                                     description="fusedtrain: fused training ops for PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, _) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)  # the handler parses the options
    args, rest = parser.parse_known_args(argv)
    return COMMANDS[args.command][1](rest)


if __name__ == "__main__":
    sys.exit(main())
