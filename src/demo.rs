//! The embedded default: a small DeepSeek V4 with random weights, built deterministically and
//! written with the released checkpoints' names and dtypes, so that `hadal demo` runs the whole
//! path (loader, chat encoding, tokenizer, prefill, decode, parsing) with no download.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::checkpoint::{Bytes, Checkpoint, Fill, FillKind, RawTensor};
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

type Tensors = BTreeMap<String, RawTensor>;

/// Random weights for a configuration in the released layout: real quantized values (the
/// demo), or random codes in the released formats generated where they are used
/// ([`synthetic_checkpoint`]).
struct Builder {
    rng: Rng,
    t: Tensors,
    /// Synthetic: the seed every large tensor's seed derives from.
    synthetic: Option<u64>,
}

/// The exponent of `1/sqrt(n)`, rounded: the size that keeps a product of `n` terms near 1.
fn inv_sqrt_exp(n: usize) -> i32 {
    -((n as f64).log2() / 2.0).round() as i32
}

impl Builder {
    /// The seed of tensor `name` in synthetic mode.
    fn seed(&self, name: &str) -> Option<u64> {
        self.synthetic.map(|s| {
            name.bytes().fold(s ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
            })
        })
    }

    /// Synthetic bytes for `name`.
    fn fill(&self, name: &str, len: usize, kind: FillKind, lo: i32, span: u32) -> Bytes {
        let seed = self.seed(name).expect("synthetic mode");
        Bytes::synthetic(Fill {
            len,
            seed,
            kind,
            lo,
            span,
        })
    }

    fn uniform(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.rng.uniform() as f32 * 2.0 - 1.0) * a)
            .collect()
    }

    fn put(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) {
        self.put_bytes(name, dtype, shape, Bytes::owned(data));
    }

    fn put_bytes(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: Bytes) {
        self.t.insert(
            name.to_string(),
            RawTensor {
                name: name.to_string(),
                dtype,
                shape: shape.to_vec(),
                data,
            },
        );
    }

    /// A large BF16 matrix with entries below `bound` (synthetic: within a power of two of it).
    fn bf16_matrix(&mut self, name: &str, shape: &[usize], bound: f32) {
        if self.synthetic.is_some() {
            let n: usize = shape.iter().product();
            let lo = bound.log2().round() as i32;
            let b = self.fill(name, 2 * n, FillKind::Bf16, lo, 1);
            return self.put_bytes(name, Dtype::BF16, shape, b);
        }
        let v = self.uniform(shape.iter().product(), bound);
        self.bf16(name, shape, &v);
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
        let b = FP8_WEIGHT_BLOCK;
        if self.synthetic.is_some() {
            // Random codes have a root mean square near 2^6.
            let (wn, sn) = (format!("{p}.weight"), format!("{p}.scale"));
            let sb = (rows.div_ceil(b), cols.div_ceil(b));
            let w = self.fill(&wn, rows * cols, FillKind::E4m3, 0, 1);
            let s = self.fill(
                &sn,
                sb.0 * sb.1,
                FillKind::Scale,
                127 - 7 + inv_sqrt_exp(cols),
                2,
            );
            self.put_bytes(&wn, Dtype::F8_E4M3, &[rows, cols], w);
            return self.put_bytes(&sn, Dtype::F8_E8M0, &[sb.0, sb.1], s);
        }
        let w = self.uniform(rows * cols, (3.0 / cols as f32).sqrt());
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
        if self.synthetic.is_some() {
            // Random e2m1 codes have a root mean square near 3.
            let (wn, sn) = (format!("{p}.weight"), format!("{p}.scale"));
            let sc = rows * cols / FP4_WEIGHT_BLOCK;
            let w = self.fill(&wn, rows * cols / 2, FillKind::Any, 0, 1);
            let s = self.fill(&sn, sc, FillKind::Scale, 127 - 2 + inv_sqrt_exp(cols), 2);
            self.put_bytes(&wn, Dtype::I8, &[rows, cols / 2], w);
            return self.put_bytes(&sn, Dtype::F8_E8M0, &[rows, cols / FP4_WEIGHT_BLOCK], s);
        }
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
        let name = format!("{p}_fn");
        if self.synthetic.is_some() {
            let f = self.fill(&name, 4 * rows * md, FillKind::F32, -6, 1);
            self.put_bytes(&name, Dtype::F32, &[rows, md], f);
        } else {
            let f = self.uniform(rows * md, 0.02);
            self.f32(&name, &[rows, md], &f);
        }
        let b = self.uniform(rows, 0.5);
        self.f32(&format!("{p}_base"), &[rows], &b);
        self.f32(&format!("{p}_scale"), &[scales], &vec![0.5; scales]);
    }

    fn compressor(&mut self, p: &str, ratio: usize, dim: usize, d: usize) {
        let w = if ratio == 4 { 2 * dim } else { dim };
        let ape = self.uniform(ratio * w, 0.1);
        self.f32(&format!("{p}.ape"), &[ratio, w], &ape);
        for n in ["wkv", "wgate"] {
            self.bf16_matrix(&format!("{p}.{n}.weight"), &[w, d], (3.0 / d as f32).sqrt());
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
            self.bf16_matrix(
                &format!("{a}.indexer.weights_proj.weight"),
                &[ih, d],
                (3.0 / d as f32).sqrt(),
            );
            self.compressor(&format!("{a}.indexer.compressor"), 4, id, d);
        }
        let fp = format!("{p}.ffn");
        self.bf16_matrix(
            &format!("{fp}.gate.weight"),
            &[e, d],
            (3.0 / d as f32).sqrt(),
        );
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

/// Random weights for `cfg` from `seed`, by name, in the released layout; `synthetic`: random
/// codes generated where used (see [`Builder`]).
fn random_tensors(cfg: &Config, seed: u64, synthetic: bool) -> Tensors {
    let (v, d, m) = (cfg.vocab_size, cfg.hidden_size, cfg.hc_mult);
    let mut b = Builder {
        rng: Rng::new(seed),
        t: BTreeMap::new(),
        synthetic: synthetic.then_some(seed),
    };
    b.bf16_matrix("embed.weight", &[v, d], 1.0);
    b.bf16_matrix("head.weight", &[v, d], (3.0 / d as f32).sqrt());
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
    b.t
}

/// A checkpoint of random weights for `cfg` from `seed`, in memory (the demo's values).
pub fn random_checkpoint(cfg: &Config, seed: u64) -> Checkpoint {
    Checkpoint::from_tensors(random_tensors(cfg, seed, false).into_values().collect())
}

/// A checkpoint of random FP8/FP4/BF16 codes for `cfg` in the released shapes, generated where
/// each tensor is used (on a GPU, in place; on the CPU, in memory as it loads): what `hadal
/// bench --config` and `hadal score --config` run, with no file. Every device generates the
/// same bytes for a seed.
pub fn synthetic_checkpoint(cfg: &Config, seed: u64) -> Checkpoint {
    Checkpoint::from_tensors(random_tensors(cfg, seed, true).into_values().collect())
}

/// Writes `config.json`, `model.safetensors` (random weights from `seed`) and the bundled
/// `tokenizer.json` into `dir`.
pub fn write_random_checkpoint(dir: &Path, cfg: &Config, seed: u64) -> Result<()> {
    let t = random_tensors(cfg, seed, false);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let views: Vec<(String, TensorView)> = t
        .iter()
        .map(|(n, r)| {
            TensorView::new(r.dtype, r.shape.clone(), &r.data)
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
