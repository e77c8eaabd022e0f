#!/usr/bin/env bash
# The whole GPU check in one call, for a GPU machine without network (about 10 minutes):
#   build in place -> pytest -m cuda -> compute-sanitizer (memcheck, racecheck) on a small CUDA
#   subset -> all benchmarks (with peers when their wheels are given) -> the CMake build and its
#   selftest on the GPU -> one output folder.
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR [PEER_WHEEL_DIR]
# Everything is logged under OUT_DIR; a summary is printed last. Each stage runs even if an
# earlier one failed (a failed build stops it), and the exit code says whether all passed.
set -u
OUT_DIR=${1:?usage: gpu_suite.sh OUT_DIR [PEER_WHEEL_DIR]}
PEERS=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=()
stage() {  # stage NAME CMD...: run, log to OUT_DIR/NAME.log, remember pass/fail
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  status+=("$name rc=$rc $((SECONDS - t0))s")
  tail -n 5 "$OUT_DIR/$name.log"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
  git status --short 2>/dev/null | head -20
} >"$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

if [ -n "$PEERS" ] && ls "$PEERS"/*.whl >/dev/null 2>&1; then
  SITE=/tmp/fusedtrain-peers
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$PEERS"/*.whl \
    >"$OUT_DIR/peers.log" 2>&1 && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FUSEDTRAIN_FORCE_CUDA=1
stage build $PY -m pip install --no-build-isolation --no-deps --no-index -e . || {
  printf '%s\n' "${status[@]}"; exit 1; }
stage info $PY -m fusedtrain info
stage pytest_cuda $PY -m pytest -m cuda -q -p no:cacheprovider
stage memcheck compute-sanitizer --tool memcheck --leak-check no --error-exitcode 1 $PY tests/sanitizer_cases.py
stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY tests/sanitizer_cases.py --small
stage bench $PY -m fusedtrain bench --device cuda --out "$OUT_DIR/results"
[ -f benchmarks/tune_spherical.py ] && stage tune $PY benchmarks/tune_spherical.py

cmake_build() {  # CMakeLists.txt's commands from nothing; last, as it replaces setup.py's in-place _C
  command -v cmake >/dev/null || { echo "cmake is not installed on this machine"; return 1; }
  rm -rf build/cmake python/fusedtrain/_C*.so python/fusedtrain/_build_info.py &&
    cmake -S . -B build/cmake -DPython_EXECUTABLE="$(command -v "$PY")" &&
    cmake --build build/cmake -j"$MAX_JOBS" &&
    $PY -m fusedtrain info && $PY -m fusedtrain selftest
}
stage cmake cmake_build

echo "=== summary"
printf '%s\n' "${status[@]}" | tee "$OUT_DIR/summary.txt"
! grep -qv "rc=0" "$OUT_DIR/summary.txt"
