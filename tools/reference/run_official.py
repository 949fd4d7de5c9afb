"""Runs the official DeepSeek V4 `model.py` in float32 on a golden fixture folder and compares
its logits with the fixture's, bit for bit and by the golden checks' measures.

    python3 run_official.py --model-py PATH/TO/inference/model.py --fixture DIR [--device cuda]

Needs torch >= 2.8 (float8_e8m0fnu, float4_e2m1fn_x2). See README.md for what it shows.
"""
import argparse
import importlib.util
import json
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "I32": torch.int32, "I64": torch.int64,
          "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = memoryview(raw)[8 + n:]
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        s, e = v["data_offsets"]
        t = torch.frombuffer(bytearray(body[s:e]), dtype=torch.uint8) if e > s else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(DTYPES[v["dtype"]]).reshape(v["shape"])
    return out, header.get("__metadata__", {})


def load_official(model_py):
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("reference_kernels", os.path.join(here, "reference_kernels.py"))
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    sys.modules["kernel"] = kernels  # what model.py imports its kernels from
    spec = importlib.util.spec_from_file_location("official_model", model_py)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    # The released code runs these in bf16 and keeps only the last position's logits.
    model.rotate_activation = lambda x: kernels.hadamard_transform(x, scale=x.size(-1) ** -0.5)
    model.ParallelHead.get_logits = lambda self, x: F.linear(x.float(), self.weight)
    return model, kernels


def model_args(M, cfg, batch, seq):
    rs = cfg.get("rope_scaling") or {}
    return M.ModelArgs(
        max_batch_size=batch, max_seq_len=seq, dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4",
        scale_dtype="fp8", vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
        moe_inter_dim=cfg["moe_intermediate_size"], n_layers=cfg["num_hidden_layers"],
        n_hash_layers=cfg["num_hash_layers"], n_mtp_layers=cfg.get("num_nextn_predict_layers", 0),
        n_heads=cfg["num_attention_heads"], n_routed_experts=cfg["n_routed_experts"],
        n_shared_experts=cfg["n_shared_experts"], n_activated_experts=cfg["num_experts_per_tok"],
        score_func=cfg["scoring_func"], route_scale=cfg["routed_scaling_factor"],
        swiglu_limit=cfg["swiglu_limit"], q_lora_rank=cfg["q_lora_rank"], head_dim=cfg["head_dim"],
        rope_head_dim=cfg["qk_rope_head_dim"], norm_eps=cfg["rms_norm_eps"], o_groups=cfg["o_groups"],
        o_lora_rank=cfg["o_lora_rank"], window_size=cfg["sliding_window"],
        compress_ratios=tuple(cfg["compress_ratios"]), compress_rope_theta=cfg["compress_rope_theta"],
        original_seq_len=rs.get("original_max_position_embeddings", 0), rope_theta=cfg["rope_theta"],
        rope_factor=rs.get("factor", 1.0), beta_fast=rs.get("beta_fast", 32), beta_slow=rs.get("beta_slow", 1),
        index_n_heads=cfg["index_n_heads"], index_head_dim=cfg["index_head_dim"],
        index_topk=cfg["index_topk"], hc_mult=cfg["hc_mult"], hc_sinkhorn_iters=cfg["hc_sinkhorn_iters"],
        hc_eps=cfg["hc_eps"])


def build(M, kernels, args, weights, device):
    with torch.device(device):
        net = M.Transformer(args)
    for name, p in net.named_parameters():
        hf = name.replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.")
        src = next((c for c in (name, hf) if c in weights), None)
        if src is None:
            if name.startswith("mtp.") and name.endswith(("embed.weight", "head.weight")):
                continue  # the MTP block shares the main embedding and head
            raise SystemExit(f"tensor {name} is not in the checkpoint")
        t = weights[src]
        if p.dtype == torch.float4_e2m1fn_x2:
            t = t.view(torch.float4_e2m1fn_x2)
        elif p.dtype not in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
            if t.dtype == torch.float8_e4m3fn:  # wo_a: FP8 in the checkpoint, used dequantized
                s = kernels._e8m0(weights[src[:-len("weight")] + "scale"])
                s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:t.size(0), :t.size(1)]
                t = t.float() * s
            elif t.is_floating_point():
                t = t.float()
        p.data = t.to(device)
    return net


def relative_errors(got, ref):
    got, ref = got.double().cpu(), ref.double().cpu()
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1)


def report(title, got, ref):
    r = relative_errors(got, ref)
    agree = (got.cpu().argmax(-1) == ref.argmax(-1)).float().mean()
    print(f"{title}: mean relative error {r.mean():.3e}, argmax agreement {agree:.3f}, "
          f"bit-identical elements {(got.cpu() == ref).float().mean():.4f}")
    for b in range(r.size(0)):
        off = (r[b] > 1e-5).nonzero()
        print(f"  sequence {b}: first position off by > 1e-5: {int(off[0]) if len(off) else 'none'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-py", required=True, help="the official inference/model.py")
    ap.add_argument("--fixture", required=True, help="golden fixture folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.device != "cpu":
        torch.set_default_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    M, kernels = load_official(a.model_py)
    cfg = json.load(open(os.path.join(a.fixture, "config.json")))
    weights, _ = read_safetensors(os.path.join(a.fixture, "model.safetensors"))
    golden, meta = read_safetensors(os.path.join(a.fixture, "golden.safetensors"))
    p = int(meta["prefill"])
    tokens = golden["tokens"].long().to(a.device)
    b, n = tokens.shape
    args = model_args(M, cfg, b, n + 8)
    print(f"torch {torch.__version__}, device {a.device}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    start = time.time()
    net = build(M, kernels, args, weights, a.device)
    with torch.inference_mode():
        steps = [net(tokens[:, :p], 0)]
        steps += [net(tokens[:, t:t + 1], t) for t in range(p, n)]
    report(f"prefill {p} then decode vs logits", torch.cat(steps, 1).float(), golden["logits"])
    net = build(M, kernels, args, weights, a.device)
    with torch.inference_mode():
        full = net(tokens, 0).float()
    report("one prefill vs logits_full_prefill", full, golden["logits_full_prefill"])
    own = relative_errors(golden["logits"], golden["logits_full_prefill"])
    print(f"fixture's own schedules: mean relative error {own.mean():.3e} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
