//! The embedded default: a small DeepSeek V4 with random weights, built deterministically and
//! written with the released checkpoints' names and dtypes, so that `hadal demo` runs the whole
//! path (loader, chat encoding, tokenizer, prefill, decode, parsing) with no download.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::generate::Rng;
use crate::quant::{
    e8m0_encode, encode_e2m1, encode_e4m3, pow2_ceil, round_e2m1, round_e4m3, FP4_MAX,
    FP4_WEIGHT_BLOCK, FP8_MAX, FP8_WEIGHT_BLOCK,
};

/// V4-Pro's configuration, as released.
pub const PRO_CONFIG: &str = include_str!("../assets/configs/deepseek-v4-pro.config.json");
/// V4-Flash's shapes (see the note inside for the values not confirmed).
pub const FLASH_CONFIG: &str = include_str!("../assets/configs/deepseek-v4-flash.config.json");

/// The demo model: every V4 component (window, CSA and HCA blocks, a hash-routed block, MTP) at
/// a small width, with the real vocabulary.
pub fn demo_config() -> Config {
    let mut v: serde_json::Value = serde_json::from_str(PRO_CONFIG).expect("bundled config");
    let o = v.as_object_mut().expect("object");
    for (k, x) in [
        ("hidden_size", 256.into()),
        ("num_hidden_layers", 4.into()),
        ("num_hash_layers", 1.into()),
        ("num_attention_heads", 4.into()),
        ("head_dim", 128.into()),
        ("q_lora_rank", 128.into()),
        ("o_groups", 2.into()),
        ("o_lora_rank", 128.into()),
        ("n_routed_experts", 8.into()),
        ("num_experts_per_tok", 2.into()),
        ("moe_intermediate_size", 128.into()),
        ("index_n_heads", 4.into()),
        ("index_head_dim", 128.into()),
        ("index_topk", 16.into()),
        ("compress_ratios", serde_json::json!([0, 4, 128, 4, 0])),
    ] {
        o.insert(k.into(), x);
    }
    Config::from_json(&v.to_string()).expect("the demo configuration is valid")
}

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Writes random weights for `cfg` in the released layout.
struct Builder {
    rng: Rng,
    t: Tensors,
}

impl Builder {
    fn uniform(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.rng.uniform() as f32 * 2.0 - 1.0) * a)
            .collect()
    }

    fn put(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) {
        self.t
            .insert(name.to_string(), (dtype, shape.to_vec(), data));
    }

    fn f32(&mut self, name: &str, shape: &[usize], v: &[f32]) {
        self.put(
            name,
            Dtype::F32,
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        );
    }

    fn bf16(&mut self, name: &str, shape: &[usize], v: &[f32]) {
        let bytes = v
            .iter()
            .flat_map(|x| {
                let b = x.to_bits();
                (((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16).to_le_bytes()
            })
            .collect();
        self.put(name, Dtype::BF16, shape, bytes);
    }

    fn ones(&mut self, name: &str, n: usize) {
        self.bf16(name, &[n], &vec![1.0; n]);
    }

    /// An FP8 linear `{p}.weight` + `{p}.scale` with entries of size about `1/sqrt(cols)`.
    fn fp8(&mut self, p: &str, rows: usize, cols: usize) {
        let w = self.uniform(rows * cols, (3.0 / cols as f32).sqrt());
        let b = FP8_WEIGHT_BLOCK;
        let (rb, cb) = (rows.div_ceil(b), cols.div_ceil(b));
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0u8; rb * cb];
        for i in 0..rb {
            for j in 0..cb {
                let cells = || {
                    (i * b..((i + 1) * b).min(rows)).flat_map(move |r| {
                        (j * b..((j + 1) * b).min(cols)).map(move |c| r * cols + c)
                    })
                };
                let amax = cells().fold(0f32, |m, k| m.max(w[k].abs())).max(1e-12);
                let s = pow2_ceil(amax / FP8_MAX);
                scales[i * cb + j] = e8m0_encode(s);
                for k in cells() {
                    codes[k] = encode_e4m3(round_e4m3((w[k] / s).clamp(-FP8_MAX, FP8_MAX)));
                }
            }
        }
        self.put(&format!("{p}.weight"), Dtype::F8_E4M3, &[rows, cols], codes);
        self.put(&format!("{p}.scale"), Dtype::F8_E8M0, &[rb, cb], scales);
    }

    /// A packed FP4 expert linear with 1x32 scales.
    fn fp4(&mut self, p: &str, rows: usize, cols: usize) {
        let w = self.uniform(rows * cols, (3.0 / cols as f32).sqrt());
        let mut packed = vec![0u8; rows * cols / 2];
        let mut scales = Vec::with_capacity(rows * cols / FP4_WEIGHT_BLOCK);
        for (bi, blk) in w.chunks(FP4_WEIGHT_BLOCK).enumerate() {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let s = pow2_ceil(amax / FP4_MAX);
            scales.push(e8m0_encode(s));
            for (i, v) in blk.iter().enumerate() {
                let k = bi * FP4_WEIGHT_BLOCK + i;
                let nib = encode_e2m1(round_e2m1((v / s).clamp(-FP4_MAX, FP4_MAX)));
                packed[k / 2] |= nib << (4 * (k % 2));
            }
        }
        self.put(&format!("{p}.weight"), Dtype::I8, &[rows, cols / 2], packed);
        self.put(
            &format!("{p}.scale"),
            Dtype::F8_E8M0,
            &[rows, cols / FP4_WEIGHT_BLOCK],
            scales,
        );
    }

    fn mhc(&mut self, p: &str, rows: usize, md: usize, scales: usize) {
        let f = self.uniform(rows * md, 0.02);
        self.f32(&format!("{p}_fn"), &[rows, md], &f);
        let b = self.uniform(rows, 0.5);
        self.f32(&format!("{p}_base"), &[rows], &b);
        self.f32(&format!("{p}_scale"), &[scales], &vec![0.5; scales]);
    }

    fn compressor(&mut self, p: &str, ratio: usize, dim: usize, d: usize) {
        let w = if ratio == 4 { 2 * dim } else { dim };
        let ape = self.uniform(ratio * w, 0.1);
        self.f32(&format!("{p}.ape"), &[ratio, w], &ape);
        for n in ["wkv", "wgate"] {
            let v = self.uniform(w * d, (3.0 / d as f32).sqrt());
            self.bf16(&format!("{p}.{n}.weight"), &[w, d], &v);
        }
        self.ones(&format!("{p}.norm.weight"), dim);
    }

    fn block(&mut self, cfg: &Config, p: &str, index: usize) {
        let (d, h, dh, m) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.head_dim,
            cfg.hc_mult,
        );
        let (g, r, q, f, e) = (
            cfg.o_groups,
            cfg.o_lora_rank,
            cfg.q_lora_rank,
            cfg.moe_intermediate_size,
            cfg.n_routed_experts,
        );
        let a = format!("{p}.attn");
        self.fp8(&format!("{a}.wq_a"), q, d);
        self.ones(&format!("{a}.q_norm.weight"), q);
        self.fp8(&format!("{a}.wq_b"), h * dh, q);
        self.fp8(&format!("{a}.wkv"), dh, d);
        self.ones(&format!("{a}.kv_norm.weight"), dh);
        self.fp8(&format!("{a}.wo_a"), g * r, h * dh / g);
        self.fp8(&format!("{a}.wo_b"), d, g * r);
        self.f32(&format!("{a}.attn_sink"), &[h], &vec![0.0; h]);
        let c = cfg.ratio(index);
        if c > 0 {
            self.compressor(&format!("{a}.compressor"), c, dh, d);
        }
        if c == 4 {
            let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
            self.fp8(&format!("{a}.indexer.wq_b"), ih * id, q);
            let wp = self.uniform(ih * d, (3.0 / d as f32).sqrt());
            self.bf16(&format!("{a}.indexer.weights_proj.weight"), &[ih, d], &wp);
            self.compressor(&format!("{a}.indexer.compressor"), 4, id, d);
        }
        let fp = format!("{p}.ffn");
        let gw = self.uniform(e * d, (3.0 / d as f32).sqrt());
        self.bf16(&format!("{fp}.gate.weight"), &[e, d], &gw);
        if index < cfg.num_hash_layers {
            let k = cfg.num_experts_per_tok;
            let ids: Vec<u8> = (0..cfg.vocab_size * k)
                .flat_map(|_| ((self.rng.uniform() * e as f64) as i32).to_le_bytes())
                .collect();
            self.put(
                &format!("{fp}.gate.tid2eid"),
                Dtype::I32,
                &[cfg.vocab_size, k],
                ids,
            );
        } else {
            self.f32(&format!("{fp}.gate.bias"), &[e], &vec![0.0; e]);
        }
        for x in 0..e {
            self.fp4(&format!("{fp}.experts.{x}.w1"), f, d);
            self.fp4(&format!("{fp}.experts.{x}.w2"), d, f);
            self.fp4(&format!("{fp}.experts.{x}.w3"), f, d);
        }
        self.fp8(&format!("{fp}.shared_experts.w1"), f, d);
        self.fp8(&format!("{fp}.shared_experts.w2"), d, f);
        self.fp8(&format!("{fp}.shared_experts.w3"), f, d);
        self.ones(&format!("{p}.attn_norm.weight"), d);
        self.ones(&format!("{p}.ffn_norm.weight"), d);
        self.mhc(&format!("{p}.hc_attn"), (2 + m) * m, m * d, 3);
        self.mhc(&format!("{p}.hc_ffn"), (2 + m) * m, m * d, 3);
    }
}

/// Writes `config.json`, `model.safetensors` (random weights from `seed`) and the bundled
/// `tokenizer.json` into `dir`.
pub fn write_random_checkpoint(dir: &Path, cfg: &Config, seed: u64) -> Result<()> {
    let (v, d, m) = (cfg.vocab_size, cfg.hidden_size, cfg.hc_mult);
    let mut b = Builder {
        rng: Rng::new(seed),
        t: BTreeMap::new(),
    };
    let emb = b.uniform(v * d, 1.0);
    b.bf16("embed.weight", &[v, d], &emb);
    let head = b.uniform(v * d, (3.0 / d as f32).sqrt());
    b.bf16("head.weight", &[v, d], &head);
    b.ones("norm.weight", d);
    b.mhc("hc_head", m, m * d, 1);
    for i in 0..cfg.num_hidden_layers {
        b.block(cfg, &format!("layers.{i}"), i);
    }
    for j in 0..cfg.num_nextn_predict_layers {
        let p = format!("mtp.{j}");
        b.block(cfg, &p, cfg.num_hidden_layers + j);
        b.fp8(&format!("{p}.e_proj"), d, d);
        b.fp8(&format!("{p}.h_proj"), d, d);
        for n in ["enorm", "hnorm", "norm"] {
            b.ones(&format!("{p}.{n}.weight"), d);
        }
        b.mhc(&format!("{p}.hc_head"), m, m * d, 1);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let views: Vec<(String, TensorView)> =
        b.t.iter()
            .map(|(n, (dt, s, data))| {
                TensorView::new(*dt, s.clone(), data)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Checkpoint(format!("tensor {n}: {e}")))
            })
            .collect::<Result<_>>()?;
    let model = dir.join("model.safetensors");
    let bytes =
        safetensors::serialize(views, None).map_err(|e| Error::Checkpoint(e.to_string()))?;
    std::fs::write(&model, bytes).map_err(|e| Error::io(&model, e))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(cfg).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))?;
    let tok = dir.join("tokenizer.json");
    std::fs::write(&tok, crate::tokenizer::BUNDLED).map_err(|e| Error::io(&tok, e))
}
