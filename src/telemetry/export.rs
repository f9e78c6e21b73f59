//! Span export: [`EncodingProcessor`] encodes each span to OTLP protobuf as it ends
//! ([`otlp_wire`](super::otlp_wire)) and a background thread sends the bytes in batches over
//! OTLP/gRPC (tonic, raw-bytes codec) or OTLP/HTTP with protobuf bodies (hyper-util's client).
//!
//! Not opentelemetry-otlp's exporter: converting `SpanData` into the generated protobuf
//! structs and letting prost encode them costs ~40k instructions per span (prost recomputes the
//! length of every nested message at each level), a quarter of the proxy's whole CPU per call
//! (callgrind, 2026-11-26). Not the SDK's batch processor either (see [`EncodingProcessor`]).
//! The wire format and the transports stay the standard ones; tests decode what a real gRPC and
//! a real HTTP receiver get with the reference protobuf types.
//!
//! The network part of each export runs as a task on the runtime the exporter was built in.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use bytes::{Buf as _, BufMut as _, Bytes};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};
use prometheus::IntCounter;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::otlp_wire::EncodedSpans;
use super::{OtlpProtocol, TelemetryConfig, TelemetryError};
use crate::wire::PooledClient;

const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Attempts per batch for errors the OTLP specification calls retryable.
const ATTEMPTS: u32 = 4;

/// OTLP span exporter with a one-pass encoder.
#[derive(Debug)]
pub struct WireExporter {
    transport: Transport,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

#[derive(Clone, Debug)]
enum Transport {
    Grpc {
        channel: Channel,
        metadata: MetadataMap,
        gzip: bool,
    },
    Http(Box<HttpTarget>),
}

#[derive(Clone, Debug)]
struct HttpTarget {
    client: PooledClient<hyper_rustls::HttpsConnector<HttpConnector>>,
    uri: Uri,
    headers: HeaderMap,
    gzip: bool,
}

impl WireExporter {
    /// An exporter for `cfg` (which names an endpoint). Must run inside a Tokio runtime: the
    /// connections live on it.
    pub fn new(cfg: &TelemetryConfig, endpoint: &str) -> Result<Self, TelemetryError> {
        let bad = |why: String| TelemetryError::Exporter(why);
        // opentelemetry-otlp's reading of an endpoint without a scheme: https.
        let endpoint = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("https://{endpoint}")
        };
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| bad(format!("invalid OTLP endpoint {endpoint:?}: {e}")))?;
        let https = uri.scheme_str() == Some("https");
        // `OTEL_EXPORTER_OTLP_HEADERS`: HTTP headers, or gRPC metadata (the same on the wire).
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| bad(format!("invalid OTLP header name {k:?}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| bad(format!("invalid value for OTLP header {k:?}")))?;
            headers.append(name, value);
        }
        let transport = match cfg.protocol {
            OtlpProtocol::Grpc => {
                let mut ep = Endpoint::from_shared(endpoint.clone())
                    .map_err(|e| bad(format!("invalid OTLP endpoint {endpoint:?}: {e}")))?
                    .tcp_nodelay(true)
                    .connect_timeout(cfg.timeout);
                if https {
                    ep = ep
                        .tls_config(ClientTlsConfig::new().with_native_roots())
                        .map_err(|e| bad(format!("OTLP TLS set-up: {e}")))?;
                }
                Transport::Grpc {
                    channel: ep.connect_lazy(),
                    metadata: MetadataMap::from_headers(headers),
                    gzip: cfg.gzip,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                let client = crate::wire::https(crate::wire::http_connector(cfg.timeout))
                    .map(crate::wire::pooled)
                    .map_err(|e| bad(format!("OTLP TLS set-up: {e}")))?;
                let mut headers = headers;
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
                if cfg.gzip {
                    headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                Transport::Http(Box::new(HttpTarget {
                    client,
                    uri,
                    headers,
                    gzip: cfg.gzip,
                }))
            }
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| bad("the OTLP exporter needs a Tokio runtime".into()))?;
        Ok(Self {
            transport,
            runtime,
            timeout: cfg.timeout,
        })
    }
}

impl WireExporter {
    /// Sends one encoded `ExportTraceServiceRequest`, retrying what the OTLP specification
    /// calls retryable, within the export timeout. Blocks: call it from a thread outside the
    /// runtime; the network part runs as a task on the runtime the exporter was built in.
    fn send_blocking(&self, body: Bytes) -> Result<(), String> {
        let transport = self.transport.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let deadline = Instant::now() + timeout;
            match tokio::time::timeout(timeout, transport.send_with_retries(body, deadline)).await {
                Ok(result) => result,
                Err(_) => Err(format!("OTLP export timed out after {timeout:?}")),
            }
        });
        // Called from the export thread only (never inside the runtime); the task itself still
        // needs a runtime worker, so callers of flush and shutdown must not block the only one.
        match self.runtime.block_on(task) {
            Ok(result) => result,
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Batching, in the standard `OTEL_BSP_*` terms.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Spans held at most; beyond, new spans are dropped and counted.
    pub max_queue: usize,
    /// Spans per export request at most; a full batch leaves at once.
    pub max_batch: usize,
    /// Longest wait before a partial batch leaves.
    pub delay: Duration,
}

/// The span processor: each span is encoded to OTLP protobuf when it ends, on the thread that
/// ends it ([`EncodedSpans`]), and a background thread sends the bytes in batches. Replaces the
/// SDK's `BatchSpanProcessor`, whose queue of `SpanData` was read back cold by its thread: at
/// concurrency 1 on one core the span pipeline cost the proxy ~30 µs per call, a third of its
/// CPU, for ~30k instructions (bench/README.md).
#[derive(Debug)]
pub struct EncodingProcessor {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    limits: BatchLimits,
    resource: Mutex<Resource>,
    errors: IntCounter,
}

#[derive(Debug, Default)]
struct State {
    /// Full batches waiting to leave, oldest first, then the one filling.
    full: VecDeque<EncodedSpans>,
    filling: EncodedSpans,
    held: usize,
    dropped: u64,
    /// Callers of `force_flush` waiting for everything before them to be sent.
    flushes: Vec<mpsc::Sender<Result<(), String>>>,
    stop: bool,
}

impl EncodingProcessor {
    /// Starts the export thread. Failed exports and dropped spans count in `errors`
    /// (`llm_audit_span_export_errors_total`).
    pub fn new(
        exporter: WireExporter,
        limits: BatchLimits,
        errors: IntCounter,
    ) -> std::io::Result<Self> {
        let limits = BatchLimits {
            max_queue: limits.max_queue.max(1),
            max_batch: limits.max_batch.clamp(1, limits.max_queue.max(1)),
            // A zero delay would spin the export thread (`OTEL_BSP_SCHEDULE_DELAY=0`).
            delay: limits.delay.max(Duration::from_millis(1)),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            limits,
            resource: Mutex::new(Resource::builder_empty().build()),
            errors,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("llm-audit-spans".into())
            .spawn(move || {
                crate::background::lower_current_thread();
                worker.run(&exporter);
            })?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, exporter: &WireExporter) {
        let mut last = Instant::now();
        loop {
            let mut state = self.lock();
            loop {
                if state.stop || !state.full.is_empty() || !state.flushes.is_empty() {
                    break;
                }
                let waited = last.elapsed();
                if waited >= self.limits.delay {
                    break;
                }
                state = self
                    .wake
                    .wait_timeout(state, self.limits.delay - waited)
                    .map_or_else(|p| p.into_inner().0, |(g, _)| g);
            }
            let mut batches = std::mem::take(&mut state.full);
            let pending = std::mem::take(&mut state.filling);
            if !pending.is_empty() {
                batches.push_back(pending);
            }
            // `held` still counts these until each is sent, so spans in flight and spans
            // queued meanwhile stay within `max_queue` together.
            let dropped = std::mem::take(&mut state.dropped);
            let flushes = std::mem::take(&mut state.flushes);
            let stop = state.stop;
            drop(state);
            last = Instant::now();

            if dropped > 0 {
                // Counted in `on_end` at the first drop; the number is logged here.
                tracing::warn!(
                    dropped,
                    max_queue = self.limits.max_queue,
                    "Spans dropped: the export queue was full (collector slow or away)."
                );
            }
            let resource = self
                .resource
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut result = Ok(());
            for batch in batches {
                let spans = batch.len();
                let mut body = Vec::with_capacity(batch.encoded_len() + 256);
                batch.encode_request(&resource, &mut body);
                drop(batch);
                let sent = exporter.send_blocking(Bytes::from(body));
                let mut state = self.lock();
                state.held = state.held.saturating_sub(spans);
                drop(state);
                if let Err(message) = sent {
                    self.errors.inc();
                    tracing::debug!(error = %message, "OTLP span export failed.");
                    result = Err(message);
                }
            }
            for flush in flushes {
                let _ = flush.send(result.clone());
            }
            if stop {
                return;
            }
        }
    }
}

impl SpanProcessor for EncodingProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // Encoded outside the lock, so span ends on several workers do not queue behind one
        // another; only the copy into the batch happens under it.
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            EncodedSpans::encode_span(&span, scratch);
            let limits = self.shared.limits;
            let mut state = self.state();
            if state.stop || state.held >= limits.max_queue {
                if state.dropped == 0 {
                    // One count per round that drops, at once: visible even while the export
                    // thread is stuck in a long round.
                    self.shared.errors.inc();
                }
                state.dropped += 1;
                return;
            }
            state
                .filling
                .push_encoded(&span.instrumentation_scope, scratch);
            state.held += 1;
            if state.filling.len() >= limits.max_batch {
                let full = std::mem::take(&mut state.filling);
                state.full.push_back(full);
                drop(state);
                self.shared.wake.notify_one();
            }
        });
        // `span` is dropped here, on the thread that built it and while it is still in cache.
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (tx, rx) = mpsc::channel();
        {
            let mut state = self.state();
            // The thread has left (or is leaving) its loop: no one would answer.
            if state.stop {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            state.flushes.push(tx);
        }
        self.shared.wake.notify_one();
        // One overall bound, however many batches are held: shutdown must fit in a termination
        // grace period even when the collector swallows every request. What is left is sent,
        // or dropped, by `shutdown`.
        rx.recv_timeout(FLUSH_WAIT)
            .map_err(|_| OTelSdkError::Timeout(FLUSH_WAIT))?
            .map_err(OTelSdkError::InternalFailure)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(OTelSdkError::AlreadyShutdown);
        };
        // Joining cannot time out: wait for the thread's last round through a flush instead.
        // Stop and the flush go in under one lock, so that last round always answers it.
        let (tx, rx) = mpsc::channel();
        {
            let mut state = self.state();
            state.stop = true;
            state.flushes.push(tx);
        }
        self.shared.wake.notify_one();
        match rx.recv_timeout(timeout) {
            Ok(result) => {
                let _ = thread.join();
                result.map_err(OTelSdkError::InternalFailure)
            }
            Err(_) => Err(OTelSdkError::Timeout(timeout)),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        *self
            .shared
            .resource
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = resource.clone();
    }
}

thread_local! {
    /// Each thread's buffer for encoding the span it ends.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Longest wait in `force_flush`.
const FLUSH_WAIT: Duration = Duration::from_secs(15);

/// One try's failure: whether the OTLP specification lets us try again.
struct Failure {
    retryable: bool,
    message: String,
}

impl Transport {
    async fn send_with_retries(&self, body: Bytes, deadline: Instant) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.send(body.clone()).await {
                Ok(()) => return Ok(()),
                Err(f) => f,
            };
            // Exponential back-off with jitter, never past the export timeout.
            let delay =
                Duration::from_millis(100 * (1 << (attempt - 1))).mul_f64(0.5 + fastrand::f64());
            if !failure.retryable || attempt >= ATTEMPTS || Instant::now() + delay >= deadline {
                return Err(failure.message);
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn send(&self, body: Bytes) -> Result<(), Failure> {
        match self {
            Transport::Grpc {
                channel,
                metadata,
                gzip,
            } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                if *gzip {
                    grpc = grpc.send_compressed(CompressionEncoding::Gzip);
                }
                grpc.ready().await.map_err(|e| Failure {
                    retryable: true,
                    message: crate::wire::error_chain(&e),
                })?;
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                let path = axum::http::uri::PathAndQuery::from_static(GRPC_PATH);
                match grpc.unary(request, path, RawCodec).await {
                    Ok(_) => Ok(()),
                    Err(status) => Err(Failure {
                        // OTLP/gRPC: these codes are transient, the rest are not.
                        retryable: matches!(
                            status.code(),
                            tonic::Code::Cancelled
                                | tonic::Code::DeadlineExceeded
                                | tonic::Code::Aborted
                                | tonic::Code::OutOfRange
                                | tonic::Code::Unavailable
                                | tonic::Code::DataLoss
                        ),
                        message: format!(
                            "OTLP/gRPC export failed: {:?}: {}",
                            status.code(),
                            status.message()
                        ),
                    }),
                }
            }
            Transport::Http(target) => {
                let HttpTarget {
                    client,
                    uri,
                    headers,
                    gzip,
                } = &**target;
                let body = if *gzip { gzip_bytes(&body) } else { body };
                let mut request = Request::new(Full::new(body));
                *request.method_mut() = Method::POST;
                *request.uri_mut() = uri.clone();
                *request.headers_mut() = headers.clone();
                let response = client.request(request).await.map_err(|e| Failure {
                    retryable: true,
                    message: format!("OTLP/HTTP export failed: {}", crate::wire::error_chain(&e)),
                })?;
                let status = response.status();
                // Read the answer to the end so the connection goes back to the pool.
                let _ = response.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(Failure {
                        // OTLP/HTTP: 429, 502, 503 and 504 are transient.
                        retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                        message: format!("OTLP/HTTP export failed: HTTP {status}"),
                    })
                }
            }
        }
    }
}

fn gzip_bytes(body: &[u8]) -> Bytes {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(body);
    Bytes::from(enc.finish().unwrap_or_default())
}

/// A tonic codec for bytes already in protobuf form; the answer
/// (`ExportTraceServiceResponse`) is read and not interpreted.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Self::Error> {
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::InstrumentationScope;
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::time::SystemTime;

    fn span(id: u64, sampled: bool) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(u128::from(id) + 1),
                SpanId::from(id + 1),
                if sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: "chat m".into(),
            start_time: SystemTime::UNIX_EPOCH,
            end_time: SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("t").build(),
        }
    }

    /// A processor whose export thread never runs: what `on_end` queues stays put.
    fn paused(limits: BatchLimits) -> EncodingProcessor {
        EncodingProcessor {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                limits,
                resource: Mutex::new(Resource::builder_empty().build()),
                errors: IntCounter::new("e", "e").unwrap(),
            }),
            thread: Mutex::new(None),
        }
    }

    #[test]
    fn shutdown_answers_at_once_and_only_once() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        let cfg = TelemetryConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            timeout: Duration::from_millis(200),
            ..TelemetryConfig::disabled()
        };
        let limits = BatchLimits {
            max_queue: 16,
            max_batch: 4,
            delay: Duration::from_secs(60),
        };
        // A few rounds: shutdown must not wait out its timeout whatever the export thread is
        // doing when it arrives (stop and the final flush are set under one lock for that).
        for _ in 0..5 {
            let exporter = WireExporter::new(&cfg, "http://127.0.0.1:9").unwrap();
            let errors = IntCounter::new("e", "e").unwrap();
            let p = EncodingProcessor::new(exporter, limits, errors).unwrap();
            let started = Instant::now();
            assert!(p.shutdown_with_timeout(Duration::from_secs(5)).is_ok());
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
            assert!(matches!(
                p.force_flush(),
                Err(OTelSdkError::AlreadyShutdown)
            ));
            assert!(matches!(
                p.shutdown_with_timeout(Duration::from_secs(5)),
                Err(OTelSdkError::AlreadyShutdown)
            ));
        }
    }

    #[test]
    fn full_batches_leave_and_a_full_queue_drops_and_counts() {
        let p = paused(BatchLimits {
            max_queue: 5,
            max_batch: 2,
            delay: Duration::from_secs(60),
        });
        for id in 0..12 {
            p.on_end(span(id, true));
        }
        p.on_end(span(99, false));
        let state = p.state();
        // Two full batches wait, the fifth span fills the next one, the rest are dropped.
        assert_eq!(
            state.full.iter().map(EncodedSpans::len).collect::<Vec<_>>(),
            vec![2, 2]
        );
        assert_eq!(state.filling.len(), 1);
        assert_eq!(state.held, 5);
        assert_eq!(state.dropped, 7);
        // Counted at the first drop of the round, not per span and not later.
        assert_eq!(p.shared.errors.get(), 1);
    }
}
