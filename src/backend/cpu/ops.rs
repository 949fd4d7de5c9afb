//! Small element-wise and row-wise operations, in f32 and in the reference's order of operations.

use super::order::{aten_sum, aten_sum_of, weighted_rows};

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

/// SLEEF's `log1pf_u10` (its AVX-512 variant), the `log1p` of ATen's vectorized softplus: a
/// double-float evaluation whose every step is reproduced here. The constants are SLEEF's.
#[allow(clippy::excessive_precision)]
pub fn sleef_log1pf(d: f32) -> f32 {
    const L2U: f32 = 0.693_147_182_464_599_609_38;
    const L2L: f32 = -1.904_654_323_148_236_017e-9;
    if d.is_nan() || d < -1.0 {
        return f32::NAN;
    }
    if d == -1.0 {
        return f32::NEG_INFINITY;
    }
    if d > 1.0e38 {
        return d.ln();
    }
    if d == 0.0 {
        return d; // keeps the sign of zero
    }
    let dp1 = d + 1.0;
    // vgetexp: the unbiased exponent, as a float (subnormals normalized first).
    let y = dp1 * (1.0 / 0.75);
    let e = if y < f32::MIN_POSITIVE {
        ((y * pow2(64)).to_bits() >> 23 & 0xff) as i32 - 127 - 64
    } else {
        (y.to_bits() >> 23 & 0xff) as i32 - 127
    };
    let t = pow2(-e);
    let m = d.mul_add(t, t - 1.0);
    let ef = e as f32;
    let sx = L2U * ef;
    let sy = L2L.mul_add(ef, L2U.mul_add(ef, -sx));
    // x = m / (2 + m) in double-float.
    let dx = 2.0 + m;
    let dy = (2.0 - dx) + m;
    let rt = 1.0 / dx;
    let qs = m * rt;
    let u = rt.mul_add(m, -qs);
    let v = (-dy).mul_add(rt, (-dx).mul_add(rt, 1.0));
    let (xx, xy) = (qs, qs.mul_add(v, u));
    let x2 = xx * xx;
    let p = 0.302_729_487_4_f32
        .mul_add(x2, 0.399_610_817_4)
        .mul_add(x2, 0.666_669_488_0);
    let (ax, ay) = (xx * 2.0, xy * 2.0);
    let s1 = sx + ax;
    let s1y = (((sx - s1) + ax) + sy) + ay;
    let w = (x2 * xx) * p;
    let s2 = s1 + w;
    let s2y = ((s1 - s2) + w) + s1y;
    s2 + s2y
}

/// PyTorch's softplus (linear above 20) on its vector path: SLEEF's `expf` then `log1pf`.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        sleef_log1pf(sleef_expf(x))
    }
}

/// Softmax of a contiguous row in place, as ATen's last-dimension kernel on an AVX-512 CPU:
/// SLEEF's `expf`, the exponentials summed in 16 lanes (in order below 16 elements) and folded
/// pairwise, then multiplied by the sum's reciprocal.
pub fn softmax(x: &mut [f32]) {
    const V: usize = 16;
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    x.iter_mut().for_each(|v| *v = sleef_expf(*v - m));
    let sum = if x.len() < V {
        x.iter().skip(1).fold(x[0], |a, &b| a + b)
    } else {
        let mut lanes: [f32; V] = x[..V].try_into().expect("16 lanes");
        for chunk in x[V..].chunks(V) {
            lanes.iter_mut().zip(chunk).for_each(|(l, v)| *l += v);
        }
        let mut w = V / 2;
        while w > 0 {
            for i in 0..w {
                lanes[i] += lanes[i + w];
            }
            w /= 2;
        }
        lanes[0]
    };
    let r = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= r);
}

/// Softmax over a dimension that is not the last one, as ATen's kernel for that case: SLEEF's
/// `expf`, the exponentials summed in order, each divided by the sum.
pub fn softmax_strided(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = sleef_expf(*v - m);
        s += *v;
    }
    x.iter_mut().for_each(|v| *v /= s);
}

/// Where the keys of an attention row sit in the reference's index row: the first `window`
/// keys, then `window_pad` empty slots, then the rest, then `tail_pad` empty slots. Empty slots
/// score `-inf`; their zero exponentials still take places in the sum of the row.
#[derive(Clone, Copy, Debug, Default)]
pub struct RowLayout {
    /// Keys before the first gap.
    pub window: usize,
    /// Empty slots after them.
    pub window_pad: usize,
    /// Empty slots at the end.
    pub tail_pad: usize,
}

/// One head's attention over `keys` (which double as values) with a sink, from its scores
/// `sc` (`q . k * scale` in the keys' order, summed in the reference's order for a product with
/// as many rows as the model has heads): `softmax` over them and the sink logit, the sink
/// carrying no value, the exponentials rounded from f64 (the reference's vector math library
/// is within an ulp), their sum as ATen sums the row laid out by `layout`, the weighted values
/// as one chain per output.
pub fn sink_attention<'a>(
    mut sc: Vec<f32>,
    keys: impl Iterator<Item = &'a [f32]>,
    sink: f32,
    layout: RowLayout,
    out: &mut [f32],
) {
    let mx = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let exp = |x: f32| (x as f64).exp() as f32;
    sc.iter_mut().for_each(|v| *v = exp(*v - mx));
    let sum = if layout.window_pad + layout.tail_pad == 0 {
        aten_sum(&sc)
    } else {
        let w = layout.window.min(sc.len());
        let row: Vec<f32> = (sc[..w].iter().copied())
            .chain(std::iter::repeat_n(0.0, layout.window_pad))
            .chain(sc[w..].iter().copied())
            .chain(std::iter::repeat_n(0.0, layout.tail_pad))
            .collect();
        aten_sum(&row)
    };
    let denom = sum + exp(sink - mx);
    sc.iter_mut().for_each(|v| *v /= denom);
    weighted_rows(&sc, keys, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::order::{dot_in, Order};

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
        let scores = |order| keys.iter().map(|k| dot_in(order, &q, k) * 0.5).collect();
        sink_attention(
            scores(Order::Chain),
            keys.iter().map(|k| &k[..]),
            sink,
            // Empty slots change only the order of the sum.
            RowLayout {
                window: 2,
                window_pad: 3,
                tail_pad: 1,
            },
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
            scores(Order::Lanes16),
            keys.iter().map(|k| &k[..]),
            80.0,
            RowLayout::default(),
            &mut out,
        );
        assert!(out.iter().all(|v| v.abs() < 1e-20));
    }

    /// `got` is within one f32 ulp of the exact `want`.
    fn assert_within_an_ulp(what: &str, x: f32, got: f32, want: f64) {
        let ulp = (want as f32).abs() * f32::EPSILON;
        assert!(
            (got as f64 - want).abs() <= ulp as f64,
            "{what}({x}) = {got}, not {want}"
        );
    }

    #[test]
    fn sleef_expf_is_within_an_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            assert_within_an_ulp("exp", x, sleef_expf(x), (x as f64).exp());
            x += 0.37;
        }
        assert_eq!(sleef_expf(0.0), 1.0);
        assert_eq!(sleef_expf(-200.0), 0.0);
        assert_eq!(sleef_expf(200.0), f32::INFINITY);
    }

    #[test]
    fn sleef_log1pf_is_within_an_ulp() {
        let mut x = -0.999f32;
        while x < 1.0e6 {
            assert_within_an_ulp("log1p", x, sleef_log1pf(x), (x as f64).ln_1p());
            x = if x < 1.0 { x + 0.0137 } else { x * 1.7 };
        }
        assert_eq!(sleef_log1pf(-1.0), f32::NEG_INFINITY);
        assert!(sleef_log1pf(-2.0).is_nan());
        assert_eq!(sleef_log1pf(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(sleef_log1pf(3.0e38), 3.0e38f32.ln());
    }

    #[test]
    fn softmaxes_sum_to_one() {
        for n in [1usize, 4, 15, 16, 37, 256] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 23) as f32 * 0.3 - 2.0)
                .collect();
            for f in [softmax, softmax_strided] {
                let mut y = x.clone();
                f(&mut y);
                let s: f64 = y.iter().map(|&v| v as f64).sum();
                assert!((s - 1.0).abs() < 1e-6, "n = {n}: sum {s}");
                let want = |i: usize| {
                    let z: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
                    (x[i] as f64).exp() / z
                };
                assert!((0..n).all(|i| (y[i] as f64 - want(i)).abs() < 1e-6));
            }
        }
        // Equal scores: the lane fold of 20 exponentials of 0 is exact.
        let mut y = [3.5f32; 20];
        softmax(&mut y);
        assert!(y.iter().all(|&v| v == 1.0 / 20.0f32));
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
