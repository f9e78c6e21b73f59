//! Token estimation with a real tokenizer (`o200k_base`, GPT-4o/4.1's encoding), used only when
//! a provider sent no usage (client disconnect, provider ignoring `include_usage`).
//!
//! The encoder costs ~120 ms and ~44 MB to build, so it is built on first use: a proxy whose
//! providers always report usage never pays for it.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

static ENCODER: OnceLock<Option<CoreBPE>> = OnceLock::new();

/// Tokens per message of chat framing (role, separators), as in OpenAI's cookbook.
const TOKENS_PER_MESSAGE: i64 = 3;
/// Tokens that prime the assistant's reply.
const REPLY_PRIMING: i64 = 3;

fn encoder() -> Option<&'static CoreBPE> {
    ENCODER
        .get_or_init(|| tiktoken_rs::o200k_base().ok())
        .as_ref()
}

/// Tokens in `text`. Falls back to ~4 bytes a token if the encoder could not be built.
pub fn count_text(text: &str) -> i64 {
    if text.is_empty() {
        return 0;
    }
    match encoder() {
        Some(bpe) => i64::try_from(bpe.encode_ordinary(text).len()).unwrap_or(i64::MAX),
        None => i64::try_from(text.len().div_ceil(4)).unwrap_or(i64::MAX),
    }
}

/// Input tokens of a request's prompt: `messages` (chat), or `input`/`prompt` (string or list).
pub fn count_prompt(prompt: &Value) -> i64 {
    match prompt {
        Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => {
            let per_message: i64 = items
                .iter()
                .map(|m| {
                    let content = m.get("content").map(count_value).unwrap_or(0);
                    let name = m.get("name").map(count_value).unwrap_or(0);
                    TOKENS_PER_MESSAGE + content + name
                })
                .sum();
            per_message + REPLY_PRIMING
        }
        other => count_value(other),
    }
}

/// Tokens of any JSON value's text: strings, and the `text` of content parts.
fn count_value(value: &Value) -> i64 {
    match value {
        Value::String(s) => count_text(s),
        Value::Array(items) => items.iter().map(count_value).sum(),
        Value::Object(map) => map
            .get("text")
            .or_else(|| map.get("content"))
            .map(count_value)
            .unwrap_or(0),
        // Token id arrays (legacy completions) count one token each.
        Value::Number(_) => 1,
        Value::Null | Value::Bool(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_with_the_real_tokenizer() {
        // o200k_base: "hello world" is two tokens.
        assert_eq!(count_text("hello world"), 2);
        let prompt = json!([{"role": "user", "content": "hello world"}]);
        assert_eq!(count_prompt(&prompt), 3 + 2 + 3);
        assert_eq!(count_prompt(&json!("hello world")), 2);
        assert_eq!(count_prompt(&json!([1, 2, 3])), 3);
    }
}
