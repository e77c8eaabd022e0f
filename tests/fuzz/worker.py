"""Runs fuzz cases (tests/fuzz/cases.py) by name, one JSON line per case on stdout, flushed before
the next case starts, so the parent knows which case a crash or a hang belongs to.

    python tests/fuzz/worker.py NAME [NAME ...]
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import cases  # noqa: E402


def _finiteness(value) -> bool | None:
    """True when every floating tensor (or float) in `value` is finite, False when one is not, None
    when `value` holds no floating number."""
    found = []

    def visit(v):
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.device.type != "meta":
                found.append(bool(torch.isfinite(v).all()))
        elif isinstance(v, float):
            found.append(math.isfinite(v))
        elif isinstance(v, (tuple, list)):
            for item in v:
                visit(item)
    visit(value)
    return all(found) if found else None


def run(name: str) -> dict:
    case = cases.BY_NAME[name]
    record = {"name": name}
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = case.run()
    except Exception as exc:  # noqa: BLE001 - the outcome is what we report
        record.update(outcome="raised", exc_type=type(exc).__name__, message=str(exc)[:2000])
    else:
        record.update(outcome="returned", finite=_finiteness(value))
    return record


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(json.dumps(run(name)), flush=True)
