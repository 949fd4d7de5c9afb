#!/usr/bin/env python3
"""A step-by-step model of `topk_rows` (src/backend/cuda/kernels/indexer.cu) on the CPU: a row's
blocks of 256 threads, the phases between their barriers run one after another, checked against
a sort (the k largest, lowest indices among ties, in index order). Checks the algorithm where no
GPU is at hand; `index_selection_matches_a_sort` (tests/cuda.rs) checks the kernel on one.

    pip install numpy
    python3 tools/topk-model.py
"""
import numpy as np

THREADS = 256


def fkey(x):
    """The kernel's order-preserving key of a float."""
    b = x.astype(np.float32).view(np.uint32).astype(np.int64)
    return np.where(b & 0x80000000, (~b) & 0xFFFFFFFF, b | 0x80000000)


def topk_rows(row, n, k, nb, per_block):
    if n <= k:
        return [i if i < n else -1 for i in range(k)]
    u = fkey(row)
    slices = [(y * per_block, min(y * per_block + per_block, n)) for y in range(nb)]
    prefix = mask = 0
    need = k
    gt, eq = [0] * nb, [0] * nb
    for p in range(3):
        bits = 11 if p < 2 else 10
        shift = 21 - 11 * p if p < 2 else 0
        nbins = 1 << bits
        # Each block's histogram of its slice's keys that match the digits so far.
        lh = []
        for lo, hi in slices:
            h = np.zeros(nbins, np.int64)
            if hi > lo:
                uu = u[lo:hi]
                np.add.at(h, (uu[(uu & mask) == prefix] >> shift) & (nbins - 1), 1)
            lh.append(h)
        g = sum(lh)  # the row's histogram, after the barrier
        # Every block: thread i holds nbins / 256 bins counted from the top; a block scan.
        per = nbins // THREADS
        above, sel = 0, None
        for i in range(THREADS):
            hb = [g[nbins - 1 - (i * per + j)] if j < per else 0 for j in range(8)]
            c = sum(hb)
            if above < need <= above + c:
                a = above
                for j in range(8):
                    if a + hb[j] >= need:
                        sel = (nbins - 1 - (i * per + j), need - a)
                        break
                    a += hb[j]
            above += c
        d, need = sel
        for y in range(nb):
            gt[y] += int(lh[y][d + 1 :].sum())
            if p == 2:
                eq[y] = int(lh[y][d])
        prefix |= d << shift
        mask |= (nbins - 1) << shift
    out = [None] * k
    for y, (lo, hi) in enumerate(slices):
        # What the blocks before write: their keys above, and the ties they take.
        at = eqb = 0
        for b in range(y):
            at += gt[b] + (0 if eqb >= need else min(need - eqb, eq[b]))
            eqb += eq[b]
        chunk = (max(hi - lo, 0) + THREADS - 1) // THREADS
        spans = [(lo + i * chunk, min(lo + i * chunk + chunk, hi)) for i in range(THREADS)]
        tg = [int((u[a:b] > prefix).sum()) if b > a else 0 for a, b in spans]
        te = [int((u[a:b] == prefix).sum()) if b > a else 0 for a, b in spans]
        gb, eb = np.cumsum([0] + tg[:-1]), np.cumsum([0] + te[:-1])
        for i, (i0, i1) in enumerate(spans):
            prior, tied = min(eqb, need), min(eqb + eb[i], need)
            take = min(need - tied, te[i])
            a = at + gb[i] + tied - prior
            for j in range(i0, i1):
                if u[j] > prefix or (u[j] == prefix and take > 0):
                    take -= u[j] == prefix
                    out[a] = j
                    a += 1
    assert None not in out, "picks left unwritten"
    return out


def by_sort(row, n, k):
    idx = sorted(range(n), key=lambda i: (-row[i], i))[:k]
    return sorted(idx) + [-1] * (k - min(k, n))


def main():
    rng = np.random.default_rng(1)
    cases = [
        (100_000, [100_000, 70_001, 300, 4_097], 512),
        (8_193, [8_193, 8_000, 512, 9], 512),
        (262_144, [262_144], 1024),
        (9_000, [513, 4_000, 9_000], 512),
    ]
    for nmax, visible, k in cases:
        for ties in [None, 8.0, 1.0]:
            for t, n in enumerate(visible):
                row = rng.standard_normal(nmax).astype(np.float32)
                if ties:
                    row = (np.round(row * ties) / ties).astype(np.float32)
                if t == 3:
                    row = -np.abs(row) - 1
                # Blocks as the host sizes them: at least 1,024 keys each.
                for want in [1, 7, 132]:
                    nb = max(1, min((nmax + 1023) // 1024, want))
                    per_block = -(-(-(-nmax // nb)) // 256) * 256
                    nb = -(-nmax // per_block)
                    got = topk_rows(row, n, k, nb, per_block)
                    assert got == by_sort(row, n, k), (nmax, n, k, ties, nb)
            print(f"{nmax} keys, ties {ties}: as a sort")


if __name__ == "__main__":
    main()
