//! The CPU device: the model's math on host memory, parallel over rayon's threads, in the
//! reference platform's float32 order of operations ([`order`]).

mod attention;
mod dpbf16;
mod linear;
mod mhc;
mod moe;
pub mod ops;
pub mod order;
mod simd;
mod topk;

pub use linear::{decode_row, linear, linear_plain, linear_plain_rows};
pub use mhc::sinkhorn;
pub use moe::routed_experts;
pub use order::Numerics;
pub use simd::tiled;
pub use topk::top_k;

use std::ops::Range;

use crate::backend::{Device, Hidden, Runner, Seq, Which};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::attention::Attention;
use crate::model::compressor::Compressor;
use crate::model::indexer::Indexer;
use crate::model::mhc::{HcHead, HyperConn};
use crate::model::moe::{Expert, Moe};
use crate::model::rope::{CosSin, Freqs, Rope};
use crate::model::{Model, Span};
use crate::state::{BlockState, SeqState};
use crate::weights::Matrix;

/// The CPU device.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// The summation orders of its products.
    pub numerics: Numerics,
}

/// A model on the CPU.
pub type CpuBackend = Runner<Cpu>;

impl CpuBackend {
    /// Loads the checkpoint in `dir` for the CPU, batch-invariant.
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        Runner::load(Cpu::default(), dir, &|_, _| {})
    }

    /// A backend over the same checkpoint with other summation orders (loads it again: the
    /// weights are memory-mapped, so this costs no copy).
    pub fn with_numerics(dir: &std::path::Path, numerics: Numerics) -> Result<Self> {
        Runner::load(Cpu { numerics }, dir, &|_, _| {})
    }
}

impl Model<Cpu> {
    /// The stream `[e; M]` for each token (`T x M x D`).
    pub fn embed_tokens(&self, tokens: &[u32]) -> Vec<f32> {
        embed(&self.embed, tokens, self.cfg.hc_mult)
    }
}

/// One forward call on the CPU.
pub struct Batch<'a> {
    tokens: Vec<u32>,
    spans: Vec<Span>,
    /// Each token's position in its sequence.
    pos: Vec<usize>,
    states: Vec<&'a mut SeqState>,
}

impl Batch<'_> {
    /// `cos`/`sin` of `freqs` at every token's position.
    fn angles(&self, freqs: &Freqs) -> Vec<CosSin> {
        self.pos.iter().map(|&p| freqs.at(p)).collect()
    }

    /// Block `slot` of sequence `i`.
    fn block(&mut self, i: usize, slot: usize) -> &mut BlockState {
        &mut self.states[i].blocks[slot]
    }
}

/// Bytes per second of a streaming read of a buffer far larger than the caches, over every
/// thread (the best of a few passes).
pub fn stream_bandwidth() -> f64 {
    use rayon::prelude::*;
    let words = (1usize << 31) / 8;
    let mut v = vec![0u64; words];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(i, c)| c.iter_mut().for_each(|x| *x = i as u64));
    let mut best = 0f64;
    for _ in 0..4 {
        let t = std::time::Instant::now();
        let s: u64 = v
            .par_chunks(1 << 16)
            .map(|c| {
                // Eight independent sums keep the loads flowing.
                let mut acc = [0u64; 8];
                for x in c.chunks_exact(8) {
                    for (a, y) in acc.iter_mut().zip(x) {
                        *a = a.wrapping_add(*y);
                    }
                }
                acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// `[e; copies]` of each token.
fn embed(table: &Matrix, tokens: &[u32], copies: usize) -> Vec<f32> {
    let d = table.cols;
    let mut x = vec![0f32; tokens.len() * copies * d];
    for (row, &t) in x.chunks_mut(copies * d).zip(tokens) {
        decode_row(table, t as usize, &mut row[..d]);
        for j in 1..copies {
            row.copy_within(..d, j * d);
        }
    }
    x
}

impl Device for Cpu {
    type Tensor = Vec<f32>;
    type Weight = Matrix;
    type Vector = Vec<f32>;
    type Table = Vec<u32>;
    type State = SeqState;
    type Batch<'a> = Batch<'a>;
    type Mix = mhc::Mix;
    type Picks = Vec<Vec<Vec<usize>>>;
    type Route = (Vec<usize>, Vec<f32>);
    type Experts = ();

    fn on_host<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        rayon::scope(|_| f())
    }

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn weight(&self, m: Matrix) -> Result<Matrix> {
        // Synthetic weights are made now, not in the step that first reads them.
        m.materialize();
        Ok(simd::tiled(m, self.numerics))
    }
    fn vector(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn table(&self, v: &[u32]) -> Result<Vec<u32>> {
        Ok(v.to_vec())
    }
    fn expert_set(&self, _: &[Expert<Self>]) -> Result<()> {
        Ok(())
    }

    fn new_state(&self, cfg: &Config, blocks: Range<usize>) -> Result<SeqState> {
        Ok(SeqState::new(&cfg.compress_ratios[blocks]))
    }
    fn state_from_host(&self, _: &Config, s: &SeqState, _: Range<usize>) -> Result<SeqState> {
        Ok(s.clone())
    }
    fn state_from_host_owned(&self, _: &Config, s: SeqState, _: Range<usize>) -> Result<SeqState> {
        Ok(s)
    }
    fn seq(s: SeqState) -> Seq {
        Seq::Host(s)
    }
    fn state_of(seq: &mut Seq) -> Result<&mut SeqState> {
        match seq {
            Seq::Host(s) => Ok(s),
            Seq::Cuda(_) => Err(Error::Input(
                "a state resident on a CUDA device given to the CPU backend".into(),
            )),
        }
    }

    fn batch<'a>(
        &self,
        tokens: Vec<u32>,
        spans: Vec<Span>,
        states: Vec<&'a mut SeqState>,
        blocks: usize,
    ) -> Result<Batch<'a>> {
        if let Some((i, s)) = states
            .iter()
            .enumerate()
            .find(|(_, s)| s.blocks.len() != blocks)
        {
            return Err(Error::Input(format!(
                "sequence {i}: state has {} blocks, this model needs {blocks}",
                s.blocks.len()
            )));
        }
        let pos = spans.iter().flat_map(|s| s.pos..s.pos + s.len).collect();
        Ok(Batch {
            tokens,
            spans,
            pos,
            states,
        })
    }

    fn hidden(t: Vec<f32>) -> Hidden {
        Hidden::Host(t)
    }
    fn tensor_of(h: &Hidden) -> Result<&Vec<f32>> {
        match h {
            Hidden::Host(v) => Ok(v),
            Hidden::Cuda(_) => Err(Error::Input(
                "a stream resident on a CUDA device given to the CPU backend".into(),
            )),
        }
    }
    fn upload(&self, x: &[f32], _: usize) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }
    fn download(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }
    fn copy(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }
    fn gather(&self, parts: &[(&Vec<f32>, Range<usize>)], width: usize) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for (t, r) in parts {
            let src = t
                .get(r.start * width..r.end * width)
                .ok_or_else(|| Error::Input(format!("rows {r:?} of {} rows", t.len() / width)))?;
            out.extend_from_slice(src);
        }
        Ok(out)
    }

    fn embed(&self, table: &Matrix, b: &Batch<'_>, copies: usize) -> Result<Vec<f32>> {
        Ok(embed(table, &b.tokens, copies))
    }
    fn linear(&self, w: &Matrix, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(linear(w, x, self.numerics))
    }
    fn linear_plain(&self, w: &Matrix, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(linear_plain(w, x, self.numerics))
    }
    fn grouped_linear(&self, w: &Matrix, x: &Vec<f32>, groups: usize) -> Result<Vec<f32>> {
        // Each group of heads goes through its own slice of rows.
        let (gw, r) = (w.cols, w.rows / groups);
        let t = x.len() / (gw * groups);
        let mut z = vec![0f32; t * groups * r];
        for g in 0..groups {
            let xg: Vec<f32> = x
                .chunks(gw * groups)
                .flat_map(|row| &row[g * gw..(g + 1) * gw])
                .copied()
                .collect();
            let zg = linear_plain_rows(w, &xg, g * r..(g + 1) * r, self.numerics);
            for (i, zr) in zg.chunks(r).enumerate() {
                z[i * groups * r + g * r..i * groups * r + (g + 1) * r].copy_from_slice(zr);
            }
        }
        Ok(z)
    }
    fn rms_norm(&self, x: &mut Vec<f32>, w: &Vec<f32>, eps: f32) -> Result<()> {
        x.chunks_mut(w.len()).for_each(|r| ops::rms_norm(r, w, eps));
        Ok(())
    }
    fn head_norm_rope(
        &self,
        q: &mut Vec<f32>,
        b: &Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
        eps: f32,
    ) -> Result<()> {
        let cs = b.angles(&rope.freqs);
        let dh = q.len() / (cs.len() * heads).max(1);
        for (row, c) in q.chunks_mut(heads * dh).zip(&cs) {
            for head in row.chunks_mut(dh) {
                let r = ops::rms_scale(head, eps);
                head.iter_mut().for_each(|v| *v *= r);
                Freqs::apply(head, c, false);
            }
        }
        Ok(())
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        b: &Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
        inverse: bool,
    ) -> Result<()> {
        let cs = b.angles(&rope.freqs);
        let dh = x.len() / (cs.len() * heads).max(1);
        for (row, c) in x.chunks_mut(heads * dh).zip(&cs) {
            for head in row.chunks_mut(dh) {
                Freqs::apply(head, c, inverse);
            }
        }
        Ok(())
    }
    fn index_queries(
        &self,
        q: &mut Vec<f32>,
        b: &Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
    ) -> Result<()> {
        let cs = b.angles(&rope.freqs);
        let dim = q.len() / (cs.len() * heads).max(1);
        for (row, c) in q.chunks_mut(heads * dim).zip(&cs) {
            for h in row.chunks_mut(dim) {
                Freqs::apply(h, c, false);
                crate::quant::hadamard(h);
                crate::quant::fake_quant_fp4(h, crate::quant::INDEX_FP4_BLOCK);
            }
        }
        Ok(())
    }
    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<()> {
        x.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }
    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        Ok(())
    }
    fn add_to_copies(
        &self,
        x: &mut Vec<f32>,
        e: &Vec<f32>,
        b: &Batch<'_>,
        copies: usize,
    ) -> Result<()> {
        let d = e.len() / b.tokens.len().max(1);
        for (row, er) in x.chunks_mut(copies * d).zip(e.chunks(d)) {
            for copy in row.chunks_mut(d) {
                copy.iter_mut().zip(er).for_each(|(v, a)| *v += a);
            }
        }
        Ok(())
    }
    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, limit: f32) -> Result<Vec<f32>> {
        Ok(moe::swiglu(gate, up, limit))
    }

    fn hc_pre(&self, hc: &HyperConn<Self>, x: &Vec<f32>) -> Result<(Vec<f32>, mhc::Mix)> {
        Ok(mhc::pre(hc, x, self.numerics))
    }
    fn hc_post(
        &self,
        hc: &HyperConn<Self>,
        x: &mut Vec<f32>,
        a: &Vec<f32>,
        mix: &mhc::Mix,
    ) -> Result<()> {
        mhc::post(hc.dims, x, a, mix);
        Ok(())
    }
    fn hc_head(&self, h: &HcHead<Self>, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(mhc::head(h, x, self.numerics))
    }

    fn compress(
        &self,
        c: &Compressor<Self>,
        b: &mut Batch<'_>,
        slot: usize,
        which: Which,
        kv: &Vec<f32>,
        score: &Vec<f32>,
        rope: &Rope<Self>,
    ) -> Result<()> {
        let w = c.width();
        for i in 0..b.spans.len() {
            let s = b.spans[i];
            let block = b.block(i, slot);
            let st = match which {
                Which::Attention => block.compressor.as_mut(),
                Which::Index => block.indexer.as_mut(),
            }
            .ok_or_else(|| Error::Input(format!("block {slot} has no {which:?} compressor")))?;
            for t in 0..s.len {
                let r = (s.start + t) * w..(s.start + t + 1) * w;
                attention::push(c, st, s.pos + t, &kv[r.clone()], &score[r], &rope.freqs);
            }
        }
        Ok(())
    }
    fn index_topk(
        &self,
        ix: &Indexer<Self>,
        b: &Batch<'_>,
        slot: usize,
        q: &Vec<f32>,
        w: &Vec<f32>,
    ) -> Result<Self::Picks> {
        Ok(attention::index_topk(ix, b, slot, q, w, self.numerics))
    }
    fn attention(
        &self,
        a: &Attention<Self>,
        b: &mut Batch<'_>,
        slot: usize,
        q: &Vec<f32>,
        kv: &Vec<f32>,
        picks: Option<&Self::Picks>,
    ) -> Result<Vec<f32>> {
        let mut o = attention::attend(a, b, slot, q, kv, picks);
        self.rope(&mut o, b, a.heads, &a.rope, true)?;
        Ok(o)
    }
    fn bandwidth(&self) -> Result<f64> {
        Ok(stream_bandwidth())
    }

    fn distinct_experts(&self, route: &Self::Route) -> Result<usize> {
        let mut ids = route.0.clone();
        ids.sort_unstable();
        ids.dedup();
        Ok(ids.len())
    }

    fn route(&self, m: &Moe<Self>, b: &Batch<'_>, logits: Vec<f32>) -> Result<Self::Route> {
        Ok(moe::route(m, &b.tokens, logits))
    }
    fn experts(&self, m: &Moe<Self>, route: &Self::Route, y: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(moe::experts(m, route, y, self.numerics))
    }
}
