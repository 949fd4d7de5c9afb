//! Matrix products against weights in checkpoint precision.
//!
//! FP8/FP4 linears follow the reference: the activation is FP8-rounded in blocks of 128, both
//! sides are dequantized (exactly) and multiplied in f32. Plain linears decode BF16/F32 (or, for
//! `wo_a`, FP8 times its scale, which is exact) and multiply f32 activations. Each output is
//! summed in the order [`Numerics`] picks for the product's number of rows ([`super::order`]).

use rayon::prelude::*;

use super::order::{dot_in, Numerics, Order};
use super::{dpbf16, simd};
use crate::quant::{
    bf16, e8m0, QuantAct, ACT_BLOCK, E2M1, E4M3, FP4_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK,
};
use crate::weights::{Matrix, Storage};

/// Decodes row `r` of `m` to f32 with scales applied.
pub fn decode_row(m: &Matrix, r: usize, out: &mut [f32]) {
    let k = m.cols;
    match &m.storage {
        Storage::F8 { w, s } => {
            let kb = k.div_ceil(FP8_WEIGHT_BLOCK);
            let row = &w[r * k..(r + 1) * k];
            for (b, (o, c)) in out[..k]
                .chunks_mut(FP8_WEIGHT_BLOCK)
                .zip(row.chunks(FP8_WEIGHT_BLOCK))
                .enumerate()
            {
                let sc = e8m0(s[(r / FP8_WEIGHT_BLOCK) * kb + b]);
                for (o, &c) in o.iter_mut().zip(c) {
                    *o = E4M3[c as usize] * sc;
                }
            }
        }
        Storage::F4 { w, s } => {
            decode_fp4_codes(&w[r * k / 2..(r + 1) * k / 2], out);
            let sb = &s[r * (k / FP4_WEIGHT_BLOCK)..(r + 1) * (k / FP4_WEIGHT_BLOCK)];
            for (o, &sc) in out[..k].chunks_mut(FP4_WEIGHT_BLOCK).zip(sb) {
                let sc = e8m0(sc);
                o.iter_mut().for_each(|v| *v *= sc);
            }
        }
        Storage::Bf16Tiles { w, width } => {
            let (l, first) = (*width, (r / width) * k * width + r % width);
            for (c, o) in out[..k].iter_mut().enumerate() {
                let i = 2 * (first + c * l);
                *o = bf16(w[i], w[i + 1]);
            }
        }
        Storage::Bf16(w) => {
            for (o, c) in out[..k]
                .iter_mut()
                .zip(w[r * k * 2..(r + 1) * k * 2].chunks_exact(2))
            {
                *o = bf16(c[0], c[1]);
            }
        }
        Storage::F32(w) => {
            for (o, c) in out[..k]
                .iter_mut()
                .zip(w[r * k * 4..(r + 1) * k * 4].chunks_exact(4))
            {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// Unpacks FP4 codes (low nibble first) to their e2m1 values, unscaled.
#[inline]
fn decode_fp4_codes(packed: &[u8], out: &mut [f32]) {
    for (o, &b) in out.chunks_exact_mut(2).zip(packed) {
        o[0] = E2M1[(b & 15) as usize];
        o[1] = E2M1[(b >> 4) as usize];
    }
}

/// Runs `col(j, scratch, out_col)` for every output feature `j` in parallel and returns the
/// `rows x n` row-major result. `out_col` has one slot per activation row.
fn by_columns<F>(rows: usize, n: usize, k: usize, col: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let mut t = vec![0f32; rows * n];
    // Small products are not worth a thread hop.
    let min_len = (65536 / (rows * k).max(1)).max(1);
    t.par_chunks_mut(rows)
        .enumerate()
        .with_min_len(min_len)
        .for_each_init(|| vec![0f32; k], |scratch, (j, out)| col(j, scratch, out));
    row_major(t, rows, n)
}

/// `t[j * rows + r]` (the outputs one after another) as `rows x n` row-major.
pub(super) fn row_major(t: Vec<f32>, rows: usize, n: usize) -> Vec<f32> {
    if rows == 1 {
        return t;
    }
    let mut out = vec![0f32; rows * n];
    for j in 0..n {
        for r in 0..rows {
            out[r * n + j] = t[j * rows + r];
        }
    }
    out
}

/// `y = x W^T` with the reference numerics for `W`'s format: FP8-rounded activations for FP8 and
/// FP4 weights, f32 activations otherwise. `x` is `rows x m.cols`; returns `rows x m.rows`.
///
/// The reference multiplies the dequantized matrices (exact products: FP8 times FP8, FP4 times
/// FP8, scaled by powers of two) in float32, summed over `k` in the order `num` gives.
pub fn linear(m: &Matrix, x: &[f32], num: Numerics) -> Vec<f32> {
    match &m.storage {
        Storage::F8 { .. } | Storage::F4 { .. } => {
            let k = m.cols;
            let a = QuantAct::new(x, k);
            if num.product(a.rows, k) == Order::Lanes16 {
                if let Some(y) = dpbf16::product(m, &a, 0..m.rows) {
                    return y;
                }
            }
            let xd: Vec<f32> =
                a.q.iter()
                    .enumerate()
                    .map(|(i, q)| q * a.s[i / ACT_BLOCK])
                    .collect();
            linear_plain(m, &xd, num)
        }
        Storage::Bf16(_) | Storage::Bf16Tiles { .. } | Storage::F32(_) => linear_plain(m, x, num),
    }
}

/// `y = x W^T` in f32 with `W` decoded exactly (no activation rounding), whatever its storage.
pub fn linear_plain(m: &Matrix, x: &[f32], num: Numerics) -> Vec<f32> {
    linear_plain_rows(m, x, 0..m.rows, num)
}

/// [`linear_plain`] with only the output features `range` of `W` (rows of the matrix).
pub fn linear_plain_rows(
    m: &Matrix,
    x: &[f32],
    range: std::ops::Range<usize>,
    num: Numerics,
) -> Vec<f32> {
    let k = m.cols;
    let rows = x.len() / k;
    let order = num.product(rows, k);
    // Tiled weights are read by the chain order's kernels, from a tile's first row (and one
    // by one by the scalar loops).
    let tiled = match m.storage {
        Storage::Bf16Tiles { width, .. } => Some(width),
        _ => None,
    };
    if order == Order::Lanes16 && simd::takes16(k) && tiled.is_none() {
        return simd::product16(m, x, rows, range);
    }
    if order == Order::Chain
        && simd::takes(k)
        && tiled.is_none_or(|w| w == simd::tile_width() && range.start.is_multiple_of(w))
    {
        // Whole tiles on SIMD lanes (the same bits), the rest below.
        let (mut y, done) = simd::product(m, x, rows, range.clone());
        let n = range.len();
        if done < n {
            let rest = scalar_rows(m, x, range.start + done..range.end, order);
            let left = n - done;
            for r in 0..rows {
                y[r * n + done..(r + 1) * n].copy_from_slice(&rest[r * left..(r + 1) * left]);
            }
        }
        return y;
    }
    scalar_rows(m, x, range, order)
}

/// [`linear_plain_rows`] one output at a time: its weight row decoded, then a dot product per
/// activation row in `order`.
fn scalar_rows(m: &Matrix, x: &[f32], range: std::ops::Range<usize>, order: Order) -> Vec<f32> {
    let k = m.cols;
    let rows = x.len() / k;
    by_columns(rows, range.len(), k, |j, wrow, out| {
        decode_row(m, range.start + j, wrow);
        for (t, o) in out.iter_mut().enumerate() {
            *o = dot_in(order, &x[t * k..(t + 1) * k], wrow);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Bytes;
    use crate::quant::{encode_e4m3, round_e4m3};

    fn reference(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
        let rows = x.len() / k;
        let n = w.len() / k;
        let mut y = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                y[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn fp8_linear_matches_dequantized_product() {
        let (n, k, rows) = (130, 256, 3);
        let mut seed = 7;
        let codes: Vec<u8> = (0..n * k)
            .map(|_| encode_e4m3(round_e4m3(lcg(&mut seed) * 8.0)))
            .collect();
        let scales: Vec<u8> = (0..2 * 2).map(|i| 120 + i as u8).collect();
        let m = Matrix {
            rows: n,
            cols: k,
            storage: Storage::F8 {
                w: Bytes::owned(codes),
                s: Bytes::owned(scales),
            },
        };
        let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
        let mut wd = vec![0f32; n * k];
        for j in 0..n {
            decode_row(&m, j, &mut wd[j * k..(j + 1) * k]);
        }
        let xq = QuantAct::new(&x, k);
        let xd: Vec<f32> =
            xq.q.iter()
                .enumerate()
                .map(|(i, q)| q * xq.s[i / 128])
                .collect();
        let want = reference(&xd, &wd, k);
        let got = linear(&m, &x, Numerics::BatchInvariant);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-3), "{a} vs {b}");
        }
        // Batch independence: row 1 alone gives the same bits.
        let alone = linear(&m, &x[k..2 * k], Numerics::BatchInvariant);
        assert_eq!(&alone[..], &got[n..2 * n]);
    }

    #[test]
    fn fp4_linear_matches_dequantized_product() {
        let (n, k, rows) = (4, 128, 2);
        let mut seed = 3;
        let packed: Vec<u8> = (0..n * k / 2)
            .map(|_| (lcg(&mut seed).to_bits() >> 7) as u8)
            .collect();
        let scales: Vec<u8> = (0..n * k / 32).map(|i| 125 + (i % 4) as u8).collect();
        let m = Matrix {
            rows: n,
            cols: k,
            storage: Storage::F4 {
                w: Bytes::owned(packed),
                s: Bytes::owned(scales),
            },
        };
        let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
        let mut wd = vec![0f32; n * k];
        for j in 0..n {
            decode_row(&m, j, &mut wd[j * k..(j + 1) * k]);
        }
        let xq = QuantAct::new(&x, k);
        let xd: Vec<f32> =
            xq.q.iter()
                .enumerate()
                .map(|(i, q)| q * xq.s[i / 128])
                .collect();
        let want = reference(&xd, &wd, k);
        for (a, b) in linear(&m, &x, Numerics::BatchInvariant).iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-3), "{a} vs {b}");
        }
    }
}
