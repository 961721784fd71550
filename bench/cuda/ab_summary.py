#!/usr/bin/env python3
"""Summarizes bench/cuda/ab_device.sh's output: per timed call, each configuration's median
(mean over rounds) and its ratio to configuration 0; per shape (the name's second part), the
geometric mean of those ratios; and the largest spread between rounds of one configuration, the
noise a ratio must beat. A benchmark of one call reports median_us; a row of several calls
(bench_cuda's time_calls) reports <label>_us per call, summarized as "<row>:<label>".
Usage: ab_summary.py <ab.txt>"""
import collections
import math
import re
import sys

UNITS = {"": 1.0, "k": 1e3, "M": 1e6}


def call_times_us(line):
    """(suffix, µs) per timed call of a Google Benchmark row: median_us (suffix "") for a single
    call, <label>_us (suffix ":<label>") for each call of a row; host_us is not a GPU time."""
    for m in re.finditer(r"(\w+)_us=([\d.]+)([kM]?)", line):
        label = m.group(1)
        if label == "host":
            continue
        yield ("" if label == "median" else ":" + label), float(m.group(2)) * UNITS[m.group(3)]


def main(path):
    times = collections.defaultdict(lambda: collections.defaultdict(list))  # row -> config -> [us per round]
    names, config = {}, None
    for line in open(path, errors="replace"):
        head = re.match(r"=== round (\d+) config (\d+): (.*)", line)
        if head:
            config = int(head.group(2))
            names[config] = head.group(3).strip()
            continue
        if config is None or not re.match(r"[a-z_]+/", line):
            continue
        row = line.split()[0].split("/iterations")[0].split("/manual_time")[0]
        for suffix, us in call_times_us(line):
            if us > 0:  # 0: a call that XQ_BENCH_CALLS left out
                times[row + suffix][config].append(us)
    if not times:
        sys.exit("no benchmark rows in " + path)
    configs = sorted(names)
    print("configs: " + "; ".join(f"{k} = {names[k]}" for k in configs))
    print(f"{'row':44s}" + "".join(f"{'cfg ' + str(k) + ' us':>12s}" for k in configs) +
          "".join(f"{str(k) + '/0':>8s}" for k in configs[1:]))
    ratios = collections.defaultdict(lambda: collections.defaultdict(list))  # shape -> config -> [ratio]
    spread = 0.0
    for row, by in times.items():
        if any(not by.get(k) for k in configs):
            print(f"{row:44s}  (missing in some configuration)")
            continue
        mean = {k: sum(by[k]) / len(by[k]) for k in configs}
        for k in configs:
            spread = max(spread, max(by[k]) / min(by[k]) - 1.0)
        shape = row.split("/")[1] if "/" in row else row
        line = f"{row:44s}" + "".join(f"{mean[k]:12.1f}" for k in configs)
        for k in configs[1:]:
            ratios[shape][k].append(mean[k] / mean[0])
            line += f"{mean[k] / mean[0]:8.3f}"
        print(line)
    for shape, by in ratios.items():
        gm = {k: math.exp(sum(math.log(r) for r in v) / len(v)) for k, v in by.items()}
        print(f"geometric mean of time ratios, {shape}: " + ", ".join(f"cfg {k}/0 {g:.3f}" for k, g in gm.items()))
    print(f"largest spread between rounds of one configuration: {100 * spread:.1f} %")


if __name__ == "__main__":
    main(sys.argv[1])
