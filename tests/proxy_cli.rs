#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The built `llm-audit serve` binary in front of the scripted fake upstream: secrets kept out
//! of logs, store and metrics; graceful shutdown under load; `--check-config`; and the official
//! OpenAI Python SDK as the client.

mod fake_upstream;
mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_audit::audit::recorder::key_fingerprint;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use fake_upstream::{FakeUpstream, RecordedRequest, Reply, StreamScript};
use support::{llm_audit, serve_args};

const SDK_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk_check.py");
const CLIENT_KEY: &str = "sk-proj-cLiEnTkEy0123456789abcdefABCDEFghij";
const OTHER_KEY: &str = "sk-proj-uNkNoWnKeY0123456789abcdefABCDEFxyz";
const UPSTREAM_KEY: &str = "sk-upstream-UpStReAmKeY9876543210fedcbaZYX";
const MODEL: &str = "gpt-4.1-mini";
const RESPONSE_MODEL: &str = "gpt-4.1-mini-2025-04-14";
const CHAT: &str = "/v1/chat/completions";
const REQUEST_ID: &str = "x-llm-audit-request-id";
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

/// A running `llm-audit serve`; killed if the test ends without stopping it.
struct Serve {
    child: Child,
    stderr: PathBuf,
    db: PathBuf,
    base: String,
    metrics_url: String,
}

async fn serve(dir: &Path, upstream: &str, config: Option<&Path>, envs: &[(&str, &str)]) -> Serve {
    let stderr = dir.join("stderr.log");
    let db = dir.join("audit.db");
    let mut cmd = llm_audit();
    serve_args(&mut cmd, upstream, &db)
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = std::fs::read_to_string(&stderr).unwrap_or_default();
        let find = |prefix: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::to_owned)
        };
        if let (Some(addr), Some(metrics)) = (find("listening on "), find("metrics on ")) {
            return Serve {
                child,
                stderr,
                db,
                base: addr,
                metrics_url: metrics,
            };
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("llm-audit serve exited early ({status}):\n{log}");
        }
        assert!(Instant::now() < deadline, "no listening line:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Serve {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (through `kill`, no libc needed), then waits for the exit.
    async fn terminate(&mut self) -> ExitStatus {
        sigterm(self.pid());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "llm-audit did not exit after SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Polls the database until it holds `n` rows.
    async fn wait_rows(&self, n: usize) -> Vec<(String, Option<String>, i64)> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let rows = rows(&self.db);
            if rows.len() >= n {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} rows, have {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        support::reap(&mut self.child);
    }
}

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid}: {status}");
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

/// (request_id, user_id, status_code) of every row, in insertion order.
fn rows(db: &Path) -> Vec<(String, Option<String>, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT request_id, user_id, status_code FROM audit_logs ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The bytes of the database and its `-wal`/`-shm` companions, whichever exist now.
fn db_files(db: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", db.display())))
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn chat_body(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": stream,
    })
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Every place a secret could leak to: the debug log, the database files, a metrics scrape.
struct Leaks {
    places: Vec<(String, Vec<u8>)>,
}

impl Leaks {
    fn assert_free_of(&self, secrets: &[&str]) {
        for (place, bytes) in &self.places {
            for secret in secrets {
                // The whole key, and the part after a `sk-` prefix (in case a prefix is cut).
                for needle in [*secret, &secret[3..]] {
                    assert!(
                        !contains(bytes, needle.as_bytes()),
                        "{needle:?} found in {place}"
                    );
                }
            }
        }
    }
}

/// Runs the binary at `RUST_LOG=debug`, makes JSON, streamed, refused and pass-through calls,
/// and collects everything a secret could leak to.
async fn exercise_secrets(keys_mode: bool) -> Leaks {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start(vec![
        Reply::chat(RESPONSE_MODEL, "Hello!", 5, 2),
        Reply::stream(StreamScript::chat(RESPONSE_MODEL, &["Hel", "lo"]).usage(5, 2)),
        Reply::json(200, json!({"object": "list", "data": []})),
        Reply::error(
            401,
            "invalid_api_key",
            "Incorrect API key provided: sk-pro****xyz.",
        ),
    ])
    .await;
    let config = dir.path().join("llm-audit.toml");
    if keys_mode {
        let key_file = dir.path().join("upstream.key");
        std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
        std::fs::write(
            &config,
            format!(
                "[auth]\nmode = \"keys\"\nupstream_api_key_file = {:?}\n\n[[auth.keys]]\nsha256 = \"{}\"\nuser = \"alice\"\n",
                key_file.display().to_string(),
                hex::encode(Sha256::digest(CLIENT_KEY.as_bytes()))
            ),
        )
        .unwrap();
    } else {
        std::fs::write(&config, "[auth]\nmode = \"passthrough\"\n").unwrap();
    }
    let mut proxy = serve(
        dir.path(),
        &up.base_url(),
        Some(&config),
        &[("RUST_LOG", "debug")],
    )
    .await;
    let http = http_client();
    let post = |key: &str, stream: bool| {
        http.post(proxy.url(CHAT))
            .header("authorization", format!("Bearer {key}"))
            .json(&chat_body(stream))
            .send()
    };
    let ok = post(CLIENT_KEY, false).await.unwrap();
    assert_eq!(ok.status(), 200);
    ok.bytes().await.unwrap();
    let streamed = post(CLIENT_KEY, true).await.unwrap();
    assert_eq!(streamed.status(), 200);
    assert!(streamed.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    let models = http
        .get(proxy.url("/v1/models"))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    // Keys mode: the proxy refuses an unknown key. Passthrough: the upstream does (401).
    let refused = post(OTHER_KEY, false).await.unwrap();
    assert_eq!(refused.status(), 401);
    refused.bytes().await.unwrap();

    let reqs = up.requests();
    let upstream_auth: Vec<&str> = reqs
        .iter()
        .filter_map(|r| r.header("authorization"))
        .collect();
    if keys_mode {
        assert_eq!(reqs.len(), 3, "the unknown key never reached the upstream");
        assert!(
            upstream_auth
                .iter()
                .all(|a| *a == format!("Bearer {UPSTREAM_KEY}"))
        );
    } else {
        assert_eq!(reqs.len(), 4);
        assert_eq!(upstream_auth[0], format!("Bearer {CLIENT_KEY}"));
        assert_eq!(upstream_auth[3], format!("Bearer {OTHER_KEY}"));
    }

    let rows = proxy.wait_rows(3).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut places = Vec::new();
    let scrape = http.get(&proxy.metrics_url).send().await.unwrap();
    places.push((
        "the metrics scrape".to_owned(),
        scrape.bytes().await.unwrap().to_vec(),
    ));
    // While running, the records sit in the WAL.
    for (path, bytes) in db_files(&proxy.db) {
        places.push((format!("{} (running)", path.display()), bytes));
    }
    let status = proxy.terminate().await;
    assert!(status.success(), "{status}:\n{}", proxy.log());
    for (path, bytes) in db_files(&proxy.db) {
        places.push((format!("{} (stopped)", path.display()), bytes));
    }
    let log = proxy.log();
    assert!(
        log.contains("DEBUG"),
        "RUST_LOG=debug must produce debug lines, or this scan proves nothing:\n{log}"
    );
    places.push(("the debug log on stderr".to_owned(), log.into_bytes()));

    // The fingerprint, not the key, identifies the caller.
    let conn = rusqlite::Connection::open(&proxy.db).unwrap();
    let key_ids: Vec<Option<String>> = conn
        .prepare("SELECT key_id FROM audit_logs ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        key_ids[0].as_deref(),
        Some(key_fingerprint(CLIENT_KEY).as_str())
    );
    Leaks { places }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_mode_secrets_stay_out_of_debug_logs_the_store_and_metrics() {
    exercise_secrets(true)
        .await
        .assert_free_of(&[CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_keys_stay_out_of_debug_logs_the_store_and_metrics() {
    exercise_secrets(false)
        .await
        .assert_free_of(&[CLIENT_KEY, OTHER_KEY]);
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown under load
// ---------------------------------------------------------------------------------------------

/// The latency the fake upstream adds to request `i`: 100–300 ms.
fn latency(i: usize) -> Duration {
    Duration::from_millis(100 + (i as u64 * 37) % 201)
}

fn respond(req: &RecordedRequest, i: usize) -> Reply {
    let d = latency(i);
    if req.json()["stream"] == true {
        let script = StreamScript::new(RESPONSE_MODEL)
            .role()
            .content("Hel")
            .sleep(d / 2)
            .content("lo")
            .sleep(d / 2)
            .finish("stop")
            .usage(7, 2);
        Reply::stream(script).delay(Duration::from_millis(20))
    } else {
        Reply::chat(RESPONSE_MODEL, "Hello", 7, 2).delay(d)
    }
}

#[derive(Debug)]
enum Outcome {
    /// A complete 2xx answer (JSON parsed, or a stream through `[DONE]`), with its request id.
    Complete(String),
    /// Anything else: refused connection, broken stream, error status.
    Incomplete(String),
}

async fn one_call(http: reqwest::Client, url: String, stream: bool) -> Outcome {
    let resp = match http.post(&url).json(&chat_body(stream)).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Incomplete(format!("send: {e}")),
    };
    if !resp.status().is_success() {
        return Outcome::Incomplete(format!("status {}", resp.status()));
    }
    let id = resp
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return Outcome::Incomplete(format!("body: {e}")),
    };
    let complete = if stream {
        body.ends_with(b"data: [DONE]\n\n")
    } else {
        serde_json::from_slice::<Value>(&body)
            .is_ok_and(|v| v["choices"][0]["finish_reason"] == "stop")
    };
    match (complete, id) {
        (true, Some(id)) => Outcome::Complete(id),
        (true, None) => panic!("a 2xx answer without {REQUEST_ID}"),
        (false, _) => Outcome::Incomplete(format!("truncated: {body:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_in_flight_calls_and_loses_no_record() {
    const CALLS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let up = Arc::new(FakeUpstream::start_with(respond).await);
    let mut proxy = serve(dir.path(), &up.base_url(), None, &[]).await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(DEADLINE)
        .pool_max_idle_per_host(CALLS)
        .build()
        .unwrap();

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let (http, url) = (http.clone(), proxy.url(CHAT));
        calls.spawn(async move {
            // Staggered over ~400 ms, so SIGTERM lands with calls in flight and calls to come.
            tokio::time::sleep(Duration::from_millis(2 * i as u64)).await;
            one_call(http, url, i % 2 == 1).await
        });
    }
    // SIGTERM once half the calls have reached the upstream.
    let deadline = Instant::now() + DEADLINE;
    while up.requests().len() < CALLS / 2 {
        assert!(
            Instant::now() < deadline,
            "only {} calls arrived",
            up.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sigterm(proxy.pid());
    let outcomes: Vec<Outcome> = calls.join_all().await;
    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status}:\n{}", proxy.log());

    let complete: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Complete(id) => Some(id),
            Outcome::Incomplete(_) => None,
        })
        .collect();
    let forwarded = up.requests().len();
    assert!(complete.len() >= CALLS / 2, "{} complete", complete.len());
    // Every call the proxy had taken on was finished, not cut by the shutdown.
    assert_eq!(
        complete.len(),
        forwarded,
        "calls forwarded upstream vs complete answers; incomplete: {:?}",
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Incomplete(_)))
            .collect::<Vec<_>>()
    );

    let conn = rusqlite::Connection::open(&proxy.db).unwrap();
    let rows = rows(&proxy.db);
    let recorded: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for id in &complete {
        assert!(
            recorded.contains(id.as_str()),
            "no record for completed call {id}"
        );
    }
    assert_eq!(rows.len(), forwarded, "one record per forwarded call");
    assert!(rows.iter().all(|r| r.2 == 200), "{rows:?}");
    let report = llm_audit::store::chain::verify(&conn, None).unwrap();
    assert_eq!(report.first_break, None, "{report:?}");
    assert_eq!(report.rows, rows.len() as u64);
    let reasons: HashSet<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Incomplete(why) => Some(why.split(':').next().unwrap_or_default()),
            Outcome::Complete(_) => None,
        })
        .collect();
    eprintln!(
        "{} of {CALLS} calls completed; the rest found the door closed ({reasons:?})",
        complete.len()
    );
}

// ---------------------------------------------------------------------------------------------
// --check-config
// ---------------------------------------------------------------------------------------------

fn check_config(config: Option<&Path>, envs: &[(&str, &str)]) -> Output {
    let mut cmd = llm_audit();
    cmd.args(["serve", "--check-config"])
        .envs(envs.iter().copied());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.output().unwrap()
}

#[test]
fn check_config_accepts_a_valid_file_and_prints_it_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("upstream.key");
    std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
    let config = dir.path().join("llm-audit.toml");
    let key_hash = hex::encode(Sha256::digest(CLIENT_KEY.as_bytes()));
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:18080"
trusted_proxies = ["10.0.0.0/8"]

[upstream]
url = "https://api.example.com/v1"
first_byte_timeout = "15s"

[auth]
mode = "keys"
upstream_api_key_file = {key_file:?}

[[auth.keys]]
sha256 = "{key_hash}"
user = "alice"
"#,
            key_file = key_file.display().to_string()
        ),
    )
    .unwrap();
    let out = check_config(Some(&config), &[("LLM_AUDIT_UPSTREAM__RETRIES", "2")]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("configuration OK"), "{stderr}");

    let printed: toml::Table = stdout.parse().unwrap_or_else(|e| panic!("{e}:\n{stdout}"));
    assert_eq!(
        printed["server"]["listen"].as_str(),
        Some("127.0.0.1:18080")
    );
    assert_eq!(
        printed["upstream"]["url"].as_str(),
        Some("https://api.example.com/v1")
    );
    assert_eq!(
        printed["upstream"]["first_byte_timeout"].as_str(),
        Some("15s")
    );
    assert_eq!(
        printed["upstream"]["retries"].as_integer(),
        Some(2),
        "env applied"
    );
    assert_eq!(printed["auth"]["mode"].as_str(), Some("keys"));
    assert_eq!(printed["auth"]["keys"][0]["user"].as_str(), Some("alice"));
    for secret in [UPSTREAM_KEY, CLIENT_KEY] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}"
        );
    }
    // What it prints is itself a valid configuration.
    let reprinted = dir.path().join("printed.toml");
    std::fs::write(&reprinted, &stdout).unwrap();
    let again = check_config(Some(&reprinted), &[]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn check_config_rejects_an_unknown_key_in_the_file_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("llm-audit.toml");
    std::fs::write(
        &config,
        "[upstream]\nurl = \"https://api.example.com/v1\"\nfirst_byte_timout = \"5s\"\n",
    )
    .unwrap();
    let out = check_config(Some(&config), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("first_byte_timout"), "{stderr}");
}

#[test]
fn check_config_rejects_an_unknown_environment_key_and_names_it() {
    let out = check_config(None, &[("LLM_AUDIT_UPSTREAM__BOGUS", "1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("LLM_AUDIT_UPSTREAM__BOGUS"), "{stderr}");
    assert!(stderr.contains("bogus"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// The official OpenAI Python SDK as the client
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct SdkRow {
    request_id: String,
    status_code: i64,
    outcome: String,
    user_id: Option<String>,
    cost_usd: f64,
    key_id: Option<String>,
    usage_source: String,
}

/// `LLM_AUDIT_PYTHON` (default `python3`), if it can import `openai`; otherwise why not.
fn sdk_python() -> Result<String, String> {
    let python = std::env::var("LLM_AUDIT_PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python)
        .args(["-c", "import openai"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Ok(python),
        Ok(o) => Err(format!(
            "{python} cannot import openai ({})",
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or_default()
        )),
        Err(e) => Err(format!("cannot run {python}: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_through_the_proxy() {
    let python = match sdk_python() {
        Ok(p) => p,
        Err(why) if std::env::var_os("CI").is_some() => panic!(
            "{why}. CI must install the SDK: python3 -m venv target/sdk-venv && \
             target/sdk-venv/bin/pip install openai, and set LLM_AUDIT_PYTHON=target/sdk-venv/bin/python"
        ),
        Err(why) => {
            eprintln!("SKIPPED the_openai_python_sdk_works_through_the_proxy: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start(vec![
        Reply::chat(RESPONSE_MODEL, "Hello from the SDK test!", 11, 6),
        Reply::stream(StreamScript::chat(RESPONSE_MODEL, &["Hel", "lo", " SDK"]).usage(9, 3)),
        Reply::error(
            429,
            "rate_limit_exceeded",
            "Rate limit reached for gpt-4.1-mini.",
        )
        .header("retry-after", "1"),
    ])
    .await;
    let mut proxy = serve(dir.path(), &up.base_url(), None, &[]).await;

    let base_url = proxy.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(SDK_SCRIPT)
            .args([base_url.as_str(), CLIENT_KEY, MODEL])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("openai SDK {}", result["sdk_version"]);

    let plain = &result["plain"];
    assert_eq!(plain["content"], "Hello from the SDK test!");
    assert_eq!(plain["model"], RESPONSE_MODEL);
    assert_eq!(plain["finish_reason"], "stop");
    assert_eq!(
        plain["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17})
    );
    let stream = &result["stream"];
    assert_eq!(stream["content"], "Hello SDK");
    assert_eq!(stream["finish_reason"], "stop");
    assert!(
        stream["content_type"]
            .as_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(stream["chunks"], 5, "role, 3 deltas, finish: {stream}");
    assert_eq!(
        stream["chunks_with_usage"], 0,
        "the injected usage chunk is hidden: {stream}"
    );
    assert_eq!(stream["chunks_without_choices"], 0, "{stream}");
    let limited = &result["rate_limited"];
    assert_eq!(limited["raised"], "RateLimitError", "{limited}");
    assert_eq!(limited["status"], 429);
    assert_eq!(limited["message"], "Rate limit reached for gpt-4.1-mini.");
    assert_eq!(limited["code"], "rate_limit_exceeded");
    let rejected = &result["rejected"];
    assert_eq!(rejected["raised"], "BadRequestError", "{rejected}");
    assert_eq!(rejected["status"], 400);
    assert_eq!(rejected["type"], "invalid_request_error");
    assert_eq!(rejected["code"], "invalid_type");

    let reqs = up.requests();
    assert_eq!(reqs.len(), 3, "the rejected call never went upstream");
    for r in &reqs {
        assert!(
            r.header("user-agent")
                .is_some_and(|ua| ua.starts_with("OpenAI/Python")),
            "{:?}",
            r.header("user-agent")
        );
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {CLIENT_KEY}").as_str())
        );
    }
    assert!(reqs[1].wants_usage());

    let status = proxy.terminate().await;
    assert!(status.success(), "{status}");
    let conn = rusqlite::Connection::open(&proxy.db).unwrap();
    let rows: Vec<SdkRow> = conn
        .prepare(
            "SELECT request_id, status_code, outcome, user_id, cost_usd, key_id, usage_source \
             FROM audit_logs ORDER BY id",
        )
        .unwrap()
        .query_map([], |r| {
            Ok(SdkRow {
                request_id: r.get(0)?,
                status_code: r.get(1)?,
                outcome: r.get(2)?,
                user_id: r.get(3)?,
                cost_usd: r.get(4)?,
                key_id: r.get(5)?,
                usage_source: r.get(6)?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let ids = [
        &plain["request_id"],
        &stream["request_id"],
        &limited["request_id"],
        &rejected["request_id"],
    ];
    for (row, id) in rows.iter().zip(ids) {
        assert_eq!(row.request_id, id.as_str().unwrap(), "{rows:?}");
        assert_eq!(
            row.key_id.as_deref(),
            Some(key_fingerprint(CLIENT_KEY).as_str())
        );
    }
    let statuses: Vec<(i64, &str)> = rows
        .iter()
        .map(|r| (r.status_code, r.outcome.as_str()))
        .collect();
    assert_eq!(
        statuses,
        [(200, "ok"), (200, "ok"), (429, "error"), (400, "error")]
    );
    assert_eq!(rows[0].user_id.as_deref(), Some("sdk-user"));
    let cost: f64 = plain["cost_usd"].as_str().unwrap().parse().unwrap();
    assert_eq!(rows[0].cost_usd, cost);
    assert_eq!(
        (rows[0].usage_source.as_str(), rows[1].usage_source.as_str()),
        ("reported", "reported")
    );
}
