"""The package imports, says what was built, and (in CI) really has its compiled kernels."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import fusedtrain
from fusedtrain._core import backend as _backend

from utils import kernels_built


def test_public_api_is_importable():
    assert isinstance(fusedtrain.__version__, str) and fusedtrain.__version__
    assert callable(fusedtrain.spherical_loss)
    assert issubclass(fusedtrain.nn.SphericalLoss, torch.nn.Module)
    assert callable(fusedtrain.reference.spherical.spherical_loss)
    assert "spherical_loss" in _backend.public_ops()


def test_cli_info_lists_every_op():
    out = subprocess.run([sys.executable, "-m", "fusedtrain", "info"], capture_output=True, text=True,
                         check=True).stdout  # check=True: exit status 0
    assert fusedtrain.__version__ in out and torch.__version__ in out
    for op in _backend.public_ops():
        assert op in out
    # It reports the build this process sees.
    assert ("compiled kernels: none" in out) == (not _backend.has_extension()), out


def test_cli_selftest_passes():
    out = subprocess.run([sys.executable, "-m", "fusedtrain", "selftest"], check=True, capture_output=True,
                         text=True).stdout  # check=True: exit status 0 (1 when a check fails)
    assert out.splitlines()[-1].startswith("selftest: all "), out[-2000:]


@pytest.mark.skipif(os.environ.get("FUSEDTRAIN_EXPECT_EXTENSION") != "1",
                    reason="set FUSEDTRAIN_EXPECT_EXTENSION=1 where the build must have happened (CI)")
def test_extension_was_built():
    assert _backend.has_extension(), _backend.extension_error()
    for op in _backend.public_ops():
        assert "CPU" in _backend.backends_for(op)
        if torch.version.cuda is not None and os.environ.get("FUSEDTRAIN_EXPECT_CUDA") == "1":
            assert "CUDA" in _backend.backends_for(op), "CUDA kernels missing from a CUDA build"


def test_built_kernel_is_used_without_warning():
    if not kernels_built("cpu", "spherical_loss"):
        pytest.skip("no compiled CPU kernel in this build")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_kernel("spherical_loss", torch.device("cpu"))


def test_missing_kernel_warns_once_and_falls_back(monkeypatch):
    # A device without a kernel runs the reference after one RuntimeWarning.
    monkeypatch.setitem(_backend._BACKENDS, "spherical_loss", [])
    monkeypatch.setattr(_backend, "_warned", set())
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.warns(RuntimeWarning, match="reference"):
        loss = fusedtrain.spherical_loss(logits, target)
    torch.testing.assert_close(loss, fusedtrain.reference.spherical.spherical_loss(logits, target))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedtrain.spherical_loss(logits, target)  # no second warning
        assert not _backend.use_kernel("spherical_loss", torch.device("cpu"))


def test_device_without_kernels_warns_once_for_all_ops(monkeypatch):
    # A build with no kernel at all for a device (a CPU-only build given CUDA tensors): one warning
    # for that device, whichever ops follow (use_kernel reads only the device's type).
    if not _backend.has_extension():
        pytest.skip("no compiled extension")
    monkeypatch.setattr(_backend, "_BACKENDS", {op: ["CPU"] for op in _backend._BACKENDS})
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no cuda kernels"):
        assert not _backend.use_kernel("spherical_loss", torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for op in _backend.public_ops():
            assert not _backend.use_kernel(op, torch.device("cuda"))


def test_import_without_extension_uses_references(tmp_path):
    # A source tree that was never built: copy the Python package without _C and import it.
    pkg = os.path.dirname(fusedtrain.__file__)
    # symlinks=True: links inside the package (e.g. to the repository's benchmarks) stay links.
    shutil.copytree(pkg, tmp_path / "fusedtrain", symlinks=True,
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    # An editable install's import hook would still find the built _C: drop such hooks first.
    code = ("import sys\n"
            "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import warnings, torch, fusedtrain\n"
            "assert fusedtrain.__file__.startswith(sys.argv[1]), fusedtrain.__file__\n"
            "assert not fusedtrain._core.backend.has_extension()\n"
            "assert fusedtrain._core.backend.backends_for('spherical_loss') == []\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    fusedtrain.spherical_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]))\n"
            "    fusedtrain.spherical_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]))\n"
            "    fusedtrain.sae.topk_route(torch.rand(4, 8), 2)\n"
            "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
            "# One warning for the process, not one per op.\n"
            "assert len(msgs) == 1 and 'not built' in msgs[0], msgs\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, cwd=tmp_path)


def test_cpu_capability_switch():
    """FUSEDTRAIN_CPU_CAPABILITY=default (or ATEN_CPU_CAPABILITY=default) makes every CPU kernel take its
    generic path, so the tests can run the code non-AVX2 CPUs run; `info` says which paths are used."""
    if not hasattr(torch.ops.fusedtrain, "_cpu_capability"):
        pytest.skip("this build has no _cpu_capability op")
    code = ("import fusedtrain, torch; print(torch.ops.fusedtrain._cpu_capability(), "
            "torch.backends.cpu.get_cpu_capability())")
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDTRAIN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    run = lambda **extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, check=True,  # noqa: E731
                                         capture_output=True, text=True).stdout.split()
    assert run(FUSEDTRAIN_CPU_CAPABILITY="default")[0] == "default"
    assert run(ATEN_CPU_CAPABILITY="default")[0] == "default"
    native, aten = run()
    assert native == ("avx2" if aten in ("AVX2", "AVX512") else "default"), (native, aten)
    assert run(ATEN_CPU_CAPABILITY="default", FUSEDTRAIN_CPU_CAPABILITY="avx2")[0] == native
