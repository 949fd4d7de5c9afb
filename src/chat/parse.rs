//! Completions back to messages: `{content, reasoning_content, tool_calls}`.
//!
//! [`parse_strict`] accepts exactly what the official parser accepts. [`parse`] never fails:
//! malformed output comes back as content with the problem reported. [`StreamParser`] does the
//! same incrementally, holding back any suffix that could start a special token or markup so
//! that none ever leaks into a delta.

use serde::Serialize;

use super::json::quote;
use super::tokens::*;
use super::ThinkingMode;

/// A tool call in OpenAI form (`arguments` is JSON text).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    /// Function name.
    pub name: String,
    /// JSON object text of the arguments.
    pub arguments: String,
}

/// A parsed assistant message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Parsed {
    /// The answer.
    pub content: String,
    /// The reasoning (thinking mode).
    pub reasoning_content: String,
    /// Tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// Why the output did not follow the format, when it did not (the text is then `content`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Parsed {
    /// The message in OpenAI form, ready to re-encode (`role: assistant`).
    pub fn to_message(&self) -> super::Message {
        let calls: Vec<serde_json::Value> = self
            .tool_calls
            .iter()
            .map(|c| serde_json::json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        let v = serde_json::json!({
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning_content,
            "tool_calls": calls,
        });
        match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("built as an object"),
        }
    }
}

fn tools_start() -> String {
    format!("\n\n<{DSML}tool_calls")
}

/// Reads from `i` to the first of `stops`; returns (index after the stop, text before, stop).
fn read_until<'a>(text: &str, i: usize, stops: &[&'a str]) -> (usize, String, Option<&'a str>) {
    let hit = stops
        .iter()
        .filter_map(|s| text[i..].find(s).map(|p| (i + p, *s)))
        .min_by_key(|&(p, _)| p);
    match hit {
        Some((p, s)) => (p + s.len(), text[i..p].to_string(), Some(s)),
        None => (text.len(), text[i..].to_string(), None),
    }
}

/// Python's `re` `$`: the end, or just before a final newline.
fn strip_end<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    s.strip_suffix(suffix)
        .or_else(|| s.strip_suffix('\n').and_then(|t| t.strip_suffix(suffix)))
}

/// `{"k": v, ...}` from DSML parameters, as `decode_dsml_to_arguments`.
fn arguments_json(params: &[(String, String, bool)]) -> String {
    let parts: Vec<String> = params
        .iter()
        .map(|(k, v, is_str)| {
            let mut s = String::new();
            quote(&mut s, k);
            s.push_str(": ");
            if *is_str {
                quote(&mut s, v);
            } else {
                s.push_str(v);
            }
            s
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Parses the DSML block after `\n\n<｜DSML｜tool_calls`; returns the calls and where the block
/// ends.
fn parse_tool_calls(text: &str, mut i: usize) -> Result<(usize, Vec<ToolCall>), String> {
    let invoke = format!("<{DSML}invoke");
    let end = format!("</{DSML}tool_calls>");
    let param = format!("<{DSML}parameter");
    let param_end = format!("/{DSML}parameter");
    let invoke_end = format!("</{DSML}invoke");
    let mut calls = Vec::new();
    while i < text.len() {
        let (j, skipped, stop) = read_until(text, i, &[&invoke, &end]);
        i = j;
        if skipped != ">\n" {
            return Err(format!(
                "tool calls: expected '>\\n' before {}, found {skipped:?}",
                stop.unwrap_or("the end")
            ));
        }
        match stop {
            Some(s) if s == end => return Ok((i, calls)),
            None => return Err("tool calls: the block is not closed".into()),
            _ => {}
        }
        let (j, head, mut stop) = read_until(text, i, &[&param, &invoke_end]);
        i = j;
        let name = strip_end(head.trim_start(), "\">\n")
            .and_then(|h| h.strip_prefix("name=\""))
            .ok_or_else(|| format!("tool calls: bad invoke header {head:?}"))?
            .to_string();
        let mut params: Vec<(String, String, bool)> = Vec::new();
        while stop == Some(param.as_str()) {
            let (j, body, _) = read_until(text, i, &[&param_end]);
            i = j;
            let bad = || format!("tool calls: bad parameter {body:?}");
            let rest = body.strip_prefix(" name=\"").ok_or_else(bad)?;
            let (k, is_str, value) = ["true", "false"]
                .iter()
                .filter_map(|flag| {
                    let marker = format!("\" string=\"{flag}\">");
                    rest.find(&marker).map(|p| (p, *flag, marker.len()))
                })
                .min_by_key(|x| x.0)
                .and_then(|(p, flag, n)| {
                    strip_end(&rest[p + n..], "<").map(|v| (&rest[..p], flag == "true", v))
                })
                .ok_or_else(bad)?;
            if params.iter().any(|(n, _, _)| n == k) {
                return Err(format!("tool calls: duplicate parameter {k:?}"));
            }
            params.push((k.to_string(), value.to_string(), is_str));
            let (j, between, s) = read_until(text, i, &[&param, &invoke_end]);
            i = j;
            stop = s;
            if between != ">\n" {
                return Err(format!(
                    "tool calls: expected '>\\n' after a parameter, found {between:?}"
                ));
            }
        }
        calls.push(ToolCall {
            name,
            arguments: arguments_json(&params),
        });
    }
    Ok((i, calls))
}

/// Parses a completion (ending with the EOS token) exactly as the official parser, which
/// rejects anything malformed.
pub fn parse_strict(text: &str, mode: ThinkingMode) -> Result<Parsed, String> {
    let start = tools_start();
    let mut out = Parsed::default();
    let mut i = 0;
    if mode == ThinkingMode::Thinking {
        let (j, r, stop) = read_until(text, i, &[THINK_END, &start]);
        if stop != Some(THINK_END) {
            return Err("missing </think>".into());
        }
        i = j;
        out.reasoning_content = r;
    }
    let (j, c, stop) = read_until(text, i, &[EOS, &start]);
    i = j;
    out.content = c;
    let mut last = stop;
    if stop == Some(start.as_str()) {
        let (j, calls) = parse_tool_calls(text, i)?;
        out.tool_calls = calls;
        let (j, tail, stop) = read_until(text, j, &[EOS]);
        if !tail.is_empty() {
            return Err(format!("unexpected text after the tool calls: {tail:?}"));
        }
        i = j;
        last = stop;
    } else if stop != Some(EOS) {
        return Err("missing end-of-sentence token".into());
    }
    if i != text.len() || !matches!(last, Some(EOS) | None) {
        return Err("unexpected text after the end-of-sentence token".into());
    }
    for tok in [BOS, EOS, THINK_START, THINK_END, DSML] {
        if out.content.contains(tok) || out.reasoning_content.contains(tok) {
            return Err(format!("special token {tok} inside the message"));
        }
    }
    Ok(out)
}

/// Parses a completion; never fails. Output that breaks the format comes back whole as
/// `content` (without a final EOS token), with `error` saying why.
pub fn parse(text: &str, mode: ThinkingMode) -> Parsed {
    match parse_strict(text, mode) {
        Ok(p) => p,
        Err(e) => Parsed {
            content: text.strip_suffix(EOS).unwrap_or(text).to_string(),
            error: Some(e),
            ..Parsed::default()
        },
    }
}

/// An increment of a streamed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// More reasoning.
    Reasoning(String),
    /// More answer.
    Content(String),
    /// A complete tool call (the `index`-th of the message).
    ToolCall {
        /// Position among the message's calls.
        index: usize,
        /// The call.
        call: ToolCall,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Reasoning,
    Content,
    ToolCalls,
    Done,
}

/// Incremental parser: feed decoded text as tokens arrive, get deltas that never contain a
/// partial special token or markup.
pub struct StreamParser {
    phase: Phase,
    buf: String,
    calls: usize,
    /// The first format problem seen, if any.
    pub error: Option<String>,
}

/// Length of the longest suffix of `s` that is a proper prefix of one of `markers`.
fn held_back(s: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for m in markers {
        for (k, _) in m.char_indices().skip(1) {
            if k > best && s.ends_with(&m[..k]) {
                best = k;
            }
        }
    }
    best
}

impl StreamParser {
    /// A parser for one assistant turn in `mode`.
    pub fn new(mode: ThinkingMode) -> Self {
        StreamParser {
            phase: if mode == ThinkingMode::Thinking {
                Phase::Reasoning
            } else {
                Phase::Content
            },
            buf: String::new(),
            calls: 0,
            error: None,
        }
    }

    fn note(&mut self, e: String) {
        self.error.get_or_insert(e);
    }

    fn emit(&self, out: &mut Vec<Delta>, text: String) {
        if text.is_empty() {
            return;
        }
        out.push(match self.phase {
            Phase::Reasoning => Delta::Reasoning(text),
            _ => Delta::Content(text),
        });
    }

    /// Emits the calls of a DSML block (the text after its opening marker), or the block as
    /// content when it is malformed.
    fn tool_calls(&mut self, block: &str, out: &mut Vec<Delta>) {
        match parse_tool_calls(block, 0) {
            Ok((_, calls)) => {
                for call in calls {
                    out.push(Delta::ToolCall {
                        index: self.calls,
                        call,
                    });
                    self.calls += 1;
                }
            }
            Err(e) => {
                self.note(e);
                out.push(Delta::Content(format!("{}{block}", tools_start())));
            }
        }
    }

    /// Feeds decoded text.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        let start = tools_start();
        let block_end = format!("</{DSML}tool_calls>");
        loop {
            match self.phase {
                Phase::Reasoning | Phase::Content => {
                    let stops: &[&str] = if self.phase == Phase::Reasoning {
                        &[THINK_END, &start, EOS]
                    } else {
                        &[EOS, &start]
                    };
                    let (j, before, stop) = read_until(&self.buf, 0, stops);
                    match stop {
                        None => {
                            let keep = held_back(&self.buf, stops);
                            let cut = self.buf.len() - keep;
                            let text: String = self.buf.drain(..cut).collect();
                            self.emit(&mut out, text);
                            return out;
                        }
                        Some(s) => {
                            self.emit(&mut out, before);
                            self.buf.drain(..j);
                            self.phase = if s == THINK_END {
                                Phase::Content
                            } else if s == EOS {
                                if self.phase == Phase::Reasoning {
                                    self.note("missing </think>".into());
                                }
                                Phase::Done
                            } else {
                                if self.phase == Phase::Reasoning {
                                    self.note(
                                        "tool calls inside the reasoning (missing </think>)".into(),
                                    );
                                }
                                Phase::ToolCalls
                            };
                        }
                    }
                }
                Phase::ToolCalls => {
                    let Some(p) = self.buf.find(&block_end) else {
                        return out;
                    };
                    let block: String = self.buf.drain(..p + block_end.len()).collect();
                    self.tool_calls(&block, &mut out);
                    self.phase = Phase::Done;
                }
                Phase::Done => {
                    if self.buf.starts_with(EOS) {
                        self.buf.drain(..EOS.len());
                    }
                    if !self.buf.is_empty() && !EOS.starts_with(self.buf.as_str()) {
                        let rest = std::mem::take(&mut self.buf);
                        self.note(format!("unexpected text after the message: {rest:?}"));
                    }
                    return out;
                }
            }
        }
    }

    /// Ends the stream (EOS, a stop string or the length limit), flushing what was held back.
    pub fn finish(&mut self) -> Vec<Delta> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = Vec::new();
        match self.phase {
            // The official parser takes an unclosed block at the end of the text as it stands.
            Phase::ToolCalls => self.tool_calls(&rest, &mut out),
            Phase::Done => {}
            _ => self.emit(&mut out, rest),
        }
        self.phase = Phase::Done;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CALL: &str = "Let me look.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"location\" string=\"true\">Beijing</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>";

    #[test]
    fn tool_calls_parse_to_openai_arguments() {
        let p = parse_strict(CALL, ThinkingMode::Thinking).unwrap();
        assert_eq!(p.reasoning_content, "Let me look.");
        assert_eq!(p.content, "");
        assert_eq!(p.tool_calls[0].name, "get_weather");
        assert_eq!(
            p.tool_calls[0].arguments,
            r#"{"location": "Beijing", "days": 3}"#
        );
    }

    #[test]
    fn malformed_output_becomes_content() {
        let p = parse("half an answer", ThinkingMode::Chat);
        assert_eq!(p.content, "half an answer");
        assert!(p.error.is_some());
        let p = parse("x</think>y<｜end▁of▁sentence｜>", ThinkingMode::Chat);
        assert!(p.error.unwrap().contains("</think>"));
    }

    fn stream(text: &str, mode: ThinkingMode, step: usize) -> (Parsed, Vec<Delta>) {
        let mut sp = StreamParser::new(mode);
        let mut deltas = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(step.max(1)) {
            deltas.extend(sp.push(&piece.iter().collect::<String>()));
        }
        deltas.extend(sp.finish());
        let mut p = Parsed::default();
        for d in &deltas {
            match d {
                Delta::Reasoning(s) => p.reasoning_content.push_str(s),
                Delta::Content(s) => p.content.push_str(s),
                Delta::ToolCall { call, .. } => p.tool_calls.push(call.clone()),
            }
        }
        p.error = sp.error;
        (p, deltas)
    }

    #[test]
    fn streaming_matches_whole_parse_at_any_split() {
        for step in [1, 2, 3, 7, 1000] {
            let (p, deltas) = stream(CALL, ThinkingMode::Thinking, step);
            assert_eq!(
                p,
                parse_strict(CALL, ThinkingMode::Thinking).unwrap(),
                "step {step}"
            );
            for d in deltas {
                if let Delta::Reasoning(s) | Delta::Content(s) = d {
                    assert!(!s.contains('<') && !s.contains('｜'), "leaked {s:?}");
                }
            }
        }
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_markup() {
        let mut sp = StreamParser::new(ThinkingMode::Chat);
        assert!(sp
            .push("a\n\n")
            .iter()
            .all(|d| d == &Delta::Content("a".into())));
        assert_eq!(sp.push("b"), vec![Delta::Content("\n\nb".into())]);
        assert_eq!(sp.push("<｜end▁of"), vec![]);
        assert_eq!(sp.push("▁sentence｜>"), vec![]);
        assert!(sp.finish().is_empty());
        assert!(sp.error.is_none());
    }

    fn fragments() -> impl Strategy<Value = String> {
        let parts = prop_oneof![
            Just("</think>".to_string()),
            Just("<think>".to_string()),
            Just("\n\n<｜DSML｜tool_calls".to_string()),
            Just(">\n".to_string()),
            Just("<｜DSML｜invoke name=\"f\"".to_string()),
            Just("<｜DSML｜parameter name=\"a\" string=\"true\">".to_string()),
            Just("</｜DSML｜parameter".to_string()),
            Just("</｜DSML｜invoke".to_string()),
            Just("</｜DSML｜tool_calls>".to_string()),
            Just("<｜end▁of▁sentence｜>".to_string()),
            Just("｜".to_string()),
            "[a-z<>\"\n ]{0,4}",
        ];
        proptest::collection::vec(parts, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in fragments(), step in 1usize..5, think in proptest::bool::ANY) {
            let mode = if think { ThinkingMode::Thinking } else { ThinkingMode::Chat };
            let p = parse(&text, mode);
            if p.error.is_some() {
                prop_assert_eq!(p.content.as_str(), text.strip_suffix(EOS).unwrap_or(&text));
            }
            let (s, _) = stream(&text, mode, step);
            // Streaming agrees with the whole-text parse on well-formed output.
            if let Ok(strict) = parse_strict(&text, mode) {
                prop_assert_eq!(s, strict);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,64}", step in 1usize..4) {
            let _ = parse(&text, ThinkingMode::Thinking);
            let _ = stream(&text, ThinkingMode::Chat, step);
        }
    }
}
