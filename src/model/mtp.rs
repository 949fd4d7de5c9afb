//! Multi-token prediction: a block that reads the main model's final stream at position t and
//! the embedding of token t+1, and predicts token t+2 through the shared head.
//!
//! `X_in_j = e_proj(rmsnorm_e(embed[token_{t+1}])) + h_proj(rmsnorm_h(X_j))`, then a normal block,
//! its own hc_head and final norm.

use crate::backend::Device;
use crate::config::Config;
use crate::error::Result;
use crate::model::block::Block;
use crate::model::mhc::{HcDims, HcHead};
use crate::model::Loader;

/// One MTP block.
pub struct Mtp<D: Device> {
    e_proj: D::Weight,
    h_proj: D::Weight,
    enorm: D::Vector,
    hnorm: D::Vector,
    /// Final norm before the shared head.
    pub norm: D::Vector,
    /// Own reduction of the stream before the head.
    pub hc_head: HcHead<D>,
    /// The transformer block.
    pub block: Block<D>,
    eps: f32,
    copies: usize,
}

impl<D: Device> Mtp<D> {
    /// Loads `mtp.{i}.*`. Copies of the shared embedding or head that some exports store under
    /// the MTP prefix are dropped.
    pub fn load(l: &mut Loader<D>, i: usize, cfg: &Config, dims: HcDims) -> Result<Self> {
        let p = format!("mtp.{i}");
        let d = cfg.hidden_size;
        for name in l.ck.names() {
            if let Some(rest) = name.strip_prefix(&format!("{p}.")) {
                if rest.starts_with("emb")
                    || rest == "head.weight"
                    || rest.starts_with("shared_head.")
                {
                    l.ck.take(&name)?;
                }
            }
        }
        Ok(Mtp {
            e_proj: l.matrix(&format!("{p}.e_proj"), d, d)?,
            h_proj: l.matrix(&format!("{p}.h_proj"), d, d)?,
            enorm: l.vector(&format!("{p}.enorm.weight"), &[d])?,
            hnorm: l.vector(&format!("{p}.hnorm.weight"), &[d])?,
            norm: l.vector(&format!("{p}.norm.weight"), &[d])?,
            hc_head: HcHead::load(l, &format!("{p}."), dims)?,
            block: Block::load(l, &p, cfg, cfg.num_hidden_layers + i)?,
            eps: cfg.rms_norm_eps as f32,
            copies: cfg.hc_mult,
        })
    }

    /// The block's input stream from the batch's next tokens and the main final stream
    /// (`T x M x D`).
    pub fn input(
        &self,
        dev: &D,
        embed: &D::Weight,
        hidden: &D::Tensor,
        b: &D::Batch<'_>,
    ) -> Result<D::Tensor> {
        let mut e = dev.embed(embed, b, 1)?;
        dev.rms_norm(&mut e, &self.enorm, self.eps)?;
        let e = dev.linear(&self.e_proj, &e)?;
        let mut h = dev.copy(hidden)?;
        dev.rms_norm(&mut h, &self.hnorm, self.eps)?;
        let mut x = dev.linear(&self.h_proj, &h)?;
        dev.add_to_copies(&mut x, &e, b, self.copies)?;
        Ok(x)
    }
}
