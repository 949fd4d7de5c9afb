"""Float32 stand-ins for the six kernels the official DeepSeek V4 `model.py` imports.

The official kernels are TileLang GPU code. These compute the same functions with plain torch
ops, keeping the quantization numerics exact (FP8 e4m3 / FP4 e2m1 round to nearest even,
power-of-two scales) and doing the matrix products in float32 after dequantizing, which is
how the golden fixtures were produced. Which torch op computes each step matters for the last
bit, so the op sequence here is deliberate: see README.md.
"""
import torch
import torch.nn.functional as F

FP8_MAX, FP4_MAX = 448.0, 6.0
# e2m1 magnitudes, their rounding midpoints, and whether a tie at that midpoint rounds up
# (to the even code) or down.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MID = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (False, True, False, True, False, True, False)


def _pow2_ceil(x):
    return torch.pow(2.0, torch.ceil(torch.log2(x)))


def _e8m0(t):
    if t.dtype == torch.float8_e8m0fnu:
        return torch.pow(2.0, (t.view(torch.uint8).to(torch.int32) - 127).to(torch.float32))
    return t.float()


def _round_e2m1(q):
    a = q.abs().unsqueeze(-1)
    mid = torch.tensor(_MID, device=q.device)
    up = torch.tensor(_TIE_UP, device=q.device)
    code = ((a > mid) | ((a == mid) & up)).sum(-1)
    return torch.sign(q) * torch.tensor(_E2M1, device=q.device)[code]


def act_quant(x, block_size=128, scale_fmt=None, scale_dtype=torch.float32, inplace=False):
    blocks = x.float().unflatten(-1, (-1, block_size))
    scale = _pow2_ceil(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4) * (1.0 / FP8_MAX))
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if inplace:
        x.copy_((q.float() * scale).flatten(-2).to(x.dtype))
        return x
    return q.flatten(-2), scale.squeeze(-1)


def fp4_act_quant(x, block_size=32, inplace=True):
    assert inplace, "the model only simulates FP4 activations in place"
    blocks = x.float().unflatten(-1, (-1, block_size))
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0 ** -126)
    scale = _pow2_ceil(amax * (1.0 / FP4_MAX))
    q = _round_e2m1((blocks / scale).clamp(-FP4_MAX, FP4_MAX))
    x.copy_((q * scale).flatten(-2).to(x.dtype))
    return x


def _dequantized_product(a, a_s, w):
    rows = a.reshape(-1, a.size(-1)).float()
    rows = rows * a_s.reshape(rows.size(0), -1).float().repeat_interleave(128, 1)
    return (rows @ w.T).reshape(*a.shape[:-1], w.size(0))


def fp8_gemm(a, a_s, b, b_s, scale_dtype=torch.float32):
    n, k = b.shape
    s = _e8m0(b_s).repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    return _dequantized_product(a, a_s, b.float() * s)


def fp4_gemm(a, a_s, b, b_s, scale_dtype=torch.float32):
    packed = b.view(torch.uint8)
    lut = torch.tensor(_E2M1 + tuple(-v for v in _E2M1), device=b.device)
    w = torch.stack([lut[(packed & 15).long()], lut[(packed >> 4).long()]], -1).flatten(1)
    return _dequantized_product(a, a_s, w * _e8m0(b_s).repeat_interleave(32, 1))


def sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    b, s, h, d = q.shape
    k = topk_idxs.size(-1)
    idx = topk_idxs.clamp_min(0).long().unsqueeze(-1).expand(b, s, k, d)
    picked = kv.unsqueeze(1).expand(b, s, -1, d).gather(2, idx).float()
    scores = torch.einsum("bshd,bskd->bshk", q.float(), picked) * softmax_scale
    scores = scores.masked_fill((topk_idxs == -1).unsqueeze(2), float("-inf"))
    peak = scores.max(-1).values
    e = torch.exp(scores - peak.unsqueeze(-1))
    # The sink is a key with a learned logit and a zero value: it only enlarges the denominator.
    denom = e.sum(-1) + torch.exp(attn_sink.view(1, 1, h).float() - peak)
    return torch.einsum("bshk,bskd->bshd", e / denom.unsqueeze(-1), picked).to(q.dtype)


def hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, sinkhorn_iters=20, eps=1e-6):
    m = hc_mult
    pre = torch.sigmoid(mixes[..., :m] * hc_scale[0] + hc_base[:m]) + eps
    post = 2 * torch.sigmoid(mixes[..., m:2 * m] * hc_scale[1] + hc_base[m:2 * m])
    comb = mixes[..., 2 * m:].unflatten(-1, (m, m)) * hc_scale[2] + hc_base[2 * m:].view(m, m)
    comb = F.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hadamard_transform(x, scale=1.0):
    n = x.size(-1)
    h = torch.ones(1, 1, device=x.device, dtype=x.dtype)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.matmul(x, h) * scale
