//! The OpenAI-compatible HTTP server (`hadal serve`).
//!
//! `POST /v1/chat/completions` and `POST /v1/completions` (streaming and not), `GET /v1/models`,
//! `GET /health`, `GET /metrics`. DeepSeek's extensions are spelled as its API spells them:
//! `reasoning_content`, `thinking: {"type": ...}`, `reasoning_effort`. Every error is OpenAI's
//! JSON shape with the matching status, and none stops the server.

pub mod disk;
pub mod engine;
pub mod metrics;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::backend::Backend;
use crate::chat::parse::{parse, Delta, StreamParser};
use crate::chat::request::conversation;
use crate::chat::{encode, Options, ThinkingMode};
use crate::config::Config;
use crate::generate::{raw_text, Finish, SamplingParams, TokenLogprob};
use crate::tokenizer::Tokenizer;
use engine::{Done, EngineHandle, EngineOptions, Event, Job};
use metrics::Metrics;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Name reported by `/v1/models` and in responses.
    pub model_name: String,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Most choices per request (`n`).
    pub max_n: usize,
    /// Engine limits.
    pub engine: EngineOptions,
}

#[derive(Clone)]
struct App {
    engine: EngineHandle,
    tok: Arc<Tokenizer>,
    cfg: Arc<Config>,
    opts: Arc<ServerOptions>,
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    message: String,
}

impl ApiError {
    fn bad(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: param.map(str::to_string),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Builds the router over a running engine.
pub fn router(
    backend: Arc<dyn Backend>,
    tok: Arc<Tokenizer>,
    opts: ServerOptions,
) -> crate::error::Result<Router> {
    let metrics = Arc::new(Metrics::new());
    let cfg = Arc::new(backend.config().clone());
    let engine = engine::spawn(backend, tok.clone(), opts.engine.clone(), metrics.clone())?;
    let app = App {
        engine,
        tok,
        cfg,
        opts: Arc::new(opts),
    };
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                code: Some("not_found"),
                param: None,
                message: "no such endpoint".into(),
            }
        })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app))
}

/// Authentication, and the response count by status code.
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/health" | "/metrics");
    let resp = match &app.opts.api_key {
        Some(key) if !open => {
            let given = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given == Some(key.as_str()) {
                next.run(req).await
            } else {
                ApiError {
                    status: StatusCode::UNAUTHORIZED,
                    kind: "authentication_error",
                    code: Some("invalid_api_key"),
                    param: None,
                    message: "missing or incorrect API key".into(),
                }
                .into_response()
            }
        }
        _ => next.run(req).await,
    };
    app.engine
        .metrics
        .requests
        .with_label_values(&[resp.status().as_str()])
        .inc();
    resp
}

async fn metrics_text(State(app): State<App>) -> String {
    app.engine.metrics.render()
}

async fn models(State(app): State<App>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": app.opts.model_name, "object": "model", "created": now(), "owned_by": "hadal",
        "max_model_len": app.cfg.max_position_embeddings,
    }]}))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads the body within the size limit and parses it as a JSON object.
async fn json_body(app: &App, body: Body) -> ApiResult<Value> {
    let bytes: Bytes = axum::body::to_bytes(body, app.opts.max_body_bytes)
        .await
        .map_err(|_| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            code: Some("request_too_large"),
            param: None,
            message: format!("request body exceeds {} bytes", app.opts.max_body_bytes),
        })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(None, format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad(
            None,
            "the request body must be a JSON object",
        ));
    }
    Ok(v)
}

fn number(v: &Value, key: &str, lo: f64, hi: f64, default: f64) -> ApiResult<f64> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => match x.as_f64() {
            Some(f) if (lo..=hi).contains(&f) => Ok(f),
            _ => Err(ApiError::bad(
                Some(key),
                format!("{key} must be a number in [{lo}, {hi}], got {x}"),
            )),
        },
    }
}

fn integer(v: &Value, key: &str, lo: u64, hi: u64) -> ApiResult<Option<u64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::bad(
                Some(key),
                format!("{key} must be an integer in [{lo}, {hi}], got {x}"),
            )),
        },
    }
}

/// Sampling parameters, `n`, `stream` and `include_usage` of a request.
fn sampling(
    app: &App,
    v: &Value,
    prompt_len: usize,
) -> ApiResult<(SamplingParams, usize, bool, bool)> {
    let ctx = app.cfg.max_position_embeddings;
    let max_tokens = integer(v, "max_completion_tokens", 1, u64::MAX)?
        .or(integer(v, "max_tokens", 1, u64::MAX)?)
        .map_or(
            app.opts
                .default_max_tokens
                .min(ctx.saturating_sub(prompt_len)),
            |n| n as usize,
        );
    if prompt_len + max_tokens > ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad(
                Some("messages"),
                format!("{prompt_len} prompt tokens plus max_tokens {max_tokens} exceed the model's context of {ctx} tokens"),
            )
        });
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a))
            if a.len() <= 16 && a.iter().all(|s| s.as_str().is_some_and(|s| !s.is_empty())) =>
        {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        }
        Some(_) => {
            return Err(ApiError::bad(
                Some("stop"),
                "stop must be a string or an array of up to 16 non-empty strings",
            ))
        }
    };
    let logprobs = match v.get("logprobs") {
        Some(Value::Bool(true)) => Some(integer(v, "top_logprobs", 0, 20)?.unwrap_or(0) as usize),
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .filter(|&n| n <= 20)
                .ok_or_else(|| ApiError::bad(Some("logprobs"), "logprobs must be at most 20"))?
                as usize,
        ),
        None | Some(Value::Null | Value::Bool(false)) => None,
        Some(x) => {
            return Err(ApiError::bad(
                Some("logprobs"),
                format!("logprobs: unexpected {x}"),
            ))
        }
    };
    let seed = match v.get("seed") {
        None | Some(Value::Null) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        Some(x) => x
            .as_i64()
            .map(|i| i as u64)
            .or_else(|| x.as_u64())
            .ok_or_else(|| ApiError::bad(Some("seed"), "seed must be an integer"))?,
    };
    let params = SamplingParams {
        temperature: number(v, "temperature", 0.0, 2.0, 1.0)? as f32,
        top_p: number(v, "top_p", 0.0, 1.0, 1.0)? as f32,
        top_k: integer(v, "top_k", 0, u32::MAX as u64)?.unwrap_or(0) as usize,
        min_p: number(v, "min_p", 0.0, 1.0, 0.0)? as f32,
        seed,
        max_tokens,
        stop,
        logprobs,
    };
    if params.top_p == 0.0 {
        return Err(ApiError::bad(Some("top_p"), "top_p must be greater than 0"));
    }
    let n = integer(v, "n", 1, app.opts.max_n as u64)?.unwrap_or(1) as usize;
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad(Some("stream"), "stream must be a boolean")),
    };
    if stream && n > 1 {
        return Err(ApiError::bad(
            Some("n"),
            "n > 1 is not supported with stream = true",
        ));
    }
    let usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok((params, n, stream, usage))
}

/// Submits `n` jobs (seeds `seed..seed+n`); returns their event receivers.
fn submit(
    app: &App,
    prompt: &[u32],
    params: &SamplingParams,
    n: usize,
) -> ApiResult<Vec<tokio::sync::mpsc::UnboundedReceiver<Event>>> {
    // A token the model cannot embed would fail the whole batch it joins: refuse it here.
    if let Some(t) = prompt.iter().find(|&&t| t as usize >= app.cfg.vocab_size) {
        return Err(ApiError::bad(
            None,
            format!(
                "the prompt has token id {t}, outside the model's vocabulary of {}",
                app.cfg.vocab_size
            ),
        ));
    }
    (0..n)
        .map(|i| {
            let (tx, rx) = unbounded_channel();
            let p = SamplingParams {
                seed: params.seed.wrapping_add(i as u64),
                ..params.clone()
            };
            app.engine
                .submit(Job {
                    prompt: prompt.to_vec(),
                    params: p,
                    events: tx,
                })
                .map_err(|_| ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    kind: "server_error",
                    code: Some("server_overloaded"),
                    param: None,
                    message: "the request queue is full; retry later".into(),
                })?;
            Ok(rx)
        })
        .collect()
}

/// Waits for a job's end (collecting nothing from its text events).
async fn finish(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> ApiResult<Done> {
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text(_) => {}
            Event::Done(d) => return Ok(d),
            Event::Failed(m) => return Err(server_error(m)),
            Event::NoRoom(m) => return Err(overloaded(m)),
        }
    }
    Err(server_error("the engine stopped".into()))
}

fn overloaded(message: String) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        code: Some("server_overloaded"),
        param: None,
        message,
    }
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "server_error",
        code: None,
        param: None,
        message,
    }
}

fn finish_reason(f: Finish, tool_calls: bool) -> &'static str {
    match f {
        _ if tool_calls => "tool_calls",
        Finish::Length => "length",
        _ => "stop",
    }
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

fn logprobs_json(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let text = |t: u32| tok.decode(&[t]).unwrap_or_default();
    json!({"content": lps.iter().map(|l| json!({
        "token": text(l.token), "logprob": l.logprob,
        "top_logprobs": l.top.iter().map(|&(t, p)| json!({"token": text(t), "logprob": p})).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()})
}

fn tool_calls_json(calls: &[crate::chat::parse::ToolCall], id: &str) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "id": format!("call_{id}_{i}"), "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect()
}

/// One SSE `data:` line: a JSON chunk, or the bare `[DONE]` marker.
fn sse_event(v: Value) -> Result<SseEvent, Infallible> {
    Ok(match v {
        Value::String(s) => SseEvent::default().data(s),
        v => SseEvent::default().data(v.to_string()),
    })
}

fn request_id() -> String {
    format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

async fn chat_completions(
    State(app): State<App>,
    _h: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let v = json_body(&app, body).await?;
    let conv = conversation(&v).map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
    let mode = conv.mode.unwrap_or(ThinkingMode::Chat);
    let prompt = encode(
        &conv.messages,
        &Options {
            mode,
            effort: conv.effort,
            ..Options::default()
        },
    )
    .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
    let ids = app
        .tok
        .encode(&prompt)
        .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
    let (params, n, stream, include_usage) = sampling(&app, &v, ids.len())?;
    let rxs = submit(&app, &ids, &params, n)?;
    let id = format!("chatcmpl-{}", request_id());
    let model = app.opts.model_name.clone();
    let created = now();
    if !stream {
        let mut choices = Vec::new();
        let (mut completion, mut cached) = (0, 0);
        for (i, rx) in rxs.into_iter().enumerate() {
            let d = finish(rx).await?;
            completion += d.completion_tokens;
            cached = d.cached_tokens;
            let p = parse(&raw_text(&d.text, d.finish), mode);
            let mut message = json!({"role": "assistant", "content": p.content});
            if mode == ThinkingMode::Thinking {
                message["reasoning_content"] = p.reasoning_content.clone().into();
            }
            if !p.tool_calls.is_empty() {
                message["tool_calls"] = tool_calls_json(&p.tool_calls, &id).into();
            }
            let mut choice = json!({"index": i, "message": message, "finish_reason": finish_reason(d.finish, !p.tool_calls.is_empty()),
                                    "logprobs": if params.logprobs.is_some() { logprobs_json(&app.tok, &d.logprobs) } else { Value::Null }});
            if let Some(e) = p.error {
                choice["format_error"] = e.into();
            }
            choices.push(choice);
        }
        let body = json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                          "choices": choices, "usage": usage(ids.len(), completion, cached)});
        return Ok(Json(body).into_response());
    }
    let rx = rxs.into_iter().next().expect("n = 1 when streaming");
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let mut parser = StreamParser::new(mode);
    let mut calls = 0;
    let prompt_tokens = ids.len();
    let tok = app.tok.clone();
    let want_logprobs = params.logprobs.is_some();
    let events = UnboundedReceiverStream::new(rx).flat_map(move |e| {
        let mut out: Vec<Value> = Vec::new();
        let mut push = |deltas: Vec<Delta>, out: &mut Vec<Value>| {
            for d in deltas {
                out.push(chunk(
                    match d {
                        Delta::Reasoning(t) => json!({"reasoning_content": t}),
                        Delta::Content(t) => json!({"content": t}),
                        Delta::ToolCall { call, .. } => {
                            calls += 1;
                            json!({"tool_calls": [{"index": calls - 1, "id": format!("call_{}", request_id()), "type": "function",
                                                   "function": {"name": call.name, "arguments": call.arguments}}]})
                        }
                    },
                    None,
                ));
            }
        };
        match e {
            Event::Text(t) => push(parser.push(&t), &mut out),
            Event::Done(d) => {
                push(parser.finish(), &mut out);
                let mut last = chunk(json!({}), Some(finish_reason(d.finish, calls > 0)));
                if want_logprobs {
                    last["choices"][0]["logprobs"] = logprobs_json(&tok, &d.logprobs);
                }
                out.push(last);
                if include_usage {
                    let mut u = chunk(json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(prompt_tokens, d.completion_tokens, d.cached_tokens);
                    out.push(u);
                }
                out.push(Value::String("[DONE]".into()));
            }
            Event::Failed(m) => {
                out.push(json!({"error": {"message": m, "type": "server_error", "param": null, "code": null}}));
                out.push(Value::String("[DONE]".into()));
            }
            Event::NoRoom(m) => {
                out.push(json!({"error": {"message": m, "type": "server_error", "param": null, "code": "server_overloaded"}}));
                out.push(Value::String("[DONE]".into()));
            }
        }
        futures_util::stream::iter(out)
    });
    let sse = futures_util::stream::once(async move { first })
        .chain(events)
        .map(sse_event);
    Ok(Sse::new(sse).into_response())
}

async fn completions(State(app): State<App>, _h: HeaderMap, body: Body) -> ApiResult<Response> {
    let v = json_body(&app, body).await?;
    let prompt = match v.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => return Err(ApiError::bad(Some("prompt"), "prompt must be a string")),
    };
    let ids = app
        .tok
        .encode(&prompt)
        .map_err(|e| ApiError::bad(Some("prompt"), e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::bad(Some("prompt"), "the prompt is empty"));
    }
    let (params, n, stream, include_usage) = sampling(&app, &v, ids.len())?;
    let rxs = submit(&app, &ids, &params, n)?;
    let id = format!("cmpl-{}", request_id());
    let (model, created) = (app.opts.model_name.clone(), now());
    if !stream {
        let mut choices = Vec::new();
        let (mut completion, mut cached) = (0, 0);
        for (i, rx) in rxs.into_iter().enumerate() {
            let d = finish(rx).await?;
            completion += d.completion_tokens;
            cached = d.cached_tokens;
            choices.push(json!({"index": i, "text": d.text, "finish_reason": finish_reason(d.finish, false), "logprobs": null}));
        }
        let body = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                          "choices": choices, "usage": usage(ids.len(), completion, cached)});
        return Ok(Json(body).into_response());
    }
    let rx = rxs.into_iter().next().expect("n = 1 when streaming");
    let prompt_tokens = ids.len();
    let chunk = move |text: &str, finish: Option<&str>| {
        json!({"id": id, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}]})
    };
    let sse = UnboundedReceiverStream::new(rx).flat_map(move |e| {
        let out: Vec<Value> = match e {
            Event::Text(t) => vec![chunk(&t, None)],
            Event::Done(d) => {
                let mut v = vec![chunk("", Some(finish_reason(d.finish, false)))];
                if include_usage {
                    let mut u = chunk("", None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(prompt_tokens, d.completion_tokens, d.cached_tokens);
                    v.push(u);
                }
                v.push(Value::String("[DONE]".into()));
                v
            }
            Event::Failed(m) => vec![
                json!({"error": {"message": m, "type": "server_error"}}),
                Value::String("[DONE]".into()),
            ],
            Event::NoRoom(m) => vec![
                json!({"error": {"message": m, "type": "server_error", "code": "server_overloaded"}}),
                Value::String("[DONE]".into()),
            ],
        };
        futures_util::stream::iter(out).map(sse_event)
    });
    Ok(Sse::new(sse).into_response())
}

/// Serves until Ctrl-C.
pub async fn serve(
    backend: Arc<dyn Backend>,
    tok: Arc<Tokenizer>,
    opts: ServerOptions,
    addr: std::net::SocketAddr,
) -> crate::error::Result<()> {
    let app = router(backend, tok, opts)?;
    let at = |e| crate::error::Error::io(addr.to_string(), e);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(at)?;
    eprintln!(
        "hadal: serving on http://{}",
        listener.local_addr().map_err(at)?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(at)
}
