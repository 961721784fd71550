#!/usr/bin/env python3
"""Summarizes `ncu --page source --csv --print-source sass`: the instructions with the most warp
samples, each with its stall reasons. Usage: top_stalls.py <csv> [count]"""
import csv
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


rows = list(csv.reader(open(sys.argv[1], errors="replace")))
head = next(i for i, r in enumerate(rows) if any("Source" == c or "Address" == c for c in r))
cols, body = rows[head], rows[head + 1:]
print("columns:", ", ".join(cols))
total_col = next((i for i, c in enumerate(cols) if c.startswith("Warp Stall Sampling (All")), None)
if total_col is None:
    sys.exit("no 'Warp Stall Sampling (All Samples)' column")
src = cols.index("Source")
stall_cols = [i for i, c in enumerate(cols) if c.startswith("stall_") and "Not Issued" not in c]  # reasons, all samples
total = sum(number(r[total_col]) for r in body if len(r) > total_col)
print(f"samples: {total:.0f} over {len(body)} instructions")
top = sorted((r for r in body if len(r) > total_col), key=lambda r: -number(r[total_col]))[: int(sys.argv[2]) if len(sys.argv) > 2 else 30]
for r in top:
    n = number(r[total_col])
    reasons = sorted(((number(r[i]), cols[i]) for i in stall_cols), reverse=True)[:3]
    why = ", ".join(f"{c} {v:.0f}" for v, c in reasons if v > 0)
    print(f"{100 * n / total:5.1f}%  {r[0]:>6}  {r[src][:70]:70}  {why}")
