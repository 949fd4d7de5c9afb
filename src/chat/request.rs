//! OpenAI (and DeepSeek) chat requests to the encoder's messages and options.
//!
//! Top-level `tools` and `response_format` go on the leading system message (one is inserted
//! when the conversation has none); `thinking: {"type": "enabled"|"disabled"}` picks the mode
//! and `reasoning_effort: "high"|"max"` the effort.

use serde_json::Value;

use super::encode::{Effort, EncodeError, Message, ThinkingMode};

/// A request's conversation and the choices it makes.
pub struct Conversation {
    /// Messages, with top-level `tools`/`response_format` placed on the leading system message.
    pub messages: Vec<Message>,
    /// The mode `thinking` asks for.
    pub mode: Option<ThinkingMode>,
    /// The effort `reasoning_effort` asks for.
    pub effort: Option<Effort>,
}

/// Reads a request: either a JSON array of messages or an object with `messages`.
pub fn conversation(req: &Value) -> Result<Conversation, EncodeError> {
    let bad = |m: String| Err(EncodeError(m));
    let (list, obj) = match req {
        Value::Array(a) => (a, None),
        Value::Object(o) => match o.get("messages") {
            Some(Value::Array(a)) => (a, Some(o)),
            _ => return bad("request has no `messages` array".into()),
        },
        _ => {
            return bad(
                "request must be a JSON object with `messages`, or an array of messages".into(),
            )
        }
    };
    let mut messages = Vec::with_capacity(list.len() + 1);
    for (i, m) in list.iter().enumerate() {
        match m {
            Value::Object(m) => {
                match m.get("role").and_then(Value::as_str) {
                    Some(
                        "system" | "user" | "assistant" | "tool" | "developer" | "latest_reminder",
                    ) => {}
                    Some(r) => return bad(format!("messages[{i}]: unknown role {r:?}")),
                    None => return bad(format!("messages[{i}]: missing `role`")),
                }
                messages.push(m.clone());
            }
            _ => return bad(format!("messages[{i}] is not an object")),
        }
    }
    let Some(obj) = obj else {
        return Ok(Conversation {
            messages,
            mode: None,
            effort: None,
        });
    };
    for key in ["tools", "response_format"] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            if key == "tools" && !v.is_array() {
                return bad("`tools` must be an array".into());
            }
            // `{"type": "text"}` asks for nothing beyond plain text.
            if key == "response_format" && v.get("type").and_then(Value::as_str) == Some("text") {
                continue;
            }
            let lead = matches!(
                messages
                    .first()
                    .and_then(|m| m.get("role"))
                    .and_then(Value::as_str),
                Some("system" | "developer")
            );
            if !lead {
                let mut sys = Message::new();
                sys.insert("role".into(), "system".into());
                sys.insert("content".into(), "".into());
                messages.insert(0, sys);
            }
            messages[0].insert(key.into(), v.clone());
        }
    }
    let mode = match obj
        .get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
    {
        None => None,
        Some("enabled") => Some(ThinkingMode::Thinking),
        Some("disabled") => Some(ThinkingMode::Chat),
        Some(t) => {
            return bad(format!(
                "thinking.type {t:?}: expected \"enabled\" or \"disabled\""
            ))
        }
    };
    let effort = match obj.get("reasoning_effort") {
        None | Some(Value::Null) => None,
        Some(e) => Some(parse_effort(e.as_str().unwrap_or("?"))?),
    };
    Ok(Conversation {
        messages,
        mode,
        effort,
    })
}

/// `high` or `max` (`low` and `medium`, which OpenAI clients send, map to `high`).
pub fn parse_effort(s: &str) -> Result<Effort, EncodeError> {
    match s {
        "max" => Ok(Effort::Max),
        "high" | "medium" | "low" => Ok(Effort::High),
        other => Err(EncodeError(format!(
            "reasoning_effort {other:?}: expected \"high\" or \"max\""
        ))),
    }
}
