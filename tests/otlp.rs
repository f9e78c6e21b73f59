#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The span of an audited call as an OTLP receiver sees it (DESIGN §5): exported over gRPC to an
//! in-process `TraceService` and over HTTP/protobuf to an in-process `/v1/traces` endpoint, then
//! decoded and checked attribute by attribute, with value types.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_audit::audit::usage::parse_json_response;
use llm_audit::audit::{CallEnd, CallStart, Emitted, Operation, ParsedRequest};
use llm_audit::telemetry::{
    OtlpProtocol, TelemetryConfig, TelemetryGuard, otel_layer, tracer_provider,
};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Av;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::IntCounter;
use prost::Message as _;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt as _;

const SERVICE: &str = "llm-audit-otlp-test";
const PROMPT_MARKER: &str = "zqprompt-capital-of-freedonia";
const ANSWER_MARKER: &str = "zqanswer-fredonia-city";
const KEY_ID: &str = "key_0123456789abcdef";

type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;
/// Per export request: the `x-api-key` header and the body's compression, as a receiver saw them.
type Heard = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

// ---------------------------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------------------------

struct GrpcCollector {
    received: Received,
    heard: Heard,
}

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let header = |k: &str| {
            request
                .metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let heard = (header("x-api-key"), header("grpc-encoding"));
        self.heard.lock().unwrap().push(heard);
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a free loopback port; returns its endpoint URL.
async fn grpc_receiver() -> (String, Received) {
    let (url, received, _) = grpc_receiver_hearing().await;
    (url, received)
}

async fn grpc_receiver_hearing() -> (String, Received, Heard) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Received::default();
    let heard = Heard::default();
    let service = TraceServiceServer::new(GrpcCollector {
        received: received.clone(),
        heard: heard.clone(),
    })
    .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("http://127.0.0.1:{port}"), received, heard)
}

async fn http_export(
    axum::extract::State((received, heard)): axum::extract::State<(Received, Heard)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> impl axum::response::IntoResponse {
    let header = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let encoding = header("content-encoding");
    heard
        .lock()
        .unwrap()
        .push((header("x-api-key"), encoding.clone()));
    let body = if encoding.as_deref() == Some("gzip") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out).unwrap();
        axum::body::Bytes::from(out)
    } else {
        body
    };
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if content_type != "application/x-protobuf" {
        return (
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            format!("unexpected content-type {content_type:?}").into_bytes(),
        );
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(req) => {
            received.lock().unwrap().push(req);
            (
                axum::http::StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(e) => (
            axum::http::StatusCode::BAD_REQUEST,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            e.to_string().into_bytes(),
        ),
    }
}

/// An OTLP/HTTP (protobuf) receiver on a free loopback port; returns its traces URL.
async fn http_receiver() -> (String, Received) {
    let (url, received, _) = http_receiver_hearing().await;
    (url, received)
}

async fn http_receiver_hearing() -> (String, Received, Heard) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Received::default();
    let heard = Heard::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(http_export))
        .with_state((received.clone(), heard.clone()));
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (
        format!("http://127.0.0.1:{port}/v1/traces"),
        received,
        heard,
    )
}

// ---------------------------------------------------------------------------------------------
// Driving calls
// ---------------------------------------------------------------------------------------------

fn provider(endpoint: String, protocol: OtlpProtocol, errors: IntCounter) -> SdkTracerProvider {
    tracer_provider(
        &TelemetryConfig {
            endpoint: Some(endpoint),
            protocol,
            service_name: SERVICE.into(),
            timeout: Duration::from_secs(3),
            ..TelemetryConfig::disabled()
        },
        errors,
    )
    .unwrap()
    .expect("an endpoint gives a provider")
}

fn export_errors() -> IntCounter {
    IntCounter::new("llm_audit_span_export_errors_total", "test").unwrap()
}

fn chat_request() -> serde_json::Value {
    json!({
        "model": "gpt-4.1",
        "messages": [
            {"role": "system", "content": "You answer geography questions."},
            {"role": "user", "content": format!("What is the {PROMPT_MARKER}?")}
        ],
        "max_tokens": 50,
        "temperature": 0.2,
        "user": "alice"
    })
}

fn call_start(body: serde_json::Value) -> CallStart {
    let mut call = CallStart::from_request(
        ParsedRequest::from_value(Operation::Chat, body, None).unwrap(),
        Arc::from("openai"),
    );
    call.key_id = Some(KEY_ID.into());
    call.ip_address = Some("203.0.113.7".into());
    call.server_address = Some("api.openai.com".into());
    call.server_port = Some(443);
    call
}

fn ok_end() -> CallEnd {
    let body = json!({
        "id": "chatcmpl-otlp-1",
        "object": "chat.completion",
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": format!("It is {ANSWER_MARKER}.")}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "It is"}, "finish_reason": "length"}
        ],
        "usage": {
            "prompt_tokens": 1200,
            "completion_tokens": 300,
            "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1000},
            "completion_tokens_details": {"reasoning_tokens": 100}
        }
    });
    CallEnd::ok(
        200,
        parse_json_response(body.to_string().as_bytes()).unwrap(),
    )
}

/// Runs one call begin→finish under a subscriber exporting to `provider` (thread-local, so the
/// whole call stays on this thread).
fn drive(
    h: &common::Harness,
    provider: &SdkTracerProvider,
    call: CallStart,
    end: CallEnd,
) -> Emitted {
    let subscriber = tracing_subscriber::registry().with(otel_layer(provider));
    let _guard = tracing::subscriber::set_default(subscriber);
    let inflight = h.recorder.begin(call);
    inflight.finish(end)
}

/// Flushes and shuts down the provider, then returns what the receiver holds.
async fn flush(provider: SdkTracerProvider, received: &Received) -> Vec<ExportTraceServiceRequest> {
    TelemetryGuard::new(Some(provider)).shutdown().await;
    // The receiver stores a batch before it answers, so after the flush it is already there;
    // the short wait only guards against a slow scheduler.
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    received.lock().unwrap().clone()
}

fn spans(reqs: &[ExportTraceServiceRequest]) -> Vec<Span> {
    reqs.iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| ss.spans.clone())
        .collect()
}

fn only_span(reqs: &[ExportTraceServiceRequest]) -> Span {
    let all = spans(reqs);
    assert_eq!(
        all.len(),
        1,
        "exactly one span per audited call, got {:?}",
        all.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    all.into_iter().next().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Attribute helpers
// ---------------------------------------------------------------------------------------------

fn attrs(span: &Span) -> HashMap<&str, &Av> {
    let mut map = HashMap::new();
    for KeyValue { key, value, .. } in &span.attributes {
        let v = value
            .as_ref()
            .and_then(|v| v.value.as_ref())
            .unwrap_or_else(|| panic!("attribute {key} has no value"));
        assert!(
            map.insert(key.as_str(), v).is_none(),
            "attribute {key} appears twice"
        );
    }
    map
}

fn get<'a>(a: &HashMap<&str, &'a Av>, key: &str) -> &'a Av {
    a.get(key)
        .copied()
        .unwrap_or_else(|| panic!("attribute {key} missing; have {:?}", a.keys()))
}

fn string(a: &HashMap<&str, &Av>, key: &str) -> String {
    match get(a, key) {
        Av::StringValue(s) => s.clone(),
        other => panic!("{key} should be a string, is {other:?}"),
    }
}

fn int(a: &HashMap<&str, &Av>, key: &str) -> i64 {
    match get(a, key) {
        Av::IntValue(i) => *i,
        other => panic!("{key} should be an int, is {other:?}"),
    }
}

fn double(a: &HashMap<&str, &Av>, key: &str) -> f64 {
    match get(a, key) {
        Av::DoubleValue(d) => *d,
        other => panic!("{key} should be a double, is {other:?}"),
    }
}

fn boolean(a: &HashMap<&str, &Av>, key: &str) -> bool {
    match get(a, key) {
        Av::BoolValue(b) => *b,
        other => panic!("{key} should be a bool, is {other:?}"),
    }
}

fn string_array(a: &HashMap<&str, &Av>, key: &str) -> Vec<String> {
    match get(a, key) {
        Av::ArrayValue(arr) => arr
            .values
            .iter()
            .map(|v| match v.value.as_ref() {
                Some(Av::StringValue(s)) => s.clone(),
                other => panic!("{key} should hold strings, holds {other:?}"),
            })
            .collect(),
        other => panic!("{key} should be an array of strings, is {other:?}"),
    }
}

/// Every string found anywhere in a value (arrays and maps included).
fn collect_strings(v: &AnyValue, out: &mut Vec<String>) {
    match v.value.as_ref() {
        Some(Av::StringValue(s)) => out.push(s.clone()),
        Some(Av::ArrayValue(a)) => a.values.iter().for_each(|v| collect_strings(v, out)),
        Some(Av::KvlistValue(kv)) => kv
            .values
            .iter()
            .filter_map(|kv| kv.value.as_ref())
            .for_each(|v| collect_strings(v, out)),
        Some(Av::BytesValue(b)) => out.push(String::from_utf8_lossy(b).into_owned()),
        _ => {}
    }
}

/// Every attribute value of every resource, scope, span, event and link in the export.
fn all_attribute_strings(reqs: &[ExportTraceServiceRequest]) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |kvs: &[KeyValue]| {
        for kv in kvs {
            if let Some(v) = &kv.value {
                collect_strings(v, &mut out);
            }
        }
    };
    for rs in reqs.iter().flat_map(|r| &r.resource_spans) {
        if let Some(res) = &rs.resource {
            push(&res.attributes);
        }
        for ss in &rs.scope_spans {
            if let Some(scope) = &ss.scope {
                push(&scope.attributes);
            }
            for s in &ss.spans {
                push(&s.attributes);
                for e in &s.events {
                    push(&e.attributes);
                }
                for l in &s.links {
                    push(&l.attributes);
                }
            }
        }
    }
    out
}

fn resource_service_name(reqs: &[ExportTraceServiceRequest]) -> String {
    let rs = &reqs[0].resource_spans[0];
    let res = rs.resource.as_ref().expect("resource");
    res.attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match v.value.as_ref() {
            Some(Av::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .expect("service.name on the resource")
}

// ---------------------------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------------------------

/// Checks the exported span of an `ok_end()` call against DESIGN §5 and the emitted record.
fn assert_ok_span(reqs: &[ExportTraceServiceRequest], emitted: &Emitted) {
    assert_eq!(resource_service_name(reqs), SERVICE);
    let span = only_span(reqs);
    let r = &emitted.record;
    assert_eq!(span.name, "chat gpt-4.1");
    assert_eq!(span.kind, SpanKind::Client as i32, "span kind CLIENT");
    let status = span.status.clone().unwrap_or_default();
    assert_ne!(status.code, StatusCode::Error as i32, "ok call, ok status");

    // The record carries the span's identity.
    assert_eq!(
        Some(hex::encode(&span.trace_id)),
        r.trace_id,
        "record trace_id is the exported span's"
    );
    assert_eq!(
        Some(hex::encode(&span.span_id)),
        r.span_id,
        "record span_id is the exported span's"
    );
    assert!(
        span.parent_span_id.is_empty(),
        "no incoming context: root span"
    );

    let a = attrs(&span);
    // GenAI conventions.
    assert_eq!(string(&a, "gen_ai.operation.name"), "chat");
    assert_eq!(string(&a, "gen_ai.provider.name"), "openai");
    assert_eq!(string(&a, "gen_ai.request.model"), "gpt-4.1");
    assert_eq!(int(&a, "gen_ai.request.max_tokens"), 50);
    assert!((double(&a, "gen_ai.request.temperature") - 0.2).abs() < 1e-12);
    assert!(!boolean(&a, "gen_ai.request.stream"));
    assert_eq!(string(&a, "gen_ai.response.model"), "gpt-4.1-2025-04-14");
    assert_eq!(string(&a, "gen_ai.response.id"), "chatcmpl-otlp-1");
    assert_eq!(
        string_array(&a, "gen_ai.response.finish_reasons"),
        ["stop", "length"]
    );
    assert_eq!(int(&a, "gen_ai.usage.input_tokens"), 1200);
    assert_eq!(int(&a, "gen_ai.usage.output_tokens"), 300);
    assert_eq!(int(&a, "gen_ai.usage.cache_read.input_tokens"), 1000);
    assert_eq!(int(&a, "gen_ai.usage.reasoning.output_tokens"), 100);
    assert_eq!(int(&a, "http.response.status_code"), 200);
    assert_eq!(string(&a, "user.id"), "alice");
    assert_eq!(string(&a, "server.address"), "api.openai.com");
    assert_eq!(int(&a, "server.port"), 443);
    assert_eq!(string(&a, "client.address"), "203.0.113.7");
    assert!(!a.contains_key("error.type"), "no error.type on success");
    assert!(
        !a.contains_key("gen_ai.response.time_to_first_chunk"),
        "no TTFT on a non-streaming call"
    );

    // Ours.
    assert_eq!(string(&a, "llm_audit.request_id"), r.request_id);
    assert_eq!(string(&a, "llm_audit.request_hash"), r.request_hash);
    assert_eq!(r.request_hash.len(), 64);
    assert_eq!(boolean(&a, "llm_audit.duplicate"), emitted.duplicate);
    assert!(!emitted.duplicate);
    let cost = double(&a, "llm_audit.cost_usd");
    assert_eq!(
        cost.to_bits(),
        r.cost_usd.to_bits(),
        "cost_usd as in the row"
    );
    // gpt-4.1: 1200 in × 8 + 300 out × 32 USD per 1M tokens.
    assert!((cost - 0.0192).abs() < 1e-12, "cost {cost}");
    assert_eq!(string(&a, "llm_audit.cost_status"), "priced");
    assert_eq!(string(&a, "llm_audit.usage_source"), "reported");
    assert_eq!(string(&a, "llm_audit.key_id"), KEY_ID);
    assert!(!r.record_hash.is_empty(), "record was chained");
    assert_eq!(string(&a, "llm_audit.record_hash"), r.record_hash);

    // Deprecated names are not emitted.
    for old in [
        "gen_ai.system",
        "gen_ai.usage.prompt_tokens",
        "gen_ai.usage.completion_tokens",
    ] {
        assert!(!a.contains_key(old), "deprecated {old} emitted");
    }

    // Content stays off the span by default.
    for key in ["gen_ai.input.messages", "gen_ai.output.messages"] {
        assert!(!a.contains_key(key), "{key} emitted without opt-in");
    }
    for s in all_attribute_strings(reqs) {
        assert!(
            !s.contains(PROMPT_MARKER) && !s.contains(ANSWER_MARKER),
            "content leaked into an attribute value: {s}"
        );
    }
    assert!(!span.name.contains(PROMPT_MARKER));
    let bytes = reqs
        .iter()
        .flat_map(|r| r.encode_to_vec())
        .collect::<Vec<u8>>();
    for marker in [PROMPT_MARKER, ANSWER_MARKER] {
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "{marker} appears somewhere in the exported bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_span_follows_the_contract() {
    let (url, received) = grpc_receiver().await;
    let errors = export_errors();
    let p = provider(url, OtlpProtocol::Grpc, errors.clone());
    let h = common::harness();
    let emitted = drive(&h, &p, call_start(chat_request()), ok_end());
    let reqs = flush(p, &received).await;
    assert_ok_span(&reqs, &emitted);
    assert_eq!(errors.get(), 0, "no export errors against a live receiver");
}

/// `OTEL_EXPORTER_OTLP_HEADERS` and `_COMPRESSION=gzip` as a collector behind an API key
/// needs them: the key arrives on every export, the body compressed, the span intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_gzip_reach_the_collector() {
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        let (url, received, heard) = match protocol {
            OtlpProtocol::Grpc => grpc_receiver_hearing().await,
            OtlpProtocol::HttpProtobuf => http_receiver_hearing().await,
        };
        let errors = export_errors();
        let vars: HashMap<&str, String> = HashMap::from([
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                match protocol {
                    OtlpProtocol::Grpc => "grpc".into(),
                    OtlpProtocol::HttpProtobuf => "http/protobuf".into(),
                },
            ),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s%3Dcret".into()),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".into()),
            ("OTEL_SERVICE_NAME", SERVICE.into()),
        ]);
        let cfg = TelemetryConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
        let p = tracer_provider(&cfg, errors.clone()).unwrap().unwrap();
        let h = common::harness();
        let emitted = drive(&h, &p, call_start(chat_request()), ok_end());
        let reqs = flush(p, &received).await;
        assert_ok_span(&reqs, &emitted);
        assert_eq!(errors.get(), 0, "{protocol:?}");
        let heard = heard.lock().unwrap().clone();
        assert!(!heard.is_empty());
        for (key, encoding) in heard {
            assert_eq!(key.as_deref(), Some("s=cret"), "{protocol:?}");
            assert_eq!(encoding.as_deref(), Some("gzip"), "{protocol:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_span_follows_the_contract() {
    let (url, received) = http_receiver().await;
    let errors = export_errors();
    let p = provider(url, OtlpProtocol::HttpProtobuf, errors.clone());
    let h = common::harness();
    let emitted = drive(&h, &p, call_start(chat_request()), ok_end());
    let reqs = flush(p, &received).await;
    assert_ok_span(&reqs, &emitted);
    assert_eq!(errors.get(), 0, "no export errors against a live receiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_on_the_span_only_when_opted_in() {
    let (url, received) = grpc_receiver().await;
    let p = provider(url, OtlpProtocol::Grpc, export_errors());
    let h = common::harness_with(|c| c.capture.span_content = true);
    let emitted = drive(&h, &p, call_start(chat_request()), ok_end());
    let reqs = flush(p, &received).await;
    let span = only_span(&reqs);
    let a = attrs(&span);
    let input = string(&a, "gen_ai.input.messages");
    let output = string(&a, "gen_ai.output.messages");
    assert!(input.contains(PROMPT_MARKER), "input.messages: {input}");
    assert!(output.contains(ANSWER_MARKER), "output.messages: {output}");
    // Opt-in content changes nothing else.
    assert_eq!(
        string(&a, "llm_audit.record_hash"),
        emitted.record.record_hash
    );
    assert_eq!(int(&a, "gen_ai.usage.input_tokens"), 1200);
}

/// DESIGN §8: secrets never appear in spans, even with content capture on. A key pasted into a
/// prompt, echoed in the answer, or quoted in an upstream error must arrive redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_span_even_with_content() {
    const KEY: &str = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX";
    let (url, received) = grpc_receiver().await;
    let p = provider(url, OtlpProtocol::Grpc, export_errors());
    let h = common::harness_with(|c| c.capture.span_content = true);
    let body = json!({
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": format!("Why is {KEY} rejected?")}],
        "user": "alice"
    });
    let answer = json!({
        "id": "chatcmpl-secret",
        "model": "gpt-4.1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("The key {KEY} is revoked.")}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
    });
    let ok = drive(
        &h,
        &p,
        call_start(body.clone()),
        CallEnd::ok(
            200,
            parse_json_response(answer.to_string().as_bytes()).unwrap(),
        ),
    );
    let failed = drive(
        &h,
        &p,
        call_start(json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})),
        CallEnd::error(
            401,
            "upstream_4xx",
            format!("Incorrect API key provided: {KEY}"),
        ),
    );
    let reqs = flush(p, &received).await;
    let all = spans(&reqs);
    assert_eq!(all.len(), 2);
    let by_id = |id: &str| {
        all.iter()
            .find(|s| {
                attrs(s)
                    .get("llm_audit.request_id")
                    .is_some_and(|v| matches!(v, Av::StringValue(x) if x == id))
            })
            .cloned()
            .unwrap()
    };
    let ok_span = by_id(&ok.record.request_id);
    let a = attrs(&ok_span);
    let output = string(&a, "gen_ai.output.messages");
    assert!(
        !output.contains(KEY) && output.contains("[REDACTED]"),
        "output: {output}"
    );
    let input = string(&a, "gen_ai.input.messages");
    assert!(
        !input.contains(KEY) && input.contains("[REDACTED]"),
        "gen_ai.input.messages carries the API key unredacted: {input}"
    );
    let err_span = by_id(&failed.record.request_id);
    let message = err_span.status.clone().unwrap_or_default().message;
    assert!(!message.contains(KEY), "status message: {message}");
    assert!(
        !failed
            .record
            .error_message
            .as_deref()
            .unwrap_or_default()
            .contains(KEY)
    );
    let bytes: Vec<u8> = reqs.iter().flat_map(|r| r.encode_to_vec()).collect();
    assert!(
        !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
        "the key appears somewhere in the exported bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_call_has_error_status_and_type() {
    let (url, received) = grpc_receiver().await;
    let p = provider(url, OtlpProtocol::Grpc, export_errors());
    let h = common::harness();
    let emitted = drive(
        &h,
        &p,
        call_start(chat_request()),
        CallEnd::error(502, "transport", "boom"),
    );
    let reqs = flush(p, &received).await;
    let span = only_span(&reqs);
    assert_eq!(span.name, "chat gpt-4.1");
    let status = span.status.clone().expect("status set");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert_eq!(status.message, "boom");
    let a = attrs(&span);
    assert_eq!(string(&a, "error.type"), "transport");
    assert_eq!(int(&a, "http.response.status_code"), 502);
    assert_eq!(string(&a, "llm_audit.usage_source"), "missing");
    assert_eq!(
        string(&a, "llm_audit.request_id"),
        emitted.record.request_id
    );
    assert_eq!(
        string(&a, "llm_audit.record_hash"),
        emitted.record.record_hash
    );
    // No answer, no usage: the token attributes are absent rather than zero.
    assert!(!a.contains_key("gen_ai.usage.input_tokens"));
    assert!(!a.contains_key("gen_ai.usage.output_tokens"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_call_reports_time_to_first_chunk() {
    let (url, received) = http_receiver().await;
    let p = provider(url, OtlpProtocol::HttpProtobuf, export_errors());
    let h = common::harness();
    let mut body = chat_request();
    body["stream"] = json!(true);
    let emitted = {
        let subscriber = tracing_subscriber::registry().with(otel_layer(&p));
        let _guard = tracing::subscriber::set_default(subscriber);
        let mut inflight = h.recorder.begin(call_start(body));
        std::thread::sleep(Duration::from_millis(5));
        inflight.mark_first_chunk();
        inflight.finish(ok_end())
    };
    let reqs = flush(p, &received).await;
    let a_span = only_span(&reqs);
    let a = attrs(&a_span);
    assert!(boolean(&a, "gen_ai.request.stream"));
    let ttft = double(&a, "gen_ai.response.time_to_first_chunk");
    let ttft_ms = emitted.record.ttft_ms.expect("ttft on the record");
    assert!(ttft >= 0.005, "ttft in seconds: {ttft}");
    assert!(
        (ttft * 1000.0 - ttft_ms).abs() < 1e-6,
        "span {ttft} s vs row {ttft_ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_traceparent_is_continued() {
    let (url, received) = grpc_receiver().await;
    let p = provider(url, OtlpProtocol::Grpc, export_errors());
    let h = common::harness();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let headers: HashMap<String, String> = [(
        "traceparent".to_owned(),
        format!("00-{trace_id}-{parent_id}-01"),
    )]
    .into();
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&headers);
    let mut call = call_start(chat_request());
    call.parent = Some(parent);
    let emitted = drive(&h, &p, call, ok_end());
    let reqs = flush(p, &received).await;
    let span = only_span(&reqs);
    assert_eq!(hex::encode(&span.trace_id), trace_id);
    assert_eq!(hex::encode(&span.parent_span_id), parent_id);
    assert_eq!(emitted.record.trace_id.as_deref(), Some(trace_id));
    assert_eq!(
        emitted.record.span_id,
        Some(hex::encode(&span.span_id)),
        "the record names the call's own span, not the parent"
    );
}

/// A loopback URL where nothing listens: bind a port, then release it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

async fn export_to_nowhere(endpoint: String, protocol: OtlpProtocol) -> u64 {
    let errors = export_errors();
    let p = tracer_provider(
        &TelemetryConfig {
            endpoint: Some(endpoint),
            protocol,
            service_name: SERVICE.into(),
            timeout: Duration::from_millis(300),
            ..TelemetryConfig::disabled()
        },
        errors.clone(),
    )
    .unwrap()
    .unwrap();
    let h = common::harness();
    let emitted = drive(&h, &p, call_start(chat_request()), ok_end());
    assert!(emitted.record.trace_id.is_some());
    let started = Instant::now();
    TelemetryGuard::new(Some(p)).shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "shutdown against a dead collector took {:?}",
        started.elapsed()
    );
    errors.get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_failures_are_counted() {
    let n = export_to_nowhere(
        format!("http://127.0.0.1:{}", closed_port()),
        OtlpProtocol::Grpc,
    )
    .await;
    assert!(n > 0, "llm_audit_span_export_errors_total stayed at 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_export_failures_are_counted() {
    let n = export_to_nowhere(
        format!("http://127.0.0.1:{}/v1/traces", closed_port()),
        OtlpProtocol::HttpProtobuf,
    )
    .await;
    assert!(n > 0, "llm_audit_span_export_errors_total stayed at 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hold_at_most_the_batch_size_and_every_span_arrives() {
    use llm_audit::telemetry::export::{BatchLimits, EncodingProcessor, WireExporter};
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    let (endpoint, received) = grpc_receiver().await;
    let cfg = TelemetryConfig {
        endpoint: Some(endpoint.clone()),
        protocol: OtlpProtocol::Grpc,
        service_name: SERVICE.into(),
        timeout: Duration::from_secs(3),
        ..TelemetryConfig::disabled()
    };
    let errors = export_errors();
    let limits = BatchLimits {
        max_queue: 1_000,
        max_batch: 4,
        // Only full batches and the final flush send anything.
        delay: Duration::from_secs(60),
    };
    let processor = EncodingProcessor::new(
        WireExporter::new(&cfg, &endpoint).unwrap(),
        limits,
        errors.clone(),
    )
    .unwrap();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .build();
    let tracer = provider.tracer("batch-test");
    for i in 0..10 {
        tracer.start(format!("span {i}")).end();
    }
    let reqs = flush(provider, &received).await;
    let sizes: Vec<usize> = reqs
        .iter()
        .map(|r| spans(std::slice::from_ref(r)).len())
        .collect();
    assert!(
        sizes.iter().all(|&n| (1..=4).contains(&n)),
        "request sizes {sizes:?}"
    );
    let mut names: Vec<String> = spans(&reqs).into_iter().map(|s| s.name).collect();
    names.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("span {i}")).collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(errors.get(), 0);
}

#[test]
fn no_endpoint_means_no_provider() {
    let cfg = TelemetryConfig {
        endpoint: None,
        protocol: OtlpProtocol::Grpc,
        service_name: SERVICE.into(),
        timeout: Duration::from_secs(1),
        ..TelemetryConfig::disabled()
    };
    // No runtime needed and nothing to complain about.
    assert!(tracer_provider(&cfg, export_errors()).unwrap().is_none());
    let disabled = TelemetryConfig::disabled();
    assert!(
        tracer_provider(&disabled, export_errors())
            .unwrap()
            .is_none()
    );
}
