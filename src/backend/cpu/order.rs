//! Summation orders of the reference platform's float32 arithmetic.
//!
//! The golden fixtures were computed by the official code on an Intel AVX-512 CPU, where matrix
//! products run in MKL's sgemm and reductions in ATen's kernels. Rounding to FP8/FP4 and top-k
//! selection turn a one-ulp difference into a different value, so hadal sums in the same order
//! where the order is known. By default ([`Numerics::BatchInvariant`]) it takes only the orders
//! that do not depend on the batch: linears the many-row chain, attention scores the order for
//! the model's head count. [`Numerics::ReferenceShapes`] takes each product's order from its
//! number of rows, as the platform does. Each rule below was measured on that platform
//! (`tools/reference/probe_orders.py`; `docs/numerics.md` lists the results):
//!
//! - a product with several rows (more than [`small_rows`] of them) sums each output as one fused
//!   multiply-add chain over `k`, split for `k > 384` into blocks ([`blocks`]), each block from
//!   zero, blocks added in order;
//! - a product with 2 to [`small_rows`] rows keeps 16 lane chains (`k mod 16`), adds the four
//!   128-bit quarters of the vector in order, then the lanes as `(l0 + l1) + (l2 + l3)`;
//! - one row (a matrix-vector product) takes another kernel (the first element alone, then 16
//!   lanes reduced in a tree); it is not reproduced, and gets the 16-lane order;
//! - with 17-159 rows and `k >= 1024`, several threads split `k` among them, in an order that
//!   depends on their number; hadal takes the one-thread order (the blocks);
//! - ATen's float sum of a contiguous row: 8 lanes, four vector accumulators, and a cascade of
//!   partial sums for long rows ([`aten_sum`]).

/// How one output element of a matrix product is summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// One fused chain over `k`, in blocks (see [`blocks`]).
    Chain,
    /// Sixteen lane chains, reduced by quarters then pairs.
    Lanes16,
}

/// The largest number of rows MKL's small-matrix kernel takes for inner dimension `k`.
pub fn small_rows(k: usize) -> usize {
    match k {
        0..=128 => 5,
        129..=256 => 10,
        _ => 12,
    }
}

/// Which summation orders a forward pass takes for its matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// Every product sums in one order whatever its number of rows, chosen by its width alone,
    /// so a sequence gets the same bits alone or in any batch, prefilled at once or in chunks:
    /// what serving wants. From 1,024 wide (all of V4's products) sixteen lanes, the order SIMD
    /// registers stream a weight row in; narrower, chains, whose tiles cost no join per output
    /// (measured faster on the demo model's 128- and 256-wide products).
    #[default]
    BatchInvariant,
    /// Each product sums in the order the reference platform takes for its number of rows
    /// ([`order`]). Run with the reference's own schedule (its batch, prefill and decode steps),
    /// hadal then reproduces the reference's bits where the orders are known; a sequence's bits
    /// depend on the batch shape, as the reference's own do.
    ReferenceShapes,
}

impl Numerics {
    /// The order of a product of `rows` rows with inner dimension `k`.
    pub fn product(self, rows: usize, k: usize) -> Order {
        match self {
            Numerics::BatchInvariant if k >= 1024 => Order::Lanes16,
            Numerics::BatchInvariant => Order::Chain,
            Numerics::ReferenceShapes => order(rows, k),
        }
    }
}

/// The order a product of `m` rows with inner dimension `k` is summed in.
pub fn order(m: usize, k: usize) -> Order {
    if m <= small_rows(k) {
        Order::Lanes16
    } else {
        Order::Chain
    }
}

/// Block sizes of the chain over `k`: blocks of 384 while more than 768 elements remain, then the
/// rest as one block up to 384, else as two halves in whole units of 64 (larger first).
pub fn blocks(k: usize) -> impl Iterator<Item = usize> {
    const B: usize = 384;
    let full = k.saturating_sub(2 * B).div_ceil(B);
    let rest = k - full * B;
    let first = if rest > B {
        (rest / 64).div_ceil(2) * 64
    } else {
        rest
    };
    let tail = [first, rest - first];
    std::iter::repeat_n(B, full).chain(tail.into_iter().filter(|&b| b > 0))
}

#[inline(always)]
fn chain(a: &[f32], b: &[f32]) -> f32 {
    let mut tot = 0f32;
    let mut at = 0;
    for (i, len) in blocks(a.len()).enumerate() {
        let mut acc = 0f32;
        for (x, y) in a[at..at + len].iter().zip(&b[at..at + len]) {
            acc = x.mul_add(*y, acc);
        }
        tot = if i == 0 { acc } else { tot + acc };
        at += len;
    }
    tot
}

#[inline(always)]
fn lanes16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (ca, cb) in a.chunks(16).zip(b.chunks(16)) {
        for l in 0..ca.len() {
            acc[l] = ca[l].mul_add(cb[l], acc[l]);
        }
    }
    let q: [f32; 4] = std::array::from_fn(|l| ((acc[l] + acc[l + 4]) + acc[l + 8]) + acc[l + 12]);
    (q[0] + q[1]) + (q[2] + q[3])
}

#[inline(always)]
fn dot_generic(order: Order, a: &[f32], b: &[f32]) -> f32 {
    match order {
        Order::Chain => chain(a, b),
        Order::Lanes16 => lanes16(a, b),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn dot_fma(order: Order, a: &[f32], b: &[f32]) -> f32 {
    dot_generic(order, a, b)
}

/// `sum_k a[k] b[k]` with fused multiply-adds in `order` (`a` and `b` of equal length).
#[inline]
pub fn dot_in(order: Order, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA.
        return unsafe { dot_fma(order, a, b) };
    }
    dot_generic(order, a, b)
}

/// How many dot products [`chain_dots`] advances together.
pub const LANES: usize = 16;

/// Dot products in the chain order, [`LANES`] at a time: `out[r][l]` is `dot_in(Order::Chain,
/// rows[r], v_l)` bit for bit, where `t` holds the vectors `v_l` transposed (`t[k * LANES + l]
/// = v_l[k]`, `dim = t.len() / LANES`). A chain is one fused multiply-add after another, each
/// waiting for the last: one chain at a time leaves the multiply-add units idle for their
/// latency. Here each vector lane carries its own chain, so one instruction advances sixteen,
/// and several rows at a time keep several such vectors in flight. (The attention's scores:
/// lanes are heads, rows keys; the indexer's: lanes are entries, rows heads.)
pub fn chain_dots(t: &[f32], rows: &[&[f32]], out: &mut [[f32; LANES]]) {
    let dim = t.len() / LANES;
    assert!(out.len() >= rows.len() && rows.iter().all(|r| r.len() >= dim));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths were checked above.
            return unsafe { chain_dots_avx512(t, rows, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA; the lengths were checked above.
            return unsafe { chain_dots_avx2(t, rows, out) };
        }
    }
    chain_dots_portable(t, rows, out)
}

/// [`chain_dots`] one chain at a time, for CPUs without the vector paths.
fn chain_dots_portable(t: &[f32], rows: &[&[f32]], out: &mut [[f32; LANES]]) {
    let dim = t.len() / LANES;
    let cols: Vec<Vec<f32>> = (0..LANES)
        .map(|l| t.iter().skip(l).step_by(LANES).copied().collect())
        .collect();
    for (row, o) in rows.iter().zip(out) {
        for (v, c) in o.iter_mut().zip(&cols) {
            *v = dot_in(Order::Chain, &row[..dim], c);
        }
    }
}

/// Eight rows at a time, a 16-lane register each: 8 chains in flight.
///
/// # Safety
/// The CPU has AVX-512F; every row holds `t.len() / LANES` values, `out` `rows.len()` entries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chain_dots_avx512(t: &[f32], rows: &[&[f32]], out: &mut [[f32; LANES]]) {
    use std::arch::x86_64::*;
    const G: usize = 8;
    let dim = t.len() / LANES;
    for (rs, os) in rows.chunks(G).zip(out.chunks_mut(G)) {
        // A short last group repeats its last row; the repeats are not stored.
        let p: [*const f32; G] = std::array::from_fn(|g| rs[g.min(rs.len() - 1)].as_ptr());
        let mut tot = [_mm512_setzero_ps(); G];
        let mut at = 0;
        for (i, len) in blocks(dim).enumerate() {
            let mut acc = [_mm512_setzero_ps(); G];
            for k in at..at + len {
                let tk = _mm512_loadu_ps(t.as_ptr().add(k * LANES));
                for g in 0..G {
                    acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(*p[g].add(k)), tk, acc[g]);
                }
            }
            for g in 0..G {
                tot[g] = if i == 0 {
                    acc[g]
                } else {
                    _mm512_add_ps(tot[g], acc[g])
                };
            }
            at += len;
        }
        for (o, v) in os.iter_mut().zip(tot) {
            _mm512_storeu_ps(o.as_mut_ptr(), v);
        }
    }
}

/// Four rows at a time, two 8-lane registers each: 8 chains in flight.
///
/// # Safety
/// The CPU has AVX2 and FMA; every row holds `t.len() / LANES` values, `out` `rows.len()`
/// entries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chain_dots_avx2(t: &[f32], rows: &[&[f32]], out: &mut [[f32; LANES]]) {
    use std::arch::x86_64::*;
    const G: usize = 4;
    let dim = t.len() / LANES;
    for (rs, os) in rows.chunks(G).zip(out.chunks_mut(G)) {
        let p: [*const f32; G] = std::array::from_fn(|g| rs[g.min(rs.len() - 1)].as_ptr());
        let mut tot = [[_mm256_setzero_ps(); 2]; G];
        let mut at = 0;
        for (i, len) in blocks(dim).enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for k in at..at + len {
                let tk = t.as_ptr().add(k * LANES);
                let (lo, hi) = (_mm256_loadu_ps(tk), _mm256_loadu_ps(tk.add(8)));
                for g in 0..G {
                    let x = _mm256_set1_ps(*p[g].add(k));
                    acc[g][0] = _mm256_fmadd_ps(x, lo, acc[g][0]);
                    acc[g][1] = _mm256_fmadd_ps(x, hi, acc[g][1]);
                }
            }
            for g in 0..G {
                for h in 0..2 {
                    tot[g][h] = if i == 0 {
                        acc[g][h]
                    } else {
                        _mm256_add_ps(tot[g][h], acc[g][h])
                    };
                }
            }
            at += len;
        }
        for (o, v) in os.iter_mut().zip(tot) {
            _mm256_storeu_ps(o.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), v[1]);
        }
    }
}

/// `sum_k p[k] v_k` over rows `v_k` of `vals` (`len` wide), one fused chain per output in the
/// order of `p`: the reference's weighted sum of attention values.
pub fn weighted_rows<'a>(p: &[f32], vals: impl Iterator<Item = &'a [f32]>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA. Compiled for them, each fused multiply-add is one
        // instruction (the same rounding) across a vector of outputs, not a call to `fmaf`.
        return unsafe { weighted_rows_fma(p, vals, out) };
    }
    weighted_rows_generic(p, vals, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_rows_fma<'a>(p: &[f32], vals: impl Iterator<Item = &'a [f32]>, out: &mut [f32]) {
    weighted_rows_generic(p, vals, out)
}

#[inline(always)]
fn weighted_rows_generic<'a>(p: &[f32], vals: impl Iterator<Item = &'a [f32]>, out: &mut [f32]) {
    out.fill(0.0);
    for (&w, v) in p.iter().zip(vals) {
        for (o, x) in out.iter_mut().zip(v) {
            *o = w.mul_add(*x, *o);
        }
    }
}

/// ATen's float sum of a contiguous row: 8-lane vectors dealt to four accumulators, which
/// cascade through four levels for long rows; then the tail elements, then the lanes, in order.
pub fn aten_sum(x: &[f32]) -> f32 {
    aten_sum_of(x, |v| v)
}

/// [`aten_sum`] of `f(x[i])` (each term rounded to f32 before it is added), without a buffer.
#[inline]
pub fn aten_sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const V: usize = 8;
    type Lanes = [f32; V];
    let add = |a: &mut Lanes, b: &Lanes| a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    let vec = |i: usize| -> Lanes { std::array::from_fn(|l| f(x[i * V + l])) };
    let nv = x.len() / V;
    let mut lanes = [0f32; V];
    if nv > 0 {
        // Four accumulators take vectors 4i..4i+4; leftover vectors go to the first.
        let size = nv / 4;
        let mut p = cascade(
            size,
            [[0f32; V]; 4],
            |a, b| a.iter_mut().zip(&b).for_each(|(a, b)| add(a, b)),
            |i| std::array::from_fn(|k| vec(i * 4 + k)),
        );
        for r in size * 4..nv {
            add(&mut p[0], &vec(r));
        }
        lanes = p[0];
        for part in &p[1..] {
            add(&mut lanes, part);
        }
    }
    let mut s = 0f32;
    for &v in &x[nv * V..] {
        s += f(v);
    }
    for v in lanes {
        s += v;
    }
    s
}

/// ATen's float sum over a dimension that is not the innermost one (one output per column):
/// `n` terms `f(0..n)` through its four-level cascade.
pub fn aten_column_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    cascade(n, 0f32, |a, b| *a += b, f)
}

/// ATen's `multi_row_sum`: terms are added in runs of `2^power` into the first of four
/// accumulators, each run carried up a level (and further every `2^power` runs), the levels added
/// in order at the end.
fn cascade<A: Copy>(size: usize, zero: A, add: impl Fn(&mut A, A), load: impl Fn(usize) -> A) -> A {
    let ceil_log2 = if size > 1 {
        usize::BITS - (size - 1).leading_zeros()
    } else {
        0
    };
    let power = (ceil_log2 as usize / 4).max(4);
    let (step, mask) = (1usize << power, (1usize << power) - 1);
    let mut acc = [zero; 4];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            add(&mut acc[0], load(i));
            i += 1;
        }
        for j in 1..4 {
            let lower = std::mem::replace(&mut acc[j - 1], zero);
            add(&mut acc[j], lower);
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        add(&mut acc[0], load(i));
        i += 1;
    }
    let mut total = acc[0];
    for level in &acc[1..] {
        add(&mut total, *level);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_shapes_follow_the_row_count() {
        let r = Numerics::ReferenceShapes;
        assert_eq!(r.product(2, 256), Order::Lanes16);
        assert_eq!(r.product(10, 256), Order::Lanes16);
        assert_eq!(r.product(11, 256), Order::Chain);
        assert_eq!(r.product(6, 128), Order::Chain);
        for rows in [1, 2, 11, 406] {
            assert_eq!(Numerics::BatchInvariant.product(rows, 256), Order::Chain);
            assert_eq!(Numerics::BatchInvariant.product(rows, 4096), Order::Lanes16);
        }
    }

    #[test]
    fn chain_dots_are_the_chains() {
        // Widths of one block, of two and of several (the attention's 512, the indexer's
        // 128), row counts around the group sizes; values whose sums round.
        let val = |i: usize, seed: usize| {
            let h = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 10007;
            (h as f32 / 5003.0 - 1.0) * 2f32.powi((h % 13) as i32 - 6)
        };
        for dim in [1, 64, 128, 512, 1024, 1100] {
            for nrows in [0, 1, 3, 4, 7, 8, 9, 17] {
                let vecs: Vec<Vec<f32>> = (0..LANES)
                    .map(|l| (0..dim).map(|k| val(k * 31 + l, 7)).collect())
                    .collect();
                let t: Vec<f32> = (0..dim * LANES)
                    .map(|i| vecs[i % LANES][i / LANES])
                    .collect();
                let rows: Vec<Vec<f32>> = (0..nrows)
                    .map(|r| (0..dim).map(|k| val(k * 17 + r, 3)).collect())
                    .collect();
                let refs: Vec<&[f32]> = rows.iter().map(|r| &r[..]).collect();
                type Dots = fn(&[f32], &[&[f32]], &mut [[f32; LANES]]);
                let mut paths: Vec<(&str, Dots)> = vec![
                    ("dispatched", chain_dots),
                    ("portable", chain_dots_portable),
                ];
                #[cfg(target_arch = "x86_64")]
                {
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has AVX-512F; the lengths match.
                        paths.push(("avx512", |t, r, o| unsafe { chain_dots_avx512(t, r, o) }));
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has AVX2 and FMA; the lengths match.
                        paths.push(("avx2", |t, r, o| unsafe { chain_dots_avx2(t, r, o) }));
                    }
                }
                for (name, f) in paths {
                    let mut out = vec![[0f32; LANES]; nrows];
                    f(&t, &refs, &mut out);
                    for (r, o) in out.iter().enumerate() {
                        for (l, v) in vecs.iter().enumerate() {
                            let want = dot_in(Order::Chain, &rows[r], v);
                            assert_eq!(
                                o[l].to_bits(),
                                want.to_bits(),
                                "{name}: dim {dim} row {r} lane {l}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn blocks_cover_k_as_measured() {
        let b = |k| blocks(k).collect::<Vec<_>>();
        assert_eq!(b(256), [256]);
        assert_eq!(b(512), [256, 256]);
        assert_eq!(b(768), [384, 384]);
        assert_eq!(b(1024), [384, 320, 320]);
        assert_eq!(b(1536), [384; 4]);
        assert_eq!(b(2048), [384, 384, 384, 384, 256, 256]);
        assert_eq!(b(100), [100]);
    }

    /// With +-2^40 at `i` and `j` and ones elsewhere, a sum returns `n - |LCA(i, j)|`: the
    /// number of ones added outside the subtree where the two big values cancel.
    fn lca(f: impl Fn(&[f32]) -> f32, n: usize, i: usize, j: usize) -> usize {
        let mut x = vec![1f32; n];
        x[i] = 2f32.powi(40);
        x[j] = -x[i];
        n - f(&x) as usize
    }

    #[test]
    fn lanes16_tree_is_the_measured_one() {
        let ones = vec![1f32; 128];
        let f = |x: &[f32]| dot_in(Order::Lanes16, x, &ones);
        // Lane 0 is a chain over k = 0, 16, 32, ...; quarters join lanes 0, 4, 8, 12 in order.
        assert_eq!(lca(f, 128, 0, 16), 2);
        assert_eq!(lca(f, 128, 0, 4), 16);
        assert_eq!(lca(f, 128, 0, 8), 24);
        assert_eq!(lca(f, 128, 0, 1), 64);
        assert_eq!(lca(f, 128, 0, 2), 128);
    }

    #[test]
    fn chain_blocks_join_in_order() {
        let ones = vec![1f32; 1024];
        let f = |x: &[f32]| dot_in(Order::Chain, x, &ones);
        assert_eq!(lca(f, 1024, 0, 383), 384);
        assert_eq!(lca(f, 1024, 0, 384), 704);
        assert_eq!(lca(f, 1024, 1023, 704), 320);
        assert_eq!(lca(f, 1024, 0, 1023), 1024);
    }

    #[test]
    fn aten_sum_tree_is_the_measured_one() {
        // Lanes join at the end in order; lane 0's vectors pair as (v0 + v4) + (v1 + v5) ...
        assert_eq!(lca(aten_sum, 64, 0, 1), 16);
        assert_eq!(lca(aten_sum, 64, 0, 32), 2);
        assert_eq!(lca(aten_sum, 64, 0, 8), 4);
        assert_eq!(lca(aten_sum, 64, 0, 16), 6);
        assert_eq!(lca(aten_sum, 256, 0, 1), 64);
        // The 3 tail elements come first.
        assert_eq!(lca(aten_sum, 67, 64, 65), 2);
        assert_eq!(aten_sum(&[1.0, 2.0, 3.0]), 6.0);
    }

    #[test]
    fn column_sum_runs_of_16_then_join_in_order() {
        let col = |x: &[f32]| aten_column_sum(x.len(), |i| x[i]);
        // Up to 16 terms: one running sum.
        assert_eq!(lca(col, 8, 0, 7), 8);
        assert_eq!(lca(col, 8, 2, 3), 4);
        // 128 terms: runs of 16, each summed alone, then added in order.
        assert_eq!(lca(col, 128, 16, 17), 2);
        assert_eq!(lca(col, 128, 0, 16), 32);
        assert_eq!(lca(col, 128, 17, 40), 48);
        assert_eq!(lca(col, 128, 0, 127), 128);
    }
}
