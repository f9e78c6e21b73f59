#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Usage extraction and pricing (DESIGN §3, §7) over answers as providers really send them
//! (`tests/fixtures/`), priced through the real recorder and read back from SQLite. Expected
//! costs are computed here from the seed's price table, independently of `src/`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use llm_audit::audit::usage::{SseScanner, parse_json_response};
use llm_audit::audit::{
    CallEnd, CallStart, CostStatus, Emitted, Operation, ParsedRequest, PriceTable, ResponseSummary,
    Usage, UsageError, UsageSource,
};
use llm_audit::config::PricingConfig;
use llm_audit::store::chain;
use proptest::prelude::*;
use rusqlite::Connection;
use serde_json::{Value, json};

/// The seed's table in picodollars per token (USD per 1M tokens × 1e6): (model, input, output).
const SEED: [(&str, u64, u64); 7] = [
    ("gpt-4.1", 8_000_000, 32_000_000),
    ("gpt-4.1-mini", 1_500_000, 6_000_000),
    ("claude-sonnet-4-20250514", 15_000_000, 75_000_000),
    ("claude-3-5-sonnet-20241022", 3_000_000, 15_000_000),
    ("gemini-2.5-flash", 2_500_000, 10_000_000),
    ("deepseek-chat", 420_000, 1_680_000),
    ("deepseek-coder", 550_000, 2_190_000),
];
/// The seed's rate for unknown models: 10 / 30 USD per 1M tokens.
const FALLBACK: (u64, u64) = (10_000_000, 30_000_000);

const SYSTEM: &str = "You are a security analyst. Answer briefly.";
const QUESTION: &str =
    "Three failed logins for svc-backup from 10.0.4.17 overnight. What happened?";

fn seed_price(model: &str) -> Option<(u64, u64)> {
    SEED.iter()
        .find(|(m, _, _)| *m == model)
        .map(|(_, i, o)| (*i, *o))
}

/// Exact cost: uncached input at the input price, cached input at the cache price (the input
/// price when there is none), output (reasoning included) at the output price.
fn pico(price: (u64, u64), cache: Option<u64>, input: i64, cached: i64, output: i64) -> i64 {
    let (input, cached, output) = (input as u64, cached as u64, output as u64);
    let total = (input - cached) * price.0 + cached * cache.unwrap_or(price.0) + output * price.1;
    i64::try_from(total).unwrap()
}

/// The seed's own float arithmetic (`tokens / 1e6 * price`), without its 6-decimal rounding.
fn seed_float_cost(price: (u64, u64), input: i64, output: i64) -> f64 {
    input as f64 / 1e6 * (price.0 as f64 / 1e6) + output as f64 / 1e6 * (price.1 as f64 / 1e6)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Feeds `bytes` to a scanner in `chunk`-byte pieces (0: all at once).
fn scan(bytes: &[u8], chunk: usize) -> (ResponseSummary, bool, u64) {
    let mut s = SseScanner::new();
    if chunk == 0 {
        s.feed(bytes);
    } else {
        for piece in bytes.chunks(chunk) {
            s.feed(piece);
        }
    }
    let (done, events) = (s.is_done(), s.events());
    (s.finish(), done, events)
}

fn request(op: Operation, model: &str, stream: bool) -> Value {
    let mut body = match op {
        Operation::Chat | Operation::TextCompletion => json!({
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION},
            ],
            "user": "analyst-7",
        }),
        Operation::Responses => json!({
            "model": model,
            "instructions": SYSTEM,
            "input": QUESTION,
            "user": "analyst-7",
        }),
        Operation::Embeddings => json!({
            "model": model,
            "input": [SYSTEM, QUESTION],
        }),
    };
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn start(op: Operation, model: &str, stream: bool) -> CallStart {
    let req = ParsedRequest::from_value(op, request(op, model, stream), None).unwrap();
    CallStart::from_request(req, Arc::from("openai"))
}

fn chat_body(model: &str, text: &str, usage: Value) -> Vec<u8> {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_750_000_000,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }],
        "usage": usage,
    })
    .to_string()
    .into_bytes()
}

/// Tokens of `text` with o200k_base, built here, not through `src/`.
fn o200k(text: &str) -> i64 {
    static BPE: std::sync::OnceLock<tiktoken_rs::CoreBPE> = std::sync::OnceLock::new();
    let bpe = BPE.get_or_init(|| tiktoken_rs::o200k_base().unwrap());
    i64::try_from(bpe.encode_ordinary(text).len()).unwrap()
}

/// OpenAI cookbook framing: 3 tokens per message plus 3 priming the reply.
fn chat_prompt_tokens() -> i64 {
    3 + o200k(SYSTEM) + 3 + o200k(QUESTION) + 3
}

struct StoredCost {
    cost_picousd: i64,
    cost_usd: f64,
    usage_source: String,
    cost_status: String,
    tokens: (i64, i64, i64, i64, i64),
    finish_reason: Option<String>,
    response_id: Option<String>,
    response_model: Option<String>,
    stream: bool,
}

fn stored(conn: &Connection, request_id: &str) -> StoredCost {
    conn.query_row(
        "SELECT cost_picousd, cost_usd, usage_source, cost_status, prompt_tokens, \
         completion_tokens, total_tokens, cached_tokens, reasoning_tokens, finish_reason, \
         response_id, response_model, stream FROM audit_logs WHERE request_id = ?1",
        [request_id],
        |r| {
            Ok(StoredCost {
                cost_picousd: r.get(0)?,
                cost_usd: r.get(1)?,
                usage_source: r.get(2)?,
                cost_status: r.get(3)?,
                tokens: (r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?),
                finish_reason: r.get(9)?,
                response_id: r.get(10)?,
                response_model: r.get(11)?,
                stream: r.get(12)?,
            })
        },
    )
    .unwrap()
}

fn sum_picousd(conn: &Connection) -> i64 {
    conn.query_row("SELECT SUM(cost_picousd) FROM audit_logs", [], |r| r.get(0))
        .unwrap()
}

// ── The fixture table ───────────────────────────────────────────────────────────────────────

struct Case {
    fixture: &'static str,
    op: Operation,
    /// Requested model.
    model: &'static str,
    id: Option<&'static str>,
    response_model: Option<&'static str>,
    finish: &'static [&'static str],
    /// The answer's text (`exact`), or a part of it.
    text: &'static str,
    exact: bool,
    /// (input, output, total, cached, reasoning) as reported; `None`: nothing reported.
    usage: Option<(i64, i64, i64, i64, i64)>,
    status: CostStatus,
}

const CASES: &[Case] = &[
    Case {
        fixture: "openai_chat_gpt41.json",
        op: Operation::Chat,
        model: "gpt-4.1",
        id: Some("chatcmpl-BjQJxWm3tJ1n2bXkQ8YdA7pZr5c9T"),
        response_model: Some("gpt-4.1-2025-04-14"),
        finish: &["stop"],
        text: "Three failed logins from 10.0.4.17 between 02:10 and 02:14 UTC, all for svc-backup. \
               No successful login followed.",
        exact: true,
        usage: Some((2306, 41, 2347, 2048, 0)),
        status: CostStatus::Priced,
    },
    Case {
        fixture: "openai_chat_o4mini_tools.json",
        op: Operation::Chat,
        model: "o4-mini",
        id: Some("chatcmpl-BjQKc1vTqYh0pZ7dM2nWlF8aR3sXe"),
        response_model: Some("o4-mini-2025-04-16"),
        finish: &["tool_calls"],
        text: "",
        exact: true,
        usage: Some((1185, 1522, 2707, 1024, 1344)),
        status: CostStatus::Fallback,
    },
    Case {
        fixture: "openai_stream_usage.sse",
        op: Operation::Chat,
        model: "gpt-4.1-mini",
        id: Some("chatcmpl-BjQK2fQ0ZbS7yE1mX4vN9cR8uT6pL"),
        response_model: Some("gpt-4.1-mini-2025-04-14"),
        finish: &["stop"],
        text: "Rotate the key and revoke old sessions — all of them.",
        exact: true,
        usage: Some((57, 12, 69, 0, 0)),
        status: CostStatus::Priced,
    },
    Case {
        fixture: "deepseek_chat.json",
        op: Operation::Chat,
        model: "deepseek-chat",
        id: Some("5a3e0c47-7c1b-4d0e-9f62-1b8f2a9d4e11"),
        response_model: Some("deepseek-chat"),
        finish: &["stop"],
        text: "The spike at 02:10 matches the cron job that rotates the backup credentials; \
               the three failures are the old password being retried.",
        exact: true,
        // prompt_cache_hit_tokens (no prompt_tokens_details) is the cached count.
        usage: Some((1864, 212, 2076, 1792, 0)),
        status: CostStatus::Priced,
    },
    Case {
        fixture: "deepseek_reasoner.json",
        op: Operation::Chat,
        model: "deepseek-reasoner",
        id: Some("e1b7d0f2-38a4-4c55-8d1e-6c0a4f9b2d73"),
        response_model: Some("deepseek-reasoner"),
        finish: &["stop"],
        text: "Yes: 2^61 - 1 is prime (the Mersenne prime M61).",
        exact: false,
        usage: Some((1043, 611, 1654, 1024, 583)),
        status: CostStatus::Fallback,
    },
    Case {
        fixture: "vllm_chat.json",
        op: Operation::Chat,
        model: "meta-llama/Llama-3.1-8B-Instruct",
        id: Some("chatcmpl-4c1e9d5b2a8f4e7c9b3d6a0f1e2c5b8d"),
        response_model: Some("meta-llama/Llama-3.1-8B-Instruct"),
        finish: &["length"],
        text: "Summary of the incident: an expired credential on the backup service account \
               caused repeated authentication failures. Recommended actions: 1. Update the stored",
        exact: true,
        usage: Some((48, 64, 112, 0, 0)),
        status: CostStatus::Fallback,
    },
    Case {
        fixture: "gemini_chat.json",
        op: Operation::Chat,
        model: "gemini-2.5-flash",
        id: Some("nRxSaO6oL4-6nvgPk9m7sAw"),
        response_model: Some("gemini-2.5-flash"),
        finish: &["stop"],
        text: "Block 10.0.4.17 at the edge firewall and rotate the svc-backup password.",
        exact: true,
        usage: Some((14, 38, 52, 0, 0)),
        status: CostStatus::Priced,
    },
    Case {
        // Gemini repeats the cumulative usage on every chunk: the last one counts, once.
        fixture: "gemini_stream.sse",
        op: Operation::Chat,
        model: "gemini-2.5-flash",
        id: Some("rRxSaJz3Ffe7nvgP4bWJ0Qk"),
        response_model: Some("gemini-2.5-flash"),
        finish: &["stop"],
        text: "Rotate the key now.",
        exact: true,
        usage: Some((12, 5, 17, 0, 0)),
        status: CostStatus::Priced,
    },
    Case {
        fixture: "stream_no_usage.sse",
        op: Operation::Chat,
        model: "deepseek-coder",
        id: Some("chatcmpl-b2e4f6a8c0d2e4f6"),
        response_model: Some("deepseek-coder"),
        finish: &["stop"],
        text: "def is_private(ip: str) -> bool:\n    return ipaddress.ip_address(ip).is_private\n",
        exact: true,
        usage: None,
        status: CostStatus::Priced,
    },
    Case {
        fixture: "openai_responses.json",
        op: Operation::Responses,
        model: "o4-mini",
        id: Some("resp_6852b1f0c8e08191a0e4b7cd2f6a9e3b0c1d2e3f4a5b6c7d"),
        response_model: Some("o4-mini-2025-04-16"),
        finish: &["completed"],
        text: "The failures come from one host and one account within four minutes, with no \
               success afterwards: a stale credential, not a brute-force attempt.",
        exact: true,
        usage: Some((2087, 1346, 3433, 1920, 1152)),
        status: CostStatus::Fallback,
    },
    Case {
        fixture: "openai_responses_stream.sse",
        op: Operation::Responses,
        model: "gpt-4.1",
        id: Some("resp_6852b2a0f1d48191b6c7d8e9f0a1b2c3"),
        response_model: Some("gpt-4.1-2025-04-14"),
        finish: &["completed"],
        // Deltas only: the `.done` events and the final object repeat the text.
        text: "Disable svc-backup until the password is rotated.",
        exact: true,
        usage: Some((1312, 11, 1323, 1152, 0)),
        status: CostStatus::Priced,
    },
    Case {
        fixture: "openai_embeddings.json",
        op: Operation::Embeddings,
        model: "text-embedding-3-small",
        id: None,
        response_model: Some("text-embedding-3-small"),
        finish: &[],
        text: "",
        exact: true,
        usage: Some((17, 0, 17, 0, 0)),
        status: CostStatus::Fallback,
    },
];

fn parse_fixture(case: &Case) -> ResponseSummary {
    let bytes = fixture(case.fixture);
    if case.fixture.ends_with(".sse") {
        let (whole, done, events) = scan(&bytes, 0);
        assert!(events > 0, "{}", case.fixture);
        // Chat streams end in [DONE]; Responses streams end with `response.completed`.
        assert_eq!(done, case.op == Operation::Chat, "{}", case.fixture);
        // Network reads split anywhere (inside a line, inside a UTF-8 character).
        for chunk in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(
                scan(&bytes, chunk).0,
                whole,
                "{} in {chunk}-byte reads",
                case.fixture
            );
        }
        assert_eq!(whole.bad_events, 0, "{}", case.fixture);
        whole
    } else {
        parse_json_response(&bytes).unwrap()
    }
}

#[test]
fn provider_answers_are_parsed_and_priced_exactly() {
    let h = common::harness();
    let mut expected_total: u128 = 0;
    let mut fallback_calls: HashMap<&str, u64> = HashMap::new();
    let mut checked = Vec::new();

    for case in CASES {
        let name = case.fixture;
        let summary = parse_fixture(case);
        assert_eq!(summary.id.as_deref(), case.id, "{name}: id");
        assert_eq!(
            summary.model.as_deref(),
            case.response_model,
            "{name}: model"
        );
        assert_eq!(
            summary.finish_reasons, case.finish,
            "{name}: finish reasons"
        );
        if case.exact {
            assert_eq!(summary.text, case.text, "{name}: text");
        } else {
            assert!(summary.text.contains(case.text), "{name}: {}", summary.text);
        }
        assert_eq!(summary.usage_error, None, "{name}");
        assert_eq!(summary.error_message, None, "{name}");
        let reported = case
            .usage
            .map(|(input, output, total, cached, reasoning)| Usage {
                input,
                output,
                total,
                cached,
                reasoning,
            });
        assert_eq!(summary.usage, reported, "{name}: usage");

        // Expected tokens: as reported, or counted here with o200k_base.
        let (input, output, total, cached, reasoning, source) = match case.usage {
            Some((i, o, t, c, r)) => (i, o, t, c, r, UsageSource::Reported),
            None => {
                let (i, o) = (chat_prompt_tokens(), o200k(case.text));
                (i, o, i + o, 0, 0, UsageSource::Estimated)
            }
        };
        let price = match case.status {
            CostStatus::Priced => seed_price(case.model).unwrap(),
            _ => FALLBACK,
        };
        let expected = pico(price, None, input, cached, output);

        let stream = name.ends_with(".sse");
        let flight = h.recorder.begin(start(case.op, case.model, stream));
        let e = flight.finish(CallEnd::ok(200, summary));
        let r = &e.record;
        assert_eq!(e.dropped, None);
        assert_eq!(
            (
                r.prompt_tokens,
                r.completion_tokens,
                r.total_tokens,
                r.cached_tokens,
                r.reasoning_tokens
            ),
            (input, output, total, cached, reasoning),
            "{name}: record tokens"
        );
        if source == UsageSource::Estimated {
            assert!(input > 0 && output > 0, "{name}: estimated counts are real");
        }
        assert_eq!(r.usage_source, source, "{name}");
        assert_eq!(r.cost_status, case.status, "{name}");
        assert_eq!(r.cost_picousd, expected, "{name}: picodollars");
        assert_eq!(r.cost_usd, expected as f64 / 1e12, "{name}: USD");
        let seed_style = seed_float_cost(price, input, output);
        assert!(
            (r.cost_usd - seed_style).abs() <= 1e-15 * seed_style.max(1.0),
            "{name}: {} vs the seed's {seed_style}",
            r.cost_usd
        );
        assert_eq!(r.response_id.as_deref(), case.id, "{name}");
        assert_eq!(r.response_model.as_deref(), case.response_model, "{name}");
        let finish = (!case.finish.is_empty()).then(|| case.finish.join(","));
        assert_eq!(r.finish_reason, finish, "{name}");
        assert_eq!(r.stream, stream, "{name}");
        assert_eq!(r.endpoint, case.op.endpoint(), "{name}");

        expected_total += u128::try_from(expected).unwrap();
        if case.status != CostStatus::Priced {
            *fallback_calls.entry(case.model).or_default() += 1;
        }
        checked.push((case, e.record.request_id.clone(), expected, source, finish));
    }

    h.store.shutdown();
    let conn = Connection::open(&h.db).unwrap();
    for (case, request_id, expected, source, finish) in &checked {
        let name = case.fixture;
        let row = stored(&conn, request_id);
        assert_eq!(row.cost_picousd, *expected, "{name}: stored picodollars");
        assert_eq!(row.cost_usd, *expected as f64 / 1e12, "{name}: stored USD");
        assert_eq!(row.usage_source, source.as_str(), "{name}");
        assert_eq!(row.cost_status, case.status.as_str(), "{name}");
        if let Some((i, o, t, c, r)) = case.usage {
            assert_eq!(row.tokens, (i, o, t, c, r), "{name}: stored tokens");
        }
        assert_eq!(&row.finish_reason, finish, "{name}");
        assert_eq!(row.response_id.as_deref(), case.id, "{name}");
        assert_eq!(row.response_model.as_deref(), case.response_model, "{name}");
        assert_eq!(row.stream, case.fixture.ends_with(".sse"), "{name}");
    }
    // Rows and counter agree exactly; unknown models are counted as such.
    assert_eq!(h.metrics.cost.total_picousd(), expected_total);
    assert_eq!(u128::try_from(sum_picousd(&conn)).unwrap(), expected_total);
    for (model, n) in fallback_calls {
        assert_eq!(
            h.metrics
                .unpriced
                .with_label_values(&["openai", model])
                .get(),
            n,
            "{model}"
        );
    }
    assert_eq!(
        h.metrics
            .unpriced
            .with_label_values(&["openai", "gpt-4.1"])
            .get(),
        0
    );
    assert_eq!(
        chain::verify(&conn, None).unwrap().first_break,
        None,
        "every fixture's row chains"
    );
}

// ── Provider quirks that change the bill ───────────────────────────────────────────────────

#[test]
fn gemini_thinking_tokens_count_as_output() {
    // Gemini's OpenAI-compatible endpoint leaves thinking out of `completion_tokens` and puts
    // it in `total_tokens` only (14 + 38 + 1074 thought tokens = 1126). Google bills thoughts
    // as output, and DESIGN §7 counts reasoning in the output: 1112 output, 1074 reasoning.
    let summary = parse_json_response(&fixture("gemini_chat_thinking.json")).unwrap();
    let h = common::harness();
    let e = h
        .recorder
        .begin(start(Operation::Chat, "gemini-2.5-flash", false))
        .finish(CallEnd::ok(200, summary));
    let r = &e.record;
    assert_eq!(
        (
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.reasoning_tokens
        ),
        (14, 1112, 1126, 1074),
        "tokens (input, output, total, reasoning)"
    );
    assert_eq!(
        r.cost_picousd,
        pico(seed_price("gemini-2.5-flash").unwrap(), None, 14, 0, 1112)
    );
    assert_eq!(r.prompt_tokens + r.completion_tokens, r.total_tokens);
}

#[test]
fn reasoning_content_is_not_the_answer_preview() {
    // The seed's preview is the first 200 characters of the answer (`message.content`);
    // DeepSeek's `reasoning_content` is the chain of thought, not the answer.
    let summary = parse_json_response(&fixture("deepseek_reasoner.json")).unwrap();
    let h = common::harness();
    let e = h
        .recorder
        .begin(start(Operation::Chat, "deepseek-reasoner", false))
        .finish(CallEnd::ok(200, summary));
    assert_eq!(
        e.record.response_preview,
        "Yes: 2^61 - 1 is prime (the Mersenne prime M61)."
    );
}

// ── Unknown models ──────────────────────────────────────────────────────────────────────────

fn finish_with_usage(
    h: &common::Harness,
    model: &str,
    input: i64,
    cached: i64,
    output: i64,
) -> Emitted {
    let usage = json!({
        "prompt_tokens": input,
        "completion_tokens": output,
        "total_tokens": input + output,
        "prompt_tokens_details": {"cached_tokens": cached},
    });
    let summary = parse_json_response(&chat_body(model, "ok", usage)).unwrap();
    h.recorder
        .begin(start(Operation::Chat, model, false))
        .finish(CallEnd::ok(200, summary))
}

#[test]
fn unknown_model_is_priced_at_the_fallback_rate() {
    let h = common::harness();
    let e = finish_with_usage(&h, "mistral-large-2411", 1_000_000, 0, 500_000);
    assert_eq!(e.record.cost_status, CostStatus::Fallback);
    // 1M × 10 USD/M + 0.5M × 30 USD/M = 25 USD, exactly.
    assert_eq!(e.record.cost_picousd, 25_000_000_000_000);
    assert_eq!(e.record.cost_usd, 25.0);
    assert_eq!(
        h.metrics
            .unpriced
            .with_label_values(&["openai", "mistral-large-2411"])
            .get(),
        1
    );
    assert_eq!(
        h.metrics
            .cost
            .get_picousd(&["openai", "mistral-large-2411", "fallback"]),
        25_000_000_000_000
    );
    // A provider prefix does not make a known model unknown.
    let e = finish_with_usage(&h, "openai/gpt-4.1", 1000, 0, 1000);
    assert_eq!(e.record.cost_status, CostStatus::Priced);
    assert_eq!(
        e.record.cost_picousd,
        pico(seed_price("gpt-4.1").unwrap(), None, 1000, 0, 1000)
    );
}

#[test]
fn without_a_fallback_unknown_models_are_unpriced_not_free() {
    let h = common::harness_with(|cfg| {
        cfg.pricing.fallback_input = None;
        cfg.pricing.fallback_output = None;
    });
    let e = finish_with_usage(&h, "mistral-large-2411", 1200, 0, 300);
    assert_eq!(e.record.cost_status, CostStatus::Unpriced);
    assert_eq!((e.record.cost_picousd, e.record.cost_usd), (0, 0.0));
    assert_eq!(e.record.usage_source, UsageSource::Reported);
    assert_eq!(
        (e.record.prompt_tokens, e.record.completion_tokens),
        (1200, 300)
    );
    assert_eq!(
        h.metrics
            .unpriced
            .with_label_values(&["openai", "mistral-large-2411"])
            .get(),
        1
    );
    // Known models keep their price.
    let e = finish_with_usage(&h, "deepseek-chat", 1000, 0, 500);
    assert_eq!(e.record.cost_status, CostStatus::Priced);
    assert_eq!(e.record.cost_picousd, 1_260_000_000);
    h.store.shutdown();
    let conn = Connection::open(&h.db).unwrap();
    let status: String = conn
        .query_row(
            "SELECT cost_status FROM audit_logs WHERE model = 'mistral-large-2411'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(status, "unpriced");
}

// ── Missing usage ───────────────────────────────────────────────────────────────────────────

#[test]
fn missing_usage_is_estimated_with_the_real_tokenizer() {
    let h = common::harness();
    let text = "Lock the account, rotate its password, and review who else used 10.0.4.17.";
    let body = json!({
        "id": "chatcmpl-nousage",
        "object": "chat.completion",
        "model": "gpt-4.1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
    });
    let summary = parse_json_response(body.to_string().as_bytes()).unwrap();
    assert_eq!(summary.usage, None);
    let e = h
        .recorder
        .begin(start(Operation::Chat, "gpt-4.1", false))
        .finish(CallEnd::ok(200, summary));
    let r = &e.record;
    let (input, output) = (chat_prompt_tokens(), o200k(text));
    assert!(input > 10 && output > 10);
    assert_eq!(r.usage_source, UsageSource::Estimated);
    assert_eq!(
        (r.prompt_tokens, r.completion_tokens, r.total_tokens),
        (input, output, input + output)
    );
    assert_eq!(
        r.cost_picousd,
        pico(seed_price("gpt-4.1").unwrap(), None, input, 0, output)
    );
    assert_eq!(r.cost_status, CostStatus::Priced);

    // A call that never got an answer has nothing to estimate: usage missing, cost zero.
    let e = h
        .recorder
        .begin(start(Operation::Chat, "gpt-4.1", false))
        .finish(CallEnd::error(504, "timeout", "first byte timeout (60s)"));
    assert_eq!(e.record.usage_source, UsageSource::Missing);
    assert_eq!((e.record.total_tokens, e.record.cost_picousd), (0, 0));
}

// ── Price files ─────────────────────────────────────────────────────────────────────────────

#[test]
fn toml_price_file_adds_and_overrides_models() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prices.toml");
    std::fs::write(
        &file,
        r#"# Negotiated prices, USD per 1M tokens.
[models."my-model"]
input = 1.0
output = 2.0
cache_read = 0.1

[models."gpt-4.1"]
input = 2.0
output = 8.0
cache_read = 0.5
"#,
    )
    .unwrap();
    let h = common::harness_with(|cfg| cfg.pricing.file = Some(file.clone()));

    let e = finish_with_usage(&h, "my-model", 1000, 600, 200);
    assert_eq!(e.record.cost_status, CostStatus::Priced);
    // 400 × 1.0 + 600 × 0.1 (cache read) + 200 × 2.0, per 1M.
    assert_eq!(
        e.record.cost_picousd,
        400_000_000 + 60_000_000 + 400_000_000
    );
    assert_eq!(e.record.cached_tokens, 600);

    let e = finish_with_usage(&h, "gpt-4.1", 2306, 2048, 41);
    assert_eq!(
        e.record.cost_picousd,
        pico((2_000_000, 8_000_000), Some(500_000), 2306, 2048, 41)
    );
    // Seed models not in the file keep the seed price.
    let e = finish_with_usage(&h, "deepseek-chat", 1000, 0, 500);
    assert_eq!(e.record.cost_picousd, 1_260_000_000);
    assert_eq!(
        h.metrics
            .unpriced
            .with_label_values(&["openai", "my-model"])
            .get(),
        0
    );

    // The same format as JSON.
    let json_file = dir.path().join("prices.json");
    std::fs::write(
        &json_file,
        r#"{"models": {"my-model": {"input": 1.0, "output": 2.0, "cache_read": 0.1}}}"#,
    )
    .unwrap();
    let table = PriceTable::from_config(&PricingConfig {
        file: Some(json_file),
        ..PricingConfig::default()
    })
    .unwrap();
    let usage = Usage {
        input: 1000,
        output: 200,
        total: 1200,
        cached: 600,
        reasoning: 0,
    };
    let cost = table.cost("my-model", None, &usage);
    assert_eq!(
        (cost.picousd, cost.status),
        (860_000_000, CostStatus::Priced)
    );
}

#[test]
fn litellm_price_file_loads_and_prices() {
    let file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/litellm_model_prices.json");
    let h = common::harness_with(|cfg| cfg.pricing.file = Some(file.clone()));
    // Per-token USD × 1e12 = picodollars per token.
    let gpt41 = (2_000_000, 8_000_000);
    let o4mini = (1_100_000, 4_400_000);
    let reasoner = (550_000, 2_190_000);

    let e = finish_with_usage(&h, "gpt-4.1", 2306, 2048, 41);
    assert_eq!(e.record.cost_status, CostStatus::Priced);
    assert_eq!(
        e.record.cost_picousd,
        pico(gpt41, Some(500_000), 2306, 2048, 41)
    );
    assert_eq!(e.record.cost_picousd, 1_868_000_000);

    let e = finish_with_usage(&h, "o4-mini", 1185, 1024, 1522);
    assert_eq!(e.record.cost_status, CostStatus::Priced);
    assert_eq!(
        e.record.cost_picousd,
        pico(o4mini, Some(275_000), 1185, 1024, 1522)
    );

    let e = finish_with_usage(&h, "deepseek/deepseek-reasoner", 1043, 1024, 611);
    assert_eq!(e.record.cost_status, CostStatus::Priced);
    assert_eq!(
        e.record.cost_picousd,
        pico(reasoner, Some(140_000), 1043, 1024, 611)
    );

    // `sample_spec` documents the format; it is not a model. Image models have no token price.
    for not_a_model in ["sample_spec", "256-x-256/dall-e-2"] {
        let e = finish_with_usage(&h, not_a_model, 100, 0, 100);
        assert_eq!(e.record.cost_status, CostStatus::Fallback, "{not_a_model}");
    }
    // The seed's models the file does not list keep their price.
    let e = finish_with_usage(&h, "deepseek-chat", 1000, 0, 500);
    assert_eq!(e.record.cost_picousd, 1_260_000_000);
}

#[test]
fn broken_price_files_are_errors_not_silent_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("typo.toml", "[models.\"m\"]\ninptu = 1.0\noutput = 2.0\n"),
        (
            "negative.toml",
            "[models.\"m\"]\ninput = -1.0\noutput = 2.0\n",
        ),
        ("not-json.json", "{\"models\": "),
        (
            "no-token-prices.json",
            r#"{"dall-e-3": {"litellm_provider": "openai", "mode": "image_generation",
                "output_cost_per_image": 0.04}}"#,
        ),
    ];
    for (name, text) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let cfg = PricingConfig {
            file: Some(path),
            ..PricingConfig::default()
        };
        assert!(
            PriceTable::from_config(&cfg).is_err(),
            "{name} was accepted"
        );
    }
    let missing = PricingConfig {
        file: Some(dir.path().join("absent.toml")),
        ..PricingConfig::default()
    };
    assert!(PriceTable::from_config(&missing).is_err());
}

// ── Rows and counter agree ──────────────────────────────────────────────────────────────────

const PROP_MODELS: [&str; 10] = [
    "gpt-4.1",
    "gpt-4.1-mini",
    "claude-sonnet-4-20250514",
    "claude-3-5-sonnet-20241022",
    "gemini-2.5-flash",
    "deepseek-chat",
    "deepseek-coder",
    "mistral-large-2411",
    "qwen2.5-72b-instruct",
    "meta-llama/Llama-3.1-8B-Instruct",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn row_costs_sum_exactly_to_the_cost_counter(
        calls in prop::collection::vec(
            (0usize..PROP_MODELS.len(), 0i64..3_000_000, 0i64..300_000, 0i64..=100),
            1..40,
        )
    ) {
        let h = common::harness();
        let mut expected: Vec<i64> = Vec::new();
        for (m, input, output, cached_pct) in calls {
            let model = PROP_MODELS[m];
            let cached = input * cached_pct / 100;
            let e = finish_with_usage(&h, model, input, cached, output);
            let price = seed_price(model).unwrap_or(FALLBACK);
            let want = pico(price, None, input, cached, output);
            prop_assert_eq!(e.record.cost_picousd, want);
            expected.push(want);
        }
        h.store.shutdown();
        let conn = Connection::open(&h.db).unwrap();
        let mut stmt = conn.prepare("SELECT cost_picousd, cost_usd FROM audit_logs ORDER BY id").unwrap();
        let rows: Vec<(i64, f64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        prop_assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), expected);
        let counter = h.metrics.cost.total_picousd();
        let rows_pico: i128 = rows.iter().map(|r| i128::from(r.0)).sum();
        prop_assert_eq!(rows_pico, i128::try_from(counter).unwrap());
        prop_assert_eq!(i128::from(sum_picousd(&conn)), rows_pico);
        prop_assert_eq!(h.metrics.user_cost.total_picousd(), counter);
        for (p, usd) in &rows {
            prop_assert_eq!(*usd, *p as f64 / 1e12);
        }
        let rows_usd: f64 = rows.iter().map(|r| r.1).sum();
        let sql_usd: f64 = conn.query_row("SELECT SUM(cost_usd) FROM audit_logs", [], |r| r.get(0)).unwrap();
        let counter_usd = counter as f64 / 1e12;
        prop_assert!((rows_usd - counter_usd).abs() < 1e-9, "{} vs {}", rows_usd, counter_usd);
        prop_assert!((sql_usd - counter_usd).abs() < 1e-9, "{} vs {}", sql_usd, counter_usd);
    }
}

// ── Bad input ───────────────────────────────────────────────────────────────────────────────

#[test]
fn non_json_upstream_bodies_are_typed_errors_and_still_recorded() {
    let h = common::harness();
    let bodies: [&[u8]; 4] = [
        b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        b"",
        b"{\"id\":\"chatcmpl-1\",\"choices\":[",
        b"{\"id\":\"chatcmpl-\xff\xfe\",\"choices\":[]}",
    ];
    let mut ids = Vec::new();
    for body in bodies {
        let err = parse_json_response(body).unwrap_err();
        assert!(matches!(err, UsageError::NotJson(_)), "{err:?}");
        let e = h
            .recorder
            .begin(start(Operation::Chat, "gpt-4.1", false))
            .finish(CallEnd::error(502, "invalid_response", err.to_string()));
        assert_eq!(e.dropped, None);
        assert_eq!(e.record.usage_source, UsageSource::Missing);
        assert_eq!(e.record.cost_picousd, 0);
        ids.push(e.record.request_id.clone());
    }
    h.store.shutdown();
    let conn = Connection::open(&h.db).unwrap();
    for id in ids {
        let (status, outcome, message): (i64, String, String) = conn
            .query_row(
                "SELECT status_code, outcome, error_message FROM audit_logs WHERE request_id = ?1",
                [&id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((status, outcome.as_str()), (502, "error"));
        assert!(message.contains("not valid JSON"), "{message}");
    }
}

#[test]
fn bad_token_counts_are_usage_errors_and_the_call_is_still_recorded() {
    let h = common::harness();
    let text = "Rotate the key.";
    let bad_usages = [
        r#"{"prompt_tokens": -5, "completion_tokens": 10, "total_tokens": 5}"#,
        r#"{"prompt_tokens": 12.5, "completion_tokens": 10, "total_tokens": 22.5}"#,
        r#"{"prompt_tokens": "12", "completion_tokens": 10, "total_tokens": 22}"#,
        r#"{"prompt_tokens": 99999999999999999999999, "completion_tokens": 1, "total_tokens": 1}"#,
        r#"{"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20,
            "completion_tokens_details": {"reasoning_tokens": -1}}"#,
        r#"{"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 3.7}}"#,
        r#"{"input_tokens": -1, "output_tokens": 3}"#,
    ];
    let mut ids = Vec::new();
    for usage in bad_usages {
        let body = format!(
            r#"{{"id":"chatcmpl-bad","object":"chat.completion","model":"gpt-4.1-2025-04-14",
            "choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},
            "finish_reason":"stop"}}],"usage":{usage}}}"#
        );
        let summary = parse_json_response(body.as_bytes())
            .unwrap_or_else(|e| panic!("{usage}: the rest of the answer was lost: {e}"));
        assert_eq!(summary.usage, None, "{usage}");
        assert!(summary.usage_error.is_some(), "{usage}");
        // The rest of the answer survives.
        assert_eq!(summary.id.as_deref(), Some("chatcmpl-bad"));
        assert_eq!(summary.text, text);
        assert_eq!(summary.finish_reasons, ["stop"]);

        let e = h
            .recorder
            .begin(start(Operation::Chat, "gpt-4.1", false))
            .finish(CallEnd::ok(200, summary));
        assert_eq!(e.dropped, None);
        assert_eq!(e.record.usage_source, UsageSource::Estimated, "{usage}");
        assert_eq!(e.record.completion_tokens, o200k(text), "{usage}");
        assert_eq!(e.record.prompt_tokens, chat_prompt_tokens(), "{usage}");
        assert!(e.record.cost_picousd > 0);
        ids.push(e.record.request_id.clone());
    }
    // Out of f64 range inside usage: a usage error, and the rest of the answer still counts.
    let body = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":1e400}}"#;
    let summary = parse_json_response(body.as_bytes()).unwrap();
    assert_eq!((summary.id.as_deref(), summary.usage), (Some("x"), None));
    assert!(summary.usage_error.is_some());
    // Out of range outside usage: the document is rejected with a typed error.
    let body = r#"{"id":1e400,"choices":[]}"#;
    assert!(matches!(
        parse_json_response(body.as_bytes()),
        Err(UsageError::NotJson(_))
    ));

    h.store.shutdown();
    let conn = Connection::open(&h.db).unwrap();
    for id in ids {
        let source: String = conn
            .query_row(
                "SELECT usage_source FROM audit_logs WHERE request_id = ?1",
                [&id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(source, "estimated");
    }
}

#[test]
fn usage_that_is_not_an_object_is_a_usage_error() {
    // serde's derived `Deserialize` also accepts a struct as a JSON array, positionally:
    // `"usage": [1, 2, 3]` must not become 1 prompt, 2 completion and 3 total tokens.
    for usage in [
        "[1, 2, 3]",
        r#"{"prompt_tokens": 5, "prompt_tokens_details": [4]}"#,
    ] {
        let body = format!(r#"{{"id":"c","model":"gpt-4.1","choices":[],"usage":{usage}}}"#);
        let summary = parse_json_response(body.as_bytes()).unwrap();
        assert!(
            summary.usage_error.is_some(),
            "{usage} accepted as {:?}",
            summary.usage
        );
        assert_eq!(summary.usage, None, "{usage}");
    }
}

#[test]
fn token_counts_no_call_can_have_are_usage_errors() {
    // "Invalid token count … too large": a count no context window comes near is a broken or
    // hostile upstream, and must not become a multi-million-dollar row.
    for count in ["1000000000000", "9223372036854775807"] {
        let usage = format!(r#"{{"prompt_tokens": 10, "completion_tokens": {count}}}"#);
        let body = format!(r#"{{"id":"c","model":"gpt-4.1","choices":[],"usage":{usage}}}"#);
        let summary = parse_json_response(body.as_bytes()).unwrap();
        assert_eq!(summary.usage, None, "{count} accepted as a token count");
        assert!(summary.usage_error.is_some(), "{count}");
    }
}

#[test]
fn cost_columns_and_counter_agree_even_for_absurd_usage() {
    let h = common::harness();
    // A trillion output tokens of gpt-4.1: 32 million USD, past what an i64 of picodollars
    // holds (9.2 million USD).
    let absurd = finish_with_usage(&h, "gpt-4.1", 10, 0, 1_000_000_000_000);
    let normal = finish_with_usage(&h, "gpt-4.1", 1000, 0, 100);
    for r in [&absurd.record, &normal.record] {
        assert_eq!(
            r.cost_usd,
            r.cost_picousd as f64 / 1e12,
            "cost_usd and cost_picousd of one row disagree"
        );
    }
    h.store.shutdown();
    let conn = Connection::open(&h.db).unwrap();
    let sum: rusqlite::Result<i64> =
        conn.query_row("SELECT SUM(cost_picousd) FROM audit_logs", [], |r| r.get(0));
    let sum = sum.unwrap_or_else(|e| panic!("summing the cost column fails: {e}"));
    assert_eq!(
        i128::from(sum),
        i128::try_from(h.metrics.cost.total_picousd()).unwrap()
    );
}

#[test]
fn invalid_utf8_inside_a_stream_is_counted_and_the_call_recorded() {
    let good = fixture("openai_stream_usage.sse");
    let text = String::from_utf8(good.clone()).unwrap();

    // A content chunk with bytes that are not UTF-8: that event is lost and counted.
    let bad = text.replacen(
        r#""content":" the key""#,
        "\"content\":\" the \u{0}KEY\"",
        1,
    );
    let mut bytes = bad.into_bytes();
    let at = bytes.iter().position(|b| *b == 0).unwrap();
    bytes.splice(at..=at, [0xff, 0xfe]);
    for chunk in [0, 1, 5] {
        let (summary, done, _) = scan(&bytes, chunk);
        assert!(done);
        assert_eq!(summary.bad_events, 1);
        assert_eq!(
            summary.text,
            "Rotate and revoke old sessions — all of them."
        );
        assert_eq!(
            summary.usage.map(|u| u.total),
            Some(69),
            "usage still counted"
        );
    }

    // Invalid bytes in a field nobody reads (`obfuscation`) cost nothing: serde_json skips it.
    let at = text.find(r#""obfuscation":"m2sQ0""#).unwrap() + r#""obfuscation":"m"#.len();
    let mut bytes = good.clone();
    bytes[at] = 0xc3;
    let (summary, _, _) = scan(&bytes, 3);
    assert_eq!(
        (summary.bad_events, summary.usage.map(|u| u.total)),
        (0, Some(69))
    );

    // The usage chunk damaged where it is read (its `id`): usage is estimated instead.
    let at = text.rfind(r#""id":"chatcmpl-"#).unwrap() + r#""id":"chat"#.len();
    let mut bytes = good.clone();
    bytes[at] = 0xc3; // a UTF-8 lead byte followed by ASCII: invalid
    let (summary, _, _) = scan(&bytes, 3);
    assert_eq!(summary.bad_events, 1);
    assert_eq!(summary.usage, None);

    let h = common::harness();
    let e = h
        .recorder
        .begin(start(Operation::Chat, "gpt-4.1-mini", true))
        .finish(CallEnd::ok(200, summary));
    assert_eq!(e.dropped, None);
    assert_eq!(e.record.usage_source, UsageSource::Estimated);
    assert_eq!(
        e.record.completion_tokens,
        o200k("Rotate the key and revoke old sessions — all of them.")
    );
    h.store.shutdown();
    let conn = Connection::open(&h.db).unwrap();
    let preview: String = conn
        .query_row(
            "SELECT response_preview FROM audit_logs WHERE request_id = ?1",
            [&e.record.request_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        preview,
        "Rotate the key and revoke old sessions — all of them."
    );
    assert_eq!(chain::verify(&conn, None).unwrap().first_break, None);
}
