//! The streaming response body: upstream bytes go to the client the moment they arrive, a
//! scanner summarises them on the side, and the record is written once at the end.
//!
//! When the proxy injected `stream_options.include_usage`, the usage-only chunk is removed from
//! what the client sees. Only then are bytes of an event held back, until that event is
//! complete (upstreams write whole events, so in practice nothing waits); without injection the
//! upstream's chunks are forwarded as they are.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::error::ProxyError;
use crate::audit::{CallEnd, InFlight, SseScanner};

type Upstream = Pin<Box<dyn Stream<Item = Result<Bytes, hyper::Error>> + Send>>;

/// The client-facing body of a streamed answer.
pub struct TeeBody {
    upstream: Upstream,
    guard: Guard,
    hide_usage: bool,
    held: BytesMut,
    idle: Duration,
    /// Armed for `idle` after some earlier activity; when it fires it is moved to `idle` after
    /// `last_activity` if there was activity since (re-arming a Tokio timer on every chunk
    /// takes the timer driver's lock twice per chunk).
    idle_timer: Pin<Box<Sleep>>,
    last_activity: Instant,
    returned_item: bool,
    done: bool,
    /// Fires when shutdown's grace period is over: the stream ends and is recorded now, while
    /// the store still takes records.
    abort: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The same signal as a flag: checked while chunks flow, so the future above is polled
    /// (its waker registered) only before this body waits.
    abort_flag: CancellationToken,
    /// Keeps shutdown waiting until this stream's record is written.
    _in_flight: TaskTrackerToken,
}

/// Writes the record exactly once: explicitly at the end of the stream, or from `Drop` when
/// the client went away first (axum drops the body) — then as `aborted`, with what had arrived.
struct Guard {
    flight: Option<InFlight>,
    scanner: SseScanner,
    status: u16,
}

impl Guard {
    fn finish(&mut self, end: impl FnOnce(crate::audit::ResponseSummary) -> CallEnd) {
        if let Some(flight) = self.flight.take() {
            let summary = std::mem::take(&mut self.scanner).finish();
            flight.finish(end(summary));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let status = self.status;
        self.finish(|summary| CallEnd::aborted(status, summary));
    }
}

impl TeeBody {
    /// Tees `upstream` for `flight`; `hide_usage` when the proxy injected `include_usage`.
    pub fn new(
        flight: InFlight,
        status: u16,
        upstream: Upstream,
        hide_usage: bool,
        idle: Duration,
        shutdown: &super::ShutdownGuard,
    ) -> Self {
        Self {
            upstream,
            guard: Guard {
                flight: Some(flight),
                scanner: SseScanner::new(),
                status,
            },
            hide_usage,
            held: BytesMut::new(),
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            last_activity: Instant::now(),
            returned_item: false,
            done: false,
            abort: Box::pin(shutdown.abort.clone().cancelled_owned()),
            abort_flag: shutdown.abort.clone(),
            _in_flight: shutdown.tracker.token(),
        }
    }

    fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        if let Some(flight) = self.guard.flight.as_mut() {
            flight.mark_first_chunk();
        }
        self.guard.scanner.feed(&chunk);
        if !self.hide_usage {
            return chunk;
        }
        if self.held.is_empty() && complete_events_len(&chunk) == chunk.len() {
            // The usual case: the chunk is whole events and nothing is held, so it goes on as
            // it is (shared, not copied) unless it holds the usage-only event.
            return without_usage_only_events(chunk);
        }
        self.held.extend_from_slice(&chunk);
        let complete = complete_events_len(&self.held);
        let events = self.held.split_to(complete).freeze();
        without_usage_only_events(events)
    }

    fn end_ok(&mut self) {
        let status = self.guard.status;
        self.guard
            .finish(|summary| match summary.error_message.clone() {
                // An error event inside a 200 stream is a failed call all the same.
                Some(message) => {
                    CallEnd::error(status, "upstream_stream_error", message).with_response(summary)
                }
                None => CallEnd::ok(status, summary),
            });
    }
}

impl Stream for TeeBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.returned_item {
            // The idle timeout measures the upstream's silence, not a client slow to read:
            // restart it when the client comes back for more.
            this.returned_item = false;
            this.last_activity = Instant::now();
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.abort_flag.is_cancelled() {
                this.done = true;
                let err = ProxyError::ShuttingDown;
                this.guard
                    .finish(|s| CallEnd::error(503, err.code(), err.to_string()).with_response(s));
                return Poll::Ready(Some(Err(std::io::Error::other("audit proxy shut down"))));
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.last_activity = Instant::now();
                    let out = this.on_chunk(chunk);
                    if !out.is_empty() {
                        this.returned_item = true;
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    let err = ProxyError::UpstreamTransport(format!("stream broke: {e}"));
                    this.guard.finish(|s| {
                        CallEnd::error(502, err.code(), err.to_string()).with_response(s)
                    });
                    return Poll::Ready(Some(Err(std::io::Error::other("upstream stream broke"))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.end_ok();
                    // A last event without its blank line is still filtered.
                    let rest = std::mem::take(&mut this.held).freeze();
                    let rest = if this.hide_usage {
                        without_usage_only_events(rest)
                    } else {
                        rest
                    };
                    return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
                }
                Poll::Pending => {
                    if this.abort.as_mut().poll(cx).is_ready() {
                        // Shutdown's grace period ended: handled at the top of the loop.
                        continue;
                    }
                    while this.idle_timer.as_mut().poll(cx).is_ready() {
                        let deadline = this.last_activity + this.idle;
                        if deadline > this.idle_timer.deadline() {
                            // Activity since the timer was armed: not idle yet. Poll again so
                            // the re-armed timer holds this task's waker.
                            this.idle_timer.as_mut().reset(deadline);
                            continue;
                        }
                        this.done = true;
                        let err = ProxyError::UpstreamTimeout {
                            which: "idle",
                            after: this.idle,
                        };
                        this.guard.finish(|s| {
                            CallEnd::error(504, err.code(), err.to_string()).with_response(s)
                        });
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "upstream idle timeout",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// End offsets of the complete SSE events in `buf` (each ends with a blank line).
fn event_ends(buf: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut line_start = 0;
    memchr::memchr_iter(b'\n', buf).filter_map(move |i| {
        let line = &buf[line_start..i];
        line_start = i + 1;
        (line.is_empty() || line == b"\r").then_some(i + 1)
    })
}

/// Length of the prefix of `buf` made of complete SSE events.
fn complete_events_len(buf: &[u8]) -> usize {
    event_ends(buf).last().unwrap_or(0)
}

/// `events` without the usage-only chunk (`"choices":[]` with usage); a trailing event without
/// its blank line counts as one more event.
fn without_usage_only_events(events: Bytes) -> Bytes {
    if events.is_empty() || !has_usage_key(&events) {
        return events;
    }
    let mut out = BytesMut::with_capacity(events.len());
    let mut start = 0;
    for end in event_ends(&events).chain(std::iter::once(events.len())) {
        let event = &events[start..end];
        if !is_usage_only(event) {
            out.extend_from_slice(event);
        }
        start = end;
    }
    out.freeze()
}

fn is_usage_only(event: &[u8]) -> bool {
    if !has_usage_key(event) {
        return false;
    }
    let data: Vec<u8> = event
        .split(|b| *b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .flat_map(|d| {
            d.strip_prefix(b" ")
                .unwrap_or(d)
                .iter()
                .copied()
                .filter(|b| *b != b'\r')
        })
        .collect();
    #[derive(serde::Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Chunk>(&data)
        .is_ok_and(|c| c.usage.is_some() && c.choices.is_some_and(|ch| ch.is_empty()))
}

/// Whether `bytes` hold `"usage"`. The searcher is built once: building a memchr `Finder`
/// per call cost more than the search (callgrind: ~1k instructions per chunk).
fn has_usage_key(bytes: &[u8]) -> bool {
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    USAGE.find(bytes).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_only_chunk_is_removed_and_the_rest_kept_byte_for_byte() {
        let a = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        let u = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\r\n\r\n";
        let d = "data: [DONE]\n\n";
        let all = Bytes::from(format!("{a}{u}{d}"));
        assert_eq!(complete_events_len(&all), all.len());
        assert_eq!(
            without_usage_only_events(all),
            Bytes::from(format!("{a}{d}"))
        );
        let unterminated = Bytes::from(format!("{a}{}", u.trim_end()));
        assert_eq!(without_usage_only_events(unterminated), Bytes::from(a));
        let partial = format!("{a}data: {{\"cho");
        assert_eq!(complete_events_len(partial.as_bytes()), a.len());
    }
}
