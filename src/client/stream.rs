//! Streaming answers: chunks go to the caller as they arrive; the record is written once, when
//! the stream ends, breaks, or is dropped.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use serde_json::Value;

use super::ClientError;
use crate::audit::{CallEnd, InFlight, SseScanner};
use crate::wire::error_chain;

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Asks the provider for a final usage chunk when the caller did not; returns whether the
/// caller asked itself (then its usage chunk is passed through, else hidden).
pub(super) fn request_usage(body: &mut Value) -> bool {
    let Value::Object(map) = body else {
        return false;
    };
    let options = map.entry("stream_options").or_insert(Value::Null);
    if options.is_null() {
        *options = Value::Object(Default::default());
    }
    let Value::Object(options) = options else {
        return false;
    };
    if options.get("include_usage").and_then(Value::as_bool) == Some(true) {
        return true;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    false
}

/// Parsed chunks of a streaming chat completion (`Item = Result<serde_json::Value, _>`).
pub struct ChatStream {
    inner: Pin<Box<dyn Stream<Item = Result<Value, ClientError>> + Send>>,
    request_id: String,
}

impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatStream")
            .field("request_id", &self.request_id)
            .finish()
    }
}

impl ChatStream {
    pub(super) fn new(
        flight: InFlight,
        response: reqwest::Response,
        idle: Duration,
        hide_usage: bool,
    ) -> Self {
        let request_id = flight.request_id().to_owned();
        let status = response.status().as_u16();
        let state = State {
            guard: Guard {
                flight: Some(flight),
                scanner: Some(SseScanner::keeping_events()),
                status,
            },
            body: Box::pin(response.bytes_stream()),
            pending: VecDeque::new(),
            idle,
            hide_usage,
            done: false,
        };
        let inner = futures_util::stream::unfold(state, next_item);
        Self {
            inner: Box::pin(inner),
            request_id,
        }
    }

    /// The audit record's id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
}

impl Stream for ChatStream {
    type Item = Result<Value, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct State {
    guard: Guard,
    body: ByteStream,
    pending: VecDeque<Result<Value, ClientError>>,
    idle: Duration,
    hide_usage: bool,
    done: bool,
}

/// Writes the record exactly once. Finished explicitly at the end of the stream; if the caller
/// drops the stream first, `Drop` writes it as `aborted` with what had arrived (and estimated
/// usage) — a record is never lost to an early return.
struct Guard {
    flight: Option<InFlight>,
    scanner: Option<SseScanner>,
    status: u16,
}

impl Guard {
    fn finish(
        &mut self,
        end: impl FnOnce(crate::audit::ResponseSummary) -> CallEnd,
    ) -> Option<(String, u32)> {
        let flight = self.flight.take()?;
        let summary = self
            .scanner
            .take()
            .map(SseScanner::finish)
            .unwrap_or_default();
        let record = flight.finish(end(summary)).record;
        let attempts = u32::try_from(record.attempts).unwrap_or(u32::MAX);
        Some((record.request_id.clone(), attempts))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let status = self.status;
        self.finish(|summary| CallEnd::aborted(status, summary));
    }
}

async fn next_item(mut s: State) -> Option<(Result<Value, ClientError>, State)> {
    loop {
        if let Some(item) = s.pending.pop_front() {
            return Some((item, s));
        }
        if s.done {
            return None;
        }
        match tokio::time::timeout(s.idle, s.body.next()).await {
            Ok(Some(Ok(bytes))) => on_bytes(&mut s, &bytes),
            Ok(None) => {
                s.done = true;
                let status = s.guard.status;
                s.guard.finish(|summary| {
                    if summary.bad_events > 0 {
                        let msg =
                            format!("{} stream event(s) were not valid JSON", summary.bad_events);
                        CallEnd::error(502, "invalid_response", msg).with_response(summary)
                    } else if let Some(err) = summary.error_message.clone() {
                        CallEnd::error(502, "upstream_stream_error", err).with_response(summary)
                    } else {
                        CallEnd::ok(status, summary)
                    }
                });
            }
            Ok(Some(Err(e))) => {
                s.done = true;
                let message = format!("upstream stream broke: {}", error_chain(&e));
                let m = message.clone();
                let (request_id, attempts) = s
                    .guard
                    .finish(|summary| CallEnd::error(502, "transport", m).with_response(summary))
                    .unwrap_or_default();
                s.pending.push_back(Err(ClientError::Transport {
                    message,
                    request_id,
                    attempts,
                }));
            }
            Err(_) => {
                s.done = true;
                let message = format!("Stream idle timeout ({}s)", s.idle.as_secs_f64());
                let m = message.clone();
                let (request_id, attempts) = s
                    .guard
                    .finish(|summary| CallEnd::error(408, "timeout", m).with_response(summary))
                    .unwrap_or_default();
                s.pending.push_back(Err(ClientError::Timeout {
                    message,
                    request_id,
                    attempts,
                }));
            }
        }
    }
}

fn on_bytes(s: &mut State, bytes: &[u8]) {
    let (Some(flight), Some(scanner)) = (s.guard.flight.as_mut(), s.guard.scanner.as_mut()) else {
        return;
    };
    flight.mark_first_chunk();
    scanner.feed(bytes);
    for data in scanner.take_events() {
        match serde_json::from_slice::<Value>(&data) {
            Ok(chunk) => {
                let usage_only = chunk.get("usage").is_some_and(|u| !u.is_null())
                    && chunk
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty);
                if !(usage_only && s.hide_usage) {
                    s.pending.push_back(Ok(chunk));
                }
            }
            Err(e) => {
                let request_id = flight.request_id().to_owned();
                s.pending.push_back(Err(ClientError::InvalidResponse {
                    message: format!("invalid stream event: {e}"),
                    request_id,
                }));
            }
        }
    }
}
