"""Which summation order does the platform's float32 matrix product (MKL sgemm) use?

    python3 probe_orders.py MODEL_PY FIXTURE_DIR [DECODE_STEPS]

Records every mm/bmm shape of the official forward on a fixture (prefill, then a few decode
steps), then for each shape searches a family of orders (fused chains in K-blocks, lane chains
with their reductions) for one that reproduces torch's result bit for bit on random inputs. Where
none does, prints an FPRev-style profile: with +-2^40 at k = i and k = j and ones elsewhere, a sum
returns K minus the size of the subtree where i and j meet, which reveals the summation tree.
Last, sweeps the number of rows for each (K, N) seen. What it found is in docs/numerics.md.
"""
import sys, os, json, time, itertools
import torch
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_official as R

out = os.environ.get("OUT", "/tmp")
model_py = sys.argv[1]
fx = sys.argv[2]
ndec = int(sys.argv[3]) if len(sys.argv) > 3 else 3
print("torch", torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), flush=True)

sigs = {}
OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
       torch.ops.aten.baddbmm.default}


class Rec(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in OPS:
            key = (str(func),) + tuple((tuple(a.shape), tuple(a.stride())) for a in args if isinstance(a, torch.Tensor))
            sigs[key] = sigs.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


M, K = R.load_official(model_py)
cfg = json.load(open(os.path.join(fx, "config.json")))
w, _ = R.read_safetensors(os.path.join(fx, "model.safetensors"))
g, meta = R.read_safetensors(os.path.join(fx, "golden.safetensors"))
p = int(meta["prefill"]); tokens = g["tokens"].long(); b, n = tokens.shape
net = R.build(M, K, R.model_args(M, cfg, b, n + 8), w, "cpu")
with torch.no_grad(), Rec():
    fwd = type(net).forward.__wrapped__
    fwd(net, tokens[:, :p], 0)
    for t in range(p, p + ndec):
        fwd(net, tokens[:, t:t + 1], t)
for k, v in sorted(sigs.items(), key=lambda kv: str(kv[0])):
    print(v, k)
sys.stdout.flush()

rnd = lambda t: t.float().double()


def emu(P, kc, V, U, comb, hred, fma):
    """P: [R, C, K] products in float64 (exact). Returns float32 [R, C]."""
    if not fma:
        P = rnd(P)
    Rr, C, Kk = P.shape
    kc = kc or Kk
    tot = None
    for k0 in range(0, Kk, kc):
        blk = P[:, :, k0:k0 + kc]
        L = blk.size(2)
        g = U * V
        pad = (-L) % g
        if pad:
            blk = torch.cat([blk, blk.new_zeros(Rr, C, pad)], 2)
        blk = blk.reshape(Rr, C, -1, U, V)
        acc = blk.new_zeros(Rr, C, U, V)
        for i in range(blk.size(2)):
            acc = rnd(acc + blk[:, :, i])
        if comb == "seq":
            a = acc[:, :, 0]
            for u in range(1, U):
                a = rnd(a + acc[:, :, u])
        else:
            a = acc
            while a.size(2) > 1:
                h = a.size(2) // 2
                a = rnd(a[:, :, :h] + a[:, :, h:])
            a = a[:, :, 0]
        if hred == "half":
            while a.size(2) > 1:
                h = a.size(2) // 2
                a = rnd(a[..., :h] + a[..., h:])
            s = a[..., 0]
        elif hred == "pairs":
            while a.size(2) > 1:
                a = rnd(a[..., 0::2] + a[..., 1::2])
            s = a[..., 0]
        else:
            s = a[..., 0]
            for l in range(1, a.size(2)):
                s = rnd(s + a[..., l])
        tot = s if tot is None else rnd(tot + s)
    return tot.float()


def candidates(Kk):
    for V, U in itertools.product((1, 8, 16), (1, 2, 4)):
        for kc in (None, 32, 64, 128, 192, 256, 384, 512):
            if kc and kc >= Kk:
                continue
            for comb in (("seq", "tree") if U > 1 else ("seq",)):
                for hred in (("half", "seq", "pairs") if V > 1 else ("seq",)):
                    for fma in (True, False):
                        yield kc, V, U, comb, hred, fma


def pick(n, k=6):
    idx = sorted(set(list(range(min(k, n))) + list(range(max(0, n - k), n))))
    return torch.tensor(idx)


def search(key):
    op, shapes = key[0], key[1:]
    if "addmm" in op or "baddbmm" in op:
        shapes = shapes[1:]
    (sa, ta), (sb, tb) = shapes[0], shapes[1]
    torch.manual_seed(len(str(key)))
    A = torch.empty_strided(sa, ta).normal_()
    B = torch.empty_strided(sb, tb).normal_()
    if len(sa) == 2:
        ref = A @ B
        A3, B3, ref3 = A[None], B[None], ref[None]
    else:
        ref3 = torch.bmm(A, B)
        A3, B3 = A, B
    bi = pick(A3.size(0), 2)
    ri, ci = pick(A3.size(1)), pick(B3.size(2), 16)
    a = A3[bi][:, ri].double()  # [b, R, K]
    bb = B3[bi][:, :, ci].double()  # [b, K, C]
    P = (a.unsqueeze(-1) * bb.unsqueeze(1)).transpose(-1, -2)  # [b, R, C, K]
    P = P.flatten(0, 1)  # [b R, C, K]
    want = ref3[bi][:, ri][:, :, ci].reshape(-1, len(ci))
    Kk = P.size(-1)
    res = []
    t0 = time.time()
    for c in candidates(Kk):
        m = (emu(P, *c) == want).float().mean().item()
        res.append((m, c))
        if m == 1.0:
            break
    res.sort(key=lambda r: -r[0])
    print(f"{key}: K={Kk} best:", "; ".join(f"{m:.3f} {c}" for m, c in res[:4]), f"({time.time()-t0:.0f}s)", flush=True)
    return res[0]


def profile(key, maxk=1024):
    """FPRev-style: with +-2^40 at k=0 and k=j and ones elsewhere, sum = K - |LCA(0, j)|."""
    op, shapes = key[0], key[1:]
    if "addmm" in op or "baddbmm" in op:
        shapes = shapes[1:]
    (sa, ta), (sb, tb) = shapes[0], shapes[1]
    if len(sa) != 2:
        return
    Mm, Kk = sa
    if Kk > maxk:
        return
    sizes = []
    for i0 in (0, Kk - 1):
        row = []
        for j0 in range(0, Kk, Mm):
            A = torch.empty_strided(sa, ta).fill_(1.0)
            js = []
            for m in range(Mm):
                j = j0 + m
                if j >= Kk or j == i0:
                    js.append(None)
                    continue
                A[m, i0] = 2.0 ** 40
                A[m, j] = -(2.0 ** 40)
                js.append(j)
            B = torch.empty_strided(sb, tb).fill_(1.0)
            C = A @ B
            for m, j in enumerate(js):
                if j is not None:
                    row.append((j, Kk - int(C[m, 0].item()), Kk - int(C[m, -1].item())))
        sizes.append(row)
    print(f"profile {key}:")
    for i0, row in zip((0, Kk - 1), sizes):
        # run-length encode the LCA sizes along j (column 0, and whether last column agrees)
        same = all(r[1] == r[2] for r in row)
        print(f"  i={i0} cols agree={same}: " + " ".join(f"{r[0]}:{r[1]}" for r in row[:64]), "...",
              " ".join(f"{r[0]}:{r[1]}" for r in row[-16:]), flush=True)
    profiles[str(key)] = sizes


profiles = {}
for key in sorted(sigs, key=str):
    best = search(key)
    if best[0] < 1.0:
        profile(key)
torch.save(profiles, os.path.join(out, "profiles.pt"))


def short(c):
    kc, V, U, comb, hred, fma = c
    return f"kc{kc or '-'}/V{V}/U{U}/{comb}/{hred}/{'fma' if fma else 'mul'}"


def quiet_search(key):
    with open(os.devnull, "w") as dn:
        so = sys.stdout; sys.stdout = dn
        try:
            return search(key)
        finally:
            sys.stdout = so


def sweep_mm(K_, N_, Ms):
    line = []
    for m in Ms:
        r = quiet_search(("aten.mm.default", ((m, K_), (K_, 1)), ((K_, N_), (1, K_))))
        line.append(f"{m}:{r[0]:.2f}:{short(r[1])}")
    print(f"sweep mm K={K_} N={N_}: " + " ".join(line), flush=True)


kn = sorted({(k[1][0][1], k[2][0][1]) for k in sigs if k[0] == "aten.mm.default"})
Ms = list(range(1, 41)) + [48, 64, 96, 100, 128, 203, 256, 406, 600, 812]
for K_, N_ in kn:
    sweep_mm(K_, N_, Ms)
# attention-like batched products: [b, h, d] x [b, d, k] and [b, h, k] x [b, k, d]
for bsz, h in ((2, 4), (406, 4), (600, 8)):
    line = []
    for kk in list(range(1, 70)) + [96, 128, 160, 200]:
        for which in ("qk", "pv"):
            if which == "qk":
                key = ("aten.bmm.default", ((bsz, h, 128), (h * 128, 128, 1)), ((bsz, 128, kk), (kk * 128, 1, 128)))
            else:
                key = ("aten.bmm.default", ((bsz, h, kk), (h * kk, kk, 1)), ((bsz, kk, 128), (kk * 128, 128, 1)))
            r = quiet_search(key)
            line.append(f"{which}{kk}:{r[0]:.2f}:{short(r[1])}")
    print(f"sweep bmm b={bsz} h={h}: " + " ".join(line), flush=True)
