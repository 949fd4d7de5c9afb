//! The KV compressor: every `ratio` tokens become one entry, a softmax-gated sum of their
//! projections (per dimension).
//!
//! Block b holds positions `b*c ..= b*c + c - 1` and is emitted once its last token is seen.
//! With c = 4 the blocks overlap: projections are 2d wide, and entry b pools the first halves of
//! block b-1 with the second halves of block b. The entry is RMS-normed, rotated at position
//! `b*c`, then rounded: FP8 on the non-RoPE dims for attention, or Hadamard then FP4 for the
//! indexer. Tokens are fed one at a time, so chunked prefill and decode produce the same entries.

use crate::backend::cpu::order::aten_column_sum;
use crate::backend::cpu::{linear_plain, ops::rms_norm, ops::softmax_strided, Numerics};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::rope::Rope;
use crate::quant::hadamard;
use crate::state::{CompressorState, RowCodec};
use crate::weights::Matrix;

/// Compressor weights.
pub struct Compressor {
    ratio: usize,
    dim: usize,
    overlap: bool,
    ape: Vec<f32>,
    wkv: Matrix,
    wgate: Matrix,
    norm: Vec<f32>,
    eps: f32,
    /// How entries are rounded and stored.
    pub codec: RowCodec,
}

impl Compressor {
    /// Loads `{prefix}.ape`, `.wkv`, `.wgate`, `.norm` for entries of width `dim`.
    pub fn load(
        ck: &mut Checkpoint,
        prefix: &str,
        hidden: usize,
        ratio: usize,
        dim: usize,
        codec: RowCodec,
        eps: f32,
    ) -> Result<Self> {
        let overlap = ratio == 4;
        let width = if overlap { 2 * dim } else { dim };
        let wkv = Matrix::load(ck, &format!("{prefix}.wkv"), width, hidden)?;
        let wgate = Matrix::load(ck, &format!("{prefix}.wgate"), width, hidden)?;
        for (m, n) in [(&wkv, "wkv"), (&wgate, "wgate")] {
            if m.quantized() {
                return Err(Error::Checkpoint(format!(
                    "tensor {prefix}.{n}.weight: the compressor runs unquantized; expected BF16/F32, found {}",
                    m.format()
                )));
            }
        }
        Ok(Compressor {
            ratio,
            dim,
            overlap,
            ape: ck.take_f32(&format!("{prefix}.ape"), &[ratio, width])?,
            wkv,
            wgate,
            norm: ck.take_f32(&format!("{prefix}.norm.weight"), &[dim])?,
            eps,
            codec,
        })
    }

    /// Projection width per token.
    fn width(&self) -> usize {
        if self.overlap {
            2 * self.dim
        } else {
            self.dim
        }
    }

    /// The per-token projections `(kv, score)` of `T x D` inputs, each `T x width`.
    pub fn project(&self, y: &[f32], num: Numerics) -> (Vec<f32>, Vec<f32>) {
        (
            linear_plain(&self.wkv, y, num),
            linear_plain(&self.wgate, y, num),
        )
    }

    /// Feeds the projections of the token at `pos`; emits an entry when its block completes.
    pub fn push(
        &self,
        st: &mut CompressorState,
        pos: usize,
        kv: &[f32],
        score: &[f32],
        rope: &Rope,
    ) {
        let (c, w) = (self.ratio, self.width());
        let slot = pos % c;
        debug_assert_eq!(st.kv.len(), slot * w, "compressor state out of step");
        st.kv.extend_from_slice(kv);
        st.score.extend(
            score
                .iter()
                .zip(&self.ape[slot * w..(slot + 1) * w])
                .map(|(s, a)| s + a),
        );
        if slot + 1 < c {
            return;
        }
        let d = self.dim;
        let mut entry = vec![0f32; d];
        let mut p = vec![0f32; 2 * c];
        for (j, e) in entry.iter_mut().enumerate() {
            // Rows taking part, previous block's overlap halves first.
            let (prev, off) = if self.overlap {
                (st.prev_kv.len() / d, d)
            } else {
                (0, 0)
            };
            let n = prev + c;
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
        if self.overlap {
            st.prev_kv = st.kv.chunks(w).flat_map(|r| &r[..d]).copied().collect();
            st.prev_score = st.score.chunks(w).flat_map(|r| &r[..d]).copied().collect();
        }
        st.kv.clear();
        st.score.clear();
        rms_norm(&mut entry, &self.norm, self.eps);
        Rope::apply(&mut entry, &rope.at(pos + 1 - c), false);
        if matches!(self.codec, RowCodec::Index { .. }) {
            hadamard(&mut entry);
        }
        let mut packed = vec![0u8; self.codec.bytes()];
        self.codec.encode(&mut entry, &mut packed);
        st.entries.push(&packed);
    }

    /// Decodes entries `0..n` into `n x dim` f32.
    pub fn decode_all(&self, st: &CompressorState, n: usize) -> Vec<f32> {
        self.decode_rows(st, &(0..n).collect::<Vec<_>>())
    }

    /// Decodes the given entries, in order, into `rows.len() x dim` f32.
    pub fn decode_rows(&self, st: &CompressorState, rows: &[usize]) -> Vec<f32> {
        let (b, d) = (self.codec.bytes(), self.dim);
        let mut out = vec![0f32; rows.len() * d];
        for (&r, o) in rows.iter().zip(out.chunks_mut(d)) {
            self.codec.decode(st.entries.row(r, b), o);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::softmax;
    use crate::checkpoint::RawTensor;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    fn compressor(ratio: usize, dim: usize, hidden: usize, codec: RowCodec) -> Compressor {
        let width = if ratio == 4 { 2 * dim } else { dim };
        let mut ck = Checkpoint::from_tensors(vec![
            RawTensor::f32("c.wkv.weight", &[width, hidden], &values(width * hidden, 1)),
            RawTensor::f32(
                "c.wgate.weight",
                &[width, hidden],
                &values(width * hidden, 2),
            ),
            RawTensor::f32("c.ape", &[ratio, width], &values(ratio * width, 3)),
            RawTensor::f32("c.norm.weight", &[dim], &values(dim, 4)),
        ]);
        let c = Compressor::load(&mut ck, "c", hidden, ratio, dim, codec, 1e-6).unwrap();
        ck.finish().unwrap();
        c
    }

    /// Entry b from the whole sequence at once, as the architecture document states it.
    fn direct(c: &Compressor, kv: &[f32], score: &[f32], b: usize, rope: &Rope) -> Vec<f32> {
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
        Rope::apply(&mut out, &rope.at(b * r), false);
        if matches!(c.codec, RowCodec::Index { .. }) {
            hadamard(&mut out);
        }
        c.codec.encode(&mut out, &mut vec![0u8; c.codec.bytes()]);
        out
    }

    fn check(ratio: usize, codec: RowCodec, tokens: usize) {
        let (hidden, dim) = (128, codec.dim());
        let c = compressor(ratio, dim, hidden, codec);
        let rope = Rope::plain(64, 10000.0);
        let y = values(tokens * hidden, 9);
        let (kv, score) = c.project(&y, Numerics::BatchInvariant);
        let w = c.width();
        let mut st = CompressorState::new();
        for t in 0..tokens {
            // Serialize and restore mid-way: the state is a plain value.
            if t == tokens / 2 {
                st = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
            }
            c.push(
                &mut st,
                t,
                &kv[t * w..(t + 1) * w],
                &score[t * w..(t + 1) * w],
                &rope,
            );
            assert_eq!(st.entries.len, (t + 1) / ratio, "entries after token {t}");
        }
        let got = c.decode_all(&st, st.entries.len);
        for b in 0..st.entries.len {
            let want = direct(&c, &kv, &score, b, &rope);
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
