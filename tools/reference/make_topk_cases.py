"""Writes rows full of ties and the indices `torch.topk` picks from them on the CPU, for
`tests/topk_torch.rs`: hadal's top-k must choose among equal scores as the reference does.

    python3 tools/reference/make_topk_cases.py --out tests/fixtures/topk_torch.safetensors

Rerun it on another torch build and compare (`--check FILE`) to see whether that build picks
the same entries.
"""
import argparse

import torch
from safetensors.torch import load_file, save_file


def cases(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = list(range(1, 41)) + [50, 63, 64, 65, 100, 113, 128, 160, 200, 257, 384, 1000, 2048]
    for n in sizes:
        # 64 k <= n takes torch's heap path, larger k its introselect path.
        ks = [1, 3, 8, 16, n // 2, n - 1, n] if n <= 200 else [1, 6, 16, n // 64, n // 8]
        for k in sorted(set(ks) & set(range(1, n + 1))):
            for kind in range(5) if n <= 200 else (0, 2, 3):
                if kind == 0:  # few distinct values: many ties everywhere
                    v = torch.randint(-2, 3, (n,), generator=g).float()
                elif kind == 1:  # all equal
                    v = torch.zeros(n)
                elif kind == 2:  # indexer-like: positives, negatives, a run of exact zeros
                    v = torch.randn(n, generator=g)
                    v[torch.rand(n, generator=g) < 0.4] = 0.0
                elif kind == 3:  # prefill rows: visible prefix, -inf beyond
                    v = torch.randint(-1, 2, (n,), generator=g).float()
                    v[torch.randint(0, n + 1, (1,), generator=g).item():] = float("-inf")
                else:  # a NaN among ties
                    v = torch.randint(0, 2, (n,), generator=g).float()
                    v[torch.randint(0, n, (1,), generator=g).item()] = float("nan")
                yield v, k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--check")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    values, lens, ks, picks = [], [], [], []
    for v, k in cases(a.seed):
        values.append(v)
        lens.append(len(v))
        ks.append(k)
        picks.append(v.topk(k).indices)
    t = {"values": torch.cat(values), "lens": torch.tensor(lens, dtype=torch.int32), "k": torch.tensor(ks, dtype=torch.int32),
         "picks": torch.cat(picks).int()}
    if a.out:
        save_file(t, a.out, metadata={"torch": torch.__version__})
        print(f"{len(lens)} rows, {len(t['values'])} values -> {a.out}")
    if a.check:
        old = load_file(a.check)
        same = torch.equal(old["picks"], t["picks"]) and torch.equal(old["lens"], t["lens"])
        print(f"torch {torch.__version__}: {'same picks' if same else 'DIFFERENT picks'} as {a.check}")


if __name__ == "__main__":
    main()
