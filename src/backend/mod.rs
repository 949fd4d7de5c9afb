//! Devices that run the model.
//!
//! Two layers. [`Device`] is a set of component-sized operations (a quantized linear, the mHC
//! mix with Sinkhorn, a compressor step, the indexer's top-k, sparse attention with the sink,
//! the routed experts, sampling) that each device implements once, on its own tensors and in
//! its own weight layout. The model's files ([`crate::model`]) call them in the architecture's
//! order, so the forward pass is written once and a device differs only in kernels: the choice
//! the engines we are compared with made too (candle's per-device ops, DwarfStar's `ds4_gpu_*`).
//! The operations are coarse enough that a GPU can fuse inside them (an activation quantizer
//! inside its linear, Sinkhorn inside the mix) and fine enough that the model files read like
//! the architecture document.
//!
//! [`Backend`] is what the rest of hadal drives (generation, chat, the server, scoring): an
//! object-safe trait over a loaded model, implemented once for every device by [`Runner`].
//! A sequence's decode state lives where its device keeps it ([`Seq`]: host memory, or a GPU's
//! paged pool) and converts to and from the plain, serializable [`SeqState`] losslessly; the
//! final residual stream stays on the device too ([`Hidden`]), and only token ids, requested
//! log-probabilities or requested logits cross back.

pub mod cpu;
pub mod cuda;
mod runner;

use std::ops::Range;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::generate::{Sampler, TokenLogprob};
use crate::model::attention::Attention;
use crate::model::compressor::Compressor;
use crate::model::indexer::Indexer;
use crate::model::mhc::{HcHead, HyperConn, Residual};
use crate::model::moe::{Expert, Moe};
use crate::model::rope::Rope;
use crate::model::Span;
use crate::state::{Mark, SeqState};
use crate::weights::Matrix;

pub use runner::Runner;

/// Which of a block's compressors an operation addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The attention's KV compressor.
    Attention,
    /// The lightning indexer's key compressor.
    Index,
}

/// Component-sized operations of DeepSeek V4 on one device.
///
/// Tensors are row-major `rows x width` f32 activations whose width the operation knows from
/// its weights or arguments. `slot` is the index of a block in the states of the batch (the
/// block index for the main model, 0 for an MTP block's own state).
pub trait Device: Sized + Send + Sync + 'static {
    /// Activation rows.
    type Tensor: Send;
    /// A weight matrix in the device's layout, in checkpoint precision.
    type Weight: Send + Sync;
    /// A small parameter vector (norm weights, sinks, biases, `ape`, RoPE frequencies).
    type Vector: Send + Sync;
    /// An integer table (the hash router's `tid2eid`).
    type Table: Send + Sync;
    /// One sequence's decode state, as this device keeps it.
    type State: Send;
    /// One forward call: its tokens, their positions, and the states it advances.
    type Batch<'a>;
    /// The mHC weights of a batch (`post`, `comb`).
    type Mix;
    /// The compressed entries each query of a batch attends to (the indexer's top-k).
    type Picks;
    /// The experts and routing weights of each token of a batch.
    type Route;
    /// What the device keeps about a block's routed experts as a set (a GPU: a table of
    /// their weights' addresses).
    type Experts: Send + Sync;

    /// The device, for reports (`cpu`, `cuda:0 NVIDIA H200`).
    fn name(&self) -> String;

    /// Takes a weight matrix into the device's layout.
    fn weight(&self, m: Matrix) -> Result<Self::Weight>;
    /// Whether this device leaves the routed experts of block `block` (of `blocks` main
    /// blocks; MTP blocks come after them) in host memory and computes them there
    /// (`--experts-on`).
    fn experts_on_host(&self, block: usize, blocks: usize) -> bool {
        let _ = (block, blocks);
        false
    }
    /// Keeps a weight matrix in host memory, for the routed experts computed there.
    fn host_weight(&self, m: Matrix) -> Result<Self::Weight> {
        self.weight(m)
    }
    /// Seconds spent so far computing routed experts in host memory beside the device (see
    /// [`Device::experts_on_host`]); 0 where all are on the device.
    fn host_expert_secs(&self) -> f64 {
        0.0
    }
    /// Takes a parameter vector.
    fn vector(&self, v: &[f32]) -> Result<Self::Vector>;
    /// Takes an integer table.
    fn table(&self, v: &[u32]) -> Result<Self::Table>;
    /// Indexes a block's routed experts, once their weights are on the device.
    fn expert_set(&self, experts: &[Expert<Self>]) -> Result<Self::Experts>;

    /// An empty state for the blocks `blocks` of `cfg` (indices into `compress_ratios`).
    fn new_state(&self, cfg: &Config, blocks: Range<usize>) -> Result<Self::State>;
    /// A plain state taken onto the device (its blocks are `blocks` of `cfg`).
    fn state_from_host(
        &self,
        cfg: &Config,
        s: &SeqState,
        blocks: Range<usize>,
    ) -> Result<Self::State>;
    /// [`Device::state_from_host`] consuming the plain state (no copy on the host).
    fn state_from_host_owned(
        &self,
        cfg: &Config,
        s: SeqState,
        blocks: Range<usize>,
    ) -> Result<Self::State> {
        self.state_from_host(cfg, &s, blocks)
    }
    /// Wraps a state.
    fn seq(s: Self::State) -> Seq;
    /// The state inside a [`Seq`], or an error if it lives on another device.
    fn state_of(seq: &mut Seq) -> Result<&mut Self::State>;

    /// Lays out a forward call: concatenated tokens, one span per sequence, their states
    /// (which must hold `blocks` blocks).
    fn batch<'a>(
        &self,
        tokens: Vec<u32>,
        spans: Vec<Span>,
        states: Vec<&'a mut Self::State>,
        blocks: usize,
    ) -> Result<Self::Batch<'a>>;

    /// Runs `f`, the model's forward pass over `b`, which returns `b`'s rows of `width` values.
    /// A device may record what `f` queues the first time a batch of its shape comes and replay
    /// the recording for later ones: `f` then runs once per shape, so it must read nothing but
    /// the batch and the weights, and have no effect on the host.
    fn replay<'a, F>(&self, b: &mut Self::Batch<'a>, width: usize, mut f: F) -> Result<Self::Tensor>
    where
        F: FnMut(&mut Self::Batch<'a>) -> Result<Self::Tensor>,
    {
        let _ = width;
        f(b)
    }

    /// Runs `f`, one call's work as the host drives it. The CPU device runs it on a thread of
    /// its worker pool, so that each product's parallel loop starts on a worker, which takes its
    /// share at once, instead of handing the whole loop over and sleeping until it is done;
    /// other devices run it on the calling thread.
    fn on_host<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        f()
    }

    /// Queues `a`, then `b`: two chains of work that a device may run at the same time, each
    /// lent `x` (the batch, say) in turn. Neither may read what the other writes; work queued
    /// after this call sees both. A GPU runs `b` on a second stream beside `a`, so that one
    /// chain's small launches run while the other streams its weights; elsewhere one runs
    /// after the other. Either way each op computes the same bits.
    fn join<X: ?Sized, A, B>(
        &self,
        x: &mut X,
        a: impl FnOnce(&mut X) -> Result<A>,
        b: impl FnOnce(&mut X) -> Result<B>,
    ) -> Result<(A, B)> {
        let ra = a(x)?;
        Ok((ra, b(x)?))
    }

    /// Wraps a final stream.
    fn hidden(t: Self::Tensor) -> Hidden;
    /// The tensor inside a [`Hidden`], or an error if it lives on another device.
    fn tensor_of(h: &Hidden) -> Result<&Self::Tensor>;
    /// Host rows onto the device.
    fn upload(&self, x: &[f32], width: usize) -> Result<Self::Tensor>;
    /// Device rows to the host.
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// A copy of `x`.
    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Concatenates row ranges of tensors of width `width`.
    fn gather(&self, parts: &[(&Self::Tensor, Range<usize>)], width: usize)
        -> Result<Self::Tensor>;

    /// `[e; copies]` for each token of the batch, `e` its row of `table`.
    fn embed(
        &self,
        table: &Self::Weight,
        b: &Self::Batch<'_>,
        copies: usize,
    ) -> Result<Self::Tensor>;
    /// `x W^T` with the reference's numerics for `W`'s format: FP8-rounded activations (blocks
    /// of 128) for FP8 and FP4 weights, f32 activations for BF16/F32 weights.
    fn linear(&self, w: &Self::Weight, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `linear` of one input by two weights (one launch where a device can: two small
    /// products cost one's latency).
    fn linear_pair(
        &self,
        a: &Self::Weight,
        b: &Self::Weight,
        x: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        Ok((self.linear(a, x)?, self.linear(b, x)?))
    }
    /// `x W^T` with f32 activations whatever `W`'s format (the reference dequantizes these
    /// weights at load: gate, head, compressor, `weights_proj`).
    fn linear_plain(&self, w: &Self::Weight, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// The grouped output projection: `W`'s rows in `groups` equal groups, group g reading
    /// group g of the input's columns; f32 activations (the reference dequantizes `wo_a`).
    fn grouped_linear(
        &self,
        w: &Self::Weight,
        x: &Self::Tensor,
        groups: usize,
    ) -> Result<Self::Tensor>;
    /// `x * rsqrt(mean(x^2) + eps) * w` on every row of width `w`'s length.
    fn rms_norm(&self, x: &mut Self::Tensor, w: &Self::Vector, eps: f32) -> Result<()>;
    /// Each head of `heads` per row scaled by its own `rsqrt(mean(q^2) + eps)`, then rotated
    /// at its token's position.
    fn head_norm_rope(
        &self,
        q: &mut Self::Tensor,
        b: &Self::Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
        eps: f32,
    ) -> Result<()>;
    /// Rotates the last dims of each of `heads` heads per row at its token's position (back by
    /// that angle when `inverse`).
    fn rope(
        &self,
        x: &mut Self::Tensor,
        b: &Self::Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
        inverse: bool,
    ) -> Result<()>;
    /// Indexer queries: each head rotated, Hadamard-transformed and FP4-rounded (block 32).
    fn index_queries(
        &self,
        q: &mut Self::Tensor,
        b: &Self::Batch<'_>,
        heads: usize,
        rope: &Rope<Self>,
    ) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Tensor, s: f32) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// Adds token t's row of `e` to each of the `copies` parts of its row of `x`.
    fn add_to_copies(
        &self,
        x: &mut Self::Tensor,
        e: &Self::Tensor,
        b: &Self::Batch<'_>,
        copies: usize,
    ) -> Result<()>;
    /// `silu(min(gate, L)) * clamp(up, -L, L)` (no clamp when `limit` is 0).
    fn swiglu(&self, gate: &Self::Tensor, up: &Self::Tensor, limit: f32) -> Result<Self::Tensor>;

    /// The mHC mix before a sublayer: the sublayer's input (before its norm) and the weights
    /// [`Device::hc_post`] needs.
    fn hc_pre(&self, hc: &HyperConn<Self>, x: &Self::Tensor) -> Result<(Self::Tensor, Self::Mix)>;
    /// [`Device::hc_pre`], then [`Device::rms_norm`] of the sublayer's input by `w` (a device
    /// may do both in one pass).
    fn hc_pre_norm(
        &self,
        hc: &HyperConn<Self>,
        x: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Mix)> {
        let (mut y, mix) = self.hc_pre(hc, x)?;
        self.rms_norm(&mut y, w, eps)?;
        Ok((y, mix))
    }
    /// The sublayer before's residual mixed into the stream ([`Residual::apply`]), then
    /// [`Device::hc_pre_norm`] of the next sublayer: a device may do both in one pass over
    /// the stream.
    fn hc_post_pre_norm(
        &self,
        done: Residual<'_, Self>,
        x: &mut Self::Tensor,
        hc: &HyperConn<Self>,
        w: &Self::Vector,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Mix)> {
        done.apply(self, x)?;
        self.hc_pre_norm(hc, x, w, eps)
    }
    /// The mHC mix after a sublayer: `X'_k = post_k a + sum_j comb[j][k] X_j`, in place.
    fn hc_post(
        &self,
        hc: &HyperConn<Self>,
        x: &mut Self::Tensor,
        a: &Self::Tensor,
        mix: &Self::Mix,
    ) -> Result<()>;
    /// [`Device::hc_post`] of a sublayer output that is a sum, `a + b` (the MoE's routed and
    /// shared experts): a device may add them as it mixes.
    fn hc_post_sum(
        &self,
        hc: &HyperConn<Self>,
        x: &mut Self::Tensor,
        mut a: Self::Tensor,
        b: &Self::Tensor,
        mix: &Self::Mix,
    ) -> Result<()> {
        self.add(&mut a, b)?;
        self.hc_post(hc, x, &a, mix)
    }
    /// The stream's final reduction before the head.
    fn hc_head(&self, h: &HcHead<Self>, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Feeds each token's compressor projections (`kv`, `score`) to compressor `which` of
    /// block `slot`, emitting an entry wherever a block of `ratio` tokens completes.
    #[allow(clippy::too_many_arguments)]
    fn compress(
        &self,
        c: &Compressor<Self>,
        b: &mut Self::Batch<'_>,
        slot: usize,
        which: Which,
        kv: &Self::Tensor,
        score: &Self::Tensor,
        rope: &Rope<Self>,
    ) -> Result<()>;
    /// The lightning indexer's choice for each query: the `index_topk` best of its visible
    /// keys by `sum_h w_h relu(q_h . key)`.
    fn index_topk(
        &self,
        ix: &Indexer<Self>,
        b: &Self::Batch<'_>,
        slot: usize,
        q: &Self::Tensor,
        w: &Self::Tensor,
    ) -> Result<Self::Picks>;
    /// Attention of each query head over its window, its compressed entries (the `picks` for
    /// CSA, all finished ones for HCA) and the sink; `kv` are the batch's new KV rows (normed
    /// and rotated), rounded and stored in the window by this call. Returns `T x H x Dh`,
    /// each head's output rotated back (the inverse of `a.rope`).
    fn attention(
        &self,
        a: &Attention<Self>,
        b: &mut Self::Batch<'_>,
        slot: usize,
        q: &Self::Tensor,
        kv: &Self::Tensor,
        picks: Option<&Self::Picks>,
    ) -> Result<Self::Tensor>;
    /// The router: experts and weights of each token from its gate logits.
    fn route(
        &self,
        moe: &Moe<Self>,
        b: &Self::Batch<'_>,
        logits: Self::Tensor,
    ) -> Result<Self::Route>;
    /// The sum of each token's routed experts (SwiGLU, routing weight before `w2`).
    fn experts(
        &self,
        moe: &Moe<Self>,
        route: &Self::Route,
        y: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// Waits for the work queued so far (timing).
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// The memory bandwidth this device reaches, measured now (bytes/s): a streaming read on a
    /// CPU, a device-to-device copy (bytes read plus written) on a GPU.
    fn bandwidth(&self) -> Result<f64>;

    /// The distinct experts of a batch's routing (for reports; may wait for the device).
    fn distinct_experts(&self, route: &Self::Route) -> Result<usize>;

    /// Draws one token from each row of `logits` (and decides speculative drafts).
    fn sample(&self, logits: &Self::Tensor, draws: &mut [Draw]) -> Result<Vec<Drawn>> {
        let l = self.download(logits)?;
        let v = l.len() / draws.len().max(1);
        Ok(draws
            .iter_mut()
            .zip(l.chunks(v.max(1)))
            .map(|(d, row)| d.on_host(row))
            .collect())
    }
}

/// A sequence's decode state, where its backend keeps it.
pub enum Seq {
    /// In host memory (the CPU backend).
    Host(SeqState),
    /// Resident on a CUDA device.
    Cuda(cuda::CudaSeq),
}

/// A point to return a [`Seq`] to (see [`Seq::mark`]).
pub enum SeqMark {
    /// Of a host state.
    Host(Mark),
    /// Of a CUDA state.
    Cuda(cuda::CudaMark),
}

impl Seq {
    /// A mark taken on this state, as the mark of its host copy ([`Backend::export_state`]).
    pub fn mark_to_host(&self, m: &SeqMark) -> Result<Mark> {
        match (self, m) {
            (Seq::Host(_), SeqMark::Host(m)) => Ok(m.clone()),
            (Seq::Cuda(s), SeqMark::Cuda(m)) => s.mark_to_host(m),
            _ => Err(Error::Input("a mark of another device's state".into())),
        }
    }

    /// Tokens consumed (the next token's position).
    pub fn pos(&self) -> usize {
        match self {
            Seq::Host(s) => s.pos,
            Seq::Cuda(s) => s.pos(),
        }
    }

    /// Declares where the prompt being fed ends (see [`SeqState::prompt_end`]).
    pub fn set_prompt_end(&mut self, end: usize) {
        match self {
            Seq::Host(s) => s.prompt_end = end,
            Seq::Cuda(s) => s.set_prompt_end(end),
        }
    }

    /// Bytes of decode state held.
    pub fn bytes(&self) -> usize {
        match self {
            Seq::Host(s) => s.bytes(),
            Seq::Cuda(s) => s.bytes(),
        }
    }

    /// Advances the position after `n` tokens went through the blocks (what a forward call
    /// does; needed only by code that drives [`Device`] operations itself).
    pub fn advance(&mut self, n: usize) {
        match self {
            Seq::Host(s) => s.pos += n,
            Seq::Cuda(s) => s.advance(n),
        }
    }

    /// Remembers the current position so that tokens fed afterwards can be undone.
    pub fn mark(&self) -> Result<SeqMark> {
        Ok(match self {
            Seq::Host(s) => SeqMark::Host(s.mark()),
            Seq::Cuda(s) => SeqMark::Cuda(s.mark()?),
        })
    }

    /// Returns to a mark taken on this state.
    pub fn rewind(&mut self, mark: &SeqMark) -> Result<()> {
        match (self, mark) {
            (Seq::Host(s), SeqMark::Host(m)) => {
                s.rewind(m.clone());
                Ok(())
            }
            (Seq::Cuda(s), SeqMark::Cuda(m)) => s.rewind(m),
            _ => Err(Error::Input(
                "a mark taken on another device's state".into(),
            )),
        }
    }

    /// An independent copy (on the same device).
    pub fn try_clone(&self) -> Result<Seq> {
        Ok(match self {
            Seq::Host(s) => Seq::Host(s.clone()),
            Seq::Cuda(s) => Seq::Cuda(s.try_clone()?),
        })
    }
}

/// The final residual stream of a forward call (`T x hc_mult x hidden`), where its device keeps
/// it.
pub enum Hidden {
    /// Host rows.
    Host(Vec<f32>),
    /// Rows on a CUDA device.
    Cuda(cuda::Tensor),
}

/// Which head turns a stream into logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// The main model's.
    Main,
    /// MTP block `i`'s (its own mHC reduction and norm, the shared head).
    Mtp(usize),
}

/// One row's draw: its sampler, and a speculative draft to decide.
pub struct Draw<'a> {
    /// Parameters and random state; advanced by the draw.
    pub sampler: &'a mut Sampler,
    /// A draft token proposed for this position: accepted with the probability the row gives
    /// it, otherwise a token is drawn from the row with the draft removed.
    pub draft: Option<u32>,
}

/// The result of a [`Draw`].
#[derive(Clone, Debug, PartialEq)]
pub struct Drawn {
    /// The token chosen.
    pub token: u32,
    /// Whether the draft was accepted (false without a draft).
    pub accepted: bool,
    /// Its log-probability and the alternatives, when the sampler asks for them.
    pub logprob: Option<TokenLogprob>,
}

impl Draw<'_> {
    /// The draw from host logits.
    pub fn on_host(&mut self, logits: &[f32]) -> Drawn {
        match self.draft {
            None => {
                let (token, logprob) = self.sampler.sample(logits);
                Drawn {
                    token,
                    accepted: false,
                    logprob,
                }
            }
            Some(d) => {
                let (accepted, token, logprob) = self.sampler.verify(logits, d);
                Drawn {
                    token,
                    accepted,
                    logprob,
                }
            }
        }
    }
}

/// One sequence's input to a forward call.
pub struct SeqInput<'a> {
    /// Its state, advanced by the call.
    pub state: &'a mut Seq,
    /// The tokens to consume, from its position on.
    pub tokens: &'a [u32],
}

/// A loaded model on a device: what generation, chat, the server and scoring drive.
pub trait Backend: Send + Sync {
    /// The device, for reports.
    fn name(&self) -> String;
    /// The model's configuration.
    fn config(&self) -> &Config;
    /// Bytes of weights as held on the device.
    fn weight_bytes(&self) -> u64;
    /// What tells this model from others; saved decode states carry it.
    fn fingerprint(&self) -> crate::checkpoint::Fingerprint;
    /// A fresh state for one sequence through the main blocks.
    fn new_state(&self) -> Result<Seq>;
    /// A fresh state for MTP block `i`.
    fn new_mtp_state(&self, i: usize) -> Result<Seq>;
    /// A fresh state for main block `layer` alone (see [`Backend::block_forward`]).
    fn new_layer_state(&self, layer: usize) -> Result<Seq>;
    /// The state as a plain value (to save it or move it to another device).
    fn export_state(&self, seq: &Seq) -> Result<SeqState>;
    /// A plain state for the main blocks taken onto this device.
    fn import_state(&self, state: &SeqState) -> Result<Seq>;
    /// [`Backend::import_state`] consuming the plain state (a host device keeps it as is).
    fn adopt_state(&self, state: SeqState) -> Result<Seq>;
    /// Runs the main blocks over a batch of sequence chunks, advancing their states; returns
    /// the final stream of every token, in input order.
    fn forward(&self, inputs: &mut [SeqInput]) -> Result<Hidden>;
    /// MTP block `i` over a batch: each sequence feeds the main model's final stream at its
    /// positions (`hidden`, one row per token of the inputs) with the token that follows each
    /// position; returns the block's final stream (logits through [`Head::Mtp`]).
    fn mtp_forward(&self, i: usize, hidden: &Hidden, inputs: &mut [SeqInput]) -> Result<Hidden>;
    /// Main block `layer` alone on host stream rows (`T x hc_mult x hidden`), advancing a
    /// state from [`Backend::new_layer_state`]: how the golden checks feed each block the
    /// reference's input.
    fn block_forward(&self, layer: usize, x: &[f32], input: &mut SeqInput) -> Result<Vec<f32>>;
    /// Logits (`rows.len() x vocab`, on the host) of rows of a final stream.
    fn logits(&self, head: Head, hidden: &Hidden, rows: &[usize]) -> Result<Vec<f32>>;
    /// One draw for each of `rows` of a final stream, logits computed and sampled where the
    /// stream lives.
    fn sample(
        &self,
        head: Head,
        hidden: &Hidden,
        rows: &[usize],
        draws: &mut [Draw],
    ) -> Result<Vec<Drawn>>;
    /// Rows of final streams, concatenated.
    fn select(&self, parts: &[(&Hidden, Range<usize>)]) -> Result<Hidden>;
    /// Host stream rows (`T x hc_mult x hidden`) onto the device.
    fn upload(&self, x: &[f32]) -> Result<Hidden>;
    /// A final stream's rows on the host.
    fn download(&self, hidden: &Hidden) -> Result<Vec<f32>>;
    /// [`Backend::forward`] waiting for each block, with the seconds each took.
    fn forward_profiled(&self, inputs: &mut [SeqInput]) -> Result<(Hidden, Vec<f64>)>;
    /// Records, for each block, the distinct experts of the next forward calls' routing.
    fn trace_experts(&self, on: bool);
    /// The distinct experts each block routed to while tracing, in order.
    fn traced_experts(&self) -> Vec<usize>;
    /// See [`Device::bandwidth`].
    fn bandwidth(&self) -> Result<f64>;
    /// See [`Device::host_expert_secs`].
    fn host_expert_secs(&self) -> f64 {
        0.0
    }
}

/// Rows in a final stream.
pub fn hidden_rows(h: &Hidden, width: usize) -> usize {
    match h {
        Hidden::Host(v) => v.len() / width.max(1),
        Hidden::Cuda(t) => t.rows(),
    }
}

/// Where to run: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host's cores.
    Cpu,
    /// CUDA device N, some routed experts perhaps in host memory and computed by the CPU
    /// (`--experts-on`).
    Cuda {
        /// Which GPU.
        ordinal: usize,
        /// Which layers' routed experts stay on the host.
        experts: ExpertsOn,
    },
}

/// Where routed experts run beside a GPU (`--experts-on`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertsOn {
    /// The routed experts of the last N main layers stay in host memory, computed by the CPU
    /// (0: none, `usize::MAX`: all).
    Layers(usize),
    /// As few layers' as leave the rest of the weights room on the GPU.
    Fit,
}

impl DeviceSpec {
    /// The GPU when one is present, else the CPU.
    pub fn auto() -> Self {
        if cuda::device_count() > 0 {
            DeviceSpec::cuda(0)
        } else {
            DeviceSpec::Cpu
        }
    }

    /// GPU `ordinal`, routed experts left on the host only where the GPU cannot hold them.
    pub fn cuda(ordinal: usize) -> Self {
        DeviceSpec::Cuda {
            ordinal,
            experts: ExpertsOn::Fit,
        }
    }

    /// The same device with the routed experts placed by `experts` (a GPU only; on the CPU
    /// everything is in host memory already).
    pub fn with_experts(self, experts: ExpertsOn) -> Self {
        match self {
            DeviceSpec::Cuda { ordinal, .. } => DeviceSpec::Cuda { ordinal, experts },
            DeviceSpec::Cpu => DeviceSpec::Cpu,
        }
    }

    /// Parses where routed experts run beside a GPU (`--experts-on`): `auto` (on the GPU, but
    /// for as many layers' as it cannot hold), `gpu` (all on the GPU), `cpu` (all in host
    /// memory, computed by the CPU), or `N`, the last N main layers' on the CPU.
    pub fn parse_experts_on(s: &str) -> Result<ExpertsOn> {
        match s {
            "auto" => Ok(ExpertsOn::Fit),
            "gpu" => Ok(ExpertsOn::Layers(0)),
            "cpu" => Ok(ExpertsOn::Layers(usize::MAX)),
            _ => s.parse().map(ExpertsOn::Layers).map_err(|_| {
                Error::Input(format!(
                    "--experts-on {s:?}: expected auto, gpu, cpu or a number of layers"
                ))
            }),
        }
    }

    /// Parses `cpu`, `cuda`, `cuda:N` or `auto`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::auto()),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::cuda)
                .ok_or_else(|| {
                    Error::Input(format!("device {s:?}: expected cpu, cuda, cuda:N or auto"))
                }),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda { ordinal, .. } => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// What loading reports: bytes by kind on the device, and the time it took.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Bytes of weights by format (`FP8`, `FP4`, `BF16`, `F32`), scales included.
    pub by_format: Vec<(&'static str, u64)>,
    /// Bytes read from the checkpoint.
    pub checkpoint_bytes: u64,
    /// Seconds spent.
    pub secs: f64,
}

/// Loads the checkpoint in `dir` onto a device, calling `progress(blocks done, blocks)`.
pub fn open(
    spec: DeviceSpec,
    dir: &std::path::Path,
    progress: &dyn Fn(usize, usize),
) -> Result<(Box<dyn Backend>, LoadReport)> {
    let cfg = Config::from_file(&crate::checkpoint::Checkpoint::config_path(dir))?;
    let ck = crate::checkpoint::Checkpoint::open(dir)?;
    open_checkpoint(spec, cfg, ck, progress)
}

/// Takes a configuration and its tensors onto a device.
pub fn open_checkpoint(
    spec: DeviceSpec,
    cfg: Config,
    ck: crate::checkpoint::Checkpoint,
    progress: &dyn Fn(usize, usize),
) -> Result<(Box<dyn Backend>, LoadReport)> {
    fn load<D: Device>(
        dev: D,
        cfg: Config,
        ck: crate::checkpoint::Checkpoint,
        progress: &dyn Fn(usize, usize),
    ) -> Result<(Box<dyn Backend>, LoadReport)> {
        let t = std::time::Instant::now();
        let model = crate::model::Model::from_checkpoint(&dev, cfg, ck, progress)?;
        dev.sync()?;
        let r = Runner::new(dev, model).loaded_in(t.elapsed().as_secs_f64());
        let rep = r.report();
        Ok((Box::new(r), rep))
    }
    match spec {
        DeviceSpec::Cpu => load(cpu::Cpu::default(), cfg, ck, progress),
        DeviceSpec::Cuda { ordinal, experts } => {
            let dev = cuda::Cuda::new(ordinal)?;
            let layers = match experts {
                ExpertsOn::Layers(n) => n,
                ExpertsOn::Fit => dev.layers_to_leave(&cfg, &ck)?,
            };
            load(dev.with_host_experts(layers), cfg, ck, progress)
        }
    }
}
