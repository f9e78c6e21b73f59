//! Tracing setup: a stderr log layer plus, when an OTLP endpoint is configured, the
//! OpenTelemetry layer exporting spans over gRPC or HTTP/protobuf. An OTel version bump should
//! touch only this file.

pub mod export;
pub mod metrics;
pub mod otlp_wire;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::IntCounter;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use metrics::Metrics;

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// gRPC (port 4317 by convention).
    Grpc,
    /// HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

/// Where spans go. Built from the standard `OTEL_*` variables by [`TelemetryConfig::from_env`].
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Full traces endpoint (`http://host:4317`, or `http://host:4318/v1/traces` for HTTP);
    /// `None` means no export and no complaint.
    pub endpoint: Option<String>,
    /// Transport.
    pub protocol: OtlpProtocol,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Export timeout per batch.
    pub timeout: Duration,
    /// Extra request headers (gRPC metadata), e.g. a collector's API key.
    pub headers: Vec<(String, String)>,
    /// Compress export bodies with gzip.
    pub gzip: bool,
}

/// A telemetry setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` value we do not understand.
    #[error("unsupported {var}={value:?} (expected {expected})")]
    Unsupported {
        /// What would have been understood.
        expected: &'static str,
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The exporter could not be built.
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("tracing was already initialised: {0}")]
    AlreadyInitialised(String),
}

impl TelemetryConfig {
    /// No export.
    pub fn disabled() -> Self {
        Self {
            endpoint: None,
            protocol: OtlpProtocol::Grpc,
            service_name: "llm-audit".into(),
            timeout: Duration::from_secs(10),
            headers: Vec::new(),
            gzip: false,
        }
    }

    /// Reads `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`, `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION` and
    /// `OTEL_SERVICE_NAME` from the environment.
    pub fn from_env() -> Result<Self, TelemetryError> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
    }

    /// As [`from_env`](Self::from_env), reading variables through `get` (testable).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, TelemetryError> {
        let mut cfg = Self::disabled();
        if let Some(name) = get("OTEL_SERVICE_NAME") {
            cfg.service_name = name;
        }
        let (var, protocol) = match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(p) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(p)),
            None => (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                get("OTEL_EXPORTER_OTLP_PROTOCOL"),
            ),
        };
        cfg.protocol = match protocol.as_deref().map(str::trim) {
            None | Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(other) => {
                return Err(TelemetryError::Unsupported {
                    expected: "grpc or http/protobuf",
                    var,
                    value: other.to_owned(),
                });
            }
        };
        // The signal-specific variable wins over the generic one, as in every OTel SDK.
        let pick = |traces: &'static str, generic: &'static str| match get(traces) {
            Some(v) => Some((traces, v)),
            None => get(generic).map(|v| (generic, v)),
        };
        if let Some((_, headers)) = pick(
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ) {
            cfg.headers = parse_headers(&headers);
        }
        if let Some((var, c)) = pick(
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ) {
            cfg.gzip = match c.trim() {
                "gzip" => true,
                "none" => false,
                other => {
                    return Err(TelemetryError::Unsupported {
                        expected: "gzip or none",
                        var,
                        value: other.to_owned(),
                    });
                }
            };
        }
        if let Some(ms) = get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| get("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            cfg.timeout = Duration::from_millis(ms);
        }
        let disabled = get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || get("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none");
        if disabled {
            return Ok(cfg);
        }
        cfg.endpoint = match get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(e) => Some(e),
            None => get("OTEL_EXPORTER_OTLP_ENDPOINT").map(|base| match cfg.protocol {
                OtlpProtocol::Grpc => base,
                // The spec: the generic endpoint is a base URL; HTTP appends the signal path.
                OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
            }),
        };
        Ok(cfg)
    }
}

/// Builds the tracer provider for `cfg`, or `None` when export is off. Must run inside a Tokio
/// runtime (the gRPC channel needs its reactor).
pub fn tracer_provider(
    cfg: &TelemetryConfig,
    export_errors: IntCounter,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(endpoint) = &cfg.endpoint else {
        return Ok(None);
    };
    let exporter = export::WireExporter::new(cfg, endpoint)?;
    let processor = export::EncodingProcessor::new(exporter, batch_limits(), export_errors)
        .map_err(|e| TelemetryError::Exporter(format!("span export thread: {e}")))?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    Ok(Some(provider))
}

/// Span batching: the standard `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` and
/// `OTEL_BSP_SCHEDULE_DELAY` (ms) when set, else ours. The SDK's defaults (2,048 spans, every
/// 5 s) overflowed above ~400 calls/s; 8,192 spans hold 8 s of a 1,000 calls/s proxy while a
/// collector is away (~700 B each, encoded: 6 MB at most), batches of 512 stay well under the
/// 4 MiB a collector accepts per request, and leave as soon as they are full.
fn batch_limits() -> export::BatchLimits {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    export::BatchLimits {
        max_queue: var("OTEL_BSP_MAX_QUEUE_SIZE").map_or(8_192, |v| v as usize),
        max_batch: var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").map_or(512, |v| v as usize),
        delay: Duration::from_millis(var("OTEL_BSP_SCHEDULE_DELAY").unwrap_or(1_000)),
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value` pairs separated by commas, values
/// percent-encoded (the W3C baggage format the OTel specification names); malformed pairs are
/// skipped, as the SDKs do.
fn parse_headers(raw: &str) -> Vec<(String, String)> {
    raw.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let k = k.trim();
            let v = percent_encoding::percent_decode_str(v.trim())
                .decode_utf8()
                .ok()?;
            (!k.is_empty()).then(|| (k.to_owned(), v.into_owned()))
        })
        .collect()
}

/// The OpenTelemetry layer for `provider`, filtered so the exporter's own HTTP/gRPC stack never
/// produces spans about exporting spans.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let tracer = provider.tracer("llm-audit");
    // Only the attributes of the telemetry contract: no source locations, thread ids or
    // busy/idle timings (the last costs two clock reads per poll of an instrumented future).
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(quiet_exporter_targets())
}

fn quiet_exporter_targets() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("h2", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("reqwest", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
}

/// Installs the global subscriber: logs to stderr (filtered by `RUST_LOG`, default `info`)
/// and spans to OTLP when configured. Keep the guard; shut it down to flush.
pub fn init(cfg: &TelemetryConfig, metrics: &Metrics) -> Result<TelemetryGuard, TelemetryError> {
    let provider = tracer_provider(cfg, metrics.span_export_errors.clone())?;
    let env_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(env_filter);
    tracing_subscriber::registry()
        .with(fmt)
        .with(provider.as_ref().map(otel_layer))
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Ok(TelemetryGuard { provider })
}

/// Flushes and stops span export when shut down.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// A guard owning `provider` (for tests that install their own subscriber).
    pub fn new(provider: Option<SdkTracerProvider>) -> Self {
        Self { provider }
    }

    /// Exports every finished span, then stops the exporter. The SDK's flush blocks, so it runs
    /// on the blocking pool (calling it on a runtime thread stalls the exporter it waits for).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = provider.force_flush();
                provider.shutdown()
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<TelemetryConfig, TelemetryError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        TelemetryConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn env_selects_endpoint_and_protocol() {
        assert!(cfg(&[]).unwrap().endpoint.is_none());
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ])
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://c:4318/v1/traces"));
        let c = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]).unwrap();
        assert_eq!(
            (c.endpoint.as_deref(), c.protocol),
            (Some("http://c:4317"), OtlpProtocol::Grpc)
        );
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])
        .unwrap();
        assert!(c.endpoint.is_none());
        assert!(cfg(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).is_err());
    }

    #[test]
    fn env_sets_headers_and_compression() {
        let c = cfg(&[
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=a%20b%3Dc, x-tenant = t1 ,broken,=v",
            ),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ])
        .unwrap();
        assert_eq!(
            c.headers,
            [
                ("api-key".to_owned(), "a b=c".to_owned()),
                ("x-tenant".to_owned(), "t1".to_owned())
            ]
        );
        assert!(c.gzip);
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
        ])
        .unwrap();
        assert_eq!(c.headers, [("b".to_owned(), "2".to_owned())]);
        assert!(!c.gzip);
        assert!(cfg(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")]).is_err());
    }
}
