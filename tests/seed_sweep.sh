#!/usr/bin/env bash
# Runs test binaries over a range of seeds (XQUANT_TEST_SEED) and prints each failing seed with its
# first failed check. Every test draws fresh random inputs on each run, so a tolerance that holds
# for most draws but not all fails CI now and then; a sweep finds such tests before CI does.
#
#   tests/seed_sweep.sh FIRST LAST BINARY...
#   e.g. tests/seed_sweep.sh 1 1000 build/tests/test_core_remat build/tests/test_codec_latent
#
# Reproduce a reported seed: XQUANT_TEST_SEED=<seed> build/tests/<test>. Exit status 1 if any failed.
set -u
[ $# -ge 3 ] || { sed -n '2,9p' "$0"; exit 2; }
first=$1 last=$2
shift 2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
for bin in "$@"; do
  [ -x "$bin" ] || { echo "not an executable: $bin"; exit 2; }
  fails=0
  for seed in $(seq "$first" "$last"); do
    if ! XQUANT_TEST_SEED=$seed "$bin" > "$log" 2>&1; then
      fails=$((fails + 1))
      echo "FAIL $(basename "$bin") seed $seed"
      grep -m 1 -A 2 -E "ERROR|FATAL|Sanitizer|terminate" "$log" | sed 's/^/    /'
    fi
  done
  echo "$(basename "$bin"): $fails of $((last - first + 1)) seeds failed"
  [ "$fails" -eq 0 ] || failed=1
done
exit "$failed"
