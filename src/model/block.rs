//! One block: attention then MoE, each wrapped in its own hyper-connection.

use crate::backend::Device;
use crate::config::Config;
use crate::error::Result;
use crate::model::attention::Attention;
use crate::model::mhc::{HcDims, HyperConn, Residual};
use crate::model::moe::Moe;
use crate::model::Loader;

/// Weights of one block.
pub struct Block<D: Device> {
    /// Attention sublayer.
    pub attn: Attention<D>,
    /// MoE sublayer.
    pub ffn: Moe<D>,
    attn_norm: D::Vector,
    ffn_norm: D::Vector,
    hc_attn: HyperConn<D>,
    hc_ffn: HyperConn<D>,
    eps: f32,
}

impl<D: Device> Block<D> {
    /// Loads block `index` from `{prefix}.*` (`layers.3` or `mtp.0`).
    pub fn load(l: &mut Loader<D>, prefix: &str, cfg: &Config, index: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        let dims = HcDims {
            m: cfg.hc_mult,
            d,
            iters: cfg.hc_sinkhorn_iters,
            hc_eps: cfg.hc_eps as f32,
            norm_eps: cfg.rms_norm_eps as f32,
        };
        Ok(Block {
            attn: Attention::load(l, &format!("{prefix}.attn"), cfg, cfg.ratio(index))?,
            ffn: Moe::load(
                l,
                &format!("{prefix}.ffn"),
                cfg,
                index,
                index < cfg.num_hash_layers,
            )?,
            attn_norm: l.vector(&format!("{prefix}.attn_norm.weight"), &[d])?,
            ffn_norm: l.vector(&format!("{prefix}.ffn_norm.weight"), &[d])?,
            hc_attn: HyperConn::load(l, &format!("{prefix}.hc_attn"), dims)?,
            hc_ffn: HyperConn::load(l, &format!("{prefix}.hc_ffn"), dims)?,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Runs the block on a `T x M x D` stream in place, advancing block `slot` of each
    /// sequence's state: `before`, the block before's MoE output, is mixed into the stream
    /// first, and the MoE's output is left for what reads the stream next
    /// ([`Residual::apply`], or the next block).
    pub fn forward<'s>(
        &'s self,
        dev: &D,
        b: &mut D::Batch<'_>,
        slot: usize,
        x: &mut D::Tensor,
        before: Option<Residual<'_, D>>,
    ) -> Result<Residual<'s, D>> {
        let (y, mix) = match before {
            Some(r) => dev.hc_post_pre_norm(r, x, &self.hc_attn, &self.attn_norm, self.eps)?,
            None => dev.hc_pre_norm(&self.hc_attn, x, &self.attn_norm, self.eps)?,
        };
        let a = self.attn.forward(dev, b, slot, &y)?;
        let attn = Residual {
            hc: &self.hc_attn,
            a,
            b: None,
            mix,
        };

        let (y, mix) = dev.hc_post_pre_norm(attn, x, &self.hc_ffn, &self.ffn_norm, self.eps)?;
        let (routed, shared) = self.ffn.forward_parts(dev, b, &y)?;
        Ok(Residual {
            hc: &self.hc_ffn,
            a: routed,
            b: Some(shared),
            mix,
        })
    }
}
