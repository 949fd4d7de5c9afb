//! The `hadal` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use hadal::backend::cpu::{Cpu, Numerics};
use hadal::backend::{Backend, DeviceSpec, ExpertsOn, LoadReport, Runner};
use hadal::chat::parse::{parse, Delta, StreamParser};
use hadal::chat::request::conversation;
use hadal::chat::{encode, Effort, Options, ThinkingMode};
use hadal::checkpoint::Checkpoint;
use hadal::config::Config;
use hadal::generate::{generate, generate_speculative, Finish, Prefill, SamplingParams};
use hadal::inspect::{bytes, Plan};
use hadal::score;
use hadal::session::{ChatSession, TurnOptions};
use hadal::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "hadal",
    version,
    about = "Inference engine for the DeepSeek V4 family"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Where the routed experts run beside a GPU: auto (on the GPU, but for as many layers'
    /// as it cannot hold: those stay in host memory, computed by the CPU), gpu, cpu (all in
    /// host memory), or N, the experts of the last N main layers.
    #[arg(long, global = true, default_value = "auto", value_parser = parse_experts_on)]
    experts_on: ExpertsOn,
}

impl Cli {
    /// The command's device, if it takes one.
    fn device_mut(&mut self) -> Option<&mut DeviceSpec> {
        match &mut self.cmd {
            Cmd::Score { device, .. }
            | Cmd::Demo { device, .. }
            | Cmd::Generate { device, .. }
            | Cmd::Chat { device, .. }
            | Cmd::Serve { device, .. }
            | Cmd::Bench { device, .. } => Some(device),
            _ => None,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Configuration, parameter and byte counts, decode-state cost and the memory one sequence
    /// needs.
    Inspect {
        /// Checkpoint directory (config.json, and weights if present).
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        model: Option<PathBuf>,
        /// A config.json alone (no weights needed).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Context of the sequence-memory figure (`131072`, `128K`, `1M`).
        #[arg(long, default_value = "1M", value_parser = parse_tokens)]
        context: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Teacher-forced logits of token sequences (or the perplexity of a text).
    Score {
        /// Checkpoint directory.
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        model: Option<PathBuf>,
        /// A config.json instead: synthetic weights of its shapes (random FP8/FP4/BF16 codes,
        /// the same bytes on every device for a seed), generated in place.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only the first N main layers (and no MTP block).
        #[arg(long)]
        layers: Option<usize>,
        /// Seed of the synthetic weights.
        #[arg(long, default_value_t = 0, requires = "config")]
        seed: u64,
        /// Safetensors file with `tokens` (I32 or I64, [batch, length]).
        #[arg(
            long,
            required_unless_present = "text",
            conflicts_with = "text",
            requires = "out"
        )]
        tokens: Option<PathBuf>,
        /// Output safetensors file: `logits` F32 [batch, length, vocab] (and `mtp_logits`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Tokens fed in the first batched prefill (default: all); the rest are decoded one
        /// at a time.
        #[arg(long)]
        prefill: Option<usize>,
        /// Also write `mtp_logits` [batch, prefill - 1, vocab] from MTP block 0 over the
        /// prefill.
        #[arg(long)]
        mtp: bool,
        /// A text file to tokenize (with the checkpoint's tokenizer.json) and report the
        /// perplexity of.
        #[arg(long)]
        text: Option<PathBuf>,
        /// Where to run: cpu, cuda, cuda:N, or auto (the GPU when one is present).
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: DeviceSpec,
        /// Summation orders (CPU only): `reference` sums each product in the order the reference
        /// platform takes for its number of rows, so that a run with the reference's schedule
        /// reproduces its bits; `invariant` gives every sequence the bits it gets alone, as
        /// serving does.
        #[arg(long, value_enum, default_value = "reference")]
        numerics: NumericsArg,
    },
    /// Print the exact V4 prompt of a chat request (an OpenAI request object or an array of
    /// messages; `-` reads standard input).
    Render {
        /// The request file.
        request: PathBuf,
        /// Chat or thinking (default: the request's `thinking`, else thinking).
        #[arg(long, value_enum)]
        thinking_mode: Option<Mode>,
        /// `high` or `max` (default: the request's `reasoning_effort`).
        #[arg(long, value_enum)]
        reasoning_effort: Option<EffortArg>,
        /// Keep the reasoning of earlier turns.
        #[arg(long)]
        keep_thinking: bool,
        /// Print token ids (one JSON array) instead of text.
        #[arg(long)]
        ids: bool,
        /// tokenizer.json for --ids (default: the bundled V4 tokenizer).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Run a small random-weight V4 end to end (no download) and print speed and the memory
    /// plans of V4-Flash and V4-Pro.
    Demo {
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Seed of the random weights and of sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The user message.
        #[arg(
            long,
            default_value = "Hello! What can you tell me about the deep sea?"
        )]
        prompt: String,
        /// Keep the generated checkpoint in this directory (to try `chat` or `generate` on it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where to run: cpu, cuda, cuda:N, or auto (the GPU when one is present).
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: DeviceSpec,
    },
    /// Generate a completion for a prompt (one user message) or a chat request.
    Generate {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// A user message.
        #[arg(long, conflicts_with = "request", required_unless_present = "request")]
        prompt: Option<String>,
        /// A chat request (OpenAI JSON, `-` for standard input).
        #[arg(long)]
        request: Option<PathBuf>,
        /// Chat or thinking (default: the request's `thinking`, else chat).
        #[arg(long, value_enum)]
        thinking_mode: Option<Mode>,
        /// Draft with the MTP block and verify with the main model.
        #[arg(long)]
        speculative: bool,
        /// Where to run: cpu, cuda, cuda:N, or auto (the GPU when one is present).
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: DeviceSpec,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Chat interactively; the decode state is kept between turns.
    Chat {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Start in chat or thinking mode (`/think`, `/nothink` switch).
        #[arg(long, value_enum, default_value = "chat")]
        thinking_mode: Mode,
        /// Draft with the MTP block and verify with the main model.
        #[arg(long)]
        speculative: bool,
        /// Where to run: cpu, cuda, cuda:N, or auto (the GPU when one is present).
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: DeviceSpec,
        /// Continue the conversation saved as NAME (`/save NAME`).
        #[arg(long, value_name = "NAME")]
        resume: Option<String>,
        /// Where `/save` and `/load` keep conversations (default:
        /// `$XDG_DATA_HOME/hadal/chats`, or `~/.local/share/hadal/chats`).
        #[arg(long, value_name = "DIR")]
        sessions: Option<PathBuf>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Serve an OpenAI-compatible API with continuous batching.
    Serve {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Require `Authorization: Bearer KEY`.
        #[arg(long)]
        api_key: Option<String>,
        /// Model name in `/v1/models` and responses (default: the directory name).
        #[arg(long)]
        served_model_name: Option<String>,
        /// Largest request body in bytes.
        #[arg(long, default_value_t = 8 << 20)]
        max_body_bytes: usize,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 16)]
        max_running: usize,
        /// Tokens per forward step (decode tokens first, prefill chunks share the rest).
        #[arg(long, default_value_t = 512)]
        max_batch_tokens: usize,
        /// Requests waiting beyond the running ones; more get 503.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// Finished conversations kept for prefix reuse.
        #[arg(long, default_value_t = 8)]
        prefix_cache: usize,
        /// Also keep finished conversations' decode states in this directory, across
        /// restarts (created if missing).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Bytes of state files `--state-dir` keeps (`500M`, `64G`); the least recently used
        /// go first.
        #[arg(long, default_value = "64G", value_parser = parse_bytes, requires = "state_dir")]
        state_dir_bytes: u64,
        /// max_tokens of requests that give none.
        #[arg(long, default_value_t = 4096)]
        default_max_tokens: usize,
        /// Where to run: cpu, cuda, cuda:N, or auto (the GPU when one is present).
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: DeviceSpec,
    },
    /// Prefill and decode throughput on a device: tokens/s, time per layer kind, bytes of
    /// weights and state read per token, against the memory bandwidth measured in the same run.
    Bench {
        /// Checkpoint directory.
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        model: Option<PathBuf>,
        /// A config.json instead: synthetic weights of its shapes, generated in place (no file).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Load only the first N main layers; results are also projected to all of them.
        #[arg(long)]
        layers: Option<usize>,
        /// Where to run: cpu, cuda, cuda:N, or auto (the GPU when one is present).
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: DeviceSpec,
        /// Contexts of the decode measurements (`4K,128K,1M`).
        #[arg(long, default_value = "4K", value_delimiter = ',', value_parser = parse_tokens)]
        context: Vec<usize>,
        /// Sequences decoded together (`1,32`).
        #[arg(long, default_value = "1", value_delimiter = ',')]
        batch: Vec<usize>,
        /// Timed decode steps per measurement.
        #[arg(long, default_value_t = 32)]
        decode_tokens: usize,
        /// Tokens of a prefill measurement (`8K`; none by default).
        #[arg(long, value_parser = parse_tokens)]
        prefill: Option<usize>,
        /// Tokens per prefill call.
        #[arg(long, default_value = "2K", value_parser = parse_tokens)]
        prefill_chunk: usize,
        /// Seed of the synthetic weights, states and tokens.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Measure state files instead: the whole model's decode state at each context
        /// written to disk (synced) and read back (no weights loaded).
        #[arg(long)]
        state_io: bool,
        /// Where `--state-io` writes (default: the system's temporary directory).
        #[arg(long, value_name = "DIR", requires = "state_io")]
        state_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Decode states saved on disk (`chat`'s `/save`, `serve --state-dir`).
    State {
        #[command(subcommand)]
        cmd: StateCmd,
    },
    /// Parse a completion (standard input) into an assistant message, printed as JSON.
    Parse {
        /// How the completion was generated.
        #[arg(long, value_enum)]
        thinking_mode: Mode,
    },
}

#[derive(Subcommand)]
enum StateCmd {
    /// What a state file holds, and whether every byte of it checks out (exit 1 if not).
    Inspect {
        /// The state file.
        file: PathBuf,
        /// A checkpoint directory to compare the file's model with (exit 1 if it differs).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print the header as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Sampling flags shared by the generating commands.
#[derive(clap::Args)]
struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens below this fraction of the top probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Seed of the random draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// A text that ends the completion (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            logprobs: None,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Mode {
    Chat,
    Thinking,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum NumericsArg {
    Reference,
    Invariant,
}

impl From<NumericsArg> for Numerics {
    fn from(n: NumericsArg) -> Self {
        match n {
            NumericsArg::Reference => Numerics::ReferenceShapes,
            NumericsArg::Invariant => Numerics::BatchInvariant,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EffortArg {
    High,
    Max,
}

impl From<Mode> for ThinkingMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Chat => ThinkingMode::Chat,
            Mode::Thinking => ThinkingMode::Thinking,
        }
    }
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| path.display().to_string())
    }
}

fn render(
    request: &Path,
    mode: Option<Mode>,
    effort: Option<EffortArg>,
    keep_thinking: bool,
    ids: bool,
    tokenizer: Option<&Path>,
) -> anyhow::Result<()> {
    let text = read_input(request)?;
    let req: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", request.display()))?;
    let conv = conversation(&req)?;
    let opts = Options {
        mode: mode
            .map(Into::into)
            .or(conv.mode)
            .unwrap_or(ThinkingMode::Thinking),
        effort: effort
            .map(|e| match e {
                EffortArg::High => Effort::High,
                EffortArg::Max => Effort::Max,
            })
            .or(conv.effort),
        drop_thinking: !keep_thinking,
        add_bos: true,
    };
    let prompt = encode(&conv.messages, &opts)?;
    let mut out = std::io::stdout().lock();
    if ids {
        let tok = match tokenizer {
            Some(p) => Tokenizer::from_file(p)?,
            None => Tokenizer::bundled(),
        };
        writeln!(out, "{}", serde_json::to_string(&tok.encode(&prompt)?)?)?;
    } else {
        out.write_all(prompt.as_bytes())?;
    }
    Ok(())
}

/// A progress bar on stderr (drawn only on a terminal).
fn bar(template: &str) -> ProgressBar {
    let b = ProgressBar::new(0);
    b.set_style(ProgressStyle::with_template(template).expect("valid template"));
    b
}

/// Parses `--experts-on`.
fn parse_experts_on(s: &str) -> Result<ExpertsOn, String> {
    DeviceSpec::parse_experts_on(s).map_err(|e| e.to_string())
}

/// Parses `--device`.
fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    DeviceSpec::parse(s).map_err(|e| e.to_string())
}

/// Loads a model onto a device with a progress bar over its blocks, and reports what it holds.
fn load_model(dir: &Path, device: DeviceSpec) -> anyhow::Result<Box<dyn Backend>> {
    let b = bar("loading {bar:30} {pos}/{len} blocks");
    let (backend, report) = hadal::backend::open(device, dir, &|done, total| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    })?;
    b.finish_and_clear();
    eprintln!("{}", load_line(&*backend, &report));
    Ok(backend)
}

/// What a load put where, and how fast.
fn load_line(backend: &dyn Backend, r: &LoadReport) -> String {
    let kinds: Vec<String> = r
        .by_format
        .iter()
        .map(|(k, b)| format!("{k} {}", bytes(*b)))
        .collect();
    let how = if matches!(backend.name().as_str(), n if n.starts_with("cpu")) {
        "memory-mapped".to_string()
    } else {
        format!(
            "read at {:.2} GB/s",
            r.checkpoint_bytes as f64 / r.secs.max(1e-9) / 1e9
        )
    };
    format!(
        "loaded {} of weights onto {} in {:.2}s ({}; {how})",
        bytes(backend.weight_bytes()),
        backend.name(),
        r.secs,
        kinds.join(", ")
    )
}

/// Runs `f` with a prefill progress bar (tokens and tokens/s).
fn with_prefill_bar<T>(f: impl FnOnce(Prefill) -> T) -> T {
    let b = bar("prefill {bar:30} {pos}/{len} tokens, {per_sec}");
    let progress = |done: usize, total: usize| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    };
    let r = f(Prefill {
        chunk: 512,
        progress: Some(&progress),
    });
    b.finish_and_clear();
    r
}

/// Prints streamed deltas to stdout, labelling reasoning apart from the answer.
struct Printer {
    /// Whether the last delta shown was reasoning.
    reasoning: Option<bool>,
    /// What introduces the answer.
    answer_mark: &'static str,
}

impl Default for Printer {
    fn default() -> Self {
        Printer {
            reasoning: None,
            answer_mark: "\n[answer] ",
        }
    }
}

impl Printer {
    fn show(&mut self, d: Delta) {
        let (reasoning, text) = match d {
            Delta::Reasoning(t) => (true, t),
            Delta::Content(t) => (false, t),
            Delta::ToolCall { call, .. } => (
                false,
                format!("\n[tool call] {}({})", call.name, call.arguments),
            ),
        };
        let mut out = std::io::stdout().lock();
        if self.reasoning != Some(reasoning) {
            let _ = write!(
                out,
                "{}",
                if reasoning {
                    "[reasoning] "
                } else {
                    self.answer_mark
                }
            );
            self.reasoning = Some(reasoning);
        }
        let _ = write!(out, "{text}");
        let _ = out.flush();
    }
}

/// Streams a completion to stdout, reasoning apart from the answer; returns it parsed.
fn stream_completion(
    backend: &dyn Backend,
    tok: &Tokenizer,
    prompt: &[u32],
    mode: ThinkingMode,
    params: &SamplingParams,
    speculative: bool,
) -> anyhow::Result<(hadal::generate::Completion, hadal::chat::parse::Parsed)> {
    let mut state = backend.new_state()?;
    let mut sp = StreamParser::new(mode);
    let mut printer = Printer::default();
    let on_text = |t: &str| {
        sp.push(t).into_iter().for_each(|d| printer.show(d));
        true
    };
    let c = with_prefill_bar(|prefill| {
        if speculative {
            generate_speculative(backend, tok, &mut state, prompt, params, prefill, on_text)
        } else {
            generate(backend, tok, &mut state, prompt, params, prefill, on_text)
        }
    })?;
    sp.finish().into_iter().for_each(|d| printer.show(d));
    println!();
    let parsed = parse(&c.raw_text(), mode);
    Ok((c, parsed))
}

fn demo(
    max_tokens: usize,
    seed: u64,
    prompt: &str,
    keep: Option<&Path>,
    device: DeviceSpec,
) -> anyhow::Result<()> {
    println!("hadal demo: a small DeepSeek V4 (window, CSA and HCA attention, hash and score routing, MTP)");
    println!("with RANDOM weights and the real V4 tokenizer. Its words are noise: the demo shows the path and the numbers.\n");
    let cfg = hadal::demo::demo_config();
    struct Cleanup(Option<PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(d) = &self.0 {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let (dir, _cleanup) = match keep {
        Some(d) => (d.to_path_buf(), Cleanup(None)),
        None => {
            let d = std::env::temp_dir().join(format!("hadal-demo-{}", std::process::id()));
            (d.clone(), Cleanup(Some(d)))
        }
    };
    let t = std::time::Instant::now();
    hadal::demo::write_random_checkpoint(&dir, &cfg, seed)?;
    let built = t.elapsed().as_secs_f64();
    let (backend, report) = hadal::backend::open(device, &dir, &|_, _| {})?;
    let tok = Tokenizer::for_model(&dir)?;
    println!(
        "built a {} checkpoint in {built:.2}s; {}",
        bytes(report.checkpoint_bytes),
        load_line(&*backend, &report)
    );
    let messages =
        conversation(&serde_json::json!([{"role": "user", "content": prompt}]))?.messages;
    let text = encode(
        &messages,
        &Options {
            mode: ThinkingMode::Chat,
            ..Options::default()
        },
    )?;
    let ids = tok.encode(&text)?;
    println!("prompt ({} tokens): {text:?}", ids.len());
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed,
        max_tokens,
        ..Default::default()
    };
    let (c, parsed) = stream_completion(&*backend, &tok, &ids, ThinkingMode::Chat, &params, false)?;
    println!(
        "\nparsed: {} chars of content, {} tool calls{}",
        parsed.content.chars().count(),
        parsed.tool_calls.len(),
        parsed
            .error
            .as_deref()
            .map(|e| format!(" (format note: {e})"))
            .unwrap_or_default()
    );
    let decoded = c.tokens.len().saturating_sub(1).max(1);
    println!(
        "speed: prefill {} tokens in {:.1} ms ({:.0} tokens/s); decode {} tokens in {:.1} ms ({:.1} tokens/s), on {}",
        ids.len(),
        c.prefill_secs * 1e3,
        ids.len() as f64 / c.prefill_secs,
        c.tokens.len(),
        c.decode_secs * 1e3,
        decoded as f64 / c.decode_secs.max(1e-9),
        backend.name()
    );
    println!("\nmemory plan of the real models (weights as released, decode state per sequence):");
    for (name, text) in [
        ("V4-Flash", hadal::demo::FLASH_CONFIG),
        ("V4-Pro", hadal::demo::PRO_CONFIG),
    ] {
        let cfg = Config::from_json(text)?;
        for ctx in [128 * 1024, 1 << 20] {
            let p = Plan::new(&cfg, ctx);
            println!(
                "  {name:<8} {:>4} context: weights {:>10}, state {:>10} ({} per token; a dense BF16 KV cache would be {})",
                hadal::inspect::tokens(ctx),
                bytes(p.weight_bytes),
                bytes(p.sequence_bytes),
                bytes(p.sequence_bytes / ctx as u64),
                bytes(p.dense_bf16_kv_bytes)
            );
        }
    }
    Ok(())
}

fn generate_cmd(
    model: &Path,
    prompt: Option<&str>,
    request: Option<&Path>,
    mode: Option<Mode>,
    speculative: bool,
    sampling: &SamplingArgs,
    device: DeviceSpec,
) -> anyhow::Result<()> {
    let req = match (prompt, request) {
        (Some(p), _) => serde_json::json!([{"role": "user", "content": p}]),
        (None, Some(r)) => serde_json::from_str(&read_input(r)?)
            .with_context(|| format!("{}: not JSON", r.display()))?,
        (None, None) => bail!("give --prompt TEXT or --request FILE"),
    };
    let conv = conversation(&req)?;
    let mode = mode
        .map(Into::into)
        .or(conv.mode)
        .unwrap_or(ThinkingMode::Chat);
    let text = encode(
        &conv.messages,
        &Options {
            mode,
            effort: conv.effort,
            ..Options::default()
        },
    )?;
    let params = sampling.params();
    params.validate()?;
    let backend = load_model(model, device)?;
    let tok = Tokenizer::for_model(model)?;
    let ids = tok.encode(&text)?;
    let (c, parsed) = stream_completion(&*backend, &tok, &ids, mode, &params, speculative)?;
    let drafts = if speculative {
        format!("; MTP drafts accepted {}/{}", c.drafts.1, c.drafts.0)
    } else {
        String::new()
    };
    eprintln!(
        "{} prompt tokens, {} generated ({:?}); prefill {:.0} tokens/s, decode {:.1} tokens/s{drafts}{}",
        ids.len(),
        c.tokens.len(),
        c.finish,
        ids.len() as f64 / c.prefill_secs.max(1e-9),
        c.tokens.len() as f64 / c.decode_secs.max(1e-9),
        parsed
            .error
            .as_deref()
            .map(|e| format!("; format note: {e}"))
            .unwrap_or_default()
    );
    Ok(())
}

static GENERATING: AtomicBool = AtomicBool::new(false);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Where `hadal chat` keeps saved conversations.
fn sessions_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .context("no --sessions directory, and neither XDG_DATA_HOME nor HOME is set")?;
    Ok(data.join("hadal/chats"))
}

/// The file of a saved conversation: NAME is letters, digits, `.`, `_` and `-`.
fn session_path(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    anyhow::ensure!(
        ok,
        "{name:?}: a conversation's name is letters, digits, '.', '_' and '-'"
    );
    Ok(dir.join(format!("{name}.hst")))
}

const CHAT_COMMANDS: &str =
    "/think, /nothink, /effort max|high, /save NAME, /load NAME, /clear, /quit";

#[allow(clippy::too_many_arguments)]
fn chat(
    model: &Path,
    mode: Mode,
    speculative: bool,
    sampling: &SamplingArgs,
    device: DeviceSpec,
    resume: Option<&str>,
    sessions: Option<PathBuf>,
) -> anyhow::Result<()> {
    let params = sampling.params();
    params.validate()?;
    let sessions = sessions_dir(sessions)?;
    let backend = load_model(model, device)?;
    let backend = &*backend;
    let tok = Tokenizer::for_model(model)?;
    let mut session = match resume {
        Some(name) => {
            let s = ChatSession::load(backend, &session_path(&sessions, name)?)?;
            eprintln!(
                "(resumed {name}: {} messages, {} tokens of context)",
                s.messages.len(),
                s.context_tokens()
            );
            s
        }
        None => ChatSession::new(backend, mode.into())?,
    };
    eprintln!("Commands: {CHAT_COMMANDS}. Ctrl-C stops an answer.");
    ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            INTERRUPTED.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    })
    .context("cannot install the Ctrl-C handler")?;
    let stdin = std::io::stdin();
    loop {
        eprint!("\n> ");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            [] => continue,
            ["/quit" | "/exit"] => break,
            ["/clear"] => {
                session.clear(backend)?;
                eprintln!("(conversation cleared)");
                continue;
            }
            ["/think"] => {
                session.mode = ThinkingMode::Thinking;
                eprintln!("(thinking mode)");
                continue;
            }
            ["/nothink"] => {
                session.mode = ThinkingMode::Chat;
                eprintln!("(chat mode)");
                continue;
            }
            ["/effort", e] => {
                session.effort = Some(hadal::chat::request::parse_effort(e)?);
                eprintln!("(reasoning effort {e})");
                continue;
            }
            ["/save", name] => {
                let saved = session_path(&sessions, name).and_then(|p| {
                    std::fs::create_dir_all(&sessions)
                        .with_context(|| sessions.display().to_string())?;
                    Ok((session.save(backend, &p)?, p))
                });
                match saved {
                    Ok((n, p)) => eprintln!("(saved as {name}: {}, {})", p.display(), bytes(n)),
                    Err(e) => eprintln!("hadal: error: {e:#}"),
                }
                continue;
            }
            ["/load", name] => {
                match session_path(&sessions, name)
                    .and_then(|p| Ok(ChatSession::load(backend, &p)?))
                {
                    Ok(s) => {
                        session = s;
                        eprintln!(
                            "(loaded {name}: {} messages, {} tokens of context)",
                            session.messages.len(),
                            session.context_tokens()
                        );
                    }
                    Err(e) => eprintln!("hadal: error: {e:#}"),
                }
                continue;
            }
            [c, ..] if c.starts_with('/') => {
                eprintln!("unknown command {c}; commands: {CHAT_COMMANDS}");
                continue;
            }
            _ => {}
        }
        INTERRUPTED.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let mut printer = Printer {
            reasoning: None,
            answer_mark: "\n",
        };
        let r = with_prefill_bar(|prefill| {
            session.turn(
                backend,
                &tok,
                line,
                TurnOptions {
                    params: &params,
                    speculative,
                    prefill,
                },
                |d| {
                    printer.show(d);
                    !INTERRUPTED.load(Ordering::SeqCst)
                },
            )
        });
        GENERATING.store(false, Ordering::SeqCst);
        println!();
        match r {
            Ok(turn) => {
                let c = &turn.completion;
                eprintln!(
                    "[{} tokens prefilled{}, {} generated at {:.1} tokens/s{}; context {} tokens, state {}]",
                    turn.prefilled,
                    if turn.restarted { " (whole conversation)" } else { "" },
                    c.tokens.len(),
                    c.tokens.len() as f64 / c.decode_secs.max(1e-9),
                    if c.finish == Finish::Cancelled { ", stopped" } else { "" },
                    session.context_tokens(),
                    bytes(session.state_bytes() as u64)
                );
            }
            Err(e) => eprintln!("hadal: error: {e}"),
        }
    }
    Ok(())
}

fn state_inspect(file: &Path, model: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let header = hadal::state::file::verify(file)?;
    let size = std::fs::metadata(file)
        .with_context(|| file.display().to_string())?
        .len();
    let theirs = match model {
        Some(dir) => {
            let cfg = Config::from_file(&Checkpoint::config_path(dir))?;
            Some(Checkpoint::open(dir)?.fingerprint(&cfg).to_string())
        }
        None => None,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&header)?);
    } else {
        let from = model.map(|d| d.display().to_string()).unwrap_or_default();
        print!(
            "{}",
            hadal::state::inspect::report(
                &header,
                size,
                theirs.as_deref().map(|fp| (fp, from.as_str()))
            )
        );
    }
    if let (Some(fp), Some(dir)) = (&theirs, model) {
        anyhow::ensure!(
            *fp == header.model,
            "{}: a state of another model than {} ({} vs {fp})",
            file.display(),
            dir.display(),
            header.model
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn serve_cmd(
    model: &Path,
    host: &str,
    port: u16,
    api_key: Option<String>,
    name: Option<String>,
    max_body_bytes: usize,
    engine: hadal::server::engine::EngineOptions,
    default_max_tokens: usize,
    device: DeviceSpec,
) -> anyhow::Result<()> {
    if engine.max_running == 0 || engine.max_batch_tokens == 0 || engine.max_queue == 0 {
        bail!("--max-running, --max-batch-tokens and --max-queue must be positive");
    }
    let addr: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .or_else(|_| format!("[{host}]:{port}").parse())
        .with_context(|| format!("--host {host}: not an IP address"))?;
    let backend = load_model(model, device)?;
    let tok = Tokenizer::for_model(model)?;
    let model_name = name.unwrap_or_else(|| {
        model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "deepseek-v4".into())
    });
    let opts = hadal::server::ServerOptions {
        model_name,
        api_key,
        max_body_bytes,
        default_max_tokens,
        max_n: 8,
        engine,
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(hadal::server::serve(
        std::sync::Arc::from(backend),
        std::sync::Arc::new(tok),
        opts,
        addr,
    ))
    .with_context(|| format!("serving on {addr}"))
}

fn parse_cmd(mode: Mode) -> anyhow::Result<()> {
    let text = read_input(Path::new("-"))?;
    let p = parse(&text, mode.into());
    let mut msg = p.to_message();
    if let Some(e) = &p.error {
        msg.insert("error".into(), e.clone().into());
    }
    println!("{}", serde_json::to_string_pretty(&msg)?);
    Ok(())
}

/// Parses a byte count with an optional `K`, `M`, `G` or `T` suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{s:?} is not a byte count (e.g. 500M, 64G)"))
}

/// Parses a token count with an optional `K` (1024) or `M` (1024^2) suffix.
fn parse_tokens(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1024),
        Some('m' | 'M') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a positive token count (e.g. 131072, 128K, 1M)"))
}

fn inspect(
    model: Option<&Path>,
    config: Option<&Path>,
    context: usize,
    json: bool,
) -> anyhow::Result<()> {
    let (cfg, ck) = match (model, config) {
        (Some(dir), _) => {
            let cfg = Config::from_file(&Checkpoint::config_path(dir))?;
            let has_weights = dir.join("model.safetensors").exists()
                || dir.join("model.safetensors.index.json").exists();
            (cfg, has_weights.then_some(dir))
        }
        (None, Some(file)) => (Config::from_file(file)?, None),
        (None, None) => bail!("give --model DIR or --config FILE"),
    };
    if context > cfg.max_position_embeddings {
        bail!(
            "--context {context} exceeds the model's max_position_embeddings = {}",
            cfg.max_position_embeddings
        );
    }
    let plan = Plan::new(&cfg, context);
    // With weights, load the model: this checks every tensor against the configuration.
    let stored = ck
        .map(|dir| {
            hadal::model::Model::load(&Cpu::default(), dir, &|_, _| {}).map(|m| m.checkpoint_bytes)
        })
        .transpose()?;
    if json {
        let mut v = serde_json::to_value(&plan)?;
        v["config"] = serde_json::to_value(&cfg)?;
        if let Some(b) = stored {
            v["checkpoint_bytes"] = b.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", plan.render(&cfg));
    match stored {
        Some(b) => println!(
            "\ncheckpoint: every tensor matches config.json; {} stored, resident as stored (FP8 and FP4 stay packed)",
            bytes(b)
        ),
        None => println!("\nno weights read: figures come from the configuration alone"),
    }
    Ok(())
}

/// Loads a checkpoint (`model`) or a configuration's synthetic weights (`config`), cut to its
/// first `layers` main layers, onto `device`. Returns the backend and the full configuration.
fn load_source(
    model: Option<&Path>,
    config: Option<&Path>,
    layers: Option<usize>,
    seed: u64,
    device: DeviceSpec,
    numerics: Numerics,
) -> anyhow::Result<(Box<dyn Backend>, Config)> {
    let (full, ck) = match (model, config) {
        (Some(dir), _) => (
            Config::from_file(&Checkpoint::config_path(dir))?,
            Some(Checkpoint::open(dir)?),
        ),
        (None, Some(f)) => (Config::from_file(f)?, None),
        (None, None) => bail!("give --model DIR or --config FILE"),
    };
    let cfg = match layers {
        Some(n) => full.first_layers(n)?,
        None => full.clone(),
    };
    let mut ck = ck.unwrap_or_else(|| hadal::demo::synthetic_checkpoint(&cfg, seed));
    if layers.is_some() {
        ck.drop_layers_from(cfg.num_hidden_layers);
    }
    let b = bar("loading {bar:30} {pos}/{len} blocks");
    let progress = |done: usize, total: usize| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    };
    let (backend, report) = match device {
        DeviceSpec::Cpu => {
            let t = std::time::Instant::now();
            let dev = Cpu { numerics };
            let model = hadal::model::Model::from_checkpoint(&dev, cfg, ck, &progress)?;
            let r = Runner::new(dev, model).loaded_in(t.elapsed().as_secs_f64());
            let rep = r.report();
            (Box::new(r) as Box<dyn Backend>, rep)
        }
        _ => hadal::backend::open_checkpoint(device, cfg, ck, &progress)?,
    };
    b.finish_and_clear();
    eprintln!("{}", load_line(&*backend, &report));
    Ok((backend, full))
}

#[allow(clippy::too_many_arguments)]
fn bench_cmd(
    model: Option<&Path>,
    config: Option<&Path>,
    layers: Option<usize>,
    device: DeviceSpec,
    opts: hadal::bench::Options,
    json: bool,
) -> anyhow::Result<()> {
    if opts.batches.contains(&0) || opts.decode_tokens == 0 {
        bail!("--batch and --decode-tokens must be positive");
    }
    let (backend, full) = load_source(
        model,
        config,
        layers,
        opts.seed,
        device,
        Numerics::BatchInvariant,
    )?;
    let b = bar("bench {bar:30} {pos}/{len} steps");
    let report = hadal::bench::run(&*backend, &full, &opts, &|done, total| {
        b.set_length(total);
        b.set_position(done);
    })?;
    b.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

fn state_io_cmd(
    model: Option<&Path>,
    config: Option<&Path>,
    contexts: &[usize],
    dir: Option<PathBuf>,
    seed: u64,
    json: bool,
) -> anyhow::Result<()> {
    let path = match (model, config) {
        (Some(m), _) => Checkpoint::config_path(m),
        (None, Some(c)) => c.to_path_buf(),
        (None, None) => bail!("--model or --config is needed"),
    };
    let cfg = Config::from_file(&path)?;
    let dir = dir.unwrap_or_else(std::env::temp_dir);
    let rows = hadal::bench::state_io(&cfg, contexts, &dir, seed)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", hadal::bench::render_state_io(&rows, &dir));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn score_cmd(
    model: Option<&Path>,
    config: Option<&Path>,
    layers: Option<usize>,
    seed: u64,
    tokens: Option<&Path>,
    out: Option<&Path>,
    prefill: Option<usize>,
    mtp: bool,
    text: Option<&Path>,
    numerics: Numerics,
    device: DeviceSpec,
) -> anyhow::Result<()> {
    if let Some(out) = out {
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            bail!(
                "--out {}: directory {} does not exist",
                out.display(),
                dir.display()
            );
        }
    }
    let seqs = match (tokens, text) {
        (Some(t), _) => score::read_tokens(t)?,
        (None, Some(t)) => {
            let Some(model) = model else {
                bail!("--text needs --model (its tokenizer)");
            };
            let tok = Tokenizer::for_model(model)?;
            let body = std::fs::read_to_string(t).with_context(|| t.display().to_string())?;
            vec![tok.encode(&body)?]
        }
        (None, None) => bail!("give --tokens FILE or --text FILE"),
    };
    let n = seqs[0].len();
    let p = prefill.unwrap_or(n);
    if p == 0 || p > n {
        bail!("--prefill {p} must be between 1 and the sequence length {n}");
    }
    if mtp && p < 2 {
        bail!("--mtp needs --prefill of at least 2");
    }
    let backend: Box<dyn Backend> = match (device, model) {
        (DeviceSpec::Cpu, Some(model)) if layers.is_none() => {
            Box::new(Runner::load(Cpu { numerics }, model, &|_, _| {})?)
        }
        _ => load_source(model, config, layers, seed, device, numerics)?.0,
    };
    let backend = &*backend;
    if text.is_some() {
        let ppl = score::perplexity(backend, &seqs[0])?;
        println!("{n} tokens, perplexity {ppl:.4}");
        return Ok(());
    }
    let s = score::score(backend, &seqs, &[p], mtp)?;
    let out = out.context("--out is required with --tokens")?;
    score::write_scores(out, &s)?;
    println!(
        "scored {} x {} tokens (prefill {p}, then {} decode steps) -> {}",
        s.batch,
        s.len,
        n - p,
        out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let experts_on = cli.experts_on;
    if let Some(d) = cli.device_mut() {
        *d = d.with_experts(experts_on);
    }
    let r = match &cli.cmd {
        Cmd::Inspect {
            model,
            config,
            context,
            json,
        } => inspect(model.as_deref(), config.as_deref(), *context, *json),
        Cmd::Score {
            model,
            config,
            layers,
            seed,
            tokens,
            out,
            prefill,
            mtp,
            text,
            numerics,
            device,
        } => score_cmd(
            model.as_deref(),
            config.as_deref(),
            *layers,
            *seed,
            tokens.as_deref(),
            out.as_deref(),
            *prefill,
            *mtp,
            text.as_deref(),
            (*numerics).into(),
            *device,
        ),
        Cmd::Render {
            request,
            thinking_mode,
            reasoning_effort,
            keep_thinking,
            ids,
            tokenizer,
        } => render(
            request,
            *thinking_mode,
            *reasoning_effort,
            *keep_thinking,
            *ids,
            tokenizer.as_deref(),
        ),
        Cmd::Parse { thinking_mode } => parse_cmd(*thinking_mode),
        Cmd::State {
            cmd: StateCmd::Inspect { file, model, json },
        } => state_inspect(file, model.as_deref(), *json),
        Cmd::Bench {
            model,
            config,
            context,
            seed,
            state_io: true,
            state_dir,
            json,
            ..
        } => state_io_cmd(
            model.as_deref(),
            config.as_deref(),
            context,
            state_dir.clone(),
            *seed,
            *json,
        ),
        Cmd::Bench {
            model,
            config,
            layers,
            device,
            context,
            batch,
            decode_tokens,
            prefill,
            prefill_chunk,
            seed,
            json,
            ..
        } => bench_cmd(
            model.as_deref(),
            config.as_deref(),
            *layers,
            *device,
            hadal::bench::Options {
                contexts: context.clone(),
                batches: batch.clone(),
                decode_tokens: *decode_tokens,
                prefill_tokens: prefill.unwrap_or(0),
                prefill_chunk: *prefill_chunk,
                seed: *seed,
            },
            *json,
        ),
        Cmd::Serve {
            model,
            host,
            port,
            api_key,
            served_model_name,
            max_body_bytes,
            max_running,
            max_batch_tokens,
            max_queue,
            prefix_cache,
            state_dir,
            state_dir_bytes,
            default_max_tokens,
            device,
        } => serve_cmd(
            model,
            host,
            *port,
            api_key.clone(),
            served_model_name.clone(),
            *max_body_bytes,
            hadal::server::engine::EngineOptions {
                max_running: *max_running,
                max_batch_tokens: *max_batch_tokens,
                max_queue: *max_queue,
                cache_entries: *prefix_cache,
                disk: state_dir
                    .clone()
                    .map(|dir| hadal::server::disk::DiskOptions {
                        dir,
                        max_bytes: *state_dir_bytes,
                    }),
            },
            *default_max_tokens,
            *device,
        ),
        Cmd::Chat {
            model,
            thinking_mode,
            speculative,
            sampling,
            device,
            resume,
            sessions,
        } => chat(
            model,
            *thinking_mode,
            *speculative,
            sampling,
            *device,
            resume.as_deref(),
            sessions.clone(),
        ),
        Cmd::Demo {
            max_tokens,
            seed,
            prompt,
            out,
            device,
        } => demo(*max_tokens, *seed, prompt, out.as_deref(), *device),
        Cmd::Generate {
            model,
            prompt,
            request,
            thinking_mode,
            speculative,
            sampling,
            device,
        } => generate_cmd(
            model,
            prompt.as_deref(),
            request.as_deref(),
            *thinking_mode,
            *speculative,
            sampling,
            *device,
        ),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hadal: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
