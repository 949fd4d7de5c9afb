//! What a model costs: parameters and bytes by component and format, decode-state bytes per
//! token by layer kind, and the memory one sequence needs at a given context. Everything is
//! derived from the configuration alone, so it works without weights; with a checkpoint the
//! plan is checked against the bytes actually stored.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::config::{Config, LayerKind};
use crate::quant::{FP4_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK};
use crate::state::RowCodec;

/// Storage format of a group of parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Format {
    /// e4m3 with 128x128 UE8M0 scales.
    Fp8,
    /// Packed e2m1 with 1x32 UE8M0 scales.
    Fp4,
    /// BF16.
    Bf16,
    /// F32.
    F32,
    /// I32 (`tid2eid`).
    I32,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Fp8 => "FP8",
            Format::Fp4 => "FP4",
            Format::Bf16 => "BF16",
            Format::F32 => "F32",
            Format::I32 => "I32",
        }
    }

    /// Bytes of a `rows x cols` matrix in this format, scales included.
    pub fn bytes(self, rows: usize, cols: usize) -> u64 {
        let (r, c) = (rows as u64, cols as u64);
        match self {
            Format::Fp8 => {
                let b = FP8_WEIGHT_BLOCK as u64;
                r * c + r.div_ceil(b) * c.div_ceil(b)
            }
            Format::Fp4 => r * c / 2 + r * (c / FP4_WEIGHT_BLOCK as u64),
            Format::Bf16 => 2 * r * c,
            Format::F32 | Format::I32 => 4 * r * c,
        }
    }
}

/// Parameters and bytes of one component in one format.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tally {
    /// Number of values.
    pub params: u64,
    /// Bytes stored (with scales).
    pub bytes: u64,
}

/// Decode-state cost of one layer kind.
#[derive(Clone, Debug, Serialize)]
pub struct KindState {
    /// Blocks of this kind (main and MTP).
    pub layers: usize,
    /// Bytes per token of context, per layer (compressed entries).
    pub bytes_per_token: f64,
    /// Bytes per layer that do not grow with context (window ring, pending rows).
    pub fixed_bytes: u64,
}

/// The full cost report of a configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Parameters by component and format.
    pub weights: BTreeMap<String, BTreeMap<String, Tally>>,
    /// Total parameters.
    pub total_params: u64,
    /// Parameters a token activates (routed experts counted by `num_experts_per_tok`; MTP
    /// excluded).
    pub active_params: u64,
    /// Total weight bytes.
    pub weight_bytes: u64,
    /// State by layer kind.
    pub state: BTreeMap<String, KindState>,
    /// Context the sequence memory is computed for.
    pub context: usize,
    /// Decode state of one sequence at `context` tokens.
    pub sequence_bytes: u64,
    /// An uncompressed BF16 cache of every token's KV in every layer, for comparison.
    pub dense_bf16_kv_bytes: u64,
}

impl Plan {
    /// Computes the plan of `cfg` for one sequence of `context` tokens.
    pub fn new(cfg: &Config, context: usize) -> Self {
        type Parts = BTreeMap<String, BTreeMap<String, Tally>>;
        fn add(w: &mut Parts, part: &str, fmt: Format, rows: usize, cols: usize, times: usize) {
            let t = w
                .entry(part.to_string())
                .or_default()
                .entry(fmt.name().to_string())
                .or_default();
            t.params += (rows * cols * times) as u64;
            t.bytes += fmt.bytes(rows, cols) * times as u64;
        }
        fn total(w: &Parts) -> u64 {
            w.values().flat_map(|x| x.values()).map(|t| t.params).sum()
        }
        let mut w = Parts::new();
        let (d, v, m) = (cfg.hidden_size, cfg.vocab_size, cfg.hc_mult);
        let (h, dh, f, e) = (
            cfg.num_attention_heads,
            cfg.head_dim,
            cfg.moe_intermediate_size,
            cfg.n_routed_experts,
        );
        let dense = if cfg.fp8() { Format::Fp8 } else { Format::Bf16 };
        let expert = if cfg.fp4_experts() {
            Format::Fp4
        } else {
            dense
        };
        add(&mut w, "embedding", Format::Bf16, v, d, 1);
        add(&mut w, "head", Format::Bf16, v, d, 1);
        add(&mut w, "head", Format::Bf16, 1, d, 1);
        add(&mut w, "head", Format::F32, m, m * d + 1, 1);
        add(&mut w, "head", Format::F32, 1, 1, 1);
        let mut active = 2 * (v * d) as u64;
        for i in 0..cfg.total_blocks() {
            let mtp = i >= cfg.num_hidden_layers;
            let tag = |s: &str| {
                if mtp {
                    format!("mtp {s}")
                } else {
                    s.to_string()
                }
            };
            let before = total(&w);
            let attn = tag("attention");
            add(&mut w, &attn, dense, cfg.q_lora_rank, d, 1);
            add(&mut w, &attn, dense, h * dh, cfg.q_lora_rank, 1);
            add(&mut w, &attn, dense, dh, d, 1);
            add(
                &mut w,
                &attn,
                dense,
                cfg.o_groups * cfg.o_lora_rank,
                h * dh / cfg.o_groups,
                1,
            );
            add(&mut w, &attn, dense, d, cfg.o_groups * cfg.o_lora_rank, 1);
            add(
                &mut w,
                &attn,
                Format::Bf16,
                1,
                cfg.q_lora_rank + dh + 2 * d,
                1,
            );
            add(&mut w, &attn, Format::F32, 1, h, 1);
            let c = cfg.ratio(i);
            if c > 0 {
                let width = if c == 4 { 2 * dh } else { dh };
                let cmp = tag("compressor");
                add(&mut w, &cmp, Format::Bf16, 2 * width, d, 1);
                add(&mut w, &cmp, Format::Bf16, 1, dh, 1);
                add(&mut w, &cmp, Format::F32, c, width, 1);
            }
            if c == 4 {
                let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
                let ix = tag("indexer");
                add(&mut w, &ix, dense, ih * id, cfg.q_lora_rank, 1);
                add(&mut w, &ix, Format::Bf16, ih, d, 1);
                add(&mut w, &ix, Format::Bf16, 4 * id, d, 1);
                add(&mut w, &ix, Format::Bf16, 1, id, 1);
                add(&mut w, &ix, Format::F32, 4, 2 * id, 1);
            }
            let mhc = tag("mHC");
            add(&mut w, &mhc, Format::F32, (2 + m) * m, m * d + 1, 2);
            add(&mut w, &mhc, Format::F32, 1, 3, 2);
            let router = tag("router");
            add(&mut w, &router, Format::Bf16, e, d, 1);
            if i < cfg.num_hash_layers {
                add(&mut w, &router, Format::I32, v, cfg.num_experts_per_tok, 1);
            } else {
                add(&mut w, &router, Format::F32, 1, e, 1);
            }
            add(&mut w, &tag("shared expert"), dense, f, d, 3);
            if mtp {
                add(&mut w, "mtp", dense, d, d, 2);
                add(&mut w, "mtp", Format::Bf16, 1, 3 * d, 1);
                add(&mut w, "mtp", Format::F32, m, m * d + 1, 1);
                add(&mut w, "mtp", Format::F32, 1, 1, 1);
            }
            let after = total(&w);
            if !mtp {
                active += after - before + (3 * f * d * cfg.num_experts_per_tok) as u64;
            }
            add(&mut w, &tag("routed experts"), expert, f, d, 3 * e);
        }
        let total_params = total(&w);
        let weight_bytes = w.values().flat_map(|x| x.values()).map(|t| t.bytes).sum();

        let mut state: BTreeMap<String, KindState> = BTreeMap::new();
        let attn_row = RowCodec::Attention {
            dim: dh,
            rope: cfg.qk_rope_head_dim,
        }
        .bytes();
        let index_row = RowCodec::Index {
            dim: cfg.index_head_dim,
        }
        .bytes();
        let mut sequence_bytes = 0u64;
        for i in 0..cfg.total_blocks() {
            let kind = cfg.kind(i);
            let c = cfg.ratio(i);
            let window = (cfg.sliding_window * attn_row) as u64;
            // Pending rows: kv and score (f32) of the block being filled, plus the previous
            // block's overlap half for c = 4.
            let pending = |dim: usize| -> u64 {
                match c {
                    4 => (4 * 2 * dim * 2 * 4 + 4 * dim * 2 * 4) as u64,
                    0 => 0,
                    _ => (c * dim * 2 * 4) as u64,
                }
            };
            let (per_token, fixed) = match kind {
                LayerKind::Window => (0.0, window),
                LayerKind::Hca => (attn_row as f64 / c as f64, window + pending(dh)),
                LayerKind::Csa => (
                    (attn_row + index_row) as f64 / c as f64,
                    window + pending(dh) + pending(cfg.index_head_dim),
                ),
            };
            let entries = context.checked_div(c).unwrap_or(0) as u64;
            let row = match kind {
                LayerKind::Csa => attn_row + index_row,
                _ => attn_row,
            } as u64;
            sequence_bytes += fixed + entries * row;
            let k = state.entry(kind.name().to_string()).or_insert(KindState {
                layers: 0,
                bytes_per_token: per_token,
                fixed_bytes: fixed,
            });
            k.layers += 1;
        }
        let dense_bf16_kv_bytes = (cfg.total_blocks() * context * dh * 2) as u64;
        Plan {
            weights: w,
            total_params,
            active_params: active,
            weight_bytes,
            state,
            context,
            sequence_bytes,
            dense_bf16_kv_bytes,
        }
    }

    /// Human-readable report.
    pub fn render(&self, cfg: &Config) -> String {
        let mut s = String::new();
        let kinds = |k: LayerKind| {
            (0..cfg.num_hidden_layers)
                .filter(|&i| cfg.kind(i) == k)
                .count()
        };
        let _ = writeln!(
            s,
            "DeepSeek V4: {} blocks ({} CSA, {} HCA, {} window-only) + {} MTP, hidden {}, {} heads x {}, {} routed experts (top {}) of width {}, vocab {}, context {}",
            cfg.num_hidden_layers,
            kinds(LayerKind::Csa),
            kinds(LayerKind::Hca),
            kinds(LayerKind::Window),
            cfg.num_nextn_predict_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.head_dim,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.moe_intermediate_size,
            cfg.vocab_size,
            cfg.max_position_embeddings
        );
        let _ = writeln!(
            s,
            "\nweights                    format   parameters        bytes"
        );
        for (part, by) in &self.weights {
            for (fmt, t) in by {
                let _ = writeln!(
                    s,
                    "  {part:<24} {fmt:<6} {:>12} {:>12}",
                    count(t.params),
                    bytes(t.bytes)
                );
            }
        }
        let _ = writeln!(
            s,
            "  {:<24} {:<6} {:>12} {:>12}\n  active per token: {} parameters",
            "total",
            "",
            count(self.total_params),
            bytes(self.weight_bytes),
            count(self.active_params)
        );
        let _ = writeln!(
            s,
            "\ndecode state per layer     layers   bytes/token   fixed bytes"
        );
        for (kind, k) in &self.state {
            let _ = writeln!(
                s,
                "  {kind:<24} {:>6} {:>13.2} {:>13}",
                k.layers,
                k.bytes_per_token,
                bytes(k.fixed_bytes)
            );
        }
        let _ = writeln!(
            s,
            "\none sequence at {} tokens: {} of decode state ({} per token); an uncompressed BF16 KV cache would take {} ({:.0}x more)",
            tokens(self.context),
            bytes(self.sequence_bytes),
            bytes(self.sequence_bytes / self.context.max(1) as u64),
            bytes(self.dense_bf16_kv_bytes),
            self.dense_bf16_kv_bytes as f64 / self.sequence_bytes.max(1) as f64
        );
        s
    }
}

/// A token count as people write it: `1M`, `128K`, or the number.
pub fn tokens(n: usize) -> String {
    match n {
        n if n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

/// `1.23G`-style count.
pub fn count(n: u64) -> String {
    scaled(n as f64, 1000.0, &["", "K", "M", "G", "T"])
}

/// `1.23 GiB`-style size.
pub fn bytes(n: u64) -> String {
    scaled(n as f64, 1024.0, &[" B", " KiB", " MiB", " GiB", " TiB"])
}

fn scaled(mut v: f64, base: f64, units: &[&str]) -> String {
    let mut i = 0;
    while v >= base && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0}{}", units[0])
    } else {
        format!("{v:.2}{}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pro() -> Config {
        let text = include_str!("../tests/fixtures/deepseek-v4-pro.config.json");
        Config::from_json(text).unwrap()
    }

    #[test]
    fn pro_plan_matches_published_sizes() {
        let cfg = pro();
        let p = Plan::new(&cfg, 1 << 20);
        // V4-Pro is published as 1.6T total, 49B active parameters.
        let total = p.total_params as f64 / 1e12;
        assert!((1.55..1.7).contains(&total), "total {total}T");
        let active = p.active_params as f64 / 1e9;
        assert!((45.0..53.0).contains(&active), "active {active}B");
        // 30 CSA + 31 HCA main layers, 1 window-only MTP block.
        assert_eq!(p.state["CSA (c=4)"].layers, 30);
        assert_eq!(p.state["HCA (c=128)"].layers, 31);
        assert_eq!(p.state["window (c=0)"].layers, 1);
        // CSA: (711 + 68) / 4 bytes per token; HCA: 711 / 128.
        assert_eq!(p.state["CSA (c=4)"].bytes_per_token, 779.0 / 4.0);
        assert_eq!(p.state["HCA (c=128)"].bytes_per_token, 711.0 / 128.0);
        // 30 * 2^18 CSA entries of 779 bytes dominate: ~6.1 GB at 1M tokens, about a tenth of a
        // dense BF16 cache of every layer.
        let gb = p.sequence_bytes as f64 / 1e9;
        assert!((6.0..6.5).contains(&gb), "{gb} GB");
        assert!(p.dense_bf16_kv_bytes > 10 * p.sequence_bytes);
    }

    #[test]
    fn state_grows_linearly_with_context() {
        let cfg = pro();
        let a = Plan::new(&cfg, 128 * 1024).sequence_bytes;
        let b = Plan::new(&cfg, 256 * 1024).sequence_bytes;
        let c = Plan::new(&cfg, 384 * 1024).sequence_bytes;
        assert_eq!(b - a, c - b);
    }
}
