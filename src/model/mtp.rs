//! Multi-token prediction: a block that reads the main model's final stream at position t and
//! the embedding of token t+1, and predicts token t+2 through the shared head.
//!
//! `X_in_j = e_proj(rmsnorm_e(embed[token_{t+1}])) + h_proj(rmsnorm_h(X_j))`, then a normal block,
//! its own hc_head and final norm.

use crate::backend::cpu::{linear, ops::rms_norm, Numerics};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::Result;
use crate::model::block::Block;
use crate::model::mhc::{HcDims, HcHead};
use crate::weights::Matrix;

/// One MTP block.
pub struct Mtp {
    e_proj: Matrix,
    h_proj: Matrix,
    enorm: Vec<f32>,
    hnorm: Vec<f32>,
    /// Final norm before the shared head.
    pub norm: Vec<f32>,
    /// Own reduction of the stream before the head.
    pub hc_head: HcHead,
    /// The transformer block.
    pub block: Block,
    eps: f32,
}

impl Mtp {
    /// Loads `mtp.{i}.*`. Copies of the shared embedding or head that some exports store under
    /// the MTP prefix are dropped.
    pub fn load(ck: &mut Checkpoint, i: usize, cfg: &Config, dims: HcDims) -> Result<Self> {
        let p = format!("mtp.{i}");
        let d = cfg.hidden_size;
        for name in ck.names() {
            if let Some(rest) = name.strip_prefix(&format!("{p}.")) {
                if rest.starts_with("emb")
                    || rest == "head.weight"
                    || rest.starts_with("shared_head.")
                {
                    ck.take(&name)?;
                }
            }
        }
        Ok(Mtp {
            e_proj: Matrix::load(ck, &format!("{p}.e_proj"), d, d)?,
            h_proj: Matrix::load(ck, &format!("{p}.h_proj"), d, d)?,
            enorm: ck.take_f32(&format!("{p}.enorm.weight"), &[d])?,
            hnorm: ck.take_f32(&format!("{p}.hnorm.weight"), &[d])?,
            norm: ck.take_f32(&format!("{p}.norm.weight"), &[d])?,
            hc_head: HcHead::load(ck, &format!("{p}."), dims)?,
            block: Block::load(ck, &p, cfg, cfg.num_hidden_layers + i)?,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// The block's input stream from next-token embeddings (`T x D`) and the main final stream
    /// (`T x M x D`).
    pub fn input(&self, emb: &[f32], hidden: &[f32], num: Numerics) -> Vec<f32> {
        let d = self.enorm.len();
        let mut e = emb.to_vec();
        e.chunks_mut(d)
            .for_each(|r| rms_norm(r, &self.enorm, self.eps));
        let e = linear(&self.e_proj, &e, num);
        let mut h = hidden.to_vec();
        h.chunks_mut(d)
            .for_each(|r| rms_norm(r, &self.hnorm, self.eps));
        let mut x = linear(&self.h_proj, &h, num);
        let m = x.len() / e.len();
        for (t, row) in x.chunks_mut(m * d).enumerate() {
            for copy in row.chunks_mut(d) {
                for (v, a) in copy.iter_mut().zip(&e[t * d..(t + 1) * d]) {
                    *v += a;
                }
            }
        }
        x
    }
}
