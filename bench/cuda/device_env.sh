# shellcheck shell=bash
# Sourced by profile_device.sh and ab_device.sh: where the device scripts write ($OUT, default
# ./device-out), the build run_device.sh made ($BUILD, default build-device) and its bench binary
# ($B), and the library path for dependencies from a prefix ($XQ_DEPS).
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
BUILD=${BUILD:-build-device}
B="$BUILD/bench/cuda/bench_cuda"
[ -x "$B" ] || { echo "no $B: run bench/cuda/run_device.sh first (same BUILD)"; exit 1; }
[ -n "$XQ_DEPS" ] && export LD_LIBRARY_PATH="$XQ_DEPS/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH"
