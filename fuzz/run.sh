#!/usr/bin/env bash
# Runs every fuzz target for a fixed number of inputs over its seed corpus; any crash, hang,
# sanitizer report or oracle failure exits non-zero. New inputs go to a scratch directory, never
# into fuzz/corpus/. Usage: fuzz/run.sh <build dir> [runs per target] [max seconds per target]
# FUZZ_SEED (default 1) fixes libFuzzer's seed, so that a CI run is reproducible: the same commit
# explores the same inputs, and a failure replays. FUZZ_SEED=0 draws a fresh seed (exploration).
set -euo pipefail
build=${1:?usage: fuzz/run.sh <build dir> [runs] [seconds]}
runs=${2:-20000}
seconds=${3:-240}
seed=${FUZZ_SEED:-1}
here="$(cd "$(dirname "$0")" && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
for target in quantize snapshot checkpoint tokenizer; do
  exe="$build/fuzz/fuzz_$target"
  if [ ! -x "$exe" ]; then
    echo "fuzz_$target: not built, skipped"
    continue
  fi
  mkdir -p "$scratch/$target"
  start=$(date +%s)
  # -timeout: one input taking longer than 10 s is a hang; -rss_limit_mb: one using more is a leak
  # or a runaway allocation. Both fail the run.
  "$exe" -runs="$runs" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -seed="$seed" -print_final_stats=1 \
    -artifact_prefix="$scratch/" "$scratch/$target" "$here/corpus/$target" >"$scratch/$target.log" 2>&1 || {
    tail -n 60 "$scratch/$target.log"
    echo "fuzz_$target: FAILED"
    for a in "$scratch"/crash-* "$scratch"/timeout-* "$scratch"/oom-* "$scratch"/leak-*; do
      [ -e "$a" ] && { echo "reproducer ($a):"; od -An -tx1 "$a" | head -n 40; }
    done
    exit 1
  }
  echo "fuzz_$target: $(grep -E '^(Done|stat::number_of_executed_units)' "$scratch/$target.log" | tr '\n' ' ')($(( $(date +%s) - start )) s)"
done
