//! `hadal bench`: prefill and decode throughput of a model on a device, the bytes of weights and
//! state each decode step reads, and how close that comes to the memory bandwidth measured in
//! the same run.
//!
//! Decode is measured at chosen contexts without prefilling them: each sequence starts from a
//! synthetic decode state of that length (valid rows, as many as the context holds), since what
//! a step costs depends on how many entries it reads, not on their values. Weights read per step
//! are counted as a decode step reads them: every dense weight, the head, and each block's
//! routed experts that the batch's tokens route to (their union, measured).

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, Draw, Head, Seq, SeqInput};
use crate::config::{Config, LayerKind};
use crate::error::{Error, Result};
use crate::generate::{Rng, Sampler, SamplingParams};
use crate::inspect::{Format, Plan};
use crate::state::{BlockState, CompressorState, RowCodec, Rows, SeqState};

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Contexts of the decode measurements.
    pub contexts: Vec<usize>,
    /// Sequences decoded together.
    pub batches: Vec<usize>,
    /// Timed decode steps per measurement (after two untimed ones).
    pub decode_tokens: usize,
    /// Tokens of the prefill measurement (0: none).
    pub prefill_tokens: usize,
    /// Tokens per prefill call.
    pub prefill_chunk: usize,
    /// Seed of the synthetic states and tokens.
    pub seed: u64,
}

/// One prefill measurement.
#[derive(Clone, Debug, Serialize)]
pub struct PrefillResult {
    /// Prompt tokens.
    pub tokens: usize,
    /// Seconds.
    pub secs: f64,
    /// Prompt tokens per second.
    pub tokens_per_s: f64,
    /// Milliseconds per layer, by layer kind (the mean over layers of that kind).
    pub ms_per_layer: BTreeMap<String, f64>,
    /// Prompt tokens per second with every layer of the full model, from the per-layer times.
    pub projected_tokens_per_s: f64,
}

/// One decode measurement.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeResult {
    /// Context of every sequence.
    pub context: usize,
    /// Sequences.
    pub batch: usize,
    /// Timed steps.
    pub steps: usize,
    /// Milliseconds a step (one token for every sequence, sampled).
    pub step_ms: f64,
    /// Tokens per second, all sequences together.
    pub tokens_per_s: f64,
    /// Distinct routed experts a block reads, on average.
    pub experts_per_layer: f64,
    /// Bytes of weights a step reads.
    pub weight_bytes: u64,
    /// Bytes of decode state a step reads.
    pub state_bytes: u64,
    /// Weight bytes read per second.
    pub weight_gb_s: f64,
    /// `weight_gb_s` over the measured bandwidth.
    pub bandwidth_ratio: f64,
    /// Milliseconds per layer by kind (mean over layers of that kind).
    pub ms_per_layer: BTreeMap<String, f64>,
    /// Milliseconds of a step spent on routed experts kept in host memory beside the device
    /// (copies included; `--experts-on`), 0 where there are none.
    pub host_experts_ms: f64,
    /// The rest of a step (embedding, head, sampling).
    pub other_ms: f64,
    /// A step's milliseconds with every layer of the full model.
    pub projected_step_ms: f64,
    /// Tokens per second with every layer of the full model.
    pub projected_tokens_per_s: f64,
}

/// A decode measurement that could not run (no room for its states, say).
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// Context.
    pub context: usize,
    /// Sequences.
    pub batch: usize,
    /// Why.
    pub reason: String,
}

/// Everything measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The device.
    pub device: String,
    /// Bandwidth measured in this run, GB/s.
    pub bandwidth_gb_s: f64,
    /// Main layers run.
    pub layers: usize,
    /// Main layers of the full model, for the projections.
    pub model_layers: usize,
    /// Bytes of weights on the device.
    pub weight_bytes: u64,
    /// The prefill measurement.
    pub prefill: Option<PrefillResult>,
    /// The decode measurements.
    pub decode: Vec<DecodeResult>,
    /// Those that could not run.
    pub skipped: Vec<Skipped>,
}

/// Random rows of a codec, encoded (so they decode to what the model would have written).
fn template_rows(codec: RowCodec, n: usize, rng: &mut Rng) -> Vec<u8> {
    let (d, b) = (codec.dim(), codec.bytes());
    let mut out = vec![0u8; n * b];
    for row in out.chunks_mut(b) {
        let mut v: Vec<f32> = (0..d).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect();
        codec.encode(&mut v, row);
    }
    out
}

/// `n` rows cycling through `templates` (of `b` bytes each).
fn repeat_rows(templates: &[u8], b: usize, n: usize) -> Rows {
    let k = templates.len() / b;
    let mut data = Vec::with_capacity(n * b);
    for i in 0..n {
        let t = i % k;
        data.extend_from_slice(&templates[t * b..(t + 1) * b]);
    }
    Rows { data, len: n }
}

/// A decode state of `cfg`'s main blocks holding `ctx` tokens: full window, every compressed
/// entry, pending rows; values random but valid.
pub fn synthetic_state(cfg: &Config, ctx: usize, seed: u64) -> SeqState {
    let mut rng = Rng::new(seed);
    let attn = RowCodec::Attention {
        dim: cfg.head_dim,
        rope: cfg.qk_rope_head_dim,
    };
    let index = RowCodec::Index {
        dim: cfg.index_head_dim,
    };
    let ta = template_rows(attn, 16, &mut rng);
    let ti = template_rows(index, 16, &mut rng);
    let mut f = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() as f32 - 0.5).collect() };
    let blocks = (0..cfg.num_hidden_layers)
        .map(|i| {
            let c = cfg.ratio(i);
            let mut comp = |codec: RowCodec, t: &[u8]| {
                let d = codec.dim();
                let overlap = c == 4;
                let width = if overlap { 2 * d } else { d };
                let pending = ctx % c;
                let (prev_kv, prev_score) = if overlap && ctx >= c {
                    (f(c * d), f(c * d))
                } else {
                    (Vec::new(), Vec::new())
                };
                CompressorState {
                    kv: f(pending * width),
                    score: f(pending * width),
                    prev_kv,
                    prev_score,
                    entries: repeat_rows(t, codec.bytes(), ctx / c),
                }
            };
            BlockState {
                window: if ctx > 0 {
                    repeat_rows(&ta, attn.bytes(), cfg.sliding_window).data
                } else {
                    Vec::new()
                },
                compressor: (c > 0).then(|| comp(attn, &ta)),
                indexer: (c == 4).then(|| comp(index, &ti)),
            }
        })
        .collect();
    SeqState {
        pos: ctx,
        prompt_end: 0,
        blocks,
    }
}

/// Bytes of decode state one decode step of one sequence at `ctx` reads.
pub fn state_bytes_per_step(cfg: &Config, ctx: usize) -> u64 {
    let attn = RowCodec::Attention {
        dim: cfg.head_dim,
        rope: cfg.qk_rope_head_dim,
    }
    .bytes() as u64;
    let index = RowCodec::Index {
        dim: cfg.index_head_dim,
    }
    .bytes() as u64;
    let (w, ctx64) = (cfg.sliding_window.min(ctx + 1) as u64, ctx as u64);
    (0..cfg.num_hidden_layers)
        .map(|i| {
            w * attn
                + match cfg.kind(i) {
                    LayerKind::Window => 0,
                    LayerKind::Csa => {
                        (ctx64 / 4).min(cfg.index_topk as u64) * attn + ctx64 / 4 * index
                    }
                    LayerKind::Hca => ctx64 / cfg.ratio(i) as u64 * attn,
                }
        })
        .sum()
}

/// Bytes of weights one decode step of `batch` sequences reads, given the distinct experts
/// each block routed to.
pub fn weight_bytes_per_step(cfg: &Config, batch: usize, experts: &[usize]) -> u64 {
    let plan = Plan::new(cfg, 1);
    let dense: u64 = plan
        .weights
        .iter()
        .filter(|(part, _)| !matches!(part.as_str(), "embedding" | "routed experts"))
        .flat_map(|(_, f)| f.values())
        .map(|t| t.bytes)
        .sum();
    let fmt = if cfg.fp4_experts() {
        Format::Fp4
    } else if cfg.fp8() {
        Format::Fp8
    } else {
        Format::Bf16
    };
    let expert = 3 * fmt.bytes(cfg.moe_intermediate_size, cfg.hidden_size);
    let routed: u64 = experts.iter().map(|&n| n as u64 * expert).sum();
    dense + routed + (batch * cfg.hidden_size * 2) as u64
}

/// Per-kind mean milliseconds of per-block seconds, and the projection of a step to `full`'s
/// main layers (`rest` seconds outside the blocks).
fn per_kind(cfg: &Config, full: &Config, secs: &[f64], rest: f64) -> (BTreeMap<String, f64>, f64) {
    let mut sum: BTreeMap<LayerKind, (f64, usize)> = BTreeMap::new();
    for (i, s) in secs.iter().enumerate() {
        let e = sum.entry(cfg.kind(i)).or_default();
        e.0 += s;
        e.1 += 1;
    }
    let mean = |k: LayerKind| sum.get(&k).map(|(s, n)| s / *n as f64);
    let mut projected = rest;
    for i in 0..full.num_hidden_layers {
        // A kind absent from the run counts as the mean of those present.
        let all = secs.iter().sum::<f64>() / secs.len().max(1) as f64;
        projected += mean(full.kind(i)).unwrap_or(all);
    }
    let table = sum
        .iter()
        .map(|(k, (s, n))| (k.name().to_string(), 1e3 * s / *n as f64))
        .collect();
    (table, projected)
}

fn greedy() -> Sampler {
    Sampler::new(SamplingParams::default())
}

/// One decode step for every sequence: feeds `tokens`, returns the next ones.
fn step(backend: &dyn Backend, states: &mut [Seq], tokens: &[u32]) -> Result<Vec<u32>> {
    let toks: Vec<[u32; 1]> = tokens.iter().map(|&t| [t]).collect();
    let mut inputs: Vec<SeqInput> = states
        .iter_mut()
        .zip(&toks)
        .map(|(s, t)| SeqInput {
            state: s,
            tokens: t,
        })
        .collect();
    let h = backend.forward(&mut inputs)?;
    sample(backend, &h, tokens.len())
}

fn sample(backend: &dyn Backend, h: &crate::backend::Hidden, n: usize) -> Result<Vec<u32>> {
    let mut samplers: Vec<Sampler> = (0..n).map(|_| greedy()).collect();
    let mut draws: Vec<Draw> = samplers
        .iter_mut()
        .map(|s| Draw {
            sampler: s,
            draft: None,
        })
        .collect();
    let rows: Vec<usize> = (0..n).collect();
    Ok(backend
        .sample(Head::Main, h, &rows, &mut draws)?
        .into_iter()
        .map(|d| d.token)
        .collect())
}

/// Runs the measurements on `backend` (whose configuration is `full`'s first layers);
/// `progress(done, total)` counts steps.
pub fn run(
    backend: &dyn Backend,
    full: &Config,
    opts: &Options,
    progress: &dyn Fn(u64, u64),
) -> Result<Report> {
    let cfg = backend.config().clone();
    let v = cfg.vocab_size as u64;
    let mut rng = Rng::new(opts.seed);
    let mut token = move || (rng.uniform() * v as f64) as u32 % v as u32;
    let bandwidth = backend.bandwidth()?;
    let total = (opts.contexts.len() * opts.batches.len() * (opts.decode_tokens + 4)) as u64
        + opts.prefill_tokens.div_ceil(opts.prefill_chunk.max(1)) as u64;
    let mut done = 0u64;
    let mut tick = |n: u64| {
        done += n;
        progress(done, total);
    };

    let prefill = if opts.prefill_tokens > 0 {
        let mut s = backend.new_state()?;
        let prompt: Vec<u32> = (0..opts.prefill_tokens).map(|_| token()).collect();
        s.set_prompt_end(prompt.len());
        let mut per_block = vec![0f64; cfg.num_hidden_layers];
        let t = Instant::now();
        let mut last = None;
        for c in prompt.chunks(opts.prefill_chunk.max(1)) {
            let (h, secs) = backend.forward_profiled(&mut [SeqInput {
                state: &mut s,
                tokens: c,
            }])?;
            per_block.iter_mut().zip(&secs).for_each(|(a, b)| *a += b);
            last = Some((h, c.len()));
            tick(1);
        }
        let (h, n) = last.expect("a prompt");
        let mut sampler = greedy();
        backend.sample(
            Head::Main,
            &h,
            &[n - 1],
            &mut [Draw {
                sampler: &mut sampler,
                draft: None,
            }],
        )?;
        let secs = t.elapsed().as_secs_f64();
        let rest = secs - per_block.iter().sum::<f64>();
        let (table, projected) = per_kind(&cfg, full, &per_block, rest.max(0.0));
        Some(PrefillResult {
            tokens: prompt.len(),
            secs,
            tokens_per_s: prompt.len() as f64 / secs,
            ms_per_layer: table,
            projected_tokens_per_s: prompt.len() as f64 / projected,
        })
    } else {
        None
    };

    let mut decode = Vec::new();
    let mut skipped = Vec::new();
    for &asked in &opts.contexts {
        // The steps must fit in the model's context: the longest starts a little short of it.
        let ctx = asked.min(
            cfg.max_position_embeddings
                .saturating_sub(opts.decode_tokens + 8),
        );
        let host = synthetic_state(&cfg, ctx, opts.seed ^ ctx as u64);
        for &batch in &opts.batches {
            let states: Result<Vec<Seq>> =
                (0..batch).map(|_| backend.import_state(&host)).collect();
            let mut states = match states {
                Ok(s) => s,
                Err(e @ (Error::OutOfMemory(_) | Error::Input(_))) => {
                    skipped.push(Skipped {
                        context: ctx,
                        batch,
                        reason: e.to_string(),
                    });
                    tick((opts.decode_tokens + 4) as u64);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut toks: Vec<u32> = (0..batch).map(|_| token()).collect();
            for _ in 0..2 {
                toks = step(backend, &mut states, &toks)?;
                tick(1);
            }
            let (t, host) = (Instant::now(), backend.host_expert_secs());
            for _ in 0..opts.decode_tokens {
                toks = step(backend, &mut states, &toks)?;
                tick(1);
            }
            let steps = opts.decode_tokens.max(1) as f64;
            let step_secs = t.elapsed().as_secs_f64() / steps;
            let host_secs = (backend.host_expert_secs() - host) / steps;
            // One step waiting for each block, for the time by layer kind ...
            let t = Instant::now();
            let inputs_toks: Vec<[u32; 1]> = toks.iter().map(|&x| [x]).collect();
            let mut inputs: Vec<SeqInput> = states
                .iter_mut()
                .zip(&inputs_toks)
                .map(|(s, x)| SeqInput {
                    state: s,
                    tokens: x,
                })
                .collect();
            let (h, secs) = backend.forward_profiled(&mut inputs)?;
            toks = sample(backend, &h, batch)?;
            let rest = (t.elapsed().as_secs_f64() - secs.iter().sum::<f64>()).max(0.0);
            tick(1);
            // ... and one counting the experts the batch routes to.
            backend.trace_experts(true);
            let r = step(backend, &mut states, &toks);
            let experts = backend.traced_experts();
            backend.trace_experts(false);
            r?;
            tick(1);
            let (table, projected) = per_kind(&cfg, full, &secs, rest);
            let scale = step_secs / (secs.iter().sum::<f64>() + rest).max(1e-12);
            let weight_bytes = weight_bytes_per_step(&cfg, batch, &experts);
            let gb_s = weight_bytes as f64 / step_secs / 1e9;
            let projected_step = projected * scale;
            decode.push(DecodeResult {
                context: ctx,
                batch,
                steps: opts.decode_tokens,
                step_ms: 1e3 * step_secs,
                tokens_per_s: batch as f64 / step_secs,
                experts_per_layer: experts.iter().sum::<usize>() as f64
                    / experts.len().max(1) as f64,
                weight_bytes,
                state_bytes: batch as u64 * state_bytes_per_step(&cfg, ctx),
                weight_gb_s: gb_s,
                bandwidth_ratio: gb_s * 1e9 / bandwidth,
                ms_per_layer: table,
                host_experts_ms: 1e3 * host_secs,
                other_ms: 1e3 * rest,
                projected_step_ms: 1e3 * projected_step,
                projected_tokens_per_s: batch as f64 / projected_step,
            });
        }
    }
    Ok(Report {
        device: backend.name(),
        bandwidth_gb_s: bandwidth / 1e9,
        layers: cfg.num_hidden_layers,
        model_layers: full.num_hidden_layers,
        weight_bytes: backend.weight_bytes(),
        prefill,
        decode,
        skipped,
    })
}

impl Report {
    /// The report as a table.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: measured bandwidth {:.0} GB/s; {} of {} layers, {} of weights",
            self.device,
            self.bandwidth_gb_s,
            self.layers,
            self.model_layers,
            crate::inspect::bytes(self.weight_bytes)
        );
        if let Some(p) = &self.prefill {
            let _ = writeln!(
                s,
                "prefill {} tokens: {:.2} s, {:.0} tokens/s ({:.0} projected to {} layers); ms per layer: {}",
                p.tokens,
                p.secs,
                p.tokens_per_s,
                p.projected_tokens_per_s,
                self.model_layers,
                kinds(&p.ms_per_layer)
            );
        }
        let _ = writeln!(
            s,
            "{:>8} {:>6} {:>9} {:>10} {:>8} {:>10} {:>10} {:>9} {:>7}  {:>12}  ms per layer",
            "context",
            "batch",
            "step ms",
            "tokens/s",
            "experts",
            "weights",
            "state",
            "GB/s",
            "of BW",
            "projected"
        );
        for d in &self.decode {
            let _ = writeln!(
                s,
                "{:>8} {:>6} {:>9.3} {:>10.1} {:>8.1} {:>10} {:>10} {:>9.0} {:>6.1}%  {:>6.1} tok/s  {}",
                crate::inspect::tokens(d.context),
                d.batch,
                d.step_ms,
                d.tokens_per_s,
                d.experts_per_layer,
                crate::inspect::bytes(d.weight_bytes),
                crate::inspect::bytes(d.state_bytes),
                d.weight_gb_s,
                100.0 * d.bandwidth_ratio,
                d.projected_tokens_per_s,
                kinds(&d.ms_per_layer)
            );
            if d.host_experts_ms > 0.0 {
                let _ = writeln!(
                    s,
                    "{:>15} routed experts in host memory (CPU, copies included): {:.3} ms of the step's {:.3} ({:.1}%), the device the rest",
                    "",
                    d.host_experts_ms,
                    d.step_ms,
                    100.0 * d.host_experts_ms / d.step_ms
                );
            }
        }
        for k in &self.skipped {
            let _ = writeln!(
                s,
                "{:>8} {:>6} skipped: {}",
                crate::inspect::tokens(k.context),
                k.batch,
                k.reason
            );
        }
        s
    }
}

fn kinds(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One state-file measurement: a synthetic decode state of a whole model written to disk
/// (synced) and read back (from the disk, then from the page cache), checked equal; times are
/// medians of three runs.
#[derive(Clone, Debug, Serialize)]
pub struct StateIo {
    /// Tokens the state holds.
    pub context: usize,
    /// Bytes of the file.
    pub bytes: u64,
    /// Seconds to write and sync it.
    pub write_secs: f64,
    /// Seconds to read and check it with the file out of the page cache (none where the OS
    /// cannot be asked to drop it).
    pub read_disk_secs: Option<f64>,
    /// Seconds to read and check it from the page cache.
    pub read_cached_secs: f64,
}

/// Asks the OS to drop a file's pages from its cache (they are clean after a sync).
fn drop_cached(path: &std::path::Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let Ok(f) = std::fs::File::open(path) {
            // SAFETY: a plain advice call on an open descriptor.
            return unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }
                == 0;
        }
    }
    let _ = path;
    false
}

/// Writes and reads back a state file in `dir` for each context of `cfg`'s whole model, three
/// times; each time is the median of the three.
pub fn state_io(
    cfg: &Config,
    contexts: &[usize],
    dir: &std::path::Path,
    seed: u64,
) -> Result<Vec<StateIo>> {
    use crate::checkpoint::Fingerprint;
    use crate::state::file;
    const REPEATS: usize = 3;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = Vec::new();
    let model = Fingerprint([0; 32]);
    for &ctx in contexts {
        let state = synthetic_state(cfg, ctx, seed);
        let tokens: Vec<u32> = (0..ctx as u32).collect();
        let path = dir.join(format!("hadal-bench-{}-{ctx}.hst", std::process::id()));
        let (mut w, mut rd, mut rc) = (Vec::new(), Vec::new(), Vec::new());
        let mut bytes = 0;
        for _ in 0..REPEATS {
            let t = Instant::now();
            bytes = file::write(
                &path,
                &file::Saved {
                    model,
                    tokens: &tokens,
                    state: &state,
                    prompt: None,
                    extra: serde_json::Value::Null,
                },
            )?;
            w.push(t.elapsed().as_secs_f64());
            let read = || -> Result<f64> {
                let t = Instant::now();
                let back = file::read(&path, Some(&model))?;
                let secs = t.elapsed().as_secs_f64();
                if back.state != state || back.tokens != tokens {
                    return Err(Error::Input(format!(
                        "{}: the state read back differs from the one written",
                        path.display()
                    )));
                }
                Ok(secs)
            };
            if drop_cached(&path) {
                rd.push(read()?);
            }
            rc.push(read()?);
        }
        let _ = std::fs::remove_file(&path);
        out.push(StateIo {
            context: ctx,
            bytes,
            write_secs: median(w),
            read_disk_secs: (!rd.is_empty()).then(|| median(rd)),
            read_cached_secs: median(rc),
        });
    }
    Ok(out)
}

/// The state-file measurements as a table.
pub fn render_state_io(rows: &[StateIo], dir: &std::path::Path) -> String {
    use crate::inspect::bytes;
    let gbs = |b: u64, s: f64| b as f64 / s / 1e9;
    let mut o = format!(
        "state files in {}: written (synced) and read back (checked)\n{:>9}  {:>10}  {:>16}  {:>16}  {:>16}\n",
        dir.display(),
        "context",
        "file",
        "write GB/s",
        "read disk GB/s",
        "read cache GB/s"
    );
    for r in rows {
        o += &format!(
            "{:>9}  {:>10}  {:>16.2}  {:>16}  {:>16.2}\n",
            r.context,
            bytes(r.bytes),
            gbs(r.bytes, r.write_secs),
            r.read_disk_secs
                .map_or("-".into(), |s| format!("{:.2}", gbs(r.bytes, s))),
            gbs(r.bytes, r.read_cached_secs),
        );
    }
    o
}
