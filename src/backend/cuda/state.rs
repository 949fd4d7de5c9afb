//! Decode states on the GPU.
//!
//! A sequence keeps, per block, a fixed region (its window ring and its compressors' pending rows,
//! in one allocation for all blocks) and its compressed entries in pages of 64 rows taken from a
//! pool shared by every sequence, found through per-sequence page tables. Rows are the CPU
//! codecs' packed rows with each part aligned to 16 bytes ([`RowFormat`]), so a state converts to
//! and from the plain [`SeqState`] losslessly.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::gpu::{Args, Buf, Gpu};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::{BlockState, CompressorState, RowCodec, Rows, SeqState};

/// Rows in a page of compressed entries.
pub const PAGE_ROWS: usize = 64;
/// Pages in a slab taken from the driver at once.
const SLAB_PAGES: usize = 64;

/// How a packed row lies in GPU memory (`kernels/rows.cuh`: `RowFmt`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowFormat {
    /// 0: attention KV, 1: indexer key.
    pub kind: i32,
    /// Values in a row.
    pub dim: i32,
    /// Attention: dims stored as e4m3 (the rest are f32).
    pub nope: i32,
    /// Offset of the scale bytes.
    pub s_off: i32,
    /// Attention: offset of the f32 RoPE dims.
    pub r_off: i32,
    /// Bytes of a row (a multiple of 16).
    pub bytes: i32,
}

fn align16(n: usize) -> usize {
    n.next_multiple_of(16)
}

impl RowFormat {
    /// The GPU layout of `codec`'s rows.
    pub fn of(codec: RowCodec) -> Self {
        match codec {
            RowCodec::Attention { dim, rope } => {
                let nope = dim - rope;
                let s_off = align16(nope);
                let r_off = align16(s_off + nope / crate::quant::KV_FP8_BLOCK);
                RowFormat {
                    kind: 0,
                    dim: dim as i32,
                    nope: nope as i32,
                    s_off: s_off as i32,
                    r_off: r_off as i32,
                    bytes: align16(r_off + 4 * rope) as i32,
                }
            }
            RowCodec::Index { dim } => {
                let s_off = align16(dim / 2);
                RowFormat {
                    kind: 1,
                    dim: dim as i32,
                    nope: 0,
                    s_off: s_off as i32,
                    r_off: 0,
                    bytes: align16(s_off + dim / crate::quant::INDEX_FP4_BLOCK) as i32,
                }
            }
        }
    }

    /// Bytes of a row.
    pub fn size(&self) -> usize {
        self.bytes as usize
    }

    /// The (offset, length) pairs that map the codec's packed row (consecutive) onto this
    /// layout.
    fn parts(&self, codec: RowCodec) -> Vec<(usize, usize)> {
        match codec {
            RowCodec::Attention { dim, rope } => {
                let nope = dim - rope;
                vec![
                    (0, nope),
                    (self.s_off as usize, nope / crate::quant::KV_FP8_BLOCK),
                    (self.r_off as usize, 4 * rope),
                ]
            }
            RowCodec::Index { dim } => vec![
                (0, dim / 2),
                (self.s_off as usize, dim / crate::quant::INDEX_FP4_BLOCK),
            ],
        }
    }

    /// A GPU row as the codec packs it.
    pub fn to_codec(&self, codec: RowCodec, gpu: &[u8], out: &mut Vec<u8>) {
        for (off, n) in self.parts(codec) {
            out.extend_from_slice(&gpu[off..off + n]);
        }
    }

    /// A codec's row in this layout (`out` is one row, zeroed).
    pub fn from_codec(&self, codec: RowCodec, cpu: &[u8], out: &mut [u8]) {
        let mut at = 0;
        for (off, n) in self.parts(codec) {
            out[off..off + n].copy_from_slice(&cpu[at..at + n]);
            at += n;
        }
    }
}

/// Where one compressor's state lies.
#[derive(Clone, Debug)]
pub struct CompLayout {
    /// Tokens per entry.
    pub ratio: usize,
    /// Projection width per token.
    pub width: usize,
    /// Entry width.
    pub dim: usize,
    /// Overlapping blocks (c = 4).
    pub overlap: bool,
    /// Byte offsets in the fixed region: pending `kv` and scores (`ratio x width` f32), the
    /// previous block's overlap halves (`ratio x dim` f32 each).
    pub pend_kv: usize,
    /// See `pend_kv`.
    pub pend_score: usize,
    /// See `pend_kv`.
    pub prev_kv: usize,
    /// See `pend_kv`.
    pub prev_score: usize,
    /// Byte offset of the page table in the tables region.
    pub table: usize,
    /// Capacity of the page table.
    pub max_pages: usize,
    /// The entries' codec.
    pub codec: RowCodec,
    /// The entries' GPU layout.
    pub row: RowFormat,
}

impl CompLayout {
    /// Bytes of a page of entries.
    pub fn page_bytes(&self) -> usize {
        PAGE_ROWS * self.row.size()
    }
}

/// Where one block's state lies.
#[derive(Clone, Debug)]
pub struct BlockLayout {
    /// Compress ratio (0: window only).
    pub ratio: usize,
    /// Byte offset of the window ring in the fixed region.
    pub win_off: usize,
    /// The attention compressor (c > 0) and the indexer's (c = 4).
    pub comp: [Option<CompLayout>; 2],
}

/// The layout of a state over some blocks of a model.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Sliding window W.
    pub window: usize,
    /// Attention KV rows.
    pub attn_codec: RowCodec,
    /// Their GPU layout.
    pub attn_row: RowFormat,
    /// Each block's.
    pub blocks: Vec<BlockLayout>,
    /// Bytes of the fixed region.
    pub fixed_bytes: usize,
    /// Bytes of the page tables.
    pub table_bytes: usize,
}

impl Layout {
    /// The layout of blocks `blocks` of `cfg` (indices into `compress_ratios`).
    pub fn new(cfg: &Config, blocks: Range<usize>) -> Self {
        let attn_codec = RowCodec::Attention {
            dim: cfg.head_dim,
            rope: cfg.qk_rope_head_dim,
        };
        let attn_row = RowFormat::of(attn_codec);
        let w = cfg.sliding_window;
        let (mut fixed, mut tables) = (0usize, 0usize);
        let mut comp = |ratio: usize, dim: usize, codec: RowCodec, fixed: &mut usize| {
            let overlap = ratio == 4;
            let width = if overlap { 2 * dim } else { dim };
            let mut take = |n: usize| {
                let at = *fixed;
                *fixed += align16(n);
                at
            };
            let pend_kv = take(4 * ratio * width);
            let pend_score = take(4 * ratio * width);
            let (prev_kv, prev_score) = if overlap {
                (take(4 * ratio * dim), take(4 * ratio * dim))
            } else {
                (0, 0)
            };
            let max_pages = (cfg.max_position_embeddings / ratio).div_ceil(PAGE_ROWS);
            let table = tables;
            tables += 8 * max_pages;
            CompLayout {
                ratio,
                width,
                dim,
                overlap,
                pend_kv,
                pend_score,
                prev_kv,
                prev_score,
                table,
                max_pages,
                codec,
                row: RowFormat::of(codec),
            }
        };
        let blocks = blocks
            .map(|i| {
                let ratio = cfg.compress_ratios[i];
                let win_off = fixed;
                fixed += w * attn_row.size();
                let a = (ratio > 0).then(|| comp(ratio, cfg.head_dim, attn_codec, &mut fixed));
                let ix = (ratio == 4).then(|| {
                    let dim = cfg.index_head_dim;
                    comp(4, dim, RowCodec::Index { dim }, &mut fixed)
                });
                BlockLayout {
                    ratio,
                    win_off,
                    comp: [a, ix],
                }
            })
            .collect();
        Layout {
            window: w,
            attn_codec,
            attn_row,
            blocks,
            fixed_bytes: fixed,
            table_bytes: tables,
        }
    }
}

/// Pages of compressed entries shared by every sequence of a device.
pub struct Pool {
    gpu: Arc<Gpu>,
    kinds: Mutex<HashMap<usize, Kind>>,
    /// Device memory left free for activations when the pool grows.
    reserve: usize,
    /// Most bytes the pool may hold.
    limit: Option<u64>,
}

#[derive(Default)]
struct Kind {
    slabs: Vec<Buf>,
    free: Vec<u64>,
}

impl Pool {
    /// An empty pool that grows while more than `reserve` bytes of device memory stay free,
    /// up to `limit` bytes.
    pub fn new(gpu: Arc<Gpu>, reserve: usize, limit: Option<u64>) -> Self {
        Pool {
            gpu,
            kinds: Mutex::new(HashMap::new()),
            reserve,
            limit,
        }
    }

    /// `n` pages of `bytes` each, all or none.
    pub fn take(&self, bytes: usize, n: usize) -> Result<Vec<u64>> {
        let mut kinds = self.kinds.lock().expect("pool lock");
        let mut held: u64 = kinds
            .iter()
            .map(|(b, k)| (k.slabs.len() * SLAB_PAGES * b) as u64)
            .sum();
        let k = kinds.entry(bytes).or_default();
        while k.free.len() < n {
            let slab = bytes * SLAB_PAGES;
            if let Some(limit) = self.limit.filter(|&l| held + slab as u64 > l) {
                return Err(Error::OutOfMemory(format!(
                    "the decode-state pool is full ({} of {})",
                    crate::inspect::bytes(held),
                    crate::inspect::bytes(limit)
                )));
            }
            let (free, _) = self.gpu.memory()?;
            if free < slab + self.reserve {
                return Err(Error::OutOfMemory(format!(
                    "the decode-state pool needs {} more, and only {} of GPU memory is free ({} kept for activations)",
                    crate::inspect::bytes(slab as u64),
                    crate::inspect::bytes(free as u64),
                    crate::inspect::bytes(self.reserve as u64)
                )));
            }
            let b = self.gpu.alloc(slab)?;
            k.free
                .extend((0..SLAB_PAGES).rev().map(|i| b.ptr + (i * bytes) as u64));
            k.slabs.push(b);
            held += slab as u64;
        }
        let at = k.free.len() - n;
        Ok(k.free.split_off(at))
    }

    /// Returns pages.
    pub fn give(&self, bytes: usize, pages: &[u64]) {
        if pages.is_empty() {
            return;
        }
        let mut kinds = self.kinds.lock().expect("pool lock");
        kinds
            .entry(bytes)
            .or_default()
            .free
            .extend_from_slice(pages);
    }

    /// Bytes the pool holds, and bytes in use.
    pub fn usage(&self) -> (u64, u64) {
        let kinds = self.kinds.lock().expect("pool lock");
        kinds.iter().fold((0, 0), |(held, used), (bytes, k)| {
            let h = (k.slabs.len() * SLAB_PAGES * bytes) as u64;
            (held + h, used + h - (k.free.len() * bytes) as u64)
        })
    }
}

/// What the kernels see of one sequence in a forward call (`kernels/rows.cuh`: `SeqDesc`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqDesc {
    /// Address of the fixed region.
    pub fixed: u64,
    /// Address of the page tables.
    pub tables: u64,
    /// Position of the chunk's first token.
    pub pos: u32,
    /// Tokens in the chunk.
    pub len: u32,
    /// First row of the chunk in the batch.
    pub start: u32,
    /// Padding.
    pub pad: u32,
}

/// A sequence's decode state on a CUDA device.
pub struct CudaSeq {
    gpu: Arc<Gpu>,
    pool: Arc<Pool>,
    /// Where each block's state lies.
    pub layout: Arc<Layout>,
    pos: usize,
    prompt_end: usize,
    fixed: Buf,
    tables: Buf,
    /// Per block, the pages of its compressors' entries.
    pages: Vec<[Vec<u64>; 2]>,
}

/// A point to return a [`CudaSeq`] to.
pub struct CudaMark {
    pos: usize,
    prompt_end: usize,
    fixed: Buf,
}

impl CudaMark {
    /// An independent copy.
    pub fn try_clone(&self, gpu: &Gpu) -> Result<CudaMark> {
        let fixed = gpu.alloc(self.fixed.bytes)?;
        gpu.copy(fixed.ptr, self.fixed.ptr, self.fixed.bytes)?;
        Ok(CudaMark {
            pos: self.pos,
            prompt_end: self.prompt_end,
            fixed,
        })
    }
}

/// Copies blocks of `bytes` from `src[i]` to `dst[i]` in one launch.
fn copy_blocks(gpu: &Gpu, src: &[u64], dst: &[u64], bytes: usize) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    let s = gpu.upload(src)?;
    let d = gpu.upload(dst)?;
    gpu.launch(
        "copy_blocks",
        (src.len() as u32, 1, 1),
        256,
        0,
        Args::new().push(s.ptr).push(d.ptr).push(bytes as i32),
    )
}

impl CudaSeq {
    /// An empty state.
    pub fn new(gpu: &Arc<Gpu>, pool: &Arc<Pool>, layout: Arc<Layout>) -> Result<Self> {
        Ok(CudaSeq {
            fixed: gpu.zeros(layout.fixed_bytes)?,
            tables: gpu.zeros(layout.table_bytes)?,
            pages: vec![[Vec::new(), Vec::new()]; layout.blocks.len()],
            gpu: Arc::clone(gpu),
            pool: Arc::clone(pool),
            layout,
            pos: 0,
            prompt_end: 0,
        })
    }

    /// Tokens consumed.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Where the prompt being fed ends.
    pub fn prompt_end(&self) -> usize {
        self.prompt_end
    }

    /// See [`SeqState::prompt_end`].
    pub fn set_prompt_end(&mut self, end: usize) {
        self.prompt_end = end;
    }

    /// Advances the position after a forward call.
    pub fn advance(&mut self, n: usize) {
        self.pos += n;
    }

    /// Bytes of device memory held.
    pub fn bytes(&self) -> usize {
        let pages: usize = self
            .pages
            .iter()
            .zip(&self.layout.blocks)
            .flat_map(|(p, b)| {
                p.iter()
                    .zip(&b.comp)
                    .map(|(p, c)| c.as_ref().map_or(0, |c| p.len() * c.page_bytes()))
            })
            .sum();
        self.fixed.bytes + self.tables.bytes + pages
    }

    /// What the kernels see of this sequence for a chunk of `len` tokens at batch row `start`.
    pub fn desc(&self, start: usize, len: usize) -> SeqDesc {
        SeqDesc {
            fixed: self.fixed.ptr,
            tables: self.tables.ptr,
            pos: self.pos as u32,
            len: len as u32,
            start: start as u32,
            pad: 0,
        }
    }

    /// Takes the pages that entries up to position `end` need. Either all are taken, or none
    /// and the state is unchanged.
    pub fn reserve(&mut self, end: usize) -> Result<()> {
        let mut taken: Vec<(usize, usize, usize)> = Vec::new();
        let mut result = Ok(());
        'blocks: for (b, bl) in self.layout.blocks.iter().enumerate() {
            for (k, c) in bl.comp.iter().enumerate() {
                let Some(c) = c else { continue };
                let need = (end / c.ratio).div_ceil(PAGE_ROWS);
                let have = self.pages[b][k].len();
                if need <= have {
                    continue;
                }
                if need > c.max_pages {
                    result = Err(Error::Input(format!(
                        "position {end} is past the model's context"
                    )));
                    break 'blocks;
                }
                match self.pool.take(c.page_bytes(), need - have) {
                    Ok(p) => {
                        if let Err(e) = self
                            .gpu
                            .write(self.tables.ptr + (c.table + 8 * have) as u64, &p)
                        {
                            self.pool.give(c.page_bytes(), &p);
                            result = Err(e);
                            break 'blocks;
                        }
                        self.pages[b][k].extend_from_slice(&p);
                        taken.push((b, k, need - have));
                    }
                    Err(e) => {
                        result = Err(e);
                        break 'blocks;
                    }
                }
            }
        }
        if result.is_err() {
            for (b, k, n) in taken {
                let c = self.layout.blocks[b].comp[k].as_ref().expect("compressor");
                let at = self.pages[b][k].len() - n;
                let p = self.pages[b][k].split_off(at);
                self.pool.give(c.page_bytes(), &p);
            }
        }
        result
    }

    /// Gives back the pages past what `pos` needs.
    fn trim(&mut self, pos: usize) {
        for (b, bl) in self.layout.blocks.iter().enumerate() {
            for (k, c) in bl.comp.iter().enumerate() {
                let Some(c) = c else { continue };
                let need = (pos / c.ratio).div_ceil(PAGE_ROWS);
                if self.pages[b][k].len() > need {
                    let extra = self.pages[b][k].split_off(need);
                    self.pool.give(c.page_bytes(), &extra);
                }
            }
        }
    }

    /// Remembers the current position (the fixed region is copied; entries only grow).
    pub fn mark(&self) -> Result<CudaMark> {
        let fixed = self.gpu.alloc(self.fixed.bytes)?;
        self.gpu.copy(fixed.ptr, self.fixed.ptr, self.fixed.bytes)?;
        Ok(CudaMark {
            pos: self.pos,
            prompt_end: self.prompt_end,
            fixed,
        })
    }

    /// Returns to a mark taken on this state.
    pub fn rewind(&mut self, m: &CudaMark) -> Result<()> {
        if m.fixed.bytes != self.fixed.bytes || m.pos > self.pos {
            return Err(Error::Input("a mark of another state".into()));
        }
        self.gpu.copy(self.fixed.ptr, m.fixed.ptr, m.fixed.bytes)?;
        self.pos = m.pos;
        self.prompt_end = m.prompt_end;
        self.trim(m.pos);
        Ok(())
    }

    /// An independent copy on the same device.
    pub fn try_clone(&self) -> Result<CudaSeq> {
        let mut c = CudaSeq::new(&self.gpu, &self.pool, Arc::clone(&self.layout))?;
        self.gpu
            .copy(c.fixed.ptr, self.fixed.ptr, self.fixed.bytes)?;
        c.pos = self.pos;
        c.prompt_end = self.prompt_end;
        c.reserve(self.pos)?;
        for (b, bl) in self.layout.blocks.iter().enumerate() {
            for (k, comp) in bl.comp.iter().enumerate() {
                if let Some(comp) = comp {
                    copy_blocks(
                        &self.gpu,
                        &self.pages[b][k],
                        &c.pages[b][k],
                        comp.page_bytes(),
                    )?;
                }
            }
        }
        Ok(c)
    }

    /// The state as a plain value.
    pub fn to_host(&self) -> Result<SeqState> {
        let fixed: Vec<u8> = self.gpu.read(self.fixed.ptr, self.fixed.bytes)?;
        Ok(SeqState {
            pos: self.pos,
            prompt_end: self.prompt_end,
            blocks: self.host_blocks(&fixed, self.pos, true)?,
        })
    }

    /// A mark taken on this state, as the same mark of its host copy: what a state saved with
    /// its prompt point needs (the compressed entries are not read).
    pub fn mark_to_host(&self, m: &CudaMark) -> Result<crate::state::Mark> {
        if m.fixed.bytes != self.fixed.bytes || m.pos > self.pos {
            return Err(Error::Input("a mark of another state".into()));
        }
        let fixed: Vec<u8> = self.gpu.read(m.fixed.ptr, m.fixed.bytes)?;
        let at = SeqState {
            pos: m.pos,
            prompt_end: m.prompt_end,
            blocks: self.host_blocks(&fixed, m.pos, false)?,
        };
        Ok(at.mark())
    }

    /// The blocks of a host state at `pos` from the fixed part `fixed` (windows, pending rows)
    /// and, with `entries`, the compressed entries (else only their count).
    fn host_blocks(&self, fixed: &[u8], pos: usize, entries: bool) -> Result<Vec<BlockState>> {
        let l = &self.layout;
        let f32s = |off: usize, n: usize| -> Vec<f32> {
            fixed[off..off + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let mut blocks = Vec::with_capacity(l.blocks.len());
        for (b, bl) in l.blocks.iter().enumerate() {
            let mut window = Vec::new();
            if pos > 0 {
                let rb = l.attn_row.size();
                for s in 0..l.window {
                    let row = &fixed[bl.win_off + s * rb..bl.win_off + (s + 1) * rb];
                    l.attn_row.to_codec(l.attn_codec, row, &mut window);
                }
            }
            let mut comps: [Option<CompressorState>; 2] = [None, None];
            for (k, c) in bl.comp.iter().enumerate() {
                let Some(c) = c else { continue };
                let pending = pos % c.ratio;
                let finished = pos / c.ratio;
                let (prev_kv, prev_score) = if c.overlap && finished > 0 {
                    (
                        f32s(c.prev_kv, c.ratio * c.dim),
                        f32s(c.prev_score, c.ratio * c.dim),
                    )
                } else {
                    (Vec::new(), Vec::new())
                };
                let mut data = Vec::new();
                if entries {
                    let raw = self.read_pages(&self.pages[b][k], c)?;
                    data.reserve(finished * c.codec.bytes());
                    for e in 0..finished {
                        let rb = c.row.size();
                        c.row
                            .to_codec(c.codec, &raw[e * rb..(e + 1) * rb], &mut data);
                    }
                }
                comps[k] = Some(CompressorState {
                    kv: f32s(c.pend_kv, pending * c.width),
                    score: f32s(c.pend_score, pending * c.width),
                    prev_kv,
                    prev_score,
                    entries: Rows {
                        data,
                        len: finished,
                    },
                });
            }
            let [compressor, indexer] = comps;
            blocks.push(BlockState {
                window,
                compressor,
                indexer,
            });
        }
        Ok(blocks)
    }

    /// The contents of `pages`, consecutive.
    fn read_pages(&self, pages: &[u64], c: &CompLayout) -> Result<Vec<u8>> {
        let pb = c.page_bytes();
        let stage = self.gpu.alloc(pages.len() * pb)?;
        let dst: Vec<u64> = (0..pages.len())
            .map(|i| stage.ptr + (i * pb) as u64)
            .collect();
        copy_blocks(&self.gpu, pages, &dst, pb)?;
        self.gpu.read(stage.ptr, pages.len() * pb)
    }

    /// A plain state taken onto the device.
    pub fn from_host(
        gpu: &Arc<Gpu>,
        pool: &Arc<Pool>,
        layout: Arc<Layout>,
        s: &SeqState,
    ) -> Result<Self> {
        if s.blocks.len() != layout.blocks.len() {
            return Err(Error::Input(format!(
                "a state of {} blocks for {} blocks",
                s.blocks.len(),
                layout.blocks.len()
            )));
        }
        let mut seq = CudaSeq::new(gpu, pool, Arc::clone(&layout))?;
        let l = &layout;
        let mut fixed = vec![0u8; l.fixed_bytes];
        let put = |fixed: &mut Vec<u8>, off: usize, v: &[f32]| {
            for (i, x) in v.iter().enumerate() {
                fixed[off + 4 * i..off + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
            }
        };
        let bad = |what: &str| Error::Input(format!("state does not fit the model: {what}"));
        for (bl, st) in l.blocks.iter().zip(&s.blocks) {
            let cb = l.attn_codec.bytes();
            if !st.window.is_empty() {
                if st.window.len() != l.window * cb {
                    return Err(bad("window size"));
                }
                let rb = l.attn_row.size();
                for (slot, row) in st.window.chunks(cb).enumerate() {
                    let at = bl.win_off + slot * rb;
                    l.attn_row
                        .from_codec(l.attn_codec, row, &mut fixed[at..at + rb]);
                }
            }
            for (c, cs) in bl.comp.iter().zip([&st.compressor, &st.indexer]) {
                match (c, cs) {
                    (None, None) => {}
                    (Some(c), Some(cs)) => {
                        let pending = s.pos % c.ratio;
                        let finished = s.pos / c.ratio;
                        if cs.kv.len() != pending * c.width
                            || cs.score.len() != cs.kv.len()
                            || cs.entries.len != finished
                        {
                            return Err(bad("compressor rows"));
                        }
                        if c.overlap && finished > 0 && cs.prev_kv.len() != c.ratio * c.dim {
                            return Err(bad("overlap rows"));
                        }
                        put(&mut fixed, c.pend_kv, &cs.kv);
                        put(&mut fixed, c.pend_score, &cs.score);
                        if c.overlap {
                            put(&mut fixed, c.prev_kv, &cs.prev_kv);
                            put(&mut fixed, c.prev_score, &cs.prev_score);
                        }
                    }
                    _ => return Err(bad("compressor kinds")),
                }
            }
        }
        gpu.write(seq.fixed.ptr, &fixed)?;
        seq.pos = s.pos;
        seq.prompt_end = s.prompt_end;
        seq.reserve(s.pos)?;
        for (b, (bl, st)) in l.blocks.iter().zip(&s.blocks).enumerate() {
            for (k, (c, cs)) in bl
                .comp
                .iter()
                .zip([&st.compressor, &st.indexer])
                .enumerate()
            {
                let (Some(c), Some(cs)) = (c, cs) else {
                    continue;
                };
                let pages = &seq.pages[b][k];
                let (pb, rb, cb) = (c.page_bytes(), c.row.size(), c.codec.bytes());
                let mut stage = vec![0u8; pages.len() * pb];
                for e in 0..cs.entries.len {
                    c.row.from_codec(
                        c.codec,
                        cs.entries.row(e, cb),
                        &mut stage[e * rb..(e + 1) * rb],
                    );
                }
                let dev = gpu.upload(&stage)?;
                let src: Vec<u64> = (0..pages.len())
                    .map(|i| dev.ptr + (i * pb) as u64)
                    .collect();
                copy_blocks(gpu, &src, pages, pb)?;
            }
        }
        Ok(seq)
    }
}

impl Drop for CudaSeq {
    fn drop(&mut self) {
        for (b, bl) in self.layout.blocks.iter().enumerate() {
            for (k, c) in bl.comp.iter().enumerate() {
                if let Some(c) = c {
                    self.pool.give(c.page_bytes(), &self.pages[b][k]);
                }
            }
        }
    }
}
