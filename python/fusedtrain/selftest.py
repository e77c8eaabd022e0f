"""Small end-to-end checks of every op family against its float64 reference.

One mechanism, three users: `python -m fusedtrain selftest` (every available device),
`tests/sanitizer_cases.py` (the CUDA kernels under compute-sanitizer) and the tests. A family writes
`check_<family>(device) -> list[Check]` in its own `selftest.py` and adds one entry to CHECKS; each check
runs the op forward and backward on a small fresh case and reports its relative error against the
reference next to its tolerance.
"""
from __future__ import annotations

from typing import Callable

from ._core import backend
from ._core.selftest import Check, rel_err  # noqa: F401  (re-exported for callers of this module)
from .mining.selftest import check_mining
from .optim.selftest import check_frugal
from .sae.selftest import check_sae
from .spherical.selftest import check_linear, check_spherical


# family -> check function; a new family is one entry here.
CHECKS: dict[str, Callable[[str], list[Check]]] = {"spherical": check_spherical, "linear": check_linear,
                                                    "sae": check_sae,
                                                    "frugal": check_frugal,
                                                    "mining": check_mining}


def reference_only(device: str) -> str | None:
    """Why the checks on `device` would compare the references with themselves (no compiled kernel
    runs there), or None when this build has kernels for that device."""
    if not backend.has_extension():
        return f"no compiled kernels ({backend.extension_error()})"
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device)
    if not any(dispatch_key in backend.backends_for(op) for op in backend.public_ops()):
        return f"this build of fusedtrain has no {device} kernels"
    return None


def run(devices: list[str], families: list[str] | None = None, *, verbose: bool = True) -> int:
    """Run the checks; returns the number of failures (an exception counts as one). Verbose: one
    line per check, a plain notice for a device where only references run, and a summary line."""
    failures = total = 0
    served = []
    for device in devices:
        why = reference_only(device)
        served.append(f"{device}: {'references only' if why else 'compiled kernels'}")
        if verbose and why:
            print(f"NOTE {device}: {why}: every op runs its pure-PyTorch reference, so these checks compare "
                  f"the reference with itself and test no kernel")
        for family in families or list(CHECKS):
            try:
                checks = CHECKS[family](device)
            except Exception as exc:  # report and go on: one broken family must not hide the others
                checks = [Check(f"{family}: {type(exc).__name__}: {exc}", float("nan"), 0.0)]
            for check in checks:
                total += 1
                failures += not check.ok
                if verbose:
                    print(f"{device:5s} {check.name:40s} rel. error {check.error:.2e} "
                          f"(tol {check.tolerance:.0e}) {'ok' if check.ok else 'FAIL'}")
    if verbose:
        verdict = f"{failures} of {total} checks FAILED" if failures else f"all {total} checks passed"
        print(f"selftest: {verdict} ({'; '.join(served)})")
    return failures
