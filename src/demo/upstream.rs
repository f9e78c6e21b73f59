//! The simulated OpenAI-compatible upstream of `llm-audit demo`, on 127.0.0.1 only.
//!
//! It behaves like a multi-model gateway (the seed's HolySheep) as far as an auditor can tell:
//! latencies of 80–600 ms with a long tail and a prefill cost for long prompts; usage with
//! `prompt_tokens_details.cached_tokens` (repeated system prompts of 1,024+ tokens, in steps of
//! 128 as OpenAI caches) and `completion_tokens_details.reasoning_tokens` (thinking models);
//! the seed's models plus one the price table does not know; 429s with `Retry-After` and 500s
//! in OpenAI's error shape; SSE streams with pauses between chunks, `"usage":null` on every
//! chunk and a final usage-only chunk only when `stream_options.include_usage` is set.

use std::collections::HashSet;
use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A model the simulated upstream serves.
#[derive(Clone, Copy, Debug)]
pub struct Model {
    /// Name clients ask for.
    pub name: &'static str,
    /// Name the answer reports (OpenAI answers with the dated snapshot).
    pub response_name: &'static str,
    /// Latency multiplier.
    pub speed: f64,
    /// Whether the model spends hidden reasoning tokens.
    pub thinks: bool,
}

/// The seed's price table, plus `llama-3.3-70b-instruct`, which it does not know (priced at
/// the fallback rate, `cost_status = fallback`).
pub const MODELS: [Model; 8] = [
    Model {
        name: "gpt-4.1",
        response_name: "gpt-4.1-2025-04-14",
        speed: 1.0,
        thinks: false,
    },
    Model {
        name: "gpt-4.1-mini",
        response_name: "gpt-4.1-mini-2025-04-14",
        speed: 0.6,
        thinks: false,
    },
    Model {
        name: "claude-sonnet-4-20250514",
        response_name: "claude-sonnet-4-20250514",
        speed: 1.3,
        thinks: true,
    },
    Model {
        name: "claude-3-5-sonnet-20241022",
        response_name: "claude-3-5-sonnet-20241022",
        speed: 1.1,
        thinks: false,
    },
    Model {
        name: "gemini-2.5-flash",
        response_name: "gemini-2.5-flash",
        speed: 0.5,
        thinks: true,
    },
    Model {
        name: "deepseek-chat",
        response_name: "deepseek-chat",
        speed: 0.9,
        thinks: false,
    },
    Model {
        name: "deepseek-coder",
        response_name: "deepseek-coder",
        speed: 0.9,
        thinks: false,
    },
    Model {
        name: "llama-3.3-70b-instruct",
        response_name: "llama-3.3-70b-instruct",
        speed: 0.8,
        thinks: false,
    },
];

/// Share of calls answered 429 (rate limited) and 500 (server error).
const RATE_LIMITED_SHARE: f64 = 0.04;
const SERVER_ERROR_SHARE: f64 = 0.02;
/// So that even a few seconds of demo show both kinds of failure, these calls (counted from 1,
/// ordinary-sized ones only) always fail.
const FORCED_429_AT: u64 = 5;
const FORCED_500_AT: u64 = 11;

/// A running simulated upstream.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens (127.0.0.1, an ephemeral port).
    pub addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Base URL to configure as `upstream.url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops accepting and waits (briefly) for open connections.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

#[derive(Debug, Default)]
struct Sim {
    calls: AtomicU64,
    /// Prompt prefixes already seen, per model: the provider's prompt cache.
    cached_prefixes: Mutex<HashSet<u64>>,
}

/// Starts the simulated upstream on `127.0.0.1:0`.
pub async fn start() -> anyhow::Result<Upstream> {
    let sim = Arc::new(Sim::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .with_state(sim);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "Simulated upstream failed.");
        }
    });
    Ok(Upstream { addr, cancel, task })
}

async fn models() -> Response {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 1_744_588_800, "owned_by": "llm-audit-demo"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// OpenAI's error shape.
fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let id = request_id("req_");
    (
        status,
        [
            ("content-type", "application/json"),
            ("x-request-id", id.as_str()),
        ],
        body.to_string(),
    )
        .into_response()
}

fn request_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    for _ in 0..24 {
        id.push(fastrand::alphanumeric());
    }
    id
}

async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    if !bearer {
        return error(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            None,
        );
    };
    let asked = req["model"].as_str().unwrap_or_default();
    let Some(model) = MODELS.iter().find(|m| m.name == asked).copied() else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{asked}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model_not_found"),
        );
    };
    let messages = req["messages"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let prompt_tokens = count_prompt(messages);

    let call = sim.calls.fetch_add(1, Ordering::Relaxed) + 1;
    let ordinary = body.len() < 64 * 1024;
    let roll = fastrand::f64();
    if (ordinary && call == FORCED_429_AT) || roll < RATE_LIMITED_SHARE {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(8..30))).await;
        let wait = fastrand::u64(1..=2);
        let message = format!(
            "Rate limit reached for {} in organization org-demo on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in {wait}s.",
            model.name
        );
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            &message,
            "requests",
            Some("rate_limit_exceeded"),
        );
        let h = resp.headers_mut();
        h.insert("retry-after", wait.into());
        h.insert("x-ratelimit-limit-requests", 500_u32.into());
        h.insert("x-ratelimit-remaining-requests", 0_u32.into());
        return resp;
    }
    let latency = latency(model.speed, prompt_tokens);
    if (ordinary && call == FORCED_500_AT) || roll < RATE_LIMITED_SHARE + SERVER_ERROR_SHARE {
        tokio::time::sleep(latency).await;
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        );
    }

    let cached = sim.cached_tokens(model, messages, prompt_tokens);
    let limit = req["max_tokens"]
        .as_u64()
        .or_else(|| req["max_completion_tokens"].as_u64())
        .unwrap_or(4096)
        .max(1);
    let reasoning = if model.thinks {
        fastrand::u64(64..=900).min(limit / 2)
    } else {
        0
    };
    let wanted = 24 + (fastrand::f64().powi(2) * 420.0) as u64;
    let visible = wanted.min(limit - reasoning).max(1);
    let finish = if wanted > visible { "length" } else { "stop" };
    let text = answer(visible);
    let completion = visible + reasoning;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    });
    let id = request_id("chatcmpl-");
    let created = chrono::Utc::now().timestamp();

    if req["stream"].as_bool() == Some(true) {
        let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
        let events = stream_events(
            &id,
            created,
            model,
            &text,
            finish,
            include_usage.then_some(usage),
        );
        // Time to first token is most of the latency; the rest trickles out between chunks.
        let first = latency.mul_f64(0.7);
        let body = futures_util::stream::iter(events.into_iter().enumerate()).then(
            move |(i, event)| async move {
                let pause = if i == 0 {
                    first
                } else {
                    Duration::from_millis(fastrand::u64(8..40))
                };
                tokio::time::sleep(pause).await;
                Ok::<_, Infallible>(event)
            },
        );
        let req_id = request_id("req_");
        return (
            [
                ("content-type", "text/event-stream; charset=utf-8"),
                ("x-request-id", req_id.as_str()),
            ],
            Body::from_stream(body),
        )
            .into_response();
    }

    tokio::time::sleep(latency).await;
    let resp = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model.response_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": finish
        }],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_demo0001"
    });
    let req_id = request_id("req_");
    (
        [
            ("content-type", "application/json"),
            ("x-request-id", req_id.as_str()),
        ],
        resp.to_string(),
    )
        .into_response()
}

impl Sim {
    /// OpenAI caches prompt prefixes of 1,024+ tokens in steps of 128: a system prompt seen
    /// before (for the same model) is a cache hit.
    fn cached_tokens(&self, model: Model, messages: &[Value], prompt_tokens: u64) -> u64 {
        let Some(system) = messages
            .first()
            .filter(|m| m["role"] == "system")
            .and_then(|m| m["content"].as_str())
        else {
            return 0;
        };
        let prefix_tokens = count_text(system) + 4;
        if prefix_tokens < 1024 {
            return 0;
        }
        let mut h = DefaultHasher::new();
        (model.name, system).hash(&mut h);
        let key = h.finish();
        let mut seen = self
            .cached_prefixes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if seen.len() > 10_000 {
            seen.clear();
        }
        if seen.insert(key) {
            0
        } else {
            (prefix_tokens / 128 * 128).min(prompt_tokens)
        }
    }
}

/// 80–600 ms, most calls near the bottom, 4 % in a tail up to 2 s, plus prefill time for long
/// prompts (100k tokens ≈ 0.5 s), scaled by the model's speed.
fn latency(speed: f64, prompt_tokens: u64) -> Duration {
    let body = 80.0 + 520.0 * fastrand::f64().powi(3);
    let tail = if fastrand::f64() < 0.04 {
        600.0 + 1400.0 * fastrand::f64()
    } else {
        0.0
    };
    let prefill = prompt_tokens as f64 / 200.0;
    Duration::from_secs_f64((body * speed + tail + prefill) / 1000.0)
}

/// About four characters per token, the usual rule of thumb for English text.
fn count_text(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// Chat-format overhead of 4 tokens per message and 3 for the reply's priming, as OpenAI counts.
fn count_prompt(messages: &[Value]) -> u64 {
    let content: u64 = messages
        .iter()
        .map(|m| match &m["content"] {
            Value::String(s) => count_text(s),
            Value::Null => 0,
            other => count_text(&other.to_string()),
        })
        .sum();
    content + 4 * messages.len() as u64 + 3
}

const SENTENCES: [&str; 10] = [
    "Every call is recorded once, with its tokens, cost and latency.",
    "The audit log is hash-chained, so a deleted or altered row is detected.",
    "Rotate the key if it appeared in a log or a ticket.",
    "Caching repeated prompts lowers both cost and latency.",
    "A per-user token quota stops one runaway script from draining the budget.",
    "Retry 429 answers after the time the Retry-After header gives.",
    "Streaming answers start sooner but cost the same number of tokens.",
    "Smaller models are often good enough for classification tasks.",
    "Check the failure ratio before blaming the model for bad answers.",
    "Prompts and answers stay out of spans unless capture is enabled.",
];

/// An answer of about `tokens` tokens.
fn answer(tokens: u64) -> String {
    let target = usize::try_from(tokens.saturating_mul(4)).unwrap_or(usize::MAX);
    let mut out = String::with_capacity(target + 80);
    let mut i = fastrand::usize(..SENTENCES.len());
    while out.len() < target {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(SENTENCES[i % SENTENCES.len()]);
        i += 1;
    }
    let mut end = target.min(out.len());
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out
}

/// The SSE events of one streamed answer: a role chunk, content chunks (at most ~24, a few
/// words each), the finish chunk, the usage-only chunk when asked for, and `[DONE]`.
fn stream_events(
    id: &str,
    created: i64,
    model: Model,
    text: &str,
    finish: &str,
    usage: Option<Value>,
) -> Vec<Bytes> {
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model.response_name,
            "service_tier": "default",
            "system_fingerprint": "fp_demo0001",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if usage.is_some() {
            c["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let per_chunk = words.len().div_ceil(24).max(1);
    let mut events = Vec::with_capacity(words.len() / per_chunk + 5);
    events.push(chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    ));
    for group in words.chunks(per_chunk) {
        events.push(chunk(json!({"content": group.concat()}), None));
    }
    events.push(chunk(json!({}), Some(finish)));
    if let Some(usage) = usage {
        let last = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model.response_name,
            "service_tier": "default",
            "system_fingerprint": "fp_demo0001",
            "choices": [],
            "usage": usage,
        });
        events.push(Bytes::from(format!("data: {last}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_have_about_the_tokens_reported() {
        for tokens in [1, 24, 300, 444] {
            let text = answer(tokens);
            assert!(count_text(&text) <= tokens && count_text(&text) + 1 >= tokens);
        }
    }

    #[test]
    fn streams_end_with_usage_only_when_asked() {
        let m = MODELS[0];
        let with = stream_events("c", 1, m, "a b c", "stop", Some(json!({"total_tokens": 3})));
        let text: Vec<String> = with
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert!(text[text.len() - 2].contains("\"choices\":[]"));
        assert_eq!(text[text.len() - 1], "data: [DONE]\n\n");
        let without = stream_events("c", 1, m, "a b c", "stop", None);
        assert!(
            without
                .iter()
                .all(|b| !String::from_utf8_lossy(b).contains("usage"))
        );
    }
}
