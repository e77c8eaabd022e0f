"""Build of fusedtrain._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Environment:
  FUSEDTRAIN_FORCE_CPU=1    build the CPU kernels only, even when CUDA is available
  FUSEDTRAIN_FORCE_CUDA=1   build the CUDA kernels or fail (no silent CPU-only fallback)
  TORCH_CUDA_ARCH_LIST      GPU archs, e.g. "9.0" (default: the visible GPU's, else 8.0;9.0;10.0+PTX)
  MAX_JOBS                  parallel compile jobs (ninja)
  CUDA_HOME                 toolkit root; found from nvcc when unset (tools/build_env.py)
  FUSEDTRAIN_DEBUG=1        keep debug info (-g); the default release build has none
Sources are every csrc/**/*.cpp (and *.cu with CUDA): CMakeLists.txt globs the same folders.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "cp310"  # one abi3 wheel per torch version for CPython >= 3.10


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load_build_env():
    """tools/build_env.py: what this machine's toolkit and pip packages look like (shared with
    CMakeLists.txt). Loaded by path: the project root need not be on sys.path under pip."""
    spec = importlib.util.spec_from_file_location("fusedtrain_build_env",
                                                  os.path.join(ROOT, "tools", "build_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_env = _load_build_env()


# CUDA_HOME must be right before torch.utils.cpp_extension reads it at import.
_cuda_home = None if _env_flag("FUSEDTRAIN_FORCE_CPU") else build_env.find_cuda_home()
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
    os.environ["TORCH_CUDA_ARCH_LIST"] = build_env.cuda_arch_list()  # torch's build reads it here
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
        f.write("BUILT_BY = 'setuptools'\n")


def _extension():
    with_cuda = _want_cuda()
    archs = _arch_list(with_cuda)
    _write_build_info(with_cuda, archs)
    # torch adds the -std it needs (C++20 from 2.13). Python's own CFLAGS carry -g, which makes the
    # library several times larger: -g0 (after them) drops it unless FUSEDTRAIN_DEBUG=1.
    debug = _env_flag("FUSEDTRAIN_DEBUG")
    cxx = ["-O3", "-Wno-psabi", "-g" if debug else "-g0"]
    kwargs = dict(name="fusedtrain._C", sources=_sources(with_cuda), py_limited_api=True,
                  include_dirs=[os.path.join(ROOT, "csrc")])
    if not with_cuda:
        return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + (["-g"] if debug else [])
    kwargs["include_dirs"] += build_env.nvidia_pip_include_dirs()
    return CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


def _version() -> str:
    with open(os.path.join(ROOT, "python", "fusedtrain", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


setup(
    version=_version(),
    # The wheel runs only with the torch minor release it was compiled against (see build_env).
    install_requires=[build_env.torch_requirement(torch.__version__)],
    packages=find_packages("python") + ["fusedtrain.benchmarks"],
    package_dir={"fusedtrain": "python/fusedtrain", "fusedtrain.benchmarks": "benchmarks"},
    package_data={"fusedtrain": ["py.typed"]},  # PEP 561: the package ships its type hints
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API}},
)
