//! Per-sequence decode state: a plain value that can be serialized, restored and moved.
//!
//! It holds only what the architecture needs to continue a sequence:
//! * per block, the sliding-window ring of the last W raw KV rows;
//! * per compressor, the rows of the block being filled (and, for c = 4, the previous block's
//!   overlap half);
//! * per compressor, the compressed entries emitted so far (attention KV and indexer keys).
//!
//! KV rows are stored in the precision the reference rounds them to, losslessly: the non-RoPE
//! dims as e4m3 codes with one UE8M0 scale per 64, the RoPE dims as f32; indexer keys as packed
//! e2m1 with one scale per 32. So the state is the compressed size and decoding it gives the
//! reference's values bit for bit.

pub mod file;
pub mod inspect;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::quant::{
    e8m0, e8m0_encode, encode_e2m1, encode_e4m3, fp4_scale, fp8_scale, round_e2m1, round_e4m3,
    E2M1, E4M3, FP4_MAX, FP8_MAX, INDEX_FP4_BLOCK, KV_FP8_BLOCK,
};

/// How one KV row is packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RowCodec {
    /// Attention KV of width `dim`: FP8 non-RoPE dims (block 64), f32 RoPE dims.
    Attention {
        /// Row width (head_dim).
        dim: usize,
        /// RoPE dims at the end.
        rope: usize,
    },
    /// Indexer key of width `dim`: FP4 (block 32).
    Index {
        /// Row width (index_head_dim).
        dim: usize,
    },
}

impl RowCodec {
    /// Packed bytes per row.
    pub fn bytes(&self) -> usize {
        match *self {
            RowCodec::Attention { dim, rope } => {
                let nope = dim - rope;
                nope + nope / KV_FP8_BLOCK + 4 * rope
            }
            RowCodec::Index { dim } => dim / 2 + dim / INDEX_FP4_BLOCK,
        }
    }

    /// Row width in values.
    pub fn dim(&self) -> usize {
        match *self {
            RowCodec::Attention { dim, .. } | RowCodec::Index { dim } => dim,
        }
    }

    /// Rounds `x` as the reference does (FP8 on the non-RoPE dims, or FP4 on all dims), packs
    /// it into `out`, and leaves the rounded values in `x`.
    pub fn encode(&self, x: &mut [f32], out: &mut [u8]) {
        match *self {
            RowCodec::Attention { dim, rope } => {
                let nope = dim - rope;
                let (codes, rest) = out.split_at_mut(nope);
                let (scales, tail) = rest.split_at_mut(nope / KV_FP8_BLOCK);
                for (b, blk) in x[..nope].chunks_mut(KV_FP8_BLOCK).enumerate() {
                    let s = fp8_scale(blk);
                    scales[b] = e8m0_encode(s);
                    for (i, v) in blk.iter_mut().enumerate() {
                        let q = round_e4m3((*v / s).clamp(-FP8_MAX, FP8_MAX));
                        codes[b * KV_FP8_BLOCK + i] = encode_e4m3(q);
                        *v = q * s;
                    }
                }
                for (c, v) in tail.chunks_exact_mut(4).zip(&x[nope..]) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            RowCodec::Index { dim } => {
                let (packed, scales) = out.split_at_mut(dim / 2);
                for (b, blk) in x.chunks_mut(INDEX_FP4_BLOCK).enumerate() {
                    let s = fp4_scale(blk);
                    scales[b] = e8m0_encode(s);
                    for (i, v) in blk.iter_mut().enumerate() {
                        let q = round_e2m1((*v / s).clamp(-FP4_MAX, FP4_MAX));
                        let j = b * INDEX_FP4_BLOCK + i;
                        let nib = encode_e2m1(q);
                        if j.is_multiple_of(2) {
                            packed[j / 2] = nib;
                        } else {
                            packed[j / 2] |= nib << 4;
                        }
                        *v = q * s;
                    }
                }
            }
        }
    }

    /// Unpacks one row.
    pub fn decode(&self, b: &[u8], out: &mut [f32]) {
        match *self {
            RowCodec::Attention { dim, rope } => {
                let nope = dim - rope;
                let (codes, rest) = b.split_at(nope);
                let (scales, tail) = rest.split_at(nope / KV_FP8_BLOCK);
                // A block's scale and the table looked up once, not once a value: rows are
                // decoded by the hundred thousand a step at long contexts.
                let table = &*E4M3;
                let blocks = out[..nope].chunks_mut(KV_FP8_BLOCK);
                for ((o, c), &s) in blocks.zip(codes.chunks(KV_FP8_BLOCK)).zip(scales) {
                    let s = e8m0(s);
                    for (o, &c) in o.iter_mut().zip(c) {
                        *o = table[c as usize] * s;
                    }
                }
                for (o, c) in out[nope..dim].iter_mut().zip(tail.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            RowCodec::Index { dim } => {
                let (packed, scales) = b.split_at(dim / 2);
                let blocks = out[..dim].chunks_mut(INDEX_FP4_BLOCK);
                for ((o, p), &s) in blocks.zip(packed.chunks(INDEX_FP4_BLOCK / 2)).zip(scales) {
                    let s = e8m0(s);
                    for (o, &byte) in o.chunks_exact_mut(2).zip(p) {
                        o[0] = E2M1[(byte & 15) as usize] * s;
                        o[1] = E2M1[(byte >> 4) as usize] * s;
                    }
                }
            }
        }
    }
}

/// A growing list of packed rows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rows {
    /// Packed bytes, `len x codec.bytes()`.
    pub data: Vec<u8>,
    /// Number of rows.
    pub len: usize,
}

impl Rows {
    /// Appends a packed row.
    pub fn push(&mut self, row: &[u8]) {
        self.data.extend_from_slice(row);
        self.len += 1;
    }

    /// Packed row `i`.
    pub fn row(&self, i: usize, bytes: usize) -> &[u8] {
        &self.data[i * bytes..(i + 1) * bytes]
    }
}

/// State of one compressor (attention's or the indexer's).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompressorState {
    /// `kv` rows of the block being filled, `ratio x coff*dim` (f32, as projected).
    pub kv: Vec<f32>,
    /// Gate scores (`ape` added) of the block being filled.
    pub score: Vec<f32>,
    /// For c = 4: the previous block's overlap half (`kv` then `score`, `ratio x dim` each);
    /// empty before the first block completes.
    pub prev_kv: Vec<f32>,
    /// See `prev_kv`.
    pub prev_score: Vec<f32>,
    /// Compressed entries so far, packed.
    pub entries: Rows,
}

impl CompressorState {
    /// An empty compressor state.
    pub fn new() -> Self {
        Self::default()
    }
}

/// State of one block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockState {
    /// The last `sliding_window` raw KV rows, packed; row of position p at slot `p % W`.
    pub window: Vec<u8>,
    /// The attention compressor (c > 0).
    pub compressor: Option<CompressorState>,
    /// The indexer's compressor (c = 4).
    pub indexer: Option<CompressorState>,
}

impl BlockState {
    /// Empty state of a block with compress ratio `ratio`.
    pub fn new(ratio: usize) -> Self {
        BlockState {
            window: Vec::new(),
            compressor: (ratio > 0).then(CompressorState::new),
            indexer: (ratio == 4).then(CompressorState::new),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let c = |c: &Option<CompressorState>| {
            c.as_ref().map_or(0, |c| {
                4 * (c.kv.len() + c.score.len() + c.prev_kv.len() + c.prev_score.len())
                    + c.entries.data.len()
            })
        };
        self.window.len() + c(&self.compressor) + c(&self.indexer)
    }
}

/// The mutable tail of a [`SeqState`], to undo tokens fed speculatively.
#[derive(Clone, Debug)]
pub struct Mark {
    pos: usize,
    windows: Vec<Vec<u8>>,
    compressors: Vec<Option<(CompressorState, usize)>>,
}

/// A compressor's pending rows and entry count (its entries are only ever appended).
fn tail(c: &Option<CompressorState>) -> Option<(CompressorState, usize)> {
    c.as_ref().map(|c| {
        let pending = CompressorState {
            kv: c.kv.clone(),
            score: c.score.clone(),
            prev_kv: c.prev_kv.clone(),
            prev_score: c.prev_score.clone(),
            entries: Rows::default(),
        };
        (pending, c.entries.len)
    })
}

fn restore(c: &mut Option<CompressorState>, t: Option<(CompressorState, usize)>) {
    if let (Some(c), Some((p, n))) = (c.as_mut(), t) {
        let row = c.entries.data.len() / c.entries.len.max(1);
        c.entries.data.truncate(n * row);
        c.entries.len = n;
        (c.kv, c.score, c.prev_kv, c.prev_score) = (p.kv, p.score, p.prev_kv, p.prev_score);
    }
}

/// Everything one sequence carries between forward calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeqState {
    /// Tokens consumed so far (the next token's position).
    pub pos: usize,
    /// Where the prompt being prefilled ends, when it is fed in several chunks. The reference
    /// prefills a prompt in one call, and its indexer ranks each query's row over every entry of
    /// that call (the not yet visible ones at -inf); which of several exactly tied entries it
    /// keeps depends on that row's length. Queries before `prompt_end` rank the row of the whole
    /// prompt, so a prompt gives the same result however it is chunked. At or before `pos` it
    /// has no effect: one-token decode ranks the visible entries, as the reference's does.
    #[serde(default)]
    pub prompt_end: usize,
    /// One state per block run by this state's owner (main blocks, or one MTP block).
    pub blocks: Vec<BlockState>,
}

impl SeqState {
    /// Empty state for blocks with the given compress ratios.
    pub fn new(ratios: &[usize]) -> Self {
        SeqState {
            pos: 0,
            prompt_end: 0,
            blocks: ratios.iter().map(|&r| BlockState::new(r)).collect(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(BlockState::bytes).sum()
    }

    /// Checks that the state has the shape `cfg`'s main blocks give a state at its position
    /// (window ring, pending compressor rows, compressed entries), so that one read from a
    /// file or another process cannot mislead a forward pass.
    pub fn check(&self, cfg: &Config) -> Result<()> {
        let bad = |what: String| {
            Err(Error::Input(format!(
                "a decode state at position {}: {what}",
                self.pos
            )))
        };
        if self.blocks.len() != cfg.num_hidden_layers {
            return bad(format!(
                "{} blocks, the model has {}",
                self.blocks.len(),
                cfg.num_hidden_layers
            ));
        }
        let attn = RowCodec::Attention {
            dim: cfg.head_dim,
            rope: cfg.qk_rope_head_dim,
        };
        let index = RowCodec::Index {
            dim: cfg.index_head_dim,
        };
        let window = if self.pos == 0 {
            0
        } else {
            cfg.sliding_window * attn.bytes()
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let r = cfg.ratio(i);
            if b.window.len() != window {
                return bad(format!(
                    "block {i}: a window of {} bytes, not {window}",
                    b.window.len()
                ));
            }
            let comps = [
                (&b.compressor, r > 0, attn, "attention"),
                (&b.indexer, r == 4, index, "indexer"),
            ];
            for (c, wanted, codec, what) in comps {
                let c = match (c, wanted) {
                    (None, false) => continue,
                    (Some(c), true) => c,
                    _ => {
                        return bad(format!(
                            "block {i} (ratio {r}): its {what} compressor state is {}",
                            if wanted { "missing" } else { "unexpected" }
                        ))
                    }
                };
                let (d, overlap) = (codec.dim(), r == 4);
                let w = if overlap { 2 * d } else { d };
                let prev = if overlap && self.pos >= r { r * d } else { 0 };
                let ok = c.kv.len() == (self.pos % r) * w
                    && c.score.len() == c.kv.len()
                    && c.prev_kv.len() == prev
                    && c.prev_score.len() == prev
                    && c.entries.len == self.pos / r
                    && c.entries.data.len() == c.entries.len * codec.bytes();
                if !ok {
                    return bad(format!("block {i} (ratio {r}): its {what} compressor state does not match the position"));
                }
            }
        }
        Ok(())
    }

    /// Remembers the current position so that tokens fed afterwards can be undone. The window
    /// rings and the compressors' pending rows are copied; the compressed history, which only
    /// grows, is not.
    pub fn mark(&self) -> Mark {
        Mark {
            pos: self.pos,
            windows: self.blocks.iter().map(|b| b.window.clone()).collect(),
            compressors: self
                .blocks
                .iter()
                .flat_map(|b| [tail(&b.compressor), tail(&b.indexer)])
                .collect(),
        }
    }

    /// Returns to a mark taken on this state.
    pub fn rewind(&mut self, mark: Mark) {
        let mut it = mark.compressors.into_iter();
        for (b, w) in self.blocks.iter_mut().zip(mark.windows) {
            b.window = w;
            restore(&mut b.compressor, it.next().flatten());
            restore(&mut b.indexer, it.next().flatten());
        }
        self.pos = mark.pos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{fake_quant_fp4, fake_quant_fp8};

    #[test]
    fn codecs_round_like_the_reference_and_are_lossless() {
        let mut x: Vec<f32> = (0..192)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut want = x.clone();
        fake_quant_fp8(&mut want[..128], KV_FP8_BLOCK);
        let c = RowCodec::Attention { dim: 192, rope: 64 };
        let mut packed = vec![0u8; c.bytes()];
        c.encode(&mut x, &mut packed);
        assert_eq!(x, want);
        let mut back = vec![0f32; 192];
        c.decode(&packed, &mut back);
        assert_eq!(back, want);
        assert_eq!(c.bytes(), 128 + 2 + 256);

        let mut y: Vec<f32> = (0..128)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
            .collect();
        let mut want = y.clone();
        fake_quant_fp4(&mut want, INDEX_FP4_BLOCK);
        let c = RowCodec::Index { dim: 128 };
        let mut packed = vec![0u8; c.bytes()];
        c.encode(&mut y, &mut packed);
        assert_eq!(y, want);
        let mut back = vec![0f32; 128];
        c.decode(&packed, &mut back);
        assert_eq!(back, want);
        assert_eq!(c.bytes(), 68);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = SeqState::new(&[0, 4, 128]);
        s.pos = 3;
        s.blocks[1].compressor.as_mut().unwrap().kv = vec![1.5, -2.0];
        let text = serde_json::to_string(&s).unwrap();
        let back: SeqState = serde_json::from_str(&text).unwrap();
        assert_eq!(s, back);
    }
}
