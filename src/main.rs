//! The `hadal` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use std::io::{Read, Write};

use hadal::backend::cpu::CpuBackend;
use hadal::chat::parse::parse;
use hadal::chat::request::conversation;
use hadal::chat::{encode, Effort, Options, ThinkingMode};
use hadal::checkpoint::Checkpoint;
use hadal::config::Config;
use hadal::inspect::{bytes, Plan};
use hadal::model::Model;
use hadal::score;
use hadal::tokenizer::Tokenizer;

#[derive(Parser)]
#[command(
    name = "hadal",
    version,
    about = "Inference engine for the DeepSeek V4 family"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
        #[arg(long)]
        model: PathBuf,
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
    /// Parse a completion (standard input) into an assistant message, printed as JSON.
    Parse {
        /// How the completion was generated.
        #[arg(long, value_enum)]
        thinking_mode: Mode,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Mode {
    Chat,
    Thinking,
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
        .map(|dir| Model::load(dir).map(|m| m.checkpoint_bytes))
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

#[allow(clippy::too_many_arguments)]
fn score_cmd(
    model: &Path,
    tokens: Option<&Path>,
    out: Option<&Path>,
    prefill: Option<usize>,
    mtp: bool,
    text: Option<&Path>,
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
    let backend = CpuBackend {
        model: Model::load(model)?,
    };
    if text.is_some() {
        let ppl = score::perplexity(&backend, &seqs[0])?;
        println!("{n} tokens, perplexity {ppl:.4}");
        return Ok(());
    }
    let s = score::score(&backend, &seqs, &[p], mtp)?;
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
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Inspect {
            model,
            config,
            context,
            json,
        } => inspect(model.as_deref(), config.as_deref(), *context, *json),
        Cmd::Score {
            model,
            tokens,
            out,
            prefill,
            mtp,
            text,
        } => score_cmd(
            model,
            tokens.as_deref(),
            out.as_deref(),
            *prefill,
            *mtp,
            text.as_deref(),
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
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hadal: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
