//! Attention: low-rank queries, one shared KV head, a 128-token window with an attention sink,
//! compressed entries (all of them for HCA, the indexer's top-k for CSA), and a grouped
//! low-rank output projection.

use rayon::prelude::*;

use crate::backend::cpu::ops::{rms_norm, rms_scale, sink_attention, RowLayout};
use crate::backend::cpu::order::order;
use crate::backend::cpu::{linear, linear_plain_rows, Numerics};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::Result;
use crate::model::compressor::Compressor;
use crate::model::indexer::Indexer;
use crate::model::rope::{CosSin, Rope};
use crate::model::Span;
use crate::state::{BlockState, RowCodec};
use crate::weights::Matrix;

/// Attention weights of one block.
pub struct Attention {
    wq_a: Matrix,
    q_norm: Vec<f32>,
    wq_b: Matrix,
    wkv: Matrix,
    kv_norm: Vec<f32>,
    wo_a: Matrix,
    groups: usize,
    wo_b: Matrix,
    sink: Vec<f32>,
    compressor: Option<Compressor>,
    indexer: Option<Indexer>,
    rope: Rope,
    heads: usize,
    dim: usize,
    window: usize,
    ratio: usize,
    eps: f32,
    codec: RowCodec,
}

/// Per-token compressor projections: `(kv, score)`, each `T x width`.
type Proj = (Vec<f32>, Vec<f32>);

/// Indexer inputs of a batch: queries, head weights, and its compressor's projections.
struct IndexProj {
    q: Vec<f32>,
    w: Vec<f32>,
    keys: Proj,
    num: Numerics,
}

/// Per-sequence work of one chunk: where each query's keys are.
struct SeqKeys {
    /// Decoded raw KV rows from position `first` on (window history, then the chunk).
    raw: Vec<f32>,
    first: usize,
    /// Decoded compressed entries (`n x dim`, only those attended) and, per query, the rows of
    /// `comp` it attends to.
    comp: Vec<f32>,
    picks: Vec<Vec<usize>>,
}

impl Attention {
    /// Loads `{prefix}.*` (e.g. `layers.3.attn`) for a block with compress ratio `ratio`.
    pub fn load(ck: &mut Checkpoint, prefix: &str, cfg: &Config, ratio: usize) -> Result<Self> {
        let (d, h, dh) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim);
        let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
        let eps = cfg.rms_norm_eps as f32;
        let p = |n: &str| format!("{prefix}.{n}");
        let codec = RowCodec::Attention {
            dim: dh,
            rope: cfg.qk_rope_head_dim,
        };
        Ok(Attention {
            wq_a: Matrix::load(ck, &p("wq_a"), cfg.q_lora_rank, d)?,
            q_norm: ck.take_f32(&p("q_norm.weight"), &[cfg.q_lora_rank])?,
            wq_b: Matrix::load(ck, &p("wq_b"), h * dh, cfg.q_lora_rank)?,
            wkv: Matrix::load(ck, &p("wkv"), dh, d)?,
            kv_norm: ck.take_f32(&p("kv_norm.weight"), &[dh])?,
            wo_a: Matrix::load(ck, &p("wo_a"), g * r, h * dh / g)?,
            groups: g,
            wo_b: Matrix::load(ck, &p("wo_b"), d, g * r)?,
            sink: ck.take_f32(&p("attn_sink"), &[h])?,
            compressor: if ratio > 0 {
                Some(Compressor::load(
                    ck,
                    &p("compressor"),
                    d,
                    ratio,
                    dh,
                    codec,
                    eps,
                )?)
            } else {
                None
            },
            indexer: if ratio == 4 {
                Some(Indexer::load(ck, &p("indexer"), cfg)?)
            } else {
                None
            },
            rope: Rope::for_ratio(cfg, ratio),
            heads: h,
            dim: dh,
            window: cfg.sliding_window,
            ratio,
            eps,
            codec,
        })
    }

    /// Attention over a batch: `y` is `T x D` (normed sublayer input) laid out by `spans`;
    /// advances each sequence's block state by its span. Returns `T x D`.
    pub fn forward(
        &self,
        y: &[f32],
        spans: &[Span],
        states: &mut [&mut BlockState],
        num: Numerics,
    ) -> Vec<f32> {
        let (h, dh) = (self.heads, self.dim);
        let t_all = spans.iter().map(|s| s.len).sum::<usize>();
        let cs: Vec<CosSin> = spans
            .iter()
            .flat_map(|s| (s.pos..s.pos + s.len).map(|p| self.rope.at(p)))
            .collect();

        let mut qr = linear(&self.wq_a, y, num);
        for row in qr.chunks_mut(self.q_norm.len()) {
            rms_norm(row, &self.q_norm, self.eps);
        }
        let mut q = linear(&self.wq_b, &qr, num);
        for (t, row) in q.chunks_mut(h * dh).enumerate() {
            for head in row.chunks_mut(dh) {
                let r = rms_scale(head, self.eps);
                head.iter_mut().for_each(|v| *v *= r);
                Rope::apply(head, &cs[t], false);
            }
        }
        let mut kv = linear(&self.wkv, y, num);
        let row_bytes = self.codec.bytes();
        let mut packed = vec![0u8; t_all * row_bytes];
        for (t, (row, pk)) in kv
            .chunks_mut(dh)
            .zip(packed.chunks_mut(row_bytes))
            .enumerate()
        {
            rms_norm(row, &self.kv_norm, self.eps);
            Rope::apply(row, &cs[t], false);
            self.codec.encode(row, pk);
        }
        let comp_proj = self.compressor.as_ref().map(|c| c.project(y, num));
        let index_proj = self.indexer.as_ref().map(|ix| {
            let (q, w) = ix.queries(&qr, y, &cs, num);
            IndexProj {
                q,
                w,
                keys: ix.compressor.project(y, num),
                num,
            }
        });

        let mut o = vec![0f32; t_all * h * dh];
        for (s, st) in spans.iter().zip(states.iter_mut()) {
            let rows = s.start..s.start + s.len;
            // Positions before `prompt` are attended as the reference's one prefill of the
            // prompt lays out its index rows; later ones as its one-token decode steps.
            let prompt = s.prompt_end.max(if s.pos == 0 { s.len } else { 0 });
            let keys = self.gather(
                s,
                st,
                &kv[rows.start * dh..rows.end * dh],
                &cs,
                comp_proj.as_ref(),
                index_proj.as_ref(),
            );
            self.store_window(s, st, &packed[rows.start * row_bytes..rows.end * row_bytes]);
            let qs = &q[rows.start * h * dh..rows.end * h * dh];
            o[rows.start * h * dh..rows.end * h * dh]
                .par_chunks_mut(dh)
                .enumerate()
                .for_each(|(i, out)| {
                    let (t, head) = (i / h, i % h);
                    let qh = &qs[t * h * dh + head * dh..t * h * dh + (head + 1) * dh];
                    self.attend(qh, head, s.pos + t, prompt, &keys, t, out);
                    Rope::apply(out, &cs[s.start + t], true);
                });
        }

        // Grouped low-rank output: each group of heads goes through its own wo_a slice.
        let g = self.groups;
        let gw = h * dh / g;
        let r = self.wo_a.rows / g;
        let mut z = vec![0f32; t_all * g * r];
        for gi in 0..g {
            let og: Vec<f32> = o
                .chunks(h * dh)
                .flat_map(|row| &row[gi * gw..(gi + 1) * gw])
                .copied()
                .collect();
            let zg = linear_plain_rows(&self.wo_a, &og, gi * r..(gi + 1) * r, num);
            for (t, zr) in zg.chunks(r).enumerate() {
                z[t * g * r + gi * r..t * g * r + (gi + 1) * r].copy_from_slice(zr);
            }
        }
        linear(&self.wo_b, &z, num)
    }

    /// Collects the keys of one sequence's chunk: window rows, and the compressed entries after
    /// feeding the chunk to the compressors.
    fn gather(
        &self,
        s: &Span,
        st: &mut BlockState,
        chunk_kv: &[f32],
        cs: &[CosSin],
        comp_proj: Option<&Proj>,
        index_proj: Option<&IndexProj>,
    ) -> SeqKeys {
        let (w, dh) = (self.window, self.dim);
        let first = s.pos.saturating_sub(w - 1);
        let mut raw = vec![0f32; (s.pos - first) * dh];
        for (i, p) in (first..s.pos).enumerate() {
            let b = self.codec.bytes();
            let slot = p % w;
            self.codec.decode(
                &st.window[slot * b..(slot + 1) * b],
                &mut raw[i * dh..(i + 1) * dh],
            );
        }
        raw.extend_from_slice(chunk_kv);

        let mut picks = Vec::new();
        let mut comp = Vec::new();
        if let (Some(c), Some((ckv, csc))) = (&self.compressor, comp_proj) {
            let cst = st
                .compressor
                .as_mut()
                .expect("compressed block without compressor state");
            let width = ckv.len() / cs.len();
            for i in 0..s.len {
                let r = (s.start + i) * width..(s.start + i + 1) * width;
                c.push(cst, s.pos + i, &ckv[r.clone()], &csc[r], &self.rope);
            }
            picks = match (&self.indexer, index_proj) {
                (
                    Some(ix),
                    Some(IndexProj {
                        q: iq,
                        w: iw,
                        keys: (ikv, isc),
                        num,
                    }),
                ) => {
                    let ist = st
                        .indexer
                        .as_mut()
                        .expect("CSA block without indexer state");
                    let iwidth = ikv.len() / cs.len();
                    for i in 0..s.len {
                        let r = (s.start + i) * iwidth..(s.start + i + 1) * iwidth;
                        ix.compressor
                            .push(ist, s.pos + i, &ikv[r.clone()], &isc[r], &self.rope);
                    }
                    let keys = ix.compressor.decode_all(ist, ist.entries.len);
                    let ranked = (s.pos + s.len).max(s.prompt_end) / self.ratio;
                    let (hq, hw) = (iq.len() / cs.len(), iw.len() / cs.len());
                    let order = ix.score_order(*num, s.len);
                    (0..s.len)
                        .into_par_iter()
                        .map(|i| {
                            let t = s.start + i;
                            ix.select(
                                &iq[t * hq..(t + 1) * hq],
                                &iw[t * hw..(t + 1) * hw],
                                &keys,
                                (s.pos + i + 1) / self.ratio,
                                ranked,
                                order,
                            )
                        })
                        .collect()
                }
                _ => (0..s.len)
                    .map(|i| (0..(s.pos + i + 1) / self.ratio).collect())
                    .collect(),
            };
            // Decode only the entries some query of the chunk attends to, and point the picks
            // at their rows: a decoded token touches index_topk entries, not the whole history.
            let mut used: Vec<usize> = picks.iter().flatten().copied().collect();
            used.sort_unstable();
            used.dedup();
            comp = c.decode_rows(cst, &used);
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

    /// Writes the chunk's packed KV rows into the window ring.
    fn store_window(&self, s: &Span, st: &mut BlockState, packed: &[u8]) {
        let (w, b) = (self.window, self.codec.bytes());
        if st.window.len() != w * b {
            st.window = vec![0u8; w * b];
        }
        let from = s.len.saturating_sub(w);
        for i in from..s.len {
            let slot = (s.pos + i) % w;
            st.window[slot * b..(slot + 1) * b].copy_from_slice(&packed[i * b..(i + 1) * b]);
        }
    }

    /// One head of one query at position `pos`: its window rows, then its compressed picks, in
    /// the reference's index row (window slots then compressed slots, each padded with empty
    /// slots up to the row's width, which decides how the exponentials are summed).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &[f32],
        head: usize,
        pos: usize,
        prompt: usize,
        keys: &SeqKeys,
        i: usize,
        out: &mut [f32],
    ) {
        let dh = self.dim;
        let lo = pos.saturating_sub(self.window - 1) - keys.first;
        let hi = pos + 1 - keys.first;
        let picks: &[usize] = keys.picks.get(i).map_or(&[], |v| v);
        let (window_width, comp_width) = if pos < prompt {
            let entries = prompt.checked_div(self.ratio).unwrap_or(0);
            let comp = self
                .indexer
                .as_ref()
                .map_or(entries, |ix| ix.width(entries));
            (self.window.min(prompt), comp)
        } else {
            (self.window, picks.len())
        };
        let layout = RowLayout {
            window: hi - lo,
            window_pad: window_width.saturating_sub(hi - lo),
            tail_pad: comp_width.saturating_sub(picks.len()),
        };
        let rows = keys.raw[lo * dh..hi * dh]
            .chunks(dh)
            .chain(picks.iter().map(|&b| &keys.comp[b * dh..(b + 1) * dh]));
        let order = order(self.heads, dh);
        let scale = (dh as f64).powf(-0.5) as f32;
        sink_attention(q, rows, self.sink[head], scale, order, layout, out);
    }
}
