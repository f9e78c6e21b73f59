#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `llm_audit::Client` against a real (fake) OpenAI upstream on 127.0.0.1, with a real recorder
//! over a real SQLite file: the result, the attempts the upstream saw, and the committed record.

mod common;
mod fake_upstream;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use llm_audit::Client;
use llm_audit::audit::RequestError;
use llm_audit::audit::recorder::key_fingerprint;
use llm_audit::client::{ChatStream, ClientError, RetryPolicy, Timeouts};
use llm_audit::config::Secret;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing_subscriber::layer::SubscriberExt as _;

use common::Harness;
use fake_upstream::{Ending, FakeUpstream, RecordedRequest, Reply, StreamScript};

const KEY: &str = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0";
const MODEL: &str = "gpt-4.1-mini";
const RESPONSE_MODEL: &str = "gpt-4.1-mini-2025-04-14";
/// Picodollars per token of gpt-4.1-mini (1.5 / 6.0 USD per 1M tokens).
const PICO_IN: i64 = 1_500_000;
const PICO_OUT: i64 = 6_000_000;
const FIXTURE: &str = include_str!("fixtures/client_chat_completion.json");

/// A global subscriber with the OpenTelemetry layer, so spans have real trace ids and the
/// client injects `traceparent` (no exporter: spans are built, then discarded).
fn init_tracing() {
    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(llm_audit::telemetry::otel_layer(&provider));
        let _ = tracing::subscriber::set_global_default(subscriber);
        provider
    });
}

fn timeouts(attempt_ms: u64, total_ms: u64) -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(1),
        attempt: Duration::from_millis(attempt_ms),
        total: Duration::from_millis(total_ms),
    }
}

fn client_for(h: &Harness, base_url: &str, timeouts: Timeouts, max_attempts: u32) -> Client {
    init_tracing();
    Client::builder(base_url)
        .retry(RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(2),
            ..Default::default()
        })
        .timeouts(timeouts)
        .api_key(Secret::new(KEY))
        .build(h.recorder.clone())
        .unwrap()
}

/// 3 attempts, 20 ms initial backoff; generous attempt timeout (only the hang tests need a
/// short one, and a loaded 2-core machine must not turn a normal answer into a timeout).
fn client(h: &Harness, up: &FakeUpstream) -> Client {
    client_for(h, &up.base_url(), timeouts(2_000, 10_000), 3)
}

fn body() -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello."}
        ]
    })
}

#[derive(Debug)]
struct Row {
    request_id: String,
    model: String,
    status_code: i64,
    outcome: String,
    attempts: i64,
    error_message: Option<String>,
    usage_source: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    cost_usd: f64,
    cost_picousd: i64,
    cost_status: String,
    key_id: Option<String>,
    stream: i64,
    ttft_ms: Option<f64>,
    finish_reason: Option<String>,
    response_preview: String,
    response_model: Option<String>,
    response_id: Option<String>,
    trace_id: Option<String>,
    latency_ms: f64,
}

/// Shuts the store down (committing everything queued) and reads every row.
fn committed_rows(h: &Harness) -> Vec<Row> {
    h.store.shutdown();
    let conn = rusqlite::Connection::open(&h.db).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT request_id, model, status_code, outcome, attempts, error_message, \
             usage_source, prompt_tokens, completion_tokens, total_tokens, cost_usd, \
             cost_picousd, cost_status, key_id, stream, ttft_ms, finish_reason, \
             response_preview, response_model, response_id, trace_id, latency_ms \
             FROM audit_logs ORDER BY id",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Row {
            request_id: r.get(0)?,
            model: r.get(1)?,
            status_code: r.get(2)?,
            outcome: r.get(3)?,
            attempts: r.get(4)?,
            error_message: r.get(5)?,
            usage_source: r.get(6)?,
            prompt_tokens: r.get(7)?,
            completion_tokens: r.get(8)?,
            total_tokens: r.get(9)?,
            cost_usd: r.get(10)?,
            cost_picousd: r.get(11)?,
            cost_status: r.get(12)?,
            key_id: r.get(13)?,
            stream: r.get(14)?,
            ttft_ms: r.get(15)?,
            finish_reason: r.get(16)?,
            response_preview: r.get::<_, Option<String>>(17)?.unwrap_or_default(),
            response_model: r.get(18)?,
            response_id: r.get(19)?,
            trace_id: r.get(20)?,
            latency_ms: r.get(21)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The one committed row (a logical call is one record, whatever its attempts).
fn only_row(h: &Harness) -> Row {
    let mut rows = committed_rows(h);
    assert_eq!(rows.len(), 1, "expected exactly one record: {rows:#?}");
    rows.remove(0)
}

/// `00-<trace id>-<parent span id>-<flags>` → (trace id, parent id).
fn traceparent(req: &RecordedRequest) -> (String, String) {
    let tp = req.header("traceparent").expect("traceparent header");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    assert!(
        parts[1].len() == 32 && parts[1].chars().all(|c| c.is_ascii_hexdigit()),
        "{tp}"
    );
    assert!(
        parts[2].len() == 16 && parts[2].chars().all(|c| c.is_ascii_hexdigit()),
        "{tp}"
    );
    assert_ne!(parts[1], "0".repeat(32), "{tp}");
    (parts[1].to_owned(), parts[2].to_owned())
}

/// Drains a stream, keeping every item.
async fn drain(stream: ChatStream) -> Vec<Result<Value, ClientError>> {
    tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
        .await
        .expect("stream ends")
}

fn delta_content(chunk: &Value) -> Option<&str> {
    chunk
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
}

fn assert_close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-12, "{a} != {b}");
}

// ---------------------------------------------------------------------------------------------
// Non-streaming calls
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn plain_success_returns_the_body_unchanged_and_records_it() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![Reply::raw(200, "application/json", FIXTURE)]).await;
    let client = client(&h, &up);

    let resp = client.chat(body()).await.unwrap();

    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    assert_eq!(resp.body, fixture, "the upstream's JSON, unchanged");
    assert_eq!(resp.record.attempts, 1);

    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/v1/chat/completions");
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(
        req.json(),
        body(),
        "a non-streaming body goes upstream as given"
    );
    let (trace_id, parent_id) = traceparent(req);

    let row = only_row(&h);
    assert_eq!(row.request_id, resp.record.request_id);
    assert_eq!(row.status_code, 200);
    assert_eq!(row.outcome, "ok");
    assert_eq!(row.attempts, 1);
    assert_eq!(row.error_message, None);
    assert_eq!(row.model, MODEL);
    assert_eq!(row.response_model.as_deref(), Some(RESPONSE_MODEL));
    assert_eq!(
        row.response_id.as_deref(),
        Some("chatcmpl-BnX3kQ2v9c8J7Yq1fT0aZr5LwM4pN")
    );
    assert_eq!(row.usage_source, "reported");
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.total_tokens),
        (19, 10, 29)
    );
    assert_eq!(row.cost_status, "priced");
    assert_eq!(row.cost_picousd, 19 * PICO_IN + 10 * PICO_OUT);
    assert_close(row.cost_usd, 88.5e-6);
    assert_eq!(row.stream, 0);
    assert_eq!(row.ttft_ms, None);
    assert_eq!(row.finish_reason.as_deref(), Some("stop"));
    assert_eq!(row.response_preview, "Hello! How can I help you today?");
    assert!(row.latency_ms > 0.0);

    let key_id = row.key_id.as_deref().expect("key_id");
    assert_eq!(key_id, key_fingerprint(KEY));
    assert!(key_id.starts_with("key_") && key_id.len() == 20, "{key_id}");
    assert_eq!(row.trace_id.as_deref(), Some(trace_id.as_str()));
    assert_ne!(parent_id, "0".repeat(16));

    // The key is nowhere in the store: not in the database, its WAL or its shared memory.
    let secret_part = KEY.trim_start_matches("sk-test-");
    let mut files = 0;
    for entry in std::fs::read_dir(h.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        files += 1;
        for needle in [KEY.as_bytes(), secret_part.as_bytes()] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "the API key leaked into {}",
                path.display()
            );
        }
    }
    assert!(files >= 1);
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![
        Reply::error(
            429,
            "rate_limit_exceeded",
            "Rate limit reached for gpt-4.1-mini",
        )
        .header("retry-after", "1"),
        Reply::chat(RESPONSE_MODEL, "Hello!", 12, 3),
    ])
    .await;
    let client = client(&h, &up);

    let started = Instant::now();
    let resp = client.chat(body()).await.unwrap();
    let elapsed = started.elapsed();

    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(
        gap >= Duration::from_millis(990),
        "second attempt came {gap:?} after the 429"
    );
    assert_eq!(resp.record.attempts, 2);

    let row = only_row(&h);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (200, "ok", 2)
    );
    assert_eq!(row.error_message, None);
    assert_eq!((row.prompt_tokens, row.completion_tokens), (12, 3));
}

#[tokio::test]
async fn retry_after_beyond_the_total_timeout_fails_at_once() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![
        Reply::error(429, "rate_limit_exceeded", "Slow down").header("retry-after", "1"),
        Reply::chat(RESPONSE_MODEL, "too late", 1, 1),
    ])
    .await;
    let client = client_for(&h, &up.base_url(), timeouts(2_000, 500), 3);

    let started = Instant::now();
    let err = client.chat(body()).await.unwrap_err();

    assert!(
        started.elapsed() < Duration::from_millis(450),
        "no pointless wait: {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&err, ClientError::Upstream { status: 429, attempts: 1, message, .. } if message == "Slow down"),
        "{err:?}"
    );
    assert_eq!(up.requests().len(), 1);
    let row = only_row(&h);
    assert_eq!((row.status_code, row.attempts), (429, 1));
    assert_eq!(row.error_message.as_deref(), Some("Slow down"));
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_into_one_record() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![
        Reply::error(500, "server_error", "The server had an error"),
        Reply::error(500, "server_error", "The server had an error"),
        Reply::chat(RESPONSE_MODEL, "Hello!", 12, 3),
    ])
    .await;
    let client = client(&h, &up);

    let resp = client.chat(body()).await.unwrap();
    assert_eq!(resp.body["choices"][0]["message"]["content"], "Hello!");

    let reqs = up.requests();
    assert_eq!(reqs.len(), 3);
    // Exponential backoff with equal jitter: [10, 20] ms, then [20, 40] ms.
    let gap1 = reqs[1].at.duration_since(reqs[0].at);
    let gap2 = reqs[2].at.duration_since(reqs[1].at);
    assert!(gap1 >= Duration::from_millis(10), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(20), "{gap2:?}");
    // Every attempt continues the call's trace as its own span.
    let tps: Vec<(String, String)> = reqs.iter().map(traceparent).collect();
    assert!(tps.iter().all(|(t, _)| *t == tps[0].0), "{tps:?}");
    assert!(
        tps[0].1 != tps[1].1 && tps[1].1 != tps[2].1 && tps[0].1 != tps[2].1,
        "{tps:?}"
    );

    let row = only_row(&h);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (200, "ok", 3)
    );
    assert_eq!(row.error_message, None);
    assert_eq!(row.usage_source, "reported");
    assert_eq!(row.cost_picousd, 12 * PICO_IN + 3 * PICO_OUT);
    assert_eq!(row.trace_id.as_deref(), Some(tps[0].0.as_str()));
}

#[tokio::test]
async fn persistent_500_is_an_upstream_error_with_its_message() {
    let h = common::harness();
    let msg = "The server had an error while processing your request. Sorry about that!";
    let up = FakeUpstream::start(vec![
        Reply::error(500, "server_error", msg),
        Reply::error(500, "server_error", msg),
        Reply::error(500, "server_error", msg),
    ])
    .await;
    let client = client(&h, &up);

    let err = client.chat(body()).await.unwrap_err();
    let ClientError::Upstream {
        status,
        message,
        request_id,
        attempts,
    } = &err
    else {
        panic!("expected Upstream, got {err:?}");
    };
    assert_eq!((*status, *attempts), (500, 3));
    assert_eq!(message, msg);
    assert_eq!(up.requests().len(), 3);
    assert_eq!(up.remaining(), 0);

    let row = only_row(&h);
    assert_eq!(&row.request_id, request_id);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (500, "error", 3)
    );
    assert_eq!(row.error_message.as_deref(), Some(msg));
    assert_eq!(row.usage_source, "missing");
    assert_eq!((row.total_tokens, row.cost_picousd), (0, 0));
}

#[tokio::test]
async fn client_error_400_is_not_retried() {
    let h = common::harness();
    let msg = "Invalid value for 'temperature': must be between 0 and 2.";
    let up = FakeUpstream::start(vec![
        Reply::error(400, "invalid_request_error", msg),
        Reply::chat(RESPONSE_MODEL, "must not be asked for", 1, 1),
    ])
    .await;
    let client = client(&h, &up);

    let err = client.chat(body()).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Upstream { status: 400, attempts: 1, message, .. } if message == msg),
        "{err:?}"
    );
    assert_eq!(up.requests().len(), 1);

    let row = only_row(&h);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (400, "error", 1)
    );
    assert_eq!(row.error_message.as_deref(), Some(msg));
}

#[tokio::test]
async fn a_hang_times_out_each_attempt_and_is_a_408() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![Reply::hang(), Reply::hang(), Reply::hang()]).await;
    let client = client_for(&h, &up.base_url(), timeouts(300, 10_000), 3);

    let started = Instant::now();
    let err = client.chat(body()).await.unwrap_err();
    let elapsed = started.elapsed();

    let ClientError::Timeout {
        message, attempts, ..
    } = &err
    else {
        panic!("expected Timeout, got {err:?}");
    };
    assert_eq!(message, "Request timeout (0.3s)");
    assert_eq!(*attempts, 3);
    assert_eq!(up.requests().len(), 3);
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    let row = only_row(&h);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (408, "error", 3)
    );
    let em = row.error_message.as_deref().unwrap();
    assert!(em.starts_with("Request timeout"), "{em}");
    assert_eq!(em, message);
}

#[tokio::test]
async fn a_total_timeout_shorter_than_the_attempt_timeout_is_named() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![Reply::hang(), Reply::hang()]).await;
    let client = client_for(&h, &up.base_url(), timeouts(300, 150), 3);

    let started = Instant::now();
    let err = client.chat(body()).await.unwrap_err();
    let elapsed = started.elapsed();

    assert!(
        matches!(&err, ClientError::Timeout { message, attempts: 1, .. } if message == "Total timeout (0.15s)"),
        "{err:?}"
    );
    assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(290), "{elapsed:?}");
    assert_eq!(up.requests().len(), 1);

    let row = only_row(&h);
    assert_eq!((row.status_code, row.attempts), (408, 1));
    assert_eq!(row.error_message.as_deref(), Some("Total timeout (0.15s)"));
}

#[tokio::test]
async fn a_connection_reset_is_a_transport_error_after_retries() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![Reply::reset(), Reply::reset(), Reply::reset()]).await;
    let client = client(&h, &up);

    let err = client.chat(body()).await.unwrap_err();
    let ClientError::Transport {
        message, attempts, ..
    } = &err
    else {
        panic!("expected Transport, got {err:?}");
    };
    assert_eq!(*attempts, 3);
    assert!(
        message.starts_with("upstream connection failed"),
        "{message}"
    );
    assert!(
        message.to_lowercase().contains("reset"),
        "the cause is named: {message}"
    );
    assert!(!message.contains(KEY));
    assert_eq!(up.requests().len(), 3);

    let row = only_row(&h);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (502, "error", 3)
    );
    assert_eq!(row.error_message.as_deref(), Some(message.as_str()));
}

#[tokio::test]
async fn a_refused_connection_is_a_transport_error() {
    let h = common::harness();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let client = client_for(&h, &format!("http://{addr}/v1"), timeouts(2_000, 10_000), 2);

    let err = client.chat(body()).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Transport { attempts: 2, message, .. } if message.starts_with("upstream connection failed")),
        "{err:?}"
    );
    let row = only_row(&h);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (502, "error", 2)
    );
}

#[tokio::test]
async fn a_200_that_is_not_json_is_an_invalid_response() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![Reply::raw(
        200,
        "text/html",
        "<html><body>Welcome to nginx!</body></html>",
    )])
    .await;
    let client = client(&h, &up);

    let err = client.chat(body()).await.unwrap_err();
    let ClientError::InvalidResponse {
        message,
        request_id,
    } = &err
    else {
        panic!("expected InvalidResponse, got {err:?}");
    };
    assert!(message.contains("not valid JSON"), "{message}");
    assert_eq!(up.requests().len(), 1, "a 2xx is not retried");

    let row = only_row(&h);
    assert_eq!(&row.request_id, request_id);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (502, "error", 1)
    );
    let em = row.error_message.as_deref().unwrap();
    assert!(em.starts_with("invalid upstream response:"), "{em}");
    assert_eq!(row.usage_source, "missing");
}

#[tokio::test]
async fn invalid_request_bodies_are_recorded_and_never_sent() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![]).await;
    let client = client(&h, &up);

    let cases = [
        (
            json!({"model": MODEL}),
            RequestError::MissingPrompt("messages"),
            false,
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            RequestError::MissingModel,
            false,
        ),
        (
            json!(["not", "an", "object"]),
            RequestError::NotObject,
            false,
        ),
        (json!("hello"), RequestError::NotObject, true),
        (
            json!({"model": MODEL}),
            RequestError::MissingPrompt("messages"),
            true,
        ),
    ];
    let mut ids = Vec::new();
    for (body, expected, stream) in cases {
        let err = if stream {
            client.chat_stream(body).await.unwrap_err()
        } else {
            client.chat(body).await.unwrap_err()
        };
        let ClientError::InvalidRequest { source, request_id } = err else {
            panic!("expected InvalidRequest, got {err:?}");
        };
        assert_eq!(source, expected);
        ids.push((request_id, expected));
    }
    assert!(up.requests().is_empty(), "nothing reached the upstream");

    let rows = committed_rows(&h);
    assert_eq!(rows.len(), ids.len());
    for (row, (id, expected)) in rows.iter().zip(&ids) {
        assert_eq!(&row.request_id, id);
        assert_eq!((row.status_code, row.outcome.as_str()), (400, "error"));
        assert_eq!(
            row.error_message.as_deref(),
            Some(expected.to_string().as_str())
        );
        assert_eq!(row.usage_source, "missing");
        assert_eq!(row.cost_picousd, 0);
        assert_eq!(row.key_id.as_deref(), Some(key_fingerprint(KEY).as_str()));
        assert_eq!(
            row.attempts, 0,
            "a rejected request made no upstream attempt"
        );
        if matches!(expected, RequestError::MissingPrompt(_)) {
            assert_eq!(
                row.model, MODEL,
                "the model named in a rejected body is kept"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming calls
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn stream_yields_chunks_in_order_and_hides_the_injected_usage_chunk() {
    let h = common::harness();
    let script = StreamScript::chat(RESPONSE_MODEL, &["Hel", "lo", " world"]).usage(11, 3);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let client = client(&h, &up);

    let stream = client.chat_stream(body()).await.unwrap();
    let request_id = stream.request_id().to_owned();
    let items: Vec<Value> = drain(stream)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    // What the upstream saw: streaming, with usage asked for on the caller's behalf.
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let sent_body = reqs[0].json();
    assert_eq!(sent_body["stream"], true);
    assert_eq!(sent_body["stream_options"]["include_usage"], true);
    assert_eq!(sent_body["messages"], body()["messages"]);

    // What the caller got: every chunk, unchanged and in order, except the usage-only one.
    let sent = up.sent_events(0);
    assert_eq!(sent.len(), 6, "role, 3 deltas, finish, usage");
    let usage_chunk = sent.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["total_tokens"], 14);
    assert_eq!(items, sent[..5].to_vec());
    assert!(
        items
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{items:#?}"
    );
    let text: String = items.iter().filter_map(delta_content).collect();
    assert_eq!(text, "Hello world");

    let row = only_row(&h);
    assert_eq!(row.request_id, request_id);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.attempts),
        (200, "ok", 1)
    );
    assert_eq!(row.stream, 1);
    assert_eq!(row.usage_source, "reported");
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.total_tokens),
        (11, 3, 14)
    );
    assert_eq!(row.cost_picousd, 11 * PICO_IN + 3 * PICO_OUT);
    assert_eq!(row.finish_reason.as_deref(), Some("stop"));
    assert_eq!(row.response_preview, "Hello world");
    assert_eq!(row.response_model.as_deref(), Some(RESPONSE_MODEL));
    let ttft = row.ttft_ms.expect("ttft_ms");
    assert!(
        ttft > 0.0 && ttft <= row.latency_ms,
        "{ttft} vs {}",
        row.latency_ms
    );
    assert_eq!(row.error_message, None);
}

#[tokio::test]
async fn stream_passes_the_usage_chunk_through_when_the_caller_asked() {
    let h = common::harness();
    let script = StreamScript::chat(RESPONSE_MODEL, &["Hi", "!"]).usage(9, 2);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let client = client(&h, &up);

    let mut request = body();
    request["stream_options"] = json!({"include_usage": true});
    let stream = client.chat_stream(request).await.unwrap();
    let items: Vec<Value> = drain(stream)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let sent = up.sent_events(0);
    assert_eq!(items, sent, "every chunk, the usage chunk included");
    let last = items.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 9);
    assert_eq!(
        up.requests()[0].json()["stream_options"],
        json!({"include_usage": true})
    );

    let row = only_row(&h);
    assert_eq!(row.usage_source, "reported");
    assert_eq!((row.prompt_tokens, row.completion_tokens), (9, 2));
    assert_eq!(row.response_preview, "Hi!");
}

#[tokio::test]
async fn stream_chunks_reach_the_caller_before_the_upstream_finishes() {
    let h = common::harness();
    let proceed = Arc::new(Notify::new());
    let script = StreamScript::new(RESPONSE_MODEL)
        .role()
        .content("Hel")
        .wait_for(&proceed)
        .content("lo")
        .sleep(Duration::from_millis(60))
        .content("!")
        .sleep(Duration::from_millis(60))
        .finish("stop")
        .usage(5, 3);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let client = client(&h, &up);

    let mut stream = client.chat_stream(body()).await.unwrap();
    let mut early = Vec::new();
    for _ in 0..2 {
        let item = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a chunk arrives while the upstream is still holding the rest back")
            .expect("stream not over")
            .unwrap();
        early.push(item);
    }
    assert_eq!(delta_content(&early[1]), Some("Hel"));
    // The upstream is parked before its third chunk: the caller got the first two on their own.
    assert_eq!(up.sent_events(0).len(), 2);

    proceed.notify_one();
    let rest: Vec<Value> = drain(stream)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let text: String = early
        .iter()
        .chain(&rest)
        .filter_map(delta_content)
        .collect();
    assert_eq!(text, "Hello!");
    assert_eq!(up.sent_events(0).len(), 6);

    let row = only_row(&h);
    assert_eq!(
        (row.outcome.as_str(), row.usage_source.as_str()),
        ("ok", "reported")
    );
    assert_eq!(row.response_preview, "Hello!");
    let ttft = row.ttft_ms.expect("ttft_ms");
    assert!(
        row.latency_ms - ttft >= 120.0,
        "the pauses come after the first chunk: ttft {ttft} ms, latency {} ms",
        row.latency_ms
    );
}

#[tokio::test]
async fn a_stream_cut_midway_is_recorded_with_estimated_usage() {
    let h = common::harness();
    let script = StreamScript::new(RESPONSE_MODEL)
        .role()
        .content("Hel")
        .content("lo")
        .ending(Ending::Cut);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let client = client(&h, &up);

    let stream = client.chat_stream(body()).await.unwrap();
    let items = drain(stream).await;

    assert_eq!(items.len(), 4, "{items:?}");
    let text: String = items[..3]
        .iter()
        .map(|i| i.as_ref().unwrap())
        .filter_map(delta_content)
        .collect();
    assert_eq!(text, "Hello");
    let Err(ClientError::Transport { message, .. }) = &items[3] else {
        panic!("expected a Transport error last, got {:?}", items[3]);
    };
    assert!(message.starts_with("upstream stream broke"), "{message}");

    let row = only_row(&h);
    assert_eq!((row.status_code, row.outcome.as_str()), (502, "error"));
    assert_eq!(row.error_message.as_deref(), Some(message.as_str()));
    assert_eq!(row.usage_source, "estimated");
    assert!(
        row.prompt_tokens > 0 && row.completion_tokens > 0,
        "{row:?}"
    );
    assert!(row.cost_picousd > 0);
    assert_eq!(row.response_preview, "Hello");
    assert_eq!(row.finish_reason, None);
    assert_eq!(row.stream, 1);
}

#[tokio::test]
async fn a_stream_ending_without_done_or_usage_is_recorded_with_estimated_usage() {
    let h = common::harness();
    let script = StreamScript::chat(RESPONSE_MODEL, &["Hel", "lo"]).ending(Ending::NoDone);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let client = client(&h, &up);

    let stream = client.chat_stream(body()).await.unwrap();
    let items: Vec<Value> = drain(stream)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(items, up.sent_events(0));

    let row = only_row(&h);
    assert_eq!(row.status_code, 200);
    assert_eq!(row.usage_source, "estimated");
    assert!(
        row.prompt_tokens > 0 && row.completion_tokens > 0,
        "{row:?}"
    );
    assert_eq!(row.response_preview, "Hello");
}

#[tokio::test]
async fn dropping_a_stream_records_an_aborted_call() {
    let h = common::harness();
    let never = Arc::new(Notify::new());
    let script = StreamScript::new(RESPONSE_MODEL)
        .content("Hel")
        .wait_for(&never)
        .content("lo")
        .finish("stop");
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let client = client(&h, &up);

    let mut stream = client.chat_stream(body()).await.unwrap();
    let request_id = stream.request_id().to_owned();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delta_content(&first), Some("Hel"));
    drop(stream);

    let row = only_row(&h);
    assert_eq!(row.request_id, request_id);
    assert_eq!((row.status_code, row.outcome.as_str()), (200, "aborted"));
    assert_eq!(
        row.error_message.as_deref(),
        Some("client disconnected before the answer was complete")
    );
    assert_eq!(row.usage_source, "estimated");
    assert!(row.completion_tokens > 0, "{row:?}");
    assert_eq!(row.response_preview, "Hel");
    assert!(row.ttft_ms.is_some());
    assert_eq!(row.stream, 1);
}

#[tokio::test]
async fn a_stream_refused_by_the_upstream_is_an_upstream_error() {
    let h = common::harness();
    let msg = "The model `gpt-9` does not exist or you do not have access to it.";
    let up = FakeUpstream::start(vec![Reply::error(404, "model_not_found", msg)]).await;
    let client = client(&h, &up);

    let err = client.chat_stream(body()).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Upstream { status: 404, attempts: 1, message, .. } if message == msg),
        "{err:?}"
    );
    let row = only_row(&h);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.stream),
        (404, "error", 1)
    );
    assert_eq!(row.error_message.as_deref(), Some(msg));
}

// ---------------------------------------------------------------------------------------------
// Bugs found in src/ (see the report): these fail until fixed.
// ---------------------------------------------------------------------------------------------

/// The error a broken stream yields must carry the call's attempt count, like every other
/// `ClientError` and like the record (src/client/stream.rs hardcodes `attempts: 1`).
#[tokio::test]
async fn a_broken_stream_error_carries_the_calls_attempt_count() {
    let h = common::harness();
    let script = StreamScript::new(RESPONSE_MODEL)
        .content("Hel")
        .ending(Ending::Cut);
    let up = FakeUpstream::start(vec![
        Reply::error(503, "server_error", "overloaded"),
        Reply::stream(script),
    ])
    .await;
    let client = client(&h, &up);

    let stream = client.chat_stream(body()).await.unwrap();
    let items = drain(stream).await;
    let row = only_row(&h);
    assert_eq!(row.attempts, 2);
    let Some(Err(ClientError::Transport { attempts, .. })) = items.last() else {
        panic!("expected a Transport error last, got {items:?}");
    };
    assert_eq!(i64::from(*attempts), row.attempts);
}

/// The attempt timeout covers "sending to the complete answer" (Timeouts::attempt), so an
/// answer whose headers come late and whose body never comes must fail at ~attempt, not at
/// headers + attempt (src/client/mod.rs gives the body read a fresh attempt budget).
#[tokio::test]
async fn reading_the_body_counts_against_the_attempt_timeout() {
    let h = common::harness();
    let up = FakeUpstream::start(vec![
        Reply::stall_body(200).delay(Duration::from_millis(500)),
    ])
    .await;
    let client = client_for(&h, &up.base_url(), timeouts(600, 10_000), 1);

    let started = Instant::now();
    let err = client.chat(body()).await.unwrap_err();
    let elapsed = started.elapsed();

    assert!(
        matches!(&err, ClientError::Timeout { message, .. } if message == "Request timeout (0.6s)"),
        "{err:?}"
    );
    assert!(
        elapsed < Duration::from_millis(950),
        "the attempt timeout is 600 ms, the call took {elapsed:?}"
    );
    let row = only_row(&h);
    assert_eq!(row.status_code, 408);
}

/// `"stream_options": null` means the caller did not ask for usage: the client must still
/// inject `include_usage` (src/client/stream.rs gives up on a non-object value).
#[tokio::test]
async fn null_stream_options_still_get_usage_injected() {
    let h = common::harness();
    let script = StreamScript::chat(RESPONSE_MODEL, &["Hi"]).usage(7, 1);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let client = client(&h, &up);

    let mut request = body();
    request["stream_options"] = Value::Null;
    let stream = client.chat_stream(request).await.unwrap();
    let items: Vec<Value> = drain(stream)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    assert_eq!(
        up.requests()[0].json()["stream_options"]["include_usage"],
        true
    );
    assert!(
        items.iter().all(|c| c["choices"] != json!([])),
        "usage chunk hidden"
    );
    let row = only_row(&h);
    assert_eq!(row.usage_source, "reported");
    assert_eq!((row.prompt_tokens, row.completion_tokens), (7, 1));
}
