#!/usr/bin/env bash
# One call of the GPU validation through the device tool (its limits: 10 minutes a command, 8 files
# back from $OUT, about 15 minutes of device time a session, a warm machine kept 30 s after a call).
# The suite (benchmarks/gpu_suite.sh) is split into parts that each fit one call, in the order of
# their value; run them back to back so the machine (and part 1's build) stays warm:
#   part 1: build, info, pytest -m cuda (correctness of every family on the GPU)
#   part 2: bench with the peers, e2e (acceptance figures, end-to-end times)
#   part 3: memcheck, racecheck, tune, the CMake build
# Usage, as the device command (carry [".peers"], made here by `make_peers` below):
#   bash benchmarks/gpu_call.sh 1
# Before the first call, on the machine with ../shared:  bash benchmarks/gpu_call.sh make_peers
# Each part writes $OUT/gpu_part<N>.tgz (every log and result file) and $OUT/summary_part<N>.txt;
# unpack the archive into benchmarks/results/<device>_<commit>/ and commit it.
set -u
PART=${1:?usage: gpu_call.sh 1|2|3|make_peers}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ "$PART" = make_peers ]; then  # the peers' wheels travel in .peers/ (git-ignored): ../shared does not
  mkdir -p .peers/build && cp ../shared/wheels/*.whl .peers/ &&
    # a setuptools new enough for the build, used there only if the machine's is older (gpu_suite.sh)
    python3 -m pip download -q --no-deps --only-binary=:all: -d .peers/build "setuptools>=77,<81" &&
    ls -R .peers
  exit
fi
case $PART in
  1) STAGES="build info pytest_cuda" ;;
  2) STAGES="bench e2e" ;;
  3) STAGES="memcheck racecheck tune cmake" ;;
  *) echo "unknown part $PART (1, 2, 3 or make_peers)"; exit 2 ;;
esac
DEST=${OUT:-/tmp/gpu_out}
WORK=/tmp/gpu_suite_part$PART
mkdir -p "$DEST"
rm -rf "$WORK"
# 570 s of stages leaves the archive time inside the device tool's 600 s command limit.
STAGES=$STAGES DEADLINE=${DEADLINE:-570} PYTEST_WORKERS=${PYTEST_WORKERS:-4} \
  bash benchmarks/gpu_suite.sh "$WORK" .peers
rc=$?
tar czf "$DEST/gpu_part$PART.tgz" -C "$WORK" .
cp "$WORK/summary.txt" "$DEST/summary_part$PART.txt"
exit $rc
