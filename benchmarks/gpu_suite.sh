#!/usr/bin/env bash
# The whole GPU check, for a GPU machine without network:
#   build in place -> pytest -m cuda -> compute-sanitizer (memcheck, racecheck) on a small CUDA
#   subset -> all benchmarks (with peers when their wheels are given) -> the end-to-end runs
#   (benchmarks/e2e_gpu.py) -> the CMake build and its selftest on the GPU -> one output folder.
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR [PEER_WHEEL_DIR]
# Environment:
#   STAGES          the stages to run, in this order whatever the order given (default: all of
#                   build info pytest_cuda memcheck racecheck bench tune e2e cmake). Without `build`,
#                   the in-place build of an earlier call is used (built first if there is none).
#   DEADLINE        seconds from the start after which no stage starts and a running one is stopped
#                   (rc=124), so a caller with a hard time limit still gets its summary (0: none).
#   PYTEST_WORKERS  pytest-xdist workers for pytest_cuda (default 1: no xdist).
# Everything is logged under OUT_DIR; summary.txt gets a line as each stage ends. Each stage runs
# even if an earlier one failed (a failed build stops it); the exit code says whether all passed.
# benchmarks/gpu_call.sh splits the suite into device calls that fit the device tool's limits.
set -u
OUT_DIR=${1:?usage: gpu_suite.sh OUT_DIR [PEER_WHEEL_DIR]}
PEERS=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ALL_STAGES="build info pytest_cuda memcheck racecheck bench tune e2e cmake"
STAGES=" ${STAGES:-$ALL_STAGES} "
DEADLINE=${DEADLINE:-0}
PYTEST_WORKERS=${PYTEST_WORKERS:-1}
: >"$OUT_DIR/summary.txt"

wanted() { [[ "$STAGES" == *" $1 "* ]]; }
stage() {  # stage NAME CMD...: run (within the deadline), log to OUT_DIR/NAME.log, note rc in summary.txt
  local name=$1; shift
  local t0=$SECONDS limit=()
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -le 5 ]; then
      echo "$name skipped: deadline" | tee -a "$OUT_DIR/summary.txt"; return 1
    fi
    limit=(timeout -k 10 "$left")
  fi
  echo "=== $name: $*"
  "${limit[@]}" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" >>"$OUT_DIR/summary.txt"
  tail -n 5 "$OUT_DIR/$name.log"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
  git status --short 2>/dev/null | head -20
  echo "stages:$STAGES"
} >"$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

if [ -n "$PEERS" ] && ls "$PEERS"/*.whl >/dev/null 2>&1; then
  SITE=/tmp/fusedtrain-peers
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$PEERS"/*.whl \
    >"$OUT_DIR/peers.log" 2>&1 && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# The build needs setuptools >= 77 (pyproject's SPDX license): a machine with an older one takes the
# wheel from PEER_WHEEL_DIR/build/ when given (gpu_call.sh make_peers puts one there).
if ! $PY -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null &&
   [ -n "$PEERS" ] && ls "$PEERS"/build/setuptools-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/fusedtrain-build-tools \
    "$PEERS"/build/setuptools-*.whl && export PYTHONPATH="/tmp/fusedtrain-build-tools${PYTHONPATH:+:$PYTHONPATH}"
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FUSEDTRAIN_FORCE_CUDA=1
built() { $PY -c "import fusedtrain._C, torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if wanted build || ! built; then
  stage build $PY -m pip install --no-build-isolation --no-deps --no-index -e . || {
    cat "$OUT_DIR/summary.txt"; exit 1; }
fi
wanted info && stage info $PY -m fusedtrain info
if wanted pytest_cuda; then
  xdist=()
  [ "$PYTEST_WORKERS" -gt 1 ] && $PY -c "import xdist" 2>/dev/null &&
    xdist=(-n "$PYTEST_WORKERS")
  stage pytest_cuda $PY -m pytest -m cuda -q -p no:cacheprovider "${xdist[@]}"
fi
wanted memcheck && stage memcheck compute-sanitizer --tool memcheck --leak-check no --error-exitcode 1 \
  $PY tests/sanitizer_cases.py
wanted racecheck && stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
  $PY tests/sanitizer_cases.py --small
wanted bench && stage bench $PY -m fusedtrain bench --device cuda --out "$OUT_DIR/results"
wanted tune && [ -f benchmarks/tune_spherical.py ] && stage tune $PY benchmarks/tune_spherical.py
wanted e2e && stage e2e $PY benchmarks/e2e_gpu.py --device cuda --out "$OUT_DIR/e2e"

cmake_build() {  # CMakeLists.txt's commands from nothing; last, as it replaces setup.py's in-place _C
  command -v cmake >/dev/null || { echo "cmake is not installed on this machine"; return 1; }
  rm -rf build/cmake python/fusedtrain/_C*.so python/fusedtrain/_build_info.py &&
    cmake -S . -B build/cmake -DPython_EXECUTABLE="$(command -v "$PY")" &&
    cmake --build build/cmake -j"$MAX_JOBS" &&
    $PY -m fusedtrain info && $PY -m fusedtrain selftest
}
export -f cmake_build
export PY MAX_JOBS
wanted cmake && stage cmake bash -c cmake_build

echo "=== summary"
cat "$OUT_DIR/summary.txt"
! grep -qv "rc=0" "$OUT_DIR/summary.txt"
