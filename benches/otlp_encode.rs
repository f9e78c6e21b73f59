//! OTLP trace export encoding: opentelemetry-proto's conversion plus prost against the direct
//! encoder in `telemetry::otlp_wire`.
//!
//! `cargo bench --bench otlp_encode`. One batch is 512 gen_ai client spans of 26 attributes,
//! one full export batch. Divide the time per iteration by 512 for the cost
//! per span. Both main paths consume the batch, as an exporter does, so both pay for dropping
//! the `SpanData`; the third measures encoding alone into a reused buffer.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prost::Message as _;

use llm_audit::telemetry::otlp_wire::encode_export_request;

// The allocator the `llm-audit` binary ships with, so the numbers are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 512;

fn at(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// Shaped like the proxy's CLIENT span as tracing-opentelemetry exports it: strings are owned
/// (`String` fields recorded at runtime), not `&'static`.
fn gen_ai_span(i: u64, scope: &InstrumentationScope) -> SpanData {
    let owned = |s: &str| Value::String(StringValue::from(s.to_owned()));
    let attributes = vec![
        KeyValue::new("gen_ai.operation.name", owned("chat")),
        KeyValue::new("gen_ai.provider.name", owned("openai")),
        KeyValue::new("gen_ai.request.model", owned("gpt-4.1")),
        KeyValue::new("gen_ai.response.model", owned("gpt-4.1-2025-04-14")),
        KeyValue::new(
            "gen_ai.response.id",
            owned(&format!("chatcmpl-B9MBs8CjcvOU2jLn4n570S{i:06}")),
        ),
        KeyValue::new("gen_ai.request.max_tokens", 500_i64),
        KeyValue::new("gen_ai.request.temperature", 0.7_f64),
        KeyValue::new("gen_ai.usage.input_tokens", 61 + i as i64),
        KeyValue::new("gen_ai.usage.output_tokens", 43_i64),
        KeyValue::new("gen_ai.usage.cache_read.input_tokens", 0_i64),
        KeyValue::new("gen_ai.usage.reasoning.output_tokens", 0_i64),
        KeyValue::new(
            "gen_ai.response.finish_reasons",
            Value::Array(Array::String(vec![StringValue::from("stop".to_owned())])),
        ),
        KeyValue::new("gen_ai.response.time_to_first_chunk", 0.412_f64),
        KeyValue::new("llm_audit.cost_usd", 0.000_466_f64),
        KeyValue::new("llm_audit.cost_status", owned("priced")),
        KeyValue::new("llm_audit.outcome", owned("ok")),
        KeyValue::new("llm_audit.attempts", 1_i64),
        KeyValue::new("llm_audit.key_id", owned("team-finance")),
        KeyValue::new(
            "llm_audit.record_hash",
            owned("9f2c4e1a7b3d5f6081a2c3d4e5f60718293a4b5c6d7e8f901a2b3c4d5e6f7081"),
        ),
        KeyValue::new("user.id", owned("user_12345")),
        KeyValue::new("server.address", owned("api.openai.com")),
        KeyValue::new("server.port", 443_i64),
        KeyValue::new("client.address", owned("10.0.3.17")),
        KeyValue::new("http.response.status_code", 200_i64),
        KeyValue::new("code.file.path", owned("src/audit/recorder.rs")),
        KeyValue::new("thread.id", 7_i64),
    ];
    let start = 1_760_000_000_000_000_000 + i * 1_000_000;
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736 ^ u128::from(i)),
            SpanId::from(0x00f0_67aa_0ba9_02b7 ^ i),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: SpanId::from(0x0a1b_2c3d_4e5f_6071 ^ i),
        parent_span_is_remote: false,
        span_kind: SpanKind::Client,
        name: format!("chat gpt-4.1 #{}", i % 4).into(),
        start_time: at(start),
        end_time: at(start + 1_234_567_890),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

fn resource() -> Resource {
    Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", "llm-audit"),
            KeyValue::new("service.version", "0.1.0"),
            KeyValue::new(
                "service.instance.id",
                "0198f3c2-7d41-7a55-9c1e-5b1f0e2d3c4b",
            ),
            KeyValue::new("deployment.environment.name", "production"),
            KeyValue::new("host.name", "audit-proxy-7c9f8"),
            KeyValue::new("telemetry.sdk.name", "opentelemetry"),
            KeyValue::new("telemetry.sdk.language", "rust"),
            KeyValue::new("telemetry.sdk.version", "0.33.1"),
        ])
        .build()
}

fn bench(c: &mut Criterion) {
    let scope = InstrumentationScope::builder("tracing-opentelemetry")
        .with_version("0.34.0")
        .build();
    let spans: Vec<SpanData> = (0..BATCH as u64).map(|i| gen_ai_span(i, &scope)).collect();
    let resource = resource();
    // Built once per exporter (`set_resource`), not per export.
    let resource_attributes = ResourceAttributesWithSchema::from(&resource);

    let crate_path = |spans: Vec<SpanData>| {
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &resource_attributes),
        };
        request.encode_to_vec()
    };
    let direct_path = |spans: Vec<SpanData>| {
        let mut out = Vec::new();
        encode_export_request(&spans, &resource, &mut out);
        drop(spans);
        out
    };
    // Same bytes, or the comparison means nothing.
    assert_eq!(crate_path(spans.clone()), direct_path(spans.clone()));

    let mut group = c.benchmark_group("otlp_encode_512_spans");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("opentelemetry_proto_then_prost", |b| {
        b.iter_batched(|| spans.clone(), crate_path, BatchSize::LargeInput);
    });
    group.bench_function("otlp_wire", |b| {
        b.iter_batched(|| spans.clone(), direct_path, BatchSize::LargeInput);
    });
    let mut out = Vec::new();
    group.bench_function("otlp_wire_encode_only_reused_buffer", |b| {
        b.iter(|| {
            out.clear();
            encode_export_request(black_box(&spans), &resource, &mut out);
            black_box(out.len())
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
