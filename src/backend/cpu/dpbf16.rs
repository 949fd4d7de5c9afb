//! FP8 and FP4 products of FP8-rounded activations on AVX-512's BF16 dot product
//! (`VDPBF16PS`), with [`Order::Lanes16`](super::order::Order)'s bits.
//!
//! An FP8-rounded activation (an e4m3 value times a power of two) is exact in bf16, and so is
//! an e4m3 or e2m1 weight times its power-of-two scale; their product is exact in f32. The
//! instruction adds two such products into each f32 lane, the odd element's first, rounding
//! after each addition (`dot_adds_odd_then_even`). Fed the columns `l` (odd element) and
//! `l + 16` (even) of every 32 in lane `l`, it adds the sixteen-lane chain's products in the
//! chain's order: the bits of [`super::simd::product16`], for a fraction of its work a weight.
//! 64 e4m3 codes become bf16 by two 128-entry byte lookups (`VPERMI2B`), 32 e2m1 codes by one
//! word lookup (`VPERMW`), where the f32 kernel converts, scales and multiply-adds every 16.
//!
//! Scales join in the exponent: FP8's (one per 128 x 128 block, shared by a group of outputs)
//! is added to the activations' bf16 exponents, FP4's (one per 32 weights of a row) to the
//! lookup table's. The instruction treats subnormal inputs and sums as zero, which the f32
//! chain does not; a block whose scales could take a product or a partial sum below f32's
//! normal range (or an activation beyond it) is summed by the f32 multiply-adds instead, in the
//! same lanes, so every block keeps the chain's bits.

#[cfg(target_arch = "x86_64")]
use crate::quant::QuantAct;
#[cfg(target_arch = "x86_64")]
use crate::weights::{Matrix, Storage};

/// Whether this CPU has the instructions (AVX-512 BW, VBMI and BF16) and [`super::simd`] runs
/// on AVX-512 (`HADAL_CPU_SIMD=avx512` keeps the f32 kernels, to compare the two).
#[cfg(target_arch = "x86_64")]
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        super::simd::lanes() == 16
            && std::env::var("HADAL_CPU_SIMD").as_deref() != Ok("avx512")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    })
}

/// The `rows x range.len()` outputs (row-major) of the FP8-rounded activations `a` with the FP8
/// or FP4 weight rows `range` of `m`, summed as sixteen lanes; `None` where these kernels do
/// not take the product (see [`available`]; widths a multiple of 128).
#[cfg(target_arch = "x86_64")]
pub fn product(m: &Matrix, a: &QuantAct, range: std::ops::Range<usize>) -> Option<Vec<f32>> {
    use crate::quant::{ACT_BLOCK, FP4_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK};
    const _: () = assert!(ACT_BLOCK == 128 && FP8_WEIGHT_BLOCK == 128 && FP4_WEIGHT_BLOCK == 32);
    let k = m.cols;
    let fp = matches!(m.storage, Storage::F8 { .. } | Storage::F4 { .. });
    if !available() || !fp || !k.is_multiple_of(128) || a.cols != k || range.end > m.rows {
        return None;
    }
    let x = Acts::new(a)?;
    Some(super::simd::by_groups(a.rows, range.len(), k, |g, out| {
        let j0 = range.start + g * super::simd::GROUP;
        // SAFETY: `available()` saw the features the kernel is compiled for; `Acts` holds
        // `a.rows` rows of `k`, and `j0..` are rows of `m`.
        unsafe { x86::group(m, j0, &x, out) }
    }))
}

/// Stand-in where the instructions cannot exist.
#[cfg(not(target_arch = "x86_64"))]
pub fn product(
    _: &crate::weights::Matrix,
    _: &crate::quant::QuantAct,
    _: std::ops::Range<usize>,
) -> Option<Vec<f32>> {
    None
}

/// The column a lane's odd (`o = 1`) or even element of word `w` of a 32-column half takes:
/// lane `w`'s columns `w`, then `w + 16`.
#[cfg(target_arch = "x86_64")]
const fn column(e: usize) -> usize {
    if e % 2 == 1 {
        e / 2
    } else {
        16 + e / 2
    }
}

/// The activations of one product, ready for the kernels.
#[cfg(target_arch = "x86_64")]
struct Acts {
    rows: usize,
    k: usize,
    /// bf16 bits, each 32 columns in the lanes' element order ([`column`]).
    bf: Vec<u16>,
    /// The values in column order, for blocks summed by f32 multiply-adds.
    f: Vec<f32>,
    /// Per 128 columns, the largest activation scale's exponent over the rows.
    top: Vec<i32>,
    /// The smallest activation scale's exponent.
    bottom: i32,
    /// The FP4 scale bytes whose blocks fit (see [`fp4_block_fits`]), first and last.
    fp4_scales: (u8, u8),
}

#[cfg(target_arch = "x86_64")]
impl Acts {
    fn new(a: &QuantAct) -> Option<Self> {
        let (rows, k) = (a.rows, a.cols);
        let f: Vec<f32> =
            a.q.iter()
                .enumerate()
                .map(|(i, q)| q * a.s[i / 128])
                .collect();
        let mut bf = vec![0u16; f.len()];
        for (dst, src) in bf.chunks_exact_mut(32).zip(f.chunks_exact(32)) {
            for (e, d) in dst.iter_mut().enumerate() {
                let bits = src[column(e)].to_bits();
                // An e4m3 value times a power of two has no low bits; anything else (an
                // activation scale outside f32's normal range), and NaN or infinite values
                // (whose exponents a scale must not move), go to the f32 kernels.
                if bits & 0xffff != 0 || bits & 0x7f80_0000 == 0x7f80_0000 {
                    return None;
                }
                *d = (bits >> 16) as u16;
            }
        }
        let blocks = k / 128;
        let top = (0..blocks)
            .map(|b| {
                (0..rows)
                    .map(|r| exponent(a.s[r * blocks + b]))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let bottom = a.s.iter().map(|&s| exponent(s)).min().unwrap_or(0);
        let fitting = (0..=255u8).filter(|&b| fp4_block_fits(b as i32 - 127, bottom));
        let fp4_scales = (
            fitting.clone().min().unwrap_or(255),
            fitting.max().unwrap_or(0),
        );
        Some(Acts {
            rows,
            k,
            bf,
            f,
            top,
            bottom,
            fp4_scales,
        })
    }
}

/// The exponent of a power-of-two scale (below `-126` for zero or subnormal ones).
#[cfg(target_arch = "x86_64")]
fn exponent(s: f32) -> i32 {
    ((s.to_bits() >> 23) & 0xff) as i32 - 127
}

/// Whether an FP8 block of weight scale exponent `d` sums exactly on bf16, with activation
/// scales from `2^bottom` to `2^top`: every product a multiple of 2^-126 (an e4m3 value's last
/// bit is at least 2^-9, on both sides), so no partial sum is subnormal, and the scaled
/// activations (below 2^9 times their scales) finite.
#[cfg(target_arch = "x86_64")]
fn fp8_block_fits(d: i32, bottom: i32, top: i32) -> bool {
    bottom + d - 18 >= -126 && top + d + 9 <= 127
}

/// The same for an FP4 block (an e2m1 value's last bit is 2^-1; its largest, 6, scaled stays
/// finite).
#[cfg(target_arch = "x86_64")]
fn fp4_block_fits(d: i32, bottom: i32) -> bool {
    bottom + d - 10 >= -126 && d + 3 <= 127
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::simd::x86::Avx512;
    use super::super::simd::{Lanes, GROUP};
    use super::{column, fp8_block_fits, Acts};
    use crate::quant::{E2M1, E4M3};
    use crate::weights::{Matrix, Storage};

    /// Byte `p` of a 64-code chunk after the permutation: the code that lands, after the
    /// lookups' bytes are interleaved (`VPUNPCKL/HBW`, within 16-byte lanes), in the element of
    /// the two output vectors that [`column`] gives it.
    const fn fp8_order() -> [u8; 64] {
        let mut p = [0u8; 64];
        let mut e = 0;
        while e < 32 {
            let (lane, t) = (e / 8, e % 8);
            p[16 * lane + t] = column(e) as u8;
            p[16 * lane + 8 + t] = 32 + column(e) as u8;
            e += 1;
        }
        p
    }

    /// For each 16-bit element of an FP4 half (32 codes, 16 bytes): the byte holding its code
    /// (twice: the high copy is ignored), and the shift that brings the code to the low bits.
    const fn fp4_order(half: usize) -> ([u8; 64], [u16; 32]) {
        let (mut p, mut sh) = ([0u8; 64], [0u16; 32]);
        let mut e = 0;
        while e < 32 {
            let c = 32 * half + column(e);
            p[2 * e] = (c / 2) as u8;
            p[2 * e + 1] = (c / 2) as u8;
            sh[e] = 4 * (c % 2) as u16;
            e += 1;
        }
        (p, sh)
    }

    const FP8_ORDER: [u8; 64] = fp8_order();
    const FP4_LOW: ([u8; 64], [u16; 32]) = fp4_order(0);
    const FP4_HIGH: ([u8; 64], [u16; 32]) = fp4_order(1);

    /// `body` for each output `i` of the group below `g`, written out four times: the
    /// accumulators, indexed by constants, stay in registers (a loop LLVM left rolled kept them
    /// in memory).
    macro_rules! outputs {
        ($g:expr, $i:ident => $body:block) => {
            outputs!(@ $g, $i, $body, 0 1 2 3)
        };
        (@ $g:expr, $i:ident, $body:block, $($n:literal)*) => {
            $(if $n < $g {
                let $i: usize = $n;
                $body
            })*
        };
    }
    const _: () = assert!(GROUP == 4);

    /// What the kernels look codes up in.
    struct Tables {
        /// e4m3 magnitudes 0-127 as bf16: high bytes (two vectors of 64), then low bytes.
        hi: [__m512i; 2],
        lo: [__m512i; 2],
        order8: __m512i,
        /// e2m1 codes as bf16, twice (a lookup reads five index bits).
        e2m1: __m512i,
        order4: [__m512i; 2],
        shift4: __m512i,
    }

    /// The lookup tables' bytes: e4m3 magnitudes' bf16 high and low bytes, e2m1 codes' bf16.
    static RAW: std::sync::LazyLock<([u8; 128], [u8; 128], [u16; 32])> =
        std::sync::LazyLock::new(|| {
            let bf = |v: f32| (v.to_bits() >> 16) as u16;
            (
                std::array::from_fn(|m| (bf(E4M3[m]) >> 8) as u8),
                std::array::from_fn(|m| bf(E4M3[m]) as u8),
                std::array::from_fn(|i| bf(E2M1[i % 16])),
            )
        });

    impl Tables {
        #[inline(always)]
        unsafe fn new() -> Self {
            let (hi, lo, e2m1) = &*RAW;
            Tables {
                hi: [ld(hi.as_ptr()), ld(hi.as_ptr().add(64))],
                lo: [ld(lo.as_ptr()), ld(lo.as_ptr().add(64))],
                order8: ld(FP8_ORDER.as_ptr()),
                e2m1: ld(e2m1.as_ptr() as *const u8),
                order4: [ld(FP4_LOW.0.as_ptr()), ld(FP4_HIGH.0.as_ptr())],
                shift4: ld(FP4_LOW.1.as_ptr() as *const u8),
            }
        }

        /// 64 e4m3 codes from `p` as two vectors of bf16 in the lanes' element order.
        #[inline(always)]
        unsafe fn e4m3(&self, p: *const u8) -> (__m512bh, __m512bh) {
            let c = _mm512_permutexvar_epi8(self.order8, _mm512_loadu_si512(p as *const _));
            let hi = _mm512_permutex2var_epi8(self.hi[0], c, self.hi[1]);
            let lo = _mm512_permutex2var_epi8(self.lo[0], c, self.lo[1]);
            // The code's sign bit onto the high byte's: hi | (c & 0x80).
            let hi = _mm512_ternarylogic_epi32::<0xf8>(hi, c, _mm512_set1_epi8(-128));
            (
                bh(_mm512_unpacklo_epi8(lo, hi)),
                bh(_mm512_unpackhi_epi8(lo, hi)),
            )
        }

        /// The e2m1 table times 2^d (zeros stay zeros), for a block that fits.
        #[inline(always)]
        unsafe fn e2m1_scaled(&self, d: i32) -> __m512i {
            let up = _mm512_set1_epi16((d << 7) as i16);
            _mm512_mask_add_epi16(self.e2m1, 0xfefe_fefe, self.e2m1, up)
        }

        /// Half `h` (32 codes) of the 32 bytes at `v` as bf16 from `table`.
        #[inline(always)]
        unsafe fn e2m1(&self, v: __m512i, h: usize, table: __m512i) -> __m512bh {
            let b = _mm512_permutexvar_epi8(self.order4[h], v);
            bh(_mm512_permutexvar_epi16(
                _mm512_srlv_epi16(b, self.shift4),
                table,
            ))
        }
    }

    #[inline(always)]
    unsafe fn ld(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p as *const _)
    }

    #[inline(always)]
    unsafe fn bh(v: __m512i) -> __m512bh {
        std::mem::transmute(v)
    }

    /// Outputs `j0..` (as many as `out` holds rows for, up to [`GROUP`]) against every row of
    /// `x`, into `out[i * rows + r]`. A group with a block the bf16 sums do not take (see
    /// [`fp8_block_fits`]), or whose rows straddle two FP8 scale blocks, runs the f32 kernel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    pub unsafe fn group(m: &Matrix, j0: usize, x: &Acts, out: &mut [f32]) {
        let (rows, k) = (x.rows, x.k);
        let g = out.len() / rows;
        let fits = match &m.storage {
            Storage::F8 { s, .. } => {
                let kb = k / 128;
                let row = &s[(j0 / 128) * kb..][..kb];
                let mut fits = j0 / 128 == (j0 + g - 1) / 128;
                for (&b, &top) in row.iter().zip(&x.top) {
                    fits &= fp8_block_fits(b as i32 - 127, x.bottom, top);
                }
                fits
            }
            Storage::F4 { s, .. } => {
                // Every scale byte of the group's rows in the range that fits, 64 at a time.
                let (lo, hi) = x.fp4_scales;
                let (vlo, vhi) = (_mm512_set1_epi8(lo as i8), _mm512_set1_epi8(hi as i8));
                let chunks = s[j0 * (k / 32)..(j0 + g) * (k / 32)].chunks_exact(64);
                let rest = chunks.remainder();
                let mut out_of_range = 0u64;
                for c in chunks {
                    let v = ld(c.as_ptr());
                    out_of_range |= _mm512_cmplt_epu8_mask(v, vlo) | _mm512_cmpgt_epu8_mask(v, vhi);
                }
                out_of_range == 0 && rest.iter().all(|b| (lo..=hi).contains(b))
            }
            _ => false,
        };
        if !fits {
            return super::super::simd::x86::rows16_avx512(m, j0, &x.f, &[], rows, out);
        }
        for r0 in (0..rows).step_by(Avx512::ROWS) {
            let put = |i: usize, r: usize, y: f32| out[i * rows + r0 + r] = y;
            let xb = x.bf.as_ptr().add(r0 * k);
            match ((rows - r0).min(Avx512::ROWS), &m.storage) {
                (1, Storage::F8 { w, s }) => fp8::<1>(w, s, k, j0, g, xb, &x.top, put),
                (2, Storage::F8 { w, s }) => fp8::<2>(w, s, k, j0, g, xb, &x.top, put),
                (3, Storage::F8 { w, s }) => fp8::<3>(w, s, k, j0, g, xb, &x.top, put),
                (_, Storage::F8 { w, s }) => fp8::<4>(w, s, k, j0, g, xb, &x.top, put),
                (1, Storage::F4 { w, s }) => fp4::<1>(w, s, k, j0, g, xb, put),
                (2, Storage::F4 { w, s }) => fp4::<2>(w, s, k, j0, g, xb, put),
                (3, Storage::F4 { w, s }) => fp4::<3>(w, s, k, j0, g, xb, put),
                (_, Storage::F4 { w, s }) => fp4::<4>(w, s, k, j0, g, xb, put),
                _ => unreachable!("only FP8 and FP4 weights come here"),
            }
        }
    }

    /// Writes each accumulator's sixteen lanes joined as `Order::Lanes16` joins them.
    #[inline(always)]
    unsafe fn finish<const R: usize>(
        acc: [[__m512; GROUP]; R],
        g: usize,
        mut put: impl FnMut(usize, usize, f32),
    ) {
        for (r, a) in acc.iter().enumerate() {
            for (i, a) in a[..g].iter().enumerate() {
                put(i, r, Avx512::join16([*a, _mm512_setzero_ps()]));
            }
        }
    }

    /// [`group`]'s FP8 outputs for `R` activation rows (bf16, `k` apart from `x`).
    #[inline(always)]
    // Loops over constant ranges index the accumulators, so that they unroll into registers.
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    unsafe fn fp8<const R: usize>(
        w: &[u8],
        s: &[u8],
        k: usize,
        j0: usize,
        g: usize,
        x: *const u16,
        top: &[i32],
        put: impl FnMut(usize, usize, f32),
    ) {
        let t = Tables::new();
        let at = |i: usize, c: usize| w.as_ptr().wrapping_add((j0 + i) * k + c);
        let srow = s.as_ptr().add((j0 / 128) * (k / 128));
        // acc[r][i]: row r, output i; lane l sums columns l mod 16, as `Order::Lanes16`.
        let mut acc = [[_mm512_setzero_ps(); GROUP]; R];
        for b in 0..top.len() {
            // The block's activations times its scale: exponents moved, zeros kept.
            let up = _mm512_set1_epi16(((*srow.add(b) as i32 - 127) << 7) as i16);
            // (Loops, not closures: a closure would call the intrinsics out of line.)
            let mut xs = [[bh(_mm512_setzero_si512()); 4]; R];
            for r in 0..R {
                for v in 0..4 {
                    let a = _mm512_loadu_si512(x.add(r * k + 128 * b + 32 * v) as *const _);
                    let nz = _mm512_test_epi16_mask(a, _mm512_set1_epi16(0x7fff));
                    xs[r][v] = bh(_mm512_mask_add_epi16(a, nz, a, up));
                }
            }
            for h in 0..2 {
                let c = 128 * b + 64 * h;
                outputs!(g, i => {
                    // The next group's rows at the same place, into L2: the stream ahead.
                    Avx512::prefetch_l2(at(i + GROUP, c));
                    let (w0, w1) = t.e4m3(at(i, c));
                    for r in 0..R {
                        let a = _mm512_dpbf16_ps(acc[r][i], xs[r][2 * h], w0);
                        acc[r][i] = _mm512_dpbf16_ps(a, xs[r][2 * h + 1], w1);
                    }
                });
            }
        }
        finish(acc, g, put)
    }

    /// [`group`]'s FP4 outputs for `R` activation rows (bf16, `k` apart from `x`).
    #[inline(always)]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    unsafe fn fp4<const R: usize>(
        w: &[u8],
        s: &[u8],
        k: usize,
        j0: usize,
        g: usize,
        x: *const u16,
        put: impl FnMut(usize, usize, f32),
    ) {
        let t = Tables::new();
        let at = |i: usize, c: usize| w.as_ptr().wrapping_add(((j0 + i) * k + c) / 2);
        let sc = |i: usize, c: usize| *s.as_ptr().add(((j0 + i) * k + c) / 32) as i32 - 127;
        let mut acc = [[_mm512_setzero_ps(); GROUP]; R];
        for c in (0..k).step_by(64) {
            outputs!(g, i => {
                if c % 128 == 0 {
                    Avx512::prefetch_l2(at(i + GROUP, c));
                }
                let v = _mm512_castsi256_si512(_mm256_loadu_si256(at(i, c) as *const _));
                for h in 0..2 {
                    let wv = t.e2m1(v, h, t.e2m1_scaled(sc(i, c + 32 * h)));
                    for r in 0..R {
                        let a = _mm512_loadu_si512(x.add(r * k + c + 32 * h) as *const _);
                        acc[r][i] = _mm512_dpbf16_ps(acc[r][i], bh(a), wv);
                    }
                }
            });
        }
        finish(acc, g, put)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::backend::cpu::order::{dot_in, Order};
    use crate::checkpoint::Bytes;

    /// The instruction's arithmetic this module relies on: the odd element's product added
    /// first, then the even one's, each addition rounded to nearest even.
    #[test]
    fn dot_adds_odd_then_even() {
        if !available() {
            eprintln!("dot_adds_odd_then_even: skipped (no AVX-512 BF16)");
            return;
        }
        let mut seed = 5u64;
        let mut next = || lcg(&mut seed);
        for _ in 0..20_000 {
            // bf16 values of exponents 2^-27..2^12, and an accumulator 2^-27..2^12.
            let mut v = || f32::from_bits((next() & 0x807f_0000) | ((100 + next() % 40) << 23));
            let (a, b, c, d) = (v(), v(), v(), v());
            let acc = f32::from_bits((next() & 0x807f_ffff) | ((100 + next() % 40) << 23));
            // SAFETY: `available()` saw AVX-512 BF16.
            let got = unsafe { dot(acc, [a, c], [b, d]) };
            let want = (acc + c * d) + a * b;
            assert_eq!(got.to_bits(), want.to_bits(), "{acc} + {a}*{b} + {c}*{d}");
        }
    }

    /// `acc + x[0] * w[0] + x[1] * w[1]` in lane 0 of `VDPBF16PS` (elements 0 and 1).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot(acc: f32, x: [f32; 2], w: [f32; 2]) -> f32 {
        use std::arch::x86_64::*;
        let pack = |v: [f32; 2]| {
            let mut e = [0u16; 32];
            e[0] = (v[0].to_bits() >> 16) as u16;
            e[1] = (v[1].to_bits() >> 16) as u16;
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(e.as_ptr() as *const _))
        };
        _mm512_cvtss_f32(_mm512_dpbf16_ps(_mm512_set1_ps(acc), pack(x), pack(w)))
    }

    /// The next 32 bits of a linear congruential sequence.
    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 32) as u32
    }

    fn bytes(n: usize, seed: &mut u64, f: impl Fn(u8) -> u8) -> Bytes {
        Bytes::owned((0..n).map(|_| f((lcg(seed) >> 1) as u8)).collect())
    }

    /// FP8 and FP4 weights, scales inside and outside the range the bf16 sums take (those
    /// blocks go to the f32 chain), NaN codes, one to six rows, several groups: every output
    /// has the scalar sixteen-lane chain's bits.
    #[test]
    fn products_sum_as_the_scalar_lanes() {
        if !available() {
            eprintln!("products_sum_as_the_scalar_lanes: skipped (no AVX-512 BF16)");
            return;
        }
        let mut seed = 3u64;
        for fp4 in [false, true] {
            for (n, k) in [(5, 128), (9, 512), (130, 256)] {
                // Scales mostly ordinary, some tiny (f32 chain) or NaN (255).
                let scale = |b: u8| match b % 16 {
                    0 => 1 + b / 64,
                    1 => 255,
                    _ => 110 + b % 20,
                };
                let storage = if fp4 {
                    Storage::F4 {
                        w: bytes(n * k / 2, &mut seed, |b| b),
                        s: bytes(n * k / 32, &mut seed, scale),
                    }
                } else {
                    Storage::F8 {
                        w: bytes(n * k, &mut seed, |b| b),
                        s: bytes(n.div_ceil(128) * (k / 128), &mut seed, scale),
                    }
                };
                let m = Matrix {
                    rows: n,
                    cols: k,
                    storage,
                };
                for rows in [1usize, 2, 6] {
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i| {
                            let v = ((i * 7919 % 1000) as f32 - 500.0) / 311.0;
                            // Blocks of very different magnitudes, one all zero.
                            v * [1.0, 1e-3, 3e4, 0.0][(i / 128) % 4]
                        })
                        .collect();
                    let a = QuantAct::new(&x, k);
                    let y = product(&m, &a, 1..n).expect("the kernels take these");
                    let xd: Vec<f32> =
                        a.q.iter()
                            .enumerate()
                            .map(|(i, q)| q * a.s[i / 128])
                            .collect();
                    let mut w = vec![0f32; k];
                    for j in 1..n {
                        crate::backend::cpu::decode_row(&m, j, &mut w);
                        for r in 0..rows {
                            let want = dot_in(Order::Lanes16, &xd[r * k..(r + 1) * k], &w);
                            let got = y[r * (n - 1) + j - 1];
                            assert!(
                                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                                "fp4 {fp4}, {n}x{k}, {rows} rows, output {j} of row {r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
