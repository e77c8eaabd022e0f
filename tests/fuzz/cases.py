"""Fuzz cases: hostile and edge inputs for the public API and the raw `torch.ops.fusedtrain` ops,
grouped by the class of failure they guard against (one module per group, `cases_*.py`), each with
what it must do (framework.py). This module gathers them: `CASES` (run by test_fuzz.py) and
`BY_NAME`.
"""
from __future__ import annotations

import ctypes

import torch

import cases_api  # noqa: F401  (each module registers its cases on import)
import cases_devices  # noqa: F401
import cases_memory  # noqa: F401
import cases_values  # noqa: F401
from framework import BY_NAME, CASES, Returns, case

__all__ = ["CASES", "BY_NAME"]


# The runner's own check (test_fuzz.py): a crash must be reported, not end the run.
@case("_selfcheck_segfault", Returns())
def _segfault():
    return ctypes.string_at(0)


@case("_selfcheck_ok", Returns())
def _ok():
    return torch.ones(1)
