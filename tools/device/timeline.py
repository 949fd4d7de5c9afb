#!/usr/bin/env python3
"""Summarises an Nsight Systems kernel trace of `hadal bench` (tools/device/run.sh timeline).

Usage: timeline.py TRACE.csv [FIRST] [--prefill]

Steps end at the sampling kernel (`sample_rows`); the fastest of the later steps is taken (a
replayed decode step), or with --prefill the first (every launch before the first sampling:
the synthetic weights' generation and a bench's prefill). Prints its span, the time some kernel runs, the time two or more run at
once, the gaps where none runs, and per kernel name: launches, summed duration and the time it
ran alone (nothing beside it: what a step waits for); then its first FIRST launches (default
120) in order with their start, duration and stream.
"""
import csv
import sys
from collections import defaultdict


def column(header, *words):
    for i, h in enumerate(header):
        if all(w.lower() in h.lower() for w in words):
            return i
    raise SystemExit(f"no column with {words} in {header}")


def main():
    args = [a for a in sys.argv[1:] if a != "--prefill"]
    prefill = len(args) < len(sys.argv) - 1
    path = args[0]
    first = int(args[1]) if len(args) > 1 else 120
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    cs, cd, cstream, cn = (column(header, "Start"), column(header, "Duration"),
                           column(header, "Strm"), column(header, "Name"))
    ks = []
    for r in rows[1:]:
        if len(r) <= cn or not r[cd]:
            continue
        name = r[cn].split("(")[0].split("<")[0].strip()
        if name.startswith("[CUDA"):  # copies and sets
            continue
        ks.append((int(r[cs]), int(r[cs]) + int(r[cd]), r[cstream], name))
    ks.sort()
    steps, cur = [], []
    for k in ks:
        cur.append(k)
        if k[3] == "sample_rows":
            steps.append(cur)
            cur = []
    if not steps:
        raise SystemExit("no step (no sample_rows kernel) in the trace")
    later = steps[len(steps) // 2:]
    step = steps[0] if prefill else min(later, key=lambda s: s[-1][1] - s[0][0])
    t0, t1 = step[0][0], step[-1][1]
    # Sweep the step's kernel intervals: time with >= 1 and >= 2 running, gaps, time alone.
    events = sorted([(s, 1, i) for i, (s, e, _, _) in enumerate(step)] +
                    [(e, -1, i) for i, (s, e, _, _) in enumerate(step)])
    running, last = set(), t0
    busy = both = 0
    alone = defaultdict(int)
    gaps = []
    for t, kind, i in events:
        dt = t - last
        if running:
            busy += dt
            if len(running) >= 2:
                both += dt
            if len(running) == 1:
                alone[step[next(iter(running))][3]] += dt
        elif dt > 0:
            gaps.append((dt, last))
        last = t
        if kind == 1:
            running.add(i)
        else:
            running.discard(i)
    span = t1 - t0
    which = "the first" if prefill else "the fastest of the later ones"
    print(f"{len(steps)} steps traced; {which}: {len(step)} launches, "
          f"{span / 1e3:.1f} us")
    print(f"  some kernel running {busy / 1e3:.1f} us ({100 * busy / span:.1f}%), two or more "
          f"{both / 1e3:.1f} us, none {sum(g for g, _ in gaps) / 1e3:.1f} us in {len(gaps)} gaps")
    streams = defaultdict(int)
    for s, e, st, _ in step:
        streams[st] += e - s
    print("  kernel time by stream: " +
          ", ".join(f"{st} {v / 1e3:.1f} us" for st, v in sorted(streams.items())))
    total = defaultdict(lambda: [0, 0])
    for s, e, _, n in step:
        total[n][0] += 1
        total[n][1] += e - s
    print(f"\n{'kernel':32} {'launches':>8} {'sum us':>9} {'alone us':>9}")
    for n, (c, d) in sorted(total.items(), key=lambda x: -alone[x[0]]):
        print(f"{n:32} {c:8} {d / 1e3:9.1f} {alone[n] / 1e3:9.1f}")
    print(f"\nfirst {first} launches: start us, duration us, stream, kernel")
    for s, e, st, n in step[:first]:
        print(f"{(s - t0) / 1e3:9.2f} {(e - s) / 1e3:8.2f}  {st:>4}  {n}")


if __name__ == "__main__":
    main()
