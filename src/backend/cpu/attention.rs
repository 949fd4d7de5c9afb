//! Attention, the compressors and the lightning indexer on the CPU, laid out as the reference
//! lays out its index rows (which decides how its exponentials are summed).

use rayon::prelude::*;

use super::ops::{rms_norm, sink_attention, softmax_strided, RowLayout};
use super::order::{aten_column_sum, chain_dots, dot_in, order, Numerics, Order, LANES};
use super::{top_k, Batch, Cpu};
use crate::model::attention::Attention;
use crate::model::compressor::Compressor;
use crate::model::indexer::Indexer;
use crate::model::rope::Freqs;
use crate::model::Span;
use crate::quant::hadamard;
use crate::state::{BlockState, CompressorState, RowCodec};

/// Feeds the projections of the token at `pos` to a compressor's state; emits an entry when its
/// block completes.
pub fn push(
    c: &Compressor<Cpu>,
    st: &mut CompressorState,
    pos: usize,
    kv: &[f32],
    score: &[f32],
    freqs: &Freqs,
) {
    let (r, w) = (c.ratio, c.width());
    let slot = pos % r;
    debug_assert_eq!(st.kv.len(), slot * w, "compressor state out of step");
    st.kv.extend_from_slice(kv);
    st.score.extend(
        score
            .iter()
            .zip(&c.ape[slot * w..(slot + 1) * w])
            .map(|(s, a)| s + a),
    );
    if slot + 1 < r {
        return;
    }
    let d = c.dim;
    let mut entry = vec![0f32; d];
    let mut p = vec![0f32; 2 * r];
    for (j, e) in entry.iter_mut().enumerate() {
        // Rows taking part, previous block's overlap halves first.
        let (prev, off) = if c.overlap {
            (st.prev_kv.len() / d, d)
        } else {
            (0, 0)
        };
        let n = prev + r;
        for (i, v) in p[..prev].iter_mut().enumerate() {
            *v = st.prev_score[i * d + j];
        }
        for (i, v) in p[prev..n].iter_mut().enumerate() {
            *v = st.score[i * w + off + j];
        }
        let pr = &mut p[..n];
        softmax_strided(pr);
        *e = aten_column_sum(n, |i| {
            let v = if i < prev {
                st.prev_kv[i * d + j]
            } else {
                st.kv[(i - prev) * w + off + j]
            };
            v * pr[i]
        });
    }
    if c.overlap {
        st.prev_kv = st.kv.chunks(w).flat_map(|x| &x[..d]).copied().collect();
        st.prev_score = st.score.chunks(w).flat_map(|x| &x[..d]).copied().collect();
    }
    st.kv.clear();
    st.score.clear();
    rms_norm(&mut entry, &c.norm, c.eps);
    Freqs::apply(&mut entry, &freqs.at(pos + 1 - r), false);
    if matches!(c.codec, RowCodec::Index { .. }) {
        hadamard(&mut entry);
    }
    let mut packed = vec![0u8; c.codec.bytes()];
    c.codec.encode(&mut entry, &mut packed);
    st.entries.push(&packed);
}

/// Decodes the given entries of a compressor, in order, into `rows.len() x dim` f32.
pub fn decode_rows(codec: RowCodec, st: &CompressorState, rows: &[usize]) -> Vec<f32> {
    let (b, d) = (codec.bytes(), codec.dim());
    let mut out = vec![0f32; rows.len() * d];
    out.par_chunks_mut(d)
        .zip(rows)
        .with_min_len(64)
        .for_each(|(o, &r)| codec.decode(st.entries.row(r, b), o));
    out
}

/// Decodes every entry of a compressor into blocks of [`LANES`] entries, each block transposed
/// ([`decode_block`]): the layout [`chain_dots`] reads.
fn decode_lanes(codec: RowCodec, st: &CompressorState) -> Vec<f32> {
    let d = codec.dim();
    let mut out = vec![0f32; st.entries.len.div_ceil(LANES) * LANES * d];
    out.par_chunks_mut(d * LANES).enumerate().for_each_init(
        || vec![0f32; d],
        |row, (b, blk)| decode_block(codec, st, b, row, blk),
    );
    out
}

/// Entries `b LANES..` of a compressor (up to [`LANES`], as many as there are) transposed into
/// `blk` (`dim x LANES`: entry `b LANES + l`'s value `k` at `k LANES + l`), missing ones zero;
/// `row` holds `dim` values.
fn decode_block(codec: RowCodec, st: &CompressorState, b: usize, row: &mut [f32], blk: &mut [f32]) {
    let m = LANES.min(st.entries.len - b * LANES);
    if m < LANES {
        blk.fill(0.0);
    }
    for l in 0..m {
        codec.decode(st.entries.row(b * LANES + l, codec.bytes()), row);
        for (k, &v) in row.iter().enumerate() {
            blk[k * LANES + l] = v;
        }
    }
}

/// For each sequence and query, the entries (among the first `n` visible) it attends to, best
/// first. Each query is ranked in a row of `ranked >= n` entries whose not yet visible ones
/// score -inf: the reference ranks such a row, of every entry its forward call will have, and
/// which of several tied scores it keeps depends on the row's length (see `super::topk`).
pub fn index_topk(
    ix: &Indexer<Cpu>,
    b: &Batch<'_>,
    slot: usize,
    q: &[f32],
    w: &[f32],
    num: Numerics,
) -> Vec<Vec<Vec<usize>>> {
    let (hq, hw) = (ix.heads * ix.dim, ix.heads);
    let ratio = ix.compressor.ratio;
    b.spans
        .iter()
        .zip(&b.states)
        .map(|(s, st)| {
            let ist = st.blocks[slot]
                .indexer
                .as_ref()
                .expect("CSA block without indexer state");
            let (dim, codec) = (ix.dim, ix.compressor.codec);
            // A chunk of many queries decodes every entry once for them all; a few queries (a
            // decode step) decode each block of entries where they score it, in a buffer of
            // the thread's, so that no array of the whole history is written and read back.
            let all = (s.len > 16).then(|| decode_lanes(codec, ist));
            let ranked = (s.pos + s.len).max(s.prompt_end) / ratio;
            // The reference's score product has a row per position and head.
            let ord = num.product(s.len * ix.heads, dim);
            (0..s.len)
                .into_par_iter()
                .map(|i| {
                    let t = s.start + i;
                    let n = (s.pos + i + 1) / ratio;
                    let (qt, wt) = (&q[t * hq..(t + 1) * hq], &w[t * hw..(t + 1) * hw]);
                    let heads: Vec<&[f32]> = qt.chunks(dim).collect();
                    // An entry's score: its heads' dots, each ReLU'd and weighted, added in
                    // head order; LANES entries at a time, each lane one entry's sum.
                    let mut scores = vec![0f32; n.div_ceil(LANES) * LANES];
                    scores.par_chunks_mut(LANES).enumerate().for_each_init(
                        || {
                            let dots = vec![[0f32; LANES]; heads.len()];
                            (dots, vec![0f32; dim], vec![0f32; dim * LANES])
                        },
                        |(dots, row, own), (blk, sc)| {
                            let kt: &[f32] = match &all {
                                Some(a) => &a[blk * dim * LANES..(blk + 1) * dim * LANES],
                                None => {
                                    decode_block(codec, ist, blk, row, own);
                                    own
                                }
                            };
                            if ord == Order::Chain {
                                chain_dots(kt, &heads, dots);
                            } else {
                                for l in 0..LANES {
                                    for (k, v) in row.iter_mut().enumerate() {
                                        *v = kt[k * LANES + l];
                                    }
                                    for (d, qh) in dots.iter_mut().zip(&heads) {
                                        d[l] = dot_in(ord, qh, row);
                                    }
                                }
                            }
                            for (d, &wh) in dots.iter().zip(wt) {
                                for (s, &x) in sc.iter_mut().zip(d) {
                                    *s += x.max(0.0) * wh;
                                }
                            }
                        },
                    );
                    scores.truncate(n);
                    scores.resize(ranked.max(n), f32::NEG_INFINITY);
                    // In the order torch.topk returns them (best first), which is the order the
                    // attention sums them in; the entries not yet visible come last and go.
                    let mut idx = top_k(&scores, ix.topk);
                    idx.retain(|&e| e < n);
                    idx
                })
                .collect()
        })
        .collect()
}

/// Per-sequence keys of one chunk.
struct SeqKeys {
    /// Decoded raw KV rows from position `first` on (window history, then the chunk).
    raw: Vec<f32>,
    first: usize,
    /// Decoded compressed entries (`n x dim`, only those attended) and, per query, the rows of
    /// `comp` it attends to.
    comp: Vec<f32>,
    picks: Vec<Vec<usize>>,
}

/// Collects the keys of one sequence's chunk: window rows and the compressed entries its
/// queries attend to (`picks` for CSA, every finished entry for HCA).
fn keys(
    a: &Attention<Cpu>,
    s: &Span,
    st: &BlockState,
    chunk_kv: &[f32],
    picks: Option<&Vec<Vec<usize>>>,
) -> SeqKeys {
    let (w, dh) = (a.window, a.dim);
    let first = s.pos.saturating_sub(w - 1);
    let mut raw = vec![0f32; (s.pos - first) * dh];
    let b = a.codec.bytes();
    for (i, p) in (first..s.pos).enumerate() {
        let slot = p % w;
        a.codec.decode(
            &st.window[slot * b..(slot + 1) * b],
            &mut raw[i * dh..(i + 1) * dh],
        );
    }
    raw.extend_from_slice(chunk_kv);

    let mut comp = Vec::new();
    let mut picks: Vec<Vec<usize>> = match picks {
        Some(p) => p.clone(),
        None if a.compressor.is_some() => (0..s.len)
            .map(|i| (0..(s.pos + i + 1) / a.ratio).collect())
            .collect(),
        None => Vec::new(),
    };
    if let Some(cst) = st.compressor.as_ref() {
        // Decode only the entries some query of the chunk attends to, and point the picks at
        // their rows: a decoded token touches index_topk entries, not the whole history.
        let mut used: Vec<usize> = picks.iter().flatten().copied().collect();
        used.sort_unstable();
        used.dedup();
        comp = decode_rows(a.codec, cst, &used);
        let mut row = vec![u32::MAX; cst.entries.len];
        for (r, &e) in used.iter().enumerate() {
            row[e] = r as u32;
        }
        for p in picks.iter_mut().flatten() {
            *p = row[*p] as usize;
        }
    }
    SeqKeys {
        raw,
        first,
        comp,
        picks,
    }
}

/// Writes a chunk's packed KV rows into the window ring.
fn store_window(a: &Attention<Cpu>, s: &Span, st: &mut BlockState, packed: &[u8]) {
    let (w, b) = (a.window, a.codec.bytes());
    if st.window.len() != w * b {
        st.window = vec![0u8; w * b];
    }
    let from = s.len.saturating_sub(w);
    for i in from..s.len {
        let slot = (s.pos + i) % w;
        st.window[slot * b..(slot + 1) * b].copy_from_slice(&packed[i * b..(i + 1) * b]);
    }
}

/// Heads `h0..` (as many as `out` holds) of one query at position `pos`, `q` all of its
/// heads. The query sees its window rows, then its compressed picks, in the reference's index
/// row (window slots then compressed slots, each padded with empty slots up to the row's width,
/// which decides how the exponentials are summed). Scores in the chain order are computed for
/// [`LANES`] heads at once ([`chain_dots`]: the same bits).
#[allow(clippy::too_many_arguments)]
fn attend_heads(
    a: &Attention<Cpu>,
    q: &[f32],
    h0: usize,
    pos: usize,
    prompt: usize,
    keys: &SeqKeys,
    i: usize,
    out: &mut [f32],
) {
    let dh = a.dim;
    let lo = pos.saturating_sub(a.window - 1) - keys.first;
    let hi = pos + 1 - keys.first;
    let picks: &[usize] = keys.picks.get(i).map_or(&[], |v| v);
    let (window_width, comp_width) = if pos < prompt {
        let entries = prompt.checked_div(a.ratio).unwrap_or(0);
        let comp = a
            .indexer
            .as_ref()
            .map_or(entries, |ix| ix.topk.min(entries));
        (a.window.min(prompt), comp)
    } else {
        (a.window, picks.len())
    };
    let layout = RowLayout {
        window: hi - lo,
        window_pad: window_width.saturating_sub(hi - lo),
        tail_pad: comp_width.saturating_sub(picks.len()),
    };
    let rows: Vec<&[f32]> = keys.raw[lo * dh..hi * dh]
        .chunks(dh)
        .chain(picks.iter().map(|&b| &keys.comp[b * dh..(b + 1) * dh]))
        .collect();
    let ord = order(a.heads, dh);
    let scale = (dh as f64).powf(-0.5) as f32;
    let lanes = if ord == Order::Chain {
        let mut t = vec![0f32; dh * LANES];
        for (l, qh) in q[h0 * dh..].chunks(dh).take(out.len() / dh).enumerate() {
            for (k, &v) in qh.iter().enumerate() {
                t[k * LANES + l] = v;
            }
        }
        // Keys in parallel too: a decode step has only heads / LANES such groups, and at long
        // contexts (an HCA layer's 8K entries at 1M) each is long.
        let mut sc = vec![[0f32; LANES]; rows.len()];
        sc.par_chunks_mut(256)
            .zip(rows.par_chunks(256))
            .for_each(|(s, r)| chain_dots(&t, r, s));
        sc
    } else {
        Vec::new()
    };
    out.par_chunks_mut(dh).enumerate().for_each(|(l, o)| {
        let head = h0 + l;
        let sc: Vec<f32> = if ord == Order::Chain {
            lanes.iter().map(|s| s[l] * scale).collect()
        } else {
            let qh = &q[head * dh..(head + 1) * dh];
            rows.iter().map(|k| dot_in(ord, qh, k) * scale).collect()
        };
        sink_attention(sc, rows.iter().copied(), a.sink[head], layout, o);
    });
}

/// Attention of every query head of the batch; rounds and stores the chunk's KV rows in the
/// window. Returns `T x H x Dh` before the inverse rotation.
pub fn attend(
    a: &Attention<Cpu>,
    b: &mut Batch<'_>,
    slot: usize,
    q: &[f32],
    kv: &[f32],
    picks: Option<&Vec<Vec<Vec<usize>>>>,
) -> Vec<f32> {
    let (h, dh) = (a.heads, a.dim);
    let t_all = b.tokens.len();
    let row_bytes = a.codec.bytes();
    let mut kv = kv.to_vec();
    let mut packed = vec![0u8; t_all * row_bytes];
    for (row, pk) in kv.chunks_mut(dh).zip(packed.chunks_mut(row_bytes)) {
        a.codec.encode(row, pk);
    }
    let mut o = vec![0f32; t_all * h * dh];
    for i in 0..b.spans.len() {
        let s = b.spans[i];
        let rows = s.start..s.start + s.len;
        // Positions before `prompt` are attended as the reference's one prefill of the prompt
        // lays out its index rows; later ones as its one-token decode steps.
        let prompt = s.prompt_end.max(if s.pos == 0 { s.len } else { 0 });
        let st = b.block(i, slot);
        let keys = keys(
            a,
            &s,
            st,
            &kv[rows.start * dh..rows.end * dh],
            picks.map(|p| &p[i]),
        );
        store_window(
            a,
            &s,
            st,
            &packed[rows.start * row_bytes..rows.end * row_bytes],
        );
        let qs = &q[rows.start * h * dh..rows.end * h * dh];
        // Heads in groups of LANES where the scores are chains (one pass over the keys for
        // them all), else one at a time.
        let group = if order(h, dh) == Order::Chain {
            LANES
        } else {
            1
        };
        o[rows.start * h * dh..rows.end * h * dh]
            .par_chunks_mut(h * dh)
            .enumerate()
            .for_each(|(t, ot)| {
                let qt = &qs[t * h * dh..(t + 1) * h * dh];
                ot.par_chunks_mut(group * dh)
                    .enumerate()
                    .for_each(|(g, out)| {
                        attend_heads(a, qt, g * group, s.pos + t, prompt, &keys, t, out)
                    });
            });
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{linear_plain, ops::softmax};
    use crate::checkpoint::{Checkpoint, RawTensor};
    use crate::model::Loader;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    fn compressor(ratio: usize, dim: usize, hidden: usize, codec: RowCodec) -> Compressor<Cpu> {
        let width = if ratio == 4 { 2 * dim } else { dim };
        let ck = Checkpoint::from_tensors(vec![
            RawTensor::f32("c.wkv.weight", &[width, hidden], &values(width * hidden, 1)),
            RawTensor::f32(
                "c.wgate.weight",
                &[width, hidden],
                &values(width * hidden, 2),
            ),
            RawTensor::f32("c.ape", &[ratio, width], &values(ratio * width, 3)),
            RawTensor::f32("c.norm.weight", &[dim], &values(dim, 4)),
        ]);
        let dev = Cpu::default();
        let mut l = Loader::new(&dev, ck);
        let c = Compressor::load(&mut l, "c", hidden, ratio, dim, codec, 1e-6).unwrap();
        l.ck.finish().unwrap();
        c
    }

    /// Entry b from the whole sequence at once, as the architecture document states it.
    fn direct(c: &Compressor<Cpu>, kv: &[f32], score: &[f32], b: usize, f: &Freqs) -> Vec<f32> {
        let (r, d, w) = (c.ratio, c.dim, c.width());
        let mut rows: Vec<(f32, f32)> = Vec::new(); // (kv, score) per row for one dim
        let mut out = vec![0f32; d];
        for (j, o) in out.iter_mut().enumerate() {
            rows.clear();
            if c.overlap && b > 0 {
                for t in (b - 1) * r..b * r {
                    rows.push((kv[t * w + j], score[t * w + j] + c.ape[(t % r) * w + j]));
                }
            }
            let off = if c.overlap { d } else { 0 };
            for t in b * r..(b + 1) * r {
                rows.push((
                    kv[t * w + off + j],
                    score[t * w + off + j] + c.ape[(t % r) * w + off + j],
                ));
            }
            let mut p: Vec<f32> = rows.iter().map(|x| x.1).collect();
            softmax(&mut p);
            *o = rows.iter().zip(&p).map(|(x, p)| x.0 * p).sum();
        }
        rms_norm(&mut out, &c.norm, 1e-6);
        Freqs::apply(&mut out, &f.at(b * r), false);
        if matches!(c.codec, RowCodec::Index { .. }) {
            hadamard(&mut out);
        }
        c.codec.encode(&mut out, &mut vec![0u8; c.codec.bytes()]);
        out
    }

    fn check(ratio: usize, codec: RowCodec, tokens: usize) {
        let (hidden, dim) = (128, codec.dim());
        let c = compressor(ratio, dim, hidden, codec);
        let f = Freqs::plain(64, 10000.0);
        let y = values(tokens * hidden, 9);
        let wkv = values(c.width() * hidden, 1);
        let wgate = values(c.width() * hidden, 2);
        let m = |v: &[f32]| crate::weights::Matrix {
            rows: c.width(),
            cols: hidden,
            storage: crate::weights::Storage::F32(crate::checkpoint::Bytes::owned(
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )),
        };
        let kv = linear_plain(&m(&wkv), &y, Numerics::BatchInvariant);
        let score = linear_plain(&m(&wgate), &y, Numerics::BatchInvariant);
        let w = c.width();
        let mut st = CompressorState::new();
        for t in 0..tokens {
            // Serialize and restore mid-way: the state is a plain value.
            if t == tokens / 2 {
                st = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
            }
            push(
                &c,
                &mut st,
                t,
                &kv[t * w..(t + 1) * w],
                &score[t * w..(t + 1) * w],
                &f,
            );
            assert_eq!(st.entries.len, (t + 1) / ratio, "entries after token {t}");
        }
        let rows: Vec<usize> = (0..st.entries.len).collect();
        let got = decode_rows(c.codec, &st, &rows);
        for b in 0..st.entries.len {
            let want = direct(&c, &kv, &score, b, &f);
            let g = &got[b * dim..(b + 1) * dim];
            let err = g
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(err <= 1e-5 * scale, "ratio {ratio} entry {b}: {err}");
        }
    }

    #[test]
    fn overlapping_compressor_matches_the_definition() {
        check(4, RowCodec::Attention { dim: 128, rope: 64 }, 23);
        check(4, RowCodec::Index { dim: 128 }, 17);
    }

    #[test]
    fn plain_compressor_matches_the_definition() {
        check(128, RowCodec::Attention { dim: 128, rope: 64 }, 300);
    }
}
