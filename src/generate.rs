//! Sampling and the generation loop.
//!
//! A sampler turns logits into a token: greedy, or temperature then top-k, top-p and min-p
//! filtering, drawn from a seeded generator so that a seed reproduces a completion. The loop
//! prefills the prompt in chunks, decodes one token at a time, and streams text as it becomes
//! final: a suffix that could still grow into a stop string, or an incomplete UTF-8 character, is
//! held back.

use std::time::Instant;

use crate::backend::cpu::top_k;
use crate::backend::{Backend, Draw, Drawn, Head, Hidden, Seq, SeqInput};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// How tokens are chosen and when generation stops.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass (1 disables).
    pub top_p: f32,
    /// Keep the k most likely tokens (0 disables).
    pub top_k: usize,
    /// Drop tokens below `min_p` times the top probability (0 disables).
    pub min_p: f32,
    /// Seed of the random draws.
    pub seed: u64,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Texts that end the completion (not included in it).
    pub stop: Vec<String>,
    /// Alternatives to report with each token's log-probability (None: no logprobs).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if !(0.0..=100.0).contains(&self.temperature) {
            return bad(format!(
                "temperature {} must be within [0, 100]",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be within (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p {} must be within [0, 1]", self.min_p));
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return bad("logprobs: at most 20 alternatives".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// SplitMix64: small, fast, and the same sequence for a seed on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A chosen token with its log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its log-probability under the model.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of logits.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let mx = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = mx
        + logits
            .iter()
            .map(|&x| (x as f64 - mx).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// Picks tokens from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler seeded by `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    /// Its parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next uniform draw in `[0, 1)` of its generator (for a device that samples).
    pub fn uniform(&mut self) -> f64 {
        self.rng.uniform()
    }

    /// The candidate tokens and their probabilities after temperature, top-k, top-p and min-p
    /// (one token with probability 1 when greedy): most likely first under top-k, in
    /// vocabulary order otherwise.
    pub fn candidates(&self, logits: &[f32]) -> (Vec<usize>, Vec<f64>) {
        let p = &self.params;
        if p.temperature == 0.0 {
            return (top_k(logits, 1), vec![1.0]);
        }
        let t = p.temperature as f64;
        let weight = |l: f32, mx: f64| ((l as f64 - mx) / t).exp();
        if p.top_k > 0 {
            // The k most likely, most likely first, then the nucleus and min-p among them.
            let mut idx = top_k(logits, p.top_k);
            let mx = logits[idx[0]] as f64;
            let mut probs: Vec<f64> = idx.iter().map(|&i| weight(logits[i], mx)).collect();
            let sum: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= sum);
            let mut keep = probs.len();
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                if let Some(j) = probs.iter().position(|q| {
                    acc += q;
                    acc >= p.top_p as f64
                }) {
                    keep = j + 1;
                }
            }
            if p.min_p > 0.0 {
                let floor = probs[0] * p.min_p as f64;
                keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
            }
            idx.truncate(keep);
            probs.truncate(keep);
            return normalized(idx, probs);
        }
        // The whole vocabulary: weights in f32 (a vectorized exp), the nucleus found by a
        // radix selection rather than by sorting 129,280 logits every token; the candidates
        // stay in vocabulary order (a draw walks them in a fixed order: the same distribution).
        let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature;
        let w: Vec<f32> = logits.iter().map(|&l| exp_neg((l - mx) * inv_t)).collect();
        let mut idx = if p.top_p < 1.0 {
            nucleus(&w, p.top_p as f64)
        } else {
            (0..w.len()).collect()
        };
        if p.min_p > 0.0 {
            // The most likely token weighs 1.
            idx.retain(|&i| w[i] >= p.min_p);
        }
        if idx.is_empty() {
            // Only where the logits are not numbers: the argmax rather than nothing.
            return (top_k(logits, 1), vec![1.0]);
        }
        let probs = idx.iter().map(|&i| w[i] as f64).collect();
        normalized(idx, probs)
    }

    /// Draws from a candidate distribution.
    fn draw(&mut self, idx: &[usize], probs: &[f64]) -> usize {
        if idx.len() == 1 {
            return idx[0];
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.uniform() * total;
        for (&i, q) in idx.iter().zip(probs) {
            if u < *q {
                return i;
            }
            u -= q;
        }
        idx[idx.len() - 1]
    }

    fn logprob(&self, logits: &[f32], token: usize) -> Option<TokenLogprob> {
        self.params.logprobs.map(|n| {
            let ls = log_softmax(logits);
            let top = top_k(logits, n)
                .into_iter()
                .map(|i| (i as u32, ls[i]))
                .collect();
            TokenLogprob {
                token: token as u32,
                logprob: ls[token],
                top,
            }
        })
    }

    /// Chooses the next token.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprob>) {
        let (idx, probs) = self.candidates(logits);
        let token = self.draw(&idx, &probs);
        (token as u32, self.logprob(logits, token))
    }

    /// Speculative acceptance of a `draft` token drawn greedily by a drafter: accepted with
    /// the probability the target gives it, otherwise replaced by a draw from the target with
    /// the draft removed. The output follows the target distribution exactly.
    pub fn verify(&mut self, logits: &[f32], draft: u32) -> (bool, u32, Option<TokenLogprob>) {
        let (idx, probs) = self.candidates(logits);
        let pd = idx
            .iter()
            .position(|&i| i == draft as usize)
            .map_or(0.0, |j| probs[j]);
        let accept = pd >= 1.0 || (pd > 0.0 && self.rng.uniform() < pd);
        let token = if accept {
            draft as usize
        } else {
            let (i, q): (Vec<usize>, Vec<f64>) = idx
                .iter()
                .zip(&probs)
                .filter(|(&i, _)| i != draft as usize)
                .map(|(&i, &q)| (i, q))
                .unzip();
            self.draw(&i, &q)
        };
        (accept, token as u32, self.logprob(logits, token))
    }
}

/// Candidates with their weights scaled to sum to 1.
fn normalized(idx: Vec<usize>, mut probs: Vec<f64>) -> (Vec<usize>, Vec<f64>) {
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    (idx, probs)
}

/// `e^x` for `x <= 0` (0 below -87) within two f32 ulps, in a form the compiler vectorizes:
/// `2^n * e^r` with `r = x - n ln2` (Cody-Waite: `n * LN2_HI` is exact) and a degree-7 Taylor
/// polynomial for `e^r` on |r| <= ln2/2 (exact at 0).
fn exp_neg(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    // Round to nearest by adding 1.5 * 2^23: n is then the low bits of the sum (no libm call,
    // no saturating cast).
    const SHIFT: f32 = 12_582_912.0;
    let big = x * std::f32::consts::LOG2_E + SHIFT;
    let n = big - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let e = (big.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) as u32;
    f32::from_bits(e << 23) * p
}

/// Indices (in increasing order) of the fewest largest weights whose sum reaches the fraction
/// `top_p` of their total;
/// among equal weights at the boundary the lower indices are taken. Weights are non-negative,
/// so their bits order them: histograms of the mass under 12, 12 and 8 bits narrow down the
/// smallest weight taken and how many of its ties are, then one pass in index order
/// collects. Linear in the vocabulary, no sort.
fn nucleus(w: &[f32], top_p: f64) -> Vec<usize> {
    let mut need = f64::NAN;
    // The undecided weights: all at first, then those in the boundary bucket.
    let mut pool: Vec<u32> = Vec::new();
    let mut all = true;
    let mut cut = (0.0, usize::MAX);
    for shift in [20, 8, 0] {
        let mass = if all {
            histogram(w.iter().copied(), shift)
        } else {
            histogram(pool.iter().map(|&i| w[i as usize]), shift)
        };
        if all {
            need = top_p * mass.iter().sum::<f64>();
            if need.is_nan() || need <= 0.0 {
                return Vec::new();
            }
        }
        // The highest buckets that reach the target: the last one is undecided.
        let mut acc = 0.0;
        let Some(b) = (0..BUCKETS).rev().find(|&b| {
            acc += mass[b];
            acc >= need
        }) else {
            // Rounding left the target above the total: everything left is taken.
            let left = |i: &u32| w[*i as usize];
            cut.0 = match all {
                true => w.iter().copied().fold(f32::INFINITY, f32::min),
                false => pool.iter().map(left).fold(f32::INFINITY, f32::min),
            };
            break;
        };
        need -= acc - mass[b];
        let inside = |x: f32| bucket(x, shift) == b;
        pool = if all {
            gather(
                w.iter().enumerate().map(|(i, &x)| (i as u32, inside(x))),
                w.len(),
            )
        } else {
            gather(pool.iter().map(|&i| (i, inside(w[i as usize]))), pool.len())
        };
        all = false;
        if shift == 0 {
            // One value left: its ties, lowest indices first, until the target.
            let x = w[pool[0] as usize];
            let mut acc = 0.0;
            let ties = pool.iter().take_while(|_| {
                let more = acc < need;
                acc += x as f64;
                more
            });
            cut = (x, ties.count());
        }
    }
    let (min, mut ties) = cut;
    let taken = w.iter().enumerate().map(|(i, &x)| {
        let tie = x == min && ties > 0;
        ties -= tie as usize;
        (i, x > min || tie)
    });
    gather(taken, w.len())
}

/// Buckets of a level of [`nucleus`]: 12 bits of a weight.
const BUCKETS: usize = 1 << 12;

/// A weight's bucket under the bits from `shift`.
fn bucket(x: f32, shift: u32) -> usize {
    (x.to_bits() >> shift) as usize & (BUCKETS - 1)
}

/// The mass of the weights in each bucket.
fn histogram(w: impl Iterator<Item = f32>, shift: u32) -> Vec<f64> {
    // Four histograms taken in turn, so that runs of one bucket do not wait on each other.
    let mut mass = vec![[0f64; 4]; BUCKETS];
    for (j, x) in w.enumerate() {
        mass[bucket(x, shift)][j & 3] += x as f64;
    }
    mass.iter().map(|m| m.iter().sum()).collect()
}

/// The items marked to keep, in order; `len` bounds their number. Without a branch on the
/// mark: which tokens pass is data, a misprediction each otherwise.
fn gather<T: Copy + Default>(items: impl Iterator<Item = (T, bool)>, len: usize) -> Vec<T> {
    let mut out = vec![T::default(); len];
    let mut n = 0;
    for (t, keep) in items {
        out[n] = t;
        n += keep as usize;
    }
    out.truncate(n);
    out
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The model emitted an end-of-sequence token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// A finished completion.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Generated tokens (the EOS token included when that is how it ended).
    pub tokens: Vec<u32>,
    /// Generated text, cut before a stop string; special tokens included, EOS excluded.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Per-token log-probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Seconds spent decoding.
    pub decode_secs: f64,
    /// With speculative decoding: drafts proposed and drafts accepted.
    pub drafts: (usize, usize),
}

impl Completion {
    /// The completion as the model wrote it, for parsing: the text, then EOS if it ended so.
    pub fn raw_text(&self) -> String {
        raw_text(&self.text, self.finish)
    }
}

/// `text` followed by the EOS token when generation ended with it.
pub fn raw_text(text: &str, finish: Finish) -> String {
    if finish == Finish::Eos {
        format!("{text}{}", crate::chat::tokens::EOS)
    } else {
        text.to_string()
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of some stop string.
fn stop_holdback(s: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|st| {
            st.char_indices()
                .skip(1)
                .map(|(k, _)| k)
                .filter(|&k| s.ends_with(&st[..k]))
        })
        .max()
        .unwrap_or(0)
}

/// How the prompt is fed.
#[derive(Clone, Copy)]
pub struct Prefill<'a> {
    /// Tokens per forward call.
    pub chunk: usize,
    /// Called after each chunk with (tokens fed, tokens to feed).
    pub progress: Option<&'a (dyn Fn(usize, usize) + Sync)>,
}

impl Default for Prefill<'_> {
    fn default() -> Self {
        Prefill {
            chunk: 512,
            progress: None,
        }
    }
}

impl Prefill<'_> {
    fn report(&self, done: usize, total: usize) {
        if let Some(p) = self.progress {
            p(done, total);
        }
    }
}

/// Turns generated tokens into streamed text, watching for EOS, stop strings, the token limit
/// and cancellation (`on_text` returning false).
pub struct Emitter<'a, F: FnMut(&str) -> bool> {
    tok: &'a Tokenizer,
    params: SamplingParams,
    eos: Option<u32>,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    text: String,
    emitted: usize,
    on_text: F,
    finish: Option<Finish>,
}

impl<'a, F: FnMut(&str) -> bool> Emitter<'a, F> {
    /// An emitter for one completion; `eos` ends it.
    pub fn new(tok: &'a Tokenizer, params: SamplingParams, eos: Option<u32>, on_text: F) -> Self {
        Emitter {
            tok,
            params,
            eos,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            emitted: 0,
            on_text,
            finish: None,
        }
    }

    /// Tokens taken so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Takes one token; false when generation is over.
    pub fn push(&mut self, t: u32, lp: Option<TokenLogprob>) -> Result<bool> {
        self.tokens.push(t);
        self.logprobs.extend(lp);
        if Some(t) == self.eos {
            self.finish = Some(Finish::Eos);
            return Ok(false);
        }
        self.text = self.tok.decode(&self.tokens)?;
        let stops = &self.params.stop;
        if let Some(pos) = stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(pos);
            self.finish = Some(Finish::Stop);
            return Ok(false);
        }
        // An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives.
        let settled = self.text.trim_end_matches('\u{FFFD}').len();
        let upto = settled - stop_holdback(&self.text[..settled], stops);
        if upto > self.emitted {
            let go_on = (self.on_text)(&self.text[self.emitted..upto]);
            self.emitted = upto;
            if !go_on {
                self.finish = Some(Finish::Cancelled);
                return Ok(false);
            }
        }
        if self.tokens.len() >= self.params.max_tokens {
            self.finish = Some(Finish::Length);
            return Ok(false);
        }
        Ok(true)
    }

    /// Flushes what was held back and returns the completion.
    pub fn done(
        mut self,
        prefill_secs: f64,
        decode_secs: f64,
        drafts: (usize, usize),
    ) -> Completion {
        let finish = self.finish.unwrap_or(Finish::Length);
        if finish != Finish::Cancelled && self.text.len() > self.emitted {
            (self.on_text)(&self.text[self.emitted..]);
        }
        Completion {
            tokens: self.tokens,
            text: self.text,
            finish,
            logprobs: self.logprobs,
            prefill_secs,
            decode_secs,
            drafts,
        }
    }
}

/// Rejects invalid sampling parameters and an empty prompt.
fn check_request(params: &SamplingParams, prompt: &[u32]) -> Result<()> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::Input("empty prompt".into()));
    }
    Ok(())
}

/// One draw from row `row` of `hidden` through `head`.
fn draw(
    backend: &dyn Backend,
    head: Head,
    hidden: &Hidden,
    row: usize,
    sampler: &mut Sampler,
    draft: Option<u32>,
) -> Result<Drawn> {
    let mut d = backend.sample(head, hidden, &[row], &mut [Draw { sampler, draft }])?;
    d.pop()
        .ok_or_else(|| Error::Device("the backend returned no draw".into()))
}

/// Feeds `prompt` (after whatever `state` holds) and generates a completion, calling
/// `on_text` with each piece of final text; `on_text` returning false cancels. The state ends
/// holding every token but the last generated one.
pub fn generate(
    backend: &dyn Backend,
    tok: &Tokenizer,
    state: &mut Seq,
    prompt: &[u32],
    params: &SamplingParams,
    prefill: Prefill,
    on_text: impl FnMut(&str) -> bool,
) -> Result<Completion> {
    check_request(params, prompt)?;
    let mut em = Emitter::new(tok, params.clone(), backend.config().eos_token_id, on_text);
    let t0 = Instant::now();
    let step = prefill.chunk.max(1);
    state.set_prompt_end(state.pos() + prompt.len());
    let mut last = None;
    for (c, chunk) in prompt.chunks(step).enumerate() {
        let h = backend.forward(&mut [SeqInput {
            state,
            tokens: chunk,
        }])?;
        last = Some((h, chunk.len() - 1));
        prefill.report(c * step + chunk.len(), prompt.len());
    }
    let (h, row) = last.expect("the prompt is not empty");
    let mut sampler = Sampler::new(params.clone());
    // Only the prompt's last position needs the head.
    let mut d = draw(backend, Head::Main, &h, row, &mut sampler, None)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    while em.push(d.token, d.logprob.take())? {
        let h = backend.forward(&mut [SeqInput {
            state,
            tokens: &[d.token],
        }])?;
        d = draw(backend, Head::Main, &h, 0, &mut sampler, None)?;
    }
    Ok(em.done(prefill_secs, t1.elapsed().as_secs_f64(), (0, 0)))
}

/// [`generate`] with MTP speculative decoding: MTP block 0 drafts the token after next, and the
/// main model verifies it in the same forward pass that consumes the next token. Greedy output
/// is identical to [`generate`]'s; sampled output follows the same distribution. Afterwards
/// `state.pos()` tells how many of the prompt and completion tokens the state holds (all but
/// the last one or few).
pub fn generate_speculative(
    backend: &dyn Backend,
    tok: &Tokenizer,
    state: &mut Seq,
    prompt: &[u32],
    params: &SamplingParams,
    prefill: Prefill,
    on_text: impl FnMut(&str) -> bool,
) -> Result<Completion> {
    check_request(params, prompt)?;
    if backend.config().num_nextn_predict_layers == 0 {
        return Err(Error::Input(
            "speculative decoding needs an MTP block; this model has none".into(),
        ));
    }
    let mut em = Emitter::new(tok, params.clone(), backend.config().eos_token_id, on_text);
    let mut mtp = backend.new_mtp_state(0)?;
    let mut drafter = Sampler::new(SamplingParams::default());
    let t0 = Instant::now();
    let step = prefill.chunk.max(1);
    state.set_prompt_end(state.pos() + prompt.len());
    // The final stream at the last position fed, which pairs with the next token.
    let mut last: Option<Hidden> = None;
    for (c, chunk) in prompt.chunks(step).enumerate() {
        let h = backend.forward(&mut [SeqInput {
            state,
            tokens: chunk,
        }])?;
        let (start, n) = (c * step, chunk.len());
        prefill.report(start + n, prompt.len());
        // The MTP block follows the prompt as the main model reads it: the stream at t with
        // token t+1.
        let mut parts = Vec::new();
        if let Some(l) = &last {
            parts.push((l, 0..1));
        }
        if n > 1 {
            parts.push((&h, 0..n - 1));
        }
        let next = &prompt[start + usize::from(start == 0)..start + n];
        if !next.is_empty() {
            let pairs = backend.select(&parts)?;
            backend.mtp_forward(
                0,
                &pairs,
                &mut [SeqInput {
                    state: &mut mtp,
                    tokens: next,
                }],
            )?;
        }
        last = Some(backend.select(&[(&h, n - 1..n)])?);
    }
    let last = last.expect("the prompt is not empty");
    let mut sampler = Sampler::new(params.clone());
    let first = draw(backend, Head::Main, &last, 0, &mut sampler, None)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut drafts = (0, 0);
    if em.push(first.token, first.logprob)? {
        let mut pending = vec![first.token];
        let (mut queue_h, mut queue_t) = (last, vec![first.token]);
        loop {
            let mh = backend.mtp_forward(
                0,
                &queue_h,
                &mut [SeqInput {
                    state: &mut mtp,
                    tokens: &queue_t,
                }],
            )?;
            let draft = draw(
                backend,
                Head::Mtp(0),
                &mh,
                queue_t.len() - 1,
                &mut drafter,
                None,
            )?
            .token;
            let mark = state.mark()?;
            let mut chunk = pending.clone();
            chunk.push(draft);
            let h = backend.forward(&mut [SeqInput {
                state,
                tokens: &chunk,
            }])?;
            let k = pending.len();
            let v = draw(backend, Head::Main, &h, k - 1, &mut sampler, Some(draft))?;
            drafts.0 += 1;
            if !v.accepted {
                state.rewind(&mark)?;
            }
            if !em.push(v.token, v.logprob)? {
                break;
            }
            if v.accepted {
                drafts.1 += 1;
                let z = draw(backend, Head::Main, &h, k, &mut sampler, None)?;
                if !em.push(z.token, z.logprob)? {
                    break;
                }
                queue_h = backend.select(&[(&h, k - 1..k + 1)])?;
                queue_t = vec![draft, z.token];
                pending = vec![z.token];
            } else {
                queue_h = backend.select(&[(&h, k - 1..k)])?;
                queue_t = vec![v.token];
                pending.push(v.token);
            }
        }
    }
    Ok(em.done(prefill_secs, t1.elapsed().as_secs_f64(), drafts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 7919) % 50) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        let l = logits();
        let best = (0..50).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
        assert_eq!(s.sample(&l).0 as usize, best);
    }

    #[test]
    fn a_seed_reproduces_the_draws() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let l = logits();
        let draws = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&l).0).collect::<Vec<u32>>()
        };
        assert_eq!(draws(p.clone()), draws(p.clone()));
        assert_ne!(draws(p.clone()), draws(SamplingParams { seed: 7, ..p }));
    }

    #[test]
    fn filters_restrict_the_candidates() {
        let l = logits();
        let mut order: Vec<usize> = (0..50).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        for seed in 0..50 {
            let mut s = Sampler::new(SamplingParams {
                temperature: 2.0,
                top_k: 3,
                seed,
                ..Default::default()
            });
            assert!(order[..3].contains(&(s.sample(&l).0 as usize)));
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 1e-6,
                seed,
                ..Default::default()
            });
            assert_eq!(s.sample(&l).0 as usize, order[0]);
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                min_p: 0.99,
                seed,
                ..Default::default()
            });
            assert_eq!(s.sample(&l).0 as usize, order[0]);
        }
    }

    #[test]
    fn the_exponential_is_close() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let want = (x.max(-87.0) as f64).exp();
            let got = exp_neg(x) as f64;
            assert!((got - want).abs() <= 2.4e-7 * want, "{x}: {got} {want}");
        }
        assert_eq!(exp_neg(0.0), 1.0);
    }

    proptest::proptest! {
        /// The selection takes the same tokens as sorting by weight (ties by index) and taking
        /// the shortest prefix that reaches the target.
        #[test]
        fn the_nucleus_is_the_sorted_prefix(
            w in proptest::collection::vec(0u8..8, 1..300),
            k in 0u32..=64,
        ) {
            // Quarters and 64ths: every sum is exact, in any order.
            let w: Vec<f32> = w.iter().map(|&x| x as f32 / 4.0).collect();
            let frac = k as f64 / 64.0;
            let target = frac * w.iter().map(|&x| x as f64).sum::<f64>();
            let mut order: Vec<usize> = (0..w.len()).collect();
            order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
            let mut acc = 0.0;
            let mut want: Vec<usize> = order
                .into_iter()
                .take_while(|&i| {
                    let more = acc < target;
                    acc += w[i] as f64;
                    more
                })
                .collect();
            want.sort_unstable();
            proptest::prop_assert_eq!(nucleus(&w, frac), want);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let l = [0.0f32, (3.0f32).ln()];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 1,
            ..Default::default()
        });
        let ones = (0..4000).filter(|_| s.sample(&l).0 == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn logprobs_report_the_choice_and_alternatives() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: Some(2),
            ..Default::default()
        });
        let (t, lp) = s.sample(&[1.0, 3.0, 2.0]);
        let lp = lp.unwrap();
        assert_eq!((t, lp.token), (1, 1));
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let z = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((lp.logprob as f64 - (3.0 - z)).abs() < 1e-6);
    }

    #[test]
    fn speculative_acceptance_keeps_the_target_distribution() {
        let l = [0.0f32, (3.0f32).ln(), (2.0f32).ln()];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        });
        let mut counts = [0usize; 3];
        for _ in 0..6000 {
            counts[s.verify(&l, 2).1 as usize] += 1;
        }
        for (c, p) in counts.iter().zip([1.0 / 6.0, 0.5, 1.0 / 3.0]) {
            assert!((*c as f64 / 6000.0 - p).abs() < 0.02, "{counts:?}");
        }
        let mut g = Sampler::new(SamplingParams::default());
        assert_eq!(g.verify(&l, 1), (true, 1, None));
        assert_eq!(g.verify(&l, 2), (false, 1, None));
    }

    #[test]
    fn stop_prefixes_are_held_back() {
        let stops = vec!["STOP".to_string(), "\n\n".to_string()];
        assert_eq!(stop_holdback("abc ST", &stops), 2);
        assert_eq!(stop_holdback("abc\n", &stops), 1);
        assert_eq!(stop_holdback("abc", &stops), 0);
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("top_p"));
        let e = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("temperature"));
    }
}
