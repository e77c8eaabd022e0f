"""The fuzz suite: hostile and edge inputs for every public and raw op (tests/fuzz/cases.py), each
checked against what it must do — raise an error naming the argument, propagate NaN/inf, or return
the right value. Cases run in worker subprocesses, so a crash or a hang fails its case instead of
ending the test run: the parent restarts a worker after the case that killed it."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cases  # noqa: E402

CASE_TIMEOUT_S = 60  # a case that prints nothing for this long is a hang


def _pump(stream, sink) -> None:
    for line in stream:
        sink(line)


def _run_all(names: list[str]) -> dict[str, dict]:
    """Every case's record; a case whose worker died or hung gets outcome 'crashed' / 'hung'."""
    results: dict[str, dict] = {}
    pending = list(names)
    while pending:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), *pending],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        stderr: list[str] = []
        readers = [threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, stderr.append), daemon=True)]
        for reader in readers:
            reader.start()
        hung, last = False, time.monotonic()
        while pending:
            try:
                record = json.loads(lines.get(timeout=0.2))
            except queue.Empty:
                if proc.poll() is not None and lines.empty():
                    break  # the worker exited (a crash, if cases are left)
                if time.monotonic() - last > CASE_TIMEOUT_S:
                    hung = True
                    proc.kill()
                    break
                continue
            last = time.monotonic()
            results[record["name"]] = record
            pending.remove(record["name"])
        proc.wait()
        for reader in readers:
            reader.join(timeout=10)
        while not lines.empty():  # lines read just before the worker exited
            record = json.loads(lines.get())
            results[record["name"]] = record
            pending.remove(record["name"])
        if pending:  # the worker died (or hung) in the first pending case
            culprit = pending.pop(0)
            results[culprit] = {"name": culprit, "outcome": "hung" if hung else "crashed",
                                "returncode": proc.returncode, "message": "".join(stderr)[-2000:]}
    return results


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    return _run_all([case.name for case in cases.CASES])


@pytest.mark.parametrize("name", [case.name for case in cases.CASES])
def test_case(outcomes, name):
    case = cases.BY_NAME[name]
    record = outcomes[name]
    problem = case.expect.problem(record)
    assert problem is None, f"{name}: {problem}\n  record: {record}"


def test_harness_catches_crashes_and_hangs():
    """The runner itself: a segfaulting case is reported as a crash, and the cases after it still run."""
    records = _run_all(["_selfcheck_segfault", "_selfcheck_ok"])
    assert records["_selfcheck_segfault"]["outcome"] == "crashed", records
    assert records["_selfcheck_ok"]["outcome"] == "returned", records
