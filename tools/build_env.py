"""Where the pieces of a torch-extension build are on this machine: one answer for setup.py (which
imports this file) and CMakeLists.txt (which runs `python tools/build_env.py --cmake`).

Two quirks it knows, so that a bare `nvcc` suffices for either build:
- the toolkit root: torch (and CMake's FindCUDA) guess dirname(dirname(which nvcc)), wrong when the
  nvcc on the PATH is a wrapper script or a symlink outside the toolkit; nvcc's own dry run says
  where it lives (TOP=...).
- the headers of the CUDA libraries torch's headers include (cuBLAS, cuSPARSE, ...) come with the
  `nvidia-*` pip packages a CUDA torch installs, not with a bare nvcc toolkit.

Standard library only at import (setup.py reads CUDA_HOME from here before importing torch).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

# GPU archs when neither TORCH_CUDA_ARCH_LIST is set nor a GPU is visible: A100, H100, B200 (+PTX).
DEFAULT_ARCHS = "8.0;9.0;10.0+PTX"


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME / CUDA_PATH, else asked of the nvcc on the PATH, else the
    usual /usr/local/cuda*; None when there is no toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
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


def nvidia_pip_include_dirs() -> list[str]:
    """Include folders of the `nvidia-*` pip packages (cuBLAS, cuSPARSE, ... headers)."""
    dirs = []
    for site in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


# CUDA libraries torch's CMake config may link, as FindCUDAToolkit names them.
_CUDA_LIBRARIES = ("cudart", "nvrtc", "cublas", "cublasLt", "cusparse", "curand", "cufft")


def nvidia_pip_libraries() -> list[str]:
    """`name=path` of the CUDA libraries the `nvidia-*` pip packages hold (versioned file names such
    as libnvrtc.so.13, which CMake's find_library does not look for)."""
    found = {}
    for site in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        for name in _CUDA_LIBRARIES:
            for path in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", f"lib{name}.so*"))):
                if re.fullmatch(rf"lib{name}\.so(\.\d+)*", os.path.basename(path)):
                    found.setdefault(name, path)
    return [f"{name}={path}" for name, path in found.items()]


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else the visible GPU's arch, else DEFAULT_ARCHS (imports torch)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return DEFAULT_ARCHS


def torch_requirement(version: str) -> str:
    """The torch a build against torch `version` runs with: the same minor release.

    The extension links torch's C++ API (at::Tensor, the dispatcher, ATen ops), whose ABI changes
    between minor releases, so a `_C` built against 2.14 must not be installed next to 2.15."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"cannot read a torch version from {version!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def _cmake_value(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ";".join(value)
    return '"' + str(value).replace("\\", "/").replace('"', '\\"') + '"'


def cmake_settings() -> dict[str, object]:
    """The FT_* variables CMakeLists.txt reads (imports torch)."""
    import torch
    import torch.utils

    cuda_home = find_cuda_home() if torch.version.cuda else None
    return {
        "FT_TORCH_VERSION": torch.__version__,
        "FT_TORCH_CUDA": torch.version.cuda or "",
        "FT_TORCH_DIR": os.path.dirname(torch.__file__),
        "FT_TORCH_CMAKE_PREFIX": torch.utils.cmake_prefix_path,
        "FT_TORCH_CXX11_ABI": int(torch.compiled_with_cxx11_abi()),
        "FT_CUDA_HOME": cuda_home or "",
        "FT_CUDA_ARCHS": cuda_arch_list() if cuda_home else "",
        "FT_NVIDIA_INCLUDE_DIRS": nvidia_pip_include_dirs() if cuda_home else [],
        "FT_NVIDIA_LIBRARIES": nvidia_pip_libraries() if cuda_home else [],
    }


def main(argv: list[str]) -> int:
    if argv != ["--cmake"]:
        print("usage: python tools/build_env.py --cmake   (CMake set() lines for CMakeLists.txt)",
              file=sys.stderr)
        return 2
    for name, value in cmake_settings().items():
        print(f"set({name} {_cmake_value(value)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
