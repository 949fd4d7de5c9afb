"""Compares two `hadal score` outputs position by position, by golden check 2's bounds:
relative error |a - b| / |b| within 1e-3 at >= 95% of positions and within 5e-2 at all.

    python3 tools/device/compare.py GOT.safetensors WANT.safetensors [--name logits]
"""
import json
import math
import struct
import sys


def read(path, name):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8:8 + n])[name]
    assert h["dtype"] == "F32", h["dtype"]
    s, e = h["data_offsets"]
    return h["shape"], struct.unpack(f"<{(e - s) // 4}f", raw[8 + n + s:8 + n + e])


def main():
    got_path, want_path = sys.argv[1], sys.argv[2]
    name = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--name" else "logits"
    shape, got = read(got_path, name)
    shape2, want = read(want_path, name)
    assert shape == shape2, (shape, shape2)
    w = shape[-1]
    errs, agree = [], 0
    for p in range(len(got) // w):
        a, b = got[p * w:(p + 1) * w], want[p * w:(p + 1) * w]
        num = sum((x - y) ** 2 for x, y in zip(a, b))
        den = sum(y * y for y in b)
        errs.append(math.sqrt(num / max(den, 1e-30)))
        agree += max(range(w), key=a.__getitem__) == max(range(w), key=b.__getitem__)
    ok = sum(e <= 1e-3 for e in errs) / len(errs)
    worst = max(errs)
    print(f"{len(errs)} positions: {100 * ok:.1f}% within 1e-3, worst {worst:.2e} at "
          f"{errs.index(worst)}, mean {sum(errs) / len(errs):.2e}, argmax agreement {agree / len(errs):.4f}")
    over = [f"{i}:{e:.1e}" for i, e in enumerate(errs) if e > 1e-3]
    if over:
        print("over 1e-3:", " ".join(over[:60]))
    sys.exit(0 if ok >= 0.95 and worst <= 5e-2 else 1)


main()
