//! The audit record (DESIGN §3): the seed's `audit_logs` columns with their names and meanings,
//! plus what an auditor needs. One record per audited call, whatever happened.

use serde::Serialize;

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The upstream answered 2xx and the answer was delivered.
    Ok,
    /// Any failure: upstream 4xx/5xx, timeout, transport, rejected by us.
    Error,
    /// The client went away before the answer was complete.
    Aborted,
}

impl Outcome {
    /// All values, for metrics created at zero.
    pub const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Error, Outcome::Aborted];

    /// The stored and labelled spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Aborted => "aborted",
        }
    }
}

/// Where the token counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// The provider reported usage.
    Reported,
    /// No usage arrived; counted with a real tokenizer.
    Estimated,
    /// Nothing to count (e.g. the call never reached the upstream).
    Missing,
}

impl UsageSource {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::Missing => "missing",
        }
    }
}

/// How the cost was priced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CostStatus {
    /// The model is in the price table.
    Priced,
    /// Unknown model, priced at the fallback rate.
    Fallback,
    /// Unknown model and no fallback: the cost is unknown, not zero.
    Unpriced,
}

impl CostStatus {
    /// All values, for metrics created at zero.
    pub const ALL: [CostStatus; 3] = [
        CostStatus::Priced,
        CostStatus::Fallback,
        CostStatus::Unpriced,
    ];

    /// The stored and labelled spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CostStatus::Priced => "priced",
            CostStatus::Fallback => "fallback",
            CostStatus::Unpriced => "unpriced",
        }
    }
}

/// Which API was called; names follow `gen_ai.operation.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Operation {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    TextCompletion,
    /// `/v1/embeddings`
    Embeddings,
    /// `/v1/responses` (a chat in GenAI terms)
    Responses,
}

impl Operation {
    /// The `gen_ai.operation.name` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat | Operation::Responses => "chat",
            Operation::TextCompletion => "text_completion",
            Operation::Embeddings => "embeddings",
        }
    }

    /// The endpoint path under the API base.
    pub fn endpoint(self) -> &'static str {
        match self {
            Operation::Chat => "/v1/chat/completions",
            Operation::TextCompletion => "/v1/completions",
            Operation::Embeddings => "/v1/embeddings",
            Operation::Responses => "/v1/responses",
        }
    }
}

/// One audited call. Field names are the column names of `audit_logs`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditRecord {
    /// Request start, UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (sorts and compares as text).
    pub timestamp: String,
    /// Unique, time-sortable id (UUID v7); also the `x-llm-audit-request-id` header.
    pub request_id: String,
    /// Requested model.
    pub model: String,
    /// Input tokens, cached ones included.
    pub prompt_tokens: i64,
    /// Output tokens, reasoning ones included.
    pub completion_tokens: i64,
    /// As reported, or input + output.
    pub total_tokens: i64,
    /// Wall time from request start to the last byte (or the failure).
    pub latency_ms: f64,
    /// HTTP status answered (upstream's, or ours for timeouts and rejections).
    pub status_code: i64,
    /// Cost in USD, not rounded (`cost_picousd / 1e12`).
    pub cost_usd: f64,
    /// Who called.
    pub user_id: Option<String>,
    /// SHA-256 (or HMAC) hex of the canonical JSON of the messages.
    pub request_hash: String,
    /// First `capture.preview_chars` characters of the answer, secrets redacted.
    pub response_preview: String,
    /// Caller address.
    pub ip_address: Option<String>,
    /// Why the call failed, if it did.
    pub error_message: Option<String>,
    /// `gen_ai.provider.name`, e.g. `openai`.
    pub provider: String,
    /// API path, e.g. `/v1/chat/completions`.
    pub endpoint: String,
    /// Model that answered, as reported.
    pub response_model: Option<String>,
    /// Provider's response id.
    pub response_id: Option<String>,
    /// Streaming call.
    pub stream: bool,
    /// Finish reasons, comma-separated.
    pub finish_reason: Option<String>,
    /// Input tokens served from the provider's cache (part of `prompt_tokens`).
    pub cached_tokens: i64,
    /// Reasoning tokens (part of `completion_tokens`).
    pub reasoning_tokens: i64,
    /// `reported`, `estimated` or `missing`.
    pub usage_source: UsageSource,
    /// `priced`, `fallback` or `unpriced`.
    pub cost_status: CostStatus,
    /// `ok`, `error` or `aborted`.
    pub outcome: Outcome,
    /// Time to the first streamed chunk.
    pub ttft_ms: Option<f64>,
    /// Fingerprint of the API key used; never the key.
    pub key_id: Option<String>,
    /// Upstream attempts made for this logical call.
    pub attempts: i64,
    /// Trace of the call's span, when tracing is on.
    pub trace_id: Option<String>,
    /// The call's span.
    pub span_id: Option<String>,
    /// Exact cost in 1e-12 USD; sums of this column are exact.
    pub cost_picousd: i64,
    /// `record_hash` of the previous row (filled when the record is chained).
    pub prev_hash: String,
    /// SHA-256 (or HMAC) of `prev_hash` and this record's canonical bytes.
    pub record_hash: String,
}

impl AuditRecord {
    /// UTC timestamp in the record's text format.
    pub fn format_timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
        // RFC 3339 with microseconds and `Z`: exactly the seed's `isoformat() + "Z"` shape,
        // without re-parsing a strftime pattern per call.
        t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    }
}
