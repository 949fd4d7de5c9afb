//! The CUDA device: weights in checkpoint precision in GPU memory, activations as f32 rows, the
//! decode state in a paged pool, and a kernel (or a few) for each operation of [`Device`].
//!
//! The driver and NVRTC are loaded at run time (cudarc, dynamic loading), so the same binary
//! runs on machines without CUDA, where [`device_count`] is 0. Kernels are CUDA C++ compiled by
//! NVRTC for the device found ([`kernels`]).

mod arena;
pub mod gpu;
pub mod kernels;
pub mod state;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gpu::{Args, Buf, Gpu, Graph};
pub use state::{CudaMark, CudaSeq};
use state::{Layout, Pool, SeqDesc};

use crate::backend::cpu::Cpu;
use crate::backend::{Device, Draw, Drawn, Hidden, Runner, Seq, Which};
use crate::config::{Config, ScoringFunc};
use crate::error::{Error, Result};
use crate::generate::TokenLogprob;
use crate::model::attention::Attention;
use crate::model::compressor::Compressor;
use crate::model::indexer::Indexer;
use crate::model::mhc::{HcHead, HyperConn, Residual};
use crate::model::moe::{Expert, Moe, Routing};
use crate::model::rope::Rope;
use crate::model::Span;
use crate::state::SeqState;
use crate::weights::{Matrix, Storage};

pub use gpu::device_count;

/// A model on a CUDA device.
pub type CudaBackend = Runner<Cuda>;

/// Weight formats as the kernels number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// e4m3 with 128x128 UE8M0 scales.
    F8 = 0,
    /// Packed e2m1 with 1x32 UE8M0 scales.
    F4 = 1,
    /// BF16.
    Bf16 = 2,
    /// F32.
    F32 = 3,
}

impl Format {
    /// Elements one lane decodes from a 16-byte load.
    fn chunk(self) -> usize {
        match self {
            Format::F8 => 16,
            Format::F4 => 32,
            Format::Bf16 => 8,
            Format::F32 => 4,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Format::F8 => "f8",
            Format::F4 => "f4",
            Format::Bf16 => "bf16",
            Format::F32 => "f32",
        }
    }

    /// Whether activations entering it are FP8-rounded.
    fn quantized(self) -> bool {
        matches!(self, Format::F8 | Format::F4)
    }
}

/// A weight matrix in GPU memory, in checkpoint precision.
pub struct Weight {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Its format.
    pub fmt: Format,
    w: Buf,
    s: Option<Buf>,
    /// The matrix itself, for a routed expert computed in host memory (`w` is then empty).
    host: Option<Matrix>,
}

impl Weight {
    fn scales(&self) -> u64 {
        self.s.as_ref().map_or(0, |s| s.ptr)
    }
}

/// A parameter vector in GPU memory.
pub struct Vector {
    buf: Buf,
    len: usize,
}

/// `rows x cols` f32 activations in GPU memory.
pub struct Tensor {
    buf: Buf,
    rows: usize,
    cols: usize,
    /// The values as the tensor-core linears take them, where the kernel that wrote them made
    /// those too (`rms_norm`); any other write drops them (`written`).
    quant: Option<Box<Quant>>,
    /// The same for the exact products (`split_act`'s three bf16 planes; `attend_join`).
    planes: Option<Buf>,
}

/// quant_act's output of a tensor, in both code orders (FP8 and FP4 kernels').
struct Quant {
    q: Buf,
    q_perm: Buf,
    s: Buf,
}

/// Quantized activations: the addresses of the codes and scales, and the buffers where they
/// were made for this call (else the tensor's `quant` holds them).
struct Quantized {
    q: u64,
    s: u64,
    _own: [Option<Buf>; 2],
}

impl Tensor {
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }
    fn len(&self) -> usize {
        self.rows * self.cols
    }
    /// The address of a tensor a kernel is about to write: what was derived from its values
    /// goes.
    fn written(&mut self) -> u64 {
        self.quant = None;
        self.planes = None;
        self.buf.ptr
    }
}

/// mHC weights of a batch: `post` (`T x M`) and `comb` (`T x M x M`).
pub struct Mix {
    post: Tensor,
    comb: Tensor,
}

/// The indexer's picks: `T x topk` entry ids, -1 past each query's count.
pub struct Picks {
    buf: Buf,
    k: usize,
}

/// The router's decisions: `T x topk` expert ids and weights.
pub struct Route {
    ids: Buf,
    weights: Buf,
    /// The pairs grouped by expert: `seg_expert`, `seg_off`, `seg_cnt` (E each), `nseg`,
    /// `order` (T k), as the experts' kernels read them.
    seg: Buf,
    t: usize,
}

/// A block's routed experts as the kernels address them.
pub struct ExpertSet {
    fmt: Format,
    /// `w1, s1, w3, s3, w2, s2` addresses, `E` each.
    tables: Buf,
    count: usize,
    /// The experts in host memory, where the CPU computes them.
    host: Option<Vec<Expert<Cpu>>>,
}

/// One forward call on the GPU: the batch's tokens, positions and sequences in GPU memory.
pub struct Batch<'a> {
    states: Vec<&'a mut CudaSeq>,
    layout: Arc<Layout>,
    t: usize,
    /// Largest position + 1 of any token (for a decode step, rounded up to its bucket).
    max_end: usize,
    meta: Buf,
    /// A decode step: its launches depend on the number of sequences and the bucket of
    /// `max_end` alone, so a recording of them can be replayed.
    steady: bool,
    tokens: u64,
    tok_pos: u64,
    tok_seq: u64,
    descs: u64,
    /// Per compress ratio: the (sequence, entry) pairs completed by this call.
    jobs: HashMap<usize, (u64, usize)>,
}

impl Batch<'_> {
    /// Points the launches at a copy of the batch description at `base`.
    fn rebase(&mut self, base: u64) {
        let old = self.meta.ptr;
        let moved = |p: &mut u64| *p = *p - old + base;
        for p in [
            &mut self.tokens,
            &mut self.tok_pos,
            &mut self.tok_seq,
            &mut self.descs,
        ] {
            moved(p);
        }
        self.jobs.values_mut().for_each(|(p, _)| moved(p));
    }
}

/// `#[repr(C)]` mirrors of the kernels' argument structs.
mod args {
    use super::state::RowFormat;

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Compress {
        pub kv: u64,
        pub score: u64,
        pub ape: u64,
        pub norm: u64,
        pub freqs: u64,
        pub c: i32,
        pub d: i32,
        pub width: i32,
        pub overlap: i32,
        pub half: i32,
        pub eps: f32,
        pub hs: f32,
        pub pend_kv: i64,
        pub pend_score: i64,
        pub prev_kv: i64,
        pub prev_score: i64,
        pub table: i64,
        pub row: RowFormat,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Attn {
        pub q: u64,
        pub kv: u64,
        pub picks: u64,
        pub tok_seq: u64,
        pub tok_pos: u64,
        pub descs: u64,
        pub om: u64,
        pub ol: u64,
        pub oo: u64,
        pub sink: u64,
        pub out: u64,
        pub done: u64,
        pub h: i32,
        pub dh: i32,
        pub s: i32,
        pub k: i32,
        pub window: i32,
        pub ratio: i32,
        pub t0: i32,
        pub scale: f32,
        pub win_off: i64,
        pub table: i64,
        pub row: RowFormat,
        pub packed: u64,
        pub hpb: i32,
        pub freqs: u64,
        pub half: i32,
        pub store: i32,
        pub planes: u64,
        pub plane_n: i64,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Score {
        pub q: u64,
        pub w: u64,
        pub tok_seq: u64,
        pub tok_pos: u64,
        pub descs: u64,
        pub scores: u64,
        pub img: u64,
        pub hist: u64,
        pub h: i32,
        pub dim: i32,
        pub ratio: i32,
        pub nmax: i32,
        pub passes: i32,
        pub blockwise: i32,
        pub table: i64,
        pub row: RowFormat,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct HcPre {
        pub fn_: u64,
        pub x: u64,
        pub base: u64,
        pub scale: u64,
        pub y: u64,
        pub post: u64,
        pub comb: u64,
        pub part: u64,
        pub done: u64,
        pub d: i32,
        pub iters: i32,
        pub hc_eps: f32,
        pub norm_eps: f32,
        pub rms_w: u64,
        pub q: u64,
        pub qp: u64,
        pub s: u64,
        pub rms_eps: f32,
        pub t: i32,
        pub pa: u64,
        pub pa2: u64,
        pub ppost: u64,
        pub pcomb: u64,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Topk {
        pub scores: u64,
        pub tok_pos: u64,
        pub hist: u64,
        pub done: u64,
        pub state: u64,
        pub counts: u64,
        pub picks: u64,
        pub ratio: i32,
        pub nmax: i32,
        pub k: i32,
        pub per_block: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Experts {
        pub w1: u64,
        pub s1: u64,
        pub w3: u64,
        pub s3: u64,
        pub w2: u64,
        pub s2: u64,
        pub seg_expert: u64,
        pub seg_off: u64,
        pub seg_cnt: u64,
        pub nseg: u64,
        pub order: u64,
        pub x: u64,
        pub h: u64,
        pub weights: u64,
        pub out: u64,
        pub d: i32,
        pub f: i32,
        pub k: i32,
        pub limit: f32,
    }

    /// moe.cu's `RouteArgs`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Route {
        pub logits: u64,
        pub bias: u64,
        pub tid2eid: u64,
        pub tokens: u64,
        pub ids: u64,
        pub weights: u64,
        pub done: u64,
        pub seg_expert: u64,
        pub seg_off: u64,
        pub seg_cnt: u64,
        pub nseg: u64,
        pub order: u64,
        pub t: i32,
        pub e: i32,
        pub k: i32,
        pub func: i32,
        pub scale: f32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct MmaExperts {
        pub w1: u64,
        pub s1: u64,
        pub w3: u64,
        pub s3: u64,
        pub w2: u64,
        pub s2: u64,
        pub seg_expert: u64,
        pub seg_off: u64,
        pub seg_cnt: u64,
        pub nseg: u64,
        pub order: u64,
        pub xq: u64,
        pub xs: u64,
        pub weights: u64,
        pub out: u64,
        pub d: i32,
        pub f: i32,
        pub k: i32,
        pub ks: i32,
        pub w: i32,
        pub limit: f32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct SampleParams {
        pub temperature: f32,
        pub top_p: f32,
        pub min_p: f32,
        pub top_k: u32,
        pub u1: f32,
        pub u2: f32,
        pub draft: i32,
        pub nlogprobs: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub struct SampleOut {
        pub token: u32,
        pub accepted: u32,
        pub logprob: f32,
        pub ntop: u32,
        pub top_ids: [u32; 20],
        pub top_lp: [f32; 20],
    }
}

/// Device memory kept free for activations when the state pool grows
/// (`HADAL_GPU_RESERVE_BYTES`, default 2 GiB).
fn reserve() -> usize {
    std::env::var("HADAL_GPU_RESERVE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2 << 30)
}

/// GPU memory `--experts-on auto` leaves free beyond the state pool's reserve, for activations
/// (a prefill chunk's) and the first decode states.
const WORK_BYTES: u64 = 6 << 30;

/// The main layer a routed expert's tensor belongs to (`layers.{i}.ffn.experts.*`).
fn expert_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("layers.")?;
    let (i, rest) = rest.split_once('.')?;
    rest.starts_with("ffn.experts.").then(|| i.parse().ok())?
}

/// The fewest last layers whose routed experts (`experts[i]` bytes for layer `i`) must leave
/// `total` bytes of weights for the rest to fit `budget`; `None` if all of them do not suffice.
fn layers_to_leave(total: u64, experts: &[u64], budget: u64) -> Option<usize> {
    let mut on_gpu = total;
    for n in 0..=experts.len() {
        if on_gpu <= budget {
            return Some(n);
        }
        if n < experts.len() {
            on_gpu -= experts[experts.len() - 1 - n];
        }
    }
    None
}

/// A CUDA device.
pub struct Cuda {
    /// The GPU.
    pub gpu: Arc<Gpu>,
    /// Whether FP8/FP4 linears and attention run on tensor cores (compute capability 8.0 and
    /// later, unless `HADAL_CUDA_LINEAR=simt` asks for the CUDA-core kernels).
    pub tensor_cores: bool,
    /// Whether decode steps are recorded once per shape and replayed as CUDA graphs (unless
    /// `HADAL_CUDA_GRAPHS=0`).
    pub graphs: AtomicBool,
    /// Whether mHC's pre step norms the sublayer's input in its own launch (the same bits as
    /// the norm's own launch; off to compare the two).
    pub fuse_norms: bool,
    /// Warps sharing a tile in the one-row expert passes, where not 0 (else chosen to fill
    /// the GPU: `expert_warps`); rounded down to a divisor of the tile's slices. For tests: the
    /// bits do not depend on it.
    pub expert_warps: AtomicUsize,
    /// Whether the indexer sums each block of 32 dims on its own in every pass (else the MMAs
    /// sum across blocks where the scales allow: `index_scores`). For tests: the bits do not
    /// depend on it.
    pub index_blockwise: AtomicBool,
    /// The longest rows of scores the top-k takes in one block (`index_topk`: 8,192, as many
    /// as its registers hold); longer ones take clusters. For tests: the picks do not depend
    /// on it.
    pub topk_one_block: AtomicUsize,
    pool: Arc<Pool>,
    layouts: Mutex<HashMap<(usize, usize), Arc<Layout>>>,
    recordings: Mutex<Recordings>,
    /// The main stream's counters and the side stream's.
    counters: Mutex<[Counters; 2]>,
    /// Whether independent chains of a forward run side by side on two streams
    /// ([`Device::join`]; off with `HADAL_CUDA_STREAMS=1`, to compare).
    pub concurrent: AtomicBool,

    /// Main layers (the last ones) whose routed experts stay in host memory.
    host_experts: usize,
    /// Nanoseconds spent computing those.
    host_expert_ns: AtomicU64,
}

/// Counters by which the blocks of a launch find the last of them to finish (which then joins
/// their partial results). Every kernel sets the counters it used back to zero, so they are
/// zero between launches and need no clearing: a stream orders its launches, and each stream
/// has counters of its own ([`Gpu::join`] runs two at once).
struct Counters {
    buf: Buf,
    /// Smaller buffers replaced by `buf`, kept because recorded graphs may address them.
    retired: Vec<Buf>,
}

impl Counters {
    /// Enough for any decode step's launches, so that one being recorded never grows them
    /// (the indexer's histograms of up to 511 tokens a step).
    const INITIAL: usize = 1 << 20;

    fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Counters {
            buf: gpu.zeros(4 * Self::INITIAL)?,
            retired: Vec::new(),
        })
    }
}

/// Recorded decode steps by (tokens, bucket of the longest context), least recently used
/// dropped beyond [`Recordings::MAX`].
#[derive(Default)]
struct Recordings {
    by_shape: HashMap<(usize, usize), Recording>,
    clock: u64,
}

impl Recordings {
    const MAX: usize = 64;
}

/// One recorded forward pass and the buffers its launches address.
struct Recording {
    graph: Graph,
    /// Where the batch's tokens, positions and descriptors are copied before a replay.
    meta: Buf,
    /// Where the replay leaves the final stream.
    out: Buf,
    used: u64,
}

/// The context length a decode step's launches are sized for: `end` rounded up to a quarter of
/// its power of two (at least 64), so a growing sequence is recorded about four times an
/// octave, and its kernels do at most a quarter more than needed.
fn bucket(end: usize) -> usize {
    let g = (end.max(1).ilog2().saturating_sub(2)).max(6);
    end.next_multiple_of(1 << g)
}

/// `gemv_rows` (linear.cu): weight rows a warp, activation rows a block of a prefill.
const GEMV_NR: usize = 4;
const GEMV_ROW_BLOCK: usize = 64;

/// Threads of a token's block in `hc_mix` and `hc_head` (their stream reductions hold 16 float4
/// a thread in flight, which 1,024 threads' registers would not allow).
const HC_THREADS: u32 = 512;

/// From this many tokens the mHC pre step meets through global memory (`hc_pre_rows_m4`), not
/// in a cluster a token: a cluster's blocks wait for each other, which across a prefill's
/// thousands of tokens holds SMs idle.
const HC_ROWS_FROM: usize = 64;

/// Tokens a block of `hc_pre_rows_m4` takes (`HC_ROWS_TOKENS` in mhc.cu).
const HC_ROWS_TOKENS: usize = 8;

/// `hc_pre_m4`'s cluster for four copies of `d` dims: (blocks, threads a block), one float4 of
/// the stream a thread. The fewest blocks (at most 16) that give at most 256 threads, else
/// up to 512; none where `d` does not split so.
fn hc_pre_cluster(d: usize) -> Option<(usize, usize)> {
    let d4 = d / 4;
    let fits = |c: usize, most: usize| {
        let threads = 4 * d4 / c;
        (d.is_multiple_of(4) && d4.is_multiple_of(c))
            .then_some(threads)
            .filter(|&n| n.is_multiple_of(32) && (128..=most).contains(&n))
    };
    [1, 2, 4, 8, 16]
        .iter()
        .find_map(|&c| fits(c, 256).map(|n| (c, n)))
        .or_else(|| fits(16, 512).map(|n| (16, n)))
}

/// Threads of a block that reduces a row of `n` values: about four values each (one round of
/// loads at decode, where a row is all the work there is), 32 to 1,024.
fn row_threads(n: usize) -> u32 {
    n.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32
}

/// Waves of `attend_mma` blocks a launch aims at (see `Cuda::attention`): of 2, 4 and 8 an 8K
/// prefill was fastest at 4 (docs/cuda.md).
const ATTEND_WAVES: usize = 4;

/// Dynamic shared memory of `attend_mma` (attention_mma.cu's `tc_layout`): three planes of 16
/// heads' queries and a plane of 16 keys, rows of `dh + 8` bf16 values; two more planes of the
/// keys' RoPE dims; the four warps' shares of the 16 x 16 scores; two chunks of 16 packed rows.
fn attend_mma_smem(dh: usize, nope: usize, row_bytes: usize) -> u32 {
    (2 * (3 * 16 + 16) * (dh + 8)
        + 2 * 2 * 16 * (dh - nope + 8)
        + 4 * 16 * 16 * 4
        + 2 * 16 * row_bytes) as u32
}

fn blocks_1d(n: usize, threads: usize) -> (u32, u32, u32) {
    (n.div_ceil(threads).max(1) as u32, 1, 1)
}

/// How many warps split the inner dimension of an `n x k` tensor-core product: enough for
/// about 2,048 warps (16 an SM on a 132-SM GPU, two blocks each), at most 8, each with at
/// least 256 of `k` in whole blocks of 128. It depends on the shape alone (never on the batch
/// or the GPU), and fixes the order of the sums.
fn mma_split(n: usize, k: usize) -> usize {
    let tiles = n.div_ceil(16);
    let mut ks = 1;
    while ks < 8 && tiles * ks < 2048 && k.is_multiple_of(256 * ks) && k / (2 * ks) >= 256 {
        ks *= 2;
    }
    ks
}

/// Warps sharing a tile of 16 rows in the one-row expert passes (`mma_experts`): the most,
/// up to the `ks` slices of k, that keep all `tiles` resident at once (16 warps an SM), so that
/// no tile waits for a second wave; one where tiles alone fill the GPU. The bits do not depend
/// on it.
fn expert_warps(tiles: usize, ks: usize, sms: u32) -> i32 {
    let mut w = 1;
    while w < ks && tiles * 2 * w <= 16 * sms as usize {
        w *= 2;
    }
    w as i32
}

/// Steps of 128 `k` in an FP4 one-row pass's ring (`F4S_STAGES` in mma.cu).
const F4S_STAGES: u32 = 3;

/// Entries a block of `topk_cluster` selects from (`TOPKC_BLOCK` in indexer.cu).
const TOPK_CLUSTER_BLOCK: usize = 16 * 1024;

/// Activation rows from which a tensor-core product takes the tiled kernels (`tiles.cu`), whose
/// bits are the row-pass kernels' own: below it, one or two passes over the weights cost less
/// than staging tiles.
const TILE_ROWS: usize = 64;

/// A tiled kernel's block (tiles.cu's `Tile`): weight rows, activation rows, and the dynamic
/// shared memory it takes. `wn`: warps along weight rows (2 for linears, 4 for the experts).
struct TileShape {
    rows_w: usize,
    rows_x: usize,
    smem: u32,
}

fn tile_shape(fmt: Format, exact: bool, wn: usize) -> TileShape {
    let f4 = fmt == Format::F4;
    let (planes, wm, stages) = if exact { (3, 16, 2) } else { (1, 32, 3) };
    let (rows_w, rows_x) = (64 * wn, wm * (8 / wn));
    let stage = rows_w * if f4 { 68 } else { 128 }
        + planes * rows_x * 256
        + if exact { 0 } else { 4 * rows_x };
    let run = 8 * 4 * (wm / 8) * 4 * 32 * 4;
    TileShape {
        rows_w,
        rows_x,
        smem: (stages * stage + run + 8 * rows_x) as u32,
    }
}

impl Cuda {
    /// Opens CUDA device `n`; the decode-state pool grows while free memory allows.
    pub fn new(n: usize) -> Result<Self> {
        Self::with_state_pool(n, None)
    }

    /// Opens CUDA device `n` with the decode-state pool capped at `limit` bytes.
    pub fn with_state_pool(n: usize, limit: Option<u64>) -> Result<Self> {
        let gpu = Gpu::open(n)?;
        let simt = std::env::var("HADAL_CUDA_LINEAR").is_ok_and(|v| v == "simt");
        let graphs = !std::env::var("HADAL_CUDA_GRAPHS").is_ok_and(|v| v == "0");
        Ok(Cuda {
            tensor_cores: gpu.arch >= (8, 0) && !simt,
            fuse_norms: true,
            expert_warps: AtomicUsize::new(0),
            index_blockwise: AtomicBool::new(false),
            topk_one_block: AtomicUsize::new(8192),
            concurrent: AtomicBool::new(
                !std::env::var("HADAL_CUDA_STREAMS").is_ok_and(|v| v == "1"),
            ),
            graphs: AtomicBool::new(graphs),
            pool: Arc::new(Pool::new(Arc::clone(&gpu), reserve(), limit)),
            layouts: Mutex::new(HashMap::new()),
            recordings: Mutex::new(Recordings::default()),
            counters: Mutex::new([Counters::new(&gpu)?, Counters::new(&gpu)?]),
            host_experts: 0,
            host_expert_ns: AtomicU64::new(0),
            gpu,
        })
    }

    /// Leaves the routed experts of the last `layers` main layers in host memory, computed
    /// there by the CPU: the hidden rows and the routing go to the host and the experts' sum
    /// comes back. Such a step cannot be recorded as a CUDA graph (the host computes inside
    /// it), so graphs are off.
    pub fn with_host_experts(self, layers: usize) -> Self {
        if layers > 0 {
            self.graphs.store(false, Ordering::Relaxed);
        }
        Cuda {
            host_experts: layers,
            ..self
        }
    }

    /// How many main layers' routed experts (the last ones) must stay in host memory for the
    /// rest of `ck`'s weights to fit this GPU's free memory, less the state pool's reserve and
    /// [`WORK_BYTES`] for activations and decode states (`--experts-on auto`).
    pub fn layers_to_leave(
        &self,
        cfg: &Config,
        ck: &crate::checkpoint::Checkpoint,
    ) -> Result<usize> {
        let (free, _) = self.gpu.memory()?;
        let budget = (free as u64).saturating_sub(reserve() as u64 + WORK_BYTES);
        let blocks = cfg.num_hidden_layers;
        let (mut total, mut experts) = (0u64, vec![0u64; blocks]);
        for (name, bytes) in ck.sizes() {
            total += bytes;
            if let Some(i) = expert_layer(name).filter(|&i| i < blocks) {
                experts[i] += bytes;
            }
        }
        let gib = |b: u64| crate::inspect::bytes(b);
        let Some(n) = layers_to_leave(total, &experts, budget) else {
            let rest = total - experts.iter().sum::<u64>();
            return Err(Error::OutOfMemory(format!(
                "{}: the weights other than routed experts take {}, more than the {} free \
                 less {} kept for activations and states",
                self.name(),
                gib(rest),
                gib(free as u64),
                gib(free as u64 - budget)
            )));
        };
        if n > 0 {
            eprintln!(
                "hadal: {} has {} free for {} of weights: the routed experts of the last {n} of \
                 {blocks} layers ({}) stay in host memory, computed by the CPU",
                self.name(),
                gib(free as u64),
                gib(total),
                gib(experts[blocks - n..].iter().sum())
            );
        }
        Ok(n)
    }

    /// The routed experts of a block kept in host memory: the batch's hidden rows and routing
    /// copied to the host, the experts summed there as the CPU backend sums them, the result
    /// copied back.
    fn host_experts(
        &self,
        moe: &Moe<Self>,
        experts: &[Expert<Cpu>],
        route: &Route,
        y: &Tensor,
    ) -> Result<Tensor> {
        let t = std::time::Instant::now();
        let p = route.t * moe.topk;
        let x = self.download(y)?;
        let ids: Vec<u32> = self.gpu.read(route.ids.ptr, p)?;
        let weights: Vec<f32> = self.gpu.read(route.weights.ptr, p)?;
        let ids: Vec<usize> = ids.into_iter().map(|i| i as usize).collect();
        let out = crate::backend::cpu::routed_experts(
            experts,
            moe.limit,
            moe.topk,
            (&ids, &weights),
            &x,
            crate::backend::cpu::Numerics::BatchInvariant,
        );
        let out = self.upload(&out, moe.hidden)?;
        let ns = t.elapsed().as_nanos() as u64;
        self.host_expert_ns.fetch_add(ns, Ordering::Relaxed);
        Ok(out)
    }

    /// `n` zeroed u32 counters (see [`Counters`]) for the launches queued next.
    fn counters(&self, n: usize) -> Result<u64> {
        let mut all = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut all[self.gpu.on_side() as usize];
        if 4 * n > c.buf.bytes {
            if self.gpu.capturing() {
                return Err(Error::Device(format!(
                    "{n} launch counters needed while recording a step"
                )));
            }
            let grown = self.gpu.zeros(4 * n.next_power_of_two())?;
            let old = std::mem::replace(&mut c.buf, grown);
            c.retired.push(old);
        }
        Ok(c.buf.ptr)
    }

    /// A weight's bytes (not its scales), read back.
    pub fn read_weight(&self, w: &Weight) -> Result<Vec<u8>> {
        self.gpu.read(w.w.ptr, w.w.bytes)
    }

    /// Bytes held by the decode-state pool, and in use.
    pub fn pool_usage(&self) -> (u64, u64) {
        self.pool.usage()
    }

    fn layout(&self, cfg: &Config, blocks: Range<usize>) -> Arc<Layout> {
        let mut l = self.layouts.lock().expect("layouts lock");
        Arc::clone(
            l.entry((blocks.start, blocks.end))
                .or_insert_with(|| Arc::new(Layout::new(cfg, blocks))),
        )
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<Tensor> {
        Ok(Tensor {
            buf: self.gpu.alloc(4 * rows * cols)?,
            rows,
            cols,
            quant: None,
            planes: None,
        })
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        a: &mut Args,
    ) -> Result<()> {
        self.gpu.launch(name, grid, block, smem, a)
    }

    /// `x` rounded to FP8 in blocks of 128, as an FP8/FP4 linear takes it.
    fn fake_quant(&self, x: &Tensor) -> Result<Tensor> {
        if !x.cols.is_multiple_of(128) {
            return Err(Error::Input(format!(
                "an FP8 activation of width {} (not a multiple of 128)",
                x.cols
            )));
        }
        let y = self.tensor(x.rows, x.cols)?;
        let nb = x.len() / 128;
        self.launch(
            "fake_quant_fp8",
            blocks_1d(nb, 8),
            256,
            0,
            Args::new().push(x.buf.ptr).push(y.buf.ptr).push(nb as i32),
        )?;
        Ok(y)
    }

    /// `x` as the tensor-core kernels take it: e4m3 codes as f16 and one scale per block of
    /// 128 (`perm` orders each 8 codes as the FP4 kernels pair them); made by the kernel that
    /// wrote `x` where it could (`Tensor::quant`).
    fn quantize(&self, x: &Tensor, perm: bool) -> Result<Quantized> {
        if let Some(c) = &x.quant {
            let q = if perm { &c.q_perm } else { &c.q };
            return Ok(Quantized {
                q: q.ptr,
                s: c.s.ptr,
                _own: [None, None],
            });
        }
        if !x.cols.is_multiple_of(128) {
            return Err(Error::Input(format!(
                "an FP8 activation of width {} (not a multiple of 128)",
                x.cols
            )));
        }
        let nb = x.len() / 128;
        let q = self.gpu.alloc(2 * x.len().max(1))?;
        let s = self.gpu.alloc(4 * nb.max(1))?;
        if nb > 0 {
            self.launch(
                "quant_act",
                blocks_1d(nb, 8),
                256,
                0,
                Args::new()
                    .push(x.buf.ptr)
                    .push(q.ptr)
                    .push(s.ptr)
                    .push(nb as i32)
                    .push(perm as i32),
            )?;
        }
        Ok(Quantized {
            q: q.ptr,
            s: s.ptr,
            _own: [Some(q), Some(s)],
        })
    }

    /// Room for quant_act's output of `n` values in both orders (`Tensor::quant`).
    fn quant_buffers(&self, n: usize) -> Result<Quant> {
        Ok(Quant {
            q: self.gpu.alloc(2 * n)?,
            q_perm: self.gpu.alloc(2 * n)?,
            s: self.gpu.alloc(4 * (n / 128))?,
        })
    }

    /// Whether an FP8/FP4 weight `n x k` goes through the tensor-core kernels.
    fn mma_takes(&self, w: &Weight) -> bool {
        self.tensor_cores && w.fmt.quantized() && w.cols.is_multiple_of(128) && w.cols > 0
    }

    /// `x W^T` on tensor cores for an FP8/FP4 weight, x rounded to FP8 on the way; with
    /// `second`, `x V^T` too for a weight V of the same format and width, in the same launch
    /// (the k split then follows the two shapes together). `exact` (FP8 only, `wo_a`): x
    /// unrounded, split into three bf16 parts that add up to it exactly (`split_act`), each
    /// part's products with the weight exact; `groups` then splits W's rows and x's columns.
    fn mma_linear(
        &self,
        w: &Weight,
        second: Option<&Weight>,
        x: &Tensor,
        groups: usize,
        exact: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (n, k) = (w.rows, w.cols);
        let fits = if exact {
            x.cols == k * groups && n.is_multiple_of(groups)
        } else {
            groups == 1 && x.len().is_multiple_of(k)
        };
        if !fits {
            return Err(Error::Input(format!(
                "a {}-wide activation into a {n} x {k} weight in {groups} groups",
                x.cols
            )));
        }
        let r = if exact { x.rows } else { x.len() / k };
        let y = self.tensor(r, n)?;
        let y2 = match second {
            Some(v) => Some(self.tensor(r, v.rows)?),
            None => None,
        };
        if r == 0 {
            return Ok((y, y2));
        }
        let xq = if let (true, Some(p)) = (exact, &x.planes) {
            Quantized {
                q: p.ptr,
                s: 0,
                _own: [None, None],
            }
        } else if exact {
            let q = self.gpu.alloc(6 * x.len())?;
            self.launch(
                "split_act",
                blocks_1d(x.len(), 256),
                256,
                0,
                Args::new().push(x.buf.ptr).push(q.ptr).push(x.len() as i64),
            )?;
            Quantized {
                q: q.ptr,
                s: 0,
                _own: [Some(q), None],
            }
        } else {
            self.quantize(x, w.fmt == Format::F4)?
        };
        let n2 = second.map_or(0, |v| v.rows);
        let ks = mma_split(n + n2, k);
        // Activation rows per pass: at most 64 for FP8, 32 for FP4 (its wider decode leaves
        // fewer registers), 16 against the three exact planes (more spill); more rows take
        // more passes over the weight.
        let widest = match (exact, w.fmt) {
            (true, _) => 2,
            (false, Format::F8) => 8,
            _ => 4,
        };
        let rt = [1usize, 2, 4, 8]
            .into_iter()
            .find(|&rt| 8 * rt >= r || rt == widest)
            .unwrap_or(widest);
        let (w2, s2, out2) = match (second, &y2) {
            (Some(v), Some(o)) => (v.w.ptr, v.scales(), o.buf.ptr),
            _ => (0, 0, 0),
        };
        let suffix = if exact { "f8x" } else { w.fmt.suffix() };
        let group_rows = if groups > 1 { n / groups } else { 0 };
        let tile = tile_shape(w.fmt, exact, 2);
        let (name, grid, smem) = if r > TILE_ROWS && group_rows % tile.rows_w == 0 {
            let grid = (
                n.max(n2).div_ceil(tile.rows_w) as u32,
                1 + second.is_some() as u32,
                r.div_ceil(tile.rows_x) as u32,
            );
            (format!("tile_linear_{suffix}"), grid, tile.smem)
        } else {
            let grid = (
                n.max(n2).div_ceil(16 * (8 / ks)) as u32,
                1 + second.is_some() as u32,
                r.div_ceil(8 * rt) as u32,
            );
            (format!("mma_linear_{suffix}_r{rt}"), grid, 0)
        };
        self.launch(
            &name,
            grid,
            256,
            smem,
            Args::new()
                .push(w.w.ptr)
                .push(w.scales())
                .push(xq.q)
                .push(xq.s)
                .push(y.buf.ptr)
                .push(n as i32)
                .push(k as i32)
                .push(r as i32)
                .push((x.len() / r) as i32)
                .push(n as i32)
                .push(group_rows as i32)
                .push(ks as i32)
                .push(w2)
                .push(s2)
                .push(out2)
                .push(n2 as i32),
        )?;
        Ok((y, y2))
    }

    /// `x W^T`; `groups` splits W's rows and x's columns. Without groups, x's values are taken
    /// as rows of W's width (a `T x M x D` stream into a `D`-wide weight is `T*M` rows).
    fn matmul(&self, w: &Weight, x: &Tensor, groups: usize) -> Result<Tensor> {
        let (n, k) = (w.rows, w.cols);
        let (r, xcols) = if groups == 1 && x.cols != k && k > 0 && x.len().is_multiple_of(k) {
            (x.len() / k, k)
        } else {
            (x.rows, x.cols)
        };
        if xcols != k * groups || n % groups != 0 {
            return Err(Error::Input(format!(
                "a {}-wide activation into a {n} x {k} weight in {groups} groups",
                x.cols
            )));
        }
        let y = self.tensor(r, n)?;
        if r == 0 {
            return Ok(y);
        }
        let group_rows = if groups > 1 { n / groups } else { 0 };
        if k % w.fmt.chunk() != 0 {
            return Err(Error::Input(format!(
                "a {n} x {k} {:?} weight: the CUDA linear takes widths that are multiples of {}",
                w.fmt,
                w.fmt.chunk()
            )));
        }
        // Enough blocks to fill the GPU: split K among warps when the matrix is short. The split
        // depends on the matrix alone, so a row's bits do not depend on the batch.
        let target = 2 * self.gpu.sms as usize;
        let mut ks = 1;
        while ks < 8 && n * ks / 8 < target && 2 * ks * 32 * w.fmt.chunk() <= k {
            ks *= 2;
        }
        let mut args = Args::new();
        args.push(w.w.ptr)
            .push(w.scales())
            .push(x.buf.ptr)
            .push(y.buf.ptr)
            .push(n as i32)
            .push(k as i32)
            .push(r as i32)
            .push(xcols as i32)
            .push(n as i32);
        // From 8 rows, BF16 and F32 weights take `gemv_rows`: the same sums, each activation
        // chunk serving GEMV_NR weight rows. A decode batch's rows take blocks of 8, next to
        // each other in the grid (they read the same weights), whatever the grid's size (the
        // head of 32 rows: 7.0 -> 2.1 ms); a prefill's take blocks of 64 where they still
        // fill the GPU.
        let batch = r < GEMV_ROW_BLOCK;
        let rpb = if batch { 8 } else { GEMV_ROW_BLOCK };
        let (tiles, row_blocks) = (n.div_ceil(GEMV_NR * 8 / ks), r.div_ceil(rpb));
        let grid = if batch {
            (row_blocks as u32, tiles as u32, 1)
        } else {
            (tiles as u32, row_blocks as u32, 1)
        };
        let rows =
            r >= 8 && tiles.max(row_blocks) <= 65535 && (batch || tiles * row_blocks >= target);
        if rows && groups == 1 && matches!(w.fmt, Format::Bf16 | Format::F32) {
            let name = format!("gemv_rows_{}", w.fmt.suffix());
            let args = args.push(ks as i32).push(rpb as i32).push(batch as i32);
            self.launch(&name, grid, 256, 0, args)?;
        } else {
            let name = format!("gemv_{}", w.fmt.suffix());
            let args = args.push(group_rows as i32).push(ks as i32);
            self.launch(&name, blocks_1d(n, 8 / ks), 256, 0, args)?;
        }
        Ok(y)
    }

    /// Slices of the longest key list of a batch (16 keys a slice, at most 128 slices; each
    /// token takes as many as its own keys need: `KEYS_PER_SPLIT` in
    /// attention.cu).
    fn splits(keys: usize) -> usize {
        keys.div_ceil(16).clamp(1, 128)
    }

    /// Whether `index_topk` takes rows of `nmax` scores, one block a row.
    fn topk_in_one_block(&self, nmax: usize) -> bool {
        // One block of 1,024 threads holds 8,192 keys in registers (`TOPK1_PER`).
        nmax <= self.topk_one_block.load(Ordering::Relaxed).min(8192)
    }

    /// Blocks of the cluster `topk_cluster` takes a row of `nmax` scores in, where it takes it
    /// (rows of 8,192 at most take one block, `index_topk`; rows past 16 blocks, or GPUs
    /// without clusters, the digit passes through global memory).
    fn topk_cluster_blocks(&self, nmax: usize) -> Option<u32> {
        if self.topk_in_one_block(nmax) {
            return None;
        }
        // Up to 16 blocks' entries (`TOPKC_BLOCK`): a cluster a row (compute capability 9.0).
        let c = nmax.div_ceil(TOPK_CLUSTER_BLOCK) as u32;
        (c <= 16 && self.gpu.arch >= (9, 0) && self.gpu.clusters_fit("topk_cluster", 1024, 0, c))
            .then_some(c)
    }

    /// The `k` largest of each row's first `(tok_pos[t] + 1) / ratio` scores, their indices
    /// in increasing order (the lowest among ties), written to `picks` (`rows x k`, -1 where a
    /// row has fewer). Short rows take one block, longer ones a cluster of blocks
    /// (`topk_cluster`, which starts from `hist`, each row's 256 counts of its visible keys'
    /// top 8 bits, and leaves them zero: required where [`Cuda::topk_cluster_blocks`] says it
    /// runs), the longest many blocks meeting through global memory (`topk_digit`).
    fn select_top(
        &self,
        scores: &Tensor,
        tok_pos: u64,
        ratio: usize,
        k: usize,
        picks: &Buf,
        hist: u64,
    ) -> Result<()> {
        let (t, nmax) = (scores.rows, scores.cols);
        let sms = self.gpu.sms;
        let mut row_args = Args::new();
        row_args
            .push(scores.buf.ptr)
            .push(tok_pos)
            .push(ratio as i32)
            .push(nmax as i32)
            .push(k as i32)
            .push(picks.ptr);
        if self.topk_in_one_block(nmax) {
            return self.launch("index_topk", (t as u32, 1, 1), 1024, 0, &mut row_args);
        }
        if let Some(c) = self.topk_cluster_blocks(nmax) {
            if hist == 0 {
                return Err(Error::Device(
                    "topk_cluster needs the rows' histograms".into(),
                ));
            }
            let grid = (c, t as u32, 1);
            return self.gpu.launch_clustered(
                "topk_cluster",
                grid,
                1024,
                0,
                c,
                row_args.push(hist),
            );
        }
        // The histograms and the blocks' counters are launch counters (zero, left zero): no
        // clearing launches.
        let done = self.counters(t * (1 + 2048))?;
        let state = self.gpu.alloc(16 * t)?;
        let per_block = (nmax * t)
            .div_ceil(2 * sms as usize)
            .next_multiple_of(256)
            .max(1024);
        let blocks = nmax.div_ceil(per_block);
        let counts = self.gpu.alloc(8 * t * blocks)?;
        let a = args::Topk {
            scores: scores.buf.ptr,
            tok_pos,
            hist: done + 4 * t as u64,
            done,
            state: state.ptr,
            counts: counts.ptr,
            picks: picks.ptr,
            ratio: ratio as i32,
            nmax: nmax as i32,
            k: k as i32,
            per_block: per_block as i32,
        };
        let grid = (t as u32, blocks as u32, 1);
        for (shift, bits) in [(21i32, 11i32), (10, 11), (0, 10)] {
            self.launch(
                "topk_digit",
                grid,
                256,
                0,
                Args::new().push(a).push(shift).push(bits),
            )?;
        }
        self.launch("topk_count", grid, 256, 0, Args::new().push(a))?;
        self.launch("topk_write", grid, 256, 0, Args::new().push(a))
    }

    /// The indexer's selection alone, on rows of scores given by the host (tests compare it
    /// with a sort): for row `t`, the indices of the `k` largest of its first `visible[t]`
    /// scores in increasing order, the lowest among ties, then -1s.
    pub fn top_k_rows(&self, scores: &[f32], visible: &[usize], k: usize) -> Result<Vec<Vec<i32>>> {
        let t = visible.len();
        if t == 0 || !scores.len().is_multiple_of(t) {
            return Err(Error::Input(format!("{} scores in {t} rows", scores.len())));
        }
        let nmax = scores.len() / t;
        if let Some(v) = visible.iter().find(|&&v| v == 0 || v > nmax) {
            return Err(Error::Input(format!(
                "{v} visible scores in rows of {nmax}"
            )));
        }
        let s = self.upload(scores, nmax)?;
        let pos: Vec<u32> = visible.iter().map(|&v| (v - 1) as u32).collect();
        let pos = self.gpu.upload(&pos)?;
        let picks = self.gpu.alloc(4 * t * k)?;
        // What index_scores counts as it writes the scores (`topk_cluster` starts from it).
        let mut hist = vec![0u32; 256 * t];
        for (row, (&v, h)) in scores
            .chunks(nmax)
            .zip(visible.iter().zip(hist.chunks_mut(256)))
        {
            for &x in &row[..v] {
                let b = x.to_bits();
                let key = if b >> 31 == 1 { !b } else { b | 1 << 31 };
                h[(key >> 24) as usize] += 1;
            }
        }
        let hist = self.gpu.upload(&hist)?;
        self.select_top(&s, pos.ptr, 1, k, &picks, hist.ptr)?;
        let v: Vec<i32> = self.gpu.read(picks.ptr, t * k)?;
        Ok(v.chunks(k.max(1)).map(|c| c.to_vec()).collect())
    }

    /// [`Device::hc_pre_norm`], the residual `before` mixed in first ([`Cuda::hc_pre_with`]).
    fn pre_norm(
        &self,
        hc: &HyperConn<Self>,
        x: &Tensor,
        w: &Vector,
        eps: f32,
        before: Option<&Residual<'_, Self>>,
    ) -> Result<(Tensor, Mix)> {
        // The pre step's kernels norm y with the sums of `rms_norm`'s 256 threads where
        // `rms_norm` would take as many (rows of 3,073 to 4,096: four float4 a thread).
        let fuse = self.fuse_norms && w.len == hc.dims.d && row_threads(w.len.div_ceil(4)) == 256;
        let (mut y, mix, normed) = self.hc_pre_with(hc, x, fuse.then_some((w, eps)), before)?;
        if !normed {
            self.rms_norm(&mut y, w, eps)?;
        }
        Ok((y, mix))
    }

    /// `hc_post` of `a` (plus `a2`, as `add` would add it).
    fn post_mix(
        &self,
        hc: &HyperConn<Self>,
        x: &mut Tensor,
        a: &Tensor,
        a2: Option<&Tensor>,
        mix: &Mix,
    ) -> Result<()> {
        let t = x.len() / (hc.dims.m * hc.dims.d);
        self.post_mix_at(hc, x.written(), t, a, a2, mix)
    }

    /// [`Cuda::post_mix`] into the stream of `t` tokens at `x`.
    fn post_mix_at(
        &self,
        hc: &HyperConn<Self>,
        x: u64,
        t: usize,
        a: &Tensor,
        a2: Option<&Tensor>,
        mix: &Mix,
    ) -> Result<()> {
        let (m, d) = (hc.dims.m, hc.dims.d);
        // hc_post takes four dims a thread for V4's four copies.
        let threads = if m == 4 && d % 4 == 0 {
            t * d / 4
        } else {
            t * d
        };
        self.launch(
            "hc_post",
            blocks_1d(threads, 256),
            256,
            0,
            Args::new()
                .push(x)
                .push(a.buf.ptr)
                .push(a2.map_or(0, |t| t.buf.ptr))
                .push(mix.post.buf.ptr)
                .push(mix.comb.buf.ptr)
                .push(t as i32)
                .push(m as i32)
                .push(d as i32),
        )
    }

    /// [`Device::hc_pre`], and with `norm` (V4's four copies), the RMS norm of the sublayer's
    /// input by its weights too, with the quantized rows `rms_norm` would write; the flag says
    /// whether the norm was applied. With `before`, the sublayer before's residual is mixed
    /// into the stream first (the caller has marked `x` written): by the cluster kernel as it
    /// reads the stream, else by `hc_post`.
    fn hc_pre_with(
        &self,
        hc: &HyperConn<Self>,
        x: &Tensor,
        norm: Option<(&Vector, f32)>,
        before: Option<&Residual<'_, Self>>,
    ) -> Result<(Tensor, Mix, bool)> {
        let (m, d) = (hc.dims.m, hc.dims.d);
        Self::check_hc(m)?;
        let t = x.len() / (m * d);
        let mix_in = |r: &Residual<'_, Self>| {
            self.post_mix_at(r.hc, x.buf.ptr, t, &r.a, r.b.as_ref(), &r.mix)
        };
        let mut y = self.tensor(t, d)?;
        let post = self.tensor(t, m)?;
        let comb = self.tensor(t, m * m)?;
        // Four copies (V4's) in one launch (`hc_pre_m4`, `hc_pre_rows_m4`); others as the
        // mixes' product, then the rest.
        let cluster = (m == 4).then(|| hc_pre_cluster(d)).flatten();
        if let (Some((c, threads)), Format::F32, true) = (cluster, hc.fn_.fmt, t > 0) {
            let per = d / 4 / c;
            // The fused norm stands in for rms_norm's 256 threads and quantizes whole warps'
            // blocks of 128.
            let norm = norm.filter(|_| row_threads(d / 4) == 256 && per.is_multiple_of(32));
            let quant = match norm {
                Some(_) if self.tensor_cores && d.is_multiple_of(128) => {
                    Some(Box::new(self.quant_buffers(t * d)?))
                }
                _ => None,
            };
            let (q, qp, s) = quant
                .as_ref()
                .map_or((0, 0, 0), |c| (c.q.ptr, c.q_perm.ptr, c.s.ptr));
            let n = (2 + m) * m;
            let np = (n + 4) & !3;
            // A cluster a token for few tokens (compute capability 9.0, where such clusters
            // fit); many meet through global memory (the same sums).
            let smem = |row: bool| 16 * threads + if row { 4 * d } else { 0 } + 4 * c * np;
            let rows = t >= HC_ROWS_FROM
                || self.gpu.arch < (9, 0)
                || !self.gpu.clusters_fit(
                    "hc_pre_m4",
                    threads as u32,
                    smem(norm.is_some()) as u32,
                    c as u32,
                );
            let (part, done) = if rows {
                (Some(self.gpu.alloc(4 * t * c * np)?), self.counters(t)?)
            } else {
                (None, 0)
            };
            let before = match before {
                Some(r) if rows => {
                    mix_in(r)?;
                    None
                }
                b => b,
            };
            let smem = smem(rows || norm.is_some());
            let a = args::HcPre {
                fn_: hc.fn_.w.ptr,
                x: x.buf.ptr,
                base: hc.base.buf.ptr,
                scale: hc.scale.buf.ptr,
                y: y.buf.ptr,
                post: post.buf.ptr,
                comb: comb.buf.ptr,
                part: part.as_ref().map_or(0, |b| b.ptr),
                done,
                d: d as i32,
                iters: hc.dims.iters as i32,
                hc_eps: hc.dims.hc_eps,
                norm_eps: hc.dims.norm_eps,
                rms_w: norm.map_or(0, |(w, _)| w.buf.ptr),
                q,
                qp,
                s,
                rms_eps: norm.map_or(0.0, |(_, e)| e),
                t: t as i32,
                pa: before.map_or(0, |r| r.a.buf.ptr),
                pa2: before.and_then(|r| r.b.as_ref()).map_or(0, |b| b.buf.ptr),
                ppost: before.map_or(0, |r| r.mix.post.buf.ptr),
                pcomb: before.map_or(0, |r| r.mix.comb.buf.ptr),
            };
            if rows {
                self.launch(
                    "hc_pre_rows_m4",
                    (c as u32, t.div_ceil(HC_ROWS_TOKENS) as u32, 1),
                    threads as u32,
                    smem as u32,
                    Args::new().push(a),
                )?;
            } else {
                let (threads, smem, c) = (threads as u32, smem as u32, c as u32);
                self.gpu.launch_clustered(
                    "hc_pre_m4",
                    (c, t as u32, 1),
                    threads,
                    smem,
                    c,
                    Args::new().push(a),
                )?;
            }
            y.quant = quant;
            return Ok((y, Mix { post, comb }, norm.is_some()));
        }
        if let Some(r) = before {
            mix_in(r)?;
        }
        let mix = self.matmul(&hc.fn_, x, 1)?;
        self.launch(
            "hc_mix",
            (t as u32, 1, 1),
            HC_THREADS,
            0,
            Args::new()
                .push(mix.buf.ptr)
                .push(x.buf.ptr)
                .push(hc.base.buf.ptr)
                .push(hc.scale.buf.ptr)
                .push(y.buf.ptr)
                .push(post.buf.ptr)
                .push(comb.buf.ptr)
                .push(m as i32)
                .push(d as i32)
                .push(hc.dims.iters as i32)
                .push(hc.dims.hc_eps)
                .push(hc.dims.norm_eps),
        )?;
        Ok((y, Mix { post, comb }, false))
    }

    fn check_hc(m: usize) -> Result<()> {
        if m > 8 {
            return Err(Error::Input(format!(
                "hc_mult = {m}: the CUDA kernels take at most 8 copies"
            )));
        }
        Ok(())
    }
}

impl Device for Cuda {
    type Tensor = Tensor;
    type Weight = Weight;
    type Vector = Vector;
    type Table = Buf;
    type State = CudaSeq;
    type Batch<'a> = Batch<'a>;
    type Mix = Mix;
    type Picks = Picks;
    type Route = Route;
    type Experts = ExpertSet;

    fn name(&self) -> String {
        format!("cuda:{} {}", self.gpu.ordinal, self.gpu.name)
    }

    fn weight(&self, m: Matrix) -> Result<Weight> {
        let (fmt, w, s) = match &m.storage {
            Storage::F8 { w, s } => (Format::F8, w, Some(s)),
            Storage::F4 { w, s } => (Format::F4, w, Some(s)),
            Storage::Bf16(w) => (Format::Bf16, w, None),
            Storage::F32(w) => (Format::F32, w, None),
            Storage::Bf16Tiles { .. } => return Err(tiles_on_gpu()),
        };
        Ok(Weight {
            rows: m.rows,
            cols: m.cols,
            fmt,
            w: upload_bytes(&self.gpu, w)?,
            s: s.map(|s| upload_bytes(&self.gpu, s)).transpose()?,
            host: None,
        })
    }

    fn experts_on_host(&self, block: usize, blocks: usize) -> bool {
        block < blocks && blocks - block <= self.host_experts
    }

    fn host_weight(&self, m: Matrix) -> Result<Weight> {
        let fmt = match m.storage {
            Storage::F8 { .. } => Format::F8,
            Storage::F4 { .. } => Format::F4,
            Storage::Bf16(_) => Format::Bf16,
            Storage::F32(_) => Format::F32,
            Storage::Bf16Tiles { .. } => return Err(tiles_on_gpu()),
        };
        // Synthetic weights are made now, not in the first step that reads them.
        m.materialize();
        Ok(Weight {
            rows: m.rows,
            cols: m.cols,
            fmt,
            w: self.gpu.alloc(0)?,
            s: None,
            host: Some(m),
        })
    }

    fn host_expert_secs(&self) -> f64 {
        self.host_expert_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    fn vector(&self, v: &[f32]) -> Result<Vector> {
        Ok(Vector {
            buf: self.gpu.upload(v)?,
            len: v.len(),
        })
    }

    fn table(&self, v: &[u32]) -> Result<Buf> {
        self.gpu.upload(v)
    }

    fn expert_set(&self, experts: &[Expert<Self>]) -> Result<ExpertSet> {
        let fmt = experts.first().map_or(Format::F4, |e| e.w1.fmt);
        let e = experts.len();
        if experts.first().is_some_and(|x| x.w1.host.is_some()) {
            let host = experts
                .iter()
                .map(|x| match (&x.w1.host, &x.w2.host, &x.w3.host) {
                    (Some(w1), Some(w2), Some(w3)) => Ok(Expert {
                        w1: w1.clone(),
                        w2: w2.clone(),
                        w3: w3.clone(),
                    }),
                    _ => Err(Error::Device(
                        "a block's routed experts are split between host and GPU".into(),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(ExpertSet {
                fmt,
                tables: self.gpu.alloc(0)?,
                count: e,
                host: Some(host),
            });
        }
        let mut t = vec![0u64; 6 * e];
        for (i, x) in experts.iter().enumerate() {
            if [&x.w1, &x.w2, &x.w3].iter().any(|w| w.fmt != fmt) {
                return Err(Error::Checkpoint(format!(
                    "routed expert {i}: its matrices are not all in the format of expert 0 ({fmt:?})"
                )));
            }
            for (j, w) in [&x.w1, &x.w3, &x.w2].into_iter().enumerate() {
                t[2 * j * e + i] = w.w.ptr;
                t[(2 * j + 1) * e + i] = w.scales();
            }
        }
        Ok(ExpertSet {
            fmt,
            tables: self.gpu.upload(&t)?,
            count: e,
            host: None,
        })
    }

    fn new_state(&self, cfg: &Config, blocks: Range<usize>) -> Result<CudaSeq> {
        CudaSeq::new(&self.gpu, &self.pool, self.layout(cfg, blocks))
    }

    fn state_from_host(&self, cfg: &Config, s: &SeqState, blocks: Range<usize>) -> Result<CudaSeq> {
        CudaSeq::from_host(&self.gpu, &self.pool, self.layout(cfg, blocks), s)
    }

    fn seq(s: CudaSeq) -> Seq {
        Seq::Cuda(s)
    }

    fn state_of(seq: &mut Seq) -> Result<&mut CudaSeq> {
        match seq {
            Seq::Cuda(s) => Ok(s),
            Seq::Host(_) => Err(Error::Input(
                "a host state given to the CUDA backend (import it first)".into(),
            )),
        }
    }

    fn batch<'a>(
        &self,
        tokens: Vec<u32>,
        spans: Vec<Span>,
        mut states: Vec<&'a mut CudaSeq>,
        blocks: usize,
    ) -> Result<Batch<'a>> {
        let layout = match states.first() {
            Some(s) => Arc::clone(&s.layout),
            None => return Err(Error::Input("a forward call without sequences".into())),
        };
        for (i, s) in states.iter().enumerate() {
            if s.layout.blocks.len() != blocks || !Arc::ptr_eq(&s.layout, &layout) {
                return Err(Error::Input(format!(
                    "sequence {i}: state has {} blocks, this model needs {blocks}",
                    s.layout.blocks.len()
                )));
            }
        }
        // Pages first: a sequence that cannot get them leaves every state as it was.
        for (s, sp) in states.iter_mut().zip(&spans) {
            s.reserve(sp.pos + sp.len)?;
        }
        let t = tokens.len();
        let mut tok_pos = Vec::with_capacity(t);
        let mut tok_seq = Vec::with_capacity(t);
        for (i, s) in spans.iter().enumerate() {
            for p in s.pos..s.pos + s.len {
                tok_pos.push(p as u32);
                tok_seq.push(i as u32);
            }
        }
        let descs: Vec<SeqDesc> = states
            .iter()
            .zip(&spans)
            .map(|(s, sp)| s.desc(sp.start, sp.len))
            .collect();
        let mut ratios: Vec<usize> = layout
            .blocks
            .iter()
            .flat_map(|b| b.comp.iter().flatten().map(|c| c.ratio))
            .collect();
        ratios.sort_unstable();
        ratios.dedup();
        // A decode step is recorded and replayed: its launches must not depend on which
        // sequences finish a compressed entry (each may, so each gets a slot, vacant or not).
        let steady = self.graphs.load(Ordering::Relaxed) && spans.iter().all(|s| s.len == 1);
        let mut job_lists: Vec<(usize, Vec<u32>)> = Vec::new();
        for &c in &ratios {
            let mut j = Vec::new();
            for (i, s) in spans.iter().enumerate() {
                for e in s.pos / c..(s.pos + s.len) / c {
                    j.push(i as u32);
                    j.push(e as u32);
                }
            }
            if steady {
                j.resize(2 * spans.len(), u32::MAX);
            }
            job_lists.push((c, j));
        }
        // One upload: descriptors (8-aligned) then the u32 arrays.
        let mut words: Vec<u32> = Vec::new();
        for d in &descs {
            // SAFETY: SeqDesc is plain old data of 32 bytes.
            let raw: [u32; 8] = unsafe { std::mem::transmute(*d) };
            words.extend_from_slice(&raw);
        }
        let at_tokens = words.len();
        words.extend_from_slice(&tokens);
        let at_pos = words.len();
        words.extend_from_slice(&tok_pos);
        let at_seq = words.len();
        words.extend_from_slice(&tok_seq);
        let mut job_at = Vec::new();
        for (c, j) in &job_lists {
            job_at.push((*c, words.len(), j.len() / 2));
            words.extend_from_slice(j);
        }
        let meta = self.gpu.upload(&words)?;
        let addr = |i: usize| meta.ptr + 4 * i as u64;
        let mut max_end = spans.iter().map(|s| s.pos + s.len).max().unwrap_or(0);
        if steady {
            max_end = bucket(max_end);
        }
        Ok(Batch {
            jobs: job_at
                .into_iter()
                .map(|(c, at, n)| (c, (addr(at), n)))
                .collect(),
            tokens: addr(at_tokens),
            tok_pos: addr(at_pos),
            tok_seq: addr(at_seq),
            descs: meta.ptr,
            meta,
            steady,
            states,
            layout,
            t,
            max_end,
        })
    }

    fn join<X: ?Sized, A, B>(
        &self,
        x: &mut X,
        a: impl FnOnce(&mut X) -> Result<A>,
        b: impl FnOnce(&mut X) -> Result<B>,
    ) -> Result<(A, B)> {
        self.gpu
            .join(self.concurrent.load(Ordering::Relaxed), x, a, b)
    }

    fn replay<'a, F>(&self, b: &mut Batch<'a>, width: usize, mut f: F) -> Result<Tensor>
    where
        F: FnMut(&mut Batch<'a>) -> Result<Tensor>,
    {
        if !b.steady || !self.graphs.load(Ordering::Relaxed) {
            return f(b);
        }
        let shape = (b.t, b.max_end);
        let bytes = 4 * b.t * width;
        let mut rec = self.recordings.lock().expect("recordings lock");
        rec.clock += 1;
        let now = rec.clock;
        if let Some(r) = rec.by_shape.get_mut(&shape) {
            r.used = now;
            self.gpu.copy(r.meta.ptr, b.meta.ptr, b.meta.bytes)?;
            self.gpu.replay(&r.graph)?;
            let out = self.tensor(b.t, width)?;
            self.gpu.copy(out.buf.ptr, r.out.ptr, bytes)?;
            return Ok(out);
        }
        // Record: the launches address a batch description and an output of their own.
        let meta = self.gpu.alloc(b.meta.bytes)?;
        self.gpu.copy(meta.ptr, b.meta.ptr, b.meta.bytes)?;
        b.rebase(meta.ptr);
        let out = self.gpu.alloc(bytes)?;
        let recorded = self.gpu.capture(|| {
            let x = f(b)?;
            if (x.rows, x.cols) != (b.t, width) {
                return Err(Error::Device(format!(
                    "a recorded pass returned {}x{}, not {}x{width}",
                    x.rows, x.cols, b.t
                )));
            }
            self.gpu.copy(out.ptr, x.buf.ptr, bytes)
        });
        let graph = match recorded {
            Ok(((), g)) => g,
            Err(Error::Device(e)) => {
                // The pass needs what a recording cannot hold: run it as it comes, from now on.
                eprintln!("hadal: warning: CUDA graphs off: recording a decode step failed: {e}");
                self.graphs.store(false, Ordering::Relaxed);
                return f(b);
            }
            Err(e) => return Err(e),
        };
        self.gpu.replay(&graph)?;
        let x = self.tensor(b.t, width)?;
        self.gpu.copy(x.buf.ptr, out.ptr, bytes)?;
        if rec.by_shape.len() >= Recordings::MAX {
            let oldest = rec
                .by_shape
                .iter()
                .min_by_key(|(_, r)| r.used)
                .map(|(k, _)| *k);
            oldest.map(|k| rec.by_shape.remove(&k));
        }
        rec.by_shape.insert(
            shape,
            Recording {
                graph,
                meta,
                out,
                used: now,
            },
        );
        Ok(x)
    }

    fn hidden(t: Tensor) -> Hidden {
        Hidden::Cuda(t)
    }

    fn tensor_of(h: &Hidden) -> Result<&Tensor> {
        match h {
            Hidden::Cuda(t) => Ok(t),
            Hidden::Host(_) => Err(Error::Input(
                "a host stream given to the CUDA backend".into(),
            )),
        }
    }

    fn upload(&self, x: &[f32], width: usize) -> Result<Tensor> {
        Ok(Tensor {
            buf: self.gpu.upload(x)?,
            rows: x.len() / width.max(1),
            cols: width,
            quant: None,
            planes: None,
        })
    }

    fn download(&self, x: &Tensor) -> Result<Vec<f32>> {
        self.gpu.read(x.buf.ptr, x.len())
    }

    fn copy(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.tensor(x.rows, x.cols)?;
        self.gpu.copy(y.buf.ptr, x.buf.ptr, 4 * x.len())?;
        Ok(y)
    }

    fn gather(&self, parts: &[(&Tensor, Range<usize>)], width: usize) -> Result<Tensor> {
        let width = if width == 0 {
            parts.first().map_or(0, |p| p.0.cols)
        } else {
            width
        };
        let rows: usize = parts.iter().map(|(_, r)| r.len()).sum();
        let y = self.tensor(rows, width)?;
        let mut at = 0;
        for (t, r) in parts {
            if r.end > t.rows || t.cols != width {
                return Err(Error::Input(format!(
                    "rows {r:?} of a tensor of {} x {}",
                    t.rows, t.cols
                )));
            }
            let bytes = 4 * r.len() * width;
            self.gpu.copy(
                y.buf.ptr + (4 * at * width) as u64,
                t.buf.ptr + (4 * r.start * width) as u64,
                bytes,
            )?;
            at += r.len();
        }
        Ok(y)
    }

    fn embed(&self, table: &Weight, b: &Batch<'_>, copies: usize) -> Result<Tensor> {
        let d = table.cols;
        let y = self.tensor(b.t, copies * d)?;
        self.launch(
            "embed",
            blocks_1d(y.len(), 256),
            256,
            0,
            Args::new()
                .push(table.w.ptr)
                .push(table.scales())
                .push(table.fmt as i32)
                .push(b.tokens)
                .push(y.buf.ptr)
                .push(b.t as i32)
                .push(copies as i32)
                .push(d as i32),
        )?;
        Ok(y)
    }

    fn linear(&self, w: &Weight, x: &Tensor) -> Result<Tensor> {
        if self.mma_takes(w) {
            Ok(self.mma_linear(w, None, x, 1, false)?.0)
        } else if w.fmt.quantized() {
            self.matmul(w, &self.fake_quant(x)?, 1)
        } else {
            self.matmul(w, x, 1)
        }
    }

    fn linear_pair(&self, a: &Weight, b: &Weight, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.mma_takes(a) && self.mma_takes(b) && a.fmt == b.fmt && a.cols == b.cols {
            let (ya, yb) = self.mma_linear(a, Some(b), x, 1, false)?;
            Ok((ya, yb.expect("a second output")))
        } else {
            Ok((self.linear(a, x)?, self.linear(b, x)?))
        }
    }

    fn linear_plain(&self, w: &Weight, x: &Tensor) -> Result<Tensor> {
        self.grouped_linear(w, x, 1)
    }

    fn grouped_linear(&self, w: &Weight, x: &Tensor, groups: usize) -> Result<Tensor> {
        if self.mma_takes(w) && w.fmt == Format::F8 && x.cols == w.cols * groups {
            Ok(self.mma_linear(w, None, x, groups, true)?.0)
        } else {
            self.matmul(w, x, groups)
        }
    }

    fn rms_norm(&self, x: &mut Tensor, w: &Vector, eps: f32) -> Result<()> {
        let rows = x.len() / w.len.max(1);
        // Four float4 a thread (ops.cu's NORM_VEC).
        let threads = row_threads(w.len.div_ceil(4));
        // Rows the tensor-core linears can take get their quantized form from the same launch.
        let quant =
            if self.tensor_cores && w.len.is_multiple_of(128) && w.len <= 16 * 1024 && rows > 0 {
                Some(Box::new(self.quant_buffers(x.len())?))
            } else {
                None
            };
        let (q, q_perm, s) = quant
            .as_ref()
            .map_or((0, 0, 0), |c| (c.q.ptr, c.q_perm.ptr, c.s.ptr));
        self.launch(
            "rms_norm",
            (rows as u32, 1, 1),
            threads,
            0,
            Args::new()
                .push(x.written())
                .push(w.buf.ptr)
                .push(w.len as i32)
                .push(eps)
                .push(q)
                .push(q_perm)
                .push(s),
        )?;
        x.quant = quant;
        Ok(())
    }

    fn head_norm_rope(
        &self,
        q: &mut Tensor,
        b: &Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
        eps: f32,
    ) -> Result<()> {
        let dh = q.cols / heads;
        self.launch(
            "head_norm_rope",
            ((b.t * heads) as u32, 1, 1),
            128,
            0,
            Args::new()
                .push(q.written())
                .push(b.tok_pos)
                .push(rope.table.buf.ptr)
                .push(heads as i32)
                .push(dh as i32)
                .push(rope.table.len as i32)
                .push(eps),
        )
    }

    fn rope(
        &self,
        x: &mut Tensor,
        b: &Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
        inverse: bool,
    ) -> Result<()> {
        let half = rope.table.len;
        self.launch(
            "rope",
            blocks_1d(b.t * heads * half, 256),
            256,
            0,
            Args::new()
                .push(x.written())
                .push(b.tok_pos)
                .push(rope.table.buf.ptr)
                .push(b.t as i32)
                .push(heads as i32)
                .push((x.cols / heads) as i32)
                .push(half as i32)
                .push(inverse as i32),
        )
    }

    fn index_queries(
        &self,
        q: &mut Tensor,
        b: &Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
    ) -> Result<()> {
        let dim = q.cols / heads;
        if !dim.is_power_of_two() || !(32..=1024).contains(&dim) {
            return Err(Error::Input(format!(
                "index_head_dim = {dim}: the CUDA indexer takes powers of two from 32 to 1024"
            )));
        }
        self.launch(
            "index_queries",
            ((b.t * heads) as u32, 1, 1),
            dim as u32,
            (4 * dim) as u32,
            Args::new()
                .push(q.written())
                .push(b.tok_pos)
                .push(rope.table.buf.ptr)
                .push(heads as i32)
                .push(dim as i32)
                .push(rope.table.len as i32)
                .push((dim as f32).powf(-0.5)),
        )
    }

    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()> {
        self.launch(
            "scale_k",
            blocks_1d(x.len(), 256),
            256,
            0,
            Args::new().push(x.written()).push(x.len() as i64).push(s),
        )
    }

    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::Input("adding tensors of other sizes".into()));
        }
        self.launch(
            "add_k",
            blocks_1d(x.len(), 256),
            256,
            0,
            Args::new()
                .push(x.written())
                .push(y.buf.ptr)
                .push(x.len() as i64),
        )
    }

    fn add_to_copies(
        &self,
        x: &mut Tensor,
        e: &Tensor,
        b: &Batch<'_>,
        copies: usize,
    ) -> Result<()> {
        // The result is the stream: a row per token.
        (x.rows, x.cols) = (b.t, copies * e.cols);
        self.launch(
            "add_to_copies",
            blocks_1d(x.len(), 256),
            256,
            0,
            Args::new()
                .push(x.written())
                .push(e.buf.ptr)
                .push(b.t as i32)
                .push(copies as i32)
                .push(e.cols as i32),
        )
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor, limit: f32) -> Result<Tensor> {
        let mut y = self.tensor(gate.rows, gate.cols)?;
        // As rms_norm: widths the tensor-core linears take come with their quantized form.
        if self.tensor_cores && y.cols.is_multiple_of(128) && y.len() > 0 {
            let c = self.quant_buffers(y.len())?;
            let nb = y.len() / 128;
            self.launch(
                "swiglu_quant",
                blocks_1d(nb, 8),
                256,
                0,
                Args::new()
                    .push(gate.buf.ptr)
                    .push(up.buf.ptr)
                    .push(y.buf.ptr)
                    .push(nb as i64)
                    .push(limit)
                    .push(c.q.ptr)
                    .push(c.q_perm.ptr)
                    .push(c.s.ptr),
            )?;
            y.quant = Some(Box::new(c));
            return Ok(y);
        }
        self.launch(
            "swiglu",
            blocks_1d(y.len(), 256),
            256,
            0,
            Args::new()
                .push(gate.buf.ptr)
                .push(up.buf.ptr)
                .push(y.buf.ptr)
                .push(y.len() as i64)
                .push(limit),
        )?;
        Ok(y)
    }

    fn hc_pre(&self, hc: &HyperConn<Self>, x: &Tensor) -> Result<(Tensor, Mix)> {
        let (y, mix, _) = self.hc_pre_with(hc, x, None, None)?;
        Ok((y, mix))
    }

    fn hc_pre_norm(
        &self,
        hc: &HyperConn<Self>,
        x: &Tensor,
        w: &Vector,
        eps: f32,
    ) -> Result<(Tensor, Mix)> {
        self.pre_norm(hc, x, w, eps, None)
    }

    fn hc_post_pre_norm(
        &self,
        done: Residual<'_, Self>,
        x: &mut Tensor,
        hc: &HyperConn<Self>,
        w: &Vector,
        eps: f32,
    ) -> Result<(Tensor, Mix)> {
        let n = x.len() / hc.dims.m;
        if let Some(bad) = [Some(&done.a), done.b.as_ref()]
            .into_iter()
            .flatten()
            .find(|t| t.len() != n)
        {
            return Err(Error::Input(format!(
                "a sublayer output of {} values for a stream copy of {n}",
                bad.len()
            )));
        }
        x.written();
        self.pre_norm(hc, x, w, eps, Some(&done))
    }

    fn hc_post(&self, hc: &HyperConn<Self>, x: &mut Tensor, a: &Tensor, mix: &Mix) -> Result<()> {
        self.post_mix(hc, x, a, None, mix)
    }

    fn hc_post_sum(
        &self,
        hc: &HyperConn<Self>,
        x: &mut Tensor,
        a: Tensor,
        b: &Tensor,
        mix: &Mix,
    ) -> Result<()> {
        if a.len() != b.len() {
            return Err(Error::Input("adding tensors of other sizes".into()));
        }
        self.post_mix(hc, x, &a, Some(b), mix)
    }

    fn hc_head(&self, h: &HcHead<Self>, x: &Tensor) -> Result<Tensor> {
        let (m, d) = (h.dims.m, h.dims.d);
        Self::check_hc(m)?;
        let mix = self.matmul(&h.fn_, x, 1)?;
        let t = x.len() / (m * d);
        let y = self.tensor(t, d)?;
        self.launch(
            "hc_head",
            (t as u32, 1, 1),
            HC_THREADS,
            0,
            Args::new()
                .push(mix.buf.ptr)
                .push(x.buf.ptr)
                .push(h.base.buf.ptr)
                .push(h.scale)
                .push(y.buf.ptr)
                .push(m as i32)
                .push(d as i32)
                .push(h.dims.hc_eps)
                .push(h.dims.norm_eps),
        )?;
        Ok(y)
    }

    fn compress(
        &self,
        c: &Compressor<Self>,
        b: &mut Batch<'_>,
        slot: usize,
        which: Which,
        kv: &Tensor,
        score: &Tensor,
        rope: &Rope<Self>,
    ) -> Result<()> {
        let k = match which {
            Which::Attention => 0,
            Which::Index => 1,
        };
        let cl = b.layout.blocks[slot].comp[k]
            .clone()
            .ok_or_else(|| Error::Input(format!("block {slot} has no {which:?} compressor")))?;
        if !c.dim.is_multiple_of(32) || c.dim > 1024 {
            return Err(Error::Input(format!(
                "compressed width {}: the CUDA compressor takes multiples of 32 up to 1024",
                c.dim
            )));
        }
        let a = args::Compress {
            kv: kv.buf.ptr,
            score: score.buf.ptr,
            ape: c.ape.buf.ptr,
            norm: c.norm.buf.ptr,
            freqs: rope.table.buf.ptr,
            c: c.ratio as i32,
            d: c.dim as i32,
            width: c.width() as i32,
            overlap: c.overlap as i32,
            half: rope.table.len as i32,
            eps: c.eps,
            hs: (c.dim as f32).powf(-0.5),
            pend_kv: cl.pend_kv as i64,
            pend_score: cl.pend_score as i64,
            prev_kv: cl.prev_kv as i64,
            prev_score: cl.prev_score as i64,
            table: cl.table as i64,
            row: cl.row,
        };
        if let Some(&(jobs, n)) = b.jobs.get(&c.ratio) {
            self.launch(
                "compress_emit",
                (n as u32, 1, 1),
                c.dim as u32,
                (4 * c.dim) as u32,
                Args::new().push(jobs).push(b.descs).push(a),
            )?;
        }
        self.launch(
            "compress_carry",
            (b.states.len() as u32, 1, 1),
            1024,
            0,
            Args::new().push(b.descs).push(a),
        )
    }

    fn index_topk(
        &self,
        ix: &Indexer<Self>,
        b: &Batch<'_>,
        slot: usize,
        q: &Tensor,
        w: &Tensor,
    ) -> Result<Picks> {
        let cl = b.layout.blocks[slot].comp[1]
            .as_ref()
            .ok_or_else(|| Error::Input(format!("block {slot} has no indexer")))?;
        let ratio = ix.compressor.ratio;
        if ix.dim > 128 || !ix.dim.is_multiple_of(32) || ix.heads > 128 {
            return Err(Error::Input(format!(
                "{} index heads of {} dims: the CUDA indexer takes up to 128 heads and \
                 multiples of 32 dims up to 128",
                ix.heads, ix.dim
            )));
        }
        let nmax = b.max_end / ratio;
        let picks = self.gpu.alloc(4 * b.t * ix.topk)?;
        if nmax == 0 {
            self.gpu.memset_value(picks.ptr, 0xff, picks.bytes)?;
            return Ok(Picks {
                buf: picks,
                k: ix.topk,
            });
        }
        let scores = self.tensor(b.t, nmax)?;
        // Each token's staged queries (`index_image`): f16 values in the lanes' order, block
        // scales, head weights, the span of the scales.
        let hp = ix.heads.next_multiple_of(8);
        let image = hp * (2 * ix.dim + 64) + 4 * 4 * hp + 4 * hp + 16;
        let img = self.gpu.alloc(b.t * image)?;
        // Three blocks an SM in all (as many as its registers hold: 168 a thread), so that a
        // long row is one wave, the row's passes of 128 entries (4 warps x 32) dealt evenly
        // over them (whole multiples of 128 a block had left some SMs a third more than
        // others). An entry's score does not depend on the block that computes it.
        let sms = self.gpu.sms as usize;
        let passes = nmax.div_ceil(128);
        // The rows' histograms for `topk_cluster` (launch counters: it leaves them zero).
        let hist = match self.topk_cluster_blocks(nmax) {
            Some(_) => self.counters(256 * b.t)?,
            None => 0,
        };
        let blocks = (3 * sms / b.t).clamp(1, passes);
        let a = args::Score {
            q: q.buf.ptr,
            w: w.buf.ptr,
            tok_seq: b.tok_seq,
            tok_pos: b.tok_pos,
            descs: b.descs,
            scores: scores.buf.ptr,
            img: img.ptr,
            hist,
            h: ix.heads as i32,
            dim: ix.dim as i32,
            ratio: ratio as i32,
            nmax: nmax as i32,
            passes: passes as i32,
            blockwise: self.index_blockwise.load(Ordering::Relaxed) as i32,
            table: cl.table as i64,
            row: cl.row,
        };
        self.launch(
            "index_stage",
            (b.t as u32, 1, 1),
            256,
            0,
            Args::new().push(a),
        )?;
        // The staged queries but their last 16 bytes, 4 warps x 32 rows of 80 bytes
        // (`IROW_PIECES` in indexer.cu).
        let smem = image - 16 + 4 * 32 * 80;
        self.launch(
            "index_scores",
            (b.t as u32, blocks as u32, 1),
            128,
            smem as u32,
            Args::new().push(a),
        )?;
        self.select_top(&scores, b.tok_pos, ratio, ix.topk, &picks, hist)?;
        Ok(Picks {
            buf: picks,
            k: ix.topk,
        })
    }

    fn attention(
        &self,
        a: &Attention<Self>,
        b: &mut Batch<'_>,
        slot: usize,
        q: &Tensor,
        kv: &Tensor,
        picks: Option<&Picks>,
    ) -> Result<Tensor> {
        let (h, dh, w) = (a.heads, a.dim, a.window);
        let row = b.layout.attn_row;
        if dh % 32 != 0 || dh > 512 {
            return Err(Error::Input(format!(
                "head_dim = {dh}: the CUDA attention takes multiples of 32 up to 512"
            )));
        }
        let bl = b.layout.blocks[slot].clone();
        if kv.rows != b.t || kv.cols != dh {
            return Err(Error::Input(format!(
                "{} x {} keys and values for {} tokens of {dh} dims",
                kv.rows, kv.cols, b.t
            )));
        }
        let kvr = self.tensor(b.t, dh)?;
        let packed = self.gpu.alloc(b.t * row.size())?;
        self.launch(
            "kv_pack",
            (b.t as u32, 1, 1),
            256,
            (4 * dh) as u32,
            Args::new()
                .push(kv.buf.ptr)
                .push(kvr.buf.ptr)
                .push(packed.ptr)
                .push(row),
        )?;
        let comp_keys = match picks {
            Some(p) => p.k,
            None if a.ratio > 0 => b.max_end / a.ratio,
            None => 0,
        };
        // Every token splits its keys by their own count (attention.cu), so that its result does
        // not depend on the batch; queries go in chunks that bound the partial results. The
        // last slice of a (token, group of heads) to finish joins them (`done` counts). On
        // tensor cores (attention_mma.cu) a block takes 32 keys a slice and 16 heads (8 or 4
        // where that leaves SMs idle), and a launch of its own joins the slices; on CUDA cores
        // 16 keys a slice and 8 heads (each key it decodes serves 8), or 4 where that leaves
        // SMs idle (a head's sums are the same either way).
        let keys = b.max_end.min(w) + comp_keys;
        // 64 RoPE dims of a head dividing 512: the others are then a multiple of 64, up to 448.
        let mma = self.tensor_cores && 512usize.is_multiple_of(dh) && dh == row.nope as usize + 64;
        let (s, hg, threads, smem) = if mma {
            // At most 66 slices (`attend_join` takes up to 128): past 2,112 keys, longer slices
            // rather than more blocks (a layer's blocks then fit the SMs at once, and the join
            // reads less). 66: a wave of V4-Flash's four groups of 16 heads, two blocks an SM
            // of 132; an HCA layer's 8,319 keys at 1M take 65 slices of eight chunks (64 had
            // made 58 of nine). A constant: a token's slices decide the order of its sums.
            let s = keys.div_ceil(32).clamp(1, 66);
            let mut hg = 16;
            while hg > 4 && b.t * h.div_ceil(hg) * s < self.gpu.sms as usize {
                hg /= 2;
            }
            (
                s,
                hg,
                128,
                attend_mma_smem(dh, row.nope as usize, row.size()),
            )
        } else {
            let s = Self::splits(keys);
            let wide = b.t * h.div_ceil(8) * s >= 2 * self.gpu.sms as usize;
            let hg = h.min(if wide { 8 } else { 4 });
            (s, hg, 32 * hg, 0)
        };
        let groups = h.div_ceil(hg);
        let chunk = ((256usize << 20) / (4 * h * s * dh)).clamp(1, b.t);
        // A block of `attend_mma` walks every z-th slice of its token: as many blocks as make
        // `ATTEND_WAVES` waves of two an SM, and no fewer than a block a slice where those are
        // fewer (decode). A prefill's queries are then split into planes a few times a token
        // instead of once a slice. Which block computes a slice does not change its sums.
        let z = if mma {
            (ATTEND_WAVES * 2 * self.gpu.sms as usize)
                .div_ceil(chunk * groups)
                .clamp(1, s)
        } else {
            s
        };
        let mut out = self.tensor(b.t, h * dh)?;
        // The tensor-core path's join also rotates the heads back, splits them into the output
        // projection's planes and, with every token in one launch, stores the window rows.
        let half = a.rope.table.len;
        let fused = mma && 2 * half <= dh && (dh - 2 * half).is_multiple_of(4);
        let store = fused && chunk == b.t;
        let planes = if fused {
            Some(self.gpu.alloc(6 * b.t * h * dh)?)
        } else {
            None
        };
        let om = self.tensor(chunk * h, s)?;
        let ol = self.tensor(chunk * h, s)?;
        let oo = self.tensor(chunk * h * s, dh)?;
        let mut args = args::Attn {
            q: q.buf.ptr,
            kv: kvr.buf.ptr,
            picks: picks.map_or(0, |p| p.buf.ptr),
            tok_seq: b.tok_seq,
            tok_pos: b.tok_pos,
            descs: b.descs,
            om: om.buf.ptr,
            ol: ol.buf.ptr,
            oo: oo.buf.ptr,
            sink: a.sink.buf.ptr,
            out: 0,
            done: 0,
            h: h as i32,
            dh: dh as i32,
            s: s as i32,
            k: picks.map_or(0, |p| p.k as i32),
            window: w as i32,
            ratio: a.ratio as i32,
            t0: 0,
            scale: (dh as f64).powf(-0.5) as f32,
            win_off: bl.win_off as i64,
            table: bl.comp[0].as_ref().map_or(0, |c| c.table as i64),
            row,
            packed: packed.ptr,
            hpb: hg as i32,
            freqs: if fused { a.rope.table.buf.ptr } else { 0 },
            half: half as i32,
            store: store as i32,
            planes: planes.as_ref().map_or(0, |p| p.ptr),
            plane_n: (b.t * h * dh) as i64,
        };
        for t0 in (0..b.t).step_by(chunk) {
            let n = chunk.min(b.t - t0);
            args.t0 = t0 as i32;
            args.out = out.buf.ptr + (4 * t0 * h * dh) as u64;
            if !mma {
                args.done = self.counters(n * groups)?;
            }
            self.launch(
                if mma { "attend_mma" } else { "attend" },
                (n as u32, groups as u32, z as u32),
                threads as u32,
                smem,
                Args::new().push(args),
            )?;
            if mma {
                self.launch(
                    "attend_join",
                    (n as u32, h as u32, dh.div_ceil(128) as u32),
                    128,
                    0,
                    Args::new().push(args),
                )?;
            }
        }
        out.planes = planes;
        if !fused {
            self.rope(&mut out, b, h, &a.rope, true)?;
        }
        if store {
            return Ok(out);
        }
        // The chunk's rows enter the window only after every query read the old ones.
        self.launch(
            "window_store",
            (b.t as u32, 1, 1),
            64,
            0,
            Args::new()
                .push(packed.ptr)
                .push(b.tok_seq)
                .push(b.tok_pos)
                .push(b.descs)
                .push(bl.win_off as i64)
                .push(w as i32)
                .push(row.bytes),
        )?;
        Ok(out)
    }

    fn sync(&self) -> Result<()> {
        self.gpu.sync()
    }

    fn bandwidth(&self) -> Result<f64> {
        // Two buffers of 2 GiB, far beyond the L2; bytes read plus written, best of ten.
        let n = 2usize << 30;
        let (a, b) = (self.gpu.zeros(n)?, self.gpu.zeros(n)?);
        self.gpu.sync()?;
        let mut best = 0f64;
        for i in 0..10 {
            let t = std::time::Instant::now();
            let (src, dst) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            self.gpu.copy(dst.ptr, src.ptr, n)?;
            self.gpu.sync()?;
            best = best.max(2.0 * n as f64 / t.elapsed().as_secs_f64());
        }
        Ok(best)
    }

    fn distinct_experts(&self, route: &Route) -> Result<usize> {
        let mut ids: Vec<u32> = self.gpu.read(route.ids.ptr, route.ids.bytes / 4)?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids.len())
    }

    fn route(&self, moe: &Moe<Self>, b: &Batch<'_>, logits: Tensor) -> Result<Route> {
        let (e, k) = (moe.experts.len(), moe.topk);
        if e > 1024 || k > 16 {
            return Err(Error::Input(format!(
                "{e} experts, {k} per token: the CUDA router takes at most 1024 and 16"
            )));
        }
        let p = b.t * k;
        let ids = self.gpu.alloc(4 * p)?;
        let weights = self.gpu.alloc(4 * p)?;
        let seg = self.gpu.alloc(4 * (3 * e + 1 + p))?;
        let at = |i: usize| seg.ptr + 4 * i as u64;
        let (bias, tid2eid) = match &moe.routing {
            Routing::Score(bias) => (bias.buf.ptr, 0u64),
            Routing::Hash(t) => (0u64, t.ptr),
        };
        let func = match moe.func {
            ScoringFunc::Sqrtsoftplus => 0i32,
            ScoringFunc::Sigmoid => 1,
            ScoringFunc::Softmax => 2,
        };
        let a = args::Route {
            logits: logits.buf.ptr,
            bias,
            tid2eid,
            tokens: b.tokens,
            ids: ids.ptr,
            weights: weights.ptr,
            done: self.counters(1)?,
            seg_expert: at(0),
            seg_off: at(e),
            seg_cnt: at(2 * e),
            nseg: at(3 * e),
            order: at(3 * e + 1),
            t: b.t as i32,
            e: e as i32,
            k: k as i32,
            func,
            scale: moe.scale,
        };
        self.launch(
            "route",
            (b.t as u32, 1, 1),
            256,
            (8 * e) as u32,
            Args::new().push(a),
        )?;
        Ok(Route {
            ids,
            weights,
            seg,
            t: b.t,
        })
    }

    fn experts(&self, moe: &Moe<Self>, route: &Route, y: &Tensor) -> Result<Tensor> {
        let set = &moe.set;
        let (e, k, d, f) = (set.count, moe.topk, moe.hidden, moe.inter);
        let p = route.t * k;
        if let Some(host) = &set.host {
            return self.host_experts(moe, host, route, y);
        }
        let out = self.tensor(route.t, d)?;
        if p == 0 {
            // No tokens.
            return Ok(out);
        }
        let at = |i: usize| route.seg.ptr + 4 * i as u64;
        let tab = |i: usize| set.tables.ptr + (8 * i * e) as u64;
        let segs = e.min(p) as u32;
        let pairs = self.tensor(p, d)?;
        let h = self.tensor(p, f)?;
        let sfx = set.fmt.suffix();
        if self.tensor_cores && set.fmt.quantized() && d % 128 == 0 && f % 128 == 0 {
            // From 32 pairs an expert on average, tiles of 64 pairs pay for themselves (an
            // expert's weights read once a tile); below, one-row passes. The bits are the same
            // either way.
            let tiled = p >= 32 * segs as usize;
            let perm = set.fmt == Format::F4;
            let yq = self.quantize(y, perm)?;
            let mut a = args::MmaExperts {
                w1: tab(0),
                s1: tab(1),
                w3: tab(2),
                s3: tab(3),
                w2: tab(4),
                s2: tab(5),
                seg_expert: at(0),
                seg_off: at(e),
                seg_cnt: at(2 * e),
                nseg: at(3 * e),
                order: at(3 * e + 1),
                xq: yq.q,
                xs: yq.s,
                weights: route.weights.ptr,
                out: h.buf.ptr,
                d: d as i32,
                f: f as i32,
                k: k as i32,
                ks: mma_split(f, d) as i32,
                w: 1,
                limit: moe.limit,
            };
            // One token: the FP4 passes take its activation into shared memory with the weights
            // (the `_x1` kernels), spread over every SM.
            let x1 = route.t == 1 && set.fmt == Format::F4;
            // One-row passes: a block a tile of 16 rows, its `w` warps walking the tile's `ks`
            // slices of k. FP4 weights stream through shared memory (`mma_core_f4_stream`: per
            // warp, `F4S_STAGES` steps of 16 rows of each weight, 80 bytes a row and 64 of
            // scales, and with one token its activation's 256 bytes and scale); the slices of
            // warps 1.. wait there too.
            let one_row = |a: &mut args::MmaExperts, rows: usize, weights: u32| {
                a.w = match self.expert_warps.load(Ordering::Relaxed) {
                    0 => expert_warps(
                        segs as usize * rows.div_ceil(16),
                        a.ks as usize,
                        self.gpu.sms,
                    ),
                    w => 1 << w.min(a.ks as usize).ilog2(),
                };
                let ring = if set.fmt == Format::F4 {
                    F4S_STAGES * ((16 * 80 + 64) * weights + if x1 { 272 } else { 0 })
                } else {
                    0
                };
                let part = weights * (a.ks - a.ks / a.w) as u32 * 512;
                let smem = a.w as u32 * ring + part;
                let blocks = segs * rows.div_ceil(16) as u32;
                let smem = if x1 {
                    self.gpu.spread_smem(blocks, smem)
                } else {
                    smem
                };
                (32 * a.w as u32, smem)
            };
            // Tiled: up takes 128 rows of w1 and of w3 a block, down 256 rows of w2.
            let tile = tile_shape(set.fmt, false, 4);
            let launch = |up: bool, a: &mut args::MmaExperts, rows: usize| {
                let dir = if up { "up" } else { "down" };
                if tiled {
                    let per = if up { tile.rows_w / 2 } else { tile.rows_w };
                    self.launch(
                        &format!("tile_experts_{dir}_{sfx}"),
                        (segs, rows.div_ceil(per) as u32, 1),
                        256,
                        tile.smem,
                        Args::new().push(*a),
                    )
                } else {
                    let (threads, smem) = one_row(a, rows, 1 + up as u32);
                    self.launch(
                        &format!("mma_experts_{dir}_{sfx}_{}", if x1 { "x1" } else { "r1" }),
                        (segs, rows.div_ceil(16) as u32, 1),
                        threads,
                        smem,
                        Args::new().push(*a),
                    )
                }
            };
            launch(true, &mut a, f)?;
            let hq = self.quantize(&h, perm)?;
            a.xq = hq.q;
            a.xs = hq.s;
            a.out = pairs.buf.ptr;
            a.ks = mma_split(d, f) as i32;
            launch(false, &mut a, d)?;
        } else {
            let x = if set.fmt.quantized() {
                self.fake_quant(y)?
            } else {
                self.copy(y)?
            };
            let mut a = args::Experts {
                w1: tab(0),
                s1: tab(1),
                w3: tab(2),
                s3: tab(3),
                w2: tab(4),
                s2: tab(5),
                seg_expert: at(0),
                seg_off: at(e),
                seg_cnt: at(2 * e),
                nseg: at(3 * e),
                order: at(3 * e + 1),
                x: x.buf.ptr,
                h: 0,
                weights: route.weights.ptr,
                out: h.buf.ptr,
                d: d as i32,
                f: f as i32,
                k: k as i32,
                limit: moe.limit,
            };
            self.launch(
                &format!("experts_up_{sfx}"),
                (segs, f.div_ceil(8) as u32, 1),
                256,
                0,
                Args::new().push(a),
            )?;
            let hq = if set.fmt.quantized() {
                self.fake_quant(&h)?
            } else {
                h
            };
            a.h = hq.buf.ptr;
            a.out = pairs.buf.ptr;
            self.launch(
                &format!("experts_down_{sfx}"),
                (segs, d.div_ceil(8) as u32, 1),
                256,
                0,
                Args::new().push(a),
            )?;
        }
        // The pairs' rows summed in order.
        self.launch(
            "moe_combine",
            blocks_1d(route.t * d, 256),
            256,
            0,
            Args::new()
                .push(pairs.buf.ptr)
                .push(out.buf.ptr)
                .push(route.t as i32)
                .push(k as i32)
                .push(d as i32),
        )?;
        Ok(out)
    }

    fn sample(&self, logits: &Tensor, draws: &mut [Draw]) -> Result<Vec<Drawn>> {
        let r = draws.len();
        if logits.rows != r {
            return Err(Error::Input(format!(
                "{} rows of logits for {r} draws",
                logits.rows
            )));
        }
        let params: Vec<args::SampleParams> = draws
            .iter_mut()
            .map(|d| {
                let p = d.sampler.params().clone();
                let sampled = p.temperature > 0.0;
                let u1 = if sampled {
                    d.sampler.uniform() as f32
                } else {
                    0.0
                };
                let u2 = if sampled && d.draft.is_some() {
                    d.sampler.uniform() as f32
                } else {
                    0.0
                };
                args::SampleParams {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    min_p: p.min_p,
                    top_k: p.top_k.min(u32::MAX as usize) as u32,
                    u1,
                    u2,
                    draft: d.draft.map_or(-1, |t| t as i32),
                    nlogprobs: p.logprobs.unwrap_or(0).min(20) as u32,
                }
            })
            .collect();
        let pbuf = self.gpu.upload(&params)?;
        let obuf = self.gpu.alloc(r * std::mem::size_of::<args::SampleOut>())?;
        // Blocks of 8,192 logits (8 a thread) split each row's first pass (`RowPart`: 16 bytes
        // each); one block alone had taken 31 us over V4's 129,280.
        let split = logits.cols.div_ceil(8192).clamp(1, 64);
        let parts = self.gpu.alloc(16 * r * split)?;
        let done = self.counters(r)?;
        self.launch(
            "sample_rows",
            (r as u32, split as u32, 1),
            1024,
            0,
            Args::new()
                .push(logits.buf.ptr)
                .push(logits.cols as i32)
                .push(pbuf.ptr)
                .push(obuf.ptr)
                .push(parts.ptr)
                .push(done),
        )?;
        let outs: Vec<args::SampleOut> = self.gpu.read(obuf.ptr, r)?;
        Ok(outs
            .iter()
            .zip(draws.iter())
            .map(|(o, d)| Drawn {
                token: o.token,
                accepted: o.accepted != 0,
                logprob: d.sampler.params().logprobs.map(|_| TokenLogprob {
                    token: o.token,
                    logprob: o.logprob,
                    top: (0..o.ntop as usize)
                        .map(|i| (o.top_ids[i], o.top_lp[i]))
                        .collect(),
                }),
            })
            .collect())
    }
}

/// A matrix in the CPU's tiled BF16 layout reached the GPU (the loader gives every device the
/// checkpoint's layout; only `Cpu::weight` tiles).
fn tiles_on_gpu() -> Error {
    Error::Device("a BF16 matrix in the CPU's tiled layout cannot be uploaded".into())
}

/// Bytes of a checkpoint tensor in GPU memory; synthetic ones are generated there.
fn upload_bytes(gpu: &Gpu, b: &crate::checkpoint::Bytes) -> Result<Buf> {
    let Some(f) = b.recipe() else {
        return gpu.upload::<u8>(b);
    };
    let out = gpu.alloc(f.len)?;
    gpu.launch(
        "fill_random",
        (4 * gpu.sms, 1, 1),
        256,
        0,
        Args::new()
            .push(out.ptr)
            .push(f.len as i64)
            .push(f.seed)
            .push(f.kind as i32)
            .push(f.lo)
            .push(f.span.max(1) as i32),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_passes_share_tiles_only_while_all_stay_resident() {
        // V4-Flash at batch 1 on an H200's 132 SMs: the six experts' 128 tiles of w1 and w3
        // take two warps each, their 256 tiles of w2 one.
        assert_eq!(expert_warps(6 * 128, 8, 132), 2);
        assert_eq!(expert_warps(6 * 256, 4, 132), 1);
        // A small model's few tiles: a warp a slice of k, never more.
        assert_eq!(expert_warps(4, 8, 132), 8);
        assert_eq!(expert_warps(4, 2, 132), 2);
        assert_eq!(expert_warps(4, 1, 132), 1);
    }

    #[test]
    fn experts_leave_for_the_host_from_the_last_layer() {
        assert_eq!(expert_layer("layers.12.ffn.experts.255.w1.scale"), Some(12));
        assert_eq!(expert_layer("layers.12.ffn.shared_experts.w1.weight"), None);
        assert_eq!(expert_layer("mtp.0.ffn.experts.3.w1.weight"), None);
        assert_eq!(expert_layer("layers.x.ffn.experts.3.w1.weight"), None);
        // 100 bytes of weights, 20 a layer in routed experts over 4 layers.
        let experts = [20, 20, 20, 20];
        assert_eq!(layers_to_leave(100, &experts, 100), Some(0));
        assert_eq!(layers_to_leave(100, &experts, 99), Some(1));
        assert_eq!(layers_to_leave(100, &experts, 60), Some(2));
        assert_eq!(layers_to_leave(100, &experts, 20), Some(4));
        assert_eq!(layers_to_leave(100, &experts, 19), None);
    }
}
