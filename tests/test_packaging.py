"""What the package declares about itself: the license text, the typing marker, the torch it requires,
the release build without debug info, and the machine description CMake and setup.py share."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess

import pytest
import torch

import fusedtrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _build_env():
    spec = importlib.util.spec_from_file_location("build_env", os.path.join(ROOT, "tools", "build_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_license_file_is_the_declared_license():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_package_is_marked_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(fusedtrain.__file__), "py.typed"))
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert 'package_data={"fusedtrain": ["py.typed"]}' in f.read()  # so the wheel ships it


def test_torch_requirement_is_the_minor_release_built_against():
    build_env = _build_env()
    assert build_env.torch_requirement("2.14.1+cu130") == "torch>=2.14,<2.15"
    assert build_env.torch_requirement("2.11.0") == "torch>=2.11,<2.12"
    with pytest.raises(ValueError, match="torch version"):
        build_env.torch_requirement("nightly")
    # setup.py supplies the dependency (computed from the torch it builds against).
    assert "dependencies" in _pyproject()["project"]["dynamic"]
    assert "dependencies" not in _pyproject()["project"]


def test_bench_extra_brings_matplotlib():
    assert any(req.startswith("matplotlib") for req in _pyproject()["project"]["optional-dependencies"]["bench"])
    with open(os.path.join(ROOT, "README.md")) as f:
        assert 'pip install --no-build-isolation -e ".[bench]" && python -m fusedtrain bench' in f.read()


def test_cmake_settings_describe_this_torch():
    settings = _build_env().cmake_settings()
    assert settings["FT_TORCH_VERSION"] == torch.__version__
    assert settings["FT_TORCH_CUDA"] == (torch.version.cuda or "")
    assert os.path.isdir(settings["FT_TORCH_CMAKE_PREFIX"])
    if settings["FT_CUDA_HOME"]:  # the root nvcc reports, where its include/ holds cuda_runtime.h
        assert glob.glob(os.path.join(settings["FT_CUDA_HOME"], "**", "cuda_runtime.h"), recursive=True)
        assert all("=" in pair and os.path.isfile(pair.split("=", 1)[1])
                   for pair in settings["FT_NVIDIA_LIBRARIES"])


@pytest.mark.skipif(os.environ.get("FUSEDTRAIN_EXPECT_EXTENSION") != "1",
                    reason="set FUSEDTRAIN_EXPECT_EXTENSION=1 where this checkout's release build was made (CI)")
def test_release_build_has_no_debug_info():
    libraries = glob.glob(os.path.join(os.path.dirname(fusedtrain.__file__), "_C*.so"))
    if not libraries or not shutil.which("readelf"):
        pytest.skip("no built _C or no readelf")
    sections = subprocess.run(["readelf", "-S", "-W", libraries[0]], capture_output=True, text=True,
                              check=True).stdout
    assert ".debug_info" not in sections, "built with -g (FUSEDTRAIN_DEBUG=1 is the way to want that)"
