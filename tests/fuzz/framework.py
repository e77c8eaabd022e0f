"""The fuzz cases' vocabulary: what a case is, how it is registered, and what it must do.

A case is `case(name, expect)` over a function that builds its inputs, calls the op and returns the
output (the worker reports whether it raised, and whether every float in the output is finite).
A function may also assert the value itself (a wrong value then raises AssertionError, which no
expectation accepts). Expectations:
  Raises(TypeError|ValueError|..., "pattern")  a Python exception whose message matches (names the argument)
  NonFinite()                                   returns, and NaN/inf reached the output
  Returns()                                     returns (the function checked the value itself)
  Safe("pattern")                               returns, or raises a Python exception matching the pattern:
                                                for raw ops given impossible indices, where either a bound
                                                or an error is fine but a crash or garbage never is
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


@dataclass
class Raises:
    types: tuple
    pattern: str

    def problem(self, record: dict) -> str | None:
        if record["outcome"] != "raised":
            return f"expected {self.types} matching {self.pattern!r}, got {record['outcome']}"
        if record["exc_type"] not in {t.__name__ for t in self.types}:
            return f"expected {[t.__name__ for t in self.types]}, got {record['exc_type']}"
        if not re.search(self.pattern, record["message"]):
            return f"the message does not match {self.pattern!r}"
        return None


class NonFinite:
    def problem(self, record: dict) -> str | None:
        if record["outcome"] != "returned":
            return f"expected a NaN/inf result, got {record['outcome']}"
        if record["finite"] is not False:
            return "NaN/inf went in, a finite result came out"
        return None


class Returns:
    def problem(self, record: dict) -> str | None:
        return None if record["outcome"] == "returned" else f"expected a result, got {record['outcome']}"


@dataclass
class Safe:
    pattern: str

    def problem(self, record: dict) -> str | None:
        if record["outcome"] == "returned":
            return None
        if record["outcome"] == "raised" and record["exc_type"] != "AssertionError" and \
                re.search(self.pattern, record["message"]):
            return None
        return f"expected a bounded result or an error matching {self.pattern!r}, got {record['outcome']}"


@dataclass
class Case:
    name: str
    run: Callable[[], object]
    expect: object


CASES: list[Case] = []
BY_NAME: dict[str, Case] = {}


def case(name: str, expect):
    def register(fn):
        c = Case(name, fn, expect)
        assert name not in BY_NAME, name
        BY_NAME[name] = c
        if not name.startswith("_"):
            CASES.append(c)
        return fn
    return register
