//! The DeepSeek V4 model: embedding, blocks on an M-copy residual stream, head, MTP blocks.
//!
//! `e = embed[token]`, `X = [e; M]`; each block runs attention then MoE inside hyper-connections;
//! `logits = head @ rmsnorm(hc_head(X))`. A batch is any set of sequences, each contributing a
//! chunk of consecutive tokens from its own position (prefill, chunked prefill or decode).
//!
//! Every component is generic over the [`Device`] that runs it: the files of this module hold
//! the weights and the order of operations, the devices the arithmetic.

pub mod attention;
pub mod block;
pub mod compressor;
pub mod indexer;
pub mod mhc;
pub mod moe;
pub mod mtp;
pub mod rope;

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::{Device, Head};
use crate::checkpoint::{Checkpoint, Fingerprint};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::Matrix;

use block::Block;
use mhc::{HcDims, HcHead};
use mtp::Mtp;

/// Where one sequence's chunk sits in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First row of the chunk in the batch.
    pub start: usize,
    /// Number of tokens.
    pub len: usize,
    /// Position of the first token in its sequence.
    pub pos: usize,
    /// Where the prompt this chunk belongs to ends (see [`crate::state::SeqState::prompt_end`]).
    pub prompt_end: usize,
}

/// Takes a checkpoint's tensors onto a device, counting the bytes of each format.
pub struct Loader<'a, D: Device> {
    /// The device.
    pub dev: &'a D,
    /// The checkpoint, emptied as tensors are taken.
    pub ck: Checkpoint,
    tally: BTreeMap<&'static str, u64>,
}

impl<'a, D: Device> Loader<'a, D> {
    /// A loader over `ck`.
    pub fn new(dev: &'a D, ck: Checkpoint) -> Self {
        Loader {
            dev,
            ck,
            tally: BTreeMap::new(),
        }
    }

    /// `{prefix}.weight` (and `.scale`) as a `rows x cols` matrix on the device.
    pub fn matrix(&mut self, prefix: &str, rows: usize, cols: usize) -> Result<D::Weight> {
        let m = Matrix::load(&mut self.ck, prefix, rows, cols)?;
        self.put(m)
    }

    /// A matrix kept in host memory (routed experts the device leaves there,
    /// [`Device::experts_on_host`]), counted as `host FP4` and so on.
    pub fn host_matrix(&mut self, prefix: &str, rows: usize, cols: usize) -> Result<D::Weight> {
        let m = Matrix::load(&mut self.ck, prefix, rows, cols)?;
        let key = match m.format() {
            "FP8" => "host FP8",
            "FP4" => "host FP4",
            "BF16" => "host BF16",
            _ => "host F32",
        };
        *self.tally.entry(key).or_default() += m.bytes() as u64;
        self.dev.host_weight(m)
    }

    /// A matrix on the device, counted.
    pub fn put(&mut self, m: Matrix) -> Result<D::Weight> {
        *self.tally.entry(m.format()).or_default() += m.bytes() as u64;
        self.dev.weight(m)
    }

    /// An F32/BF16 tensor of `shape` on the host.
    pub fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let v = self.ck.take_f32(name, shape)?;
        *self.tally.entry("F32").or_default() += 4 * v.len() as u64;
        Ok(v)
    }

    /// An F32/BF16 tensor of `shape` on the device.
    pub fn vector(&mut self, name: &str, shape: &[usize]) -> Result<D::Vector> {
        let v = self.host(name, shape)?;
        self.dev.vector(&v)
    }

    /// Bytes taken, by format.
    pub fn tally(&self) -> Vec<(&'static str, u64)> {
        self.tally.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// The whole model, weights in checkpoint precision on device `D`.
pub struct Model<D: Device> {
    /// The configuration.
    pub cfg: Config,
    /// Token embeddings, `V x D`.
    pub embed: D::Weight,
    /// Main blocks.
    pub blocks: Vec<Block<D>>,
    norm: D::Vector,
    hc_head: HcHead<D>,
    head: D::Weight,
    /// MTP blocks.
    pub mtp: Vec<Mtp<D>>,
    /// Bytes of tensor data in the checkpoint.
    pub checkpoint_bytes: u64,
    /// What tells this model from others (see [`Fingerprint`]).
    pub fingerprint: Fingerprint,
    /// Bytes of weights by format.
    pub by_format: Vec<(&'static str, u64)>,
}

impl<D: Device> Model<D> {
    /// Loads `config.json` and the safetensors weights from `dir` onto `dev`, calling
    /// `progress(blocks loaded, blocks)` as it goes.
    pub fn load(dev: &D, dir: &Path, progress: &dyn Fn(usize, usize)) -> Result<Self> {
        let cfg = Config::from_file(&Checkpoint::config_path(dir))?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(dev, cfg, ck, progress)
    }

    /// Builds the model from a configuration and its tensors; every tensor must be used.
    pub fn from_checkpoint(
        dev: &D,
        cfg: Config,
        ck: Checkpoint,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        let (v, d, m) = (cfg.vocab_size, cfg.hidden_size, cfg.hc_mult);
        let dims = HcDims {
            m,
            d,
            iters: cfg.hc_sinkhorn_iters,
            hc_eps: cfg.hc_eps as f32,
            norm_eps: cfg.rms_norm_eps as f32,
        };
        let fingerprint = ck.fingerprint(&cfg);
        let mut l = Loader::new(dev, ck);
        let embed = l.matrix("embed", v, d)?;
        let head = l.matrix("head", v, d)?;
        let total = cfg.total_blocks();
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            blocks.push(Block::load(&mut l, &format!("layers.{i}"), &cfg, i)?);
            progress(i + 1, total);
        }
        let mut mtp = Vec::with_capacity(cfg.num_nextn_predict_layers);
        for i in 0..cfg.num_nextn_predict_layers {
            mtp.push(Mtp::load(&mut l, i, &cfg, dims)?);
            progress(cfg.num_hidden_layers + i + 1, total);
        }
        let norm = l.vector("norm.weight", &[d])?;
        let hc_head = HcHead::load(&mut l, "", dims)?;
        let by_format = l.tally();
        let checkpoint_bytes = l.ck.bytes;
        l.ck.finish()?;
        Ok(Model {
            norm,
            hc_head,
            embed,
            head,
            blocks,
            mtp,
            checkpoint_bytes,
            fingerprint,
            by_format,
            cfg,
        })
    }

    /// Runs the main blocks over a batch; returns the final stream (`T x M x D`).
    pub fn forward(&self, dev: &D, b: &mut D::Batch<'_>) -> Result<D::Tensor> {
        self.forward_with(dev, b, &mut |_| Ok(()))
    }

    /// [`Model::forward`], calling `after(i)` when block `i` is queued (but for mixing its
    /// output into the stream, which the next block's first step does).
    pub fn forward_with(
        &self,
        dev: &D,
        b: &mut D::Batch<'_>,
        after: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<D::Tensor> {
        let mut x = dev.embed(&self.embed, b, self.cfg.hc_mult)?;
        let mut rest = None;
        for (i, block) in self.blocks.iter().enumerate() {
            rest = Some(block.forward(dev, b, i, &mut x, rest.take())?);
            after(i)?;
        }
        if let Some(r) = rest {
            r.apply(dev, &mut x)?;
        }
        Ok(x)
    }

    /// MTP block `i` over a batch whose tokens follow the positions of `hidden` (`T x M x D`,
    /// the main model's final stream); returns the block's final stream.
    pub fn mtp_forward(
        &self,
        dev: &D,
        i: usize,
        hidden: &D::Tensor,
        b: &mut D::Batch<'_>,
    ) -> Result<D::Tensor> {
        let mtp = self.mtp_block(i)?;
        let mut x = mtp.input(dev, &self.embed, hidden, b)?;
        mtp.block
            .forward(dev, b, 0, &mut x, None)?
            .apply(dev, &mut x)?;
        Ok(x)
    }

    fn mtp_block(&self, i: usize) -> Result<&Mtp<D>> {
        self.mtp.get(i).ok_or_else(|| {
            Error::Input(format!(
                "the model has {} MTP blocks; block {i} requested",
                self.mtp.len()
            ))
        })
    }

    /// Logits (`T x V`) of a `T x M x D` final stream through `head`.
    pub fn logits(&self, dev: &D, head: Head, x: &D::Tensor) -> Result<D::Tensor> {
        let (hc, norm) = match head {
            Head::Main => (&self.hc_head, &self.norm),
            Head::Mtp(i) => {
                let m = self.mtp_block(i)?;
                (&m.hc_head, &m.norm)
            }
        };
        let mut y = dev.hc_head(hc, x)?;
        dev.rms_norm(&mut y, norm, self.cfg.rms_norm_eps as f32)?;
        dev.linear_plain(&self.head, &y)
    }
}
