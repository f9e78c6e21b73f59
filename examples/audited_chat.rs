//! The audit core end to end, with no API key and no network: a simulated OpenAI-compatible
//! upstream on 127.0.0.1, the audited `llm_audit::Client` calling it (JSON, streaming, a 429
//! with `Retry-After`, a 500 that is retried, an unknown model, a repeated prompt), then the
//! audit log, its hash chain and the metrics it produced.
//!
//! `cargo run --example audited_chat [-- DB_PATH]` (default `./llm-audit.db`).
//! Set `OTEL_EXPORTER_OTLP_ENDPOINT` to also export the spans.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt as _;
use serde_json::{Value, json};

use llm_audit::Recorder;
use llm_audit::audit::PriceTable;
use llm_audit::client::{Client, RetryPolicy, Timeouts};
use llm_audit::config::{AuditConfig, Secret};
use llm_audit::store::{Store, chain};
use llm_audit::telemetry::{self, Metrics, TelemetryConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "llm-audit.db".into());
    let mut cfg = AuditConfig::default();
    cfg.store.path = db.clone().into();

    let metrics = Arc::new(Metrics::new(
        cfg.metrics.max_user_labels,
        cfg.metrics.max_model_labels,
        cfg.thresholds.max_tokens_per_request,
    )?);
    let guard = telemetry::init(&TelemetryConfig::from_env()?, &metrics)?;
    let store = Store::open(&cfg.store, metrics.clone())?;
    let recorder = Recorder::new(
        metrics.clone(),
        store.clone(),
        PriceTable::from_config(&cfg.pricing)?,
        cfg.capture.clone(),
        &cfg.thresholds,
        None,
    );

    let upstream = start_simulated_upstream().await?;
    let client = Client::builder(format!("http://{upstream}/v1"))
        .api_key(Secret::new("sk-demo-not-a-real-key-000000"))
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .timeouts(Timeouts {
            attempt: Duration::from_secs(5),
            ..Timeouts::default()
        })
        .user_id("demo-user")
        .build(recorder)?;

    let ask = |model: &str, text: &str| json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64});
    for (model, text) in [
        ("gpt-4.1", "Summarise the audit log design."),
        ("deepseek-chat", "What is a hash chain?"),
        ("gpt-4.1-mini", "rate-limit-me"),
        ("gemini-2.5-flash", "fail-once"),
        (
            "my-private-model",
            "Unknown models are priced at the fallback rate.",
        ),
        ("gpt-4.1", "Summarise the audit log design."),
    ] {
        match client.chat(ask(model, text)).await {
            Ok(r) => println!(
                "{:<17} {} attempts={} tokens={} cost=${:.8} ({})",
                model,
                r.record.status_code,
                r.record.attempts,
                r.record.total_tokens,
                r.record.cost_usd,
                r.record.cost_status.as_str()
            ),
            Err(e) => println!("{model:<17} error: {e}"),
        }
    }
    let mut stream = client
        .chat_stream(ask("gpt-4.1", "Stream a short answer."))
        .await?;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        if let Some(t) = chunk?["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    println!("{:<17} streamed {:?}", "gpt-4.1", text);

    store.shutdown_async().await;
    let conn = rusqlite::Connection::open(&db)?;
    let report = chain::verify(&conn, None)?;
    println!(
        "\naudit log {db}: {} rows, chain {}",
        report.rows,
        match report.first_break {
            None => "intact".to_owned(),
            Some(b) => format!("BROKEN at row {} ({:?})", b.row_id, b.kind),
        }
    );
    println!("\nmetrics (excerpt):");
    for line in metrics.encode().lines() {
        if line.starts_with("llm_audit_requests_total")
            || line.starts_with("llm_audit_cost_usd_total")
            || line.starts_with("llm_audit_duplicate_requests_total")
            || line.starts_with("llm_audit_records_written_total")
        {
            println!("  {line}");
        }
    }
    guard.shutdown().await;
    Ok(())
}

/// A small OpenAI-compatible upstream: realistic usage, a 429 with `Retry-After` for prompts
/// containing "rate-limit-me", one 500 for "fail-once", and SSE streaming.
async fn start_simulated_upstream() -> anyhow::Result<std::net::SocketAddr> {
    // Prompts that already failed once; their retry succeeds.
    let failures = Arc::new(Mutex::new(HashSet::new()));
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let failures = failures.clone();
            async move { simulate(&headers, &body, &failures).await }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn simulate(
    _headers: &HeaderMap,
    body: &[u8],
    failures: &Mutex<HashSet<String>>,
) -> Response {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let model = req["model"].as_str().unwrap_or("unknown").to_owned();
    let prompt = req["messages"].to_string();
    let first_time = failures
        .lock()
        .map(|mut f| f.insert(prompt.clone()))
        .unwrap_or(false);
    if prompt.contains("rate-limit-me") && first_time {
        let err = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            err.to_string(),
        )
            .into_response();
    }
    if prompt.contains("fail-once") && first_time {
        let err = json!({"error": {"message": "The server had an error", "type": "server_error", "code": null}});
        return (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let answer = "An audit log records every call once, chained by hashes.";
    let usage = json!({"prompt_tokens": 42, "completion_tokens": 12, "total_tokens": 54,
        "prompt_tokens_details": {"cached_tokens": 10}, "completion_tokens_details": {"reasoning_tokens": 0}});
    if req["stream"].as_bool() == Some(true) {
        let mut events = Vec::new();
        for word in answer.split_inclusive(' ') {
            let chunk = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]});
            events.push(format!("data: {chunk}\n\n"));
        }
        let last = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        events.push(format!("data: {last}\n\n"));
        if req["stream_options"]["include_usage"].as_bool() == Some(true) {
            let u = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage});
            events.push(format!("data: {u}\n\n"));
        }
        events.push("data: [DONE]\n\n".into());
        let stream = futures_util::stream::iter(events).then(|e| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, std::convert::Infallible>(e)
        });
        return (
            [("content-type", "text/event-stream")],
            Body::from_stream(stream),
        )
            .into_response();
    }
    let resp = json!({"id": "chatcmpl-demo", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": usage});
    ([("content-type", "application/json")], resp.to_string()).into_response()
}
