//! Request handlers: the audited endpoints, the unaudited `/v1/*` pass-through, health checks.
//! Handlers stay thin: identity, limits and parsing, one upstream exchange, and the recorder.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyDataStream, BodyExt as _};
use hyper::body::Incoming;

use super::error::ProxyError;
use super::identity::{client_ip, header_user, parent_context};
use super::tee::TeeBody;
use super::upstream::SendError;
use super::{AppState, COST_HEADER, REQUEST_ID_HEADER};
use crate::audit::usage::parse_json_response;
use crate::audit::{CallEnd, CallStart, InFlight, Operation, ParsedRequest};
use crate::client::RetryPolicy;
use crate::wire::{error_chain, inject_trace_context};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus ones we set ourselves.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// An audited endpoint.
pub async fn audited(
    op: Operation,
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let received = Instant::now();
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let ip = client_ip(peer, &headers, &state.trusted_proxies).to_string();
    let mut call = CallStart::unparsed(op, state.provider.clone(), b"", None);
    call.ip_address = Some(ip.clone());
    call.parent = parent_context(&headers);
    call.server_address.clone_from(&state.server_address);
    call.server_port = state.server_port;

    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > state.max_header_bytes {
        return reject(
            &state,
            call,
            ProxyError::HeadersTooLarge(state.max_header_bytes),
        );
    }
    if let Some(ct) = headers.get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return reject(
                &state,
                call,
                ProxyError::UnsupportedMediaType(ct.chars().take(100).collect()),
            );
        }
    }
    let body = match axum::body::to_bytes(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let err = if too_large {
                ProxyError::BodyTooLarge(state.max_body_bytes)
            } else {
                ProxyError::BodyRead(e.to_string())
            };
            return reject(&state, call, err);
        }
    };
    let identity = state.auth.check(&headers);
    let (key_id, key_user) = match identity {
        Ok(id) => id,
        Err(err) => {
            if let ProxyError::Unauthorized { reason, .. } = err {
                state.recorder.count_auth_failure(reason);
            }
            let call = CallStart {
                key_id: None,
                ..with_body(call, op, &state, &body)
            };
            return reject(&state, call, err);
        }
    };
    call.key_id = key_id;
    let parsed = match ParsedRequest::from_slice(op, &body, state.recorder.hash_key()) {
        Ok(p) => p,
        Err(e) => return reject(&state, with_body(call, op, &state, &body), e.into()),
    };
    // Only chat and legacy completions stream usage as a final `"choices":[]` chunk; the
    // Responses API reports it in `response.completed` and has no `include_usage` option.
    let hide_usage = parsed.stream
        && !parsed.include_usage
        && matches!(op, Operation::Chat | Operation::TextCompletion);
    let stream = parsed.stream;
    let mut start = CallStart::from_request(parsed, state.provider.clone());
    start.user_id = key_user.or(start.user_id).or_else(|| header_user(&headers));
    start.ip_address = call.ip_address;
    start.key_id = call.key_id;
    start.parent = call.parent;
    start.server_address = call.server_address;
    start.server_port = call.server_port;
    if !state.recorder.store().accepting() {
        return reject(&state, start, ProxyError::StoreUnavailable);
    }

    // If the client hangs up before the answer, hyper drops this future and `flight` with it:
    // `InFlight`'s `Drop` records the call as aborted (the upstream got it, and bills it).
    let mut flight = state.recorder.begin(start);
    let wire_body = if hide_usage {
        inject_include_usage(&body)
    } else {
        body
    };
    let uri = match state.upstream.uri(parts.uri.path(), parts.uri.query()) {
        Ok(u) => u,
        Err(e) => return fail(flight, send_error(e, &state)),
    };
    let mut upstream_headers = forward_headers(&headers, &state);
    // Answers must be readable to be audited: ask for them uncompressed.
    upstream_headers.remove("accept-encoding");
    inject_trace_context(flight.otel_context(), &mut upstream_headers);
    if !upstream_headers.contains_key("traceparent") {
        // Spans are not exported here: the client's trace still continues upstream.
        for name in ["traceparent", "tracestate"] {
            if let Some(v) = headers.get(name) {
                upstream_headers.insert(name, v.clone());
            }
        }
    }
    flight.add_overhead(received.elapsed());

    let _in_flight = state.shutdown.tracker.token();
    let sent = tokio::select! {
        r = send(&state, &mut flight, &uri, upstream_headers, wire_body) => r,
        () = state.shutdown.abort.cancelled() => Err(ProxyError::ShuttingDown),
    };
    let response = match sent {
        Ok(r) => r,
        Err(err) => return fail(flight, err),
    };
    let status = response.status();
    let sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let mut out_headers = response_headers(response.headers());
    if let Ok(v) = HeaderValue::from_str(flight.request_id()) {
        out_headers.insert(REQUEST_ID_HEADER, v);
    }
    if sse && status.is_success() && stream {
        let tee = TeeBody::new(
            flight,
            status.as_u16(),
            Box::pin(BodyDataStream::new(response.into_body())),
            hide_usage,
            state.idle_timeout,
            &state.shutdown,
        );
        let mut resp = Response::new(Body::from_stream(tee));
        *resp.status_mut() = status;
        *resp.headers_mut() = out_headers;
        return resp;
    }
    let read = tokio::select! {
        r = read_body(response, state.idle_timeout) => r,
        () = state.shutdown.abort.cancelled() => Err(ProxyError::ShuttingDown),
    };
    let bytes = match read {
        Ok(b) => b,
        Err(err) => return fail(flight, err),
    };
    let after_upstream = Instant::now();
    let end = json_end(status, &bytes);
    flight.add_overhead(after_upstream.elapsed());
    let mut emitted = flight.finish(end);
    if let Ok(v) = HeaderValue::from_str(&emitted.record.cost_usd.to_string()) {
        out_headers.insert(COST_HEADER, v);
    }
    // `durability = "sync"`: the answer leaves only once its record is on disk.
    if state.recorder.store().durability() == crate::config::Durability::Sync {
        emitted.committed().await;
    }
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    *resp.headers_mut() = out_headers;
    resp
}

/// Reads a whole answer, allowing `idle` between chunks (not in total: some providers send
/// keep-alive blank lines while a long answer is generated).
async fn read_body(response: Response<Incoming>, idle: Duration) -> Result<Bytes, ProxyError> {
    let mut body = response.into_body();
    let mut buf = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(chunk) = frame.data_ref() {
                    buf.extend_from_slice(chunk);
                }
            }
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(ProxyError::UpstreamTransport(error_chain(&e))),
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    which: "idle",
                    after: idle,
                });
            }
        }
    }
}

/// The proxy's answer to a failed upstream exchange.
fn send_error(e: SendError, state: &AppState) -> ProxyError {
    match e {
        SendError::ConnectTimeout => ProxyError::UpstreamTimeout {
            which: "connect",
            after: state.connect_timeout,
        },
        SendError::Transport(message) => ProxyError::UpstreamTransport(message),
    }
}

/// The call's end for a complete (non-streamed) answer.
fn json_end(status: StatusCode, bytes: &[u8]) -> CallEnd {
    let code = status.as_u16();
    match parse_json_response(bytes) {
        Ok(summary) if status.is_success() => match summary.error_message.clone() {
            Some(message) => CallEnd::error(code, "upstream_error", message).with_response(summary),
            None => CallEnd::ok(code, summary),
        },
        Ok(summary) => {
            let message = summary
                .error_message
                .clone()
                .unwrap_or_else(|| format!("upstream returned {status}"));
            CallEnd::error(code, code.to_string(), message).with_response(summary)
        }
        Err(e) if status.is_success() => CallEnd::error(
            code,
            "invalid_response",
            format!("invalid upstream response: {e}"),
        ),
        Err(_) => {
            let text: String = String::from_utf8_lossy(bytes).chars().take(200).collect();
            CallEnd::error(
                code,
                code.to_string(),
                format!("upstream returned {status}: {text}"),
            )
        }
    }
}

/// Sends the request upstream, retrying 429/5xx answers `upstream.retries` times before
/// anything reached the client.
async fn send(
    state: &AppState,
    flight: &mut InFlight,
    uri: &Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response<Incoming>, ProxyError> {
    let policy = RetryPolicy {
        max_attempts: state.retries + 1,
        ..RetryPolicy::default()
    };
    loop {
        let attempt = flight.add_attempt();
        let request = state
            .upstream
            .send(Method::POST, uri.clone(), headers.clone(), body.clone());
        let response = match tokio::time::timeout(state.first_byte_timeout, request).await {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    which: "first-byte",
                    after: state.first_byte_timeout,
                });
            }
            Ok(Err(e)) => return Err(send_error(e, state)),
            Ok(Ok(r)) => r,
        };
        let code = response.status().as_u16();
        if attempt >= policy.max_attempts || !policy.retries_status(code) {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::client::retry::parse_retry_after);
        drop(response);
        tokio::time::sleep(
            policy
                .delay(attempt, retry_after)
                .min(Duration::from_secs(10)),
        )
        .await;
    }
}

/// A request the proxy answers itself: recorded like any call, never sent upstream.
fn reject(state: &AppState, call: CallStart, err: ProxyError) -> Response {
    let flight = state.recorder.begin(call);
    fail(flight, err)
}

/// Ends `flight` with `err` and answers it in OpenAI's shape.
fn fail(flight: InFlight, err: ProxyError) -> Response {
    let request_id = flight.request_id().to_owned();
    flight.finish(CallEnd::error(
        err.status().as_u16(),
        err.code(),
        err.to_string(),
    ));
    err.into_response_with_id(&request_id)
}

/// The unparsed call, with the model named in `body` when there is one.
fn with_body(call: CallStart, op: Operation, state: &AppState, body: &[u8]) -> CallStart {
    let base = CallStart::unparsed(op, state.provider.clone(), body, state.recorder.hash_key());
    CallStart {
        model: base.model,
        request_hash: base.request_hash,
        ..call
    }
}

/// Adds `"stream_options":{"include_usage":true}` without re-serialising the body (key order
/// and formatting stay the client's). Falls back to re-serialising when `stream_options`
/// already exists without `include_usage`.
pub fn inject_include_usage(body: &Bytes) -> Bytes {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return body.clone();
    };
    let Some(map) = value.as_object_mut() else {
        return body.clone();
    };
    if !map.contains_key("stream_options") {
        let trimmed_end = body
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .unwrap_or(0);
        if body.get(trimmed_end) == Some(&b'}') {
            let mut out = Vec::with_capacity(body.len() + 48);
            out.extend_from_slice(&body[..trimmed_end]);
            let sep = if map.is_empty() { "" } else { "," };
            out.extend_from_slice(
                format!("{sep}\"stream_options\":{{\"include_usage\":true}}}}").as_bytes(),
            );
            return Bytes::from(out);
        }
    }
    let options = map
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if !options.is_object() {
        *options = serde_json::Value::Object(Default::default());
    }
    if let Some(o) = options.as_object_mut() {
        o.insert("include_usage".into(), serde_json::Value::Bool(true));
    }
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .unwrap_or_else(|_| body.clone())
}

/// Request headers for the upstream: everything but hop-by-hop headers, our own `x-llm-audit-*`
/// and trace headers (replaced by ours), and — in keys mode — the client's `Authorization`.
fn forward_headers(incoming: &HeaderMap, state: &AppState) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || n == CONTENT_LENGTH
            || n.starts_with("x-llm-audit-")
            || n == "traceparent"
            || n == "tracestate"
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if let Some(auth) = state.auth.upstream_authorization() {
        // Replaces (never keeps) the client's proxy key.
        out.insert(axum::http::header::AUTHORIZATION, auth.clone());
    }
    out
}

/// Response headers for the client: the upstream's, minus hop-by-hop and length (the body we
/// send sets its own framing).
fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len() + 2);
    for (name, value) in upstream {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == CONTENT_LENGTH {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// `/v1/*` paths we do not audit (models, files, …): forwarded as they are, counted.
pub async fn passthrough(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let request_id = uuid::Uuid::now_v7().to_string();
    let (parts, body) = request.into_parts();
    // Keys mode guards every path: this one goes upstream with the proxy's own key.
    if let Err(err) = state.auth.check(&parts.headers) {
        if let ProxyError::Unauthorized { reason, .. } = err {
            state.recorder.count_auth_failure(reason);
        }
        state.recorder.count_passthrough(err.status().as_u16());
        return err.into_response_with_id(&request_id);
    }
    let body = match axum::body::to_bytes(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            let err = ProxyError::BodyTooLarge(state.max_body_bytes);
            state.recorder.count_passthrough(err.status().as_u16());
            return err.into_response_with_id(&request_id);
        }
    };
    let request = async {
        let uri = state.upstream.uri(parts.uri.path(), parts.uri.query())?;
        let headers = forward_headers(&parts.headers, &state);
        state.upstream.send(parts.method, uri, headers, body).await
    };
    let response = match tokio::time::timeout(state.first_byte_timeout, request).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let err = send_error(e, &state);
            state.recorder.count_passthrough(err.status().as_u16());
            return err.into_response_with_id(&request_id);
        }
        Err(_) => {
            state.recorder.count_passthrough(504);
            let err = ProxyError::UpstreamTimeout {
                which: "first-byte",
                after: state.first_byte_timeout,
            };
            return err.into_response_with_id(&request_id);
        }
    };
    state.recorder.count_passthrough(response.status().as_u16());
    let status = response.status();
    let mut headers = response_headers(response.headers());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID_HEADER, v);
    }
    let mut resp = Response::new(Body::from_stream(idle_limited(
        BodyDataStream::new(response.into_body()),
        state.idle_timeout,
    )));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// `stream`, ended with an error once the upstream stays silent for `idle` (an unaudited
/// answer must not hold a connection, and shutdown, forever).
fn idle_limited(
    stream: impl futures_util::Stream<Item = Result<Bytes, hyper::Error>> + Send + 'static,
    idle: Duration,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use futures_util::StreamExt as _;
    futures_util::stream::unfold(Some(Box::pin(stream)), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(stream))),
            Ok(None) => None,
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(error_chain(&e))), None)),
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "upstream idle timeout",
                )),
                None,
            )),
        }
    })
}

/// Liveness: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the audit store is writing.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.recorder.store().is_healthy() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "audit store failing").into_response()
    }
}

/// A path we serve with a method it does not take: OpenAI's shape, not axum's empty 405.
pub async fn method_not_allowed(request: Request) -> Response {
    let message = format!(
        "method {} is not allowed on {}",
        request.method(),
        request.uri().path()
    );
    unaudited_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        message,
    )
}

/// Anything else: OpenAI's 404 shape.
pub async fn not_found(request: Request) -> Response {
    let message = format!("unknown path {}", request.uri().path());
    unaudited_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        message,
    )
}

/// An OpenAI-shaped error for a request that has no audit record; it still carries a fresh
/// `x-llm-audit-request-id`, like every response.
pub fn unaudited_error(status: StatusCode, kind: &str, code: &str, message: String) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&uuid::Uuid::now_v7().to_string()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injection_keeps_the_clients_bytes() {
        let body = Bytes::from_static(b"{\"model\":\"m\", \"stream\":true}\n");
        assert_eq!(
            inject_include_usage(&body),
            Bytes::from_static(
                b"{\"model\":\"m\", \"stream\":true,\"stream_options\":{\"include_usage\":true}}"
            )
        );
        let with_opts = Bytes::from_static(b"{\"stream_options\":{\"x\":1}}");
        let v: serde_json::Value =
            serde_json::from_slice(&inject_include_usage(&with_opts)).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
    }
}
