#!/usr/bin/env bash
# Markdown table of the driver's ppl JSON lines (scripts/run_accuracy.sh), as in docs/ACCURACY.md:
#   scripts/accuracy_table.sh docs/data/mha8.jsonl
set -euo pipefail
awk '
  function get(key,   m) {
    if (match($0, "\"" key "\": (\"[^\"]*\"|[-0-9.eE+]+)")) {
      m = substr($0, RSTART + length(key) + 4, RLENGTH - length(key) - 4); gsub(/"/, "", m); return m
    }
    return ""
  }
  get("command") == "ppl" {
    n++; mode[n] = get("mode"); bits[n] = get("bits"); bpt[n] = get("bytes_per_token"); r[n] = get("ratio_vs_fp16")
    sb[n] = get("stored_bytes_per_token"); sr[n] = get("stored_ratio_vs_fp16"); ppl[n] = get("ppl"); tok[n] = get("tokens")
    base[n] = (get("base_layers") + 0 > 0) ? get("base_layers") "@" get("base_bits") : "-"
    if (mode[n] == "fp32") ref = ppl[n]
  }
  END {
    order["fp32"] = 0; order["fp16"] = 1; order["kivi"] = 2; order["xquant"] = 3; order["xquant-cl"] = 4
    order["xquant-svd"] = 5; order["xquant-svd-cl"] = 6
    print "| mode | bits | base | bytes/token | vs FP16 KV | stored bytes/token | stored vs FP16 KV | ppl | vs fp32 |"
    print "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    # rows: references first, then by bits (descending) and mode
    for (pass = 0; pass < 5; pass++) {
      want = pass == 0 ? 99 : (pass == 1 ? 8 : (pass == 2 ? 4 : (pass == 3 ? 3 : 2)))
      for (o = 0; o < 7; o++)
        for (i = 1; i <= n; i++) {
          if (order[mode[i]] != o) continue
          isref = mode[i] == "fp32" || mode[i] == "fp16"
          if ((pass == 0) != isref) continue
          if (!isref && bits[i] != want) continue
          printf "| %s | %s | %s | %.1f | %.3f | %.1f | %.3f | %.4f | %+.2f%% |\n", mode[i], bits[i], base[i], bpt[i], r[i], sb[i], sr[i], ppl[i], 100 * (ppl[i] / ref - 1)
        }
    }
    printf "\n%d scored tokens per run.\n", tok[1]
  }' "$1"
