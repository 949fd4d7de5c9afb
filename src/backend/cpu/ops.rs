//! Small element-wise and row-wise operations, in f32 and in the reference's order of operations.

/// `x * rsqrt(mean(x^2) + eps) * w`, in place.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let r = rms_scale(x, eps);
    for (v, w) in x.iter_mut().zip(w) {
        *v = w * (*v * r);
    }
}

/// `rsqrt(mean(x^2) + eps)`. The mean is accumulated in f64 and rounded once, which is what a
/// tree reduction in f32 (the reference's) approximates far better than a running f32 sum.
#[inline]
pub fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
    let var = (ss / x.len() as f64) as f32;
    1.0 / (var + eps).sqrt()
}

/// Logistic sigmoid.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
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
/// scores `q . k * scale` and the sink logit, the sink carrying no value.
pub fn sink_attention<'a>(
    q: &[f32],
    keys: impl Iterator<Item = &'a [f32]> + Clone,
    sink: f32,
    scale: f32,
    out: &mut [f32],
) {
    let mut sc: Vec<f32> = keys.clone().map(|k| super::dot(q, k) * scale).collect();
    let mx = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for v in sc.iter_mut() {
        *v = (*v - mx).exp();
        sum += *v;
    }
    let denom = sum + (sink - mx).exp();
    out.fill(0.0);
    for (e, k) in sc.iter().zip(keys) {
        let p = e / denom;
        for (o, v) in out.iter_mut().zip(k) {
            *o += p * v;
        }
    }
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
        sink_attention(&q, keys.iter().map(|k| &k[..]), sink, 0.5, &mut out);
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
        sink_attention(&q, keys.iter().map(|k| &k[..]), 80.0, 0.5, &mut out);
        assert!(out.iter().all(|v| v.abs() < 1e-20));
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
