//! The number formats of V4 checkpoints and the rounding the reference applies to activations.
//!
//! * FP8 e4m3 (bias 7, max 448, subnormal step 2^-9), 128x128 weight blocks.
//! * FP4 e2m1 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6), packed two per byte, low nibble first, 1x32
//!   weight blocks.
//! * UE8M0 scales: a biased power-of-two exponent byte, `2^(u - 127)`.
//! * BF16: the top half of an f32.
//!
//! Rounding is to nearest, ties to even; activation scales are `2^ceil(log2(amax / max))`, so
//! dividing by a scale and multiplying back are exact and a quantize-dequantize round trip equals
//! the reference bit for bit.

use std::sync::LazyLock;

/// Largest finite e4m3 value.
pub const FP8_MAX: f32 = 448.0;
/// Largest e2m1 value.
pub const FP4_MAX: f32 = 6.0;
/// Activation block along the input dim of FP8/FP4 linears.
pub const ACT_BLOCK: usize = 128;
/// FP8 weight block (both dims).
pub const FP8_WEIGHT_BLOCK: usize = 128;
/// FP4 weight block (input dim).
pub const FP4_WEIGHT_BLOCK: usize = 32;
/// Block of the FP8 rounding of the non-RoPE KV dims.
pub const KV_FP8_BLOCK: usize = 64;
/// Block of the FP4 rounding of indexer queries and keys.
pub const INDEX_FP4_BLOCK: usize = 32;

/// Every e4m3 byte decoded (NaN for 0x7f/0xff).
pub static E4M3: LazyLock<[f32; 256]> = LazyLock::new(|| {
    let mut t = [0f32; 256];
    for (b, v) in t.iter_mut().enumerate() {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> 3) & 0xf) as i32;
        let m = (b & 7) as f32;
        *v = if e == 15 && b & 7 == 7 {
            f32::NAN
        } else if e == 0 {
            sign * m * pow2(-9)
        } else {
            sign * (1.0 + m / 8.0) * pow2(e - 7)
        };
    }
    t
});

/// The sixteen e2m1 codes decoded.
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// `2^k` for an exponent in the normal f32 range.
#[inline]
pub fn pow2(k: i32) -> f32 {
    debug_assert!((-126..=127).contains(&k));
    f32::from_bits(((k + 127) as u32) << 23)
}

/// Decodes a UE8M0 scale byte.
#[inline]
pub fn e8m0(u: u8) -> f32 {
    match u {
        0 => f32::from_bits(0x0040_0000), // 2^-127, subnormal
        255 => f32::NAN,
        u => f32::from_bits((u as u32) << 23),
    }
}

/// Encodes a power of two in the normal range as a UE8M0 byte.
#[inline]
pub fn e8m0_encode(scale: f32) -> u8 {
    (scale.to_bits() >> 23) as u8
}

/// Decodes a BF16 value given as two little-endian bytes.
#[inline]
pub fn bf16(lo: u8, hi: u8) -> f32 {
    f32::from_bits((u16::from_le_bytes([lo, hi]) as u32) << 16)
}

/// `floor(log2(|x|))` for a normal, non-zero f32.
#[inline]
fn exponent(x: f32) -> i32 {
    ((x.to_bits() >> 23) & 0xff) as i32 - 127
}

/// `2^ceil(log2(x))` for a positive normal f32, exactly as the reference's bit trick.
#[inline]
pub fn pow2_ceil(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127 + i32::from(bits & 0x7f_ffff != 0);
    pow2(e.clamp(-126, 127))
}

/// Rounds to the nearest e4m3 value, ties to even. `x` must already lie in `[-448, 448]`.
#[inline]
pub fn round_e4m3(x: f32) -> f32 {
    let a = x.abs();
    if a == 0.0 {
        return x;
    }
    // Below 2^-6 e4m3 is subnormal with a fixed step of 2^-9; above, 3 mantissa bits.
    let q = pow2(exponent(a).max(-6) - 3);
    (x / q).round_ties_even() * q
}

/// Rounds to the nearest e2m1 value, ties to even. `x` must already lie in `[-6, 6]`.
#[inline]
pub fn round_e2m1(x: f32) -> f32 {
    let a = x.abs();
    if a == 0.0 {
        return x;
    }
    // Below 1 e2m1 is subnormal with a step of 0.5; above, 1 mantissa bit.
    let q = pow2(exponent(a).max(0) - 1);
    (x / q).round_ties_even() * q
}

/// The e4m3 byte of a value that is exactly representable (the output of [`round_e4m3`]).
pub fn encode_e4m3(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    if a == 0.0 {
        return sign;
    }
    let e = exponent(a);
    if e < -6 {
        return sign | (a / pow2(-9)) as u8;
    }
    let m = ((a / pow2(e) - 1.0) * 8.0) as u8;
    sign | (((e + 7) as u8) << 3) | m
}

/// The e2m1 nibble of a value that is exactly representable (the output of [`round_e2m1`]).
pub fn encode_e2m1(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 8 } else { 0 };
    let code = E2M1[..8].iter().position(|&c| c == v.abs()).unwrap_or(7) as u8;
    sign | code
}

/// The power-of-two scale of an FP8 activation block.
#[inline]
pub fn fp8_scale(block: &[f32]) -> f32 {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
    pow2_ceil(amax / FP8_MAX)
}

/// The power-of-two scale of an FP4 activation block.
#[inline]
pub fn fp4_scale(block: &[f32]) -> f32 {
    let amax = block
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(FP4_MAX * pow2(-126));
    pow2_ceil(amax / FP4_MAX)
}

/// FP8-rounds `x` in place in blocks of `block` (quantize then dequantize).
pub fn fake_quant_fp8(x: &mut [f32], block: usize) {
    for b in x.chunks_mut(block) {
        let s = fp8_scale(b);
        for v in b {
            *v = round_e4m3((*v / s).clamp(-FP8_MAX, FP8_MAX)) * s;
        }
    }
}

/// FP4-rounds `x` in place in blocks of `block` (quantize then dequantize).
pub fn fake_quant_fp4(x: &mut [f32], block: usize) {
    for b in x.chunks_mut(block) {
        let s = fp4_scale(b);
        for v in b {
            *v = round_e2m1((*v / s).clamp(-FP4_MAX, FP4_MAX)) * s;
        }
    }
}

/// Activations quantized for an FP8/FP4 linear: e4m3 values (kept as f32, exact) and one
/// power-of-two scale per row and block of [`ACT_BLOCK`].
pub struct QuantAct {
    /// Rows (tokens).
    pub rows: usize,
    /// Input width.
    pub cols: usize,
    /// `rows x cols` e4m3 values.
    pub q: Vec<f32>,
    /// `rows x cols / ACT_BLOCK` scales.
    pub s: Vec<f32>,
}

impl QuantAct {
    /// Quantizes `rows x cols` activations (`cols` a multiple of [`ACT_BLOCK`]).
    pub fn new(x: &[f32], cols: usize) -> Self {
        debug_assert_eq!(cols % ACT_BLOCK, 0);
        let rows = x.len() / cols;
        let mut q = vec![0f32; x.len()];
        let mut s = Vec::with_capacity(x.len() / ACT_BLOCK);
        for (src, dst) in x.chunks(ACT_BLOCK).zip(q.chunks_mut(ACT_BLOCK)) {
            let sc = fp8_scale(src);
            for (d, v) in dst.iter_mut().zip(src) {
                *d = round_e4m3((v / sc).clamp(-FP8_MAX, FP8_MAX));
            }
            s.push(sc);
        }
        QuantAct { rows, cols, q, s }
    }
}

/// In-place normalized Walsh-Hadamard transform (`H x / sqrt(n)`, Sylvester order); `n` must be
/// a power of two.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = (n as f32).powf(-0.5);
    for v in x {
        *v *= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn e4m3_table_matches_format() {
        assert_eq!(E4M3[0x7e], 448.0);
        assert_eq!(E4M3[0x01], pow2(-9));
        assert_eq!(E4M3[0x08], pow2(-6));
        assert_eq!(E4M3[0x38], 1.0);
        assert_eq!(E4M3[0xb8], -1.0);
        assert!(E4M3[0x7f].is_nan());
        for b in 0..=255u8 {
            let v = E4M3[b as usize];
            if !v.is_nan() && v != 0.0 {
                assert_eq!(encode_e4m3(v), b, "byte {b:#x}");
                assert_eq!(round_e4m3(v), v);
            }
        }
    }

    #[test]
    fn rounding_ties_go_to_even() {
        // 1 + 1/16 lies halfway between 1 (even mantissa) and 1.125.
        assert_eq!(round_e4m3(1.0625), 1.0);
        assert_eq!(round_e4m3(1.1875), 1.25);
        assert_eq!(round_e4m3(pow2(-10)), 0.0);
        assert_eq!(round_e4m3(3.0 * pow2(-10)), pow2(-8));
        assert_eq!(round_e4m3(440.0), 448.0);
        assert_eq!(round_e2m1(0.25), 0.0);
        assert_eq!(round_e2m1(0.75), 1.0);
        assert_eq!(round_e2m1(1.25), 1.0);
        assert_eq!(round_e2m1(1.75), 2.0);
        assert_eq!(round_e2m1(2.5), 2.0);
        assert_eq!(round_e2m1(3.5), 4.0);
        assert_eq!(round_e2m1(5.0), 4.0);
        assert_eq!(round_e2m1(-5.5), -6.0);
    }

    #[test]
    fn scales_are_powers_of_two_and_saturate() {
        assert_eq!(pow2_ceil(1.0), 1.0);
        assert_eq!(pow2_ceil(1.5), 2.0);
        assert_eq!(pow2_ceil(0.3), 0.5);
        assert_eq!(fp8_scale(&[0.0; 4]), pow2_ceil(1e-4 / 448.0));
        assert_eq!(fp8_scale(&[448.0, -3.0]), 1.0);
        assert_eq!(fp4_scale(&[6.0, 1.0]), 1.0);
        assert_eq!(fp4_scale(&[-7.0]), 2.0);
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(120), pow2(-7));
        assert_eq!(e8m0_encode(pow2(-7)), 120);
    }

    #[test]
    fn hadamard_is_orthonormal() {
        let mut x = [1.0, 0.0, 0.0, 0.0];
        hadamard(&mut x);
        assert_eq!(x, [0.5; 4]);
        let mut y = [0.3, -1.2, 4.0, 0.5, 2.0, 1.0, -0.25, 0.0];
        let orig = y;
        hadamard(&mut y);
        hadamard(&mut y);
        for (a, b) in y.iter().zip(orig) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    proptest! {
        #[test]
        fn e4m3_rounding_is_nearest(x in -448f32..448f32) {
            let r = round_e4m3(x);
            let best = E4M3.iter().filter(|v| !v.is_nan())
                .map(|v| (v - x).abs()).fold(f32::INFINITY, f32::min);
            prop_assert!(((r - x).abs() - best).abs() <= f32::EPSILON * x.abs());
            prop_assert_eq!(E4M3[encode_e4m3(r) as usize], r);
        }

        #[test]
        fn e2m1_rounding_is_nearest(x in -6f32..6f32) {
            let r = round_e2m1(x);
            let best = E2M1.iter().map(|v| (v - x).abs()).fold(f32::INFINITY, f32::min);
            prop_assert_eq!((r - x).abs(), best);
            prop_assert_eq!(E2M1[encode_e2m1(r) as usize], r);
        }

        #[test]
        fn fake_quant_is_idempotent(v in proptest::collection::vec(-1e3f32..1e3, 128)) {
            let mut a = v.clone();
            fake_quant_fp8(&mut a, 64);
            let mut b = a.clone();
            fake_quant_fp8(&mut b, 64);
            prop_assert_eq!(&a, &b);
            let q = QuantAct::new(&v, 128);
            for (i, x) in a.iter().take(64).enumerate() {
                // Block 128 and block 64 scales differ, but each value is e4m3 times a scale.
                prop_assert!(x.is_finite());
                prop_assert!(q.q[i].abs() <= FP8_MAX);
            }
        }
    }
}
