//! The engine thread: continuous batching over one backend.
//!
//! Every step runs one forward call over a batch that holds one token for each decoding
//! sequence and, within a token budget, chunks of the prompts still being prefilled, so that
//! long prefills never stall running streams. Requests join between steps; a client that goes
//! away frees its sequence at the next step. Finished sequences leave their decode state in a
//! small cache, and a new prompt that extends a cached one resumes from it instead of prefilling
//! again (exact: chunked and one-shot prefill compute the same bits).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::backend::{Backend, Draw, Head, Seq, SeqInput, SeqMark};
use crate::generate::{Emitter, Finish, Sampler, SamplingParams, TokenLogprob};
use crate::server::disk::{Disk, DiskOptions, Hit, Snapshot, Write as DiskWrite};
use crate::server::metrics::Metrics;
use crate::state::SeqState;
use crate::tokenizer::Tokenizer;

/// A generation request.
pub struct Job {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Where the results go; dropping the receiver cancels the job.
    pub events: UnboundedSender<Event>,
}

/// The result of a finished job.
#[derive(Debug)]
pub struct Done {
    /// Why it ended.
    pub finish: Finish,
    /// The whole completion text (EOS excluded, cut before a stop string).
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens taken from a cached state instead of prefilled.
    pub cached_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Log-probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
}

/// What a job reports.
#[derive(Debug)]
pub enum Event {
    /// A piece of final text.
    Text(String),
    /// The end.
    Done(Done),
    /// The job failed.
    Failed(String),
    /// The device had no room for the job's decode state (HTTP 503: retry later).
    NoRoom(String),
}

/// The event that ends a job on error `e`.
fn failure(e: &crate::error::Error) -> Event {
    match e {
        crate::error::Error::OutOfMemory(m) => Event::NoRoom(m.clone()),
        e => Event::Failed(e.to_string()),
    }
}

/// Engine limits.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Sequences decoded together.
    pub max_running: usize,
    /// Tokens per forward call (decode tokens first, prefill chunks share the rest).
    pub max_batch_tokens: usize,
    /// Requests waiting beyond the running ones; more are refused.
    pub max_queue: usize,
    /// Finished sequences kept for prefix reuse.
    pub cache_entries: usize,
    /// A directory that keeps finished sequences' states across restarts.
    pub disk: Option<DiskOptions>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_running: 16,
            max_batch_tokens: 512,
            max_queue: 64,
            cache_entries: 8,
            disk: None,
        }
    }
}

/// The engine is full.
#[derive(Debug)]
pub struct Overloaded;

/// Handle to submit jobs.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    queued: Arc<AtomicI64>,
    /// Metrics shared with the HTTP layer.
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Overloaded> {
        match self.tx.try_send(job) {
            Ok(()) => {
                let q = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
                self.metrics.queue_depth.set(q);
                Ok(())
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Overloaded),
        }
    }
}

/// A finished sequence's state, kept for prefix reuse.
struct Cached {
    /// Tokens the state holds.
    tokens: Vec<u32>,
    /// Shared with a pending write to disk.
    state: Arc<Seq>,
    /// The state at the end of its prompt (prompts are what agents resend).
    prompt_mark: SeqMark,
    prompt_len: usize,
}

/// Sends a sequence's text to its client; false once the client is gone.
type Sink<'t> = Box<dyn FnMut(&str) -> bool + 't>;

struct Running<'t> {
    prompt: Vec<u32>,
    fed: usize,
    cached: usize,
    state: Seq,
    prompt_mark: Option<SeqMark>,
    pending: Option<u32>,
    sampler: Sampler,
    emitter: Emitter<'t, Sink<'t>>,
    events: UnboundedSender<Event>,
    started: Instant,
    last_token: Option<Instant>,
}

/// Starts the engine thread (and, with a disk tier, its reader and writer threads).
pub fn spawn(
    backend: Arc<dyn Backend>,
    tok: Arc<Tokenizer>,
    opts: EngineOptions,
    metrics: Arc<Metrics>,
) -> crate::error::Result<EngineHandle> {
    let disk = match &opts.disk {
        Some(d) => Some(Disk::open(d, backend.fingerprint(), metrics.clone())?),
        None => None,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(opts.max_queue);
    let queued = Arc::new(AtomicI64::new(0));
    let handle = EngineHandle {
        tx,
        queued: queued.clone(),
        metrics: metrics.clone(),
    };
    std::thread::Builder::new()
        .name("hadal-engine".into())
        .spawn(move || run(&backend, &tok, &opts, &rx, &queued, &metrics, disk))
        .expect("spawn the engine thread");
    Ok(handle)
}

/// The cached state whose tokens start `prompt` over the most tokens (leaving at least one to
/// feed): its index, the tokens it covers, and whether it is the whole entry (else its
/// prompt's end).
fn best(cache: &[Cached], prompt: &[u32]) -> Option<(usize, usize, bool)> {
    let mut best: Option<(usize, usize, bool)> = None;
    for (i, c) in cache.iter().enumerate() {
        for (len, whole) in [(c.tokens.len(), true), (c.prompt_len, false)] {
            if len > 0
                && len < prompt.len()
                && c.tokens[..len] == prompt[..len]
                && best.is_none_or(|b| len > b.1)
            {
                best = Some((i, len, whole));
            }
        }
    }
    best
}

/// A copy of a cached state at a [`best`] point; none (a miss) where the device has no room.
fn reuse(cache: &[Cached], (i, len, whole): (usize, usize, bool)) -> Option<(Seq, usize)> {
    let mut state = cache[i].state.try_clone().ok()?;
    if !whole {
        state.rewind(&cache[i].prompt_mark).ok()?;
    }
    Some((state, len))
}

/// A job whose cached state was read from disk (none: the read failed, start afresh).
struct Loaded {
    job: Job,
    state: Option<(SeqState, usize)>,
}

/// Starts the thread that reads states from disk for the engine.
fn spawn_reader(disk: Arc<Disk>) -> (Sender<(Job, Hit)>, Receiver<Loaded>) {
    let (tx, jobs) = std::sync::mpsc::channel::<(Job, Hit)>();
    let (done, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("hadal-state-reader".into())
        .spawn(move || {
            for (job, hit) in jobs {
                let state = match disk.load(&hit, &job.prompt) {
                    Ok(s) => Some((s, hit.len)),
                    Err(e) => {
                        eprintln!("hadal: warning: state cache: {e}");
                        None
                    }
                };
                if done.send(Loaded { job, state }).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the state reader thread");
    (tx, rx)
}

#[allow(clippy::too_many_arguments)]
fn admit<'t>(
    running: &mut Vec<Running<'t>>,
    backend: &dyn Backend,
    tok: &'t Tokenizer,
    eos: Option<u32>,
    m: &Metrics,
    job: Job,
    reused: Option<(Seq, usize)>,
) {
    let (mut state, cached) = match reused {
        Some(r) => r,
        None => match backend.new_state() {
            Ok(s) => (s, 0),
            Err(e) => {
                let _ = job.events.send(failure(&e));
                return;
            }
        },
    };
    state.set_prompt_end(job.prompt.len());
    m.prompt_tokens.inc_by(job.prompt.len() as u64);
    m.cached_prompt_tokens.inc_by(cached as u64);
    let events = job.events.clone();
    let sink = job.events;
    let on_text: Box<dyn FnMut(&str) -> bool> =
        Box::new(move |t: &str| sink.send(Event::Text(t.to_string())).is_ok());
    running.push(Running {
        fed: cached,
        cached,
        state,
        prompt_mark: None,
        pending: None,
        sampler: Sampler::new(job.params.clone()),
        emitter: Emitter::new(tok, job.params, eos, on_text),
        prompt: job.prompt,
        events,
        started: Instant::now(),
        last_token: None,
    });
}

fn run(
    backend: &Arc<dyn Backend>,
    tok: &Tokenizer,
    opts: &EngineOptions,
    rx: &Receiver<Job>,
    queued: &AtomicI64,
    m: &Metrics,
    disk: Option<Arc<Disk>>,
) {
    let eos = backend.config().eos_token_id;
    let backend = &**backend;
    let mut running: Vec<Running> = Vec::new();
    let mut cache: Vec<Cached> = Vec::new();
    let reader = disk.clone().map(spawn_reader);
    // Jobs whose states are being read: they count as running.
    let mut loading = 0usize;
    let adopt = |l: Loaded| {
        let state = l
            .state
            .and_then(|(s, n)| backend.adopt_state(s).ok().map(|seq| (seq, n)));
        (l.job, state)
    };
    loop {
        if let Some((_, done)) = &reader {
            // Idle but for reads: wait for one (a new request interrupts the wait).
            let wait = running.is_empty() && loading > 0;
            let first = if wait {
                done.recv_timeout(std::time::Duration::from_millis(2)).ok()
            } else {
                None
            };
            for l in first.into_iter().chain(done.try_iter()) {
                loading -= 1;
                let (job, state) = adopt(l);
                admit(&mut running, backend, tok, eos, m, job, state);
            }
        }
        // Admit new requests between steps; sleep only when idle.
        while running.len() + loading < opts.max_running {
            let job = if running.is_empty() && loading == 0 {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            m.queue_depth.set(queued.fetch_sub(1, Ordering::SeqCst) - 1);
            let found = best(&cache, &job.prompt);
            let in_memory = found.map_or(0, |b| b.1);
            if let (Some(d), Some((to_reader, _))) = (&disk, &reader) {
                if let Some(hit) = d.lookup(&job.prompt, in_memory) {
                    loading += 1;
                    if let Err(e) = to_reader.send((job, hit)) {
                        loading -= 1;
                        admit(&mut running, backend, tok, eos, m, e.0 .0, None);
                    }
                    continue;
                }
                if found.is_none() {
                    m.disk_misses.inc();
                }
            }
            let reused = found.and_then(|b| reuse(&cache, b));
            admit(&mut running, backend, tok, eos, m, job, reused);
        }
        if running.is_empty() {
            continue;
        }

        // A client that went away frees its sequence now.
        running.retain(|s| !s.events.is_closed());
        m.running.set(running.len() as i64);
        if running.is_empty() {
            continue;
        }

        // Decode tokens first, then prefill chunks within the remaining budget.
        let mut budget = opts
            .max_batch_tokens
            .saturating_sub(running.iter().filter(|s| s.pending.is_some()).count());
        let chunks: Vec<Vec<u32>> = running
            .iter()
            .map(|s| match s.pending {
                Some(t) => vec![t],
                None => {
                    let n = (s.prompt.len() - s.fed).min(budget.max(1));
                    budget = budget.saturating_sub(n);
                    s.prompt[s.fed..s.fed + n].to_vec()
                }
            })
            .collect();
        let mut inputs: Vec<SeqInput> = running
            .iter_mut()
            .zip(&chunks)
            .map(|(s, c)| SeqInput {
                state: &mut s.state,
                tokens: c,
            })
            .collect();
        let several = inputs.len() > 1;
        let hidden = match backend.forward(&mut inputs) {
            Ok(h) => h,
            // A sequence whose state found no room left every state as it was: the youngest
            // request gives way and the others go on.
            Err(e @ crate::error::Error::OutOfMemory(_)) if several => {
                drop(inputs);
                if let Some(s) = running.pop() {
                    let _ = s.events.send(failure(&e));
                }
                continue;
            }
            Err(e) => {
                for s in running.drain(..) {
                    let _ = s.events.send(failure(&e));
                }
                continue;
            }
        };
        drop(inputs);
        // Sequences that now sample: decoding ones, and those whose prompt is fully fed.
        let mut rows = Vec::new();
        let mut who = Vec::new();
        let mut offset = 0;
        for (i, (s, c)) in running.iter_mut().zip(&chunks).enumerate() {
            offset += c.len();
            if s.pending.take().is_none() {
                s.fed += c.len();
                if s.fed < s.prompt.len() {
                    continue;
                }
                // Without room for the mark the prompt is not cached; the request goes on.
                s.prompt_mark = s.state.mark().ok();
            }
            rows.push(offset - 1);
            who.push(i);
        }
        let mut draws: Vec<Draw> = running
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| who.contains(i))
            .map(|(_, s)| Draw {
                sampler: &mut s.sampler,
                draft: None,
            })
            .collect();
        let drawn = match backend.sample(Head::Main, &hidden, &rows, &mut draws) {
            Ok(d) => d,
            Err(e) => {
                for s in running.drain(..) {
                    let _ = s.events.send(Event::Failed(e.to_string()));
                }
                continue;
            }
        };
        drop(draws);
        let mut finished = Vec::new();
        for (d, &i) in drawn.into_iter().zip(&who) {
            let s = &mut running[i];
            let (t, lp) = (d.token, d.logprob);
            let now = Instant::now();
            match s.last_token {
                None => m.ttft.observe(now.duration_since(s.started).as_secs_f64()),
                Some(prev) => m.itl.observe(now.duration_since(prev).as_secs_f64()),
            }
            s.last_token = Some(now);
            m.generated_tokens.inc();
            match s.emitter.push(t, lp) {
                Ok(true) => s.pending = Some(t),
                Ok(false) => finished.push(i),
                Err(e) => {
                    let _ = s.events.send(Event::Failed(e.to_string()));
                    finished.push(i);
                }
            }
        }
        for &i in finished.iter().rev() {
            let s = running.swap_remove(i);
            let mut tokens = s.prompt.clone();
            let (prompt_tokens, cached) = (s.prompt.len(), s.cached);
            let c = s
                .emitter
                .done(s.started.elapsed().as_secs_f64(), 0.0, (0, 0));
            tokens.extend(&c.tokens);
            tokens.truncate(s.state.pos());
            let _ = s.events.send(Event::Done(Done {
                finish: c.finish,
                text: c.text,
                prompt_tokens,
                cached_tokens: cached,
                completion_tokens: c.tokens.len(),
                logprobs: c.logprobs,
            }));
            let Some(mark) = s.prompt_mark else { continue };
            let state = Arc::new(s.state);
            if let Some(d) = &disk {
                // A device's state is copied to the host here; a host state is written from
                // where it lies.
                let snapshot = match &*state {
                    Seq::Host(_) => Some(Snapshot::Shared(Arc::clone(&state))),
                    other => backend.export_state(other).ok().map(Snapshot::Owned),
                };
                if let Some(snapshot) = snapshot {
                    d.store(DiskWrite {
                        tokens: tokens.clone(),
                        prompt_len: prompt_tokens,
                        state: snapshot,
                        prompt: state.mark_to_host(&mark).ok(),
                    });
                }
            }
            if opts.cache_entries > 0 {
                if cache.len() >= opts.cache_entries {
                    cache.remove(0);
                }
                cache.push(Cached {
                    tokens,
                    state,
                    prompt_mark: mark,
                    prompt_len: prompt_tokens,
                });
            }
        }
        let bytes: usize = running.iter().map(|s| s.state.bytes()).sum::<usize>()
            + cache.iter().map(|c| c.state.bytes()).sum::<usize>();
        m.state_bytes.set(bytes as i64);
        m.running.set(running.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::backend::cpu::{Cpu, CpuBackend};
    use crate::backend::{Drawn, Hidden, Runner};
    use crate::config::Config;
    use crate::error::{Error, Result};
    use crate::model::Model;
    use crate::state::SeqState;

    /// The demo model on the CPU, with a device that holds one sequence's state at a time: a
    /// forward call over several sequences runs out of room, as a full GPU state pool does
    /// (before touching any state).
    struct OneAtATime(CpuBackend);

    impl Backend for OneAtATime {
        fn name(&self) -> String {
            self.0.name()
        }
        fn config(&self) -> &Config {
            self.0.config()
        }
        fn weight_bytes(&self) -> u64 {
            self.0.weight_bytes()
        }
        fn fingerprint(&self) -> crate::checkpoint::Fingerprint {
            self.0.fingerprint()
        }
        fn new_state(&self) -> Result<Seq> {
            self.0.new_state()
        }
        fn new_mtp_state(&self, i: usize) -> Result<Seq> {
            self.0.new_mtp_state(i)
        }
        fn new_layer_state(&self, layer: usize) -> Result<Seq> {
            self.0.new_layer_state(layer)
        }
        fn export_state(&self, seq: &Seq) -> Result<SeqState> {
            self.0.export_state(seq)
        }
        fn import_state(&self, state: &SeqState) -> Result<Seq> {
            self.0.import_state(state)
        }
        fn adopt_state(&self, state: SeqState) -> Result<Seq> {
            self.0.adopt_state(state)
        }
        fn forward(&self, inputs: &mut [SeqInput]) -> Result<Hidden> {
            if inputs.len() > 1 {
                return Err(Error::OutOfMemory("room for one sequence only".into()));
            }
            self.0.forward(inputs)
        }
        fn mtp_forward(&self, i: usize, h: &Hidden, inputs: &mut [SeqInput]) -> Result<Hidden> {
            self.0.mtp_forward(i, h, inputs)
        }
        fn block_forward(&self, l: usize, x: &[f32], input: &mut SeqInput) -> Result<Vec<f32>> {
            self.0.block_forward(l, x, input)
        }
        fn logits(&self, head: Head, hidden: &Hidden, rows: &[usize]) -> Result<Vec<f32>> {
            self.0.logits(head, hidden, rows)
        }
        fn sample(
            &self,
            head: Head,
            hidden: &Hidden,
            rows: &[usize],
            draws: &mut [Draw],
        ) -> Result<Vec<Drawn>> {
            self.0.sample(head, hidden, rows, draws)
        }
        fn select(&self, parts: &[(&Hidden, Range<usize>)]) -> Result<Hidden> {
            self.0.select(parts)
        }
        fn upload(&self, x: &[f32]) -> Result<Hidden> {
            self.0.upload(x)
        }
        fn download(&self, hidden: &Hidden) -> Result<Vec<f32>> {
            self.0.download(hidden)
        }
        fn forward_profiled(&self, inputs: &mut [SeqInput]) -> Result<(Hidden, Vec<f64>)> {
            self.0.forward_profiled(inputs)
        }
        fn trace_experts(&self, on: bool) {
            self.0.trace_experts(on)
        }
        fn traced_experts(&self) -> Vec<usize> {
            self.0.traced_experts()
        }
        fn bandwidth(&self) -> Result<f64> {
            self.0.bandwidth()
        }
    }

    #[test]
    fn a_request_without_room_gives_way_and_the_others_go_on() {
        let cfg = crate::demo::demo_config();
        let ck = crate::demo::random_checkpoint(&cfg, 3);
        let model = Model::from_checkpoint(&Cpu::default(), cfg, ck, &|_, _| {}).unwrap();
        let backend = Arc::new(OneAtATime(Runner::new(Cpu::default(), model)));
        let engine = spawn(
            backend,
            Arc::new(Tokenizer::bundled()),
            EngineOptions::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let params = SamplingParams {
            max_tokens: 40,
            ..Default::default()
        };
        let mut ends = Vec::new();
        for s in 0..2u32 {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let prompt = (0..30).map(|i| 100 + 7 * i + s).collect();
            engine
                .submit(Job {
                    prompt,
                    params: params.clone(),
                    events: tx,
                })
                .unwrap();
            ends.push(rx);
        }
        let last = |mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>| loop {
            match rx.blocking_recv().expect("the engine ended the job") {
                Event::Text(_) => continue,
                e => return e,
            }
        };
        let second = ends.pop().unwrap();
        let first = ends.pop().unwrap();
        assert!(
            matches!(last(second), Event::NoRoom(m) if m.contains("one sequence")),
            "the younger request is refused"
        );
        match last(first) {
            Event::Done(d) => assert!(d.completion_tokens > 0),
            e => panic!("the older request goes on: {e:?}"),
        }
    }
}
