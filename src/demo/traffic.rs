//! The traffic generator of `llm-audit demo`: OpenAI-style chat completions through the proxy
//! at a steady rate, from ten users with their own keys, JSON and streaming, with the patterns
//! an auditor looks for: a FAQ bot repeating the same prompts (duplicates, REPEATED_REQUESTS),
//! a long shared system prompt (cached input tokens), a model the price table does not know,
//! and one user pasting a log dump of more than 100,000 tokens (EXCESSIVE_TOKEN_USAGE) at the
//! start and every two minutes after.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Calls made so far.
#[derive(Debug, Default)]
pub struct Counters {
    /// HTTP requests sent (retries included).
    pub sent: AtomicU64,
    /// Answered 2xx and read to the end.
    pub ok: AtomicU64,
    /// Answered with an error status, or failed in transport.
    pub errors: AtomicU64,
}

/// A running generator.
#[derive(Debug)]
pub struct Traffic {
    /// Live counts.
    pub counters: Arc<Counters>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Users and how busy they are (weights sum to 100). `mallory` also sends the huge prompt.
const USERS: [(&str, u32); 10] = [
    ("alice", 18),
    ("bob", 14),
    ("carol", 12),
    ("dave", 10),
    ("erin", 9),
    ("frank", 8),
    ("grace", 8),
    ("heidi", 7),
    ("ivan", 7),
    ("mallory", 7),
];
const HUGE_PROMPT_USER: &str = "mallory";
const HUGE_PROMPT_EVERY: Duration = Duration::from_secs(120);
/// Characters of the huge prompt: at about four per token, over 110,000 tokens.
const HUGE_PROMPT_CHARS: usize = 450_000;

/// Models and their share of the traffic (weights sum to 100).
const MODEL_MIX: [(&str, u32); 8] = [
    ("gpt-4.1-mini", 28),
    ("deepseek-chat", 20),
    ("gpt-4.1", 14),
    ("gemini-2.5-flash", 12),
    ("claude-sonnet-4-20250514", 8),
    ("claude-3-5-sonnet-20241022", 7),
    ("deepseek-coder", 6),
    ("llama-3.3-70b-instruct", 5),
];

/// The first ordinary calls visit every model once, so even a few seconds of demo show them all
/// (thinking models first, the unknown model early).
const MODEL_TOUR: [&str; 8] = [
    "claude-sonnet-4-20250514",
    "gemini-2.5-flash",
    "gpt-4.1-mini",
    "llama-3.3-70b-instruct",
    "deepseek-chat",
    "gpt-4.1",
    "claude-3-5-sonnet-20241022",
    "deepseek-coder",
];

/// What the FAQ bot gets asked, by weight: the same messages every time.
const FAQ: [(&str, u32); 3] = [
    ("How do I reset my password?", 5),
    ("What is your refund policy for annual plans?", 3),
    ("Can I export my data as CSV?", 2),
];

/// Share of calls that stream.
const STREAM_SHARE: f64 = 0.35;
/// Calls in flight beyond which a tick is skipped (a stalled upstream must not pile up tasks).
const MAX_IN_FLIGHT: usize = 512;
/// How long stopping waits for calls in flight before abandoning them.
const DRAIN: Duration = Duration::from_secs(15);

struct Call {
    user: &'static str,
    body: Value,
    stream: bool,
    /// Retries on 429/5xx, honouring `Retry-After` (the huge call only: it must get through).
    retries: u32,
}

impl Traffic {
    /// Starts sending `rps` calls per second to the OpenAI-compatible API at `base_url`.
    pub fn start(base_url: &str, rps: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            rps.is_finite() && rps > 0.0 && rps <= 10_000.0,
            "--rps must be above 0 and at most 10000, not {rps}"
        );
        // Only 127.0.0.1 is ever called: never through an HTTP(S)_PROXY from the environment.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()?;
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(generate(
            client,
            base_url.trim_end_matches('/').to_owned(),
            Duration::from_secs_f64(1.0 / rps),
            counters.clone(),
            stop.clone(),
        ));
        Ok(Self {
            counters,
            stop,
            task,
        })
    }

    /// Stops sending and waits for the calls in flight (streams included) to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn generate(
    client: reqwest::Client,
    base: String,
    period: Duration,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let url: Arc<str> = Arc::from(format!("{base}/chat/completions"));
    let system: Arc<str> = Arc::from(support_system_prompt());
    // SDK-based clients often list the models first: forwarded unaudited, and counted.
    let _ = client
        .get(format!("{base}/models"))
        .bearer_auth(api_key("alice"))
        .send()
        .await;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tasks = JoinSet::new();
    let mut n: u64 = 0;
    let mut tour = MODEL_TOUR.iter();
    let mut last_huge: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= MAX_IN_FLIGHT {
            continue;
        }
        n += 1;
        let huge_due = match last_huge {
            None => n == 3,
            Some(t) => t.elapsed() >= HUGE_PROMPT_EVERY,
        };
        let call = if huge_due {
            last_huge = Some(Instant::now());
            huge_call()
        } else if is_faq(n) {
            plan(n, None, &system)
        } else {
            plan(n, tour.next().copied(), &system)
        };
        tasks.spawn(send(client.clone(), url.clone(), call, counters.clone()));
    }
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.shutdown().await;
    }
}

async fn send(client: reqwest::Client, url: Arc<str>, call: Call, counters: Arc<Counters>) {
    let key = api_key(call.user);
    for attempt in 0..=call.retries {
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let response = match client
            .post(&*url)
            .bearer_auth(&key)
            .json(&call.body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        // Read every byte, as a real client would: the proxy records the call when it ends.
        let complete = if call.stream && status.is_success() {
            let mut body = response.bytes_stream();
            let mut complete = true;
            while let Some(chunk) = body.next().await {
                if chunk.is_err() {
                    complete = false;
                    break;
                }
            }
            complete
        } else {
            response.bytes().await.is_ok()
        };
        if status.is_success() && complete {
            counters.ok.fetch_add(1, Ordering::Relaxed);
            return;
        }
        counters.errors.fetch_add(1, Ordering::Relaxed);
        let retryable = status.as_u16() == 429 || status.is_server_error();
        if !retryable || attempt == call.retries {
            return;
        }
        let wait = Duration::from_secs(retry_after.unwrap_or(1).clamp(1, 5));
        tokio::time::sleep(wait).await;
    }
}

/// Each user's own (fake) key, so the log shows one `key_id` per user.
fn api_key(user: &str) -> String {
    format!("sk-demo-{user}-not-a-real-key")
}

fn pick<T: Copy>(weighted: &[(T, u32)]) -> T {
    let total: u32 = weighted.iter().map(|(_, w)| w).sum();
    let mut roll = fastrand::u32(0..total.max(1));
    for (item, weight) in weighted {
        if roll < *weight {
            return *item;
        }
        roll -= weight;
    }
    weighted[0].0
}

fn message(role: &str, content: &str) -> Value {
    json!({"role": role, "content": content})
}

/// Every fourth call is the FAQ bot's (same messages, hence the same request hash).
fn is_faq(n: u64) -> bool {
    n % 4 == 2
}

/// One ordinary call, to `model` or one picked by the traffic mix.
fn plan(n: u64, model: Option<&'static str>, system: &str) -> Call {
    let user = pick(&USERS);
    let stream = fastrand::f64() < STREAM_SHARE;
    let (model, messages) = if is_faq(n) {
        let question = pick(&FAQ);
        (
            "gpt-4.1-mini",
            vec![message("system", system), message("user", question)],
        )
    } else {
        let model = model.unwrap_or_else(|| pick(&MODEL_MIX));
        let messages = match fastrand::u8(0..4) {
            0 => vec![
                message("system", system),
                message(
                    "user",
                    &format!(
                        "Ticket #{}: {} Draft a polite reply.",
                        fastrand::u32(10_000..99_999),
                        pick(&ISSUES)
                    ),
                ),
            ],
            1 => vec![
                message(
                    "system",
                    "You are a senior Rust engineer. Review code for bugs and unclear names.",
                ),
                message(
                    "user",
                    &format!(
                        "Review this function:\n\nfn total_{n}(items: &[Item]) -> u64 {{\n    items.iter().map(|i| i.price * i.qty).sum()\n}}"
                    ),
                ),
            ],
            2 => vec![message(
                "user",
                &format!("Translate into Korean: \"{}\"", pick(&PHRASES)),
            )],
            _ => vec![message(
                "user",
                &format!(
                    "Write a SQL query that lists the top {} customers by revenue in {} {}.",
                    fastrand::u32(3..50),
                    pick(&MONTHS),
                    fastrand::u32(2019..2026)
                ),
            )],
        };
        (model, messages)
    };
    let mut body = json!({"model": model, "messages": messages, "user": user});
    if stream {
        body["stream"] = json!(true);
        // Half the streaming clients ask for usage themselves; for the others the proxy asks
        // and hides the usage chunk from them.
        if fastrand::bool() {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    match fastrand::u8(0..4) {
        0 => {}
        1 => body["max_tokens"] = json!(256),
        2 => body["max_tokens"] = json!(512),
        _ => body["max_tokens"] = json!(1024),
    }
    if fastrand::bool() {
        body["temperature"] = json!(f64::from(fastrand::u8(0..=10)) / 10.0);
    }
    Call {
        user,
        body,
        stream,
        retries: 0,
    }
}

/// A user pasting a whole access log into one request: over 100,000 tokens.
fn huge_call() -> Call {
    let mut dump = String::with_capacity(HUGE_PROMPT_CHARS + 200);
    dump.push_str("Find anything suspicious in this access log and list the offending IPs:\n\n");
    while dump.len() < HUGE_PROMPT_CHARS {
        let _ = writeln!(
            dump,
            "2025-06-18T03:{:02}:{:02}.{:03}Z 10.{}.{}.{} GET /api/v2/orders/{} {} {}ms \"python-requests/2.32.3\"",
            fastrand::u8(0..60),
            fastrand::u8(0..60),
            fastrand::u16(0..1000),
            fastrand::u8(0..=255),
            fastrand::u8(0..=255),
            fastrand::u8(1..=254),
            fastrand::u32(100_000..999_999),
            [200, 200, 200, 200, 304, 401, 404, 500][fastrand::usize(0..8)],
            fastrand::u16(3..900),
        );
    }
    Call {
        user: HUGE_PROMPT_USER,
        body: json!({
            "model": "gpt-4.1",
            "messages": [message("user", &dump)],
            "user": HUGE_PROMPT_USER,
            "max_tokens": 1024,
        }),
        stream: false,
        retries: 4,
    }
}

/// The support bot's system prompt: long enough (1,024+ tokens) for the provider's prompt cache.
fn support_system_prompt() -> String {
    let mut s = String::from(
        "You are the support assistant of Acme Cloud. Answer in the customer's language, briefly \
         and politely. Follow these rules strictly:\n",
    );
    for (i, rule) in RULES.iter().cycle().take(48).enumerate() {
        let _ = writeln!(s, "{}. {rule}", i + 1);
    }
    s
}

const RULES: [&str; 12] = [
    "Never reveal internal ticket notes, account identifiers of other customers or staff names.",
    "Refunds for monthly plans are possible within 14 days; annual plans are refunded pro rata.",
    "Password resets are done from the sign-in page; support never asks for a password.",
    "Escalate anything about data loss, security incidents or legal requests to a human agent.",
    "Data exports are available as CSV and JSON from Settings, then Export, for account owners.",
    "Do not promise delivery dates for features; point to the public roadmap page instead.",
    "If the customer is angry, acknowledge the problem first, then give one concrete next step.",
    "Quote prices only from the current price list; never invent discounts or promotions.",
    "When unsure, say so and offer to create a ticket rather than guessing an answer.",
    "Keep answers under 150 words unless the customer asks for a detailed explanation.",
    "Use the customer's name when known and sign as Acme Support, never as a person.",
    "Remove any API key, token or password that a customer pastes, and tell them to rotate it.",
];

const ISSUES: [(&str, u32); 6] = [
    ("The customer was charged twice for the same invoice.", 3),
    ("The dashboard has been loading slowly since yesterday.", 3),
    (
        "They cannot find where to download last month's invoice.",
        2,
    ),
    ("Their API key stopped working after a plan change.", 2),
    ("They want to move their account to a different region.", 1),
    ("They ask whether their data is used to train models.", 1),
];

const PHRASES: [(&str, u32); 5] = [
    ("Your order has shipped and will arrive on Thursday.", 2),
    ("We are sorry for the inconvenience.", 2),
    ("Please restart the application and try again.", 1),
    ("Your subscription renews next month.", 1),
    ("The maintenance window starts at 02:00 UTC.", 1),
];

const MONTHS: [(&str, u32); 12] = [
    ("January", 1),
    ("February", 1),
    ("March", 1),
    ("April", 1),
    ("May", 1),
    ("June", 1),
    ("July", 1),
    ("August", 1),
    ("September", 1),
    ("October", 1),
    ("November", 1),
    ("December", 1),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_huge_prompt_is_over_100k_tokens_and_small_enough_for_the_proxy() {
        let call = huge_call();
        let body = serde_json::to_vec(&call.body).unwrap_or_default();
        assert!(body.len() / 4 > 100_000);
        assert!(body.len() < crate::config::ServerConfig::default().max_body_bytes);
    }

    #[test]
    fn every_model_sent_is_served_and_the_tour_covers_them_all() {
        let served: Vec<&str> = super::super::upstream::MODELS
            .iter()
            .map(|m| m.name)
            .collect();
        for (model, _) in MODEL_MIX {
            assert!(served.contains(&model), "{model}");
        }
        let mut tour = MODEL_TOUR.to_vec();
        tour.sort_unstable();
        let mut all = served.clone();
        all.sort_unstable();
        assert_eq!(tour, all);
        assert!(!crate::audit::PriceTable::default().knows("llama-3.3-70b-instruct"));
    }

    #[test]
    fn the_system_prompt_is_long_enough_to_be_cached() {
        assert!(support_system_prompt().len() / 4 > 1024);
    }
}
