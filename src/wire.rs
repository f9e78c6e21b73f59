//! HTTP helpers shared by the two front doors (the proxy and the audited client).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// An error and its sources on one line, e.g.
/// "error sending request: client error (Connect): connection refused".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Writes the W3C `traceparent`/`tracestate` of `cx` into `headers` (nothing when `cx` holds
/// no valid span, e.g. when spans are not exported). The same headers as
/// `TraceContextPropagator::inject_context` (a test holds them equal; an empty `tracestate` is
/// omitted, as W3C asks), written into a stack
/// buffer instead of through `format!` and a `String` per header (callgrind: ~4k instructions
/// per call on the proxy path).
pub fn inject_trace_context(cx: &opentelemetry::Context, headers: &mut HeaderMap) {
    use opentelemetry::trace::{TraceContextExt as _, TraceFlags};
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    // "00-" trace-id "-" parent-id "-" flags: 2 + 1 + 32 + 1 + 16 + 1 + 2 bytes.
    let mut buf = [0u8; 55];
    buf[..3].copy_from_slice(b"00-");
    hex_into(&sc.trace_id().to_bytes(), &mut buf[3..35]);
    buf[35] = b'-';
    hex_into(&sc.span_id().to_bytes(), &mut buf[36..52]);
    buf[52] = b'-';
    hex_into(
        &[(sc.trace_flags() & TraceFlags::SAMPLED).to_u8()],
        &mut buf[53..55],
    );
    if let Ok(v) = HeaderValue::from_bytes(&buf) {
        headers.insert(TRACEPARENT, v);
    }
    let state = sc.trace_state().header();
    if !state.is_empty()
        && let Ok(v) = HeaderValue::from_str(&state)
    {
        headers.insert(TRACESTATE, v);
    }
}

/// A TCP connector for outgoing HTTP(S): `connect_timeout`, no Nagle delay, `https` allowed
/// (the TLS layer wraps it).
pub fn http_connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    http
}

/// `inner` wrapped in TLS for `https` URIs (plain for `http`), offering HTTP/2 and HTTP/1.1 by
/// ALPN.
pub fn https<T>(inner: T) -> Result<HttpsConnector<T>, rustls::Error> {
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls_client_config()?)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(inner))
}

/// hyper-util's pooled client over `connector`, with whole bodies.
pub fn pooled<C>(connector: C) -> PooledClient<C>
where
    C: Connect + Clone,
{
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        // An idle pool smaller than the concurrency costs a TCP (and TLS) handshake per
        // request once it overflows (STACK.md: +29 µs and half the throughput).
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// The client [`pooled`] builds.
pub type PooledClient<C> = hyper_util::client::legacy::Client<C, Full<Bytes>>;

/// The TLS set-up of every outgoing HTTPS connection (upstream, OTLP/HTTP): rustls with the
/// platform's certificate verifier.
fn tls_client_config() -> Result<rustls::ClientConfig, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    // The provider is named: with two rustls providers compiled in (other crates enable ring),
    // relying on the process default would panic at start-up.
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth())
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Lower-case hex of `bytes` (trace and span ids: the ids' own `Display` runs the formatting
/// machinery on a `u128`).
pub fn hex_string(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::{Injector, TextMapPropagator as _};
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    struct Map<'a>(&'a mut HeaderMap);

    impl Injector for Map<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(
                HeaderName::from_bytes(key.as_bytes()).unwrap(),
                HeaderValue::from_str(&value).unwrap(),
            );
        }
    }

    #[test]
    fn same_headers_as_the_sdk_propagator() {
        let state = TraceState::from_key_value([("vendor", "ab"), ("other", "1")]).unwrap();
        let cases = [
            (
                0x0af7651916cd43dd8448eb211c80319c_u128,
                0x00f067aa0ba902b7_u64,
                TraceFlags::SAMPLED,
                TraceState::default(),
            ),
            (1, 1, TraceFlags::default(), state.clone()),
            (u128::MAX, u64::MAX, TraceFlags::new(0xff), state),
        ];
        for (trace, span, flags, state) in cases {
            let sc = SpanContext::new(TraceId::from(trace), SpanId::from(span), flags, true, state);
            let cx = opentelemetry::Context::new().with_remote_span_context(sc);
            let (mut ours, mut sdk) = (HeaderMap::new(), HeaderMap::new());
            inject_trace_context(&cx, &mut ours);
            TraceContextPropagator::new().inject_context(&cx, &mut Map(&mut sdk));
            // The SDK also writes an empty `tracestate`; W3C says to omit it then.
            if sdk.get("tracestate").is_some_and(|v| v.is_empty()) {
                sdk.remove("tracestate");
            }
            assert_eq!(ours, sdk);
            assert!(ours.contains_key("traceparent"));
        }
        let id = TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128);
        assert_eq!(hex_string(&id.to_bytes()), id.to_string());
        let id = SpanId::from(0x00f067aa0ba902b7_u64);
        assert_eq!(hex_string(&id.to_bytes()), id.to_string());
        let mut none = HeaderMap::new();
        inject_trace_context(&opentelemetry::Context::new(), &mut none);
        assert!(none.is_empty());
    }
}
