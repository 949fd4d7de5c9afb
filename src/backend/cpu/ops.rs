//! Small element-wise and row-wise operations, in f32 and in the reference's order of operations.

use super::order::{aten_sum, aten_sum_of, dot_in, weighted_rows, Order};

/// `x * rsqrt(mean(x^2) + eps) * w`, in place.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let r = rms_scale(x, eps);
    for (v, w) in x.iter_mut().zip(w) {
        *v = w * (*v * r);
    }
}

/// `rsqrt(mean(x^2) + eps)`, the mean summed in the reference's order ([`aten_sum_of`]).
#[inline]
pub fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let var = aten_sum_of(x, |v| v * v) / x.len() as f32;
    1.0 / (var + eps).sqrt()
}

/// SLEEF's `expf_u10` (max error 1 ulp), the exponential of the reference's vectorized sigmoid
/// and SiLU. The constants are SLEEF's.
#[inline]
#[allow(clippy::excessive_precision)]
pub fn sleef_expf(d: f32) -> f32 {
    const R_LN2: f32 = std::f32::consts::LOG2_E;
    const L2U: f32 = 0.693_145_751_953_125;
    const L2L: f32 = 1.428_606_765_330_187e-6;
    let q = (d * R_LN2).round_ties_even();
    let s = q.mul_add(-L2U, d);
    let s = q.mul_add(-L2L, s);
    let mut u = 0.000_198_527_62_f32;
    for c in [
        0.001_393_043_6,
        0.008_333_361,
        0.041_666_485,
        0.166_666_67,
        0.5,
    ] {
        u = u.mul_add(s, c);
    }
    let u = 1.0 + (s * s).mul_add(u, s);
    let q = q as i32;
    let u = u * pow2(q >> 1) * pow2(q - (q >> 1));
    if d < -104.0 {
        0.0
    } else if d > 104.0 {
        f32::INFINITY
    } else {
        u
    }
}

/// `2^e` for `e` in the normal range.
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e.clamp(-126, 127) + 127) as u32) << 23)
}

/// Logistic sigmoid, as the reference's scalar path computes it (libm `expf`).
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Logistic sigmoid as the reference's vectorized kernel computes it (with [`sleef_expf`]). That
/// kernel leaves the last `len % 32` elements of a tensor to libm; hadal takes the vector path for
/// every element so that a token's bits do not depend on the batch around it.
#[inline]
pub fn sigmoid_vec(x: f32) -> f32 {
    1.0 / (1.0 + sleef_expf(-x))
}

/// `x * sigmoid(x)`, as the reference's vectorized SiLU: `x / (1 + exp(-x))`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + sleef_expf(-x))
}

/// PyTorch's softplus (linear above 20).
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Softmax in place.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

/// One head's attention over `keys` (which double as values) with a sink: `softmax` over the
/// scores `q . k * scale` and the sink logit, the sink carrying no value. The scores are summed
/// in `order` (the reference's for a product with as many rows as the model has heads), the
/// exponentials rounded from f64 (the reference's vector math library is within an ulp), their
/// sum as ATen sums a row, the weighted values as one chain per output.
pub fn sink_attention<'a>(
    q: &[f32],
    keys: impl Iterator<Item = &'a [f32]> + Clone,
    sink: f32,
    scale: f32,
    order: Order,
    out: &mut [f32],
) {
    let mut sc: Vec<f32> = keys.clone().map(|k| dot_in(order, q, k) * scale).collect();
    let mx = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let exp = |x: f32| (x as f64).exp() as f32;
    sc.iter_mut().for_each(|v| *v = exp(*v - mx));
    let denom = aten_sum(&sc) + exp(sink - mx);
    sc.iter_mut().for_each(|v| *v /= denom);
    weighted_rows(&sc, keys, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_attention_matches_softmax_with_an_empty_key() {
        let q = [0.5f32, -1.0, 2.0, 0.25];
        let keys = [
            [1.0f32, 0.0, 0.5, -1.0],
            [0.0, 2.0, -0.5, 1.0],
            [0.3, 0.3, 0.3, 0.3],
        ];
        let sink = 0.7f32;
        let mut out = [0f32; 4];
        sink_attention(
            &q,
            keys.iter().map(|k| &k[..]),
            sink,
            0.5,
            Order::Chain,
            &mut out,
        );
        let logits: Vec<f64> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() * 0.5)
            .collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum::<f64>() + (sink as f64).exp();
        for d in 0..4 {
            let want: f64 = logits
                .iter()
                .zip(&keys)
                .map(|(l, k)| l.exp() / z * k[d] as f64)
                .sum();
            assert!(
                (out[d] as f64 - want).abs() < 1e-6,
                "dim {d}: {} vs {want}",
                out[d]
            );
        }
        // A very negative sink vanishes; a very large one absorbs all the mass.
        sink_attention(
            &q,
            keys.iter().map(|k| &k[..]),
            80.0,
            0.5,
            Order::Lanes16,
            &mut out,
        );
        assert!(out.iter().all(|v| v.abs() < 1e-20));
    }

    #[test]
    fn sleef_expf_is_within_an_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (sleef_expf(x), (x as f64).exp());
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (got as f64 - want).abs() <= ulp as f64,
                "exp({x}) = {got}, not {want}"
            );
            x += 0.37;
        }
        assert_eq!(sleef_expf(0.0), 1.0);
        assert_eq!(sleef_expf(-200.0), 0.0);
        assert_eq!(sleef_expf(200.0), f32::INFINITY);
    }

    #[test]
    fn softplus_matches_torch_threshold() {
        assert_eq!(softplus(25.0), 25.0);
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
    }

    #[test]
    fn rms_norm_normalizes() {
        let mut x = [3.0, 4.0];
        rms_norm(&mut x, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
    }
}
