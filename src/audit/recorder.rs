//! The one place where an outcome becomes an audit record and is emitted: span attributes,
//! metrics and the store row all come from the same [`AuditRecord`] value, so the three views
//! never disagree. Front doors call [`Recorder::begin`] when a call starts and
//! [`InFlight::finish`] when it ends; they never touch a metric or a row themselves.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::{Status, TraceContextExt as _};
use opentelemetry::{Array, KeyValue, StringValue, Value as OtelValue};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::duplicates::DuplicateDetector;
use super::estimate;
use super::pricing::PriceTable;
use super::record::{AuditRecord, CostStatus, Operation, Outcome, UsageSource};
use super::request::ParsedRequest;
use super::usage::{ResponseSummary, Usage};
use crate::config::{CaptureConfig, Secret, ThresholdsConfig};
use crate::store::{CommitAck, Dropped, Store};
use crate::telemetry::Metrics;

/// Label value for calls without a user id.
pub const NO_USER: &str = "__none__";

/// Most hashes remembered per duplicate-detection generation.
const MAX_DUPLICATE_ENTRIES: usize = 1 << 20;

/// Emits audit records. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    metrics: Arc<Metrics>,
    store: Store,
    prices: PriceTable,
    duplicates: DuplicateDetector,
    capture: CaptureConfig,
    hash_key: Option<Secret>,
}

/// What is known when a call starts.
#[derive(Clone, Debug)]
pub struct CallStart {
    /// Which API.
    pub operation: Operation,
    /// `gen_ai.provider.name`.
    pub provider: Arc<str>,
    /// Requested model.
    pub model: String,
    /// Streaming call.
    pub stream: bool,
    /// Requested output limit.
    pub max_tokens: Option<i64>,
    /// Requested temperature.
    pub temperature: Option<f64>,
    /// Caller identity.
    pub user_id: Option<String>,
    /// Caller address.
    pub ip_address: Option<String>,
    /// Fingerprint of the API key (see [`key_fingerprint`]).
    pub key_id: Option<String>,
    /// Hash of the canonical prompt.
    pub request_hash: String,
    /// The prompt, for estimation when no usage arrives and for opt-in span content.
    pub prompt: Option<Value>,
    /// Upstream host.
    pub server_address: Option<String>,
    /// Upstream port.
    pub server_port: Option<u16>,
    /// Incoming trace context (W3C `traceparent`) to continue.
    pub parent: Option<opentelemetry::Context>,
}

impl Default for CallStart {
    /// An empty call (what a finished `InFlight` keeps); cheap, no allocation.
    fn default() -> Self {
        Self {
            operation: Operation::Chat,
            provider: Arc::clone(&EMPTY_PROVIDER),
            model: String::new(),
            stream: false,
            max_tokens: None,
            temperature: None,
            user_id: None,
            ip_address: None,
            key_id: None,
            request_hash: String::new(),
            prompt: None,
            server_address: None,
            server_port: None,
            parent: None,
        }
    }
}

static EMPTY_PROVIDER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

impl CallStart {
    /// A call described by a parsed request body.
    pub fn from_request(req: ParsedRequest, provider: Arc<str>) -> Self {
        Self {
            operation: req.operation,
            provider,
            model: req.model,
            stream: req.stream,
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            user_id: req.user,
            ip_address: None,
            key_id: None,
            request_hash: req.request_hash,
            prompt: Some(req.prompt),
            server_address: None,
            server_port: None,
            parent: None,
        }
    }

    /// A call whose body could not be accepted (it is audited all the same). The model is
    /// kept when the body names one. A call rejected before its body was read has no request
    /// hash (`""`): it carried no prompt, so it cannot repeat one.
    pub fn unparsed(
        operation: Operation,
        provider: Arc<str>,
        body: &[u8],
        hash_key: Option<&Secret>,
    ) -> Self {
        // Every proxied call starts here with an empty body; parsing nothing would only build
        // (and allocate) an error.
        let model = (!body.is_empty())
            .then(|| serde_json::from_slice::<Value>(body).ok())
            .flatten()
            .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned))
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| crate::telemetry::metrics::UNKNOWN_MODEL.into());
        Self {
            operation,
            provider,
            model,
            stream: false,
            max_tokens: None,
            temperature: None,
            user_id: None,
            ip_address: None,
            key_id: None,
            request_hash: if body.is_empty() {
                String::new()
            } else {
                super::canonical::bytes_hash(body, hash_key)
            },
            prompt: None,
            server_address: None,
            server_port: None,
            parent: None,
        }
    }
}

/// How a call ended.
#[derive(Clone, Debug)]
pub struct CallEnd {
    /// HTTP status answered.
    pub status_code: u16,
    /// Outcome.
    pub outcome: Outcome,
    /// What the answer said (empty when there was none).
    pub response: ResponseSummary,
    /// `error.type` (a short, bounded kind) and the message, for failures.
    pub error: Option<(Cow<'static, str>, String)>,
}

impl CallEnd {
    /// A delivered answer.
    pub fn ok(status_code: u16, response: ResponseSummary) -> Self {
        Self {
            status_code,
            outcome: Outcome::Ok,
            response,
            error: None,
        }
    }

    /// A failure: `kind` becomes `error.type`, `message` the record's `error_message`.
    pub fn error(
        status_code: u16,
        kind: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status_code,
            outcome: Outcome::Error,
            response: ResponseSummary::default(),
            error: Some((kind.into(), message.into())),
        }
    }

    /// The client went away; `response` holds what had arrived.
    pub fn aborted(status_code: u16, response: ResponseSummary) -> Self {
        Self {
            status_code,
            outcome: Outcome::Aborted,
            response,
            error: Some((
                "aborted".into(),
                "client disconnected before the answer was complete".into(),
            )),
        }
    }

    /// Attaches what the answer said.
    pub fn with_response(mut self, response: ResponseSummary) -> Self {
        self.response = response;
        self
    }
}

/// A call in progress: its span is open and its clock is running.
#[derive(Debug)]
pub struct InFlight {
    recorder: Recorder,
    span: Span,
    /// The span's OpenTelemetry context, looked up once: every look-up goes through the
    /// subscriber and the layer (callgrind: ~2.5k instructions each).
    otel: opentelemetry::Context,
    start: Instant,
    timestamp: String,
    request_id: String,
    call: CallStart,
    first_chunk: Option<Duration>,
    attempts: u32,
    overhead: Option<Duration>,
    finished: bool,
}

/// Status recorded for a call dropped before it was finished: the front door went away
/// mid-call (e.g. hyper dropped a handler whose client hung up). nginx's "client closed request".
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// The result of [`InFlight::finish`].
#[derive(Debug)]
pub struct Emitted {
    /// The record as emitted (chained unless dropped), shared with the store writer.
    pub record: Arc<AuditRecord>,
    /// The prompt was seen within the window.
    pub duplicate: bool,
    /// Why the record could not be queued, if it was not.
    pub dropped: Option<Dropped>,
    commit: Option<CommitAck>,
}

impl Emitted {
    /// Waits until the record is committed (sync durability); true when it is on disk or the
    /// store is in batched mode and accepted it.
    pub async fn committed(&mut self) -> bool {
        if self.dropped.is_some() {
            return false;
        }
        match self.commit.take() {
            None => true,
            Some(ack) => matches!(ack.await, Ok(Ok(()))),
        }
    }
}

/// A short, non-reversible fingerprint of an API key: `key_` and 16 hex digits of its SHA-256.
pub fn key_fingerprint(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("key_{}", &hex::encode(digest)[..16])
}

/// A recorder that cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    /// The price table or price file is invalid.
    #[error(transparent)]
    Pricing(#[from] super::pricing::PricingError),
    /// The hash key file cannot be read.
    #[error("cannot read hash key file {path}")]
    HashKey {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Recorder {
    /// A recorder for `cfg`: prices from `[pricing]`, the request-hash key from
    /// `store.hash_key_file`, content capture and the duplicate window from their sections.
    pub fn from_config(
        cfg: &crate::config::AuditConfig,
        metrics: Arc<Metrics>,
        store: Store,
    ) -> Result<Self, RecorderError> {
        let prices = PriceTable::from_config(&cfg.pricing)?;
        let hash_key = cfg
            .store
            .hash_key_file
            .as_ref()
            .map(|path| {
                Secret::from_file(path).map_err(|source| RecorderError::HashKey {
                    path: path.clone(),
                    source,
                })
            })
            .transpose()?;
        Ok(Self::new(
            metrics,
            store,
            prices,
            cfg.capture.clone(),
            &cfg.thresholds,
            hash_key,
        ))
    }

    /// A recorder emitting into `metrics` and `store`.
    pub fn new(
        metrics: Arc<Metrics>,
        store: Store,
        prices: PriceTable,
        capture: CaptureConfig,
        thresholds: &ThresholdsConfig,
        hash_key: Option<Secret>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                metrics,
                store,
                prices,
                duplicates: DuplicateDetector::new(thresholds.window.0, MAX_DUPLICATE_ENTRIES),
                capture,
                hash_key,
            }),
        }
    }

    /// The metric catalog.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The key for request hashes, if configured.
    pub fn hash_key(&self) -> Option<&Secret> {
        self.inner.hash_key.as_ref()
    }

    /// Starts a call: opens its CLIENT span `{operation} {model}` and starts its clock.
    pub fn begin(&self, call: CallStart) -> InFlight {
        let start = Instant::now();
        let timestamp = AuditRecord::format_timestamp(chrono::Utc::now());
        let request_id = uuid::Uuid::now_v7().to_string();
        let operation = call.operation.as_str();
        let mut name = String::with_capacity(operation.len() + 1 + call.model.len());
        name.push_str(operation);
        name.push(' ');
        name.push_str(&call.model);
        // `&str` fields, not `%` (Display): the OpenTelemetry layer then copies each string
        // instead of running the formatting machinery per field (callgrind: ~2k instructions
        // per call).
        let span = tracing::info_span!(
            target: "llm_audit",
            "gen_ai.call",
            otel.name = name.as_str(),
            otel.kind = "client",
            gen_ai.operation.name = operation,
            gen_ai.provider.name = &*call.provider,
            gen_ai.request.model = call.model.as_str(),
            gen_ai.request.stream = call.stream,
            llm_audit.request_id = request_id.as_str(),
            llm_audit.request_hash = call.request_hash.as_str(),
        );
        if let Some(parent) = &call.parent {
            let _ = span.set_parent(parent.clone());
        }
        // One look-up of the OpenTelemetry span and one call for all attributes, not one
        // subscriber look-up per attribute (measured: the per-attribute path dominated).
        let otel_cx = span.context();
        let otel_span = otel_cx.span();
        if otel_span.span_context().is_valid() {
            let mut kvs = Vec::with_capacity(8);
            if let Some(m) = call.max_tokens {
                kvs.push(KeyValue::new("gen_ai.request.max_tokens", m));
            }
            if let Some(t) = call.temperature {
                kvs.push(KeyValue::new("gen_ai.request.temperature", t));
            }
            if let Some(a) = &call.server_address {
                kvs.push(KeyValue::new("server.address", a.clone()));
            }
            if let Some(p) = call.server_port {
                kvs.push(KeyValue::new("server.port", i64::from(p)));
            }
            if let Some(ip) = &call.ip_address {
                kvs.push(KeyValue::new("client.address", ip.clone()));
            }
            if let Some(u) = &call.user_id {
                kvs.push(KeyValue::new("user.id", u.clone()));
            }
            if let Some(k) = &call.key_id {
                kvs.push(KeyValue::new("llm_audit.key_id", k.clone()));
            }
            if self.inner.capture.span_content
                && let Some(p) = &call.prompt
            {
                kvs.push(KeyValue::new(
                    "gen_ai.input.messages",
                    redact_secrets(&p.to_string()).into_owned(),
                ));
            }
            otel_span.set_attributes(kvs);
        }
        InFlight {
            recorder: self.clone(),
            span,
            otel: otel_cx,
            start,
            timestamp,
            request_id,
            call,
            first_chunk: None,
            attempts: 0,
            overhead: None,
            finished: false,
        }
    }

    /// Counts a failed client authentication (`reason` is one of
    /// [`AUTH_FAILURE_REASONS`](crate::telemetry::metrics::AUTH_FAILURE_REASONS)).
    pub fn count_auth_failure(&self, reason: &'static str) {
        self.inner
            .metrics
            .auth_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// Counts a request forwarded without an audit record (a `/v1/*` path we do not audit).
    pub fn count_passthrough(&self, status: u16) {
        self.inner
            .metrics
            .passthrough
            .with_label_values(&[&status_label(status)])
            .inc();
    }

    fn model_label<'a>(&self, model: &'a str) -> Cow<'a, str> {
        if self.inner.prices.knows(model) {
            Cow::Borrowed(model)
        } else {
            self.inner.metrics.model_cap.apply(model)
        }
    }
}

impl InFlight {
    /// The call's span: make attempt spans its children, inject its context upstream.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The span's OpenTelemetry context (to inject `traceparent` upstream); holds no valid span
    /// when spans are not exported.
    pub fn otel_context(&self) -> &opentelemetry::Context {
        &self.otel
    }

    /// The record's id (for the `x-llm-audit-request-id` header).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// When the call started.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// The call as described at start.
    pub fn call(&self) -> &CallStart {
        &self.call
    }

    /// Stamps time-to-first-chunk (only the first call counts).
    pub fn mark_first_chunk(&mut self) {
        if self.first_chunk.is_none() {
            self.first_chunk = Some(self.start.elapsed());
        }
    }

    /// Adds time spent in the front door itself (not waiting on the upstream); observed in
    /// `llm_audit_overhead_seconds` when the call finishes.
    pub fn add_overhead(&mut self, d: Duration) {
        *self.overhead.get_or_insert(Duration::ZERO) += d;
    }

    /// Counts one upstream attempt.
    pub fn add_attempt(&mut self) -> u32 {
        self.attempts += 1;
        self.attempts
    }

    /// Ends the call: builds the record, emits span attributes, metrics and the row.
    pub fn finish(mut self, end: CallEnd) -> Emitted {
        self.finish_once(end)
    }

    /// Builds and emits the record; runs once, from `finish` or from `Drop`.
    fn finish_once(&mut self, end: CallEnd) -> Emitted {
        self.finished = true;
        let elapsed = self.start.elapsed();
        let recorder = self.recorder.clone();
        let inner = &recorder.inner;
        let call = std::mem::take(&mut self.call);
        let span = std::mem::replace(&mut self.span, Span::none());
        let resp = &end.response;

        let (usage, usage_source) = resolve_usage(&call, &end);
        let cost = if usage_source == UsageSource::Missing {
            let status = inner
                .prices
                .cost(&call.model, resp.model.as_deref(), &Usage::default())
                .status;
            super::pricing::Cost { picousd: 0, status }
        } else {
            inner
                .prices
                .cost(&call.model, resp.model.as_deref(), &usage)
        };
        let duplicate = !call.request_hash.is_empty()
            && inner.duplicates.observe(&call.request_hash, self.start);
        let preview = preview(&resp.text, inner.capture.preview_chars);
        let error_message = end
            .error
            .as_ref()
            .map(|(_, m)| m.clone())
            .or_else(|| resp.error_message.clone())
            .map(|m| redact_secrets(&m).into_owned());
        let otel_cx = std::mem::take(&mut self.otel);
        let span_cx = otel_cx.span().span_context().clone();
        let (trace_id, span_id) = if span_cx.is_valid() {
            (
                Some(crate::wire::hex_string(&span_cx.trace_id().to_bytes())),
                Some(crate::wire::hex_string(&span_cx.span_id().to_bytes())),
            )
        } else {
            (None, None)
        };
        let cost_picousd = i64::try_from(cost.picousd).unwrap_or(i64::MAX);
        let record = AuditRecord {
            timestamp: std::mem::take(&mut self.timestamp),
            request_id: std::mem::take(&mut self.request_id),
            model: call.model,
            prompt_tokens: usage.input,
            completion_tokens: usage.output,
            total_tokens: usage.total,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            status_code: i64::from(end.status_code),
            cost_usd: cost_picousd as f64 / super::pricing::PICO_PER_USD,
            user_id: call.user_id,
            request_hash: call.request_hash,
            response_preview: preview,
            ip_address: call.ip_address,
            error_message,
            provider: call.provider.to_string(),
            endpoint: call.operation.endpoint().to_owned(),
            response_model: resp.model.clone(),
            response_id: resp.id.clone(),
            stream: call.stream,
            finish_reason: (!resp.finish_reasons.is_empty()).then(|| resp.finish_reasons.join(",")),
            cached_tokens: usage.cached,
            reasoning_tokens: usage.reasoning,
            usage_source,
            cost_status: cost.status,
            outcome: end.outcome,
            ttft_ms: self.first_chunk.map(|d| d.as_secs_f64() * 1000.0),
            key_id: call.key_id,
            attempts: i64::from(self.attempts),
            trace_id,
            span_id,
            cost_picousd,
            prev_hash: String::new(),
            record_hash: String::new(),
        };

        recorder.emit_metrics(&record, &end, elapsed, self.first_chunk, duplicate);
        if let Some(o) = self.overhead {
            inner.metrics.overhead.observe(o.as_secs_f64());
        }
        let (record, submitted) = inner.store.submit(record);
        let (commit, dropped) = match submitted {
            Ok(ack) => (ack, None),
            Err(d) => (None, Some(d)),
        };
        emit_span(
            &otel_cx,
            &record,
            &end,
            duplicate,
            inner.capture.span_content,
            &resp.text,
        );
        drop(span);
        Emitted {
            record,
            duplicate,
            dropped,
            commit,
        }
    }
}

impl Drop for InFlight {
    /// A call is never lost to an early return or a dropped future: unfinished, it is recorded
    /// as `aborted` with status 499.
    fn drop(&mut self) {
        if !self.finished {
            self.finish_once(CallEnd::aborted(
                CLIENT_CLOSED_REQUEST,
                ResponseSummary::default(),
            ));
        }
    }
}

/// The first `chars` characters of `text`, secrets redacted. Only a prefix is scanned (with
/// room for a key that straddles the cut), not the whole answer.
fn preview(text: &str, chars: usize) -> String {
    if chars == 0 {
        return String::new();
    }
    let scan_end = text
        .char_indices()
        .nth(chars + 128)
        .map_or(text.len(), |(i, _)| i);
    redact_secrets(&text[..scan_end])
        .chars()
        .take(chars)
        .collect()
}

/// Reported usage when present; otherwise an estimate when an answer (or part of one) exists;
/// otherwise nothing to count.
fn resolve_usage(call: &CallStart, end: &CallEnd) -> (Usage, UsageSource) {
    if let Some(u) = end.response.usage {
        return (u, UsageSource::Reported);
    }
    let answered = end.outcome != Outcome::Error
        || !end.response.text.is_empty()
        || !end.response.reasoning_text.is_empty();
    if !answered {
        return (Usage::default(), UsageSource::Missing);
    }
    let input = call
        .prompt
        .as_ref()
        .map(estimate::count_prompt)
        .unwrap_or(0);
    let output = estimate::count_text(&end.response.text)
        .saturating_add(estimate::count_text(&end.response.reasoning_text));
    let usage = Usage {
        input,
        output,
        total: input.saturating_add(output),
        cached: 0,
        reasoning: 0,
    };
    (usage, UsageSource::Estimated)
}

impl Recorder {
    fn emit_metrics(
        &self,
        r: &AuditRecord,
        end: &CallEnd,
        elapsed: Duration,
        first_chunk: Option<Duration>,
        duplicate: bool,
    ) {
        let m = &self.inner.metrics;
        let provider = r.provider.as_str();
        let model = self.model_label(&r.model);
        let model = model.as_ref();
        let outcome = r.outcome.as_str();
        let status = status_label(end.status_code);
        m.requests
            .with_label_values(&[provider, model, outcome, &status])
            .inc();
        if r.usage_source != UsageSource::Missing {
            for (kind, n) in [
                ("input", r.prompt_tokens),
                ("output", r.completion_tokens),
                ("cache_read", r.cached_tokens),
                ("reasoning", r.reasoning_tokens),
            ] {
                m.tokens
                    .with_label_values(&[provider, model, kind])
                    .inc_by(n.max(0) as u64);
            }
        }
        let pico = r.cost_picousd.max(0) as u64;
        m.cost.add(&[provider, model, r.cost_status.as_str()], pico);
        m.request_duration
            .with_label_values(&[provider, model, outcome])
            .observe(elapsed.as_secs_f64());
        if let Some(t) = first_chunk {
            m.ttft
                .with_label_values(&[provider, model])
                .observe(t.as_secs_f64());
        }
        if duplicate {
            m.duplicates.with_label_values(&[provider, model]).inc();
        }
        // A call with nothing to price (rejected, failed before any answer) says nothing about
        // the price table, so it does not count as unpriced.
        if r.cost_status != CostStatus::Priced && r.usage_source != UsageSource::Missing {
            m.unpriced.with_label_values(&[provider, model]).inc();
        }
        let user = m.user_cap.apply(r.user_id.as_deref().unwrap_or(NO_USER));
        let user = user.as_ref();
        m.user_requests.with_label_values(&[user, outcome]).inc();
        m.user_cost.add(&[user], pico);
        m.user_request_tokens
            .with_label_values(&[user])
            .observe(r.total_tokens.max(0) as f64);

        let op = r.endpoint_operation();
        // The answering model shares the requested model's label when it is the same name, so
        // one call never counts twice against the model cap.
        let response_model = match r.response_model.as_deref() {
            Some(rm) if rm == r.model => Cow::Borrowed(model),
            Some(rm) => self.model_label(rm),
            None => Cow::Borrowed(""),
        };
        if r.usage_source != UsageSource::Missing {
            for (kind, n) in [("input", r.prompt_tokens), ("output", r.completion_tokens)] {
                m.genai_token_usage
                    .with_label_values(&[op, provider, model, &response_model, kind])
                    .observe(n.max(0) as f64);
            }
        }
        let error_type = end.error.as_ref().map_or("", |(k, _)| k.as_ref());
        m.genai_duration
            .with_label_values(&[op, provider, model, &response_model, error_type])
            .observe(elapsed.as_secs_f64());
    }
}

impl AuditRecord {
    fn endpoint_operation(&self) -> &'static str {
        match self.endpoint.as_str() {
            "/v1/completions" => Operation::TextCompletion.as_str(),
            "/v1/embeddings" => Operation::Embeddings.as_str(),
            _ => Operation::Chat.as_str(),
        }
    }
}

/// HTTP status as a label without allocating for the common ones.
fn status_label(status: u16) -> Cow<'static, str> {
    match status {
        200 => Cow::Borrowed("200"),
        400 => Cow::Borrowed("400"),
        401 => Cow::Borrowed("401"),
        408 => Cow::Borrowed("408"),
        429 => Cow::Borrowed("429"),
        500 => Cow::Borrowed("500"),
        502 => Cow::Borrowed("502"),
        503 => Cow::Borrowed("503"),
        504 => Cow::Borrowed("504"),
        s => Cow::Owned(s.to_string()),
    }
}

fn emit_span(
    cx: &opentelemetry::Context,
    r: &AuditRecord,
    end: &CallEnd,
    duplicate: bool,
    content: bool,
    text: &str,
) {
    let span = cx.span();
    // No OpenTelemetry layer (or a non-recording span): nothing would read these values.
    if !span.span_context().is_valid() {
        return;
    }
    let mut kvs = Vec::with_capacity(24);
    if let Some(m) = &r.response_model {
        kvs.push(KeyValue::new("gen_ai.response.model", m.clone()));
    }
    if let Some(id) = &r.response_id {
        kvs.push(KeyValue::new("gen_ai.response.id", id.clone()));
    }
    if !end.response.finish_reasons.is_empty() {
        let reasons: Vec<StringValue> = end
            .response
            .finish_reasons
            .iter()
            .map(|s| StringValue::from(s.clone()))
            .collect();
        kvs.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            OtelValue::Array(Array::String(reasons)),
        ));
    }
    if r.usage_source != UsageSource::Missing {
        kvs.push(KeyValue::new("gen_ai.usage.input_tokens", r.prompt_tokens));
        kvs.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            r.completion_tokens,
        ));
        kvs.push(KeyValue::new(
            "gen_ai.usage.cache_read.input_tokens",
            r.cached_tokens,
        ));
        kvs.push(KeyValue::new(
            "gen_ai.usage.reasoning.output_tokens",
            r.reasoning_tokens,
        ));
    }
    if let Some(t) = r.ttft_ms {
        kvs.push(KeyValue::new(
            "gen_ai.response.time_to_first_chunk",
            t / 1000.0,
        ));
    }
    kvs.push(KeyValue::new("http.response.status_code", r.status_code));
    kvs.push(KeyValue::new("llm_audit.duplicate", duplicate));
    kvs.push(KeyValue::new("llm_audit.cost_usd", r.cost_usd));
    kvs.push(KeyValue::new(
        "llm_audit.cost_status",
        r.cost_status.as_str(),
    ));
    kvs.push(KeyValue::new(
        "llm_audit.usage_source",
        r.usage_source.as_str(),
    ));
    kvs.push(KeyValue::new("llm_audit.outcome", r.outcome.as_str()));
    kvs.push(KeyValue::new("llm_audit.attempts", r.attempts));
    if !r.record_hash.is_empty() {
        kvs.push(KeyValue::new(
            "llm_audit.record_hash",
            r.record_hash.clone(),
        ));
    }
    if content && !text.is_empty() {
        kvs.push(KeyValue::new(
            "gen_ai.output.messages",
            redact_secrets(text).into_owned(),
        ));
    }
    if let Some((kind, message)) = &end.error {
        kvs.push(KeyValue::new("error.type", kind.to_string()));
        span.set_status(Status::error(redact_secrets(message).into_owned()));
    }
    span.set_attributes(kvs);
}

/// Replaces things that look like credentials (OpenAI/Anthropic/GitHub/Slack/AWS/Google key
/// shapes, bearer tokens) with `[REDACTED]`, so a model echoing a key cannot put it in the log.
pub fn redact_secrets(text: &str) -> Cow<'_, str> {
    const PREFIXES: [&str; 9] = [
        "sk-", "sk_", "rk-", "pk-", "ghp_", "gho_", "xox", "AKIA", "AIza",
    ];
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out: Option<String> = None;
    let mut last = 0;
    let mut i = 0;
    let bytes = text.as_bytes();
    while i < text.len() {
        let at_word_start = i == 0 || !is_token_char(text[..i].chars().next_back().unwrap_or(' '));
        if at_word_start && bytes[i].is_ascii_alphanumeric() {
            let end = text[i..]
                .char_indices()
                .find(|(_, c)| !is_token_char(*c))
                .map_or(text.len(), |(j, _)| i + j);
            let word = &text[i..end];
            if word.len() >= 20 && PREFIXES.iter().any(|p| word.starts_with(p)) {
                let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                o.push_str(&text[last..i]);
                o.push_str("[REDACTED]");
                last = end;
            }
            i = end.max(i + 1);
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut o) => {
            o.push_str(&text[last..]);
            Cow::Owned(o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_keys_only() {
        let t = "use sk-proj-ABCDEFGHIJKLMNOPQRSTUV now, not sk-short; 안녕 AKIAABCDEFGHIJKLMNOP.";
        assert_eq!(
            redact_secrets(t),
            "use [REDACTED] now, not sk-short; 안녕 [REDACTED]."
        );
        assert!(matches!(redact_secrets("plain text"), Cow::Borrowed(_)));
    }

    #[test]
    fn fingerprint_hides_the_key() {
        let f = key_fingerprint("sk-secret-key");
        assert!(f.starts_with("key_") && f.len() == 20 && !f.contains("secret"));
    }
}
