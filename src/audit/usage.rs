//! Usage extraction from OpenAI-compatible answers: JSON bodies and SSE streams.
//!
//! Providers differ in what they send (OpenAI's `prompt_tokens_details.cached_tokens`,
//! DeepSeek's `prompt_cache_hit_tokens`, the Responses API's `input_tokens`, vLLM's `null`
//! details), so every field is optional and a malformed usage block never hides the rest of the
//! answer: it is reported in [`ResponseSummary::usage_error`] and the counts are estimated.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Number, Value};

/// Token counts of one call. Cached tokens are part of `input`, reasoning tokens of `output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens, cached included.
    pub input: i64,
    /// Output (completion) tokens, reasoning included.
    pub output: i64,
    /// Total as reported (or input + output).
    pub total: i64,
    /// Input tokens read from the provider's cache.
    pub cached: i64,
    /// Output tokens spent on reasoning.
    pub reasoning: i64,
}

/// A malformed answer or usage block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// The body is not JSON (or not UTF-8).
    #[error("response is not valid JSON: {0}")]
    NotJson(String),
    /// A token count is negative, fractional or too large.
    #[error("invalid token count in `{field}`: {value}")]
    BadCount {
        /// The usage field.
        field: &'static str,
        /// What was sent.
        value: String,
    },
}

/// What the recorder needs from an answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResponseSummary {
    /// Provider's response id.
    pub id: Option<String>,
    /// Model that answered.
    pub model: Option<String>,
    /// Finish reasons of the choices (or the Responses API status).
    pub finish_reasons: Vec<String>,
    /// Reported usage, if any arrived and was valid.
    pub usage: Option<Usage>,
    /// Why a usage block that did arrive was rejected.
    pub usage_error: Option<String>,
    /// The answer's text, for the preview and for estimating output tokens.
    pub text: String,
    /// Reasoning text (`reasoning_content`): output tokens to estimate, but not the answer.
    pub reasoning_text: String,
    /// An error object sent by the upstream (`{"error":{"message":…}}`).
    pub error_message: Option<String>,
    /// Events that could not be parsed (SSE only).
    pub bad_events: u32,
}

/// Longest answer text kept for estimation; beyond it tokens are estimated from the length.
const MAX_TEXT_BYTES: usize = 4 << 20;

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawUsage {
    prompt_tokens: Option<Number>,
    completion_tokens: Option<Number>,
    total_tokens: Option<Number>,
    input_tokens: Option<Number>,
    output_tokens: Option<Number>,
    prompt_tokens_details: Option<MapOnly<RawPromptDetails>>,
    input_tokens_details: Option<MapOnly<RawPromptDetails>>,
    completion_tokens_details: Option<MapOnly<RawCompletionDetails>>,
    output_tokens_details: Option<MapOnly<RawCompletionDetails>>,
    prompt_cache_hit_tokens: Option<Number>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawPromptDetails {
    cached_tokens: Option<Number>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCompletionDetails {
    reasoning_tokens: Option<Number>,
}

/// A struct that must be a JSON object: serde's derive would also read one from an array,
/// positionally, and `[1, 2, 3]` is not a usage block.
pub(crate) struct MapOnly<T>(pub(crate) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for MapOnly<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = MapOnly<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(MapOnly)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// A JSON string borrowed from the input when it has no escapes (most ids, models and stream
/// deltas), owned otherwise: a stream chunk is read without allocating for its strings.
#[derive(Default)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl Text<'_> {
    fn into_string(self) -> String {
        self.0.into_owned()
    }
}

/// Message content: a string, or a list of parts whose `text` is kept. Read without building
/// a `serde_json::Value` (this runs for every answer and every stream chunk).
#[derive(Default)]
struct Content<'a>(Cow<'a, str>);

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContentPart<'a> {
    #[serde(borrow)]
    text: Option<Text<'a>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("message content")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Content<'de>, E> {
                Ok(Content(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Content<'de>, E> {
                Ok(Content(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Content<'de>, E> {
                Ok(Content(Cow::Owned(v)))
            }
            fn visit_unit<E>(self) -> Result<Content<'de>, E> {
                Ok(Content::default())
            }
            fn visit_none<E>(self) -> Result<Content<'de>, E> {
                Ok(Content::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Content<'de>, E> {
                Ok(Content::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Content<'de>, E> {
                Ok(Content::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Content<'de>, E> {
                Ok(Content::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Content<'de>, E> {
                Ok(Content::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Content<'de>, A::Error> {
                let parts = Vec::<ContentPart<'de>>::deserialize(SeqAccessDeserializer::new(seq))?;
                let text: String = parts
                    .iter()
                    .filter_map(|p| p.text.as_ref())
                    .map(|t| &*t.0)
                    .collect();
                Ok(Content(Cow::Owned(text)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Content<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Content::default())
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawMessage<'a> {
    #[serde(borrow)]
    content: Option<Content<'a>>,
    #[serde(borrow)]
    reasoning_content: Option<Text<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawChoice<'a> {
    #[serde(borrow)]
    message: Option<RawMessage<'a>>,
    #[serde(borrow)]
    delta: Option<RawMessage<'a>>,
    #[serde(borrow)]
    text: Option<Text<'a>>,
    #[serde(borrow)]
    finish_reason: Option<Text<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawError {
    message: Option<String>,
}

/// Chat/completions/embeddings bodies, chat chunks, Responses objects and Responses events.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawAnswer<'a> {
    #[serde(borrow)]
    id: Option<Text<'a>>,
    #[serde(borrow)]
    model: Option<Text<'a>>,
    #[serde(borrow)]
    choices: Option<Vec<RawChoice<'a>>>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
    // Responses API
    #[serde(rename = "type", borrow)]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    status: Option<Text<'a>>,
    output: Option<Vec<Value>>,
    delta: Option<Value>,
    #[serde(borrow)]
    response: Option<Box<RawAnswer<'a>>>,
}

/// Parses a non-streaming JSON answer.
pub fn parse_json_response(body: &[u8]) -> Result<ResponseSummary, UsageError> {
    let raw =
        super::parse_json::<RawAnswer>(body).map_err(|e| UsageError::NotJson(e.to_string()))?;
    let mut summary = ResponseSummary::default();
    absorb(&mut summary, raw);
    Ok(summary)
}

fn absorb(summary: &mut ResponseSummary, raw: RawAnswer<'_>) {
    // Ids and model are copied once per answer, not once per stream chunk.
    if summary.id.is_none() {
        summary.id = raw.id.map(Text::into_string);
    }
    if summary.model.is_none() {
        summary.model = raw.model.map(Text::into_string);
    }
    if let Some(err) = raw.error.filter(|e| e.get() != "null") {
        summary.error_message = Some(error_text(err.get()));
    }
    for choice in raw.choices.unwrap_or_default() {
        for msg in [choice.message, choice.delta].into_iter().flatten() {
            if let Some(reasoning) = msg.reasoning_content {
                push_text(&mut summary.reasoning_text, &reasoning.0);
            }
            if let Some(Content(text)) = msg.content {
                push_text(&mut summary.text, &text);
            }
        }
        if let Some(t) = choice.text {
            push_text(&mut summary.text, &t.0);
        }
        if let Some(reason) = choice.finish_reason {
            summary.finish_reasons.push(reason.into_string());
        }
    }
    // Responses API: a whole response object, or stream events.
    for item in raw.output.unwrap_or_default() {
        for part in item
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(t) = part.get("text").and_then(Value::as_str) {
                push_text(&mut summary.text, t);
            }
        }
    }
    if raw.kind.as_ref().map(|k| &*k.0) == Some("response.output_text.delta")
        && let Some(Value::String(d)) = &raw.delta
    {
        push_text(&mut summary.text, d);
    }
    if let Some(status) = raw
        .status
        .filter(|_| raw.kind.is_none() || raw.response.is_some())
    {
        summary.finish_reasons = vec![status.into_string()];
    }
    if let Some(inner) = raw.response {
        // `response.completed` carries the final object, usage included; its text was already
        // streamed as deltas, so keep only ids, status and usage.
        let text = std::mem::take(&mut summary.text);
        absorb(summary, *inner);
        summary.text = text;
    }
    if let Some(usage) = raw.usage.filter(|u| u.get() != "null") {
        match usage_from_raw(usage.get()) {
            Ok(u) => {
                summary.usage = Some(u);
                summary.usage_error = None;
            }
            Err(e) => summary.usage_error = Some(e.to_string()),
        }
    }
}

fn error_text(err: &str) -> String {
    if let Ok(text) = serde_json::from_str::<String>(err) {
        return text;
    }
    serde_json::from_str::<RawError>(err)
        .ok()
        .and_then(|e| e.message)
        .unwrap_or_else(|| err.to_owned())
}

fn push_text(text: &mut String, piece: &str) {
    if text.len() + piece.len() <= MAX_TEXT_BYTES {
        text.push_str(piece);
    }
}

/// More tokens than any call reads or writes (the largest context windows hold ~1e7).
const MAX_TOKENS: i64 = 1 << 32;

fn count(field: &'static str, n: Option<Number>) -> Result<i64, UsageError> {
    match n {
        None => Ok(0),
        Some(n) => match n.as_i64() {
            Some(v) if (0..=MAX_TOKENS).contains(&v) => Ok(v),
            _ => Err(UsageError::BadCount {
                field,
                value: n.to_string(),
            }),
        },
    }
}

fn usage_from_raw(raw: &str) -> Result<Usage, UsageError> {
    let MapOnly(raw) =
        serde_json::from_str::<MapOnly<RawUsage>>(raw).map_err(|e| UsageError::BadCount {
            field: "usage",
            value: format!("{e}: {}", raw.chars().take(100).collect::<String>()),
        })?;
    let input = count("prompt_tokens", raw.prompt_tokens.or(raw.input_tokens))?;
    let output = count(
        "completion_tokens",
        raw.completion_tokens.or(raw.output_tokens),
    )?;
    let total = count("total_tokens", raw.total_tokens)?;
    let cached_details = raw
        .prompt_tokens_details
        .or(raw.input_tokens_details)
        .and_then(|d| d.0.cached_tokens);
    let cached = count(
        "cached_tokens",
        cached_details.or(raw.prompt_cache_hit_tokens),
    )?;
    let reasoning = count(
        "reasoning_tokens",
        raw.completion_tokens_details
            .or(raw.output_tokens_details)
            .and_then(|d| d.0.reasoning_tokens),
    )?;
    let total = if total == 0 {
        input.saturating_add(output)
    } else {
        total
    };
    // Gemini's OpenAI-compatible endpoint leaves thinking out of `completion_tokens` and counts
    // it only in `total_tokens`; Google bills it as output.
    let (output, reasoning) = match total.checked_sub(input.saturating_add(output)) {
        Some(hidden) if hidden > 0 && reasoning == 0 => (output + hidden, hidden),
        _ => (output, reasoning),
    };
    Ok(Usage {
        input,
        output,
        total,
        // A provider cannot serve more from cache than it read, nor reason more than it wrote.
        cached: cached.min(input),
        reasoning: reasoning.min(output),
    })
}

/// Incremental scanner of an SSE answer: feed bytes as they pass, read the summary at the end.
///
/// Bytes are never held back; only an unfinished line is buffered until its end arrives.
#[derive(Debug, Default)]
pub struct SseScanner {
    line: Vec<u8>,
    data: Vec<u8>,
    summary: ResponseSummary,
    done: bool,
    events: u64,
    keep_events: bool,
    kept: Vec<Vec<u8>>,
}

impl SseScanner {
    /// A scanner with nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes a chunk of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(pos) = memchr::memchr(b'\n', bytes) {
            let (head, rest) = bytes.split_at(pos);
            bytes = &rest[1..];
            if self.line.is_empty() {
                self.on_line(head);
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.on_line(&line);
            }
        }
        self.line.extend_from_slice(bytes);
    }

    /// A scanner that also keeps each event's `data` for [`take_events`](Self::take_events)
    /// (for front doors that hand parsed chunks to their caller).
    pub fn keeping_events() -> Self {
        Self {
            keep_events: true,
            ..Self::default()
        }
    }

    /// The `data` of events completed since the last call (`[DONE]` excluded).
    pub fn take_events(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.kept)
    }

    /// `data: [DONE]` was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Complete `data:` events seen so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// What the stream said, including a last event not followed by a blank line.
    pub fn finish(mut self) -> ResponseSummary {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line);
        }
        self.dispatch();
        self.summary
    }

    /// The summary so far (e.g. when the client went away mid-stream).
    pub fn summary(&self) -> &ResponseSummary {
        &self.summary
    }

    fn on_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch();
        } else if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if !self.data.is_empty() {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
        }
        // `event:`, `id:`, `retry:` and `:` comments carry nothing we record.
    }

    fn dispatch(&mut self) {
        if self.data.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.data);
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        self.events += 1;
        match super::parse_json::<RawAnswer>(&data) {
            Ok(raw) => absorb(&mut self.summary, raw),
            Err(_) => self.summary.bad_events += 1,
        }
        if self.keep_events {
            self.kept.push(data);
        } else {
            self.data = data;
            self.data.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_anywhere_gives_same_summary() {
        let stream = b"data: {\"id\":\"c1\",\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\r\n\r\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
data: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut s = SseScanner::new();
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            assert!(s.is_done());
            let sum = s.finish();
            assert_eq!(sum.text, "Hello");
            assert_eq!(sum.finish_reasons, vec!["stop".to_owned()]);
            assert_eq!(sum.usage.map(|u| u.total), Some(7));
        }
    }

    #[test]
    fn bad_counts_are_reported_not_used() {
        for usage in [
            "{\"prompt_tokens\":-1}",
            "{\"prompt_tokens\":1.5}",
            "{\"prompt_tokens\":1e400}",
            "{\"prompt_tokens\":99999999999999999999999}",
            "{\"prompt_tokens\":\"12\"}",
        ] {
            let body = format!("{{\"choices\":[],\"usage\":{usage}}}");
            let sum = parse_json_response(body.as_bytes());
            match sum {
                Ok(sum) => {
                    assert!(sum.usage.is_none(), "{usage}");
                    assert!(sum.usage_error.is_some(), "{usage}");
                }
                // 1e400 is out of f64 range: serde_json rejects the whole body.
                Err(UsageError::NotJson(_)) => assert!(usage.contains("e400")),
                Err(e) => panic!("{usage}: {e}"),
            }
        }
    }

    #[test]
    fn invalid_utf8_in_stream_is_counted() {
        let mut s = SseScanner::new();
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n");
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\n");
        let sum = s.finish();
        assert_eq!(sum.bad_events, 1);
        assert_eq!(sum.text, "ok");
    }

    #[test]
    fn escaped_and_plain_strings_read_alike() {
        // Strings with escapes cannot be borrowed from the body; they must read the same.
        let body = br#"{"id":"c\u0031","model":"m\/1","choices":[
            {"message":{"content":[{"type":"text","text":"a\"b"},{"type":"text","text":"c"}],
             "reasoning_content":"r\nr"},"finish_reason":"st\u006fp"},
            {"message":{"content":"plain"},"finish_reason":"length"}],
            "usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
        let sum = parse_json_response(body).unwrap();
        assert_eq!(sum.id.as_deref(), Some("c1"));
        assert_eq!(sum.model.as_deref(), Some("m/1"));
        assert_eq!(sum.text, "a\"bcplain");
        assert_eq!(sum.reasoning_text, "r\nr");
        assert_eq!(
            sum.finish_reasons,
            vec!["stop".to_owned(), "length".to_owned()]
        );
        assert_eq!(sum.usage.map(|u| u.total), Some(3));
        let mut s = SseScanner::new();
        s.feed(br#"data: {"id":"\u0063","choices":[{"delta":{"content":"x\ty"}}]}"#);
        s.feed(b"\n\n");
        let sum = s.finish();
        assert_eq!(sum.id.as_deref(), Some("c"));
        assert_eq!(sum.text, "x\ty");
    }
}
