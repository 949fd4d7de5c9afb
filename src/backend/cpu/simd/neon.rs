//! The kernels' lanes on NEON (every aarch64 CPU): eight lanes as two 128-bit vectors, so
//! that the sixteen-lane sums take two of them as AVX2's take two 256-bit ones, in the same
//! order.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{rows16, tile, Lanes};
use crate::weights::Matrix;

pub struct Neon;

/// Lanes 0-3 and 4-7.
#[derive(Clone, Copy)]
pub struct V8(float32x4_t, float32x4_t);

/// The upper halves of e2m1's sixteen values as f32 bits (their lower halves are zero), low
/// and high byte: 0, 0.5, 1, 1.5, 2, 3, 4, 6, then the same negated.
const E2M1_LO: [u8; 16] = [
    0x00, 0x00, 0x80, 0xc0, 0x00, 0x40, 0x80, 0xc0, 0x00, 0x00, 0x80, 0xc0, 0x00, 0x40, 0x80, 0xc0,
];
const E2M1_HI: [u8; 16] = [
    0x00, 0x3f, 0x3f, 0x3f, 0x40, 0x40, 0x40, 0x40, 0x80, 0xbf, 0xbf, 0xbf, 0xc0, 0xc0, 0xc0, 0xc0,
];

/// What [`e4m3x4`] gives a code's value over: 2^120.
const E4M3_UNIT: f32 = f32::from_bits(0x7B80_0000);

/// Four e4m3 codes (in 32-bit lanes) as f32, over [`E4M3_UNIT`]: each code's bits moved into an
/// f32's exponent and mantissa give its value times 2^-120 (subnormal codes land on f32
/// subnormals, which aarch64 keeps); the NaN codes become NaN.
#[inline(always)]
unsafe fn e4m3x4(c: uint32x4_t) -> float32x4_t {
    let mag = vandq_u32(c, vdupq_n_u32(0x7f));
    let sign = vandq_u32(c, vdupq_n_u32(0x80));
    let bits = vorrq_u32(vshlq_n_u32::<20>(mag), vshlq_n_u32::<24>(sign));
    let nan = vceqq_u32(mag, vdupq_n_u32(0x7f));
    vbslq_f32(nan, vdupq_n_f32(f32::NAN), vreinterpretq_f32_u32(bits))
}

impl Lanes for Neon {
    const N: usize = 8;
    // Four outputs' sixteen lanes are 16 of the 32 vector registers: one activation row.
    const ROWS: usize = 1;
    type V = V8;
    #[inline(always)]
    unsafe fn zero() -> V8 {
        V8(vdupq_n_f32(0.0), vdupq_n_f32(0.0))
    }
    #[inline(always)]
    unsafe fn fma(x: f32, w: V8, acc: V8) -> V8 {
        V8(vfmaq_n_f32(acc.0, w.0, x), vfmaq_n_f32(acc.1, w.1, x))
    }
    #[inline(always)]
    unsafe fn fmav(x: V8, w: V8, acc: V8) -> V8 {
        V8(vfmaq_f32(acc.0, x.0, w.0), vfmaq_f32(acc.1, x.1, w.1))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> V8 {
        V8(vld1q_f32(p), vld1q_f32(p.add(4)))
    }
    #[inline(always)]
    unsafe fn join16(v: [V8; 2]) -> f32 {
        // Lanes l, l + 4, l + 8, l + 12 in order, then (q0 + q1) + (q2 + q3).
        let q = vaddq_f32(vaddq_f32(vaddq_f32(v[0].0, v[0].1), v[1].0), v[1].1);
        let p = vpaddq_f32(q, q);
        vgetq_lane_f32::<0>(p) + vgetq_lane_f32::<1>(p)
    }
    #[inline(always)]
    unsafe fn add(a: V8, b: V8) -> V8 {
        V8(vaddq_f32(a.0, b.0), vaddq_f32(a.1, b.1))
    }
    #[inline(always)]
    unsafe fn scale(v: V8, s: f32) -> V8 {
        V8(vmulq_n_f32(v.0, s), vmulq_n_f32(v.1, s))
    }
    #[inline(always)]
    unsafe fn f32s(p: *const u8) -> V8 {
        Self::load(p as *const f32)
    }
    #[inline(always)]
    unsafe fn bf16s(p: *const u8) -> V8 {
        let h = vld1q_u16(p as *const u16);
        V8(
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
        )
    }
    #[inline(always)]
    unsafe fn e4m3s(p: *const u8) -> V8 {
        // The multiplication by 2^120 is exact.
        let b = vmovl_u8(vld1_u8(p));
        let u = vdupq_n_f32(E4M3_UNIT);
        V8(
            vmulq_f32(e4m3x4(vmovl_u16(vget_low_u16(b))), u),
            vmulq_f32(e4m3x4(vmovl_high_u16(b)), u),
        )
    }
    const E4M3_UNIT: f32 = E4M3_UNIT;
    #[inline(always)]
    unsafe fn e4m3x16(p: *const u8) -> [V8; 2] {
        let b = vld1q_u8(p);
        let (lo, hi) = (vmovl_u8(vget_low_u8(b)), vmovl_high_u8(b));
        [
            V8(
                e4m3x4(vmovl_u16(vget_low_u16(lo))),
                e4m3x4(vmovl_high_u16(lo)),
            ),
            V8(
                e4m3x4(vmovl_u16(vget_low_u16(hi))),
                e4m3x4(vmovl_high_u16(hi)),
            ),
        ]
    }
    #[inline(always)]
    unsafe fn e2m1s(p: *const u8) -> V8 {
        // Each byte twice, then the low nibble of the first copy, the high of the second; the
        // nibbles index the two bytes of each value's upper half.
        let b = vcreate_u8((p as *const u32).read_unaligned() as u64);
        let d = vzip1_u8(b, b);
        let shift = vcreate_s8(0xfc00_fc00_fc00_fc00);
        let idx = vand_u8(vshl_u8(d, shift), vdup_n_u8(15));
        let lo = vqtbl1_u8(vld1q_u8(E2M1_LO.as_ptr()), idx);
        let hi = vqtbl1_u8(vld1q_u8(E2M1_HI.as_ptr()), idx);
        let h = vreinterpretq_u16_u8(vcombine_u8(vzip1_u8(lo, hi), vzip2_u8(lo, hi)));
        V8(
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
        )
    }
    #[inline(always)]
    unsafe fn transpose(v: &mut [V8]) {
        // Four 4 x 4 transposes: the lower rows' halves become the columns' lower halves.
        let t = |a: float32x4_t, b: float32x4_t, c: float32x4_t, d: float32x4_t| {
            let (ab0, ab1) = (vtrn1q_f32(a, b), vtrn2q_f32(a, b));
            let (cd0, cd1) = (vtrn1q_f32(c, d), vtrn2q_f32(c, d));
            let w = |x: float32x4_t| vreinterpretq_f64_f32(x);
            let f = |x: float64x2_t| vreinterpretq_f32_f64(x);
            [
                f(vtrn1q_f64(w(ab0), w(cd0))),
                f(vtrn1q_f64(w(ab1), w(cd1))),
                f(vtrn2q_f64(w(ab0), w(cd0))),
                f(vtrn2q_f64(w(ab1), w(cd1))),
            ]
        };
        let a = t(v[0].0, v[1].0, v[2].0, v[3].0);
        let b = t(v[4].0, v[5].0, v[6].0, v[7].0);
        let c = t(v[0].1, v[1].1, v[2].1, v[3].1);
        let d = t(v[4].1, v[5].1, v[6].1, v[7].1);
        for j in 0..4 {
            v[j] = V8(a[j], b[j]);
            v[4 + j] = V8(c[j], d[j]);
        }
    }
    #[inline(always)]
    unsafe fn store(v: V8, out: &mut [f32]) {
        vst1q_f32(out.as_mut_ptr(), v.0);
        vst1q_f32(out.as_mut_ptr().add(4), v.1);
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
    #[inline(always)]
    unsafe fn prefetch_l2(p: *const u8) {
        asm!("prfm pldl2keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
}

/// [`tile`] on NEON (every aarch64 CPU has it).
pub unsafe fn tile_neon(m: &Matrix, n0: usize, x: &[f32], rows: usize, out: &mut [f32]) {
    tile::<Neon>(m, n0, x, rows, out)
}

/// [`rows16`] on NEON.
pub unsafe fn rows16_neon(
    m: &Matrix,
    j0: usize,
    x: &[f32],
    xb: &[(f32, f32)],
    rows: usize,
    out: &mut [f32],
) {
    rows16::<Neon>(m, j0, x, xb, rows, out)
}

/// Every e4m3 code decoded by the NEON path (for the tests).
#[cfg(test)]
pub fn decode_all(bytes: &[u8; 256]) -> Vec<f32> {
    let mut all = Vec::new();
    let mut v = [0f32; 8];
    for c in bytes.chunks(8) {
        // SAFETY: 8 bytes are read.
        unsafe { Neon::store(Neon::e4m3s(c.as_ptr()), &mut v) };
        all.extend_from_slice(&v);
    }
    all
}
