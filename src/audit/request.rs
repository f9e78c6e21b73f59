//! What the audit needs from a request body: model, stream flag, user, sampling parameters and
//! the prompt (hashed for duplicate detection, kept for estimation when usage never arrives).

use serde::Deserialize;
use serde_json::Value;
use serde_json::error::Category;

use super::canonical::request_hash;
use super::record::Operation;
use super::usage::MapOnly;
use crate::config::Secret;

/// A request body the audit cannot accept. Each maps to a 400 in OpenAI's error shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, or not UTF-8.
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("request body must be a JSON object")]
    NotObject,
    /// No `model` string.
    #[error("you must provide a model parameter")]
    MissingModel,
    /// No `messages` (chat), `prompt` (completions) or `input` (embeddings, responses).
    #[error("missing required parameter: '{0}'")]
    MissingPrompt(&'static str),
    /// A field of the wrong type.
    #[error("invalid type for '{0}'")]
    InvalidField(&'static str),
}

impl RequestError {
    /// OpenAI's `code` for this error (also a bounded metric label).
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::NotJson(_) | RequestError::NotObject => "invalid_json",
            RequestError::MissingModel | RequestError::MissingPrompt(_) => {
                "missing_required_parameter"
            }
            RequestError::InvalidField(_) => "invalid_type",
        }
    }
}

/// The audited parts of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedRequest {
    /// Which API.
    pub operation: Operation,
    /// Requested model.
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// The client asked for `stream_options.include_usage` itself.
    pub include_usage: bool,
    /// Body `user` or `safety_identifier`.
    pub user: Option<String>,
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
    pub max_tokens: Option<i64>,
    /// `temperature`.
    pub temperature: Option<f64>,
    /// `messages`, `prompt` or `input`.
    pub prompt: Value,
    /// Hash of the canonical prompt.
    pub request_hash: String,
}

/// The top-level fields the audit reads. Everything else (tools, response formats, …) is
/// skipped by the parser without building values for it.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRequest {
    model: Option<Value>,
    messages: Option<Value>,
    prompt: Option<Value>,
    input: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    user: Option<Value>,
    safety_identifier: Option<Value>,
    max_completion_tokens: Option<Value>,
    max_tokens: Option<Value>,
    max_output_tokens: Option<Value>,
    temperature: Option<Value>,
}

impl ParsedRequest {
    /// Parses a raw body.
    pub fn from_slice(
        operation: Operation,
        body: &[u8],
        hash_key: Option<&Secret>,
    ) -> Result<Self, RequestError> {
        let MapOnly(raw) = super::parse_json::<MapOnly<RawRequest>>(body).map_err(|e| {
            if e.classify() == Category::Data && !e.to_string().contains("duplicate field") {
                RequestError::NotObject
            } else {
                RequestError::NotJson(e.to_string())
            }
        })?;
        Self::from_raw(operation, raw, hash_key)
    }

    /// Parses a body already decoded as JSON.
    pub fn from_value(
        operation: Operation,
        value: Value,
        hash_key: Option<&Secret>,
    ) -> Result<Self, RequestError> {
        if !value.is_object() {
            return Err(RequestError::NotObject);
        }
        let raw = serde_json::from_value::<RawRequest>(value)
            .map_err(|e| RequestError::NotJson(e.to_string()))?;
        Self::from_raw(operation, raw, hash_key)
    }

    fn from_raw(
        operation: Operation,
        mut raw: RawRequest,
        hash_key: Option<&Secret>,
    ) -> Result<Self, RequestError> {
        let model = match raw.model.take() {
            Some(Value::String(m)) if !m.is_empty() => m,
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(RequestError::MissingModel);
            }
            Some(_) => return Err(RequestError::InvalidField("model")),
        };
        let (prompt_key, prompt) = match operation {
            Operation::Chat => ("messages", raw.messages.take()),
            Operation::TextCompletion => ("prompt", raw.prompt.take()),
            Operation::Embeddings | Operation::Responses => ("input", raw.input.take()),
        };
        let prompt = match prompt {
            None | Some(Value::Null) => return Err(RequestError::MissingPrompt(prompt_key)),
            Some(p @ Value::Array(_)) => p,
            Some(p @ Value::String(_)) if operation != Operation::Chat => p,
            Some(_) => return Err(RequestError::InvalidField(prompt_key)),
        };
        let stream = match raw.stream {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err(RequestError::InvalidField("stream")),
        };
        let include_usage = raw
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let user = [raw.user, raw.safety_identifier]
            .into_iter()
            .flatten()
            .find_map(|v| match v {
                Value::String(s) if !s.is_empty() => Some(s),
                _ => None,
            });
        let max_tokens = [
            raw.max_completion_tokens,
            raw.max_tokens,
            raw.max_output_tokens,
        ]
        .iter()
        .flatten()
        .find_map(Value::as_i64);
        let temperature = raw.temperature.as_ref().and_then(Value::as_f64);
        let request_hash = request_hash(&prompt, hash_key);
        Ok(Self {
            operation,
            model,
            stream,
            include_usage,
            user,
            max_tokens,
            temperature,
            prompt,
            request_hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_chat() {
        let body = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "user": "u1", "max_tokens": 5, "temperature": 0.7});
        let p = ParsedRequest::from_value(Operation::Chat, body, None).unwrap();
        assert_eq!(p.model, "gpt-4.1");
        assert!(p.stream && !p.include_usage);
        assert_eq!(p.user.as_deref(), Some("u1"));
        assert_eq!((p.max_tokens, p.temperature), (Some(5), Some(0.7)));
        assert_eq!(p.request_hash.len(), 64);
    }

    #[test]
    fn rejects_bad_bodies() {
        let cases: [(&[u8], RequestError); 6] = [
            (b"not json", RequestError::NotJson(String::new())),
            (b"[1]", RequestError::NotObject),
            (b"{\"messages\":[]}", RequestError::MissingModel),
            (
                b"{\"model\":\"m\"}",
                RequestError::MissingPrompt("messages"),
            ),
            (
                b"{\"model\":5,\"messages\":[]}",
                RequestError::InvalidField("model"),
            ),
            (
                b"{\"model\":\"m\",\"messages\":\"hi\"}",
                RequestError::InvalidField("messages"),
            ),
        ];
        for (body, want) in cases {
            let got = ParsedRequest::from_slice(Operation::Chat, body, None).unwrap_err();
            assert_eq!(std::mem::discriminant(&got), std::mem::discriminant(&want));
        }
        // Huge numbers and invalid UTF-8 are errors, not panics.
        let huge = b"{\"model\":\"m\",\"messages\":[],\"max_tokens\":1e999}";
        assert!(ParsedRequest::from_slice(Operation::Chat, huge, None).is_err());
        let bad_utf8 = b"{\"model\":\"m\xff\",\"messages\":[]}";
        assert!(ParsedRequest::from_slice(Operation::Chat, bad_utf8, None).is_err());
    }
}
