use std::time::Duration;

use opentelemetry::StringValue;
use opentelemetry::trace::{SpanContext, TraceFlags, TraceId};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message as _;

use super::*;

/// What opentelemetry-otlp builds for the same batch today.
fn reference(spans: &[SpanData], resource: &Resource) -> ExportTraceServiceRequest {
    let resource = ResourceAttributesWithSchema::from(resource);
    ExportTraceServiceRequest {
        resource_spans: group_spans_by_resource_and_scope(spans.to_vec(), &resource),
    }
}

fn encode(spans: &[SpanData], resource: &Resource) -> Vec<u8> {
    let mut out = Vec::new();
    encode_export_request(spans, resource, &mut out);
    // Spans encoded apart and added (as the span processor does) make the same request as
    // spans encoded in place.
    let mut incremental = EncodedSpans::default();
    for (i, span) in spans.iter().enumerate() {
        // Both ways in: encoded in place, and encoded apart then added.
        if i % 2 == 0 {
            incremental.push(span);
        } else {
            let mut apart = Vec::new();
            EncodedSpans::encode_span(span, &mut apart);
            incremental.push_encoded(&span.instrumentation_scope, &apart);
        }
    }
    assert_eq!(incremental.len(), spans.len());
    let mut wrapped = Vec::new();
    incremental.encode_request(resource, &mut wrapped);
    assert_eq!(
        wrapped, out,
        "EncodedSpans differs from the one-pass encoder"
    );
    out
}

fn assert_matches_reference(spans: &[SpanData], resource: &Resource) {
    let expected = reference(spans, resource);
    let bytes = encode(spans, resource);
    let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("bytes decode");
    assert_eq!(decoded, expected);
    // prost skips unknown fields without a trace; re-encoding to the same length shows
    // that every byte we sent belongs to a field the schema knows.
    assert_eq!(
        decoded.encoded_len(),
        bytes.len(),
        "unknown or repeated fields"
    );
    // Same field order and minimal varints as prost: collectors get identical requests.
    assert_eq!(bytes, expected.encode_to_vec());
}

fn at(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

fn span(id: u64, scope: &InstrumentationScope) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10 ^ u128::from(id)),
            SpanId::from(id),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Client,
        name: "chat gpt-4.1".into(),
        start_time: at(1_700_000_000_000_000_000 + id % 1_000),
        end_time: at(1_700_000_000_500_000_000 + id % 1_000),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

fn strings(values: &[&'static str]) -> Vec<StringValue> {
    values.iter().map(|&s| StringValue::from(s)).collect()
}

/// One attribute per `Value` variant and edge value.
fn every_value() -> Vec<KeyValue> {
    vec![
        KeyValue::new("bool.true", true),
        KeyValue::new("bool.false", false),
        KeyValue::new("int.zero", 0_i64),
        KeyValue::new("int.negative", -1_i64),
        KeyValue::new("int.min", i64::MIN),
        KeyValue::new("int.max", i64::MAX),
        KeyValue::new("int.two_bytes", 300_i64),
        KeyValue::new("double.zero", 0.0_f64),
        KeyValue::new("double.negative_zero", -0.0_f64),
        KeyValue::new("double.max", f64::MAX),
        KeyValue::new("double.infinity", f64::NEG_INFINITY),
        KeyValue::new("double.tiny", 4.9e-324_f64),
        KeyValue::new("string.empty", ""),
        KeyValue::new("string.non_ascii", "héllo ✓ 日本語 🦀"),
        KeyValue::new("", "empty key"),
        KeyValue::new("array.bool", Value::Array(Array::Bool(vec![true, false]))),
        KeyValue::new(
            "array.int",
            Value::Array(Array::I64(vec![0, -1, i64::MAX, 127, 128])),
        ),
        KeyValue::new(
            "array.double",
            Value::Array(Array::F64(vec![1.5, -0.0, f64::INFINITY])),
        ),
        KeyValue::new(
            "array.string",
            Value::Array(Array::String(strings(&["stop", "", "ü"]))),
        ),
        KeyValue::new("array.empty", Value::Array(Array::String(Vec::new()))),
        KeyValue::new("array.empty_int", Value::Array(Array::I64(Vec::new()))),
    ]
}

fn scope(name: &'static str) -> InstrumentationScope {
    InstrumentationScope::builder(name).build()
}

fn full_scope(attributes: Vec<KeyValue>) -> InstrumentationScope {
    InstrumentationScope::builder("llm-audit")
        .with_version("0.1.0")
        .with_schema_url("https://opentelemetry.io/schemas/1.37.0")
        .with_attributes(attributes)
        .build()
}

fn resource() -> Resource {
    Resource::builder_empty()
        .with_schema_url(
            [
                KeyValue::new("service.name", "llm-audit"),
                KeyValue::new("service.instance.id", "ünïcode-01"),
                KeyValue::new("process.pid", 4242_i64),
                KeyValue::new(
                    "host.arch",
                    Value::Array(Array::String(strings(&["x86_64"]))),
                ),
            ],
            "https://opentelemetry.io/schemas/1.37.0",
        )
        .build()
}

/// Everything a span can carry, on the first span of the batch.
fn loaded_span(scope: &InstrumentationScope) -> SpanData {
    let mut loaded = span(1, scope);
    loaded.span_context = SpanContext::new(
        TraceId::from(u128::MAX),
        SpanId::from(u64::MAX),
        TraceFlags::SAMPLED,
        true,
        "vendor=a,other=b".parse().expect("trace state"),
    );
    loaded.parent_span_id = SpanId::from(0x8877_6655_4433_2211);
    loaded.parent_span_is_remote = true;
    loaded.span_kind = SpanKind::Server;
    loaded.name = "POST /v1/chat/completions — ünïcode".into();
    loaded.attributes = every_value();
    loaded.dropped_attributes_count = u32::MAX;
    loaded.events.events = vec![
        Event::new("gen_ai.choice", at(1_500), every_value(), 3),
        Event::new("", UNIX_EPOCH, Vec::new(), 0),
    ];
    loaded.events.dropped_count = 7;
    loaded.links.links = vec![
        Link::new(
            SpanContext::new(
                TraceId::from(0x2233_4455_6677_8899_aabb_ccdd_eeff_0011),
                SpanId::from(0x2030_4050_6070_8090),
                TraceFlags::SAMPLED,
                true,
                "vendor=link".parse().expect("trace state"),
            ),
            vec![
                KeyValue::new("link.attr", "linked"),
                KeyValue::new("n", -5_i64),
            ],
            5,
        ),
        Link::new(SpanContext::empty_context(), Vec::new(), 0),
    ];
    loaded.links.dropped_count = 1;
    loaded.status = Status::error("upstream said “no”: 500");
    loaded
}

#[test]
fn every_field_and_value_matches_opentelemetry_proto() {
    let a = full_scope(vec![KeyValue::new("a", 1_i64), KeyValue::new("b", "two")]);
    let a_reordered = full_scope(vec![KeyValue::new("b", "two"), KeyValue::new("a", 1_i64)]);
    let other_schema = InstrumentationScope::builder("llm-audit")
        .with_version("0.1.0")
        .with_schema_url("https://example.com/other")
        .with_attributes([KeyValue::new("a", 1_i64), KeyValue::new("b", "two")])
        .build();
    let bare = scope("tracing-opentelemetry");

    let mut spans = vec![loaded_span(&a)];
    let mut ok = span(2, &bare);
    ok.status = Status::Ok;
    ok.name = "".into();
    ok.span_kind = SpanKind::Producer;
    ok.start_time = UNIX_EPOCH - Duration::from_secs(1);
    ok.end_time = UNIX_EPOCH;
    spans.push(ok);
    let mut same_scope_again = span(3, &a_reordered);
    same_scope_again.span_kind = SpanKind::Consumer;
    same_scope_again.parent_span_id = SpanId::from(1);
    spans.push(same_scope_again);
    let mut empty_error = span(4, &other_schema);
    empty_error.status = Status::error("");
    empty_error.span_kind = SpanKind::Internal;
    empty_error.span_context = SpanContext::new(
        TraceId::INVALID,
        SpanId::INVALID,
        TraceFlags::NOT_SAMPLED,
        false,
        TraceState::default(),
    );
    spans.push(empty_error);
    spans.push(span(5, &bare));
    spans.push(span(6, &a));

    let resource = resource();
    assert_matches_reference(&spans, &resource);
    let grouped = reference(&spans, &resource);
    assert_eq!(
        grouped.resource_spans[0].scope_spans.len(),
        3,
        "scope grouping"
    );
}

#[test]
fn empty_batch_still_carries_the_resource() {
    assert_matches_reference(&[], &resource());
    assert_matches_reference(&[], &Resource::builder_empty().build());
    assert_matches_reference(&[span(1, &scope("x"))], &Resource::builder_empty().build());
    assert_matches_reference(&[span(1, &scope("x"))], &Resource::builder().build());
}

#[test]
fn lengths_past_one_and_two_varint_bytes() {
    let long = "ß".repeat(10_000);
    let key = "k".repeat(200);
    let mut big = span(1, &scope(""));
    big.name = long.clone().into();
    big.attributes = vec![
        KeyValue::new(key, long.clone()),
        KeyValue::new(
            "many",
            Value::Array(Array::String(vec![StringValue::from(long); 3])),
        ),
        KeyValue::new("ints", Value::Array(Array::I64((-200..200).collect()))),
    ];
    assert_matches_reference(&[big, span(2, &scope(""))], &resource());
}

#[test]
fn appends_after_existing_bytes() {
    // One resource value: its attributes live in a HashMap, whose order differs per map.
    let resource = resource();
    let spans = [loaded_span(&scope("x")), span(2, &scope("y"))];
    let mut out = b"prefix".to_vec();
    encode_export_request(&spans, &resource, &mut out);
    assert_eq!(&out[..6], b"prefix");
    assert_eq!(out[6..], encode(&spans, &resource));
}

#[test]
fn nan_goes_out_bit_for_bit() {
    // NaN never equals itself, so only the bytes can be compared.
    let mut with_nan = span(1, &scope("x"));
    with_nan.attributes = vec![
        KeyValue::new("nan", f64::NAN),
        KeyValue::new("nans", Value::Array(Array::F64(vec![f64::NAN, -f64::NAN]))),
    ];
    let spans = [with_nan];
    let resource = resource();
    assert_eq!(
        encode(&spans, &resource),
        reference(&spans, &resource).encode_to_vec()
    );
}

fn value() -> impl Strategy<Value = Value> {
    let double = any::<f64>().prop_filter("NaN never equals itself", |v| !v.is_nan());
    let text = || any::<String>().prop_map(StringValue::from);
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::I64),
        double.clone().prop_map(Value::F64),
        text().prop_map(Value::String),
        vec(any::<bool>(), 0..4).prop_map(|v| Value::Array(Array::Bool(v))),
        vec(any::<i64>(), 0..4).prop_map(|v| Value::Array(Array::I64(v))),
        vec(double, 0..4).prop_map(|v| Value::Array(Array::F64(v))),
        vec(text(), 0..4).prop_map(|v| Value::Array(Array::String(v))),
    ]
}

fn attributes(max: usize) -> impl Strategy<Value = Vec<KeyValue>> {
    let key = prop_oneof!["[a-z_.]{0,24}", any::<String>()];
    vec(
        (key, value()).prop_map(|(k, v)| KeyValue::new(k, v)),
        0..max,
    )
}

/// A few scopes, two of them equal up to attribute order.
fn scopes() -> Vec<InstrumentationScope> {
    vec![
        scope("tracing-opentelemetry"),
        full_scope(vec![KeyValue::new("a", 1_i64), KeyValue::new("b", true)]),
        full_scope(vec![KeyValue::new("b", true), KeyValue::new("a", 1_i64)]),
        InstrumentationScope::builder("other")
            .with_version("2")
            .build(),
    ]
}

fn arbitrary_span() -> impl Strategy<Value = SpanData> {
    let events = vec(
        ("[a-z ]{0,8}", any::<u64>(), attributes(4), any::<u32>()),
        0..3,
    );
    let links = vec(
        (any::<u128>(), any::<u64>(), any::<bool>(), attributes(3)),
        0..2,
    );
    let status = prop_oneof![
        Just(Status::Unset),
        Just(Status::Ok),
        any::<String>().prop_map(Status::error),
    ];
    (
        (any::<u64>(), 0..4_usize, any::<String>(), attributes(12)),
        (
            events,
            links,
            status,
            any::<bool>(),
            any::<(u32, u32, u32)>(),
        ),
    )
        .prop_map(|((id, scope_index, name, attributes), rest)| {
            let (events, links, status, remote, dropped) = rest;
            let mut s = span(id, &scopes()[scope_index]);
            s.name = name.into();
            s.attributes = attributes;
            s.parent_span_id = SpanId::from(id / 2);
            s.parent_span_is_remote = remote;
            s.status = status;
            s.dropped_attributes_count = dropped.0;
            s.events.events = events
                .into_iter()
                .map(|(name, t, attributes, d)| Event::new(name, at(t), attributes, d))
                .collect();
            s.events.dropped_count = dropped.1;
            s.links.links = links
                .into_iter()
                .map(|(trace, span, remote, attributes)| {
                    let flags = TraceFlags::new(trace as u8);
                    let ctx = SpanContext::new(
                        TraceId::from(trace),
                        SpanId::from(span),
                        flags,
                        remote,
                        TraceState::NONE,
                    );
                    Link::new(ctx, attributes, 0)
                })
                .collect();
            s.links.dropped_count = dropped.2;
            s
        })
}

proptest! {
    #[test]
    fn random_batches_match_opentelemetry_proto(
        spans in vec(arbitrary_span(), 0..6),
        resource_attributes in attributes(6),
        schema_url in proptest::option::of("[a-z:/.]{0,20}"),
    ) {
        let resource = match schema_url {
            Some(url) => Resource::builder_empty().with_schema_url(resource_attributes, url),
            None => Resource::builder_empty().with_attributes(resource_attributes),
        }
        .build();
        assert_matches_reference(&spans, &resource);
    }
}
