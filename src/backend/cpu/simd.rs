//! Matrix products on SIMD lanes, in the two summation orders of [`super::order`], with the
//! weights decoded from their checkpoint format in registers.
//!
//! [`Order::Chain`](super::order::Order) sums each output as one fused multiply-add chain over
//! `k` (in the blocks of [`blocks`]): a serial dependency, so one output cannot spread over SIMD
//! lanes. Many outputs can: each lane carries one output's chain, fed its own weight row at the
//! same `k`, so every output gets exactly the scalar chain's bits, whatever shares its tile.
//! A tile is as many weight rows as there are lanes; its weights are decoded a square of rows by
//! columns at a time, and transposed there ([`product`]). BF16 weights that only such products
//! read are stored tile by tile, column by column, at load ([`tiled`]): a column of a tile is
//! then one load and no transpose.
//!
//! [`Order::Lanes16`](super::order::Order) sums each output on sixteen lanes, lane `l` a chain
//! over `k = l, l + 16, ...`: exactly a 16-wide vector's accumulator (two 8-wide ones), so one
//! output's weight row streams through registers with no transpose ([`product16`]), at the
//! memory's pace.
//!
//! AVX-512 (16 lanes) and AVX2 (8 lanes) are chosen at run time, NEON (8 lanes in two
//! vectors) runs on every aarch64 CPU; elsewhere, and for widths they do not take,
//! [`super::linear`]'s scalar loops run.

use rayon::prelude::*;

use super::order::{blocks, Numerics, Order};
use crate::checkpoint::Bytes;
use crate::quant::{e8m0, FP4_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK};
use crate::weights::{Matrix, Storage};

/// The SIMD width this CPU gives the kernels (0: none): the widest it has, or, with
/// `HADAL_CPU_SIMD=avx2` (`neon`) or `scalar`, at most that (to compare the paths on one
/// machine).
pub fn lanes() -> usize {
    static LANES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LANES.get_or_init(|| {
        let cap = match std::env::var("HADAL_CPU_SIMD").as_deref() {
            Ok("scalar") => 0,
            Ok("avx2" | "neon") => 8,
            _ => 16,
        };
        detected().min(cap)
    })
}

fn detected() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return 16;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return 8;
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        return 8;
    }
    0
}

/// Whether [`product`] takes a `k`-wide product: every chain block a whole number of squares.
pub fn takes(k: usize) -> bool {
    let l = lanes();
    l > 0 && k > 0 && blocks(k).all(|b| b % l == 0)
}

/// `rows x n` outputs (row-major) of the products of `x` (`rows x k`) with weight rows
/// `range` of `m`, each summed as [`Order::Chain`](super::order::Order) sums it. Needs
/// [`takes`]`(k)`; the outputs past the last whole tile are left to the caller (returned
/// count).
pub fn product(
    m: &Matrix,
    x: &[f32],
    rows: usize,
    range: std::ops::Range<usize>,
) -> (Vec<f32>, usize) {
    product_in(lanes(), m, x, rows, range)
}

/// [`product`] on `l` lanes (16: AVX-512, 8: AVX2 or NEON), which the CPU must have.
fn product_in(
    l: usize,
    m: &Matrix,
    x: &[f32],
    rows: usize,
    range: std::ops::Range<usize>,
) -> (Vec<f32>, usize) {
    let n = range.len();
    let whole = n / l * l;
    // `t[j * rows + r]`: output j of row r, tile by tile.
    let mut t = vec![0f32; whole * rows];
    let k = m.cols;
    // Tiled weights go a tile of TILES vectors' outputs a call.
    let per = if matches!(m.storage, Storage::Bf16Tiles { .. }) {
        TILES
    } else {
        1
    };
    let min_len = (262_144 / (per * l * k * rows.max(1)).max(1)).max(1);
    t.par_chunks_mut(per * l * rows)
        .enumerate()
        .with_min_len(min_len)
        .for_each(|(i, out)| {
            let n0 = range.start + i * per * l;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `lanes()` saw the features each kernel is compiled for.
            unsafe {
                if l == 16 {
                    x86::tile_avx512(m, n0, x, rows, out);
                } else {
                    x86::tile_avx2(m, n0, x, rows, out);
                }
            }
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `lanes()` saw NEON.
            unsafe {
                neon::tile_neon(m, n0, x, rows, out)
            };
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            let _ = (n0, out);
        });
    let mut y = vec![0f32; rows * n];
    for j in 0..whole {
        for r in 0..rows {
            y[r * n + j] = t[j * rows + r];
        }
    }
    (y, whole)
}

/// Whether [`product16`] takes a `k`-wide product: whole groups of sixteen.
pub fn takes16(k: usize) -> bool {
    lanes() > 0 && k > 0 && k.is_multiple_of(16)
}

/// `rows x n` outputs (row-major) of the products of `x` (`rows x k`) with weight rows `range`
/// of `m`, each summed as [`Order::Lanes16`](super::order::Order) sums it. Needs
/// [`takes16`]`(k)`.
pub fn product16(m: &Matrix, x: &[f32], rows: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    product16_in(lanes(), m, x, rows, range)
}

/// [`product16`] on `l` lanes (16: AVX-512, 8: AVX2 or NEON), which the CPU must have.
fn product16_in(
    l: usize,
    m: &Matrix,
    x: &[f32],
    rows: usize,
    range: std::ops::Range<usize>,
) -> Vec<f32> {
    let xb = match m.storage {
        Storage::F8 { .. } => bounds(x, m.cols),
        _ => Vec::new(),
    };
    by_groups(rows, range.len(), m.cols, |g, out| {
        let j0 = range.start + g * GROUP;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `lanes()` saw the features each kernel is compiled for.
        unsafe {
            if l == 16 {
                x86::rows16_avx512(m, j0, x, &xb, rows, out);
            } else {
                x86::rows16_avx2(m, j0, x, &xb, rows, out);
            }
        }
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `lanes()` saw NEON.
        unsafe {
            let _ = l;
            neon::rows16_neon(m, j0, x, &xb, rows, out)
        };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let _ = (l, j0, out, &xb);
    })
}

/// For each FP8 scale block of `k`-wide rows `x`, the least nonzero and the greatest magnitude
/// over all rows (NaN where a value is NaN): whether a weight block's scale may multiply the
/// activations instead of the weights, exactly ([`rows16_block`]).
pub(super) fn bounds(x: &[f32], k: usize) -> Vec<(f32, f32)> {
    let mut b = vec![(f32::INFINITY, 0f32); k.div_ceil(FP8_WEIGHT_BLOCK)];
    for row in x.chunks(k) {
        for (c, (lo, hi)) in row.chunks(FP8_WEIGHT_BLOCK).zip(&mut b) {
            for &v in c {
                let a = v.abs();
                // `max` would drop a NaN; a NaN bound fails every check.
                *hi = if a > *hi || a.is_nan() { a } else { *hi };
                if a > 0.0 && a < *lo {
                    *lo = a;
                }
            }
        }
    }
    b
}

/// The `rows x n` outputs (row-major) of `k`-wide products, [`GROUP`] outputs a task:
/// `kernel(g, out)` writes outputs `g * GROUP..` (as many as `out` holds) of every row into
/// `out[i * rows + r]`.
pub(super) fn by_groups(
    rows: usize,
    n: usize,
    k: usize,
    kernel: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut t = vec![0f32; n * rows];
    let min_len = (65_536 / (GROUP * k * rows.max(1)).max(1)).max(1);
    t.par_chunks_mut(GROUP * rows)
        .enumerate()
        .with_min_len(min_len)
        .for_each(|(g, out)| kernel(g, out));
    super::linear::row_major(t, rows, n)
}

/// Outputs a [`product16`] kernel call computes together: their chains are independent, so the
/// core's multiply-add units stay busy (one output's lanes would wait on each other).
pub(super) const GROUP: usize = 4;

/// Outputs `j0..` (as many as `out` holds rows for, up to [`GROUP`]) against every activation
/// row, each summed on sixteen lanes, into `out[i * rows + r]`. `xb`: [`bounds`] of `x` for FP8
/// weights (empty: their scales multiply the weights).
#[inline(always)]
unsafe fn rows16<L: Lanes>(
    m: &Matrix,
    j0: usize,
    x: &[f32],
    xb: &[(f32, f32)],
    rows: usize,
    out: &mut [f32],
) {
    let k = m.cols;
    let g = out.len() / rows;
    for r0 in (0..rows).step_by(L::ROWS) {
        // Constant numbers of rows and outputs, so that the accumulators stay in registers.
        let x = x.as_ptr().add(r0 * k);
        let put = |i: usize, r: usize, y: f32| out[i * rows + r0 + r] = y;
        macro_rules! outputs {
            ($r:literal) => {
                match g {
                    1 => rows16_with::<L, $r, 1>(m, j0, x, xb, put),
                    2 => rows16_with::<L, $r, 2>(m, j0, x, xb, put),
                    3 => rows16_with::<L, $r, 3>(m, j0, x, xb, put),
                    _ => rows16_with::<L, $r, GROUP>(m, j0, x, xb, put),
                }
            };
        }
        match (rows - r0).min(L::ROWS) {
            1 => outputs!(1),
            2 => outputs!(2),
            3 => outputs!(3),
            _ => outputs!(4),
        }
    }
}

/// [`rows16`] for `R` activation rows from `x` and `G` outputs, each format's weights decoded
/// by its own loop.
#[inline(always)]
unsafe fn rows16_with<L: Lanes, const R: usize, const G: usize>(
    m: &Matrix,
    j0: usize,
    x: *const f32,
    xb: &[(f32, f32)],
    put: impl FnMut(usize, usize, f32),
) {
    let k = m.cols;
    match &m.storage {
        Storage::F8 { w, s } => {
            let (w, s) = (w.as_ptr(), &s[..]);
            let kb = k.div_ceil(FP8_WEIGHT_BLOCK);
            let at = |i: usize, kk: usize| w.wrapping_add((j0 + i) * k + kk);
            let scale = |i: usize, kk: usize| {
                e8m0(*s.get_unchecked(((j0 + i) / FP8_WEIGHT_BLOCK) * kb + kk / FP8_WEIGHT_BLOCK))
            };
            // The group's outputs share a block scale where they lie in one block of rows; it
            // then multiplies the activations once instead of every weight. The products are
            // the same where the activations times scale and unit stay normal f32s: a weight
            // times its scale is exact (four significant bits, at least 2^-136), and finite
            // where the scale times the unit (at least 2^8) is.
            let one_block = j0 / FP8_WEIGHT_BLOCK == (j0 + G - 1) / FP8_WEIGHT_BLOCK;
            let shared = |kk: usize| {
                if !one_block || xb.is_empty() {
                    return None;
                }
                let su = scale(0, kk) * L::E4M3_UNIT;
                let (lo, hi) = *xb.get_unchecked(kk / FP8_WEIGHT_BLOCK);
                (lo * su >= f32::MIN_POSITIVE && hi * su <= f32::MAX).then_some(su)
            };
            rows16_block::<L, R, G, E4M3>(k, x, (FP8_WEIGHT_BLOCK, 64), at, scale, shared, put)
        }
        Storage::F4 { w, s } => {
            let (w, s) = (w.as_ptr(), &s[..]);
            let kb = k / FP4_WEIGHT_BLOCK;
            let at = |i: usize, kk: usize| w.wrapping_add(((j0 + i) * k + kk) / 2);
            let scale =
                |i: usize, kk: usize| e8m0(*s.get_unchecked((j0 + i) * kb + kk / FP4_WEIGHT_BLOCK));
            rows16_block::<L, R, G, E2M1>(k, x, (FP4_WEIGHT_BLOCK, 128), at, scale, |_| None, put)
        }
        Storage::Bf16(w) => {
            let w = w.as_ptr();
            let at = |i: usize, kk: usize| w.wrapping_add(((j0 + i) * k + kk) * 2);
            let none = |_| None;
            rows16_block::<L, R, G, BF16>(k, x, (k, 32), at, |_, _| 1.0, none, put)
        }
        Storage::F32(w) => {
            let w = w.as_ptr();
            let at = |i: usize, kk: usize| w.wrapping_add(((j0 + i) * k + kk) * 4);
            let none = |_| None;
            rows16_block::<L, R, G, F32>(k, x, (k, 16), at, |_, _| 1.0, none, put)
        }
        // A tile's rows are not contiguous; `linear_plain_rows` sends tiled weights to the
        // chain order's kernels and the scalar loops.
        Storage::Bf16Tiles { .. } => unreachable!("tiled BF16 weights in a sixteen-lane product"),
    }
}

/// Weight formats of [`rows16_block`] (a constant parameter: the decoding is a function, not a
/// closure, which would not inherit the kernel's target features, nor always be inlined:
/// every intrinsic in it then became a call).
const E4M3: u8 = 0;
const E2M1: u8 = 1;
const BF16: u8 = 2;
const F32: u8 = 3;

/// Sixteen weights of format `F` stored from `p`, in `16 / L::N` vectors; e4m3 codes over
/// [`Lanes::E4M3_UNIT`].
#[inline(always)]
unsafe fn decode16<L: Lanes, const F: u8>(p: *const u8) -> [L::V; 2] {
    match F {
        E4M3 => L::e4m3x16(p),
        E2M1 => L::e2m1x16(p),
        // Where a vector holds sixteen, the second is not used.
        BF16 if L::N == 8 => [L::bf16s(p), L::bf16s(p.wrapping_add(16))],
        F32 if L::N == 8 => [L::f32s(p), L::f32s(p.wrapping_add(32))],
        BF16 => [L::bf16s(p), L::zero()],
        _ => [L::f32s(p), L::zero()],
    }
}

/// Sixteen columns from `kk` of `R` activation rows (`k` apart) in `16 / L::N` vectors, each
/// times `s` (where not 1).
#[inline(always)]
unsafe fn columns16<L: Lanes, const R: usize>(
    x: *const f32,
    k: usize,
    kk: usize,
    s: f32,
) -> [[L::V; R]; 2] {
    let mut v = [[L::zero(); R]; 2];
    for (h, vh) in v.iter_mut().enumerate().take(16 / L::N) {
        for (r, x_r) in vh.iter_mut().enumerate() {
            *x_r = L::load(x.add(r * k + kk + h * L::N));
            if s != 1.0 {
                *x_r = L::scale(*x_r, s);
            }
        }
    }
    v
}

/// The sixteen lane chains of `G` outputs for `R` activation rows from `x`: sixteen weights of
/// format `F` stored from `at(i, kk)` (output `i`, column `kk`); FP8 and FP4 times `scale(i,
/// kk)`, looked up once per `blocks.0` columns (the scale block), unless `shared(kk)` gives the
/// block's one scale (times [`Lanes::E4M3_UNIT`]) for all outputs, which then multiplies the
/// activations; `blocks.1` weights make a 64-byte line of a row, prefetched once. `put(i, r,
/// y)` receives output `i` of row `r`.
#[inline(always)]
// Loops over constant ranges index the accumulators, so that they unroll into registers.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn rows16_block<L: Lanes, const R: usize, const G: usize, const F: u8>(
    k: usize,
    x: *const f32,
    (block, line): (usize, usize),
    at: impl Fn(usize, usize) -> *const u8,
    scale: impl Fn(usize, usize) -> f32,
    shared: impl Fn(usize) -> Option<f32>,
    mut put: impl FnMut(usize, usize, f32),
) {
    let v = 16 / L::N;
    let scaled = F == E4M3 || F == E2M1;
    // acc[r][i][h]: row r, output i, lanes h * N..
    let mut acc = [[[L::zero(); 2]; G]; R];
    // Steps of a scale block or a line, whichever is shorter: the prefetches and the scales'
    // lookups once a step, not in the loop over outputs.
    let step = block.min(line);
    for k0 in (0..k).step_by(step) {
        let end = (k0 + step).min(k);
        if k0 % line == 0 {
            for i in 0..G {
                // The next group's rows at the same place, into L2: the stream ahead.
                L::prefetch_l2(at(i + GROUP, k0));
                // BF16 rows (the head) also into L1, eight lines ahead: one thread then reads
                // them 15% faster.
                if !scaled {
                    L::prefetch(at(i, k0 + 8 * line));
                }
            }
        }
        if let Some(su) = shared(k0) {
            for kk in (k0..end).step_by(16) {
                let xv = columns16::<L, R>(x, k, kk, su);
                for i in 0..G {
                    let ws = decode16::<L, F>(at(i, kk));
                    for h in 0..v {
                        for r in 0..R {
                            acc[r][i][h] = L::fmav(xv[h][r], ws[h], acc[r][i][h]);
                        }
                    }
                }
            }
            continue;
        }
        let sc: [f32; G] = std::array::from_fn(|i| if scaled { scale(i, k0) } else { 1.0 });
        for kk in (k0..end).step_by(16) {
            let xv = columns16::<L, R>(x, k, kk, 1.0);
            for i in 0..G {
                let ws = decode16::<L, F>(at(i, kk));
                for h in 0..v {
                    let mut w = ws[h];
                    if F == E4M3 {
                        w = L::scale(w, L::E4M3_UNIT);
                    }
                    if scaled {
                        w = L::scale(w, sc[i]);
                    }
                    for r in 0..R {
                        acc[r][i][h] = L::fmav(xv[h][r], w, acc[r][i][h]);
                    }
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (i, a) in a.iter().enumerate() {
            put(i, r, L::join16(*a));
        }
    }
}

/// What one SIMD width provides to the kernels.
pub(super) trait Lanes {
    const N: usize;
    /// Activation rows [`rows16`] keeps accumulators for at once (its registers' worth).
    const ROWS: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    /// `x * w + acc`, one rounding.
    unsafe fn fma(x: f32, w: Self::V, acc: Self::V) -> Self::V;
    /// `x * w + acc` lane by lane, one rounding.
    unsafe fn fmav(x: Self::V, w: Self::V, acc: Self::V) -> Self::V;
    /// `N` floats from `p`.
    unsafe fn load(p: *const f32) -> Self::V;
    /// Sixteen lanes (in `16 / N` vectors) joined as `Order::Lanes16` joins them: lanes `l`,
    /// `l + 4`, `l + 8`, `l + 12` in order, then the four as two pairs.
    unsafe fn join16(v: [Self::V; 2]) -> f32;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn scale(v: Self::V, s: f32) -> Self::V;
    unsafe fn f32s(p: *const u8) -> Self::V;
    unsafe fn bf16s(p: *const u8) -> Self::V;
    /// e4m3 codes, as the `E4M3` table decodes them.
    unsafe fn e4m3s(p: *const u8) -> Self::V;
    /// e2m1 codes, two a byte (low nibble first), unscaled.
    unsafe fn e2m1s(p: *const u8) -> Self::V;
    /// What [`Lanes::e4m3x16`]'s values are in: a code's value over it (a power of two).
    const E4M3_UNIT: f32;
    /// Sixteen e4m3 codes from `p` in `16 / N` vectors (the second zero where one holds them),
    /// each its value over [`Lanes::E4M3_UNIT`] (exact; NaN codes NaN).
    unsafe fn e4m3x16(p: *const u8) -> [Self::V; 2];
    /// Sixteen e2m1 codes from `p`, as [`Lanes::e4m3x16`] gives e4m3 codes.
    #[inline(always)]
    unsafe fn e2m1x16(p: *const u8) -> [Self::V; 2] {
        if Self::N == 8 {
            [Self::e2m1s(p), Self::e2m1s(p.wrapping_add(4))]
        } else {
            [Self::e2m1s(p), Self::zero()]
        }
    }
    /// Rows become columns (`v` holds `N` vectors).
    unsafe fn transpose(v: &mut [Self::V]);
    unsafe fn store(v: Self::V, out: &mut [f32]);
    /// Asks for the cache line at `p` (any address: a prefetch never faults).
    unsafe fn prefetch(p: *const u8);
    /// The same, into the second-level cache.
    unsafe fn prefetch_l2(p: *const u8);
}

/// One tile: weight rows `n0..n0 + L::N` against every activation row, into `out[j * rows + r]`
/// (tiled BF16 weights: the vectors of outputs `out` holds, of one tile, up to [`TILES`]).
#[inline(always)]
unsafe fn tile<L: Lanes>(m: &Matrix, n0: usize, x: &[f32], rows: usize, out: &mut [f32]) {
    let k = m.cols;
    // The weights' bytes are looked up once; each format gets its own loop.
    match &m.storage {
        Storage::Bf16Tiles { w, .. } => {
            // The tile of row `n0` starts `n0 * k` values in.
            let p = w.as_ptr().add(n0 * k * 2);
            let tiles = out.len() / (L::N * rows);
            for r0 in (0..rows).step_by(4) {
                let x = x.as_ptr().add(r0 * k);
                let mut lane = [0f32; 16];
                let put = |t: usize, r: usize, v: L::V| {
                    L::store(v, &mut lane);
                    for (j, &y) in lane[..L::N].iter().enumerate() {
                        out[(t * L::N + j) * rows + r0 + r] = y;
                    }
                };
                match rows - r0 {
                    1 => tile_cols::<L, 1, 4>(p, k, x, tiles, put),
                    2 => tile_cols::<L, 2, 2>(p, k, x, tiles, put),
                    3 => tile_cols::<L, 3, 1>(p, k, x, tiles, put),
                    _ => tile_cols::<L, 4, 1>(p, k, x, tiles, put),
                }
            }
        }
        Storage::F8 { w, s } => {
            let (w, s) = (w.as_ptr(), &s[..]);
            let kb = k.div_ceil(FP8_WEIGHT_BLOCK);
            let srow = (n0 / FP8_WEIGHT_BLOCK) * kb;
            let at = |i: usize, kk: usize| w.wrapping_add((n0 + i) * k + kk);
            tile_with::<L>(k, x, rows, out, at, |i, kk| {
                let sc = e8m0(*s.get_unchecked(srow + kk / FP8_WEIGHT_BLOCK));
                L::scale(L::e4m3s(at(i, kk)), sc)
            })
        }
        Storage::F4 { w, s } => {
            let (w, s) = (w.as_ptr(), &s[..]);
            let kb = k / FP4_WEIGHT_BLOCK;
            let at = |i: usize, kk: usize| w.wrapping_add(((n0 + i) * k + kk) / 2);
            tile_with::<L>(k, x, rows, out, at, |i, kk| {
                let sc = e8m0(*s.get_unchecked((n0 + i) * kb + kk / FP4_WEIGHT_BLOCK));
                L::scale(L::e2m1s(at(i, kk)), sc)
            })
        }
        Storage::Bf16(w) => {
            let w = w.as_ptr();
            let at = |i: usize, kk: usize| w.wrapping_add(((n0 + i) * k + kk) * 2);
            tile_with::<L>(k, x, rows, out, at, |i, kk| L::bf16s(at(i, kk)))
        }
        Storage::F32(w) => {
            let w = w.as_ptr();
            let at = |i: usize, kk: usize| w.wrapping_add(((n0 + i) * k + kk) * 4);
            tile_with::<L>(k, x, rows, out, at, |i, kk| L::f32s(at(i, kk)))
        }
    }
}

/// Columns ahead of the current ones whose weights are asked for (a few cache lines per row).
const AHEAD: usize = 128;

/// Vectors of outputs a tile of tiled BF16 weights holds: a column of a tile is then a 64-byte
/// line on AVX2 and NEON (two on AVX-512), read by one stream, and a row of activations feeds
/// as many independent chains.
const TILES: usize = 4;

/// Bytes of tiled weights asked for ahead of the current column (measured on the demo's head,
/// 129,280 x 256, on a 2-core AVX2 VM: 2, 8, 32 and 64 KiB ahead read 14, 16, 18 and 17 GiB/s).
const TILE_AHEAD: usize = 32 << 10;

/// Rows a tile of [`Storage::Bf16Tiles`] holds on this CPU.
pub fn tile_width() -> usize {
    TILES * lanes()
}

/// The first `tiles` vectors of outputs of the tiled BF16 weights' tile at `p` (`k` columns of
/// `TILES * L::N` values) against `R` activation rows from `x`, `T` vectors at a time (the
/// last few one by one). `put(t, r, v)` receives vector `t`'s outputs for row `r`.
#[inline(always)]
unsafe fn tile_cols<L: Lanes, const R: usize, const T: usize>(
    p: *const u8,
    k: usize,
    x: *const f32,
    tiles: usize,
    mut put: impl FnMut(usize, usize, L::V),
) {
    let mut t0 = 0;
    while t0 + T <= tiles {
        tile_group::<L, R, T>(p, k, x, t0, &mut put);
        t0 += T;
    }
    for t in t0..tiles {
        tile_group::<L, R, 1>(p, k, x, t, &mut put);
    }
}

/// Vectors `t0..t0 + T` of [`tile_cols`]: the chains [`tile_with`] sums, in the same order, a
/// column of a vector's outputs one load.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn tile_group<L: Lanes, const R: usize, const T: usize>(
    p: *const u8,
    k: usize,
    x: *const f32,
    t0: usize,
    put: &mut impl FnMut(usize, usize, L::V),
) {
    let col = TILES * L::N * 2;
    let q = p.add(t0 * L::N * 2);
    let mut tot = [[L::zero(); R]; T];
    let mut from = 0;
    for (bi, len) in blocks(k).enumerate() {
        let mut acc = [[L::zero(); R]; T];
        for kk in from..from + len {
            // The hardware's prefetcher alone leaves a thread waiting on memory here; the tile
            // is one stream, asked for a line at a time well ahead.
            let ahead = q.wrapping_add(kk * col + TILE_AHEAD);
            for line in (0..T * L::N * 2).step_by(64) {
                L::prefetch(ahead.wrapping_add(line));
            }
            for t in 0..T {
                let v = L::bf16s(q.add(kk * col + t * L::N * 2));
                for r in 0..R {
                    acc[t][r] = L::fma(*x.add(r * k + kk), v, acc[t][r]);
                }
            }
        }
        for t in 0..T {
            for r in 0..R {
                tot[t][r] = if bi == 0 {
                    acc[t][r]
                } else {
                    L::add(tot[t][r], acc[t][r])
                };
            }
        }
        from += len;
    }
    for t in 0..T {
        for r in 0..R {
            put(t0 + t, r, tot[t][r]);
        }
    }
}

/// `m` in the layout its chain-order products read fastest on this CPU: BF16 weights whose
/// every product is summed in chain order (`numerics`, by their width) become
/// [`Storage::Bf16Tiles`] of [`tile_width`] rows; others stay as they are.
pub fn tiled(m: Matrix, numerics: Numerics) -> Matrix {
    let l = tile_width();
    let Storage::Bf16(w) = &m.storage else {
        return m;
    };
    let (n, k) = (m.rows, m.cols);
    if numerics != Numerics::BatchInvariant
        || numerics.product(1, k) != Order::Chain
        || !takes(k)
        || l == 0
        || !n.is_multiple_of(l)
    {
        return m;
    }
    tiles_of(w, n, k, l)
}

/// Row-major BF16 weights `w` (`n x k`) in tiles of `l` rows.
fn tiles_of(w: &[u8], n: usize, k: usize, l: usize) -> Matrix {
    let mut out = vec![0u8; n * k * 2];
    out.par_chunks_mut(l * k * 2)
        .enumerate()
        .for_each(|(tile, o)| {
            for i in 0..l {
                let row = &w[(tile * l + i) * k * 2..(tile * l + i + 1) * k * 2];
                for (c, v) in row.chunks_exact(2).enumerate() {
                    o[(c * l + i) * 2..(c * l + i) * 2 + 2].copy_from_slice(v);
                }
            }
        });
    Matrix {
        rows: n,
        cols: k,
        storage: Storage::Bf16Tiles {
            w: Bytes::owned(out),
            width: l,
        },
    }
}

/// The tile's chains, with `row(i, kk)` giving `L::N` weights of tile row `i` from column `kk`
/// (stored at `at(i, kk)`).
#[inline(always)]
unsafe fn tile_with<L: Lanes>(
    k: usize,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
    at: impl Fn(usize, usize) -> *const u8,
    row: impl Fn(usize, usize) -> L::V,
) {
    const MAX: usize = 16;
    let n = L::N;
    // Chains of up to MAX activation rows at a time stay in registers or close by.
    let mut acc = [L::zero(); MAX];
    let mut tot = [L::zero(); MAX];
    let mut v = [L::zero(); MAX];
    let mut lane = [0f32; MAX];
    for r0 in (0..rows).step_by(MAX) {
        let rs = (rows - r0).min(MAX);
        let mut from = 0;
        for (bi, len) in blocks(k).enumerate() {
            acc[..rs].iter_mut().for_each(|a| *a = L::zero());
            for kk in (from..from + len).step_by(n) {
                for (i, vi) in v[..n].iter_mut().enumerate() {
                    // The rest of this tile's rows, and the next tile's at the same place.
                    if kk + AHEAD < k {
                        L::prefetch(at(i, kk + AHEAD));
                    }
                    if r0 == 0 {
                        L::prefetch_l2(at(n + i, kk));
                    }
                    *vi = row(i, kk);
                }
                L::transpose(&mut v[..n]);
                for (r, a) in acc[..rs].iter_mut().enumerate() {
                    let xr = x.as_ptr().add((r0 + r) * k + kk);
                    let mut s = *a;
                    for (j, vj) in v[..n].iter().enumerate() {
                        s = L::fma(*xr.add(j), *vj, s);
                    }
                    *a = s;
                }
            }
            for (t, a) in tot[..rs].iter_mut().zip(&acc[..rs]) {
                *t = if bi == 0 { *a } else { L::add(*t, *a) };
            }
            from += len;
        }
        for (r, t) in tot[..rs].iter().enumerate() {
            L::store(*t, &mut lane);
            for (j, &y) in lane[..n].iter().enumerate() {
                out[j * rows + r0 + r] = y;
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{rows16, tile, Lanes};
    use crate::weights::Matrix;

    pub struct Avx512;
    pub struct Avx2;

    /// The high and low bytes of each e2m1 code's value as BF16.
    const E2M1_BF16: ([u8; 16], [u8; 16]) = {
        let (mut h, mut l) = ([0u8; 16], [0u8; 16]);
        let mut c = 0;
        while c < 16 {
            let b = crate::quant::E2M1[c].to_bits();
            h[c] = (b >> 24) as u8;
            l[c] = (b >> 16) as u8;
            c += 1;
        }
        (h, l)
    };

    /// Sixteen e4m3 codes from `p` as f16 bits in 16-bit lanes (half the width of f32 work):
    /// each code's bits moved into an f16's, its value times 2^-8, subnormal codes on f16
    /// subnormals; the conversion to f32 and the multiplication back by 256 are exact. NaN
    /// codes get an f16 NaN.
    #[inline(always)]
    unsafe fn e4m3_f16(p: *const u8) -> __m256i {
        e4m3_f16_lanes(_mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i)))
    }

    /// [`e4m3_f16`] of codes already widened to 16-bit lanes.
    #[inline(always)]
    unsafe fn e4m3_f16_lanes(b: __m256i) -> __m256i {
        let mag = _mm256_and_si256(b, _mm256_set1_epi16(0x7f));
        let sign = _mm256_xor_si256(b, mag);
        let h = _mm256_or_si256(_mm256_slli_epi16::<7>(mag), _mm256_slli_epi16::<8>(sign));
        let nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7f));
        _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7e00)))
    }

    /// `(q0 + q1) + (q2 + q3)`.
    #[inline(always)]
    unsafe fn join4(q: __m128) -> f32 {
        // (q0 + q1, q1 + q0, q2 + q3, q3 + q2): each pair's sum, in both of its lanes.
        let t = _mm_add_ps(q, _mm_shuffle_ps::<0b10_11_00_01>(q, q));
        _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)))
    }

    impl Lanes for Avx512 {
        const N: usize = 16;
        const ROWS: usize = 4;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn fma(x: f32, w: __m512, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(_mm512_set1_ps(x), w, acc)
        }
        #[inline(always)]
        unsafe fn fmav(x: __m512, w: __m512, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(x, w, acc)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn join16(v: [__m512; 2]) -> f32 {
            let q = _mm_add_ps(
                _mm_add_ps(
                    _mm_add_ps(
                        _mm512_castps512_ps128(v[0]),
                        _mm512_extractf32x4_ps::<1>(v[0]),
                    ),
                    _mm512_extractf32x4_ps::<2>(v[0]),
                ),
                _mm512_extractf32x4_ps::<3>(v[0]),
            );
            join4(q)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn scale(v: __m512, s: f32) -> __m512 {
            _mm512_mul_ps(v, _mm512_set1_ps(s))
        }
        #[inline(always)]
        unsafe fn f32s(p: *const u8) -> __m512 {
            _mm512_loadu_ps(p as *const f32)
        }
        #[inline(always)]
        unsafe fn bf16s(p: *const u8) -> __m512 {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
        #[inline(always)]
        unsafe fn e4m3s(p: *const u8) -> __m512 {
            _mm512_mul_ps(Self::e4m3x16(p)[0], _mm512_set1_ps(Self::E4M3_UNIT))
        }
        const E4M3_UNIT: f32 = 256.0;
        #[inline(always)]
        unsafe fn e4m3x16(p: *const u8) -> [__m512; 2] {
            [_mm512_cvtph_ps(e4m3_f16(p)), _mm512_setzero_ps()]
        }
        #[inline(always)]
        unsafe fn e2m1s(p: *const u8) -> __m512 {
            // Each byte twice, then the low nibble of the first copy, the high of the second.
            let b = _mm_loadl_epi64(p as *const __m128i);
            let d = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
            let shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
            let idx = _mm512_and_si512(_mm512_srlv_epi32(d, shift), _mm512_set1_epi32(15));
            let lut = _mm512_loadu_ps(crate::quant::E2M1.as_ptr());
            _mm512_permutexvar_ps(idx, lut)
        }
        #[inline(always)]
        unsafe fn transpose(v: &mut [__m512]) {
            let mut t = [_mm512_setzero_ps(); 16];
            for p in 0..8 {
                t[2 * p] = _mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]);
                t[2 * p + 1] = _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]);
            }
            // u[4g + m]: column 4L + m of rows 4g..4g+4, in each 128-bit lane L.
            let mut u = [_mm512_setzero_ps(); 16];
            for g in 0..4 {
                let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                u[4 * g] = _mm512_shuffle_ps::<0x44>(a, c);
                u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
                u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(b, d);
                u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
            }
            for m in 0..4 {
                let lo0 = _mm512_shuffle_f32x4::<0x88>(u[m], u[4 + m]);
                let hi0 = _mm512_shuffle_f32x4::<0xDD>(u[m], u[4 + m]);
                let lo1 = _mm512_shuffle_f32x4::<0x88>(u[8 + m], u[12 + m]);
                let hi1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + m], u[12 + m]);
                v[m] = _mm512_shuffle_f32x4::<0x88>(lo0, lo1);
                v[8 + m] = _mm512_shuffle_f32x4::<0xDD>(lo0, lo1);
                v[4 + m] = _mm512_shuffle_f32x4::<0x88>(hi0, hi1);
                v[12 + m] = _mm512_shuffle_f32x4::<0xDD>(hi0, hi1);
            }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        }
        #[inline(always)]
        unsafe fn store(v: __m512, out: &mut [f32]) {
            _mm512_storeu_ps(out.as_mut_ptr(), v)
        }
    }

    impl Lanes for Avx2 {
        const N: usize = 8;
        const ROWS: usize = 1;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn fma(x: f32, w: __m256, acc: __m256) -> __m256 {
            _mm256_fmadd_ps(_mm256_set1_ps(x), w, acc)
        }
        #[inline(always)]
        unsafe fn fmav(x: __m256, w: __m256, acc: __m256) -> __m256 {
            _mm256_fmadd_ps(x, w, acc)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn join16(v: [__m256; 2]) -> f32 {
            let q = _mm_add_ps(
                _mm_add_ps(
                    _mm_add_ps(
                        _mm256_castps256_ps128(v[0]),
                        _mm256_extractf128_ps::<1>(v[0]),
                    ),
                    _mm256_castps256_ps128(v[1]),
                ),
                _mm256_extractf128_ps::<1>(v[1]),
            );
            join4(q)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn scale(v: __m256, s: f32) -> __m256 {
            _mm256_mul_ps(v, _mm256_set1_ps(s))
        }
        #[inline(always)]
        unsafe fn f32s(p: *const u8) -> __m256 {
            _mm256_loadu_ps(p as *const f32)
        }
        #[inline(always)]
        unsafe fn bf16s(p: *const u8) -> __m256 {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
        #[inline(always)]
        unsafe fn e4m3s(p: *const u8) -> __m256 {
            // As the AVX-512 path: f16 bits in 16-bit lanes, F16C's exact conversion (eight
            // codes read, the upper lanes zero).
            let b = _mm256_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
            let h = _mm256_castsi256_si128(e4m3_f16_lanes(b));
            _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0))
        }
        #[inline(always)]
        unsafe fn e2m1s(p: *const u8) -> __m256 {
            let b = _mm_cvtsi32_si128((p as *const i32).read_unaligned());
            let d = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
            let shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
            let idx = _mm256_and_si256(_mm256_srlv_epi32(d, shift), _mm256_set1_epi32(15));
            // Magnitude from the eight positive values, sign from bit 3.
            let lut = _mm256_loadu_ps(crate::quant::E2M1.as_ptr());
            let mag = _mm256_permutevar8x32_ps(lut, idx);
            let sign = _mm256_slli_epi32::<28>(_mm256_and_si256(idx, _mm256_set1_epi32(8)));
            _mm256_or_ps(mag, _mm256_castsi256_ps(sign))
        }
        const E4M3_UNIT: f32 = 256.0;
        #[inline(always)]
        unsafe fn e4m3x16(p: *const u8) -> [__m256; 2] {
            // As AVX-512 does, the second half converted apart: one load, one widening, the
            // bit operations once for both halves (14 instructions against 26).
            let h = e4m3_f16(p);
            [
                _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
                _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)),
            ]
        }
        #[inline(always)]
        unsafe fn e2m1x16(p: *const u8) -> [__m256; 2] {
            // The sixteen codes in order, one a byte; each code's BF16 value (exact: two bits of
            // mantissa) by two byte lookups, its high and low bytes; BF16 widened to f32. 13
            // instructions for sixteen weights, against 20 by the eight-wide permute.
            let b = _mm_loadl_epi64(p as *const __m128i);
            let m = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(b, m);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), m);
            let c = _mm_unpacklo_epi8(lo, hi);
            let (th, tl) = E2M1_BF16;
            let hb = _mm_shuffle_epi8(_mm_loadu_si128(th.as_ptr() as *const __m128i), c);
            let lb = _mm_shuffle_epi8(_mm_loadu_si128(tl.as_ptr() as *const __m128i), c);
            let wide =
                |w: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(w)));
            [
                wide(_mm_unpacklo_epi8(lb, hb)),
                wide(_mm_unpackhi_epi8(lb, hb)),
            ]
        }
        #[inline(always)]
        unsafe fn transpose(v: &mut [__m256]) {
            let mut t = [_mm256_setzero_ps(); 8];
            for p in 0..4 {
                t[2 * p] = _mm256_unpacklo_ps(v[2 * p], v[2 * p + 1]);
                t[2 * p + 1] = _mm256_unpackhi_ps(v[2 * p], v[2 * p + 1]);
            }
            // u[4g + m]: column 4L + m of rows 4g..4g+4, in each 128-bit lane L.
            let mut u = [_mm256_setzero_ps(); 8];
            for g in 0..2 {
                let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                u[4 * g] = _mm256_shuffle_ps::<0x44>(a, c);
                u[4 * g + 1] = _mm256_shuffle_ps::<0xEE>(a, c);
                u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(b, d);
                u[4 * g + 3] = _mm256_shuffle_ps::<0xEE>(b, d);
            }
            for m in 0..4 {
                v[m] = _mm256_permute2f128_ps::<0x20>(u[m], u[4 + m]);
                v[4 + m] = _mm256_permute2f128_ps::<0x31>(u[m], u[4 + m]);
            }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        }
        #[inline(always)]
        unsafe fn store(v: __m256, out: &mut [f32]) {
            _mm256_storeu_ps(out.as_mut_ptr(), v)
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(m: &Matrix, n0: usize, x: &[f32], rows: usize, out: &mut [f32]) {
        tile::<Avx512>(m, n0, x, rows, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2(m: &Matrix, n0: usize, x: &[f32], rows: usize, out: &mut [f32]) {
        tile::<Avx2>(m, n0, x, rows, out)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows16_avx512(
        m: &Matrix,
        j0: usize,
        x: &[f32],
        xb: &[(f32, f32)],
        rows: usize,
        out: &mut [f32],
    ) {
        rows16::<Avx512>(m, j0, x, xb, rows, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows16_avx2(
        m: &Matrix,
        j0: usize,
        x: &[f32],
        xb: &[(f32, f32)],
        rows: usize,
        out: &mut [f32],
    ) {
        rows16::<Avx2>(m, j0, x, xb, rows, out)
    }

    #[cfg(test)]
    pub fn decode_all(bytes: &[u8; 256]) -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        let mut v = [0f32; 16];
        if std::arch::is_x86_feature_detected!("avx512f") {
            let mut all = Vec::new();
            for c in bytes.chunks(16) {
                // SAFETY: the CPU has AVX-512; 16 bytes are read.
                unsafe { Avx512::store(avx512_e4m3(c.as_ptr()), &mut v) };
                all.extend_from_slice(&v);
            }
            out.push(all);
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut all = Vec::new();
            for c in bytes.chunks(8) {
                // SAFETY: the CPU has AVX2; 8 bytes are read.
                unsafe { Avx2::store(avx2_e4m3(c.as_ptr()), &mut v) };
                all.extend_from_slice(&v[..8]);
            }
            out.push(all);
        }
        out
    }

    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_e4m3(p: *const u8) -> __m512 {
        Avx512::e4m3s(p)
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_e4m3(p: *const u8) -> __m256 {
        Avx2::e4m3s(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::order::{dot_in, Order};
    use crate::checkpoint::Bytes;
    use crate::quant::E4M3;

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn e4m3_decodes_as_the_table() {
        let codes: [u8; 256] = std::array::from_fn(|i| i as u8);
        #[cfg(target_arch = "x86_64")]
        let paths = x86::decode_all(&codes);
        #[cfg(target_arch = "aarch64")]
        let paths = vec![neon::decode_all(&codes)];
        for got in paths {
            for (c, (g, w)) in got.iter().zip(E4M3.iter()).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "code {c:#04x}: {g} vs {w}"
                );
            }
        }
    }

    fn matrix(fmt: u8, n: usize, k: usize, seed: &mut u64) -> Matrix {
        let mut byte = || {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 33) as u8
        };
        let storage = match fmt {
            0 => Storage::F8 {
                w: Bytes::owned((0..n * k).map(|_| byte() & 0xfe).collect()),
                s: Bytes::owned(
                    (0..n.div_ceil(128) * k.div_ceil(128))
                        .map(|_| 120 + byte() % 10)
                        .collect(),
                ),
            },
            1 => Storage::F4 {
                w: Bytes::owned((0..n * k / 2).map(|_| byte()).collect()),
                s: Bytes::owned((0..n * k / 32).map(|_| 115 + byte() % 10).collect()),
            },
            2 => Storage::Bf16(Bytes::owned(
                (0..n * k)
                    .flat_map(|_| [byte(), 0x3c + byte() % 8])
                    .collect(),
            )),
            _ => Storage::F32(Bytes::owned(
                (0..n * k)
                    .flat_map(|_| ((byte() as f32 - 128.0) / 37.0).to_le_bytes())
                    .collect(),
            )),
        };
        Matrix {
            rows: n,
            cols: k,
            storage,
        }
    }

    /// Every format, one and several groups of sixteen, one and several activation rows: the
    /// lane kernels give the scalar sixteen-lane sums' bits.
    #[test]
    fn rows_sum_as_the_scalar_lanes() {
        let widths: Vec<usize> = [16, 8].into_iter().filter(|&l| l <= lanes()).collect();
        if widths.is_empty() {
            eprintln!("rows_sum_as_the_scalar_lanes: skipped (no AVX2, AVX-512 or NEON)");
            return;
        }
        let mut seed = 11u64;
        for (l, fmt) in widths.iter().flat_map(|&l| (0..4u8).map(move |f| (l, f))) {
            for (n, k) in [(3, 32), (10, 256), (7, 4096), (2, 896)] {
                let m = matrix(fmt, n, k, &mut seed);
                for rows in [1usize, 3, 6] {
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 311.0)
                        .collect();
                    let y = product16_in(l, &m, &x, rows, 1..n);
                    let mut w = vec![0f32; k];
                    for j in 1..n {
                        crate::backend::cpu::decode_row(&m, j, &mut w);
                        for r in 0..rows {
                            let want = dot_in(Order::Lanes16, &x[r * k..(r + 1) * k], &w);
                            assert_eq!(
                                y[r * (n - 1) + j - 1].to_bits(),
                                want.to_bits(),
                                "{l} lanes, format {fmt}, {n}x{k}, {rows} rows, output {j} of row {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// FP8 block scales multiply the activations where that is exact and the weights where not
    /// (activations that a scale would take below f32's normal range or past its top, scales
    /// whose products overflow, groups of outputs across two blocks of rows): the scalar
    /// sixteen-lane sums' bits either way.
    #[test]
    fn fp8_scales_on_the_activations_keep_the_bits() {
        let widths: Vec<usize> = [16, 8].into_iter().filter(|&l| l <= lanes()).collect();
        if widths.is_empty() {
            eprintln!("fp8_scales_on_the_activations_keep_the_bits: skipped (no SIMD)");
            return;
        }
        let (n, k) = (260, 512);
        let mut seed = 5u64;
        let Storage::F8 { w, .. } = matrix(0, n, k, &mut seed).storage else {
            unreachable!()
        };
        // Columns 256..384 hold codes of magnitude below 2: their huge activations' products
        // stay finite where the activations times scale and unit would not.
        let w: Vec<u8> = w
            .iter()
            .enumerate()
            .map(|(i, &c)| if (i % k) / 128 == 2 { c & 0xbf } else { c })
            .collect();
        // Per block of 128 x 128 (three blocks of rows, four of columns): column block 0
        // ordinary; 1 scales 2^-15 to 2^-17 (tiny activations times scale and unit become
        // subnormal); 2 scales 2^-1 to 2^6 (huge activations' would overflow in some); 3 a scale
        // of 2^120 (the weights' own products overflow: zero activations times them are NaN).
        let scales = [120u8, 112, 133, 120, 127, 113, 126, 121, 121, 110, 130, 247];
        let m = Matrix {
            rows: n,
            cols: k,
            storage: Storage::F8 {
                w: Bytes::owned(w),
                s: Bytes::owned(scales.to_vec()),
            },
        };
        // Ordinary activations in the first block of columns, tiny ones in the second, huge
        // ones in the third, small ones in the fourth, each alone (the others zero: no larger
        // sum hides their bits).
        for (rows, b, f) in [
            (1usize, 0, 1.0),
            (3, 1, 2f32.powi(-120)),
            (1, 2, 2f32.powi(119)),
        ] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| {
                    let v = ((i * 7919 % 1000) as f32 - 500.0) / 311.0;
                    if (i % k) / 128 == b {
                        v * f
                    } else {
                        0.0
                    }
                })
                .collect();
            for l in &widths {
                for range in [0..n, 126..n, 1..131] {
                    let y = product16_in(*l, &m, &x, rows, range.clone());
                    let mut w = vec![0f32; k];
                    for (jj, j) in range.clone().enumerate() {
                        crate::backend::cpu::decode_row(&m, j, &mut w);
                        for r in 0..rows {
                            let want = dot_in(Order::Lanes16, &x[r * k..(r + 1) * k], &w);
                            assert_eq!(
                                y[r * range.len() + jj].to_bits(),
                                want.to_bits(),
                                "{l} lanes, block {b}, outputs {range:?}: output {j} of row {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every format, widths with one and several chain blocks, one and several activation rows:
    /// the tiles give the scalar chain's bits.
    #[test]
    fn tiles_sum_as_the_scalar_chain() {
        let widths: Vec<usize> = [16, 8].into_iter().filter(|&l| l <= lanes()).collect();
        if widths.is_empty() {
            eprintln!("tiles_sum_as_the_scalar_chain: skipped (no AVX2, AVX-512 or NEON)");
            return;
        }
        let mut seed = 7u64;
        // Format 4: tiled BF16, also over outputs that end within a tile.
        for (l, fmt) in widths.iter().flat_map(|&l| (0..5u8).map(move |f| (l, f))) {
            let shapes = [
                (32usize, 256),
                (48, 1024),
                (16, 4096),
                (40, 896),
                (128, 768),
                (96, 512),
            ];
            for (n, k) in shapes {
                if !blocks(k).all(|b| b % l == 0) || (fmt == 4 && !n.is_multiple_of(TILES * l)) {
                    continue;
                }
                let m = matrix(if fmt == 4 { 2 } else { fmt }, n, k, &mut seed);
                let m = if fmt == 4 {
                    let Storage::Bf16(w) = &m.storage else {
                        unreachable!()
                    };
                    let t = tiles_of(w, n, k, TILES * l);
                    let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                    for j in 0..n {
                        crate::backend::cpu::decode_row(&m, j, &mut a);
                        crate::backend::cpu::decode_row(&t, j, &mut b);
                        assert_eq!(a, b, "{l} lanes, {n}x{k}: tiled row {j}");
                    }
                    t
                } else {
                    m
                };
                for (rows, end) in [(1usize, n), (3, n), (17, n), (1, n - l), (2, n - l)] {
                    if end < n && fmt != 4 {
                        continue;
                    }
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 311.0)
                        .collect();
                    let (y, whole) = product_in(l, &m, &x, rows, 0..end);
                    let n = end;
                    let mut w = vec![0f32; k];
                    for j in 0..whole {
                        crate::backend::cpu::decode_row(&m, j, &mut w);
                        for r in 0..rows {
                            let want = dot_in(Order::Chain, &x[r * k..(r + 1) * k], &w);
                            assert_eq!(
                                y[r * n + j].to_bits(),
                                want.to_bits(),
                                "{l} lanes, format {fmt}, {n}x{k}, {rows} rows, output {j} of row {r}"
                            );
                        }
                    }
                }
            }
        }
    }
}
