#!/usr/bin/env bash
# Draws docs/accuracy.png from the driver's JSON lines (scripts/run_accuracy.sh): perplexity
# relative to fp32 against the cache's bytes per token, one line per cache mode (its 8/4/3/2-bit
# runs), one panel per model. Needs gnuplot (Debian: gnuplot-nox) and awk.
#
#   scripts/plot_accuracy.sh [OUT.png] [STORIES.jsonl] [MHA8.jsonl]
set -euo pipefail
out=${1:-docs/accuracy.png}
stories=${2:-docs/data/stories260K.jsonl}
mha8=${3:-docs/data/mha8.jsonl}
command -v gnuplot >/dev/null || { echo "gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# One JSON object per line -> "mode bits bytes_per_token increase%", sorted by mode and bytes, where
# increase% = 100·(ppl/ppl_fp32 − 1), floored at 0.01 so that the log axis can show it.
to_table() {
  awk '
    function get(key,   m) {
      if (match($0, "\"" key "\": (\"[^\"]*\"|[-0-9.eE+]+)")) {
        m = substr($0, RSTART + length(key) + 4, RLENGTH - length(key) - 4); gsub(/"/, "", m); return m
      }
      return ""
    }
    get("command") == "ppl" { n++; mode[n] = get("mode"); bits[n] = get("bits"); bpt[n] = get("bytes_per_token"); ppl[n] = get("ppl")
                               if (mode[n] == "fp32") ref = ppl[n] }
    END {
      if (ref == "") { print "no fp32 run in the input" > "/dev/stderr"; exit 1 }
      for (i = 1; i <= n; i++) { inc = 100 * (ppl[i] / ref - 1); printf "%s %s %s %.6f\n", mode[i], bits[i], bpt[i], inc < 0.01 ? 0.01 : inc }
    }' "$1" | sort -k1,1 -k3,3g
}
to_table "$stories" >"$tmp/stories.dat"
to_table "$mha8" >"$tmp/mha8.dat"
# Axis ranges per panel: "xmin xmax ymax".
range() { awk 'NR == 1 || $3 < a { a = $3 } NR == 1 || $3 > b { b = $3 } NR == 1 || $4 > c { c = $4 } END { print a * 0.8, b * 1.25, c * 1.6 }' "$1"; }
read -r sx0 sx1 sy1 < <(range "$tmp/stories.dat")
read -r mx0 mx1 my1 < <(range "$tmp/mha8.dat")

gnuplot <<GP
set terminal pngcairo size 1400,560 font "DejaVu Sans,11"
set output "$out"
set multiplot layout 1,2 title "Perplexity vs cache memory per token (teacher forced, full held-out text; first layer at max(bits,4) bits)"
modes = "kivi xquant xquant-cl xquant-svd xquant-svd-cl fp16 fp32"
set logscale x 2
set logscale y
set grid xtics ytics mxtics mytics lc rgb "#dddddd"
set key top right opaque
set xlabel "cache bytes per token"
set ylabel "perplexity increase over fp32, % (at most 0.01% drawn at 0.01%)"
set ytics ("0.01%%" 0.01, "0.03%%" 0.03, "0.1%%" 0.1, "0.3%%" 0.3, "1%%" 1, "3%%" 3, "10%%" 10, "30%%" 30, "100%%" 100, "300%%" 300)
set style data linespoints
do for [f in "stories mha8"] {
  file = "$tmp/" . f . ".dat"
  set title (f eq "stories" ? "stories260K (GQA, 5 layers, d 64) on tinystories\\\\_dev.txt" : "mha8 (MHA, 8 layers, d 256) on mha8\\\\_valid.txt")
  if (f eq "stories") { set xrange [$sx0 : $sx1]; set yrange [0.008 : $sy1] } else { set xrange [$mx0 : $mx1]; set yrange [0.008 : $my1] }
  plot for [m in modes] file using (strcol(1) eq m ? \$3 : NaN):(strcol(1) eq m ? \$4 : NaN) \
       title m lw 2 pt 7 ps 1.1, \
       file using (strcol(1) eq "fp16" || strcol(1) eq "fp32" ? NaN : \$3):(strcol(1) eq "fp16" || strcol(1) eq "fp32" ? NaN : \$4):2 \
       with labels offset char 0.9, char 0.6 font ",8" notitle
}
unset multiplot
GP
echo "wrote $out" >&2
