//! Attention: low-rank queries, one shared KV head, a sliding window with an attention sink,
//! compressed entries (all of them for HCA, the indexer's top-k for CSA), and a grouped
//! low-rank output projection.
//!
//! `qr = rmsnorm(wq_a y)`; `q = wq_b qr`, each head scaled by its own RMS and rotated;
//! `kv = rmsnorm(wkv y)`, rotated, its non-RoPE dims FP8-rounded: one vector that every head
//! uses as key and value. A query at position t sees the raw `kv` of the last `window`
//! positions and the compressed entries; softmax over `q . k / sqrt(Dh)` with the sink's logit
//! in the denominator; each head's output is rotated back, groups of heads go through their
//! own slice of `wo_a`, and `wo_b` maps the concatenation back to the hidden size.

use crate::backend::{Device, Which};
use crate::config::Config;
use crate::error::Result;
use crate::model::compressor::Compressor;
use crate::model::indexer::Indexer;
use crate::model::rope::Rope;
use crate::model::Loader;
use crate::state::RowCodec;

/// Attention weights of one block.
pub struct Attention<D: Device> {
    wq_a: D::Weight,
    q_norm: D::Vector,
    wq_b: D::Weight,
    wkv: D::Weight,
    kv_norm: D::Vector,
    wo_a: D::Weight,
    wo_b: D::Weight,
    /// Per-head sink logits.
    pub sink: D::Vector,
    /// The KV compressor (c > 0).
    pub compressor: Option<Compressor<D>>,
    /// The lightning indexer (c = 4).
    pub indexer: Option<Indexer<D>>,
    /// The block's rotation.
    pub rope: Rope<D>,
    /// Query heads H.
    pub heads: usize,
    /// Head and KV width Dh.
    pub dim: usize,
    /// Output groups.
    pub groups: usize,
    /// Sliding window W.
    pub window: usize,
    /// Compress ratio c (0: window only).
    pub ratio: usize,
    eps: f32,
    /// How KV rows are rounded and stored.
    pub codec: RowCodec,
}

impl<D: Device> Attention<D> {
    /// Loads `{prefix}.*` (e.g. `layers.3.attn`) for a block with compress ratio `ratio`.
    pub fn load(l: &mut Loader<D>, prefix: &str, cfg: &Config, ratio: usize) -> Result<Self> {
        let (d, h, dh) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim);
        let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
        let eps = cfg.rms_norm_eps as f32;
        let p = |n: &str| format!("{prefix}.{n}");
        let codec = RowCodec::Attention {
            dim: dh,
            rope: cfg.qk_rope_head_dim,
        };
        Ok(Attention {
            wq_a: l.matrix(&p("wq_a"), cfg.q_lora_rank, d)?,
            q_norm: l.vector(&p("q_norm.weight"), &[cfg.q_lora_rank])?,
            wq_b: l.matrix(&p("wq_b"), h * dh, cfg.q_lora_rank)?,
            wkv: l.matrix(&p("wkv"), dh, d)?,
            kv_norm: l.vector(&p("kv_norm.weight"), &[dh])?,
            wo_a: l.matrix(&p("wo_a"), g * r, h * dh / g)?,
            wo_b: l.matrix(&p("wo_b"), d, g * r)?,
            sink: l.vector(&p("attn_sink"), &[h])?,
            compressor: if ratio > 0 {
                Some(Compressor::load(
                    l,
                    &p("compressor"),
                    d,
                    ratio,
                    dh,
                    codec,
                    eps,
                )?)
            } else {
                None
            },
            indexer: if ratio == 4 {
                Some(Indexer::load(l, &p("indexer"), cfg)?)
            } else {
                None
            },
            rope: Rope::for_ratio(l.dev, cfg, ratio)?,
            heads: h,
            dim: dh,
            groups: g,
            window: cfg.sliding_window,
            ratio,
            eps,
            codec,
        })
    }

    /// Attention over a batch: `y` is `T x D` (the normed sublayer input); advances block
    /// `slot` of each sequence's state. Returns `T x D`.
    pub fn forward(
        &self,
        dev: &D,
        b: &mut D::Batch<'_>,
        slot: usize,
        y: &D::Tensor,
    ) -> Result<D::Tensor> {
        let (mut qr, mut kv) = dev.linear_pair(&self.wq_a, &self.wkv, y)?;
        dev.rms_norm(&mut qr, &self.q_norm, self.eps)?;
        // The queries (behind `wq_b`, the sublayer's largest weight), the keys with the
        // compressor, and the indexer are independent until the attention itself: a device may
        // run two chains side by side. The indexer, where there is one, is the longest: it runs
        // beside all the rest; elsewhere the keys run beside the queries.
        let (q, picks) = dev.join(
            &mut (&mut *b, &mut kv),
            |(b, kv)| {
                let mut q = dev.linear(&self.wq_b, &qr)?;
                dev.head_norm_rope(&mut q, b, self.heads, &self.rope, self.eps)?;
                if self.indexer.is_some() {
                    self.keys(dev, b, slot, y, kv)?;
                }
                Ok(q)
            },
            |(b, kv)| match &self.indexer {
                Some(ix) => Ok(Some(ix.forward(dev, b, slot, &qr, y, &self.rope)?)),
                None => self.keys(dev, b, slot, y, kv).map(|()| None),
            },
        )?;
        let o = dev.attention(self, b, slot, &q, &kv, picks.as_ref())?;
        let z = dev.grouped_linear(&self.wo_a, &o, self.groups)?;
        dev.linear(&self.wo_b, &z)
    }

    /// The new KV rows normed and rotated, and the compressor fed with the sublayer's input.
    fn keys(
        &self,
        dev: &D,
        b: &mut D::Batch<'_>,
        slot: usize,
        y: &D::Tensor,
        kv: &mut D::Tensor,
    ) -> Result<()> {
        dev.rms_norm(kv, &self.kv_norm, self.eps)?;
        dev.rope(kv, b, 1, &self.rope, false)?;
        match &self.compressor {
            Some(c) => c.forward(dev, b, slot, Which::Attention, y, &self.rope),
            None => Ok(()),
        }
    }
}
