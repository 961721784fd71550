#!/usr/bin/env bash
# The accuracy tables of docs/ACCURACY.md: xquant-llm ppl for every cache mode at 8/4/3/2 bits
# (plus the fp32 and fp16 references) on one model's full held-out text, one JSON line per run.
#
#   scripts/run_accuracy.sh stories260K|mha8 OUT.jsonl [extra xquant-llm options...]
#
# Environment: XQUANT_LLM (the program, default build/examples/xquant-llm), SHARED (default
# ../shared), JOBS (runs at a time, default 2), MODES (default: all; "fp32" and "fp16" are the
# references, the others run at every bit width). Run from the repository root. Extra options go to
# every run (e.g. --base-layers 0); the default layout is the driver's: first layer at
# max(bits, 4) bits for every quantized mode.
set -euo pipefail
which=${1:?usage: $0 stories260K|mha8 OUT.jsonl [options]}
out=${2:?usage: $0 stories260K|mha8 OUT.jsonl [options]}
shift 2
bin=${XQUANT_LLM:-build/examples/xquant-llm}
shared=${SHARED:-../shared}
jobs=${JOBS:-2}
case $which in
  stories260K) args=(--model "$shared/models/stories260K/stories260K.bin" --tokenizer "$shared/models/stories260K/tok512.bin"
                     --text "$shared/data/tinystories_dev.txt" --split blank) ;;
  mha8) args=(--model "$shared/models/mha8/mha8.bin" --tokenizer "$shared/models/mha8/tok4096.bin"
              --text "$shared/data/mha8_valid.txt" --split blank) ;;
  *) echo "unknown model '$which' (stories260K or mha8)" >&2; exit 2 ;;
esac
modes=${MODES:-fp32 fp16 kivi xquant xquant-cl xquant-svd xquant-svd-cl}
runs=()
for mode in $modes; do
  case $mode in fp32 | fp16) runs+=("--cache $mode") ;; esac
done
for bits in 8 4 3 2; do
  for mode in $modes; do
    case $mode in fp32 | fp16) ;; *) runs+=("--cache $mode --bits $bits") ;; esac
  done
done
extra=("$@")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run_one() {
  local n=$1
  shift
  "$bin" ppl "${args[@]}" --json --quiet "$@" "${extra[@]}" >"$tmp/$n.json" || echo "run $n failed: $*" >&2
}
i=0
for r in "${runs[@]}"; do
  while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
  echo "[$(date +%T)] run $i of ${#runs[@]}: $r ${extra[*]}" >&2
  # shellcheck disable=SC2086  # $r is a list of options
  run_one "$(printf %03d $i)" $r &
  i=$((i + 1))
done
wait
cat "$tmp"/*.json >"$out"
echo "wrote $(wc -l <"$out") runs to $out" >&2
