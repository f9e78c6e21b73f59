//! Recorder cost per call and store writer throughput.
//!
//! `cargo bench --bench recorder`. Per call: parse + hash a typical request, parse a typical
//! answer's usage, price it, update metrics, fill span fields, chain and hand off the row.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tracing_subscriber::layer::SubscriberExt as _;

use llm_audit::Recorder;

// The allocator the `llm-audit` binary ships with, so the numbers are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use llm_audit::audit::usage::{ResponseSummary, Usage, parse_json_response};
use llm_audit::audit::{CallEnd, CallStart, Operation, ParsedRequest, PriceTable};
use llm_audit::config::AuditConfig;
use llm_audit::store::Store;
use llm_audit::telemetry::Metrics;

const REQUEST: &str = r#"{"model":"gpt-4.1","messages":[{"role":"system","content":"You are a careful financial consultant. Answer briefly and cite the relevant regulation when you can."},{"role":"user","content":"What should a small company consider before investing its cash reserve in short-term government bonds this year? Please list the main risks."}],"max_tokens":500,"temperature":0.7,"user":"user_12345"}"#;

const RESPONSE: &str = r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion","created":1741569952,"model":"gpt-4.1-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"Consider liquidity needs, interest-rate risk, reinvestment risk and counterparty exposure. Match maturities to when the cash is needed, keep an emergency buffer outside the bonds, and check the tax treatment.","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":61,"completion_tokens":43,"total_tokens":104,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_3f1a4b2c1d"}"#;

fn setup(dir: &tempfile::TempDir, queue: usize) -> (Recorder, Store) {
    let mut cfg = AuditConfig::default();
    cfg.store.path = dir.path().join("bench.db");
    cfg.store.queue_capacity = queue;
    let metrics = Arc::new(Metrics::new(1000, 200, 100_000).unwrap());
    let store = Store::open(&cfg.store, metrics.clone()).unwrap();
    let recorder = Recorder::new(
        metrics,
        store.clone(),
        PriceTable::default(),
        cfg.capture.clone(),
        &cfg.thresholds,
        None,
    );
    (recorder, store)
}

/// What the issue budgets: hash the request, then begin/finish (pricing, metrics, span
/// fields, chain link, hand-off). The answer's summary is cloned in, not parsed.
fn recorder_only(recorder: &Recorder, provider: &Arc<str>, summary: &ResponseSummary) {
    let req = ParsedRequest::from_slice(Operation::Chat, REQUEST.as_bytes(), None).unwrap();
    let flight = recorder.begin(CallStart::from_request(req, provider.clone()));
    black_box(flight.finish(CallEnd::ok(200, summary.clone())));
}

/// Everything a front door adds per call: the above plus parsing the answer's usage.
fn one_call(recorder: &Recorder, provider: &Arc<str>) {
    let req = ParsedRequest::from_slice(Operation::Chat, REQUEST.as_bytes(), None).unwrap();
    let flight = recorder.begin(CallStart::from_request(req, provider.clone()));
    let summary = parse_json_response(RESPONSE.as_bytes()).unwrap();
    black_box(flight.finish(CallEnd::ok(200, summary)));
}

fn components(c: &mut Criterion) {
    c.bench_function("request_parse_and_hash", |b| {
        b.iter(|| {
            ParsedRequest::from_slice(Operation::Chat, black_box(REQUEST.as_bytes()), None).unwrap()
        })
    });
    c.bench_function("response_usage_parse", |b| {
        b.iter(|| parse_json_response(black_box(RESPONSE.as_bytes())).unwrap())
    });
    let table = PriceTable::default();
    let usage = Usage {
        input: 61,
        output: 43,
        total: 104,
        cached: 0,
        reasoning: 0,
    };
    c.bench_function("pricing", |b| {
        b.iter(|| table.cost(black_box("gpt-4.1"), None, &usage))
    });
}

fn recorder_per_call(c: &mut Criterion) {
    let provider: Arc<str> = Arc::from("openai");
    // Queue far larger than what one measurement sends, so no record is dropped.
    let dir = tempfile::tempdir().unwrap();
    let (recorder, store) = setup(&dir, 1 << 22);
    let summary = parse_json_response(RESPONSE.as_bytes()).unwrap();
    c.bench_function("recorder_call", |b| {
        b.iter(|| recorder_only(&recorder, &provider, &summary))
    });
    c.bench_function("recorder_call_with_response_parse", |b| {
        b.iter(|| one_call(&recorder, &provider))
    });

    // With the OpenTelemetry layer building real spans (no exporter attached).
    let provider_sdk = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(llm_audit::telemetry::otel_layer(&provider_sdk));
    tracing::subscriber::with_default(subscriber, || {
        c.bench_function("recorder_call_with_otel_layer", |b| {
            b.iter(|| recorder_only(&recorder, &provider, &summary))
        });
    });
    store.shutdown();
}

fn writer_throughput(c: &mut Criterion) {
    let provider: Arc<str> = Arc::from("openai");
    let mut group = c.benchmark_group("store_writer");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("20k_records_enqueue_to_commit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let (recorder, store) = setup(&dir, 65_536);
                let start = Instant::now();
                for _ in 0..20_000 {
                    one_call(&recorder, &provider);
                }
                store.shutdown();
                total += start.elapsed();
                assert_eq!(recorder.metrics().records_written.get(), 20_000);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, components, recorder_per_call, writer_throughput);
criterion_main!(benches);
