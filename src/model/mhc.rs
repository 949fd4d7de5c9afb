//! Manifold-constrained hyper-connections: the residual stream is M copies of the hidden state,
//! mixed around each sublayer by weights computed from the stream itself.
//!
//! For a token's stream `X` (M x D, flattened to `x`):
//! `mix = (fn @ x) * rsqrt(mean(x^2) + eps)`, `(2+M)M` values;
//! `pre_j = sigmoid(mix_j s0 + base_j) + hc_eps` reduces the copies to the sublayer input
//! `y = sum_j pre_j X_j`; `post_j = 2 sigmoid(mix_{M+j} s1 + base_{M+j})` spreads the sublayer
//! output `a` back; `comb` (`mix_{2M..} s2 + base`, a row softmax plus hc_eps, then Sinkhorn
//! normalization towards doubly stochastic: columns, then `iters - 1` times rows and columns,
//! each divided by its sum plus hc_eps) mixes the copies:
//! `X'_k = post_k a + sum_j comb[j][k] X_j`.
//!
//! The head's reduction (`hc_head`) is the `pre` part alone, with its own `fn`, `base` and one
//! scale.

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::model::Loader;
use crate::weights::{Matrix, Storage};

/// Shared numeric settings of every mHC.
#[derive(Clone, Copy, Debug)]
pub struct HcDims {
    /// Copies M.
    pub m: usize,
    /// Hidden size D.
    pub d: usize,
    /// Sinkhorn iterations.
    pub iters: usize,
    /// Epsilon inside mHC.
    pub hc_eps: f32,
    /// Epsilon of the stream's RMS.
    pub norm_eps: f32,
}

/// mHC parameters around one sublayer.
pub struct HyperConn<D: Device> {
    /// Sizes and epsilons.
    pub dims: HcDims,
    /// `(2+M)M x MD`, F32.
    pub fn_: D::Weight,
    /// `(2+M)M` biases.
    pub base: D::Vector,
    /// The three scales `s0, s1, s2`.
    pub scale: D::Vector,
}

impl<D: Device> HyperConn<D> {
    /// Loads `{prefix}_fn`, `{prefix}_base`, `{prefix}_scale` (e.g. `layers.0.hc_attn`).
    pub fn load(l: &mut Loader<D>, prefix: &str, dims: HcDims) -> Result<Self> {
        let n = (2 + dims.m) * dims.m;
        Ok(HyperConn {
            dims,
            fn_: param_matrix(l, &format!("{prefix}_fn"), n, dims.m * dims.d)?,
            base: l.vector(&format!("{prefix}_base"), &[n])?,
            scale: l.vector(&format!("{prefix}_scale"), &[3])?,
        })
    }
}

/// A sublayer's output not yet mixed into the stream: `X'_k = post_k a + sum_j comb[j][k] X_j`
/// waits for whatever reads the stream next, so that the next sublayer's pre step can mix it
/// in as it reads the stream ([`Device::hc_post_pre_norm`]: one pass over the stream where two
/// were).
pub struct Residual<'h, D: Device> {
    /// The mHC of the sublayer that made it.
    pub hc: &'h HyperConn<D>,
    /// The sublayer's output, or the first of two added (the MoE's routed and shared experts).
    pub a: D::Tensor,
    /// The second of two added.
    pub b: Option<D::Tensor>,
    /// The weights of the sublayer's pre step.
    pub mix: D::Mix,
}

impl<D: Device> Residual<'_, D> {
    /// Mixes it into the stream `x` now ([`Device::hc_post`]).
    pub fn apply(self, dev: &D, x: &mut D::Tensor) -> Result<()> {
        match self.b {
            Some(b) => dev.hc_post_sum(self.hc, x, self.a, &b, &self.mix),
            None => dev.hc_post(self.hc, x, &self.a, &self.mix),
        }
    }
}

/// The final reduction of the stream before the head: `y = sum_j pre_j X_j`.
pub struct HcHead<D: Device> {
    /// Sizes and epsilons.
    pub dims: HcDims,
    /// `M x MD`, F32.
    pub fn_: D::Weight,
    /// `M` biases.
    pub base: D::Vector,
    /// The one scale.
    pub scale: f32,
}

impl<D: Device> HcHead<D> {
    /// Loads `{prefix}hc_head_fn`, `_base`, `_scale` (prefix `""` or `mtp.0.`).
    pub fn load(l: &mut Loader<D>, prefix: &str, dims: HcDims) -> Result<Self> {
        Ok(HcHead {
            dims,
            fn_: param_matrix(l, &format!("{prefix}hc_head_fn"), dims.m, dims.m * dims.d)?,
            base: l.vector(&format!("{prefix}hc_head_base"), &[dims.m])?,
            scale: l.host(&format!("{prefix}hc_head_scale"), &[1])?[0],
        })
    }
}

/// mHC parameters, stored as plain F32 tensors without a `.weight` suffix.
fn param_matrix<D: Device>(
    l: &mut Loader<D>,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<D::Weight> {
    let t = l.ck.take(name)?;
    t.expect_shape(&[rows, cols])?;
    let storage = match t.dtype {
        safetensors::Dtype::F32 => Storage::F32(t.data),
        safetensors::Dtype::BF16 => Storage::Bf16(t.data),
        other => {
            return Err(Error::Checkpoint(format!(
                "tensor {name}: dtype {other:?}, expected F32"
            )))
        }
    };
    l.put(Matrix {
        rows,
        cols,
        storage,
    })
}
