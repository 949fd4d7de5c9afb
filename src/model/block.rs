//! One block: attention then MoE, each wrapped in its own hyper-connection.

use crate::backend::cpu::{ops::rms_norm, Numerics};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::Result;
use crate::model::attention::Attention;
use crate::model::mhc::{HcDims, HyperConn};
use crate::model::moe::Moe;
use crate::model::Span;
use crate::state::BlockState;

/// Weights of one block.
pub struct Block {
    /// Attention sublayer.
    pub attn: Attention,
    /// MoE sublayer.
    pub ffn: Moe,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    hc_attn: HyperConn,
    hc_ffn: HyperConn,
    eps: f32,
}

impl Block {
    /// Loads block `index` from `{prefix}.*` (`layers.3` or `mtp.0`).
    pub fn load(ck: &mut Checkpoint, prefix: &str, cfg: &Config, index: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        let dims = HcDims {
            m: cfg.hc_mult,
            d,
            iters: cfg.hc_sinkhorn_iters,
            hc_eps: cfg.hc_eps as f32,
            norm_eps: cfg.rms_norm_eps as f32,
        };
        Ok(Block {
            attn: Attention::load(ck, &format!("{prefix}.attn"), cfg, cfg.ratio(index))?,
            ffn: Moe::load(
                ck,
                &format!("{prefix}.ffn"),
                cfg,
                index < cfg.num_hash_layers,
            )?,
            attn_norm: ck.take_f32(&format!("{prefix}.attn_norm.weight"), &[d])?,
            ffn_norm: ck.take_f32(&format!("{prefix}.ffn_norm.weight"), &[d])?,
            hc_attn: HyperConn::load(ck, &format!("{prefix}.hc_attn"), dims)?,
            hc_ffn: HyperConn::load(ck, &format!("{prefix}.hc_ffn"), dims)?,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Runs the block on a `T x M x D` stream in place, advancing each sequence's state.
    pub fn forward(
        &self,
        x: &mut [f32],
        tokens: &[u32],
        spans: &[Span],
        states: &mut [&mut BlockState],
        num: Numerics,
    ) {
        let (mut y, mix) = self.hc_attn.pre(x, num);
        let d = self.attn_norm.len();
        y.chunks_mut(d)
            .for_each(|r| rms_norm(r, &self.attn_norm, self.eps));
        let a = self.attn.forward(&y, spans, states, num);
        self.hc_attn.post(x, &a, &mix);

        let (mut y, mix) = self.hc_ffn.pre(x, num);
        y.chunks_mut(d)
            .for_each(|r| rms_norm(r, &self.ffn_norm, self.eps));
        let f = self.ffn.forward(&y, tokens, num);
        self.hc_ffn.post(x, &f, &mix);
    }
}
