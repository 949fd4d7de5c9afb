//! Top-k selection that picks the same entries among equal scores as the reference.
//!
//! The reference selects with `torch.topk` on the CPU, which does not break ties by index: it
//! runs the C++ standard library's selection over `(value, index)` pairs compared by value alone
//! (GNU libstdc++'s introselect, then introsort of the first `k - 1`; or, when `64 k <= n`, a heap
//! selection and heap sort), so which of several equal scores survive depends on where the
//! partitions fall. Exact ties are common in the lightning indexer: an entry that every index
//! head scores below zero gets exactly 0 after the ReLU, and the golden fixtures keep whichever
//! such entries these algorithms keep (on `tiny-a`, sequence 1 position 452 keeps entry 89, not
//! entry 6). The functions below reproduce those algorithms step for step (pivot choice,
//! partition, insertion thresholds, heap layout); `tests/topk_torch.rs` checks them against
//! rows that torch itself ranked.

type Elem = (f32, usize);

/// Indices of the `k` largest of `scores` (NaN counts as largest), in the order `torch.topk`
/// returns them on the CPU, including its choice among equal values.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let n = scores.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut q: Vec<Elem> = scores.iter().copied().zip(0..).collect();
    if k * 64 <= n {
        heap_select(&mut q, k);
        sort_heap(&mut q[..k]);
    } else {
        nth_element(&mut q, k - 1);
        sort(&mut q[..k - 1]);
    }
    q[..k].iter().map(|e| e.1).collect()
}

/// "`a` ranks before `b`": larger value first, NaN before numbers, equal values unordered.
#[inline]
fn before(a: &Elem, b: &Elem) -> bool {
    (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0
}

/// `floor(log2(n))`, the recursion budget of introselect and introsort (twice this).
fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

/// Rearranges `v` so that `v[nth]` is the element a full sort would put there, everything
/// before it ranking no lower and everything after no higher.
fn nth_element(v: &mut [Elem], nth: usize) {
    if v.is_empty() || nth >= v.len() {
        return;
    }
    let (mut lo, mut hi) = (0, v.len());
    let mut depth = 2 * lg(v.len());
    while hi - lo > 3 {
        if depth == 0 {
            heap_select(&mut v[lo..hi], nth + 1 - lo);
            v.swap(lo, nth);
            return;
        }
        depth -= 1;
        let cut = lo + partition_pivot(&mut v[lo..hi]);
        if cut <= nth {
            lo = cut;
        } else {
            hi = cut;
        }
    }
    insertion_sort(&mut v[lo..hi]);
}

/// Introsort: quicksort partitions down to runs of 16, heapsort past the depth budget, then
/// one insertion pass.
fn sort(v: &mut [Elem]) {
    if v.is_empty() {
        return;
    }
    introsort_loop(v, 2 * lg(v.len()));
    if v.len() > SORT_THRESHOLD {
        insertion_sort(&mut v[..SORT_THRESHOLD]);
        for i in SORT_THRESHOLD..v.len() {
            linear_insert(v, i);
        }
    } else {
        insertion_sort(v);
    }
}

const SORT_THRESHOLD: usize = 16;

fn introsort_loop(v: &mut [Elem], mut depth: usize) {
    let mut hi = v.len();
    while hi > SORT_THRESHOLD {
        if depth == 0 {
            heap_select(&mut v[..hi], hi);
            sort_heap(&mut v[..hi]);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(&mut v[..hi]);
        introsort_loop(&mut v[cut..hi], depth);
        hi = cut;
    }
}

/// Moves the median of `v[1]`, `v[mid]`, `v[last]` to `v[0]` and partitions the rest around
/// it; returns where the upper part starts.
fn partition_pivot(v: &mut [Elem]) -> usize {
    let (mid, last) = (v.len() / 2, v.len() - 1);
    let (a, b, c) = (1, mid, last);
    let median = if before(&v[a], &v[b]) {
        if before(&v[b], &v[c]) {
            b
        } else if before(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if before(&v[a], &v[c]) {
        a
    } else if before(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(0, median);
    // Hoare partition of v[1..] around v[0], with no bounds checks in the original: the
    // median-of-three guarantees both scans stop inside the slice.
    let (mut f, mut l) = (1, v.len());
    loop {
        while before(&v[f], &v[0]) {
            f += 1;
        }
        l -= 1;
        while before(&v[0], &v[l]) {
            l -= 1;
        }
        if f >= l {
            return f;
        }
        v.swap(f, l);
        f += 1;
    }
}

fn insertion_sort(v: &mut [Elem]) {
    for i in 1..v.len() {
        if before(&v[i], &v[0]) {
            v[..=i].rotate_right(1);
        } else {
            linear_insert(v, i);
        }
    }
}

/// Moves `v[i]` down past the elements it ranks before (an element ranking before `v[0]`
/// never reaches here).
fn linear_insert(v: &mut [Elem], mut i: usize) {
    let val = v[i];
    while before(&val, &v[i - 1]) {
        v[i] = v[i - 1];
        i -= 1;
    }
    v[i] = val;
}

/// Leaves in `v[..m]`, as a heap with the lowest-ranked element on top, the `m` elements a
/// full sort would put first.
fn heap_select(v: &mut [Elem], m: usize) {
    make_heap(&mut v[..m]);
    for i in m..v.len() {
        if before(&v[i], &v[0]) {
            // Pop the heap's top into slot i, and sift v[i]'s old value in from the top.
            let val = v[i];
            v[i] = v[0];
            adjust_heap(&mut v[..m], 0, val);
        }
    }
}

fn make_heap(v: &mut [Elem]) {
    let len = v.len();
    if len < 2 {
        return;
    }
    for parent in (0..=(len - 2) / 2).rev() {
        adjust_heap(v, parent, v[parent]);
    }
}

fn sort_heap(v: &mut [Elem]) {
    for last in (1..v.len()).rev() {
        let val = v[last];
        v[last] = v[0];
        adjust_heap(&mut v[..last], 0, val);
    }
}

/// Fills the hole at `hole` by moving the larger child up to a leaf, then pushes `val` back
/// up from there. `v` is never empty.
fn adjust_heap(v: &mut [Elem], mut hole: usize, val: Elem) {
    let (len, top) = (v.len(), hole);
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if before(&v[child], &v[child - 1]) {
            child -= 1;
        }
        v[hole] = v[child];
        hole = child;
    }
    if len % 2 == 0 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[hole] = v[child - 1];
        hole = child - 1;
    }
    while hole > top {
        let parent = (hole - 1) / 2;
        if !before(&v[parent], &val) {
            break;
        }
        v[hole] = v[parent];
        hole = parent;
    }
    v[hole] = val;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_value() {
        assert_eq!(top_k(&[1.0, 3.0, 2.0, 0.0, 5.0], 3), vec![4, 1, 2]);
        assert_eq!(top_k(&[2.0, 1.0], 5), vec![0, 1]);
        assert_eq!(top_k(&[1.0, f32::NAN, 2.0], 1), vec![1]);
        assert!(top_k(&[], 3).is_empty());
    }

    #[test]
    fn sorts_match_a_stable_sort_by_value() {
        // Distinct values: any correct selection and sort gives one answer.
        let mut x = 0x2545f491u32;
        for n in [1usize, 5, 17, 40, 200, 1000] {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as f32
                })
                .collect();
            let mut want: Vec<usize> = (0..n).collect();
            want.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
            for k in [1, 2, 3, 8, 15, n] {
                let k = k.min(n);
                assert_eq!(top_k(&v, k), want[..k], "n {n} k {k}");
            }
        }
    }

    #[test]
    fn ties_follow_torch_not_index() {
        // torch.zeros(10).topk(3) on the CPU.
        assert_eq!(top_k(&[0.0; 10], 3), vec![8, 6, 7]);
    }
}
