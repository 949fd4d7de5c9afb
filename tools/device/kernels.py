"""Sums Nsight Compute's kernel durations by kernel name.

Usage: python3 tools/device/kernels.py FILE.csv   (ncu --csv --page raw --metrics gpu__time_duration.sum)
Prints, largest first: launches, total and mean microseconds, and share of the total.
"""
import csv
import sys
from collections import defaultdict


def main(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # The header row names the columns; a units row follows it.
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    cols = rows[head]
    name_at = cols.index("Kernel Name")
    time_at = cols.index("gpu__time_duration.sum")
    unit = rows[head + 1][time_at]
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
    if unit not in scale:
        sys.exit(f"unknown time unit {unit!r}")
    scale = scale[unit]
    total = defaultdict(float)
    count = defaultdict(int)
    for r in rows[head + 2:]:
        if len(r) <= max(name_at, time_at):
            continue
        try:
            t = float(r[time_at].replace(",", "")) * scale
        except ValueError:
            continue
        total[r[name_at]] += t
        count[r[name_at]] += 1
    whole = sum(total.values())
    print(f"{sum(count.values())} launches, {whole:.0f} us in all")
    print(f"{'kernel':32} {'launches':>8} {'total us':>10} {'mean us':>9} {'share':>6}")
    for k in sorted(total, key=total.get, reverse=True):
        print(f"{k[:32]:32} {count[k]:8} {total[k]:10.1f} {total[k] / count[k]:9.2f} {100 * total[k] / whole:5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1])
