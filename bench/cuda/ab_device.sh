#!/usr/bin/env bash
# A/B comparison of configurations in one bench_cuda binary, on the device machine, after
# bench/cuda/run_device.sh has built it (same BUILD directory). Machine instances differ by up to
# 15 % (bench/cuda/NOTES.md item 23), so a change is judged by rows timed in one session, with the
# configurations alternated round by round: drift then falls on every configuration alike.
#
#   bench/cuda/ab_device.sh <benchmark-filter> <rounds> <config> <config> [<config> ...]
#
# A config is a list of environment assignments for bench_cuda, or "" for none, e.g.
#   bench/cuda/ab_device.sh 'remat/L3.1-8B' 2 "" "XQ_REMAT_SKEW=0"
# Writes the rows to $OUT/ab.txt (or ./device-out) and prints, per row, the median of each
# configuration (mean over rounds) and its ratio to the first configuration, then the geometric
# mean of those ratios per shape (the benchmark name's second part) and the spread between rounds.
set -o pipefail
[ $# -ge 4 ] || { sed -n '2,12p' "$0"; exit 2; }
# shellcheck source=SCRIPTDIR/device_env.sh
. "$(dirname "$0")/device_env.sh"
filter=$1 rounds=$2
shift 2
: > "$OUT/ab.txt"
for ((r = 1; r <= rounds; ++r)); do
  k=0
  for cfg in "$@"; do
    echo "=== round $r config $k: ${cfg:-(none)}" >> "$OUT/ab.txt"
    # $cfg unquoted on purpose: its VAR=value words become env's arguments.
    # shellcheck disable=SC2086
    env $cfg timeout "${XQ_AB_TIMEOUT:-300}" "$B" --benchmark_filter="$filter" 2>&1 | grep -E "^[a-z_]+/" >> "$OUT/ab.txt" ||
      echo "round $r config $k: no rows (timed out or failed)"
    k=$((k + 1))
  done
done
python3 "$(dirname "$0")/ab_summary.py" "$OUT/ab.txt"
