//! The lightning indexer of CSA layers: picks, for each query, the `index_topk` compressed
//! entries to attend to.
//!
//! Queries `qi = wq_b(qr)` (RoPE, Hadamard, FP4) are scored against the indexer's own compressed
//! keys (Hadamard, FP4): `score(b) = sum_h w_h * relu(qi_h . key_b)` with per-head weights
//! `w = weights_proj(y) / sqrt(index_head_dim * index_n_heads)`.

use crate::backend::{Device, Which};
use crate::config::Config;
use crate::error::Result;
use crate::model::compressor::Compressor;
use crate::model::rope::Rope;
use crate::model::Loader;
use crate::state::RowCodec;

/// Indexer weights.
pub struct Indexer<D: Device> {
    wq_b: D::Weight,
    weights_proj: D::Weight,
    /// The indexer's compressor (c = 4, keys of width `index_head_dim`).
    pub compressor: Compressor<D>,
    /// Index heads.
    pub heads: usize,
    /// Index head width.
    pub dim: usize,
    /// Entries kept per query.
    pub topk: usize,
}

impl<D: Device> Indexer<D> {
    /// Loads `{prefix}.wq_b`, `.weights_proj` and `.compressor`.
    pub fn load(l: &mut Loader<D>, prefix: &str, cfg: &Config) -> Result<Self> {
        let (heads, dim) = (cfg.index_n_heads, cfg.index_head_dim);
        Ok(Indexer {
            wq_b: l.matrix(&format!("{prefix}.wq_b"), heads * dim, cfg.q_lora_rank)?,
            weights_proj: l.matrix(&format!("{prefix}.weights_proj"), heads, cfg.hidden_size)?,
            compressor: Compressor::load(
                l,
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

    /// Feeds the batch to the key compressor, then picks each query's entries; `qr` is the
    /// attention's normed low-rank query, `y` the sublayer input.
    pub fn forward(
        &self,
        dev: &D,
        b: &mut D::Batch<'_>,
        slot: usize,
        qr: &D::Tensor,
        y: &D::Tensor,
        rope: &Rope<D>,
    ) -> Result<D::Picks> {
        let mut q = dev.linear(&self.wq_b, qr)?;
        dev.index_queries(&mut q, b, self.heads, rope)?;
        // The reference multiplies two Python floats (doubles), then the f32 tensor by their
        // product.
        let scale = ((self.dim as f64).powf(-0.5) * (self.heads as f64).powf(-0.5)) as f32;
        let mut w = dev.linear_plain(&self.weights_proj, y)?;
        dev.scale(&mut w, scale)?;
        self.compressor
            .forward(dev, b, slot, Which::Index, y, rope)?;
        dev.index_topk(self, b, slot, &q, &w)
    }
}
