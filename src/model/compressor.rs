//! The KV compressor: every `ratio` tokens become one entry, a softmax-gated sum of their
//! projections (per dimension).
//!
//! Block b holds positions `b*c ..= b*c + c - 1` and is emitted once its last token is seen.
//! With c = 4 the blocks overlap: projections are 2d wide, and entry b pools the first halves of
//! block b-1 with the second halves of block b. The entry is RMS-normed, rotated at position
//! `b*c`, then rounded: FP8 on the non-RoPE dims for attention, or Hadamard then FP4 for the
//! indexer. Tokens are fed one at a time, so chunked prefill and decode produce the same entries.

use crate::backend::cpu::{linear_plain, ops::rms_norm};
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
    pub fn project(&self, y: &[f32]) -> (Vec<f32>, Vec<f32>) {
        (linear_plain(&self.wkv, y), linear_plain(&self.wgate, y))
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
            crate::backend::cpu::ops::softmax(pr);
            let mut acc = 0f32;
            for (i, pw) in pr[..prev].iter().enumerate() {
                acc += st.prev_kv[i * d + j] * pw;
            }
            for (i, pw) in pr[prev..].iter().enumerate() {
                acc += st.kv[i * w + off + j] * pw;
            }
            *e = acc;
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
        let (b, d) = (self.codec.bytes(), self.dim);
        let mut out = vec![0f32; n * d];
        for (i, o) in out.chunks_mut(d).enumerate() {
            self.codec.decode(st.entries.row(i, b), o);
        }
        out
    }
}
