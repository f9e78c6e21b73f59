//! The metric catalog (DESIGN §5): every family, its HELP, its labels and buckets, in one place.
//! Dashboards and alert rules depend on these names; a test scrapes them.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::audit::pricing::PICO_PER_USD;

/// Metric family names. Units are in the names.
pub mod names {
    /// Audited calls.
    pub const REQUESTS: &str = "llm_audit_requests_total";
    /// Tokens by type.
    pub const TOKENS: &str = "llm_audit_tokens_total";
    /// Cost in USD.
    pub const COST: &str = "llm_audit_cost_usd_total";
    /// Call duration.
    pub const REQUEST_DURATION: &str = "llm_audit_request_duration_seconds";
    /// Time to first streamed token.
    pub const TTFT: &str = "llm_audit_time_to_first_token_seconds";
    /// Time spent in the proxy itself.
    pub const OVERHEAD: &str = "llm_audit_overhead_seconds";
    /// Repeated prompts within the window.
    pub const DUPLICATES: &str = "llm_audit_duplicate_requests_total";
    /// Calls priced by fallback or not at all.
    pub const UNPRICED: &str = "llm_audit_unpriced_requests_total";
    /// Calls per user.
    pub const USER_REQUESTS: &str = "llm_audit_user_requests_total";
    /// Cost per user.
    pub const USER_COST: &str = "llm_audit_user_cost_usd_total";
    /// Tokens per request, per user.
    pub const USER_REQUEST_TOKENS: &str = "llm_audit_user_request_tokens";
    /// Failed authentications.
    pub const AUTH_FAILURES: &str = "llm_audit_auth_failures_total";
    /// Records committed to the store.
    pub const RECORDS_WRITTEN: &str = "llm_audit_records_written_total";
    /// Records lost, by reason.
    pub const RECORDS_DROPPED: &str = "llm_audit_records_dropped_total";
    /// Failed store writes.
    pub const STORE_ERRORS: &str = "llm_audit_store_errors_total";
    /// Records waiting for the writer.
    pub const STORE_QUEUE_DEPTH: &str = "llm_audit_store_queue_depth";
    /// Failed span exports.
    pub const SPAN_EXPORT_ERRORS: &str = "llm_audit_span_export_errors_total";
    /// Build information.
    pub const BUILD_INFO: &str = "llm_audit_build_info";
    /// gauge, no labels: the conventional process start time. The alert rules use it to tell
    /// a young process (every counter value is recent) from a Prometheus that just started
    /// scraping an old one.
    pub const PROCESS_START: &str = "process_start_time_seconds";
    /// Requests forwarded without an audit record.
    pub const PASSTHROUGH: &str = "llm_audit_passthrough_requests_total";
    /// Label values folded into `__other__`.
    pub const LABEL_OVERFLOW: &str = "llm_audit_label_overflow_total";
    /// GenAI convention: tokens per operation.
    pub const GENAI_TOKEN_USAGE: &str = "gen_ai_client_token_usage";
    /// GenAI convention: operation duration.
    pub const GENAI_DURATION: &str = "gen_ai_client_operation_duration_seconds";
}

/// Longest label value kept as is.
pub const MAX_LABEL_VALUE_BYTES: usize = 128;

/// Label value that absorbs everything past a cap.
pub const OTHER: &str = "__other__";

/// Why a record was dropped.
pub const DROP_REASONS: [&str; 3] = ["queue_full", "closed", "write_failed"];

/// Statuses the proxy answers itself (413, 415, 431, 400, 401, 503, 502, 504).
pub const OWN_STATUSES: [&str; 8] = ["400", "401", "413", "415", "431", "502", "503", "504"];

/// Model label of calls whose body named no model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// Why an authentication failed.
pub const AUTH_FAILURE_REASONS: [&str; 3] = ["missing_key", "unknown_key", "malformed"];

/// GenAI-convention duration buckets: doubling from 10 ms to 81.92 s.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// Proxy overhead buckets: 10 µs to 100 ms.
const OVERHEAD_BUCKETS: [f64; 13] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,
];

/// GenAI-convention token buckets: powers of 4 from 1 to 67,108,864.
fn token_buckets() -> Vec<f64> {
    (0..14).map(|i| 4f64.powi(i)).collect()
}

/// Per-user request-size buckets; always include the alert threshold so
/// `le="<threshold>"` is an exact boundary for the excessive-tokens rule.
fn user_token_buckets(threshold: u64) -> Vec<f64> {
    let mut b = vec![
        100.0,
        1_000.0,
        4_000.0,
        16_000.0,
        32_000.0,
        64_000.0,
        128_000.0,
        256_000.0,
        1_000_000.0,
    ];
    b.push(threshold as f64);
    b.sort_by(f64::total_cmp);
    b.dedup();
    b
}

/// Caps the distinct values of one label.
#[derive(Debug)]
pub struct LabelCap {
    label: &'static str,
    max: usize,
    seen: RwLock<HashSet<String>>,
    overflow: IntCounter,
}

impl LabelCap {
    /// `value` itself while fewer than `max` distinct values were seen, else `__other__`.
    pub fn apply<'a>(&self, value: &'a str) -> Cow<'a, str> {
        // A label value is an identifier, not a payload: anything longer folds away so a client
        // cannot inflate every family with megabyte-long "model" or "user" values.
        if value.len() > MAX_LABEL_VALUE_BYTES {
            self.overflow.inc();
            return Cow::Borrowed(OTHER);
        }
        let seen = self.seen.read().unwrap_or_else(|p| p.into_inner());
        if seen.contains(value) {
            return Cow::Borrowed(value);
        }
        let full = seen.len() >= self.max;
        drop(seen);
        if !full {
            let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
            if seen.len() < self.max {
                seen.insert(value.to_owned());
                return Cow::Borrowed(value);
            }
        }
        self.overflow.inc();
        Cow::Borrowed(OTHER)
    }

    /// The label this cap guards.
    pub fn label(&self) -> &'static str {
        self.label
    }
}

/// A counter family of USD amounts kept as exact integer picodollars; scraped as USD.
///
/// A float counter adding millions of tiny costs drifts from the sum of the rows; this one
/// equals it exactly (up to the final conversion of one integer to a double).
#[derive(Debug)]
pub struct CostCounterVec {
    desc: Desc,
    labels: Vec<&'static str>,
    /// Series keyed by their label values joined with U+001F (which no sane label contains),
    /// so a lookup is one hash, not a scan: the user family holds up to 1,000 series.
    values: Mutex<HashMap<String, (Vec<String>, u128)>>,
}

fn series_key(label_values: &[&str]) -> String {
    label_values.join("\u{1f}")
}

impl CostCounterVec {
    fn new(name: &str, help: &str, labels: &[&'static str]) -> prometheus::Result<Self> {
        let desc = Desc::new(
            name.to_owned(),
            help.to_owned(),
            labels.iter().map(|l| (*l).to_owned()).collect(),
            HashMap::new(),
        )?;
        Ok(Self {
            desc,
            labels: labels.to_vec(),
            values: Mutex::new(HashMap::new()),
        })
    }

    /// Adds `picousd` to the series with these label values (creating it at 0 if new).
    pub fn add(&self, label_values: &[&str], picousd: u64) {
        let key = series_key(label_values);
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values
            .entry(key)
            .or_insert_with(|| (label_values.iter().map(|s| (*s).to_owned()).collect(), 0))
            .1 += u128::from(picousd);
    }

    /// Current total of one series in picodollars.
    pub fn get_picousd(&self, label_values: &[&str]) -> u128 {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.get(&series_key(label_values)).map_or(0, |(_, v)| *v)
    }

    /// Sum over all series in picodollars.
    pub fn total_picousd(&self) -> u128 {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.values().map(|(_, v)| v).sum()
    }
}

impl Collector for CostCounterVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let mut family = proto::MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::COUNTER);
        let mut metrics: Vec<proto::Metric> = values
            .values()
            .map(|(labels, pico)| {
                let pairs = self
                    .labels
                    .iter()
                    .zip(labels)
                    .map(|(name, value)| {
                        let mut p = proto::LabelPair::default();
                        p.set_name((*name).to_owned());
                        p.set_value(value.clone());
                        p
                    })
                    .collect();
                let mut counter = proto::Counter::default();
                counter.set_value(*pico as f64 / PICO_PER_USD);
                let mut m = proto::Metric::from_label(pairs);
                m.set_counter(counter);
                m
            })
            .collect();
        metrics.sort_by(|a, b| {
            let key = |m: &proto::Metric| {
                m.get_label()
                    .iter()
                    .map(|l| l.value().to_owned())
                    .collect::<Vec<_>>()
            };
            key(a).cmp(&key(b))
        });
        family.set_metric(metrics);
        vec![family]
    }
}

/// All metric families of llm-audit, registered in their own registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `llm_audit_requests_total{provider,model,outcome,status}`
    pub requests: IntCounterVec,
    /// `llm_audit_tokens_total{provider,model,type}`
    pub tokens: IntCounterVec,
    /// `llm_audit_cost_usd_total{provider,model,cost_status}`
    pub cost: std::sync::Arc<CostCounterVec>,
    /// `llm_audit_request_duration_seconds{provider,model,outcome}`
    pub request_duration: HistogramVec,
    /// `llm_audit_time_to_first_token_seconds{provider,model}`
    pub ttft: HistogramVec,
    /// `llm_audit_overhead_seconds`
    pub overhead: Histogram,
    /// `llm_audit_duplicate_requests_total{provider,model}`
    pub duplicates: IntCounterVec,
    /// `llm_audit_unpriced_requests_total{provider,model}`
    pub unpriced: IntCounterVec,
    /// `llm_audit_user_requests_total{user,outcome}`
    pub user_requests: IntCounterVec,
    /// `llm_audit_user_cost_usd_total{user}`
    pub user_cost: std::sync::Arc<CostCounterVec>,
    /// `llm_audit_user_request_tokens{user}`
    pub user_request_tokens: HistogramVec,
    /// `llm_audit_auth_failures_total{reason}`
    pub auth_failures: IntCounterVec,
    /// `llm_audit_passthrough_requests_total{status}`
    pub passthrough: IntCounterVec,
    /// `llm_audit_records_written_total`
    pub records_written: IntCounter,
    /// `llm_audit_records_dropped_total{reason}`
    pub records_dropped: IntCounterVec,
    /// `llm_audit_store_errors_total`
    pub store_errors: IntCounter,
    /// `llm_audit_store_queue_depth`
    pub store_queue_depth: IntGauge,
    /// `llm_audit_span_export_errors_total`
    pub span_export_errors: IntCounter,
    /// `gen_ai_client_token_usage{gen_ai_operation_name,…,gen_ai_token_type}`
    pub genai_token_usage: HistogramVec,
    /// `gen_ai_client_operation_duration_seconds{gen_ai_operation_name,…,error_type}`
    pub genai_duration: HistogramVec,
    /// Cap on the `user` label.
    pub user_cap: LabelCap,
    /// Cap on unknown `model` label values.
    pub model_cap: LabelCap,
}

/// Labels of the GenAI-convention histograms (dots become underscores in Prometheus).
const GENAI_LABELS: [&str; 4] = [
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
];

impl Metrics {
    /// Creates and registers every family. `token_threshold` becomes a bucket bound of
    /// `llm_audit_user_request_tokens`.
    pub fn new(
        max_user_labels: usize,
        max_model_labels: usize,
        token_threshold: u64,
    ) -> prometheus::Result<Self> {
        use names::*;
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram = |name: &str,
                         help: &str,
                         labels: &[&str],
                         buckets: Vec<f64>|
         -> prometheus::Result<HistogramVec> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let cost_vec = |name: &str, help: &str, labels: &[&'static str]| -> prometheus::Result<_> {
            let c = std::sync::Arc::new(CostCounterVec::new(name, help, labels)?);
            registry.register(Box::new(ArcCollector(c.clone())))?;
            Ok(c)
        };
        let plain_counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };

        let label_overflow = counter(
            LABEL_OVERFLOW,
            "Label values folded into __other__ because their label reached its cap.",
            &["label"],
        )?;
        let metrics = Self {
            requests: counter(
                REQUESTS,
                "Audited LLM API calls by outcome and HTTP status.",
                &["provider", "model", "outcome", "status"],
            )?,
            tokens: counter(
                TOKENS,
                "Tokens of audited calls by type (input includes cache_read, output includes reasoning).",
                &["provider", "model", "type"],
            )?,
            cost: cost_vec(
                COST,
                "Cost of audited calls in USD (exact sum of the audit log's cost_usd).",
                &["provider", "model", "cost_status"],
            )?,
            request_duration: histogram(
                REQUEST_DURATION,
                "Duration of audited calls from request start to the last byte, in seconds.",
                &["provider", "model", "outcome"],
                DURATION_BUCKETS.to_vec(),
            )?,
            ttft: histogram(
                TTFT,
                "Time from request start to the first streamed chunk, in seconds.",
                &["provider", "model"],
                DURATION_BUCKETS.to_vec(),
            )?,
            overhead: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        OVERHEAD,
                        "Time spent in the proxy itself per call, in seconds.",
                    )
                    .buckets(OVERHEAD_BUCKETS.to_vec()),
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            duplicates: counter(
                DUPLICATES,
                "Calls whose request hash was already seen within the detection window.",
                &["provider", "model"],
            )?,
            unpriced: counter(
                UNPRICED,
                "Calls priced by the fallback rate or not priced at all (model missing from the price table).",
                &["provider", "model"],
            )?,
            user_requests: counter(
                USER_REQUESTS,
                "Audited calls per user (capped; the rest under __other__).",
                &["user", "outcome"],
            )?,
            user_cost: cost_vec(
                USER_COST,
                "Cost per user in USD (capped; the rest under __other__).",
                &["user"],
            )?,
            user_request_tokens: histogram(
                USER_REQUEST_TOKENS,
                "Total tokens of each request per user; a bucket bound sits at the excessive-token threshold.",
                &["user"],
                user_token_buckets(token_threshold),
            )?,
            auth_failures: counter(
                AUTH_FAILURES,
                "Failed client authentications by reason.",
                &["reason"],
            )?,
            passthrough: counter(
                PASSTHROUGH,
                "Requests to /v1 paths forwarded without an audit record, by HTTP status.",
                &["status"],
            )?,
            records_written: plain_counter(
                RECORDS_WRITTEN,
                "Audit records committed to the store.",
            )?,
            records_dropped: counter(
                RECORDS_DROPPED,
                "Audit records lost by reason; anything above zero is an incident.",
                &["reason"],
            )?,
            store_errors: plain_counter(STORE_ERRORS, "Failed writes to the audit store.")?,
            store_queue_depth: {
                let g = IntGauge::new(
                    STORE_QUEUE_DEPTH,
                    "Audit records waiting for the store writer.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            span_export_errors: plain_counter(
                SPAN_EXPORT_ERRORS,
                "Failed OTLP span export batches, plus one per export round that dropped spans because the queue was full.",
            )?,
            genai_token_usage: histogram(
                GENAI_TOKEN_USAGE,
                "GenAI semantic convention: tokens used per operation by token type.",
                &[GENAI_LABELS.as_slice(), &["gen_ai_token_type"]].concat(),
                token_buckets(),
            )?,
            genai_duration: histogram(
                GENAI_DURATION,
                "GenAI semantic convention: duration of the client operation in seconds.",
                &[GENAI_LABELS.as_slice(), &["error_type"]].concat(),
                DURATION_BUCKETS.to_vec(),
            )?,
            user_cap: LabelCap {
                label: "user",
                max: max_user_labels,
                seen: RwLock::default(),
                overflow: label_overflow.with_label_values(&["user"]),
            },
            model_cap: LabelCap {
                label: "model",
                max: max_model_labels,
                seen: RwLock::default(),
                overflow: label_overflow.with_label_values(&["model"]),
            },
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "llm-audit build information."),
            &["version"],
        )?;
        metrics.registry.register(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let start = prometheus::Gauge::new(
            PROCESS_START,
            "Start time of the process since unix epoch in seconds.",
        )?;
        metrics.registry.register(Box::new(start.clone()))?;
        start.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        metrics.init_known_series();
        Ok(metrics)
    }

    /// Creates at 0 the series whose label values are known in advance, so a rule or panel
    /// never confuses "absent" with "zero".
    fn init_known_series(&self) {
        for reason in DROP_REASONS {
            self.records_dropped.with_label_values(&[reason]);
        }
        for reason in AUTH_FAILURE_REASONS {
            self.auth_failures.with_label_values(&[reason]);
        }
    }

    /// Creates at 0 the series of a front door's own answers for `provider`: every status the
    /// proxy answers itself (rejections, timeouts) and client disconnects, under model
    /// `unknown` (how a call whose body named no model is recorded). A rule's `increase()` then
    /// sees the first rejection as a step from 0, not as a series born with its first sample.
    pub fn init_front_door_series(&self, provider: &str) {
        for status in OWN_STATUSES {
            self.requests
                .with_label_values(&[provider, UNKNOWN_MODEL, "error", status]);
        }
        self.requests
            .with_label_values(&[provider, UNKNOWN_MODEL, "aborted", "499"]);
    }

    /// The registry, for serving `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Registers an `Arc`-shared collector (the registry wants ownership).
struct ArcCollector(std::sync::Arc<CostCounterVec>);

impl Collector for ArcCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<proto::MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_cap_folds_overflow() {
        let m = Metrics::new(2, 2, 100_000).unwrap();
        assert_eq!(m.user_cap.apply("a"), "a");
        assert_eq!(m.user_cap.apply("b"), "b");
        assert_eq!(m.user_cap.apply("c"), OTHER);
        assert_eq!(m.user_cap.apply("a"), "a");
        assert!(
            m.encode()
                .contains("llm_audit_label_overflow_total{label=\"user\"} 1")
        );
    }

    #[test]
    fn threshold_is_a_bucket() {
        assert!(user_token_buckets(100_000).contains(&100_000.0));
        assert!(user_token_buckets(123_457).contains(&123_457.0));
    }
}
