//! The lightning indexer of CSA layers: picks, for each query, the `index_topk` compressed
//! entries to attend to.
//!
//! Queries `qi = wq_b(qr)` (RoPE, Hadamard, FP4) are scored against the indexer's own compressed
//! keys (Hadamard, FP4): `score(b) = sum_h w_h * relu(qi_h . key_b)` with per-head weights
//! `w = weights_proj(y) / sqrt(index_head_dim * index_n_heads)`. Among tied scores it keeps
//! those the reference's `torch.topk` keeps.

use crate::backend::cpu::order::{dot_in, Order};
use crate::backend::cpu::{linear, linear_plain, top_k, Numerics};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::Result;
use crate::model::compressor::Compressor;
use crate::model::rope::{CosSin, Rope};
use crate::quant::{fake_quant_fp4, hadamard, INDEX_FP4_BLOCK};
use crate::state::RowCodec;
use crate::weights::Matrix;

/// Indexer weights.
pub struct Indexer {
    wq_b: Matrix,
    weights_proj: Matrix,
    /// The indexer's compressor (c = 4, keys of width `index_head_dim`).
    pub compressor: Compressor,
    heads: usize,
    dim: usize,
    topk: usize,
}

impl Indexer {
    /// Loads `{prefix}.wq_b`, `.weights_proj` and `.compressor`.
    pub fn load(ck: &mut Checkpoint, prefix: &str, cfg: &Config) -> Result<Self> {
        let (heads, dim) = (cfg.index_n_heads, cfg.index_head_dim);
        Ok(Indexer {
            wq_b: Matrix::load(ck, &format!("{prefix}.wq_b"), heads * dim, cfg.q_lora_rank)?,
            weights_proj: Matrix::load(
                ck,
                &format!("{prefix}.weights_proj"),
                heads,
                cfg.hidden_size,
            )?,
            compressor: Compressor::load(
                ck,
                &format!("{prefix}.compressor"),
                cfg.hidden_size,
                4,
                dim,
                RowCodec::Index { dim },
                cfg.rms_norm_eps as f32,
            )?,
            heads,
            dim,
            topk: cfg.index_topk,
        })
    }

    /// Index queries (`T x heads x dim`, rounded as the reference) and head weights (`T x heads`).
    pub fn queries(
        &self,
        qr: &[f32],
        y: &[f32],
        cs: &[CosSin],
        num: Numerics,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut q = linear(&self.wq_b, qr, num);
        for (t, row) in q.chunks_mut(self.heads * self.dim).enumerate() {
            for h in row.chunks_mut(self.dim) {
                Rope::apply(h, &cs[t], false);
                hadamard(h);
                fake_quant_fp4(h, INDEX_FP4_BLOCK);
            }
        }
        // The reference multiplies two Python floats (doubles), then the f32 tensor by their product.
        let scale = ((self.dim as f64).powf(-0.5) * (self.heads as f64).powf(-0.5)) as f32;
        let mut w = linear_plain(&self.weights_proj, y, num);
        w.iter_mut().for_each(|v| *v *= scale);
        (q, w)
    }

    /// The entries (among the first `n` of `keys`) that one query attends to, best first, ranked in a row
    /// of `ranked >= n` entries whose last `ranked - n` (not yet visible) score -inf.
    ///
    /// The reference ranks such a row, of every entry its forward call will have; which of
    /// several tied scores it keeps depends on the row's length (see `backend::cpu::topk`).
    pub fn select(
        &self,
        q: &[f32],
        w: &[f32],
        keys: &[f32],
        n: usize,
        ranked: usize,
        order: Order,
    ) -> Vec<usize> {
        let mut scores: Vec<f32> = keys[..n * self.dim]
            .chunks(self.dim)
            .map(|k| {
                let mut s = 0f32;
                for (qh, wh) in q.chunks(self.dim).zip(w) {
                    s += dot_in(order, qh, k).max(0.0) * wh;
                }
                s
            })
            .collect();
        scores.resize(ranked.max(n), f32::NEG_INFINITY);
        // In the order torch.topk returns them (best first), which is the order the attention
        // sums them in; the entries not yet visible come last and are dropped.
        let mut idx = top_k(&scores, self.topk);
        idx.retain(|&i| i < n);
        idx
    }

    /// The order of the score products of a chunk of `tokens` queries: the reference's product
    /// has a row per position and head.
    pub fn score_order(&self, num: Numerics, tokens: usize) -> Order {
        num.product(tokens * self.heads, self.dim)
    }

    /// How many entries the reference's index row holds for a row of `ranked` entries.
    pub fn width(&self, ranked: usize) -> usize {
        self.topk.min(ranked)
    }
}
