//! Chat messages to the V4 prompt, byte for byte as the official encoder (`encoding_dsv4.py`).
//!
//! Messages are JSON objects in OpenAI form (plus V4's `developer` and `latest_reminder` roles,
//! `reasoning_content`, `task`, `wo_eos`). Tool messages merge into user turns as `<tool_result>`
//! blocks sorted by the order of the calls; earlier reasoning is dropped in thinking mode unless
//! tools are present; tasks append their special tokens.

use serde_json::{Map, Value};

use super::json::dumps;
use super::tokens::*;

/// A chat message: a JSON object.
pub type Message = Map<String, Value>;

/// Whether the model reasons before answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThinkingMode {
    /// `</think>` right after `<｜Assistant｜>`: answer directly.
    Chat,
    /// `<think>` after `<｜Assistant｜>`: reason first.
    Thinking,
}

/// How hard the model reasons (`max` prepends an instruction to the prompt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effort {
    /// The default.
    High,
    /// Absolute maximum.
    Max,
}

/// Encoding options.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Chat or thinking.
    pub mode: ThinkingMode,
    /// Drop reasoning of turns before the last user message (disabled when tools are present).
    pub drop_thinking: bool,
    /// Reasoning effort.
    pub effort: Option<Effort>,
    /// Start with the BOS token (when there is no context).
    pub add_bos: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: ThinkingMode::Thinking,
            drop_thinking: true,
            effort: None,
            add_bos: true,
        }
    }
}

/// A request the encoder cannot render.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(pub String);

type Result<T> = std::result::Result<T, EncodeError>;

const REASONING_EFFORT_MAX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

fn tools_block(tools: &[Value]) -> String {
    let schemas: Vec<String> = tools
        .iter()
        .map(|t| dumps(t.get("function").unwrap_or(t)))
        .collect();
    format!(
        "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<{DSML}tool_calls>\" block like the following:\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"$TOOL_NAME\">\n<{DSML}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{DSML}parameter>\n...\n</{DSML}invoke>\n<{DSML}invoke name=\"$TOOL_NAME2\">\n...\n</{DSML}invoke>\n</{DSML}tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\nOtherwise, output directly after {THINK_END} with tool calls or final response.\n\n### Available Tool Schemas\n\n{}\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n",
        schemas.join("\n")
    )
}

fn response_format_block(rf: &Value) -> String {
    format!(
        "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{}",
        dumps(rf)
    )
}

/// The tools and response-format sections a system or developer message carries.
fn push_schemas(prompt: &mut String, tools: Option<&Vec<Value>>, rf: Option<&Value>) {
    if let Some(t) = tools {
        prompt.push_str("\n\n");
        prompt.push_str(&tools_block(t));
    }
    if let Some(rf) = rf {
        prompt.push_str("\n\n");
        prompt.push_str(&response_format_block(rf));
    }
}

/// Python truthiness of an optional JSON value.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
    }
}

/// Message text: strings as is; OpenAI content parts joined by newlines; nothing for null.
pub fn text_of(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.clone(),
                p => p
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => dumps(other),
    }
}

fn role(m: &Message) -> Option<&str> {
    m.get("role").and_then(Value::as_str)
}

fn last_user_index(messages: &[Message]) -> Option<usize> {
    messages
        .iter()
        .rposition(|m| matches!(role(m), Some("user" | "developer")))
}

/// Tool-call arguments (a JSON object text) as DSML parameters.
pub fn arguments_to_dsml(arguments: &str) -> String {
    let parsed: Option<Map<String, Value>> = serde_json::from_str(arguments).ok();
    let args = parsed.unwrap_or_else(|| {
        let mut m = Map::new();
        m.insert("arguments".into(), Value::String(arguments.to_string()));
        m
    });
    args.iter()
        .map(|(k, v)| {
            let (is_str, value) = match v {
                Value::String(s) => ("true", s.clone()),
                v => ("false", dumps(v)),
            };
            format!("<{DSML}parameter name=\"{k}\" string=\"{is_str}\">{value}</{DSML}parameter>")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `\n\n<｜DSML｜tool_calls>...` block of OpenAI tool calls (empty when there are none).
pub fn tool_calls_block(calls: &[Value]) -> String {
    if calls.is_empty() {
        return String::new();
    }
    let invokes: Vec<String> = calls
        .iter()
        .map(|tc| {
            let f = tc.get("function").unwrap_or(tc);
            let name = f.get("name").and_then(Value::as_str).unwrap_or("None");
            let args = match f.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(v) => dumps(v),
                None => "{}".to_string(),
            };
            format!(
                "<{DSML}invoke name=\"{name}\">\n{}\n</{DSML}invoke>",
                arguments_to_dsml(&args)
            )
        })
        .collect();
    format!(
        "\n\n<{DSML}tool_calls>\n{}\n</{DSML}tool_calls>",
        invokes.join("\n")
    )
}

fn render(index: usize, messages: &[Message], o: &Options, drop_thinking: bool) -> Result<String> {
    let mut prompt = String::new();
    let msg = &messages[index];
    let last_user = last_user_index(messages);
    let thinking = o.mode == ThinkingMode::Thinking;
    let tools = msg
        .get("tools")
        .filter(|t| truthy(Some(t)))
        .and_then(Value::as_array);
    let rf = msg.get("response_format").filter(|v| truthy(Some(v)));

    if index == 0 && thinking && o.effort == Some(Effort::Max) {
        prompt.push_str(REASONING_EFFORT_MAX);
    }
    match role(msg) {
        Some("system") => {
            prompt.push_str(&text_of(msg.get("content")));
            push_schemas(&mut prompt, tools, rf);
        }
        Some("developer") => {
            if !truthy(msg.get("content")) {
                return Err(EncodeError(format!(
                    "message {index}: a developer message needs content"
                )));
            }
            prompt.push_str(USER);
            prompt.push_str(&text_of(msg.get("content")));
            push_schemas(&mut prompt, tools, rf);
        }
        Some("user") => {
            prompt.push_str(USER);
            match msg
                .get("content_blocks")
                .and_then(Value::as_array)
                .filter(|b| !b.is_empty())
            {
                Some(blocks) => {
                    let parts: Vec<String> = blocks
                        .iter()
                        .map(|b| match b.get("type").and_then(Value::as_str) {
                            Some("text") => text_of(b.get("text")),
                            Some("tool_result") => format!(
                                "<tool_result>{}</tool_result>",
                                tool_result_text(b.get("content"))
                            ),
                            other => format!("[Unsupported {}]", other.unwrap_or("None")),
                        })
                        .collect();
                    prompt.push_str(&parts.join("\n\n"));
                }
                None => prompt.push_str(&text_of(msg.get("content"))),
            }
        }
        Some("latest_reminder") => {
            prompt.push_str(LATEST_REMINDER);
            prompt.push_str(&text_of(msg.get("content")));
        }
        Some("assistant") => {
            let calls = msg
                .get("tool_calls")
                .and_then(Value::as_array)
                .map_or(&[][..], |v| &v[..]);
            let prev_has_task = index > 0
                && messages[index - 1]
                    .get("task")
                    .is_some_and(|t| !t.is_null());
            if thinking && !prev_has_task && (!drop_thinking || last_user.is_none_or(|u| index > u))
            {
                prompt.push_str(&text_of(msg.get("reasoning_content")));
                prompt.push_str(THINK_END);
            }
            prompt.push_str(&text_of(msg.get("content")));
            prompt.push_str(&tool_calls_block(calls));
            if !msg.get("wo_eos").is_some_and(|v| truthy(Some(v))) {
                prompt.push_str(EOS);
            }
        }
        Some("tool") => {
            return Err(EncodeError(format!(
                "message {index}: tool messages must follow an assistant message with tool calls"
            )))
        }
        Some(other) => {
            return Err(EncodeError(format!(
                "message {index}: unknown role {other:?}"
            )))
        }
        None => return Err(EncodeError(format!("message {index}: missing role"))),
    }

    if let Some(next) = messages.get(index + 1) {
        if !matches!(role(next), Some("assistant" | "latest_reminder")) {
            return Ok(prompt);
        }
    }
    match msg.get("task").filter(|t| !t.is_null()) {
        Some(task) => {
            let task = task.as_str().unwrap_or("");
            let token = task_token(task).ok_or_else(|| {
                EncodeError(format!(
                    "message {index}: unknown task {task:?} (expected one of action, query, authority, domain, title, read_url)"
                ))
            })?;
            if task == "action" {
                prompt.push_str(ASSISTANT);
                prompt.push_str(if thinking { THINK_START } else { THINK_END });
            }
            prompt.push_str(token);
        }
        None if matches!(role(msg), Some("user" | "developer")) => {
            prompt.push_str(ASSISTANT);
            let open = thinking && (!drop_thinking || last_user.is_some_and(|u| index >= u));
            prompt.push_str(if open { THINK_START } else { THINK_END });
        }
        None => {}
    }
    Ok(prompt)
}

fn tool_result_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => text_of(b.get("text")),
                other => format!("[Unsupported {}]", other.unwrap_or("None")),
            })
            .collect::<Vec<_>>()
            .join("\n\n"),
        v => text_of(v),
    }
}

/// Whether `m` is a user turn that further tool results and user text merge into.
fn open_user(m: Option<&Message>, allow_task: bool) -> bool {
    m.is_some_and(|p| {
        role(p) == Some("user")
            && p.get("content_blocks").is_some_and(Value::is_array)
            && (allow_task || p.get("task").is_none_or(Value::is_null))
    })
}

fn push_block(m: &mut Message, block: Value) {
    if let Some(Value::Array(blocks)) = m.get_mut("content_blocks") {
        blocks.push(block);
    }
}

/// Tool messages become `tool_result` blocks of user messages; consecutive user turns merge.
fn merge_tool_messages(messages: &[Message]) -> Vec<Message> {
    let mut merged: Vec<Message> = Vec::new();
    let empty = || Value::String(String::new());
    for msg in messages {
        match role(msg) {
            Some("tool") => {
                let block = serde_json::json!({
                    "type": "tool_result",
                    "tool_use_id": msg.get("tool_call_id").cloned().unwrap_or_else(empty),
                    "content": msg.get("content").cloned().unwrap_or_else(empty),
                });
                if open_user(merged.last(), true) {
                    push_block(merged.last_mut().expect("checked"), block);
                } else {
                    let mut m = Message::new();
                    m.insert("role".into(), "user".into());
                    m.insert("content_blocks".into(), Value::Array(vec![block]));
                    merged.push(m);
                }
            }
            Some("user") => {
                let content = msg.get("content").cloned().unwrap_or_else(empty);
                let text = serde_json::json!({"type": "text", "text": content});
                if open_user(merged.last(), false) {
                    push_block(merged.last_mut().expect("checked"), text);
                } else {
                    let mut m = Message::new();
                    m.insert("role".into(), "user".into());
                    m.insert("content".into(), content);
                    m.insert("content_blocks".into(), Value::Array(vec![text]));
                    for key in ["task", "wo_eos", "mask"] {
                        if let Some(v) = msg.get(key) {
                            m.insert(key.into(), v.clone());
                        }
                    }
                    merged.push(m);
                }
            }
            _ => merged.push(msg.clone()),
        }
    }
    merged
}

/// Orders each user turn's tool results as the preceding assistant ordered its calls.
fn sort_tool_results(mut messages: Vec<Message>) -> Vec<Message> {
    let mut order: std::collections::HashMap<String, usize> = Default::default();
    for msg in messages.iter_mut() {
        match role(msg) {
            Some("assistant") if truthy(msg.get("tool_calls")) => {
                order.clear();
                for (i, tc) in msg["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let id = tc
                        .get("id")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .or_else(|| {
                            tc.get("function")
                                .and_then(|f| f.get("id"))
                                .and_then(Value::as_str)
                        })
                        .unwrap_or("");
                    if !id.is_empty() {
                        order.insert(id.to_string(), i);
                    }
                }
            }
            Some("user") => {
                let Some(blocks) = msg.get_mut("content_blocks").and_then(Value::as_array_mut)
                else {
                    continue;
                };
                let is_tool =
                    |b: &Value| b.get("type").and_then(Value::as_str) == Some("tool_result");
                let mut results: Vec<Value> =
                    blocks.iter().filter(|b| is_tool(b)).cloned().collect();
                if results.len() > 1 && !order.is_empty() {
                    let key = |b: &Value| {
                        b.get("tool_use_id")
                            .and_then(Value::as_str)
                            .and_then(|id| order.get(id))
                            .copied()
                            .unwrap_or(0)
                    };
                    results.sort_by_key(key);
                    let mut it = results.into_iter();
                    for b in blocks.iter_mut() {
                        if is_tool(b) {
                            *b = it.next().expect("same count");
                        }
                    }
                }
            }
            _ => {}
        }
    }
    messages
}

/// Drops reasoning (and developer turns) before the last user message.
fn drop_thinking_messages(messages: &[Message]) -> Vec<Message> {
    let last = last_user_index(messages);
    let mut out = Vec::new();
    for (i, msg) in messages.iter().enumerate() {
        let keep = matches!(
            role(msg),
            Some("user" | "system" | "tool" | "latest_reminder" | "direct_search_results")
        ) || last.is_none_or(|l| i >= l);
        if keep {
            out.push(msg.clone());
        } else if role(msg) == Some("assistant") {
            let mut m = msg.clone();
            m.remove("reasoning_content");
            out.push(m);
        }
    }
    out
}

/// Encodes `messages` after an already-encoded `context`, as `encode_messages` does.
pub fn encode_with_context(
    context: &[Message],
    messages: &[Message],
    o: &Options,
) -> Result<String> {
    let mut all = context.to_vec();
    all.extend(merge_tool_messages(messages));
    let sorted = sort_tool_results(all);
    let messages: Vec<Message> = sorted[context.len()..].to_vec();
    let context = if context.is_empty() {
        Vec::new()
    } else {
        sort_tool_results(merge_tool_messages(context))
    };
    let mut full = context.clone();
    full.extend(messages.iter().cloned());

    let mut prompt = if o.add_bos && context.is_empty() {
        BOS.to_string()
    } else {
        String::new()
    };
    let drop = o.drop_thinking && !full.iter().any(|m| truthy(m.get("tools")));
    let (full, start) = if o.mode == ThinkingMode::Thinking && drop {
        let full = drop_thinking_messages(&full);
        let n = full.len() - drop_thinking_messages(&context).len();
        let start = full.len() - n;
        (full, start)
    } else {
        (full, context.len())
    };
    for i in start..full.len() {
        prompt.push_str(&render(i, &full, o, drop)?);
    }
    Ok(prompt)
}

/// Encodes a whole conversation.
pub fn encode(messages: &[Message], o: &Options) -> Result<String> {
    encode_with_context(&[], messages, o)
}
