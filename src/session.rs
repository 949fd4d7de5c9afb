//! A chat conversation that keeps its decode state between turns.
//!
//! Each turn feeds only what the conversation adds after the tokens the state already holds:
//! the rendering is prefix-stable as long as earlier reasoning is kept in context (the encoder's
//! `drop_thinking = false`), so a long conversation is prefilled once. When the rendering does
//! change (thinking mode or effort switched), the turn starts over with a fresh prefill.

use std::path::Path;

use serde_json::json;

use crate::backend::{Backend, Seq};
use crate::chat::parse::{Delta, Parsed, StreamParser};
use crate::chat::{encode, Effort, Message, Options, ThinkingMode};
use crate::error::{Error, Result};
use crate::generate::{
    generate, generate_speculative, Completion, Finish, Prefill, SamplingParams,
};
use crate::tokenizer::Tokenizer;

/// One conversation.
pub struct ChatSession {
    /// The messages so far.
    pub messages: Vec<Message>,
    /// Chat or thinking.
    pub mode: ThinkingMode,
    /// Reasoning effort.
    pub effort: Option<Effort>,
    state: Seq,
    /// The tokens the state holds.
    tokens: Vec<u32>,
    /// Text of the tokens the state holds followed by `unfed`.
    held: String,
    /// Generated tokens the state has not consumed yet.
    unfed: Vec<u32>,
}

/// How a turn generates.
#[derive(Clone, Copy)]
pub struct TurnOptions<'a> {
    /// Sampling and stopping.
    pub params: &'a SamplingParams,
    /// Draft with MTP and verify.
    pub speculative: bool,
    /// How the new part of the conversation is fed.
    pub prefill: Prefill<'a>,
}

/// What a turn did.
pub struct Turn {
    /// The completion.
    pub completion: Completion,
    /// The assistant message as streamed (with `error` set when the output broke the format).
    pub parsed: Parsed,
    /// Tokens prefilled for this turn (only the new part of the conversation).
    pub prefilled: usize,
    /// Whether the turn had to prefill the whole conversation again.
    pub restarted: bool,
}

impl ChatSession {
    /// An empty conversation.
    pub fn new(backend: &dyn Backend, mode: ThinkingMode) -> Result<Self> {
        Ok(ChatSession {
            messages: Vec::new(),
            mode,
            effort: None,
            state: backend.new_state()?,
            tokens: Vec::new(),
            held: String::new(),
            unfed: Vec::new(),
        })
    }

    /// Forgets the conversation.
    pub fn clear(&mut self, backend: &dyn Backend) -> Result<()> {
        *self = Self::new(backend, self.mode)?;
        Ok(())
    }

    /// The text of every token fed or generated so far.
    pub fn transcript(&self) -> &str {
        &self.held
    }

    /// Tokens of context the state holds.
    pub fn context_tokens(&self) -> usize {
        self.state.pos()
    }

    /// Bytes of decode state held.
    pub fn state_bytes(&self) -> usize {
        self.state.bytes()
    }

    /// Runs one user turn, passing deltas to `on_delta` (false cancels the answer).
    pub fn turn(
        &mut self,
        backend: &dyn Backend,
        tok: &Tokenizer,
        user: &str,
        opts: TurnOptions,
        mut on_delta: impl FnMut(Delta) -> bool,
    ) -> Result<Turn> {
        let mut msgs = self.messages.clone();
        let mut m = Message::new();
        m.insert("role".into(), "user".into());
        m.insert("content".into(), user.into());
        msgs.push(m);
        let (params, prefill) = (opts.params, opts.prefill);
        let opts_enc = Options {
            mode: self.mode,
            effort: self.effort,
            drop_thinking: false,
            add_bos: true,
        };
        let text = encode(&msgs, &opts_enc).map_err(|e| Error::Input(e.to_string()))?;
        let restarted = self.held.is_empty() || !text.starts_with(&self.held);
        let feed = if restarted {
            self.state = backend.new_state()?;
            self.tokens.clear();
            tok.encode(&text)?
        } else {
            let mut f = std::mem::take(&mut self.unfed);
            f.extend(tok.encode(&text[self.held.len()..])?);
            f
        };
        let before = self.state.pos();
        let mut sp = StreamParser::new(self.mode);
        // The message as streamed: what the user saw, and what the history keeps.
        let mut msg = Parsed::default();
        let mut keep = |d: &Delta| match d {
            Delta::Reasoning(t) => msg.reasoning_content.push_str(t),
            Delta::Content(t) => msg.content.push_str(t),
            Delta::ToolCall { call, .. } => msg.tool_calls.push(call.clone()),
        };
        let mut go_on = true;
        let on_text = |t: &str| {
            for d in sp.push(t) {
                keep(&d);
                go_on &= on_delta(d);
            }
            go_on
        };
        let c = if opts.speculative {
            generate_speculative(
                backend,
                tok,
                &mut self.state,
                &feed,
                params,
                prefill,
                on_text,
            )?
        } else {
            generate(
                backend,
                tok,
                &mut self.state,
                &feed,
                params,
                prefill,
                on_text,
            )?
        };
        for d in sp.finish() {
            keep(&d);
            if c.finish != Finish::Cancelled {
                on_delta(d);
            }
        }
        msg.error = sp.error.take();
        let generated = tok.decode(&c.tokens)?;
        let fed = self.state.pos() - before;
        self.tokens
            .extend(feed.iter().chain(&c.tokens).take(fed).copied());
        let consumed = fed.saturating_sub(feed.len());
        self.unfed = c.tokens[consumed.min(c.tokens.len())..].to_vec();
        self.held = format!("{text}{generated}");
        self.messages = msgs;
        self.messages.push(msg.to_message());
        Ok(Turn {
            prefilled: feed.len(),
            completion: c,
            parsed: msg,
            restarted,
        })
    }

    /// Saves the conversation (messages, mode, effort, and the decode state with the tokens
    /// it holds) to `path`, atomically; returns the file's size.
    pub fn save(&self, backend: &dyn Backend, path: &Path) -> Result<u64> {
        let extra = json!({"chat": {
            "messages": self.messages,
            "mode": match self.mode {
                ThinkingMode::Chat => "chat",
                ThinkingMode::Thinking => "thinking",
            },
            "effort": self.effort.map(|e| match e {
                Effort::High => "high",
                Effort::Max => "max",
            }),
            "held": self.held,
            "unfed": self.unfed,
        }});
        let exported;
        let state = match &self.state {
            Seq::Host(s) => s,
            other => {
                exported = backend.export_state(other)?;
                &exported
            }
        };
        crate::state::file::write(
            path,
            &crate::state::file::Saved {
                model: backend.fingerprint(),
                tokens: &self.tokens,
                state,
                prompt: None,
                extra,
            },
        )
    }

    /// A conversation saved by [`ChatSession::save`]; a file of another model, or damaged, is
    /// refused.
    pub fn load(backend: &dyn Backend, path: &Path) -> Result<Self> {
        let f = crate::state::file::read(path, Some(&backend.fingerprint()))?;
        let bad = |what: &str| Error::State {
            path: path.to_path_buf(),
            reason: format!("not a saved chat ({what})"),
        };
        let c = f
            .header
            .extra
            .get("chat")
            .ok_or_else(|| bad("no conversation"))?;
        let messages: Vec<Message> =
            serde_json::from_value(c["messages"].clone()).map_err(|_| bad("messages"))?;
        let mode = match c["mode"].as_str() {
            Some("chat") => ThinkingMode::Chat,
            Some("thinking") => ThinkingMode::Thinking,
            _ => return Err(bad("mode")),
        };
        let effort = match c["effort"].as_str() {
            None => None,
            Some("high") => Some(Effort::High),
            Some("max") => Some(Effort::Max),
            Some(_) => return Err(bad("effort")),
        };
        let held = c["held"].as_str().ok_or_else(|| bad("text"))?.to_string();
        let unfed: Vec<u32> =
            serde_json::from_value(c["unfed"].clone()).map_err(|_| bad("pending tokens"))?;
        if f.tokens.len() != f.state.pos {
            return Err(bad("token count"));
        }
        Ok(ChatSession {
            messages,
            mode,
            effort,
            state: backend.import_state(&f.state)?,
            tokens: f.tokens,
            held,
            unfed,
        })
    }
}
