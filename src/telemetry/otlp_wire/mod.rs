//! Direct OTLP/protobuf encoding of finished spans: `SpanData` straight to the wire bytes of an
//! `ExportTraceServiceRequest`, byte for byte what opentelemetry-proto's
//! `group_spans_by_resource_and_scope` followed by prost's `encode_to_vec` would send.
//!
//! Why not those two: the conversion copies every string into owned proto structs only to drop
//! them after encoding, and prost recomputes `encoded_len` of each nested message once per
//! enclosing level (request → resource → scope → span → attribute → value), so the leaves of a
//! span are measured five or six times. Here each span is measured once (leaf lengths are
//! arithmetic on string lengths) and written, re-measuring only the small messages inside it;
//! the request around the spans is measured and written last ([`EncodedSpans`]).
//!
//! Like prost, fields go out in field-number order and proto3 scalars holding their default
//! value are left out; messages that the conversion wraps in `Some` (resource, scope, status,
//! attribute values) are always written, even when empty.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Event, Link, SpanId, SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;

/// Appends the protobuf encoding of an OTLP `ExportTraceServiceRequest` holding `spans` under
/// `resource` to `out`.
///
/// Spans are grouped by instrumentation scope in order of first appearance, as
/// opentelemetry-proto 0.33 does; the request always holds exactly one `ResourceSpans`.
pub fn encode_export_request(spans: &[SpanData], resource: &Resource, out: &mut Vec<u8>) {
    let mut encoded = EncodedSpans::default();
    for span in spans {
        encoded.push(span);
    }
    encoded.encode_request(resource, out);
}

/// Field numbers from opentelemetry-proto's `.proto` files, one module per message.
mod field {
    pub mod request {
        pub const RESOURCE_SPANS: u32 = 1;
    }
    pub mod resource_spans {
        pub const RESOURCE: u32 = 1;
        pub const SCOPE_SPANS: u32 = 2;
        pub const SCHEMA_URL: u32 = 3;
    }
    pub mod resource {
        pub const ATTRIBUTES: u32 = 1;
    }
    pub mod scope_spans {
        pub const SCOPE: u32 = 1;
        pub const SPANS: u32 = 2;
        pub const SCHEMA_URL: u32 = 3;
    }
    pub mod scope {
        pub const NAME: u32 = 1;
        pub const VERSION: u32 = 2;
        pub const ATTRIBUTES: u32 = 3;
    }
    pub mod span {
        pub const TRACE_ID: u32 = 1;
        pub const SPAN_ID: u32 = 2;
        pub const TRACE_STATE: u32 = 3;
        pub const PARENT_SPAN_ID: u32 = 4;
        pub const NAME: u32 = 5;
        pub const KIND: u32 = 6;
        pub const START_TIME: u32 = 7;
        pub const END_TIME: u32 = 8;
        pub const ATTRIBUTES: u32 = 9;
        pub const DROPPED_ATTRIBUTES_COUNT: u32 = 10;
        pub const EVENTS: u32 = 11;
        pub const DROPPED_EVENTS_COUNT: u32 = 12;
        pub const LINKS: u32 = 13;
        pub const DROPPED_LINKS_COUNT: u32 = 14;
        pub const STATUS: u32 = 15;
        pub const FLAGS: u32 = 16;
    }
    pub mod event {
        pub const TIME: u32 = 1;
        pub const NAME: u32 = 2;
        pub const ATTRIBUTES: u32 = 3;
        pub const DROPPED_ATTRIBUTES_COUNT: u32 = 4;
    }
    pub mod link {
        pub const TRACE_ID: u32 = 1;
        pub const SPAN_ID: u32 = 2;
        pub const TRACE_STATE: u32 = 3;
        pub const ATTRIBUTES: u32 = 4;
        pub const DROPPED_ATTRIBUTES_COUNT: u32 = 5;
        pub const FLAGS: u32 = 6;
    }
    pub mod status {
        pub const MESSAGE: u32 = 2;
        pub const CODE: u32 = 3;
    }
    pub mod key_value {
        pub const KEY: u32 = 1;
        pub const VALUE: u32 = 2;
    }
    pub mod any_value {
        pub const STRING: u32 = 1;
        pub const BOOL: u32 = 2;
        pub const INT: u32 = 3;
        pub const DOUBLE: u32 = 4;
        pub const ARRAY: u32 = 5;
    }
    pub mod array_value {
        pub const VALUES: u32 = 1;
    }
}

/// `SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`: the SDK always knows whether a parent is
/// remote, so opentelemetry-proto always sets it.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
/// `SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`.
const FLAG_IS_REMOTE: u32 = 0x200;

/// The `scope` field of a `ScopeSpans` message.
fn put_scope(out: &mut Vec<u8>, scope: &InstrumentationScope, scope_len: usize) {
    put_message(out, field::scope_spans::SCOPE, scope_len, |out| {
        put_str(out, field::scope::NAME, scope.name());
        put_str(
            out,
            field::scope::VERSION,
            scope.version().unwrap_or_default(),
        );
        put_attributes(out, field::scope::ATTRIBUTES, pairs(scope.attributes()));
    });
}

/// Spans encoded one at a time, as they end, grouped by scope in order of first appearance;
/// [`encode_request`](Self::encode_request) wraps them into an `ExportTraceServiceRequest`.
/// Encoding at the end of each span, on the
/// thread that ended it, reads the span while it is still in cache and frees it there; a batch
/// queue of `SpanData` read later by another thread cost the proxy about a third of its CPU per
/// call at concurrency 1 (cache misses, cross-thread frees), three times its instructions.
#[derive(Debug, Default)]
pub struct EncodedSpans {
    /// Each scope with its spans' `ScopeSpans.spans` fields (tag, length and body each).
    groups: Vec<(InstrumentationScope, Vec<u8>)>,
    count: usize,
}

impl EncodedSpans {
    /// Encodes `span` after the ones already held.
    pub fn push(&mut self, span: &SpanData) {
        let buf = self.group(&span.instrumentation_scope);
        Self::encode_span(span, buf);
        self.count += 1;
    }

    /// Appends `span` to `out` as one `ScopeSpans.spans` field, for
    /// [`push_encoded`](Self::push_encoded).
    pub fn encode_span(span: &SpanData, out: &mut Vec<u8>) {
        let len = span_len(span);
        out.reserve(len_field_len(field::scope_spans::SPANS, len));
        put_message(out, field::scope_spans::SPANS, len, |out| {
            put_span(out, span)
        });
    }

    /// Adds a span encoded by [`encode_span`](Self::encode_span) under `scope`.
    pub fn push_encoded(&mut self, scope: &InstrumentationScope, encoded: &[u8]) {
        self.group(scope).extend_from_slice(encoded);
        self.count += 1;
    }

    /// Spans held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// No span held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of encoded spans held (the request adds the resource and scopes).
    pub fn encoded_len(&self) -> usize {
        self.groups.iter().map(|(_, b)| b.len()).sum()
    }

    /// Appends the protobuf encoding of an `ExportTraceServiceRequest` holding these spans under
    /// `resource` to `out`.
    pub fn encode_request(&self, resource: &Resource, out: &mut Vec<u8>) {
        use field::resource_spans as f;
        // Each group's scope length and `ScopeSpans` body length, measured once.
        let groups: Vec<(&InstrumentationScope, &[u8], usize, usize)> = self
            .groups
            .iter()
            .map(|(scope, spans)| {
                let scope_len = scope_len(scope);
                let body_len = len_field_len(field::scope_spans::SCOPE, scope_len)
                    + spans.len()
                    + str_len(
                        field::scope_spans::SCHEMA_URL,
                        scope.schema_url().unwrap_or_default(),
                    );
                (scope, spans.as_slice(), scope_len, body_len)
            })
            .collect();
        let resource_len =
            attributes_len(field::resource::ATTRIBUTES, resource_attributes(resource));
        let resource_spans_len = len_field_len(f::RESOURCE, resource_len)
            + groups
                .iter()
                .map(|g| len_field_len(f::SCOPE_SPANS, g.3))
                .sum::<usize>()
            + str_len(f::SCHEMA_URL, resource.schema_url().unwrap_or_default());
        let request_field = field::request::RESOURCE_SPANS;
        out.reserve(len_field_len(request_field, resource_spans_len));
        put_message(out, request_field, resource_spans_len, |out| {
            put_message(out, f::RESOURCE, resource_len, |out| {
                put_attributes(
                    out,
                    field::resource::ATTRIBUTES,
                    resource_attributes(resource),
                );
            });
            for &(scope, spans, scope_len, body_len) in &groups {
                put_message(out, f::SCOPE_SPANS, body_len, |out| {
                    put_scope(out, scope, scope_len);
                    out.extend_from_slice(spans);
                    put_str(
                        out,
                        field::scope_spans::SCHEMA_URL,
                        scope.schema_url().unwrap_or_default(),
                    );
                });
            }
            put_str(
                out,
                f::SCHEMA_URL,
                resource.schema_url().unwrap_or_default(),
            );
        });
    }

    /// The buffer of `scope`'s spans. Spans of one tracer share one scope, so the last group is
    /// tried first.
    fn group(&mut self, scope: &InstrumentationScope) -> &mut Vec<u8> {
        let found = match self.groups.last() {
            Some((last, _)) if same_scope(last, scope) => Some(self.groups.len() - 1),
            _ => self.groups.iter().position(|(s, _)| same_scope(s, scope)),
        };
        let g = found.unwrap_or_else(|| {
            self.groups.push((scope.clone(), Vec::new()));
            self.groups.len() - 1
        });
        &mut self.groups[g].1
    }
}

/// Body length of an `InstrumentationScope` message.
fn scope_len(scope: &InstrumentationScope) -> usize {
    use field::scope as f;
    str_len(f::NAME, scope.name())
        + str_len(f::VERSION, scope.version().unwrap_or_default())
        + attributes_len(f::ATTRIBUTES, pairs(scope.attributes()))
}

/// The scope's own `==` (the crate's grouping key) sorts both attribute lists into fresh
/// vectors; spans of one tracer carry clones of one scope, so an in-order match is tried first.
fn same_scope(a: &InstrumentationScope, b: &InstrumentationScope) -> bool {
    (a.name() == b.name()
        && a.version() == b.version()
        && a.schema_url() == b.schema_url()
        && a.attributes().eq(b.attributes()))
        || a == b
}

fn span_len(span: &SpanData) -> usize {
    use field::span as f;
    let ctx = &span.span_context;
    let (message, code) = status_parts(&span.status);
    len_field_len(f::TRACE_ID, 16)
        + len_field_len(f::SPAN_ID, 8)
        + str_len(f::TRACE_STATE, &trace_state_header(ctx.trace_state()))
        + if span.parent_span_id == SpanId::INVALID {
            0
        } else {
            len_field_len(f::PARENT_SPAN_ID, 8)
        }
        + str_len(f::NAME, &span.name)
        + uint_len(f::KIND, kind_code(&span.span_kind))
        + fixed64_len(f::START_TIME, unix_nanos(span.start_time))
        + fixed64_len(f::END_TIME, unix_nanos(span.end_time))
        + attributes_len(f::ATTRIBUTES, pairs(&span.attributes))
        + uint_len(
            f::DROPPED_ATTRIBUTES_COUNT,
            span.dropped_attributes_count.into(),
        )
        + span
            .events
            .iter()
            .map(|e| len_field_len(f::EVENTS, event_len(e)))
            .sum::<usize>()
        + uint_len(f::DROPPED_EVENTS_COUNT, span.events.dropped_count.into())
        + span
            .links
            .iter()
            .map(|l| len_field_len(f::LINKS, link_len(l)))
            .sum::<usize>()
        + uint_len(f::DROPPED_LINKS_COUNT, span.links.dropped_count.into())
        + len_field_len(f::STATUS, status_len(message, code))
        + fixed32_len(f::FLAGS, span_flags(span))
}

fn put_span(out: &mut Vec<u8>, span: &SpanData) {
    use field::span as f;
    let ctx = &span.span_context;
    put_bytes(out, f::TRACE_ID, &ctx.trace_id().to_bytes());
    put_bytes(out, f::SPAN_ID, &ctx.span_id().to_bytes());
    put_str(out, f::TRACE_STATE, &trace_state_header(ctx.trace_state()));
    if span.parent_span_id != SpanId::INVALID {
        put_bytes(out, f::PARENT_SPAN_ID, &span.parent_span_id.to_bytes());
    }
    put_str(out, f::NAME, &span.name);
    put_uint(out, f::KIND, kind_code(&span.span_kind));
    put_fixed64(out, f::START_TIME, unix_nanos(span.start_time));
    put_fixed64(out, f::END_TIME, unix_nanos(span.end_time));
    put_attributes(out, f::ATTRIBUTES, pairs(&span.attributes));
    put_uint(
        out,
        f::DROPPED_ATTRIBUTES_COUNT,
        span.dropped_attributes_count.into(),
    );
    for event in span.events.iter() {
        put_message(out, f::EVENTS, event_len(event), |out| {
            put_event(out, event)
        });
    }
    put_uint(
        out,
        f::DROPPED_EVENTS_COUNT,
        span.events.dropped_count.into(),
    );
    for link in span.links.iter() {
        put_message(out, f::LINKS, link_len(link), |out| put_link(out, link));
    }
    put_uint(out, f::DROPPED_LINKS_COUNT, span.links.dropped_count.into());
    let (message, code) = status_parts(&span.status);
    put_message(out, f::STATUS, status_len(message, code), |out| {
        put_str(out, field::status::MESSAGE, message);
        put_uint(out, field::status::CODE, code);
    });
    put_fixed32(out, f::FLAGS, span_flags(span));
}

fn event_len(event: &Event) -> usize {
    use field::event as f;
    fixed64_len(f::TIME, unix_nanos(event.timestamp))
        + str_len(f::NAME, &event.name)
        + attributes_len(f::ATTRIBUTES, pairs(&event.attributes))
        + uint_len(
            f::DROPPED_ATTRIBUTES_COUNT,
            event.dropped_attributes_count.into(),
        )
}

fn put_event(out: &mut Vec<u8>, event: &Event) {
    use field::event as f;
    put_fixed64(out, f::TIME, unix_nanos(event.timestamp));
    put_str(out, f::NAME, &event.name);
    put_attributes(out, f::ATTRIBUTES, pairs(&event.attributes));
    put_uint(
        out,
        f::DROPPED_ATTRIBUTES_COUNT,
        event.dropped_attributes_count.into(),
    );
}

fn link_len(link: &Link) -> usize {
    use field::link as f;
    let ctx = &link.span_context;
    len_field_len(f::TRACE_ID, 16)
        + len_field_len(f::SPAN_ID, 8)
        + str_len(f::TRACE_STATE, &trace_state_header(ctx.trace_state()))
        + attributes_len(f::ATTRIBUTES, pairs(&link.attributes))
        + uint_len(
            f::DROPPED_ATTRIBUTES_COUNT,
            link.dropped_attributes_count.into(),
        )
        + fixed32_len(f::FLAGS, link_flags(link))
}

fn put_link(out: &mut Vec<u8>, link: &Link) {
    use field::link as f;
    let ctx = &link.span_context;
    put_bytes(out, f::TRACE_ID, &ctx.trace_id().to_bytes());
    put_bytes(out, f::SPAN_ID, &ctx.span_id().to_bytes());
    put_str(out, f::TRACE_STATE, &trace_state_header(ctx.trace_state()));
    put_attributes(out, f::ATTRIBUTES, pairs(&link.attributes));
    put_uint(
        out,
        f::DROPPED_ATTRIBUTES_COUNT,
        link.dropped_attributes_count.into(),
    );
    put_fixed32(out, f::FLAGS, link_flags(link));
}

fn status_len(message: &str, code: u64) -> usize {
    str_len(field::status::MESSAGE, message) + uint_len(field::status::CODE, code)
}

/// `(message, StatusCode)`; only an error carries a message.
fn status_parts(status: &Status) -> (&str, u64) {
    match status {
        Status::Unset => ("", 0),
        Status::Ok => ("", 1),
        Status::Error { description } => (description, 2),
    }
}

fn kind_code(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn span_flags(span: &SpanData) -> u32 {
    let trace_flags = span.span_context.trace_flags().to_u8();
    remote_flags(trace_flags, span.parent_span_is_remote)
}

fn link_flags(link: &Link) -> u32 {
    let ctx = &link.span_context;
    remote_flags(ctx.trace_flags().to_u8(), ctx.is_remote())
}

fn remote_flags(trace_flags: u8, is_remote: bool) -> u32 {
    let remote = if is_remote { FLAG_IS_REMOTE } else { 0 };
    u32::from(trace_flags) | FLAG_HAS_IS_REMOTE | remote
}

/// `TraceState::header` allocates even when empty; nearly every span has no trace state.
fn trace_state_header(state: &TraceState) -> Cow<'static, str> {
    if *state == TraceState::NONE {
        Cow::Borrowed("")
    } else {
        Cow::Owned(state.header())
    }
}

/// Times before the epoch become 0 and far-future ones wrap, as in opentelemetry-proto.
fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

fn pairs<'a>(
    attributes: impl IntoIterator<Item = &'a KeyValue>,
) -> impl Iterator<Item = (&'a str, &'a Value)> {
    attributes
        .into_iter()
        .map(|kv| (kv.key.as_str(), &kv.value))
}

/// In the resource's own iteration order, which is the order the crate copies them in.
fn resource_attributes(resource: &Resource) -> impl Iterator<Item = (&str, &Value)> {
    resource.iter().map(|(key, value)| (key.as_str(), value))
}

fn attributes_len<'v>(field: u32, attributes: impl Iterator<Item = (&'v str, &'v Value)>) -> usize {
    attributes
        .map(|(key, value)| len_field_len(field, key_value_len(key, value)))
        .sum()
}

fn put_attributes<'v>(
    out: &mut Vec<u8>,
    field: u32,
    attributes: impl Iterator<Item = (&'v str, &'v Value)>,
) {
    for (key, value) in attributes {
        put_message(out, field, key_value_len(key, value), |out| {
            put_str(out, field::key_value::KEY, key);
            put_message(out, field::key_value::VALUE, any_value_len(value), |out| {
                put_any_value(out, value);
            });
        });
    }
}

fn key_value_len(key: &str, value: &Value) -> usize {
    str_len(field::key_value::KEY, key)
        + len_field_len(field::key_value::VALUE, any_value_len(value))
}

// `AnyValue.value` is a oneof: its member is written even when it holds a default value.

/// Body length of the `AnyValue` for `value`.
fn any_value_len(value: &Value) -> usize {
    match value {
        Value::Bool(_) => BOOL_VALUE_LEN,
        Value::I64(v) => int_value_len(*v),
        Value::F64(_) => DOUBLE_VALUE_LEN,
        Value::String(s) => len_field_len(field::any_value::STRING, s.as_str().len()),
        Value::Array(array) => len_field_len(field::any_value::ARRAY, array_value_len(array)),
        // opentelemetry-proto panics on a variant it does not know; an empty `AnyValue` costs
        // one attribute rather than the batch.
        _ => 0,
    }
}

fn put_any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(v) => put_bool_value(out, *v),
        Value::I64(v) => put_int_value(out, *v),
        Value::F64(v) => put_double_value(out, *v),
        Value::String(s) => put_len_field(out, field::any_value::STRING, s.as_str().as_bytes()),
        Value::Array(array) => {
            put_message(
                out,
                field::any_value::ARRAY,
                array_value_len(array),
                |out| {
                    put_array_values(out, array);
                },
            );
        }
        _ => {}
    }
}

const BOOL_VALUE_LEN: usize = 2;
const DOUBLE_VALUE_LEN: usize = 9;

fn int_value_len(v: i64) -> usize {
    key_len(field::any_value::INT) + varint_len(v as u64)
}

fn put_bool_value(out: &mut Vec<u8>, v: bool) {
    put_key(out, field::any_value::BOOL, WIRE_VARINT);
    out.push(u8::from(v));
}

fn put_int_value(out: &mut Vec<u8>, v: i64) {
    put_key(out, field::any_value::INT, WIRE_VARINT);
    // int64 is the two's complement bit pattern: negative numbers take ten bytes.
    put_varint(out, v as u64);
}

fn put_double_value(out: &mut Vec<u8>, v: f64) {
    put_key(out, field::any_value::DOUBLE, WIRE_I64);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Body length of the `ArrayValue` for `array`: one `AnyValue` message per element.
fn array_value_len(array: &Array) -> usize {
    let element = |len| len_field_len(field::array_value::VALUES, len);
    match array {
        Array::Bool(values) => values.len() * element(BOOL_VALUE_LEN),
        Array::I64(values) => values.iter().map(|&v| element(int_value_len(v))).sum(),
        Array::F64(values) => values.len() * element(DOUBLE_VALUE_LEN),
        Array::String(values) => values
            .iter()
            .map(|s| element(len_field_len(field::any_value::STRING, s.as_str().len())))
            .sum(),
        _ => 0,
    }
}

fn put_array_values(out: &mut Vec<u8>, array: &Array) {
    const VALUES: u32 = field::array_value::VALUES;
    match array {
        Array::Bool(values) => {
            for &v in values {
                put_message(out, VALUES, BOOL_VALUE_LEN, |out| put_bool_value(out, v));
            }
        }
        Array::I64(values) => {
            for &v in values {
                put_message(out, VALUES, int_value_len(v), |out| put_int_value(out, v));
            }
        }
        Array::F64(values) => {
            for &v in values {
                put_message(out, VALUES, DOUBLE_VALUE_LEN, |out| {
                    put_double_value(out, v)
                });
            }
        }
        Array::String(values) => {
            for s in values {
                let s = s.as_str();
                let len = len_field_len(field::any_value::STRING, s.len());
                put_message(out, VALUES, len, |out| {
                    put_len_field(out, field::any_value::STRING, s.as_bytes());
                });
            }
        }
        _ => {}
    }
}

// The protobuf writer. Scalar writers skip default values, as prost does for proto3 fields
// without explicit presence; `put_message` and `put_len_field` always write.

const WIRE_VARINT: u32 = 0;
const WIRE_I64: u32 = 1;
const WIRE_LEN: u32 = 2;
const WIRE_I32: u32 = 5;

fn varint_len(v: u64) -> usize {
    // Seven payload bits per byte: ceil(bits / 7) without a division, as prost computes it.
    ((v | 1).ilog2() as usize * 9 + 73) / 64
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key_len(field: u32) -> usize {
    varint_len(u64::from(field << 3))
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u32) {
    put_varint(out, u64::from(field << 3 | wire_type));
}

/// Length of a length-delimited field whose body is `len` bytes.
fn len_field_len(field: u32, len: usize) -> usize {
    key_len(field) + varint_len(len as u64) + len
}

fn put_len_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Writes a nested message whose body, written by `body`, was measured as `len` bytes.
fn put_message(out: &mut Vec<u8>, field: u32, len: usize, body: impl FnOnce(&mut Vec<u8>)) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, len as u64);
    let start = out.len();
    body(out);
    debug_assert_eq!(
        out.len() - start,
        len,
        "measured and written lengths of field {field} differ"
    );
}

fn str_len(field: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        len_field_len(field, s.len())
    }
}

fn put_str(out: &mut Vec<u8>, field: u32, s: &str) {
    put_bytes(out, field, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_len_field(out, field, bytes);
    }
}

fn uint_len(field: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(field) + varint_len(v)
    }
}

fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        put_key(out, field, WIRE_VARINT);
        put_varint(out, v);
    }
}

fn fixed64_len(field: u32, v: u64) -> usize {
    if v == 0 { 0 } else { key_len(field) + 8 }
}

fn put_fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        put_key(out, field, WIRE_I64);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32_len(field: u32, v: u32) -> usize {
    if v == 0 { 0 } else { key_len(field) + 4 }
}

fn put_fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        put_key(out, field, WIRE_I32);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests;
