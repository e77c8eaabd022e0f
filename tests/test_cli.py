"""`python -m fusedtrain`: each command's --help, the selftest's summary and exit status, the
benchmarks' progress lines and plots."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fusedtrain import __main__ as cli
from fusedtrain import selftest
from fusedtrain._core import backend
from fusedtrain._core.selftest import Check
from fusedtrain.benchmarks import bench_sae, harness, plot, run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedtrain", *args], capture_output=True, text=True)


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out


def test_bench_help_shows_the_bench_options():
    # The real command line (the help used to be the top-level one); test_build.py runs `selftest` so.
    out = _cli("bench", "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: python -m fusedtrain bench" in out.stdout
    for option in ("--family", "--device", "--quick", "--out"):
        assert option in out.stdout


def test_each_command_has_its_own_help_and_refuses_unknown_options(capsys):
    for command in ("info", "selftest"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: python -m fusedtrain {command}" in capsys.readouterr().out
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--no-such-option"])
        assert exit_.value.code == 2
        assert "--no-such-option" in capsys.readouterr().err


def test_selftest_summary_and_exit_status(monkeypatch, capsys):
    checks = {"good": lambda device: [Check("good op", 0.0, 1e-6)],
              "bad": lambda device: [Check("bad op", 1.0, 1e-6)],
              "broken": lambda device: 1 / 0}
    monkeypatch.setattr(selftest, "CHECKS", checks)
    assert cli.main(["selftest", "--device", "cpu", "--family", "good"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("selftest: all 1 checks passed")
    # A failing check and a family that raises both count, and the exit status says so.
    assert cli.main(["selftest", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "ZeroDivisionError" in out
    assert out.splitlines()[-1].startswith("selftest: 2 of 3 checks FAILED")


def test_selftest_says_when_only_references_run(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "CHECKS", {"good": lambda device: [Check("good op", 0.0, 1e-6)]})
    monkeypatch.setattr(backend, "_EXTENSION_ERROR", "fusedtrain._C is not built")
    assert selftest.run(["cpu"]) == 0
    out = capsys.readouterr().out
    assert "NOTE cpu: no compiled kernels" in out and "compare the reference with itself" in out
    assert out.splitlines()[-1].endswith("(cpu: references only)")


def test_bench_prints_a_line_per_case_and_a_heartbeat(monkeypatch, capsys):
    monkeypatch.setattr(harness._Progress, "HEARTBEAT_S", 0.0)  # every timing prints
    for shape in harness.cases("demo", [(1, 2), (3, 4)], lambda s: f"a={s[0]} b={s[1]}"):
        harness.measure(lambda: None, device="cpu", warmup=1, repeats=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  [demo 1/2] a=1 b=2"
    assert lines[1].startswith("  [demo 1/2] ... 1 timings done")
    assert lines[2] == "  [demo 2/2] a=3 b=4"
    harness.measure(lambda: None, device="cpu", warmup=1, repeats=2)  # outside cases(): silent
    assert capsys.readouterr().out == ""


def _sae_rows() -> list[dict]:
    base = dict(B=64, d=8, F=256, k=4, dtype="float32")
    return [dict(base, impl=impl, routing=routing, median_ms=ms, **{"pass": pass_})
            for impl, ms in (("ours", 1.0), ("reference", 3.0))
            for routing in ("topk", "mutual_choice") for pass_ in ("step", "route")]


def test_sae_family_draws_its_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "sae.png")
    assert bench_sae.plot(_sae_rows(), path, "sae") == path
    assert (tmp_path / "sae.png").stat().st_size > 0


def test_no_plot_is_not_blamed_on_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    meta = {"environment": {"device": "cpu", "device_name": "cpu", "torch": torch.__version__, "commit": "x"}}
    written = run.write_outputs("demo", _sae_rows(), meta, str(tmp_path), plotter=lambda *a: None)
    assert all(not p.endswith(".png") for p in written)
    out = capsys.readouterr().out
    assert "no timed row to plot" in out and "not installed" not in out
    assert plot.matplotlib_available()
