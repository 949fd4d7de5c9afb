"""Makes a golden fixture folder (the layout of tests/fixtures/tiny-a) with the official
`model.py`: random weights in the released checkpoint's names and dtypes, then what the
reference computes on them in float32 on this machine.

    python3 make_fixture.py --model-py PATH/inference/model.py --config CONFIG.json --out DIR \
        [--batch 2] [--tokens 640] [--prefill 203] [--seed 0]

The values are this machine's float32 bits (see README.md): checks 1-3 and 5 of the golden
README hold across machines, check 4 only on the machine that made the fixture.
"""
import argparse
import json
import os
import struct

import torch

from run_official import build, load_official, model_args

NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int32: "I32", torch.int8: "I8",
         torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0"}


def write_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def pow2_ceil(x):
    return torch.pow(2.0, torch.ceil(torch.log2(x.clamp_min(1e-30))))


def fp8_blocks(w):
    """Block-quantizes w (128 x 128 blocks) to e4m3 codes and e8m0 scales."""
    n, k = w.shape
    bn, bk = -(-n // 128), -(-k // 128)
    pad = torch.zeros(bn * 128, bk * 128)
    pad[:n, :k] = w
    blocks = pad.view(bn, 128, bk, 128)
    s = pow2_ceil(blocks.abs().amax((1, 3)) / 448.0)
    q = (blocks / s[:, None, :, None]).clamp(-448, 448).view(bn * 128, bk * 128)[:n, :k]
    return q.to(torch.float8_e4m3fn), s.to(torch.float8_e8m0fnu)


def fp4_blocks(w, kernels):
    """Quantizes w to e2m1 in 1 x 32 blocks; two codes a byte, the even index in the low nibble."""
    blocks = w.view(w.size(0), -1, 32)
    s = pow2_ceil(blocks.abs().amax(-1, keepdim=True) / 6.0)
    q = kernels._round_e2m1((blocks / s).clamp(-6, 6)).view(w.size(0), -1)
    mags = torch.tensor(kernels._E2M1)
    code = (q.abs().unsqueeze(-1) == mags).float().argmax(-1) + 8 * (q < 0)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, s.squeeze(-1).to(torch.float8_e8m0fnu)


def random_checkpoint(net, cfg, kernels, g):
    """Random weights shaped like the reference's parameters, in the release's dtypes."""
    out = {}
    randn = lambda *s: torch.randn(*s, generator=g)
    for name, p in net.named_parameters():
        if name.startswith("mtp.") and name.endswith(("embed.weight", "head.weight")):
            continue
        if name.endswith(".scale"):
            continue  # written with its weight
        shape = tuple(p.shape)
        if p.dtype == torch.float4_e2m1fn_x2:
            shape = (shape[0], shape[1] * 2)
        if name.endswith("tid2eid"):
            e = cfg["n_routed_experts"]
            out[name] = torch.stack([torch.randperm(e, generator=g)[:shape[1]] for _ in range(shape[0])]).int()
        elif "norm" in name:
            out[name] = (1 + 0.1 * randn(*shape)).bfloat16()
        elif name.endswith("_scale"):
            out[name] = 0.5 + torch.rand(*shape, generator=g)
        elif name.endswith("_base"):
            out[name] = 0.3 + 0.8 * randn(*shape)
        elif name.endswith("_fn"):
            out[name] = 0.5 * randn(*shape) / shape[1] ** 0.5
        elif name.endswith(("attn_sink", "ape")):
            out[name] = 0.6 * randn(*shape)
        elif name.endswith("gate.bias"):
            out[name] = 0.1 * randn(*shape)
        elif name == "embed.weight":
            out[name] = randn(*shape).bfloat16()
        else:
            w = randn(*shape) / shape[1] ** 0.5
            stem = name[:-len("weight")]
            if p.dtype == torch.float4_e2m1fn_x2:
                out[name], out[stem + "scale"] = fp4_blocks(w, kernels)
            elif p.dtype == torch.float8_e4m3fn or name.endswith("wo_a.weight"):
                out[name], out[stem + "scale"] = fp8_blocks(w)
            else:
                out[name] = w.bfloat16()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-py", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--prefill", type=int, default=203)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    M, kernels = load_official(a.model_py)
    cfg = json.load(open(a.config))
    b, n, p = a.batch, a.tokens, a.prefill
    args = model_args(M, cfg, b, n + 8)
    g = torch.Generator().manual_seed(a.seed)
    weights = random_checkpoint(M.Transformer(args), cfg, kernels, g)
    tokens = torch.randint(0, cfg["vocab_size"], (b, n), generator=g)

    net = build(M, kernels, args, weights, "cpu")
    layer_out = [[] for _ in net.layers]
    for i, layer in enumerate(net.layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: layer_out[i].append(out[0].float().clone()))
    final = []
    net.head.register_forward_pre_hook(lambda m, inp: final.append(inp[0].float().clone()))
    with torch.inference_mode():
        logits = [net(tokens[:, :p], 0)] + [net(tokens[:, t:t + 1], t) for t in range(p, n)]
        hidden = final[0][:, :p - 1]
        mtp = net.mtp[0](hidden, 0, tokens[:, 1:p]).float() if len(net.mtp) else None
    full_net = build(M, kernels, args, weights, "cpu")
    with torch.inference_mode():
        full = full_net(tokens, 0).float()

    os.makedirs(a.out, exist_ok=True)
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    write_safetensors(os.path.join(a.out, "model.safetensors"), weights)
    meta = {"prefill": str(p)}
    golden = {"tokens": tokens.int(), "logits": torch.cat(logits, 1).float(), "logits_full_prefill": full}
    layers = {f"layers.{i}.output": torch.cat(o, 0) for i, o in enumerate(layer_out)}
    if mtp is not None:
        golden["mtp_logits"] = mtp
        layers["mtp.input_hidden"] = hidden[0]
    write_safetensors(os.path.join(a.out, "golden.safetensors"), golden, meta)
    write_safetensors(os.path.join(a.out, "layers.safetensors"), layers, meta)
    print(f"wrote {a.out}: {b} x {n} tokens, prefill {p}")


if __name__ == "__main__":
    main()
