//! [`Runner`]: a model loaded on a device, driven through [`Backend`].

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{Backend, Device, Draw, Drawn, Head, Hidden, LoadReport, Seq, SeqInput};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{Model, Span};
use crate::state::SeqState;

/// A model on device `D`.
pub struct Runner<D: Device> {
    /// The device.
    pub dev: D,
    /// The weights.
    pub model: Model<D>,
    load_secs: f64,
    /// Whether experts are being traced (then passes are not replayed).
    tracing: AtomicBool,
}

impl<D: Device> Runner<D> {
    /// Loads the checkpoint in `dir` onto `dev`, calling `progress(blocks done, blocks)`.
    pub fn load(dev: D, dir: &Path, progress: &dyn Fn(usize, usize)) -> Result<Self> {
        let t = Instant::now();
        let model = Model::load(&dev, dir, progress)?;
        Ok(Runner {
            dev,
            model,
            load_secs: t.elapsed().as_secs_f64(),
            tracing: AtomicBool::new(false),
        })
    }

    /// A runner over a model already on `dev`.
    pub fn new(dev: D, model: Model<D>) -> Self {
        Runner {
            dev,
            model,
            load_secs: 0.0,
            tracing: AtomicBool::new(false),
        }
    }

    /// Records how long loading took.
    pub fn loaded_in(mut self, secs: f64) -> Self {
        self.load_secs = secs;
        self
    }

    /// What loading took.
    pub fn report(&self) -> LoadReport {
        LoadReport {
            by_format: self.model.by_format.clone(),
            checkpoint_bytes: self.model.checkpoint_bytes,
            secs: self.load_secs,
        }
    }

    fn width(&self) -> usize {
        self.model.cfg.hc_mult * self.model.cfg.hidden_size
    }

    /// Validates a batch and lays it out: concatenated tokens and one span per sequence.
    fn layout(&self, inputs: &[SeqInput]) -> Result<(Vec<u32>, Vec<Span>)> {
        let cfg = &self.model.cfg;
        let mut tokens = Vec::new();
        let mut spans = Vec::new();
        for (i, s) in inputs.iter().enumerate() {
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::Input(format!(
                    "sequence {i}: token id {t} is outside the vocabulary (size {})",
                    cfg.vocab_size
                )));
            }
            let pos = s.state.pos();
            let end = pos + s.tokens.len();
            if end > cfg.max_position_embeddings {
                return Err(Error::Input(format!(
                    "sequence {i}: {end} tokens exceed the model's context of {}",
                    cfg.max_position_embeddings
                )));
            }
            let prompt_end = match &*s.state {
                Seq::Host(h) => h.prompt_end,
                Seq::Cuda(c) => c.prompt_end(),
            };
            spans.push(Span {
                start: tokens.len(),
                len: s.tokens.len(),
                pos,
                prompt_end,
            });
            tokens.extend_from_slice(s.tokens);
        }
        Ok((tokens, spans))
    }

    /// Runs `f` over the batch of `inputs` (states of `blocks` blocks), then advances them.
    fn run<T>(
        &self,
        inputs: &mut [SeqInput],
        blocks: usize,
        f: impl FnOnce(&mut D::Batch<'_>) -> Result<T>,
    ) -> Result<T> {
        let (tokens, spans) = self.layout(inputs)?;
        if tokens.is_empty() {
            return Err(Error::Input("no tokens to feed".into()));
        }
        let lens: Vec<usize> = spans.iter().map(|s| s.len).collect();
        {
            let states = inputs
                .iter_mut()
                .map(|i| D::state_of(i.state))
                .collect::<Result<Vec<_>>>()?;
            let mut b = self.dev.batch(tokens, spans, states, blocks)?;
            let out = f(&mut b)?;
            drop(b);
            for (i, n) in inputs.iter_mut().zip(lens) {
                i.state.advance(n);
            }
            Ok(out)
        }
    }

    /// One row range per run of consecutive rows.
    fn ranges(rows: &[usize]) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for &r in rows {
            match out.last_mut() {
                Some(last) if last.end == r => last.end += 1,
                _ => out.push(r..r + 1),
            }
        }
        out
    }

    fn logits_tensor(&self, head: Head, hidden: &Hidden, rows: &[usize]) -> Result<D::Tensor> {
        let t = D::tensor_of(hidden)?;
        let n = super::hidden_rows(hidden, self.width());
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            return Err(Error::Input(format!(
                "row {r} of a stream of {n} rows requested"
            )));
        }
        let parts: Vec<_> = Self::ranges(rows).into_iter().map(|r| (t, r)).collect();
        let x = self.dev.gather(&parts, self.width())?;
        self.model.logits(&self.dev, head, &x)
    }

    /// `f` through [`Device::replay`], unless experts are being traced (counting them reads
    /// from the device in the middle of the pass).
    fn replayed<'a>(
        &self,
        b: &mut D::Batch<'a>,
        mut f: impl FnMut(&mut D::Batch<'a>) -> Result<D::Tensor>,
    ) -> Result<D::Tensor> {
        if self.tracing.load(Ordering::Relaxed) {
            return f(b);
        }
        self.dev.replay(b, self.width(), f)
    }

    fn check_mtp(&self, i: usize) -> Result<()> {
        if i >= self.model.mtp.len() {
            return Err(Error::Input(format!(
                "the model has {} MTP blocks; block {i} requested",
                self.model.mtp.len()
            )));
        }
        Ok(())
    }
}

impl<D: Device> Backend for Runner<D> {
    fn name(&self) -> String {
        self.dev.name()
    }

    fn config(&self) -> &Config {
        &self.model.cfg
    }

    fn weight_bytes(&self) -> u64 {
        // Bytes on the device: routed experts left in host memory are not.
        self.model
            .by_format
            .iter()
            .filter(|(k, _)| !k.starts_with("host "))
            .map(|x| x.1)
            .sum()
    }

    fn fingerprint(&self) -> crate::checkpoint::Fingerprint {
        self.model.fingerprint
    }

    fn new_state(&self) -> Result<Seq> {
        let cfg = &self.model.cfg;
        Ok(D::seq(self.dev.new_state(cfg, 0..cfg.num_hidden_layers)?))
    }

    fn new_mtp_state(&self, i: usize) -> Result<Seq> {
        self.check_mtp(i)?;
        let j = self.model.cfg.num_hidden_layers + i;
        Ok(D::seq(self.dev.new_state(&self.model.cfg, j..j + 1)?))
    }

    fn new_layer_state(&self, layer: usize) -> Result<Seq> {
        let cfg = &self.model.cfg;
        if layer >= cfg.num_hidden_layers {
            return Err(Error::Input(format!(
                "layer {layer} of a model with {} layers",
                cfg.num_hidden_layers
            )));
        }
        Ok(D::seq(self.dev.new_state(cfg, layer..layer + 1)?))
    }

    fn export_state(&self, seq: &Seq) -> Result<SeqState> {
        match seq {
            Seq::Host(s) => Ok(s.clone()),
            Seq::Cuda(c) => c.to_host(),
        }
    }

    fn import_state(&self, state: &SeqState) -> Result<Seq> {
        let cfg = &self.model.cfg;
        state.check(cfg)?;
        Ok(D::seq(self.dev.state_from_host(
            cfg,
            state,
            0..cfg.num_hidden_layers,
        )?))
    }

    fn adopt_state(&self, state: SeqState) -> Result<Seq> {
        let cfg = &self.model.cfg;
        state.check(cfg)?;
        Ok(D::seq(self.dev.state_from_host_owned(
            cfg,
            state,
            0..cfg.num_hidden_layers,
        )?))
    }

    fn forward(&self, inputs: &mut [SeqInput]) -> Result<Hidden> {
        if inputs.iter().all(|i| i.tokens.is_empty()) {
            return Ok(D::hidden(self.dev.upload(&[], self.width())?));
        }
        let l = self.model.cfg.num_hidden_layers;
        let x = self.dev.on_host(|| {
            self.run(inputs, l, |b| {
                self.replayed(b, |b| self.model.forward(&self.dev, b))
            })
        })?;
        Ok(D::hidden(x))
    }

    fn mtp_forward(&self, i: usize, hidden: &Hidden, inputs: &mut [SeqInput]) -> Result<Hidden> {
        self.check_mtp(i)?;
        let h = D::tensor_of(hidden)?;
        let t: usize = inputs.iter().map(|s| s.tokens.len()).sum();
        let rows = super::hidden_rows(hidden, self.width());
        if rows != t {
            return Err(Error::Input(format!(
                "MTP input stream has {rows} rows; {t} tokens need {t}"
            )));
        }
        let x = self.run(inputs, 1, |b| self.model.mtp_forward(&self.dev, i, h, b))?;
        Ok(D::hidden(x))
    }

    fn block_forward(&self, layer: usize, x: &[f32], input: &mut SeqInput) -> Result<Vec<f32>> {
        let block =
            self.model.blocks.get(layer).ok_or_else(|| {
                Error::Input(format!("layer {layer} of {}", self.model.blocks.len()))
            })?;
        if x.len() != input.tokens.len() * self.width() {
            return Err(Error::Input(format!(
                "{} stream values for {} tokens",
                x.len(),
                input.tokens.len()
            )));
        }
        let mut t = self.dev.upload(x, self.width())?;
        self.run(std::slice::from_mut(input), 1, |b| {
            block
                .forward(&self.dev, b, 0, &mut t, None)?
                .apply(&self.dev, &mut t)
        })?;
        self.dev.download(&t)
    }

    fn logits(&self, head: Head, hidden: &Hidden, rows: &[usize]) -> Result<Vec<f32>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let l = self
            .dev
            .on_host(|| self.logits_tensor(head, hidden, rows))?;
        self.dev.download(&l)
    }

    fn sample(
        &self,
        head: Head,
        hidden: &Hidden,
        rows: &[usize],
        draws: &mut [Draw],
    ) -> Result<Vec<Drawn>> {
        if rows.len() != draws.len() {
            return Err(Error::Input(format!(
                "{} rows for {} draws",
                rows.len(),
                draws.len()
            )));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.dev.on_host(|| {
            let l = self.logits_tensor(head, hidden, rows)?;
            self.dev.sample(&l, draws)
        })
    }

    fn select(&self, parts: &[(&Hidden, Range<usize>)]) -> Result<Hidden> {
        let parts = parts
            .iter()
            .map(|(h, r)| Ok((D::tensor_of(h)?, r.clone())))
            .collect::<Result<Vec<_>>>()?;
        Ok(D::hidden(self.dev.gather(&parts, self.width())?))
    }

    fn upload(&self, x: &[f32]) -> Result<Hidden> {
        Ok(D::hidden(self.dev.upload(x, self.width())?))
    }

    fn download(&self, hidden: &Hidden) -> Result<Vec<f32>> {
        self.dev.download(D::tensor_of(hidden)?)
    }

    fn forward_profiled(&self, inputs: &mut [SeqInput]) -> Result<(Hidden, Vec<f64>)> {
        let l = self.model.cfg.num_hidden_layers;
        let mut secs = Vec::with_capacity(l);
        self.dev.sync()?;
        let mut t = Instant::now();
        let x = self.run(inputs, l, |b| {
            self.model.forward_with(&self.dev, b, &mut |_| {
                self.dev.sync()?;
                secs.push(t.elapsed().as_secs_f64());
                t = Instant::now();
                Ok(())
            })
        })?;
        Ok((D::hidden(x), secs))
    }

    fn trace_experts(&self, on: bool) {
        self.tracing.store(on, Ordering::Relaxed);
        for b in &self.model.blocks {
            *b.ffn.trace.lock().expect("trace lock") = on.then_some(0);
        }
    }

    fn traced_experts(&self) -> Vec<usize> {
        self.model
            .blocks
            .iter()
            .map(|b| b.ffn.trace.lock().expect("trace lock").unwrap_or(0))
            .collect()
    }

    fn bandwidth(&self) -> Result<f64> {
        self.dev.bandwidth()
    }

    fn host_expert_secs(&self) -> f64 {
        self.dev.host_expert_secs()
    }
}
