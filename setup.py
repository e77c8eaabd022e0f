"""Build of fusedtrain._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Environment:
  FUSEDTRAIN_FORCE_CPU=1    build the CPU kernels only, even when CUDA is available
  FUSEDTRAIN_FORCE_CUDA=1   build the CUDA kernels or fail (no silent CPU-only fallback)
  TORCH_CUDA_ARCH_LIST      GPU archs, e.g. "9.0" (default: the visible GPU's, else 8.0;9.0;10.0+PTX)
  MAX_JOBS                  parallel compile jobs (ninja)
  CUDA_HOME                 toolkit root; found from nvcc when unset (see _find_cuda_home)
Sources are every csrc/**/*.cpp (and *.cu with CUDA): CMakeLists.txt globs the same folders.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "cp310"  # one abi3 wheel per torch version for CPython >= 3.10


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    """The toolkit root. torch guesses dirname(dirname(which nvcc)), wrong when nvcc on the PATH is a
    wrapper script or symlink outside the toolkit: ask nvcc itself (its dry run prints TOP=...)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True,
                                 timeout=60)
            match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if match:
                return os.path.realpath(match.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
        candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(candidate, "include", "cuda_runtime.h")):
            return candidate
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _nvidia_pip_include_dirs() -> list[str]:
    """Headers of the CUDA libraries (cuBLAS, cuSPARSE, ...) that torch includes come from the
    `nvidia-*` pip packages a CUDA torch installs, not from a bare nvcc toolkit."""
    dirs = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


# CUDA_HOME must be right before torch.utils.cpp_extension reads it at import.
_cuda_home = None if _env_flag("FUSEDTRAIN_FORCE_CPU") else _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    if _env_flag("FUSEDTRAIN_FORCE_CPU"):
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if not _cuda_home or not os.path.exists(os.path.join(_cuda_home, "bin", "nvcc")):
        reasons.append("nvcc / the CUDA toolkit was not found (set CUDA_HOME)")
    if reasons and _env_flag("FUSEDTRAIN_FORCE_CUDA"):
        sys.exit("FUSEDTRAIN_FORCE_CUDA=1 but " + "; ".join(reasons))
    if reasons:
        print("fusedtrain: building CPU kernels only: " + "; ".join(reasons))
    return not reasons


def _arch_list(with_cuda: bool) -> str:
    if not with_cuda:
        return ""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0;10.0+PTX"
    return os.environ["TORCH_CUDA_ARCH_LIST"]


def _sources(with_cuda: bool) -> list[str]:
    patterns = ["csrc/*.cpp", "csrc/*/*.cpp"] + (["csrc/*/*.cu"] if with_cuda else [])
    return sorted(f for p in patterns for f in glob.glob(p, root_dir=ROOT))


def _write_build_info(with_cuda: bool, archs: str) -> None:
    path = os.path.join(ROOT, "python", "fusedtrain", "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time."""\n')
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"BUILT_WITH_TORCH = {torch.__version__!r}\n")
        f.write(f"BUILT_WITH_CUDA = {torch.version.cuda if with_cuda else None!r}\n")


def _extension():
    with_cuda = _want_cuda()
    archs = _arch_list(with_cuda)
    _write_build_info(with_cuda, archs)
    cxx = ["-O3", "-Wno-psabi"]  # torch adds the -std it needs (C++20 from 2.13)
    kwargs = dict(name="fusedtrain._C", sources=_sources(with_cuda), py_limited_api=True,
                  include_dirs=[os.path.join(ROOT, "csrc")])
    if not with_cuda:
        return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    kwargs["include_dirs"] += _nvidia_pip_include_dirs()
    return CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


def _version() -> str:
    with open(os.path.join(ROOT, "python", "fusedtrain", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


setup(
    version=_version(),
    packages=find_packages("python") + ["fusedtrain.benchmarks"],
    package_dir={"fusedtrain": "python/fusedtrain", "fusedtrain.benchmarks": "benchmarks"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API}},
)
