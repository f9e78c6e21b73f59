//! A fake OpenAI-compatible upstream for integration tests: a real HTTP/1.1 server on
//! `127.0.0.1:0` that answers each request with the next reply of a script.
//!
//! It is written on a raw `TcpListener` (not a framework) so a reply can also misbehave the way
//! real networks do: hang, reset the connection, stall after the headers, or cut a stream
//! mid-way without the chunked terminator.
//!
//! ```ignore
//! let up = FakeUpstream::start(vec![
//!     Reply::error(429, "rate_limit_exceeded", "Slow down").header("retry-after", "1"),
//!     Reply::chat("gpt-4.1-mini", "Hello!", 12, 3),
//! ])
//! .await;
//! let client = Client::builder(up.base_url()) /* … */;
//! assert_eq!(up.requests().len(), 2);
//! ```
//!
//! Every request (any method, any path) takes the next reply; when the script is exhausted the
//! upstream answers 500 with the message [`EXHAUSTED`], so an unexpected extra attempt shows up
//! in both the result and [`FakeUpstream::requests`].
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// The error message of the reply sent when the script has no reply left.
pub const EXHAUSTED: &str = "fake upstream: no scripted reply left";

/// `created` of every generated body (a fixed time keeps bodies comparable).
const CREATED: i64 = 1_751_040_000;

/// A request as the upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `POST`, `GET`, …
    pub method: String,
    /// Path and query, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The raw body (de-chunked).
    pub body: Vec<u8>,
    /// When the request was completely read.
    pub at: Instant,
}

impl RecordedRequest {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }

    /// Whether the body asks for `stream_options.include_usage = true`.
    pub fn wants_usage(&self) -> bool {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|b| b.pointer("/stream_options/include_usage").cloned())
            == Some(Value::Bool(true))
    }
}

/// One step of a scripted SSE answer.
#[derive(Clone, Debug)]
pub enum Step {
    /// `data: <json>\n\n` (a chat chunk gets `"usage": null` added when the request asked
    /// for usage, as OpenAI does).
    Event(Value),
    /// Bytes written verbatim (comments, malformed events, odd framing).
    Raw(String),
    /// A pause.
    Sleep(Duration),
    /// Waits until the test calls `notify_one` (coordination without timing guesses).
    WaitFor(Arc<Notify>),
    /// Tells the test this point was reached.
    Notify(Arc<Notify>),
}

/// How a scripted stream ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `data: [DONE]`, then the chunked terminator (a complete, well-formed answer).
    Done,
    /// The chunked terminator without `data: [DONE]`: HTTP-complete, SSE-truncated.
    NoDone,
    /// The connection is closed with neither `[DONE]` nor the chunked terminator: the client
    /// sees the body break.
    Cut,
}

/// A scripted `text/event-stream` answer in OpenAI's `chat.completion.chunk` format.
#[derive(Clone, Debug)]
pub struct StreamScript {
    id: String,
    model: String,
    steps: Vec<Step>,
    usage: Option<Value>,
    ending: Ending,
}

impl StreamScript {
    /// An empty stream answering as `model`.
    pub fn new(model: &str) -> Self {
        Self {
            id: "chatcmpl-fake0000000000000000000000001".into(),
            model: model.into(),
            steps: Vec::new(),
            usage: None,
            ending: Ending::Done,
        }
    }

    /// OpenAI's usual shape: a role chunk, one chunk per piece, a `stop` chunk.
    pub fn chat(model: &str, pieces: &[&str]) -> Self {
        let mut s = Self::new(model).role();
        for p in pieces {
            s = s.content(p);
        }
        s.finish("stop")
    }

    /// The first chunk: `delta: {role: assistant, content: ""}`.
    pub fn role(self) -> Self {
        let chunk = self.chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        );
        self.step(Step::Event(chunk))
    }

    /// A content delta.
    pub fn content(self, text: &str) -> Self {
        let chunk = self.chunk(json!({ "content": text }), None);
        self.step(Step::Event(chunk))
    }

    /// The last choice chunk: empty delta and `finish_reason`.
    pub fn finish(self, reason: &str) -> Self {
        let chunk = self.chunk(json!({}), Some(reason));
        self.step(Step::Event(chunk))
    }

    /// Any step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// A pause.
    pub fn sleep(self, d: Duration) -> Self {
        self.step(Step::Sleep(d))
    }

    /// Waits for the test's `notify_one`.
    pub fn wait_for(self, n: &Arc<Notify>) -> Self {
        self.step(Step::WaitFor(n.clone()))
    }

    /// Signals the test.
    pub fn notify(self, n: &Arc<Notify>) -> Self {
        self.step(Step::Notify(n.clone()))
    }

    /// Usage for the final `"choices": []` chunk, sent (after the other steps) only when the
    /// request has `stream_options.include_usage = true`, as OpenAI does.
    pub fn usage(mut self, prompt: i64, completion: i64) -> Self {
        self.usage = Some(usage_json(prompt, completion));
        self
    }

    /// How the stream ends (default [`Ending::Done`]).
    pub fn ending(mut self, ending: Ending) -> Self {
        self.ending = ending;
        self
    }

    /// A `chat.completion.chunk` of this stream.
    pub fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake0001",
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        })
    }

    fn usage_chunk(&self, usage: &Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake0001",
            "choices": [],
            "usage": usage,
        })
    }
}

/// OpenAI's `usage` object.
pub fn usage_json(prompt: i64, completion: i64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

#[derive(Clone, Debug)]
enum Kind {
    Body {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
    Stream(StreamScript),
    /// Reads the request, never answers.
    Hang,
    /// Reads the request, then resets the connection (RST).
    Reset,
    /// Sends the headers of a JSON answer, then never sends its body.
    StallBody {
        status: u16,
    },
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    kind: Kind,
    delay: Duration,
    headers: Vec<(String, String)>,
}

impl Reply {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            delay: Duration::ZERO,
            headers: Vec::new(),
        }
    }

    /// A `chat.completion` with one `stop` choice saying `content`, and usage.
    pub fn chat(model: &str, content: &str, prompt_tokens: i64, completion_tokens: i64) -> Self {
        Self::json(
            200,
            chat_completion(model, content, prompt_tokens, completion_tokens),
        )
    }

    /// A JSON body.
    pub fn json(status: u16, body: Value) -> Self {
        Self::raw(status, "application/json", body.to_string())
    }

    /// OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.
    pub fn error(status: u16, kind: &str, message: &str) -> Self {
        Self::json(
            status,
            json!({"error": {"message": message, "type": kind, "param": null, "code": kind}}),
        )
    }

    /// Any body, sent exactly as given.
    pub fn raw(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self::new(Kind::Body {
            status,
            content_type: content_type.into(),
            body: body.into(),
        })
    }

    /// A 200 `text/event-stream` answer.
    pub fn stream(script: StreamScript) -> Self {
        Self::new(Kind::Stream(script))
    }

    /// Reads the request and never answers (the connection stays open).
    pub fn hang() -> Self {
        Self::new(Kind::Hang)
    }

    /// Reads the request, then resets the connection (`SO_LINGER 0`, so the peer gets an RST).
    pub fn reset() -> Self {
        Self::new(Kind::Reset)
    }

    /// Sends the status line and headers (with a `content-length`), then nothing more.
    pub fn stall_body(status: u16) -> Self {
        Self::new(Kind::StallBody { status })
    }

    /// An extra response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Waits this long before sending anything.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

/// A `chat.completion` body as OpenAI sends it.
pub fn chat_completion(model: &str, content: &str, prompt: i64, completion: i64) -> Value {
    json!({
        "id": "chatcmpl-fake0000000000000000000000000",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": usage_json(prompt, completion),
        "service_tier": "default",
        "system_fingerprint": "fp_fake0001"
    })
}

/// Chooses the reply from the request and its index (see [`FakeUpstream::start_with`]).
pub type Responder = Arc<dyn Fn(&RecordedRequest, usize) -> Reply + Send + Sync>;

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    exchanges: Mutex<Vec<Exchange>>,
    /// When set, replaces the script.
    responder: Option<Responder>,
}

#[derive(Clone)]
struct Exchange {
    request: RecordedRequest,
    sent_events: Vec<Value>,
}

/// A running fake upstream; stops (and drops every open connection) when dropped.
pub struct FakeUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    /// Starts answering with `script`, one reply per request, in order.
    pub async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            exchanges: Mutex::default(),
            responder: None,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Self { addr, shared, task }
    }

    /// Starts answering each request with `respond(request, index)` instead of a script: for
    /// concurrent traffic, whose arrival order (and so the order of a script) is not known.
    pub async fn start_with(
        respond: impl Fn(&RecordedRequest, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            responder: Some(Arc::new(respond)),
            ..Shared::default()
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Self { addr, shared, task }
    }

    /// The API base for a client: `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let exchanges = self.shared.exchanges.lock().unwrap();
        exchanges.iter().map(|e| e.request.clone()).collect()
    }

    /// The SSE events (parsed `data:` JSON) sent so far in answer to request `index` (each is
    /// recorded just before it is written, so it is here by the time the client can see it).
    pub fn sent_events(&self, index: usize) -> Vec<Value> {
        let exchanges = self.shared.exchanges.lock().unwrap();
        exchanges
            .get(index)
            .map(|e| e.sent_events.clone())
            .unwrap_or_default()
    }

    /// Appends replies to the script.
    pub fn push(&self, reply: Reply) {
        self.shared.script.lock().unwrap().push_back(reply);
    }

    /// Replies not yet used.
    pub fn remaining(&self) -> usize {
        self.shared.script.lock().unwrap().len()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Connection tasks live in the set, so aborting this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// What the connection does after a reply.
enum After {
    KeepAlive,
    Close,
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let Ok(Some(request)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let index = {
            let mut exchanges = shared.exchanges.lock().unwrap();
            exchanges.push(Exchange {
                request: request.clone(),
                sent_events: Vec::new(),
            });
            exchanges.len() - 1
        };
        let reply = match &shared.responder {
            Some(respond) => Some(respond(&request, index)),
            None => shared.script.lock().unwrap().pop_front(),
        };
        let reply = reply.unwrap_or_else(|| Reply::error(500, "server_error", EXHAUSTED));
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        match answer(&mut stream, &request, reply, &shared, index).await {
            Ok(After::KeepAlive) if !close => {}
            _ => return,
        }
    }
}

async fn answer(
    stream: &mut TcpStream,
    request: &RecordedRequest,
    reply: Reply,
    shared: &Shared,
    index: usize,
) -> std::io::Result<After> {
    let extra: String = reply
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    match reply.kind {
        Kind::Body {
            status,
            content_type,
            body,
        } => {
            let head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
                 x-request-id: fake-{index}\r\n{extra}\r\n",
                reason(status),
                body.len()
            );
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&body).await?;
            stream.flush().await?;
            Ok(After::KeepAlive)
        }
        Kind::Hang => {
            std::future::pending::<()>().await;
            Ok(After::Close)
        }
        Kind::Reset => {
            stream.set_zero_linger()?;
            Ok(After::Close)
        }
        Kind::StallBody { status } => {
            let head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\
                 {extra}\r\n",
                reason(status)
            );
            stream.write_all(head.as_bytes()).await?;
            stream.flush().await?;
            std::future::pending::<()>().await;
            Ok(After::Close)
        }
        Kind::Stream(script) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
                 cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\
                 x-request-id: fake-{index}\r\n{extra}\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            stream.flush().await?;
            let with_usage = request.wants_usage();
            for step in &script.steps {
                match step {
                    Step::Event(event) => {
                        let mut event = event.clone();
                        if with_usage
                            && event["object"] == "chat.completion.chunk"
                            && let Value::Object(map) = &mut event
                        {
                            map.entry("usage").or_insert(Value::Null);
                        }
                        send_event(stream, shared, index, event).await?;
                    }
                    Step::Raw(text) => write_chunk(stream, text.as_bytes()).await?,
                    Step::Sleep(d) => tokio::time::sleep(*d).await,
                    Step::WaitFor(n) => n.notified().await,
                    Step::Notify(n) => n.notify_one(),
                }
            }
            if with_usage && let Some(usage) = &script.usage {
                let chunk = script.usage_chunk(usage);
                send_event(stream, shared, index, chunk).await?;
            }
            match script.ending {
                Ending::Done => {
                    write_chunk(stream, b"data: [DONE]\n\n").await?;
                    stream.write_all(b"0\r\n\r\n").await?;
                    stream.flush().await?;
                    Ok(After::KeepAlive)
                }
                Ending::NoDone => {
                    stream.write_all(b"0\r\n\r\n").await?;
                    stream.flush().await?;
                    Ok(After::KeepAlive)
                }
                Ending::Cut => Ok(After::Close),
            }
        }
    }
}

async fn send_event(
    stream: &mut TcpStream,
    shared: &Shared,
    index: usize,
    event: Value,
) -> std::io::Result<()> {
    let frame = format!("data: {event}\n\n");
    // Recorded before it is written: once the client holds an event, so does the record.
    shared.exchanges.lock().unwrap()[index]
        .sent_events
        .push(event);
    write_chunk(stream, frame.as_bytes()).await
}

/// One HTTP/1.1 chunk, flushed at once (so each event leaves immediately).
async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\r\n");
    stream.write_all(&frame).await?;
    stream.flush().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

// --- A minimal HTTP/1.1 request reader (Content-Length or chunked bodies, keep-alive). ---

/// Reads one request; `None` when the peer closed the connection between requests.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<RecordedRequest>> {
    let head_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos;
        }
        if !fill(stream, buf).await? {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if get("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let chunked =
        get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(stream, buf).await?
    } else {
        let len: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            if !fill(stream, buf).await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        buf.drain(..len).collect()
    };
    Ok(Some(RecordedRequest {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    }))
}

async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(stream, buf).await?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(stream, buf).await?.is_empty() {}
            return Ok(body);
        }
        while buf.len() < size + 2 {
            if !fill(stream, buf).await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<String> {
    loop {
        if let Some(pos) = find(buf, b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
            buf.drain(..pos + 2);
            return Ok(line);
        }
        if !fill(stream, buf).await? {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Reads more bytes into `buf`; false at end of stream.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut tmp = [0u8; 16 * 1024];
    let n = stream.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n > 0)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
