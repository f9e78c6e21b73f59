//! `llm_audit::Client`: audited chat completions for Rust applications, no proxy needed.
//!
//! The seed's semantics: retries on 429/500/502/503/504 with exponential backoff and jitter,
//! 429 honours `Retry-After`, an attempt timeout and a total timeout (a timeout is a 408 record
//! naming which one). Each attempt is a child span of the call's span; the call is one record
//! with its attempt count.

pub mod retry;
mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

pub use retry::RetryPolicy;
pub use stream::ChatStream;

use crate::audit::recorder::key_fingerprint;
use crate::audit::usage::{UsageError, parse_json_response};
use crate::audit::{
    AuditRecord, CallEnd, CallStart, InFlight, Operation, ParsedRequest, Recorder, RequestError,
};
use crate::config::Secret;
use crate::wire::{error_chain, inject_trace_context};

/// Why an audited call failed. Every variant except `StoreUnavailable` carries the
/// `request_id` of the audit record written for it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request body is not an acceptable chat request (recorded as a 400).
    #[error("invalid request: {source}")]
    InvalidRequest {
        /// Why.
        source: RequestError,
        /// The audit record's id.
        request_id: String,
    },
    /// The upstream answered with an error status after all retries.
    #[error("upstream returned {status}: {message}")]
    Upstream {
        /// HTTP status.
        status: u16,
        /// The upstream's error message.
        message: String,
        /// The audit record's id.
        request_id: String,
        /// Attempts made.
        attempts: u32,
    },
    /// A timeout fired (recorded as 408).
    #[error("{message}")]
    Timeout {
        /// Which timeout, e.g. `Request timeout (60s)`.
        message: String,
        /// The audit record's id.
        request_id: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The connection failed or broke (recorded as 502).
    #[error("transport error: {message}")]
    Transport {
        /// The cause.
        message: String,
        /// The audit record's id.
        request_id: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The upstream answered 2xx with a body that is not a valid answer.
    #[error("invalid upstream response: {message}")]
    InvalidResponse {
        /// Why.
        message: String,
        /// The audit record's id.
        request_id: String,
    },
    /// `on_store_failure = "reject"` and the store is not writing.
    #[error("audit store unavailable; call refused")]
    StoreUnavailable,
}

/// A successful chat completion.
#[derive(Debug)]
pub struct ChatResponse {
    /// The upstream's JSON answer, unchanged.
    pub body: Value,
    /// The audit record written for the call.
    pub record: Arc<AuditRecord>,
}

/// Timeouts of one logical call.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP/TLS connect.
    pub connect: Duration,
    /// One attempt, from sending to the complete answer (streams: to the first byte, then
    /// the longest silence between chunks). The seed's 60 s.
    pub attempt: Duration,
    /// The whole call, retries and backoff included.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            attempt: Duration::from_secs(60),
            total: Duration::from_secs(180),
        }
    }
}

/// Builds a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    base_url: String,
    api_key: Option<Secret>,
    provider: Arc<str>,
    retry: RetryPolicy,
    timeouts: Timeouts,
    user_id: Option<String>,
}

impl ClientBuilder {
    /// API key sent as `Authorization: Bearer …` (only its fingerprint is recorded).
    pub fn api_key(mut self, key: Secret) -> Self {
        self.api_key = Some(key);
        self
    }

    /// `gen_ai.provider.name` (default `openai`).
    pub fn provider(mut self, provider: &str) -> Self {
        self.provider = Arc::from(provider);
        self
    }

    /// Retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Default user id for records whose body names none.
    pub fn user_id(mut self, user: impl Into<String>) -> Self {
        self.user_id = Some(user.into());
        self
    }

    /// The client, emitting through `recorder`.
    pub fn build(self, recorder: Recorder) -> Result<Client, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(self.timeouts.connect)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .build()?;
        let base = self.base_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base).ok();
        Ok(Client {
            inner: Arc::new(ClientInner {
                http,
                server_address: parsed
                    .as_ref()
                    .and_then(|u| u.host_str().map(str::to_owned)),
                server_port: parsed
                    .as_ref()
                    .and_then(reqwest::Url::port_or_known_default),
                base_url: base,
                key_id: self.api_key.as_ref().map(|k| key_fingerprint(k.expose())),
                api_key: self.api_key,
                provider: self.provider,
                retry: self.retry,
                timeouts: self.timeouts,
                user_id: self.user_id,
                recorder,
            }),
        })
    }
}

/// An audited client for an OpenAI-compatible API. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<Secret>,
    key_id: Option<String>,
    provider: Arc<str>,
    retry: RetryPolicy,
    timeouts: Timeouts,
    user_id: Option<String>,
    server_address: Option<String>,
    server_port: Option<u16>,
    recorder: Recorder,
}

/// One attempt's result.
enum AttemptResult {
    Answer(reqwest::Response),
    /// The call's end if no retry follows, what kind of failure, and the `Retry-After` wait.
    Failed(CallEnd, Failure, Option<Duration>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Timeout,
    Transport,
    Status,
}

impl Client {
    /// A builder for the API at `base_url` (e.g. `https://api.openai.com/v1`).
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            api_key: None,
            provider: Arc::from("openai"),
            retry: RetryPolicy::default(),
            timeouts: Timeouts::default(),
            user_id: None,
        }
    }

    /// The recorder this client emits through.
    pub fn recorder(&self) -> &Recorder {
        &self.inner.recorder
    }

    /// An audited, non-streaming chat completion. `body` is the OpenAI request JSON.
    pub async fn chat(&self, body: Value) -> Result<ChatResponse, ClientError> {
        let (mut flight, body, _) = self.start(body, false)?;
        let started = Instant::now();
        let (response, attempt_started, budget) =
            match self.send_with_retries(&mut flight, &body, started).await {
                Ok(r) => r,
                Err((end, _)) => return Err(self.fail(flight, end)),
            };
        let status = response.status().as_u16();
        // The rest of the successful attempt's budget: headers and body share one timeout.
        let attempt_left = budget.saturating_sub(attempt_started.elapsed());
        let bytes = match tokio::time::timeout(attempt_left, response.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let end = CallEnd::error(
                    502,
                    "transport",
                    format!(
                        "upstream connection failed while reading the answer: {}",
                        error_chain(&e)
                    ),
                );
                return Err(self.fail(flight, end));
            }
            Err(_) => {
                let end = timeout_end(&self.inner.timeouts, budget);
                return Err(self.fail(flight, end));
            }
        };
        self.finish_json(flight, status, &bytes)
    }

    /// An audited streaming chat completion: chunks are yielded as they arrive; the record is
    /// written when the stream ends, breaks, or is dropped (`outcome = aborted`).
    pub async fn chat_stream(&self, body: Value) -> Result<ChatStream, ClientError> {
        let (mut flight, body, caller_wants_usage) = self.start(body, true)?;
        let started = Instant::now();
        match self.send_with_retries(&mut flight, &body, started).await {
            Ok((response, _, _)) => Ok(ChatStream::new(
                flight,
                response,
                self.inner.timeouts.attempt,
                !caller_wants_usage,
            )),
            Err((end, _)) => Err(self.fail(flight, end)),
        }
    }

    /// Parses the body for the audit, opens the call, and prepares the wire body.
    /// Returns the open call, the wire body, and whether the caller asked for stream usage.
    fn start(&self, mut body: Value, stream: bool) -> Result<(InFlight, Bytes, bool), ClientError> {
        let inner = &self.inner;
        let recorder = &inner.recorder;
        if !recorder.store().accepting() {
            return Err(ClientError::StoreUnavailable);
        }
        // The method decides streaming, whatever the body says (`chat` must get a JSON answer);
        // a body that already agrees goes upstream unchanged.
        if let Value::Object(map) = &mut body {
            let asks_stream = map.get("stream").and_then(Value::as_bool) == Some(true);
            if asks_stream != stream {
                map.insert("stream".into(), Value::Bool(stream));
            }
        }
        let parsed = ParsedRequest::from_value(Operation::Chat, body.clone(), recorder.hash_key());
        let (mut call, error) = match parsed {
            Ok(p) => (CallStart::from_request(p, inner.provider.clone()), None),
            Err(e) => {
                let raw = serde_json::to_vec(&body).unwrap_or_default();
                (
                    CallStart::unparsed(
                        Operation::Chat,
                        inner.provider.clone(),
                        &raw,
                        recorder.hash_key(),
                    ),
                    Some(e),
                )
            }
        };
        call.key_id.clone_from(&inner.key_id);
        call.server_address.clone_from(&inner.server_address);
        call.server_port = inner.server_port;
        if call.user_id.is_none() {
            call.user_id.clone_from(&inner.user_id);
        }
        call.parent = Some(tracing::Span::current().context());
        let flight = recorder.begin(call);
        if let Some(source) = error {
            let request_id = flight.request_id().to_owned();
            let end = CallEnd::error(400, "invalid_request", source.to_string());
            flight.finish(end);
            return Err(ClientError::InvalidRequest { source, request_id });
        }
        let caller_wants_usage = stream && stream::request_usage(&mut body);
        let wire = serde_json::to_vec(&body).unwrap_or_default();
        Ok((flight, Bytes::from(wire), caller_wants_usage))
    }

    fn attempt_budget(&self, started: Instant) -> Duration {
        let t = &self.inner.timeouts;
        t.attempt.min(t.total.saturating_sub(started.elapsed()))
    }

    /// Sends until a 2xx answer arrives, a non-retryable failure happens, or attempts or time
    /// run out. Returns the last failure as the call's end.
    async fn send_with_retries(
        &self,
        flight: &mut InFlight,
        body: &Bytes,
        started: Instant,
    ) -> Result<(reqwest::Response, Instant, Duration), (CallEnd, Failure)> {
        let policy = &self.inner.retry;
        loop {
            let attempt = flight.add_attempt();
            let span = tracing::info_span!(
                target: "llm_audit",
                parent: flight.span(),
                "http.attempt",
                otel.name = "POST",
                otel.kind = "client",
                http.request.method = "POST",
                http.request.resend_count = i64::from(attempt - 1),
                http.response.status_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
            );
            let budget = self.attempt_budget(started);
            let attempt_started = Instant::now();
            let result = self
                .attempt(&span, body, budget)
                .instrument(span.clone())
                .await;
            let (end, failure, retry_after) = match result {
                AttemptResult::Answer(r) => {
                    span.record("http.response.status_code", i64::from(r.status().as_u16()));
                    return Ok((r, attempt_started, budget));
                }
                AttemptResult::Failed(end, failure, retry_after) => (end, failure, retry_after),
            };
            span.record("http.response.status_code", i64::from(end.status_code));
            if let Some((kind, _)) = &end.error {
                span.record("error.type", kind.as_ref());
            }
            drop(span);
            let retryable = match failure {
                Failure::Status => policy.retries_status(end.status_code),
                Failure::Transport | Failure::Timeout => true,
            };
            let remaining = self.inner.timeouts.total.saturating_sub(started.elapsed());
            if !retryable || attempt >= policy.max_attempts || remaining.is_zero() {
                return Err((end, failure));
            }
            let wait = policy.delay(attempt, retry_after);
            if wait >= remaining {
                return Err((end, failure));
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(&self, span: &tracing::Span, body: &Bytes, budget: Duration) -> AttemptResult {
        let inner = &self.inner;
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(key) = &inner.api_key
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        {
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        inject_trace_context(&span.context(), &mut headers);
        let request = inner
            .http
            .post(format!("{}/chat/completions", inner.base_url))
            .headers(headers)
            .body(body.clone())
            .send();
        let response = match tokio::time::timeout(budget, request).await {
            Err(_) => {
                return AttemptResult::Failed(
                    timeout_end(&inner.timeouts, budget),
                    Failure::Timeout,
                    None,
                );
            }
            Ok(Err(e)) if e.is_connect() && e.is_timeout() => {
                let end = CallEnd::error(
                    408,
                    "timeout",
                    format!("Connect timeout ({})", secs(inner.timeouts.connect)),
                );
                return AttemptResult::Failed(end, Failure::Timeout, None);
            }
            Ok(Err(e)) if e.is_timeout() => {
                return AttemptResult::Failed(
                    timeout_end(&inner.timeouts, budget),
                    Failure::Timeout,
                    None,
                );
            }
            Ok(Err(e)) => {
                let end = CallEnd::error(
                    502,
                    "transport",
                    format!("upstream connection failed: {}", error_chain(&e)),
                );
                return AttemptResult::Failed(end, Failure::Transport, None);
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.is_success() {
            return AttemptResult::Answer(response);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry::parse_retry_after);
        let body = tokio::time::timeout(budget, response.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let message = upstream_error_message(&body);
        let end = CallEnd::error(status.as_u16(), status.as_u16().to_string(), message);
        AttemptResult::Failed(end, Failure::Status, retry_after)
    }

    fn finish_json(
        &self,
        flight: InFlight,
        status: u16,
        bytes: &[u8],
    ) -> Result<ChatResponse, ClientError> {
        let parsed = parse_json_response(bytes).and_then(|summary| {
            serde_json::from_slice::<Value>(bytes)
                .map(|body| (summary, body))
                .map_err(|e| UsageError::NotJson(e.to_string()))
        });
        match parsed {
            Ok((summary, body)) => {
                let emitted = flight.finish(CallEnd::ok(status, summary));
                Ok(ChatResponse {
                    body,
                    record: emitted.record,
                })
            }
            Err(e) => {
                let request_id = flight.request_id().to_owned();
                let message = e.to_string();
                flight.finish(CallEnd::error(
                    502,
                    "invalid_response",
                    format!("invalid upstream response: {message}"),
                ));
                Err(ClientError::InvalidResponse {
                    message,
                    request_id,
                })
            }
        }
    }

    fn fail(&self, flight: InFlight, end: CallEnd) -> ClientError {
        let status = end.status_code;
        let message = end
            .error
            .as_ref()
            .map(|(_, m)| m.clone())
            .unwrap_or_default();
        let kind = end
            .error
            .as_ref()
            .map(|(k, _)| k.to_string())
            .unwrap_or_default();
        let emitted = flight.finish(end);
        let request_id = emitted.record.request_id.clone();
        let attempts = u32::try_from(emitted.record.attempts).unwrap_or(u32::MAX);
        match kind.as_str() {
            "timeout" => ClientError::Timeout {
                message,
                request_id,
                attempts,
            },
            "transport" => ClientError::Transport {
                message,
                request_id,
                attempts,
            },
            _ => ClientError::Upstream {
                status,
                message,
                request_id,
                attempts,
            },
        }
    }
}

/// The 408 end of a timed-out attempt, naming the timeout that was binding: the attempt's own,
/// or what was left of the total.
fn timeout_end(t: &Timeouts, budget: Duration) -> CallEnd {
    let message = if budget < t.attempt {
        format!("Total timeout ({})", secs(t.total))
    } else {
        format!("Request timeout ({})", secs(t.attempt))
    };
    CallEnd::error(408, "timeout", message)
}

/// `60s`, `0.5s`: the seed's spelling of a timeout.
fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// The upstream's `error.message`, or the start of its body.
fn upstream_error_message(body: &[u8]) -> String {
    match parse_json_response(body) {
        Ok(s) if s.error_message.is_some() => s.error_message.unwrap_or_default(),
        _ => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}
