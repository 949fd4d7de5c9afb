//! Manifold-constrained hyper-connections: the residual stream is M copies of the hidden state,
//! mixed around each sublayer by weights computed from the stream itself.
//!
//! `mix = (fn @ x) * rsqrt(mean(x^2) + eps)` over the flattened stream; `pre` (sigmoid) reduces the
//! copies to the sublayer input, `post` (2 sigmoid) spreads the sublayer output back, and `comb`
//! (Sinkhorn-normalized towards doubly stochastic) mixes the copies.

use crate::backend::cpu::order::aten_sum;
use crate::backend::cpu::{linear_plain, ops::rms_scale, ops::sigmoid_vec, ops::softmax, Numerics};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::weights::Matrix;

/// The mixing weights of one sublayer for a batch of tokens.
pub struct Mix {
    /// `T x M`.
    pub post: Vec<f32>,
    /// `T x M x M`, `comb[j][k]` takes copy j into copy k.
    pub comb: Vec<f32>,
}

/// mHC parameters around one sublayer.
pub struct HyperConn {
    m: usize,
    d: usize,
    fn_: Matrix,
    base: Vec<f32>,
    scale: Vec<f32>,
    iters: usize,
    hc_eps: f32,
    norm_eps: f32,
}

/// Shared numeric settings of every mHC.
#[derive(Clone, Copy)]
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

/// `mixes = (fn @ x) * rsqrt(mean(x^2) + eps)` for each token of a `T x M x D` stream.
fn mixes(fn_: &Matrix, x: &[f32], md: usize, eps: f32, num: Numerics) -> Vec<f32> {
    let mut mix = linear_plain(fn_, x, num);
    let n = fn_.rows;
    for (row, xs) in mix.chunks_mut(n).zip(x.chunks(md)) {
        let r = rms_scale(xs, eps);
        row.iter_mut().for_each(|v| *v *= r);
    }
    mix
}

/// `sum_j pre_j X_j` for one token.
fn reduce(pre: &[f32], x: &[f32], d: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (j, &p) in pre.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&x[j * d..(j + 1) * d]) {
            *o += p * v;
        }
    }
}

impl HyperConn {
    /// Loads `{prefix}_fn`, `{prefix}_base`, `{prefix}_scale` (e.g. `layers.0.hc_attn`).
    pub fn load(ck: &mut Checkpoint, prefix: &str, dims: HcDims) -> Result<Self> {
        let (m, d) = (dims.m, dims.d);
        let mix = (2 + m) * m;
        Ok(HyperConn {
            m,
            d,
            fn_: load_param_matrix(ck, &format!("{prefix}_fn"), mix, m * d)?,
            base: ck.take_f32(&format!("{prefix}_base"), &[mix])?,
            scale: ck.take_f32(&format!("{prefix}_scale"), &[3])?,
            iters: dims.iters,
            hc_eps: dims.hc_eps,
            norm_eps: dims.norm_eps,
        })
    }

    /// Reduces the `T x M x D` stream to the `T x D` sublayer input (before its RMSNorm) and
    /// returns the weights that [`HyperConn::post`] needs.
    pub fn pre(&self, x: &[f32], num: Numerics) -> (Vec<f32>, Mix) {
        let (m, d) = (self.m, self.d);
        let t = x.len() / (m * d);
        let mix = mixes(&self.fn_, x, m * d, self.norm_eps, num);
        let n = (2 + m) * m;
        let mut y = vec![0f32; t * d];
        let mut post = vec![0f32; t * m];
        let mut comb = vec![0f32; t * m * m];
        let (b, s) = (&self.base, &self.scale);
        for i in 0..t {
            let mx = &mix[i * n..(i + 1) * n];
            let pre: Vec<f32> = (0..m)
                .map(|j| sigmoid_vec(mx[j] * s[0] + b[j]) + self.hc_eps)
                .collect();
            for j in 0..m {
                post[i * m + j] = 2.0 * sigmoid_vec(mx[m + j] * s[1] + b[m + j]);
            }
            let c = &mut comb[i * m * m..(i + 1) * m * m];
            for (k, v) in c.iter_mut().enumerate() {
                *v = mx[2 * m + k] * s[2] + b[2 * m + k];
            }
            sinkhorn(c, m, self.iters, self.hc_eps);
            reduce(
                &pre,
                &x[i * m * d..(i + 1) * m * d],
                d,
                &mut y[i * d..(i + 1) * d],
            );
        }
        (y, Mix { post, comb })
    }

    /// `X'_k = post_k * a + sum_j comb[j][k] X_j`, in place on the stream.
    pub fn post(&self, x: &mut [f32], a: &[f32], mix: &Mix) {
        let (m, d) = (self.m, self.d);
        let mut acc = vec![0f32; m * d];
        for (i, xs) in x.chunks_mut(m * d).enumerate() {
            let c = &mix.comb[i * m * m..(i + 1) * m * m];
            acc.fill(0.0);
            for k in 0..m {
                let out = &mut acc[k * d..(k + 1) * d];
                for j in 0..m {
                    let w = c[j * m + k];
                    for (o, v) in out.iter_mut().zip(&xs[j * d..(j + 1) * d]) {
                        *o += w * v;
                    }
                }
            }
            let av = &a[i * d..(i + 1) * d];
            for k in 0..m {
                let p = mix.post[i * m + k];
                for ((o, s), v) in xs[k * d..(k + 1) * d]
                    .iter_mut()
                    .zip(&acc[k * d..(k + 1) * d])
                    .zip(av)
                {
                    *o = p * v + s;
                }
            }
        }
    }
}

/// mHC parameters, stored as plain F32 tensors without a `.weight` suffix.
fn load_param_matrix(ck: &mut Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
    let t = ck.take(name)?;
    t.expect_shape(&[rows, cols])?;
    let storage = match t.dtype {
        safetensors::Dtype::F32 => crate::weights::Storage::F32(t.data),
        safetensors::Dtype::BF16 => crate::weights::Storage::Bf16(t.data),
        other => {
            return Err(crate::error::Error::Checkpoint(format!(
                "tensor {name}: dtype {other:?}, expected F32"
            )))
        }
    };
    Ok(Matrix {
        rows,
        cols,
        storage,
    })
}

/// Row softmax plus eps, then alternate column and row normalization, as the reference.
pub fn sinkhorn(c: &mut [f32], m: usize, iters: usize, eps: f32) {
    for row in c.chunks_mut(m) {
        softmax(row);
        row.iter_mut().for_each(|v| *v += eps);
    }
    let cols = |c: &mut [f32]| {
        for k in 0..m {
            let s = (1..m).fold(c[k], |a, j| a + c[j * m + k]);
            for j in 0..m {
                c[j * m + k] /= s + eps;
            }
        }
    };
    cols(c);
    for _ in 1..iters {
        for row in c.chunks_mut(m) {
            let s = aten_sum(row);
            row.iter_mut().for_each(|v| *v /= s + eps);
        }
        cols(c);
    }
}

/// The final reduction of the stream before the head: `y = sum_j pre_j X_j`.
pub struct HcHead {
    m: usize,
    d: usize,
    fn_: Matrix,
    base: Vec<f32>,
    scale: f32,
    hc_eps: f32,
    norm_eps: f32,
}

impl HcHead {
    /// Loads `{prefix}hc_head_fn`, `_base`, `_scale` (prefix `""` or `mtp.0.`).
    pub fn load(ck: &mut Checkpoint, prefix: &str, dims: HcDims) -> Result<Self> {
        let (m, d) = (dims.m, dims.d);
        Ok(HcHead {
            m,
            d,
            fn_: load_param_matrix(ck, &format!("{prefix}hc_head_fn"), m, m * d)?,
            base: ck.take_f32(&format!("{prefix}hc_head_base"), &[m])?,
            scale: ck.take_f32(&format!("{prefix}hc_head_scale"), &[1])?[0],
            hc_eps: dims.hc_eps,
            norm_eps: dims.norm_eps,
        })
    }

    /// Reduces a `T x M x D` stream to `T x D`.
    pub fn forward(&self, x: &[f32], num: Numerics) -> Vec<f32> {
        let (m, d) = (self.m, self.d);
        let mix = mixes(&self.fn_, x, m * d, self.norm_eps, num);
        let t = x.len() / (m * d);
        let mut y = vec![0f32; t * d];
        for i in 0..t {
            let pre: Vec<f32> = (0..m)
                .map(|j| sigmoid_vec(mix[i * m + j] * self.scale + self.base[j]) + self.hc_eps)
                .collect();
            reduce(
                &pre,
                &x[i * m * d..(i + 1) * m * d],
                d,
                &mut y[i * d..(i + 1) * d],
            );
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_is_nearly_doubly_stochastic() {
        let mut c: Vec<f32> = (0..16).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        sinkhorn(&mut c, 4, 20, 1e-6);
        for j in 0..4 {
            let row: f32 = c[j * 4..j * 4 + 4].iter().sum();
            let col: f32 = (0..4).map(|k| c[k * 4 + j]).sum();
            assert!((row - 1.0).abs() < 1e-3, "row {j}: {row}");
            assert!((col - 1.0).abs() < 1e-5, "col {j}: {col}");
        }
        assert!(c.iter().all(|&v| v > 0.0));
    }
}
