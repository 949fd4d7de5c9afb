//! The KV compressor: every `ratio` tokens become one entry, a softmax-gated sum of their
//! projections (per dimension).
//!
//! Each token contributes `kv_t = wkv y_t` and `s_t = wgate y_t + ape[t mod c]`. Block b holds
//! positions `b*c ..= b*c + c - 1` and is emitted once its last token is seen. With c = 4 the
//! blocks overlap: projections are 2d wide, and entry b pools the first halves of block b-1
//! with the second halves of block b. The entry is RMS-normed, rotated at position `b*c`, then
//! rounded: FP8 on the non-RoPE dims for attention, or Hadamard then FP4 for the indexer.
//! Tokens are fed one at a time, so chunked prefill and decode produce the same entries.

use crate::backend::{Device, Which};
use crate::error::{Error, Result};
use crate::model::rope::Rope;
use crate::model::Loader;
use crate::state::RowCodec;
use crate::weights::Matrix;

/// Compressor weights.
pub struct Compressor<D: Device> {
    /// Tokens per entry c.
    pub ratio: usize,
    /// Entry width d.
    pub dim: usize,
    /// Whether blocks overlap (c = 4: projections are 2d wide).
    pub overlap: bool,
    /// Position biases of the gate scores, `c x width`.
    pub ape: D::Vector,
    wkv: D::Weight,
    wgate: D::Weight,
    /// The entries' RMSNorm weight.
    pub norm: D::Vector,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// How entries are rounded and stored.
    pub codec: RowCodec,
}

impl<D: Device> Compressor<D> {
    /// Loads `{prefix}.ape`, `.wkv`, `.wgate`, `.norm` for entries of width `dim`.
    pub fn load(
        l: &mut Loader<D>,
        prefix: &str,
        hidden: usize,
        ratio: usize,
        dim: usize,
        codec: RowCodec,
        eps: f32,
    ) -> Result<Self> {
        let overlap = ratio == 4;
        let width = if overlap { 2 * dim } else { dim };
        let mut take = |n: &str| -> Result<D::Weight> {
            let m = Matrix::load(&mut l.ck, &format!("{prefix}.{n}"), width, hidden)?;
            if m.quantized() {
                return Err(Error::Checkpoint(format!(
                    "tensor {prefix}.{n}.weight: the compressor runs unquantized; expected BF16/F32, found {}",
                    m.format()
                )));
            }
            l.put(m)
        };
        let wkv = take("wkv")?;
        let wgate = take("wgate")?;
        Ok(Compressor {
            ratio,
            dim,
            overlap,
            ape: l.vector(&format!("{prefix}.ape"), &[ratio, width])?,
            wkv,
            wgate,
            norm: l.vector(&format!("{prefix}.norm.weight"), &[dim])?,
            eps,
            codec,
        })
    }

    /// Projection width per token.
    pub fn width(&self) -> usize {
        if self.overlap {
            2 * self.dim
        } else {
            self.dim
        }
    }

    /// Projects the batch's `T x D` inputs and feeds every token to compressor `which` of block
    /// `slot`.
    pub fn forward(
        &self,
        dev: &D,
        b: &mut D::Batch<'_>,
        slot: usize,
        which: Which,
        y: &D::Tensor,
        rope: &Rope<D>,
    ) -> Result<()> {
        let kv = dev.linear_plain(&self.wkv, y)?;
        let score = dev.linear_plain(&self.wgate, y)?;
        dev.compress(self, b, slot, which, &kv, &score, rope)
    }
}
