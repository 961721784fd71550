#!/usr/bin/env bash
# Profiles the CUDA backend's kernels with Nsight Compute on the device machine, after
# bench/cuda/run_device.sh has built bench_cuda (same BUILD directory). Writes to $OUT (or
# ./device-out) and prints a short summary.
#
#   bench/cuda/profile_device.sh kernel  <kernel-regex> <benchmark-filter>
#       one launch of the kernel: speed-of-light, occupancy, scheduler statistics and the stall
#       reasons per issued instruction (e.g. XQ_BENCH_CALLS=fused4 ... kernel remat_wgmma
#       'remat/L2-7B/B1/L32k', XQ_BENCH_CALLS=append4 ... kernel quantize_tokens 'append/w4096/B8/L32k').
#   bench/cuda/profile_device.sh source <kernel-regex> <benchmark-filter>
#       one launch with the full set, then the warp-state samples per SASS instruction
#       ($OUT/ncu_source.csv) and the instructions that collect the most samples.
#   bench/cuda/profile_device.sh timeline <benchmark-filter> [launches]
#       the duration of every kernel of a few iterations of one benchmark (e.g. XQ_BENCH_CALLS=absorbed4
#       ... timeline 'decode/L3.1-8B/B1/L4k'), to see where a multi-kernel path spends its time.
#   bench/cuda/profile_device.sh power <benchmark-filter> <label>[,<label>...] [iterations]
#       each call alone under sustained load (no L2 flush, `iterations` of it, default 300) while
#       nvidia-smi samples the SM clock and the power every 20 ms: whether a call is held by the
#       power cap, and at which clock (e.g. ... power 'remat/L2-7B/B8/L32k/' cublas,fused4,fused2;
#       the iterations apply to the remat and decode rows, NOTES.md item 58).
# A benchmark of bench_cuda is a table row that times several calls; XQ_BENCH_CALLS=<label> keeps
# one (the labels: the row's <label>_us counters), so that the profiled launch is that call's.
set -o pipefail
# shellcheck source=SCRIPTDIR/device_env.sh
. "$(dirname "$0")/device_env.sh"
# ncu runs each launch to its end before the host goes on: the bench's hold kernel (time_it) would
# spin until its timeout, since the host could not release it.
export XQ_BENCH_HOLD=0
mode=$1
shift
case "$mode" in
  kernel)
    ncu --kernel-name "regex:$1" --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section InstructionStats --section LaunchStats \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      "$B" --benchmark_filter="$2" > "$OUT/ncu_kernel.txt" 2>&1
    grep -E "Duration|Throughput|Registers Per|Achieved Occupancy|Eligible|Issued Warp|Executed Instructions|Mem Busy|Max Bandwidth|stalled" "$OUT/ncu_kernel.txt" |
      awk '!/stalled/ || $NF + 0 >= 0.05'
    ;;
  source)
    ncu --kernel-name "regex:$1" --launch-skip 2 --launch-count 1 --set full --import-source yes \
      -o "$OUT/ncu_source" -f "$B" --benchmark_filter="$2" > "$OUT/ncu_source.log" 2>&1 || { tail -20 "$OUT/ncu_source.log"; exit 1; }
    ncu -i "$OUT/ncu_source.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_source.csv" 2>&1
    python3 "$(dirname "$0")/top_stalls.py" "$OUT/ncu_source.csv" 40 || head -c 3000 "$OUT/ncu_source.csv"
    ;;
  timeline)
    ncu --launch-skip "${2:-60}" --launch-count 16 --metrics gpu__time_duration.sum "$B" --benchmark_filter="$1" \
      > "$OUT/ncu_timeline.txt" 2>&1
    grep -E "^  [A-Za-z_].*\(|gpu__time_duration" "$OUT/ncu_timeline.txt" | sed -E 's/\(.*//' | paste - - |
      awk '{ printf "%10s us  %s\n", $NF, $1 }'
    ;;
  power)
    export XQ_BENCH_HOLD=1 XQ_BENCH_FLUSH=0 XQ_BENCH_ITERATIONS=${3:-300}
    q=timestamp,clocks.sm,power.draw,clocks_event_reasons.active
    nvidia-smi --query-gpu=$q --format=csv,noheader > /dev/null 2>&1 || q=timestamp,clocks.sm,power.draw
    for label in ${2//,/ }; do
      nvidia-smi --query-gpu=$q --format=csv,noheader,nounits -lms 20 > "$OUT/power_$label.csv" 2>&1 &
      smi=$!
      XQ_BENCH_CALLS=$label "$B" --benchmark_filter="$1" > "$OUT/power_$label.txt" 2>&1
      kill $smi
      wait $smi 2> /dev/null
      python3 - "$OUT/power_$label.csv" "$label" "$(grep -oE "${label}_us=[0-9.]+[kM]?" "$OUT/power_$label.txt" | head -1)" <<'PY'
import statistics, sys
rows = [r.split(", ") for r in open(sys.argv[1]) if r.count(",") >= 2]
busy = [r for r in rows if r[2].replace(".", "", 1).isdigit() and float(r[2]) > 250]  # samples while the GPU works
if not busy:
    sys.exit(f"{sys.argv[2]}: no busy samples among {len(rows)}")
mhz, watts = [float(r[1]) for r in busy], [float(r[2]) for r in busy]
reasons = sorted({r[3].strip() for r in busy}) if len(busy[0]) > 3 else []
print(f"{sys.argv[2]:>10} {sys.argv[3]:>20}  SM MHz median {statistics.median(mhz):.0f}  power median "
      f"{statistics.median(watts):.0f} W (max {max(watts):.0f})  {len(busy)} samples  clock event reasons {reasons}")
PY
    done
    ;;
  *)
    echo "usage: $0 kernel|source <kernel-regex> <benchmark-filter> | timeline <benchmark-filter> [launch-skip]"
    echo "       $0 power <benchmark-filter> <label>[,<label>...] [iterations]"
    exit 2
    ;;
esac
