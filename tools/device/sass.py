#!/usr/bin/env python3
"""Summarises `ncu --page source --print-source sass --csv` (run.sh's SASS=1 profiles): the
instructions most warp-stall samples landed on, with their main stall reasons and executions,
and the executions by opcode.

    python3 tools/device/sass.py NAME.sass.csv [TOP [BINS]]
"""
import csv
import sys
from collections import Counter

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
with open(path, newline="") as f:
    rows = list(csv.reader(f))
head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
cols = rows[head]
ix = {c: i for i, c in enumerate(cols)}
stalls = [c for c in cols if c.startswith("stall_") and "Not Issued" not in c]
# Several launches profiled: a section each (a "Kernel Name" row, the header again), summed
# instruction by instruction (by address).
by_addr = {}
for r in rows[head + 1:]:
    if len(r) < len(cols) or r[0] == "Address":
        continue
    num = lambda c: float(r[ix[c]] or 0) if r[ix[c]] not in ("-", "") else 0.0
    e = by_addr.setdefault(r[ix["Address"]], [len(by_addr), r[ix["Source"]].strip(), 0.0, 0.0, Counter()])
    e[2] += num("Warp Stall Sampling (All Samples)")
    e[3] += num("Instructions Executed")
    for c in stalls:
        e[4][c[6:]] += num(c)
insts = [(n, src, smp, ex, sorted(((v, k) for k, v in why.items()), reverse=True)[:3])
         for n, src, smp, ex, why in by_addr.values()]
samples = sum(i[2] for i in insts) or 1
executed = sum(i[3] for i in insts) or 1
print(f"{len(insts)} instructions, {samples:.0f} samples, {executed:.0f} warp instructions executed")
print("\nby opcode (executions):")
ops = Counter()
for _, src, _, ex, _ in insts:
    ops[src.split()[0] if not src.startswith("@") else src.split()[1]] += ex
for op, ex in ops.most_common(20):
    print(f"  {op:14s} {ex:12.0f} {100 * ex / executed:5.1f}%")
print(f"\ntop {top} by samples (line, samples %, executions, reasons):")
for n, src, s, ex, rs in sorted(insts, key=lambda i: -i[2])[:top]:
    why = ", ".join(f"{name} {v:.0f}" for v, name in rs if v > 0)
    print(f"  {n:5d} {100 * s / samples:5.1f}% {ex:10.0f}  {src[:60]:60s} {why}")

# Where the samples fall along the code: bins of consecutive instructions, with the first
# instruction of each, for telling apart a kernel's phases (staging, main loop, epilogue).
bins = int(sys.argv[3]) if len(sys.argv) > 3 else 0
if bins:
    print(f"\nsamples by runs of {bins} instructions (first line, samples %, executions):")
    for b in range(0, len(insts), bins):
        run = insts[b:b + bins]
        s = sum(i[2] for i in run)
        if s:
            print(f"  {run[0][0]:6d}  {100 * s / samples:5.1f}%  {sum(i[3] for i in run):10.0f}  {run[0][1][:50]}")
