//! mHC on the CPU: the mix products, Sinkhorn, and the reductions, in the reference's order.

use super::order::aten_sum;
use super::{linear_plain, ops::rms_scale, ops::sigmoid_vec, ops::softmax, Numerics};
use crate::model::mhc::{HcDims, HcHead, HyperConn};
use crate::weights::Matrix;

use super::Cpu;

/// The mixing weights of one sublayer for a batch of tokens.
pub struct Mix {
    /// `T x M`.
    pub post: Vec<f32>,
    /// `T x M x M`, `comb[j][k]` takes copy j into copy k.
    pub comb: Vec<f32>,
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

/// Reduces the `T x M x D` stream to the `T x D` sublayer input (before its RMSNorm) and
/// returns the weights that [`post`] needs.
pub fn pre(hc: &HyperConn<Cpu>, x: &[f32], num: Numerics) -> (Vec<f32>, Mix) {
    let HcDims {
        m,
        d,
        iters,
        hc_eps,
        norm_eps,
    } = hc.dims;
    let t = x.len() / (m * d);
    let mix = mixes(&hc.fn_, x, m * d, norm_eps, num);
    let n = (2 + m) * m;
    let mut y = vec![0f32; t * d];
    let mut post = vec![0f32; t * m];
    let mut comb = vec![0f32; t * m * m];
    let (b, s) = (&hc.base, &hc.scale);
    for i in 0..t {
        let mx = &mix[i * n..(i + 1) * n];
        let pre: Vec<f32> = (0..m)
            .map(|j| sigmoid_vec(mx[j] * s[0] + b[j]) + hc_eps)
            .collect();
        for j in 0..m {
            post[i * m + j] = 2.0 * sigmoid_vec(mx[m + j] * s[1] + b[m + j]);
        }
        let c = &mut comb[i * m * m..(i + 1) * m * m];
        for (k, v) in c.iter_mut().enumerate() {
            *v = mx[2 * m + k] * s[2] + b[2 * m + k];
        }
        sinkhorn(c, m, iters, hc_eps);
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
pub fn post(dims: HcDims, x: &mut [f32], a: &[f32], mix: &Mix) {
    let (m, d) = (dims.m, dims.d);
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

/// Reduces a `T x M x D` stream to `T x D` before the head.
pub fn head(h: &HcHead<Cpu>, x: &[f32], num: Numerics) -> Vec<f32> {
    let (m, d) = (h.dims.m, h.dims.d);
    let mix = mixes(&h.fn_, x, m * d, h.dims.norm_eps, num);
    let t = x.len() / (m * d);
    let mut y = vec![0f32; t * d];
    for i in 0..t {
        let pre: Vec<f32> = (0..m)
            .map(|j| sigmoid_vec(mix[i * m + j] * h.scale + h.base[j]) + h.dims.hc_eps)
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
