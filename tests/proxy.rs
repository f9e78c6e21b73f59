#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The audit proxy in-process (`serve::launch`, real listeners on 127.0.0.1:0, a real SQLite
//! file) in front of the scripted fake OpenAI upstream: what the client receives, what the
//! upstream received, the committed rows and the metrics.

mod fake_upstream;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_audit::audit::recorder::key_fingerprint;
use llm_audit::config::{AuthMode, Config, ManagedKey};
use llm_audit::serve::Stack;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use fake_upstream::{Ending, FakeUpstream, Reply, StreamScript, chat_completion};

const CLIENT_KEY: &str = "sk-proj-cLiEnTkEy0123456789abcdefABCDEFghij";
const UPSTREAM_KEY: &str = "sk-upstream-UpStReAmKeY9876543210fedcbaZYX";
const MODEL: &str = "gpt-4.1-mini";
const RESPONSE_MODEL: &str = "gpt-4.1-mini-2025-04-14";
const REQUEST_ID: &str = "x-llm-audit-request-id";
const COST: &str = "x-llm-audit-cost-usd";
const CHAT: &str = "/v1/chat/completions";
/// How long any single wait in these tests may take before it counts as a failure.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A running proxy over its own temp dir and database.
struct Proxy {
    stack: Stack,
    dir: tempfile::TempDir,
    db: PathBuf,
    base: String,
    metrics_url: String,
    http: reqwest::Client,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

/// Proxy in front of `upstream_url`, with short but unhurried limits; `edit` adjusts the
/// config (it gets the temp dir, for key files).
async fn start_url(upstream_url: &str, edit: impl FnOnce(&mut Config, &Path)) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.metrics_listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.shutdown_grace.0 = Duration::from_secs(5);
    cfg.upstream.url = upstream_url.to_owned();
    cfg.upstream.connect_timeout.0 = Duration::from_secs(2);
    cfg.upstream.first_byte_timeout.0 = DEADLINE;
    cfg.upstream.idle_timeout.0 = DEADLINE;
    cfg.store.path = dir.path().join("audit.db");
    cfg.store.flush_interval.0 = Duration::from_millis(5);
    edit(&mut cfg, dir.path());
    let stack = llm_audit::serve::launch(&cfg, false).await.unwrap();
    Proxy {
        base: format!("http://{}", stack.running.addr),
        metrics_url: format!("http://{}/metrics", stack.running.metrics_addr),
        db: cfg.store.path.clone(),
        stack,
        dir,
        http: http_client(),
    }
}

async fn start(up: &FakeUpstream, edit: impl FnOnce(&mut Config, &Path)) -> Proxy {
    start_url(&up.base_url(), edit).await
}

/// Keys mode: `CLIENT_KEY` belongs to `alice`; the proxy's upstream key is `UPSTREAM_KEY`.
fn keys_mode(cfg: &mut Config, dir: &Path) {
    let key_file = dir.join("upstream.key");
    std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
    cfg.auth.mode = AuthMode::Keys;
    cfg.auth.upstream_api_key_file = Some(key_file);
    cfg.auth.keys = vec![ManagedKey {
        sha256: hex::encode(Sha256::digest(CLIENT_KEY.as_bytes())),
        user: "alice".into(),
    }];
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

impl Proxy {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A POST as an OpenAI SDK sends it: JSON, with the client's key.
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .header("authorization", bearer(CLIENT_KEY))
            .header("content-type", "application/json")
    }

    async fn chat(&self, body: &Value) -> reqwest::Response {
        self.post(CHAT).body(body.to_string()).send().await.unwrap()
    }

    async fn scrape(&self) -> Scrape {
        let resp = self.http.get(&self.metrics_url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        Scrape(resp.text().await.unwrap())
    }

    /// Polls the database (while the proxy runs) until it holds `n` rows.
    async fn wait_rows(&self, n: usize) -> Vec<Row> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let rows = read_rows(&self.db);
            if rows.len() >= n {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} rows, have {rows:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the proxy in order (every record committed) and reads the rows; also returns the
    /// bytes of the database files, for secret scans.
    async fn finish_with_files(self) -> (Vec<Row>, Vec<u8>) {
        self.stack.shutdown().await;
        let rows = read_rows(&self.db);
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.to_string_lossy().contains("audit.db") {
                bytes.extend(std::fs::read(&path).unwrap());
            }
        }
        (rows, bytes)
    }

    async fn finish(self) -> Vec<Row> {
        self.finish_with_files().await.0
    }

    async fn only_row(self) -> Row {
        let mut rows = self.finish().await;
        assert_eq!(rows.len(), 1, "expected exactly one record: {rows:#?}");
        rows.remove(0)
    }
}

#[derive(Clone, Debug)]
struct Row {
    request_id: String,
    model: String,
    status_code: i64,
    outcome: String,
    error_message: Option<String>,
    usage_source: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    cost_usd: f64,
    user_id: Option<String>,
    ip_address: Option<String>,
    key_id: Option<String>,
    endpoint: String,
    stream: i64,
    ttft_ms: Option<f64>,
    latency_ms: f64,
    response_preview: Option<String>,
    response_model: Option<String>,
    finish_reason: Option<String>,
    attempts: i64,
}

fn read_rows(db: &Path) -> Vec<Row> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT * FROM audit_logs ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Row {
            request_id: r.get("request_id")?,
            model: r.get("model")?,
            status_code: r.get("status_code")?,
            outcome: r.get("outcome")?,
            error_message: r.get("error_message")?,
            usage_source: r.get("usage_source")?,
            prompt_tokens: r.get("prompt_tokens")?,
            completion_tokens: r.get("completion_tokens")?,
            total_tokens: r.get("total_tokens")?,
            cost_usd: r.get("cost_usd")?,
            user_id: r.get("user_id")?,
            ip_address: r.get("ip_address")?,
            key_id: r.get("key_id")?,
            endpoint: r.get("endpoint")?,
            stream: r.get("stream")?,
            ttft_ms: r.get("ttft_ms")?,
            latency_ms: r.get("latency_ms")?,
            response_preview: r.get("response_preview")?,
            response_model: r.get("response_model")?,
            finish_reason: r.get("finish_reason")?,
            attempts: r.get("attempts")?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// A Prometheus text exposition.
struct Scrape(String);

impl Scrape {
    /// The value of the series `name` whose labels include `labels`, if exactly one matches.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matches: Vec<f64> = self
            .0
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, set) = parse_series(series);
                (n == name
                    && labels
                        .iter()
                        .all(|(k, v)| set.get(*k).map(String::as_str) == Some(*v)))
                .then(|| value.parse().unwrap())
            })
            .collect();
        assert!(matches.len() <= 1, "{name} {labels:?} is ambiguous");
        matches.first().copied()
    }

    /// Sum of every series of `name`.
    fn sum(&self, name: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(s, _)| parse_series(s).0 == name)
            .map(|(_, v)| v.parse::<f64>().unwrap())
            .sum()
    }
}

fn parse_series(series: &str) -> (&str, BTreeMap<String, String>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series, BTreeMap::new());
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.trim_end_matches('}').chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'));
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next().unwrap()),
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    (name, labels)
}

fn chat_body() -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello."}
        ]
    })
}

fn stream_body() -> Value {
    let mut b = chat_body();
    b["stream"] = json!(true);
    b
}

/// One SSE event exactly as the fake upstream writes it.
fn frame(event: &Value) -> String {
    format!("data: {event}\n\n")
}

/// The `data:` JSON events of an SSE body (`[DONE]` excluded).
fn events(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn text_of(body: &[u8]) -> String {
    events(body)
        .iter()
        .filter_map(|e| {
            e.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

/// Reads the streamed body until it contains `needle`.
async fn read_until(resp: &mut reqwest::Response, buf: &mut Vec<u8>, needle: &str) {
    tokio::time::timeout(DEADLINE, async {
        while !String::from_utf8_lossy(buf).contains(needle) {
            let chunk = resp
                .chunk()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("stream ended before {needle:?}"));
            buf.extend_from_slice(&chunk);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{needle:?} did not arrive; have {:?}",
            String::from_utf8_lossy(buf)
        )
    });
}

/// Reads the streamed body until it holds `n` complete events.
async fn read_events(resp: &mut reqwest::Response, buf: &mut Vec<u8>, n: usize) {
    tokio::time::timeout(DEADLINE, async {
        while !(buf.ends_with(b"\n\n") && events(buf).len() >= n) {
            let chunk = resp.chunk().await.unwrap().expect("stream ended early");
            buf.extend_from_slice(&chunk);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{n} events did not arrive; have {:?}",
            String::from_utf8_lossy(buf)
        )
    });
}

/// Reads the rest of a streamed body; `Err` with what had arrived when it broke.
async fn read_rest(resp: &mut reqwest::Response, buf: &mut Vec<u8>) -> Result<(), String> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => buf.extend_from_slice(&c),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .expect("the stream ends")
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", resp.headers()))
        .to_str()
        .unwrap()
}

/// An error answer: status, OpenAI's shape, the request id. Returns (message, request id).
async fn openai_error(resp: reqwest::Response, status: u16, code: &str) -> (String, String) {
    assert_eq!(resp.status().as_u16(), status);
    let request_id = header(&resp, REQUEST_ID).to_owned();
    assert!(
        header(&resp, "content-type").starts_with("application/json"),
        "{:?}",
        resp.headers()
    );
    let body: Value = resp.json().await.unwrap();
    let err = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{body}"));
    let message = err["message"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(!message.is_empty(), "{body}");
    assert!(
        err["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert_eq!(err["code"], code, "{body}");
    (message.to_owned(), request_id)
}

/// A request the proxy refused itself: OpenAI-shaped error, one row with the status and the
/// message, nothing sent upstream.
async fn assert_refused(
    p: Proxy,
    up: &FakeUpstream,
    resp: reqwest::Response,
    status: u16,
    code: &str,
) -> Row {
    let (message, request_id) = openai_error(resp, status, code).await;
    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!(
        (row.status_code, row.outcome.as_str()),
        (i64::from(status), "error")
    );
    assert_eq!(row.error_message.as_deref(), Some(message.as_str()));
    assert_eq!(row.endpoint, CHAT);
    assert_eq!(row.attempts, 0, "{row:?}");
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    row
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn json_answer_is_byte_identical_to_the_upstreams_and_carries_id_and_cost() {
    let reply = || Reply::chat(RESPONSE_MODEL, "Hello there!", 12, 3);
    let up = FakeUpstream::start(vec![reply(), reply()]).await;
    // Valid but unusual formatting: the proxy forwards the client's bytes, not a re-encoding.
    let body = "{ \"messages\": [ {\"role\":\"user\", \"content\":\"Say hi — ünï\"} ],\n  \"model\": \"gpt-4.1-mini\", \"temperature\": 0.5 }\n";

    let direct = http_client()
        .post(format!("{}/chat/completions", up.base_url()))
        .header("authorization", bearer(CLIENT_KEY))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    let direct = direct.bytes().await.unwrap();

    let p = start(&up, |_, _| {}).await;
    let resp = p.post(CHAT).body(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "content-type").starts_with("application/json"));
    let request_id = header(&resp, REQUEST_ID).to_owned();
    let cost: f64 = header(&resp, COST).parse().unwrap();
    let got = resp.bytes().await.unwrap();
    assert_eq!(
        got, direct,
        "via the proxy == calling the upstream directly"
    );
    assert_eq!(
        got,
        chat_completion(RESPONSE_MODEL, "Hello there!", 12, 3).to_string()
    );

    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    let forwarded = &reqs[1];
    assert_eq!(
        (forwarded.method.as_str(), forwarded.path.as_str()),
        ("POST", CHAT)
    );
    assert_eq!(
        forwarded.body,
        body.as_bytes(),
        "the request body is forwarded unchanged"
    );

    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!(
        row.cost_usd, cost,
        "x-llm-audit-cost-usd is the row's cost_usd"
    );
    assert!(cost > 0.0);
    assert_eq!(
        (
            row.status_code,
            row.outcome.as_str(),
            row.usage_source.as_str()
        ),
        (200, "ok", "reported")
    );
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.total_tokens),
        (12, 3, 15)
    );
    assert_eq!(
        (row.model.as_str(), row.endpoint.as_str(), row.stream),
        (MODEL, CHAT, 0)
    );
    assert_eq!(row.response_model.as_deref(), Some(RESPONSE_MODEL));
    assert_eq!(row.response_preview.as_deref(), Some("Hello there!"));
    assert_eq!(row.finish_reason.as_deref(), Some("stop"));
    assert_eq!(row.attempts, 1);
    assert_eq!(row.ip_address.as_deref(), Some("127.0.0.1"));
    assert_eq!(row.error_message, None);
}

#[tokio::test]
async fn stream_is_byte_identical_except_the_injected_usage_chunk() {
    let script = || StreamScript::chat(RESPONSE_MODEL, &["Hel", "lo", " world"]).usage(11, 3);
    let up = FakeUpstream::start(vec![Reply::stream(script()), Reply::stream(script())]).await;
    let p = start(&up, |_, _| {}).await;

    let body = r#"{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"Say hello."}],"stream":true}"#;
    let resp = p.post(CHAT).body(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    let request_id = header(&resp, REQUEST_ID).to_owned();
    assert!(
        resp.headers().get(COST).is_none(),
        "a stream's cost is not known when its headers leave"
    );
    let got = String::from_utf8(resp.bytes().await.unwrap().to_vec()).unwrap();

    // The upstream was asked for usage on the client's behalf, the client's bytes otherwise kept.
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].wants_usage());
    let expected_body = format!(
        "{},\"stream_options\":{{\"include_usage\":true}}}}",
        &body[..body.len() - 1]
    );
    assert_eq!(String::from_utf8_lossy(&reqs[0].body), expected_body);

    // The client got every byte the upstream sent, except the usage-only chunk.
    let sent = up.sent_events(0);
    assert_eq!(sent.len(), 6, "role, 3 deltas, finish, usage");
    let usage_chunk = &sent[5];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["total_tokens"], 14);
    let expected: String = sent[..5].iter().map(frame).collect::<String>() + "data: [DONE]\n\n";
    assert_eq!(got, expected);

    // Calling the upstream directly with the body it received: the same bytes plus that chunk.
    let direct = http_client()
        .post(format!("{}/chat/completions", up.base_url()))
        .header("content-type", "application/json")
        .body(reqs[0].body.clone())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let direct = String::from_utf8(direct.to_vec()).unwrap();
    let usage_frame = frame(usage_chunk);
    assert!(direct.contains(&usage_frame), "{direct}");
    assert_eq!(direct.replacen(&usage_frame, "", 1), got);

    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!(
        (row.status_code, row.outcome.as_str(), row.stream),
        (200, "ok", 1)
    );
    assert_eq!(row.usage_source, "reported");
    assert_eq!((row.prompt_tokens, row.completion_tokens), (11, 3));
    assert_eq!(row.response_preview.as_deref(), Some("Hello world"));
    assert_eq!(row.finish_reason.as_deref(), Some("stop"));
    assert!(row.cost_usd > 0.0);
    let ttft = row.ttft_ms.expect("ttft_ms");
    assert!(ttft > 0.0 && ttft <= row.latency_ms, "{row:?}");
}

#[tokio::test]
async fn stream_passes_the_usage_chunk_through_when_the_client_asked() {
    let script = || StreamScript::chat(RESPONSE_MODEL, &["Hi", "!"]).usage(9, 2);
    let up = FakeUpstream::start(vec![Reply::stream(script()), Reply::stream(script())]).await;
    let p = start(&up, |_, _| {}).await;

    let body = r#"{"model":"gpt-4.1-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hi"}]}"#;
    let got = p
        .post(CHAT)
        .body(body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let direct = http_client()
        .post(format!("{}/chat/completions", up.base_url()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        got, direct,
        "via the proxy == calling the upstream directly"
    );

    let reqs = up.requests();
    assert_eq!(reqs[0].body, body.as_bytes(), "nothing injected");
    let sent = up.sent_events(0);
    let expected: String = sent.iter().map(frame).collect::<String>() + "data: [DONE]\n\n";
    assert_eq!(got, expected);
    assert_eq!(sent.last().unwrap()["usage"]["prompt_tokens"], 9);

    let row = p.only_row().await;
    assert_eq!(row.usage_source, "reported");
    assert_eq!((row.prompt_tokens, row.completion_tokens), (9, 2));
}

#[tokio::test]
async fn stream_chunks_reach_the_client_before_the_upstream_finishes() {
    let proceed = Arc::new(Notify::new());
    let script = StreamScript::new(RESPONSE_MODEL)
        .role()
        .content("Hel")
        .wait_for(&proceed)
        .content("lo")
        .finish("stop")
        .usage(5, 2);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let p = start(&up, |_, _| {}).await;

    let mut resp = p.chat(&stream_body()).await;
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    read_events(&mut resp, &mut buf, 2).await;
    // The upstream is parked before its third event: the client already holds the first two,
    // byte for byte, and the call is still in flight (no record, no count yet).
    let held = Instant::now();
    let sent = up.sent_events(0);
    assert_eq!(sent.len(), 2);
    assert_eq!(
        String::from_utf8_lossy(&buf),
        sent.iter().map(frame).collect::<String>()
    );
    assert_eq!(text_of(&buf), "Hel");
    assert_eq!(p.scrape().await.sum("llm_audit_requests_total"), 0.0);
    assert!(read_rows(&p.db).is_empty());
    let held_ms = held.elapsed().as_secs_f64() * 1000.0;

    proceed.notify_one();
    read_rest(&mut resp, &mut buf).await.unwrap();
    assert_eq!(text_of(&buf), "Hello");
    assert_eq!(up.sent_events(0).len(), 5);

    let row = p.only_row().await;
    assert_eq!(
        (row.outcome.as_str(), row.usage_source.as_str()),
        ("ok", "reported")
    );
    let ttft = row.ttft_ms.expect("ttft_ms recorded");
    assert!(ttft > 0.0, "{row:?}");
    // The first chunk came before the upstream was released, the end after it.
    assert!(
        row.latency_ms - ttft >= held_ms - 0.5,
        "ttft {ttft} ms, latency {} ms, held {held_ms} ms",
        row.latency_ms
    );
}

// ---------------------------------------------------------------------------------------------
// Streams that end badly
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_disconnect_mid_stream_is_recorded_as_aborted_with_estimated_usage() {
    let never = Arc::new(Notify::new());
    let script = StreamScript::new(RESPONSE_MODEL)
        .role()
        .content("Partial answer")
        .wait_for(&never)
        .content(" never sent")
        .finish("stop")
        .usage(5, 9);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let p = start(&up, |_, _| {}).await;

    let mut resp = p.chat(&stream_body()).await;
    let request_id = header(&resp, REQUEST_ID).to_owned();
    let mut buf = Vec::new();
    read_until(&mut resp, &mut buf, "Partial answer").await;
    drop(resp);

    // The upstream is still holding the rest back: the record comes from the disconnect alone.
    let rows = p.wait_rows(1).await;
    let row = &rows[0];
    assert_eq!(row.request_id, request_id);
    assert_eq!((row.status_code, row.outcome.as_str()), (200, "aborted"));
    assert_eq!(row.usage_source, "estimated");
    assert!(
        row.prompt_tokens > 0 && row.completion_tokens > 0,
        "{row:?}"
    );
    assert_eq!(row.response_preview.as_deref(), Some("Partial answer"));
    assert!(row.ttft_ms.is_some());
    assert_eq!(
        row.error_message.as_deref(),
        Some("client disconnected before the answer was complete")
    );
    assert_eq!(up.sent_events(0).len(), 2);
    let scrape = p.scrape().await;
    assert_eq!(
        scrape.value(
            "llm_audit_requests_total",
            &[("outcome", "aborted"), ("status", "200")]
        ),
        Some(1.0)
    );
    // The proxy's own answers exist at 0 from start-up (model `unknown`), so a rule's first
    // increase() is a step from 0.
    assert_eq!(
        scrape.value(
            "llm_audit_requests_total",
            &[
                ("outcome", "aborted"),
                ("status", "499"),
                ("model", "unknown")
            ]
        ),
        Some(0.0)
    );
    assert_eq!(p.finish().await.len(), 1);
}

/// A client that hangs up while the proxy still waits for the upstream's answer leaves a
/// record too: the upstream got the call (and bills it). hyper drops the handler's future when
/// the client goes away, so nothing after that `await` ever runs.
#[tokio::test]
async fn client_disconnect_before_the_answer_is_recorded_as_aborted() {
    let up = FakeUpstream::start(vec![Reply::hang(), Reply::hang()]).await;
    // A first-byte timeout far beyond the deadline: only the disconnect can end these calls.
    let p = start(&up, |cfg, _| {
        cfg.upstream.first_byte_timeout.0 = Duration::from_secs(600);
    })
    .await;
    for (i, body) in [chat_body(), stream_body()].into_iter().enumerate() {
        let call = tokio::spawn(p.post(CHAT).body(body.to_string()).send());
        let deadline = Instant::now() + DEADLINE;
        while up.requests().len() <= i {
            assert!(
                Instant::now() < deadline,
                "the call never reached the upstream"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());

        let rows = p.wait_rows(i + 1).await;
        let row = &rows[i];
        assert_eq!(row.outcome, "aborted", "{row:?}");
        assert_eq!(
            row.status_code, 499,
            "nginx's 'client closed request': {row:?}"
        );
        assert_eq!(
            row.error_message.as_deref(),
            Some("client disconnected before the answer was complete")
        );
        assert_eq!(row.stream, i as i64);
        assert_eq!(row.attempts, 1);
        assert_eq!(
            row.usage_source, "estimated",
            "the prompt was sent: {row:?}"
        );
        assert!(
            row.prompt_tokens > 0 && row.completion_tokens == 0,
            "{row:?}"
        );
    }
    assert_eq!(p.finish().await.len(), 2);
}

#[tokio::test]
async fn upstream_cut_mid_stream_is_an_error_with_a_message() {
    let script = StreamScript::new(RESPONSE_MODEL)
        .role()
        .content("Hel")
        .ending(Ending::Cut);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let p = start(&up, |_, _| {}).await;

    let mut resp = p.chat(&stream_body()).await;
    assert_eq!(resp.status(), 200);
    let request_id = header(&resp, REQUEST_ID).to_owned();
    let mut buf = Vec::new();
    let broke = read_rest(&mut resp, &mut buf).await;
    assert!(
        broke.is_err(),
        "the client must see the stream break, not a clean end"
    );
    assert_eq!(text_of(&buf), "Hel");

    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!((row.status_code, row.outcome.as_str()), (502, "error"));
    let message = row.error_message.as_deref().unwrap();
    assert!(message.contains("stream broke"), "{message}");
    assert_eq!(row.usage_source, "estimated");
    assert_eq!(row.response_preview.as_deref(), Some("Hel"));
}

#[tokio::test]
async fn upstream_reset_before_the_answer_is_a_502() {
    let up = FakeUpstream::start(vec![Reply::reset()]).await;
    let p = start(&up, |_, _| {}).await;
    let resp = p.chat(&chat_body()).await;
    let (message, request_id) = openai_error(resp, 502, "upstream_unreachable").await;
    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!((row.status_code, row.outcome.as_str()), (502, "error"));
    assert_eq!(row.error_message.as_deref(), Some(message.as_str()));
    assert!(
        message.starts_with("upstream connection failed"),
        "{message}"
    );
    assert_eq!(up.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Upstream errors and timeouts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_429_and_5xx_pass_through_with_their_bodies_and_are_recorded() {
    let cases = [
        (
            429,
            "rate_limit_exceeded",
            "Rate limit reached for gpt-4.1-mini on tokens per min.",
        ),
        (
            500,
            "server_error",
            "The server had an error while processing your request.",
        ),
        (
            503,
            "service_unavailable",
            "The engine is currently overloaded.",
        ),
    ];
    let replies = cases
        .iter()
        .map(|(s, k, m)| Reply::error(*s, k, m).header("retry-after", "7"))
        .collect();
    let up = FakeUpstream::start(replies).await;
    let p = start(&up, |_, _| {}).await;

    let mut ids = Vec::new();
    for (i, (status, kind, message)) in cases.iter().enumerate() {
        // The last one asked for a stream: an error answer is JSON all the same.
        let body = if i == 2 { stream_body() } else { chat_body() };
        let resp = p.chat(&body).await;
        assert_eq!(resp.status().as_u16(), *status);
        assert_eq!(header(&resp, "retry-after"), "7");
        ids.push(header(&resp, REQUEST_ID).to_owned());
        let got = resp.bytes().await.unwrap();
        let sent =
            json!({"error": {"message": message, "type": kind, "param": null, "code": kind}});
        assert_eq!(got, sent.to_string(), "the upstream's body, unchanged");
    }
    assert_eq!(up.requests().len(), 3, "no proxy-side retries by default");

    let rows = p.finish().await;
    assert_eq!(rows.len(), 3);
    for ((row, (status, _, message)), id) in rows.iter().zip(&cases).zip(&ids) {
        assert_eq!(&row.request_id, id);
        assert_eq!(
            (row.status_code, row.outcome.as_str()),
            (i64::from(*status), "error")
        );
        assert_eq!(row.error_message.as_deref(), Some(*message));
        assert_eq!(row.usage_source, "missing");
        assert_eq!(row.attempts, 1);
    }
}

#[tokio::test]
async fn upstream_silent_before_headers_is_a_504_naming_the_first_byte_timeout() {
    let up = FakeUpstream::start(vec![Reply::hang()]).await;
    let p = start(&up, |cfg, _| {
        cfg.upstream.first_byte_timeout.0 = Duration::from_millis(300);
    })
    .await;
    let started = Instant::now();
    let resp = p.chat(&chat_body()).await;
    let (message, request_id) = openai_error(resp, 504, "timeout").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(message, "upstream first-byte timeout (300ms)");

    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!((row.status_code, row.outcome.as_str()), (504, "error"));
    assert_eq!(row.error_message.as_deref(), Some(message.as_str()));
}

#[tokio::test]
async fn a_stream_that_goes_silent_is_recorded_as_a_504_idle_timeout() {
    let never = Arc::new(Notify::new());
    let script = StreamScript::new(RESPONSE_MODEL)
        .role()
        .content("Hel")
        .wait_for(&never)
        .finish("stop");
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let p = start(&up, |cfg, _| {
        cfg.upstream.idle_timeout.0 = Duration::from_millis(500);
    })
    .await;

    let mut resp = p.chat(&stream_body()).await;
    assert_eq!(resp.status(), 200);
    let request_id = header(&resp, REQUEST_ID).to_owned();
    let mut buf = Vec::new();
    let broke = read_rest(&mut resp, &mut buf).await;
    assert!(broke.is_err(), "the client sees the stream break");
    assert_eq!(text_of(&buf), "Hel");

    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!((row.status_code, row.outcome.as_str()), (504, "error"));
    assert_eq!(
        row.error_message.as_deref(),
        Some("upstream idle timeout (500ms)")
    );
    assert_eq!(row.response_preview.as_deref(), Some("Hel"));
}

/// The idle limit is silence, not length: chunks every 200 ms for 1.6 s against a 500 ms limit
/// pass, and so does a usage chunk after the last pause.
#[tokio::test]
async fn a_slow_but_steady_stream_outlives_the_idle_limit() {
    let mut script = StreamScript::new(RESPONSE_MODEL).role();
    for piece in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        script = script.sleep(Duration::from_millis(200)).content(piece);
    }
    let script = script.finish("stop").usage(7, 8);
    let up = FakeUpstream::start(vec![Reply::stream(script)]).await;
    let p = start(&up, |cfg, _| {
        cfg.upstream.idle_timeout.0 = Duration::from_millis(500);
    })
    .await;
    let mut resp = p.chat(&stream_body()).await;
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    read_rest(&mut resp, &mut buf).await.unwrap();
    assert_eq!(text_of(&buf), "abcdefgh");
    let row = p.only_row().await;
    assert_eq!((row.status_code, row.outcome.as_str()), (200, "ok"));
    assert_eq!((row.prompt_tokens, row.completion_tokens), (7, 8));
}

#[tokio::test]
async fn a_json_body_that_never_comes_is_a_504_idle_timeout() {
    let up = FakeUpstream::start(vec![Reply::stall_body(200)]).await;
    let p = start(&up, |cfg, _| {
        cfg.upstream.idle_timeout.0 = Duration::from_millis(300);
    })
    .await;
    let resp = p.chat(&chat_body()).await;
    let (message, _) = openai_error(resp, 504, "timeout").await;
    assert_eq!(message, "upstream idle timeout (300ms)");
    let row = p.only_row().await;
    assert_eq!(row.status_code, 504);
    assert_eq!(row.error_message.as_deref(), Some(message.as_str()));
}

#[tokio::test]
async fn a_refused_connection_is_a_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let p = start_url(&format!("http://{addr}/v1"), |_, _| {}).await;
    let resp = p.chat(&chat_body()).await;
    let (message, request_id) = openai_error(resp, 502, "upstream_unreachable").await;
    assert!(
        message.starts_with("upstream connection failed"),
        "{message}"
    );
    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!((row.status_code, row.outcome.as_str()), (502, "error"));
    assert_eq!(row.error_message.as_deref(), Some(message.as_str()));
    assert_eq!(row.usage_source, "missing");
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn passthrough_forwards_the_clients_key_and_records_only_its_fingerprint() {
    let up = FakeUpstream::start(vec![Reply::chat(RESPONSE_MODEL, "ok", 3, 1)]).await;
    let p = start(&up, |_, _| {}).await;
    let resp = p.chat(&chat_body()).await;
    assert_eq!(resp.status(), 200);
    let reqs = up.requests();
    assert_eq!(
        reqs[0].header("authorization"),
        Some(bearer(CLIENT_KEY).as_str())
    );

    let scrape = p.scrape().await;
    assert!(!scrape.0.contains(CLIENT_KEY));
    let (rows, files) = p.finish_with_files().await;
    assert_eq!(rows.len(), 1);
    let key_id = rows[0].key_id.clone().unwrap();
    assert_eq!(key_id, key_fingerprint(CLIENT_KEY));
    assert!(key_id.starts_with("key_"));
    assert!(!files.is_empty());
    assert!(
        !contains(&files, CLIENT_KEY.as_bytes()),
        "the key is in the database"
    );
    assert!(!contains(&files, &CLIENT_KEY.as_bytes()[3..]));
}

#[tokio::test]
async fn managed_key_is_swapped_for_the_upstream_key_and_mapped_to_its_user() {
    let up = FakeUpstream::start(vec![Reply::chat(RESPONSE_MODEL, "ok", 3, 1)]).await;
    let p = start(&up, keys_mode).await;
    // The managed key's user wins over the body's `user` and the header.
    let mut body = chat_body();
    body["user"] = json!("body-user");
    let resp = p
        .post(CHAT)
        .header("x-llm-audit-user", "header-user")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].header("authorization"),
        Some(bearer(UPSTREAM_KEY).as_str())
    );
    assert!(
        reqs[0].headers.iter().all(|(_, v)| !v.contains(CLIENT_KEY)),
        "the client's key never goes upstream"
    );
    let scrape = p.scrape().await;
    assert_eq!(
        scrape.sum("llm_audit_auth_failures_total"),
        0.0,
        "{}",
        scrape.0
    );

    let (rows, files) = p.finish_with_files().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].user_id.as_deref(), Some("alice"));
    assert_eq!(
        rows[0].key_id.as_deref(),
        Some(key_fingerprint(CLIENT_KEY).as_str())
    );
    for secret in [CLIENT_KEY, UPSTREAM_KEY] {
        assert!(
            !contains(&files, secret.as_bytes()),
            "{secret} in the database"
        );
        assert!(!scrape.0.contains(secret));
    }
}

#[tokio::test]
async fn unknown_managed_key_is_a_401_recorded_and_counted() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, keys_mode).await;
    let resp = p
        .http
        .post(p.url(CHAT))
        .header(
            "authorization",
            bearer("sk-proj-not-a-key-this-proxy-knows-0000"),
        )
        .header("content-type", "application/json")
        .body(chat_body().to_string())
        .send()
        .await
        .unwrap();
    let (message, request_id) = openai_error(resp, 401, "invalid_api_key").await;

    let scrape = p.scrape().await;
    let failures = |reason| scrape.value("llm_audit_auth_failures_total", &[("reason", reason)]);
    assert_eq!(failures("unknown_key"), Some(1.0));
    assert_eq!(failures("missing_key"), Some(0.0));
    assert_eq!(failures("malformed"), Some(0.0));

    let row = p.only_row().await;
    assert_eq!(row.request_id, request_id);
    assert_eq!((row.status_code, row.outcome.as_str()), (401, "error"));
    assert_eq!(row.error_message.as_deref(), Some(message.as_str()));
    assert_eq!(row.model, MODEL, "the model the request named is kept");
    assert_eq!(row.key_id, None);
    assert_eq!(row.user_id, None);
    assert!(up.requests().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn missing_or_malformed_managed_key_is_a_401_with_its_reason() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, keys_mode).await;
    let missing = p
        .http
        .post(p.url(CHAT))
        .header("content-type", "application/json")
        .body(chat_body().to_string())
        .send()
        .await
        .unwrap();
    openai_error(missing, 401, "invalid_api_key").await;
    let malformed = p
        .http
        .post(p.url(CHAT))
        .header("authorization", format!("Basic {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(chat_body().to_string())
        .send()
        .await
        .unwrap();
    openai_error(malformed, 401, "invalid_api_key").await;

    let scrape = p.scrape().await;
    let failures = |reason| scrape.value("llm_audit_auth_failures_total", &[("reason", reason)]);
    assert_eq!(failures("missing_key"), Some(1.0));
    assert_eq!(failures("malformed"), Some(1.0));
    assert_eq!(failures("unknown_key"), Some(0.0));
    let rows = p.finish().await;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.status_code == 401 && r.outcome == "error")
    );
    assert!(up.requests().is_empty());
}

/// Keys mode must hold on every path: the unaudited `/v1/*` pass-through forwards with the
/// proxy's own upstream key, so an unauthenticated client must not get through it either.
#[tokio::test]
async fn keys_mode_guards_the_unaudited_paths_too() {
    let up = FakeUpstream::start(vec![Reply::json(
        200,
        json!({"object": "list", "data": []}),
    )])
    .await;
    let p = start(&up, keys_mode).await;
    let resp = p
        .http
        .get(p.url("/v1/models"))
        .header(
            "authorization",
            bearer("sk-proj-not-a-key-this-proxy-knows-0000"),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let leaked = up.requests();
    p.finish().await;
    assert!(
        leaked.is_empty(),
        "an unknown key reached the upstream (with the proxy's key: {:?})",
        leaked
            .first()
            .and_then(|r| r.header("authorization").map(|a| a == bearer(UPSTREAM_KEY)))
    );
    assert_eq!(status, 401);
}

// ---------------------------------------------------------------------------------------------
// Bad input: one test each
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn body_over_the_limit_is_a_413() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, |cfg, _| cfg.server.max_body_bytes = 1024).await;
    let mut body = chat_body();
    body["messages"][1]["content"] = json!("x".repeat(4096));
    let resp = p.chat(&body).await;
    assert_refused(p, &up, resp, 413, "request_too_large").await;
}

#[tokio::test]
async fn invalid_json_is_a_400() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, |_, _| {}).await;
    let resp = p
        .post(CHAT)
        .body(r#"{"model": "gpt-4.1-mini", "messages": ["#)
        .send()
        .await
        .unwrap();
    assert_refused(p, &up, resp, 400, "invalid_json").await;
}

#[tokio::test]
async fn a_content_type_other_than_json_is_a_415() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, |_, _| {}).await;
    let resp = p
        .http
        .post(p.url(CHAT))
        .header("authorization", bearer(CLIENT_KEY))
        .header("content-type", "text/plain")
        .body(chat_body().to_string())
        .send()
        .await
        .unwrap();
    assert_refused(p, &up, resp, 415, "unsupported_media_type").await;
}

#[tokio::test]
async fn a_missing_model_is_a_400() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, |_, _| {}).await;
    let resp = p.chat(&json!({"messages": chat_body()["messages"]})).await;
    let row = assert_refused(p, &up, resp, 400, "missing_required_parameter").await;
    assert_eq!(
        row.error_message.as_deref(),
        Some("you must provide a model parameter")
    );
}

#[tokio::test]
async fn missing_messages_is_a_400() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, |_, _| {}).await;
    let resp = p.chat(&json!({"model": MODEL})).await;
    let row = assert_refused(p, &up, resp, 400, "missing_required_parameter").await;
    assert!(row.error_message.unwrap().contains("messages"));
    assert_eq!(row.model, MODEL);
}

/// A wrong method on an audited path is bad input like any other: OpenAI's shape, not an
/// empty 405 (axum's default).
#[tokio::test]
async fn a_wrong_method_on_an_audited_path_is_an_openai_shaped_405() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, |_, _| {}).await;
    let resp = p
        .http
        .get(p.url(CHAT))
        .header("authorization", bearer(CLIENT_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let body = resp.text().await.unwrap();
    p.finish().await;
    let body: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("405 body is not OpenAI's error shape ({e}): {body:?}"));
    assert!(body["error"]["message"].is_string(), "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn headers_over_the_limit_are_a_431() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, |cfg, _| cfg.server.max_header_bytes = 1024).await;
    let resp = p
        .post(CHAT)
        .header("x-padding", "p".repeat(2048))
        .body(chat_body().to_string())
        .send()
        .await
        .unwrap();
    assert_refused(p, &up, resp, 431, "headers_too_large").await;
}

// ---------------------------------------------------------------------------------------------
// Identity: user, client address, trace context
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn user_id_comes_from_the_body_before_the_header() {
    let replies = (0..4)
        .map(|_| Reply::chat(RESPONSE_MODEL, "ok", 3, 1))
        .collect();
    let up = FakeUpstream::start(replies).await;
    let p = start(&up, |_, _| {}).await;
    // (body field, x-llm-audit-user header)
    type Case = (Option<(&'static str, &'static str)>, Option<&'static str>);
    let cases: [Case; 4] = [
        (Some(("user", "body-user")), Some("header-user")),
        (
            Some(("safety_identifier", "safety-user")),
            Some("header-user"),
        ),
        (None, Some("header-user")),
        (None, None),
    ];
    for (field, header_user) in cases {
        let mut body = chat_body();
        if let Some((k, v)) = field {
            body[k] = json!(v);
        }
        let mut req = p.post(CHAT).body(body.to_string());
        if let Some(u) = header_user {
            req = req.header("x-llm-audit-user", u);
        }
        assert_eq!(req.send().await.unwrap().status(), 200);
    }
    // The header is the proxy's own: it does not go upstream.
    assert!(
        up.requests()
            .iter()
            .all(|r| r.header("x-llm-audit-user").is_none())
    );
    let users: Vec<Option<String>> = p.finish().await.into_iter().map(|r| r.user_id).collect();
    assert_eq!(
        users,
        [
            Some("body-user"),
            Some("safety-user"),
            Some("header-user"),
            None
        ]
        .map(|u| u.map(str::to_owned))
    );
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let replies = (0..4)
        .map(|_| Reply::chat(RESPONSE_MODEL, "ok", 3, 1))
        .collect();
    let up = FakeUpstream::start(replies).await;

    let untrusted = start(&up, |_, _| {}).await;
    let trusted = start(&up, |cfg, _| {
        cfg.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let mut ips = Vec::new();
    for p in [untrusted, trusted] {
        for xff in ["203.0.113.7", "198.51.100.1, 203.0.113.7, 127.0.0.9"] {
            let resp = p
                .post(CHAT)
                .header("x-forwarded-for", xff)
                .body(chat_body().to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
        ips.extend(p.finish().await.into_iter().map(|r| r.ip_address.unwrap()));
    }
    assert_eq!(
        ips,
        ["127.0.0.1", "127.0.0.1", "203.0.113.7", "203.0.113.7"],
        "socket address unless the peer is trusted; then the right-most untrusted hop"
    );
}

#[tokio::test]
async fn an_incoming_traceparent_reaches_the_upstream_in_the_same_trace() {
    let up = FakeUpstream::start(vec![
        Reply::chat(RESPONSE_MODEL, "ok", 3, 1),
        Reply::stream(StreamScript::chat(RESPONSE_MODEL, &["ok"]).usage(3, 1)),
    ])
    .await;
    let p = start(&up, |_, _| {}).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("00-{trace_id}-00f067aa0ba902b7-01");
    for body in [chat_body(), stream_body()] {
        let resp = p
            .post(CHAT)
            .header("traceparent", &incoming)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    for req in up.requests() {
        let tp = req.header("traceparent").expect("traceparent forwarded");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[1], trace_id, "{tp}");
        assert_eq!(
            req.headers
                .iter()
                .filter(|(k, _)| k == "traceparent")
                .count(),
            1
        );
    }
    assert_eq!(p.finish().await.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Other endpoints, pass-through, health, unknown paths
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn completions_embeddings_and_responses_are_audited() {
    let completion = json!({
        "id": "cmpl-fake0001", "object": "text_completion", "created": 1_751_040_000,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": " world", "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    })
    .to_string();
    let embeddings = include_str!("fixtures/openai_embeddings.json");
    let responses = include_str!("fixtures/openai_responses.json");
    let up = FakeUpstream::start(vec![
        Reply::raw(200, "application/json", completion.clone()),
        Reply::raw(200, "application/json", embeddings),
        Reply::raw(200, "application/json", responses),
    ])
    .await;
    let p = start(&up, |_, _| {}).await;
    let calls = [
        (
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Hello"}),
            completion.as_str(),
        ),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
            embeddings,
        ),
        (
            "/v1/responses",
            json!({"model": "o4-mini", "input": "Why did the logins fail?"}),
            responses,
        ),
    ];
    let mut ids = Vec::new();
    for (path, body, answer) in &calls {
        let resp = p.post(path).body(body.to_string()).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        ids.push(header(&resp, REQUEST_ID).to_owned());
        assert!(resp.headers().contains_key(COST));
        assert_eq!(resp.bytes().await.unwrap(), answer.as_bytes(), "{path}");
    }
    let paths: Vec<String> = up.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/v1/completions", "/v1/embeddings", "/v1/responses"]
    );

    let rows = p.finish().await;
    assert_eq!(rows.len(), 3);
    for ((row, (path, body, _)), id) in rows.iter().zip(&calls).zip(&ids) {
        assert_eq!(&row.request_id, id);
        assert_eq!(row.endpoint, *path);
        assert_eq!(row.model, body["model"]);
        assert_eq!((row.status_code, row.outcome.as_str()), (200, "ok"));
        assert_eq!(row.usage_source, "reported", "{row:?}");
    }
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (2, 1));
    assert_eq!(rows[1].prompt_tokens, 17);
    assert_eq!(
        (rows[2].prompt_tokens, rows[2].completion_tokens),
        (2087, 1346)
    );
}

/// Calls still running when the shutdown grace period ends are ended by the proxy and recorded
/// (503) before the store closes: a stream that never finishes, and a request whose upstream
/// never answers. Nothing is dropped.
#[tokio::test]
async fn calls_outliving_the_grace_period_are_recorded_not_dropped() {
    let never = Arc::new(Notify::new());
    let stalled = StreamScript::new(MODEL)
        .role()
        .content("Hel")
        .wait_for(&never);
    let up = FakeUpstream::start(vec![Reply::stream(stalled), Reply::hang()]).await;
    let p = start(&up, |cfg, _| {
        cfg.server.shutdown_grace.0 = Duration::from_millis(300)
    })
    .await;
    let stream_body =
        json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let mut stream = p
        .post("/v1/chat/completions")
        .body(stream_body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(
        stream.chunk().await.unwrap().is_some(),
        "the first chunk arrived"
    );
    let json_body = json!({"model": MODEL, "messages": [{"role": "user", "content": "slow"}]});
    let pending = tokio::spawn(
        p.post("/v1/chat/completions")
            .body(json_body.to_string())
            .send(),
    );
    let deadline = Instant::now() + DEADLINE;
    while up.requests().len() < 2 {
        assert!(Instant::now() < deadline, "both calls reach the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = p.stack.metrics.clone();
    let rows = p.finish().await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for row in &rows {
        assert_eq!(
            (row.status_code, row.outcome.as_str()),
            (503, "error"),
            "{row:?}"
        );
        assert_eq!(
            row.error_message.as_deref(),
            Some("the audit proxy shut down before the answer was complete")
        );
    }
    let dropped: u64 = ["queue_full", "closed", "write_failed"]
        .iter()
        .map(|r| metrics.records_dropped.with_label_values(&[r]).get())
        .sum();
    assert_eq!(dropped, 0);
    let answer = pending.await.unwrap().unwrap();
    assert_eq!(answer.status(), 503);
}

/// The Responses API has no `stream_options.include_usage` (usage comes in
/// `response.completed`): its streams go upstream exactly as sent, and back byte for byte.
#[tokio::test]
async fn responses_streams_are_not_given_include_usage() {
    let events = include_str!("fixtures/openai_responses_stream.sse");
    let up = FakeUpstream::start(vec![Reply::raw(200, "text/event-stream", events)]).await;
    let p = start(&up, |_, _| {}).await;
    let body = r#"{"model":"gpt-4.1","input":"Why did the logins fail?","stream":true}"#;
    let resp = p.post("/v1/responses").body(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), events.as_bytes());
    let sent = up.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].body,
        body.as_bytes(),
        "the request went upstream unchanged"
    );
    let rows = p.finish().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].outcome.as_str(), rows[0].usage_source.as_str()),
        ("ok", "reported")
    );
}

#[tokio::test]
async fn other_v1_paths_are_forwarded_and_counted_without_a_record() {
    let models =
        json!({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "system"}]});
    let up = FakeUpstream::start(vec![Reply::json(200, models.clone())]).await;
    let p = start(&up, |_, _| {}).await;
    let resp = p
        .http
        .get(p.url("/v1/models?limit=5"))
        .header("authorization", bearer(CLIENT_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key(REQUEST_ID));
    assert_eq!(resp.bytes().await.unwrap(), models.to_string());
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("GET", "/v1/models?limit=5")
    );
    assert_eq!(
        reqs[0].header("authorization"),
        Some(bearer(CLIENT_KEY).as_str())
    );

    let scrape = p.scrape().await;
    assert_eq!(
        scrape.value("llm_audit_passthrough_requests_total", &[("status", "200")]),
        Some(1.0)
    );
    assert_eq!(scrape.sum("llm_audit_requests_total"), 0.0);
    assert!(
        p.finish().await.is_empty(),
        "pass-through calls are not audited"
    );
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let up = FakeUpstream::start(vec![]).await;
    let p = start(&up, |_, _| {}).await;
    for path in ["/healthz", "/readyz"] {
        let resp = p.http.get(p.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let resp = p.http.get(p.url("/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("/nope"));
    assert!(up.requests().is_empty());
    assert!(p.finish().await.is_empty());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
