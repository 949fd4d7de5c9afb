//! The DeepSeek V4 model: embedding, blocks on an M-copy residual stream, head, MTP blocks.
//!
//! `e = embed[token]`, `X = [e; M]`; each block runs attention then MoE inside hyper-connections;
//! `logits = head @ rmsnorm(hc_head(X))`. A batch is any set of sequences, each contributing a
//! chunk of consecutive tokens from its own position (prefill, chunked prefill or decode).

pub mod attention;
pub mod block;
pub mod compressor;
pub mod indexer;
pub mod mhc;
pub mod moe;
pub mod mtp;
pub mod rope;

use std::path::Path;

use crate::backend::cpu::{linear_plain, ops::rms_norm, Numerics};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::SeqState;
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
    /// Where the prompt this chunk belongs to ends (see [`SeqState::prompt_end`]).
    pub prompt_end: usize,
}

/// One sequence's input to a forward call.
pub struct SeqInput<'a> {
    /// Its state, advanced by the call.
    pub state: &'a mut SeqState,
    /// The tokens to consume, from `state.pos` on.
    pub tokens: &'a [u32],
}

/// The whole model, weights in checkpoint precision.
pub struct Model {
    /// The configuration.
    pub cfg: Config,
    embed: Matrix,
    /// Main blocks.
    pub blocks: Vec<Block>,
    norm: Vec<f32>,
    hc_head: HcHead,
    head: Matrix,
    /// MTP blocks.
    pub mtp: Vec<Mtp>,
    /// Bytes of tensor data in the checkpoint.
    pub checkpoint_bytes: u64,
}

impl Model {
    /// Loads `config.json` and the safetensors weights from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with_progress(dir, &|_, _| {})
    }

    /// [`Model::load`], calling `progress(blocks loaded, blocks)` as it goes.
    pub fn load_with_progress(dir: &Path, progress: &dyn Fn(usize, usize)) -> Result<Self> {
        let cfg = Config::from_file(&Checkpoint::config_path(dir))?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(cfg, ck, progress)
    }

    /// Builds the model from a configuration and its tensors; every tensor must be used.
    pub fn from_checkpoint(
        cfg: Config,
        mut ck: Checkpoint,
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
        let embed = Matrix::load(&mut ck, "embed", v, d)?;
        let head = Matrix::load(&mut ck, "head", v, d)?;
        let total = cfg.total_blocks();
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let b = Block::load(&mut ck, &format!("layers.{i}"), &cfg, i);
                progress(i + 1, total);
                b
            })
            .collect::<Result<Vec<_>>>()?;
        let mtp = (0..cfg.num_nextn_predict_layers)
            .map(|i| {
                let m = Mtp::load(&mut ck, i, &cfg, dims);
                progress(cfg.num_hidden_layers + i + 1, total);
                m
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Model {
            norm: ck.take_f32("norm.weight", &[d])?,
            hc_head: HcHead::load(&mut ck, "", dims)?,
            embed,
            head,
            blocks,
            mtp,
            checkpoint_bytes: ck.bytes,
            cfg,
        };
        ck.finish()?;
        Ok(model)
    }

    /// A fresh state for one sequence through the main blocks.
    pub fn new_state(&self) -> SeqState {
        SeqState::new(&self.cfg.compress_ratios[..self.cfg.num_hidden_layers])
    }

    /// A fresh state for MTP block `i`.
    pub fn new_mtp_state(&self, i: usize) -> SeqState {
        let j = self.cfg.num_hidden_layers + i;
        SeqState::new(&self.cfg.compress_ratios[j..j + 1])
    }

    /// Validates a batch and lays it out: concatenated tokens and one span per sequence.
    fn layout(&self, inputs: &[SeqInput], blocks: usize) -> Result<(Vec<u32>, Vec<Span>)> {
        let mut tokens = Vec::new();
        let mut spans = Vec::new();
        for (i, s) in inputs.iter().enumerate() {
            if s.state.blocks.len() != blocks {
                return Err(Error::Input(format!(
                    "sequence {i}: state has {} blocks, this model needs {blocks}",
                    s.state.blocks.len()
                )));
            }
            if let Some(&t) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(Error::Input(format!(
                    "sequence {i}: token id {t} is outside the vocabulary (size {})",
                    self.cfg.vocab_size
                )));
            }
            let end = s.state.pos + s.tokens.len();
            if end > self.cfg.max_position_embeddings {
                return Err(Error::Input(format!(
                    "sequence {i}: {end} tokens exceed the model's context of {}",
                    self.cfg.max_position_embeddings
                )));
            }
            spans.push(Span {
                start: tokens.len(),
                len: s.tokens.len(),
                pos: s.state.pos,
                prompt_end: s.state.prompt_end,
            });
            tokens.extend_from_slice(s.tokens);
        }
        Ok((tokens, spans))
    }

    /// The stream `[e; M]` for each token (`T x M x D`).
    pub fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let (d, m) = (self.cfg.hidden_size, self.cfg.hc_mult);
        let mut x = vec![0f32; tokens.len() * m * d];
        for (row, &t) in x.chunks_mut(m * d).zip(tokens) {
            self.embed.row_f32(t as usize, &mut row[..d]);
            for j in 1..m {
                row.copy_within(..d, j * d);
            }
        }
        x
    }

    /// Runs the main blocks over a batch; returns the final stream (`T x M x D`, sequences in
    /// input order) and advances every state.
    pub fn forward(&self, inputs: &mut [SeqInput], num: Numerics) -> Result<Vec<f32>> {
        let (tokens, spans) = self.layout(inputs, self.blocks.len())?;
        let mut x = self.embed(&tokens);
        if tokens.is_empty() {
            return Ok(x);
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let mut states: Vec<_> = inputs.iter_mut().map(|s| &mut s.state.blocks[i]).collect();
            block.forward(&mut x, &tokens, &spans, &mut states, num);
        }
        for s in inputs.iter_mut() {
            s.state.pos += s.tokens.len();
        }
        Ok(x)
    }

    /// Logits (`T x V`) of a `T x M x D` final stream.
    pub fn logits(&self, x: &[f32], num: Numerics) -> Vec<f32> {
        self.head_logits(&self.hc_head, &self.norm, x, num)
    }

    fn head_logits(&self, hc: &HcHead, norm: &[f32], x: &[f32], num: Numerics) -> Vec<f32> {
        let mut y = hc.forward(x, num);
        let d = self.cfg.hidden_size;
        y.chunks_mut(d)
            .for_each(|r| rms_norm(r, norm, self.cfg.rms_norm_eps as f32));
        linear_plain(&self.head, &y, num)
    }

    /// MTP block `i` over a batch: each sequence feeds the main model's final stream at its
    /// positions (`hidden`, `T x M x D`) with the token that follows each position (`tokens` of
    /// the inputs); returns logits for the token after that (`T x V`).
    pub fn mtp_forward(
        &self,
        i: usize,
        hidden: &[f32],
        inputs: &mut [SeqInput],
        num: Numerics,
    ) -> Result<Vec<f32>> {
        let mtp = self.mtp.get(i).ok_or_else(|| {
            Error::Input(format!(
                "the model has {} MTP blocks; block {i} requested",
                self.mtp.len()
            ))
        })?;
        let (tokens, spans) = self.layout(inputs, 1)?;
        let (m, d) = (self.cfg.hc_mult, self.cfg.hidden_size);
        if hidden.len() != tokens.len() * m * d {
            return Err(Error::Input(format!(
                "MTP input stream has {} values; {} tokens need {}",
                hidden.len(),
                tokens.len(),
                tokens.len() * m * d
            )));
        }
        let mut emb = vec![0f32; tokens.len() * d];
        for (row, &t) in emb.chunks_mut(d).zip(&tokens) {
            self.embed.row_f32(t as usize, row);
        }
        let mut x = mtp.input(&emb, hidden, num);
        let mut states: Vec<_> = inputs.iter_mut().map(|s| &mut s.state.blocks[0]).collect();
        mtp.block.forward(&mut x, &tokens, &spans, &mut states, num);
        for s in inputs.iter_mut() {
            s.state.pos += s.tokens.len();
        }
        Ok(self.head_logits(&mtp.hc_head, &mtp.norm, &x, num))
    }
}
