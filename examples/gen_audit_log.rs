//! Writes a large, realistic, chained audit log through the real store, for timing `verify`,
//! `report`, `export` and `prune` on big databases:
//!
//! ```sh
//! cargo run --release --example gen_audit_log -- /tmp/big.db 1000000 [days]
//! time target/release/llm-audit verify --db /tmp/big.db
//! ```
//!
//! Records are spread evenly over the last `days` (default 30) and cover every column shape:
//! priced/unpriced models, failures with error messages, users, repeated prompts, streams.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use llm_audit::AuditRecord;
use llm_audit::audit::record::{CostStatus, Outcome, UsageSource};
use llm_audit::config::StoreConfig;
use llm_audit::store::Store;
use llm_audit::telemetry::metrics::Metrics;

const MODELS: [(&str, i64, i64); 5] = [
    ("gpt-4.1", 8_000_000, 32_000_000),
    ("gpt-4.1-mini", 1_500_000, 6_000_000),
    ("deepseek-chat", 420_000, 1_680_000),
    ("gemini-2.5-flash", 2_500_000, 10_000_000),
    ("llama-3.3-70b-instruct", 10_000_000, 30_000_000),
];

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: gen_audit_log PATH ROWS [DAYS]");
    let rows: u64 = args.next().map_or(1_000_000, |n| n.parse().expect("ROWS"));
    let days: i64 = args.next().map_or(30, |n| n.parse().expect("DAYS"));
    let cfg = StoreConfig {
        path: path.into(),
        queue_capacity: 65_536,
        ..StoreConfig::default()
    };
    let metrics = Arc::new(Metrics::new(1000, 200, 100_000).unwrap());
    let store = Store::open(&cfg, metrics).unwrap();
    let start = chrono::Utc::now() - chrono::Duration::days(days);
    let step_us = (days * 86_400_000_000) / rows.max(1) as i64;
    let mut rng = fastrand::Rng::with_seed(7);
    let t0 = std::time::Instant::now();
    for i in 0..rows {
        let (model, pin, pout) = MODELS[rng.usize(..MODELS.len())];
        let failed = rng.u8(..100) < 4;
        let prompt = rng.i64(20..4_000);
        let completion = if failed { 0 } else { rng.i64(1..800) };
        let cost = prompt * pin + completion * pout;
        let ts = start + chrono::Duration::microseconds(step_us * i as i64);
        let record = AuditRecord {
            timestamp: AuditRecord::format_timestamp(ts),
            request_id: uuid::Uuid::now_v7().to_string(),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            latency_ms: rng.f64() * 2_000.0 + 50.0,
            status_code: if failed { 500 } else { 200 },
            cost_usd: cost as f64 / 1e12,
            user_id: Some(format!("user-{}", rng.u32(..500))),
            request_hash: format!("{:064x}", rng.u32(..200_000)),
            response_preview: if failed {
                String::new()
            } else {
                "The capital of France is Paris. It has been the capital since".into()
            },
            ip_address: Some(format!("10.0.{}.{}", rng.u8(..), rng.u8(..))),
            error_message: failed
                .then(|| "The server had an error while processing your request.".to_owned()),
            provider: "openai".into(),
            endpoint: "/v1/chat/completions".into(),
            response_model: Some(model.into()),
            response_id: Some(format!("chatcmpl-{i}")),
            stream: rng.bool(),
            finish_reason: (!failed).then(|| "stop".to_owned()),
            cached_tokens: 0,
            reasoning_tokens: 0,
            usage_source: if failed {
                UsageSource::Missing
            } else {
                UsageSource::Reported
            },
            cost_status: if model.starts_with("llama") {
                CostStatus::Fallback
            } else {
                CostStatus::Priced
            },
            outcome: if failed { Outcome::Error } else { Outcome::Ok },
            ttft_ms: None,
            key_id: Some("key_0123456789abcdef".into()),
            attempts: 1,
            trace_id: None,
            span_id: None,
            cost_picousd: cost,
            prev_hash: String::new(),
            record_hash: String::new(),
        };
        // A full queue means the writer is behind: wait for it rather than drop.
        let mut r = record;
        loop {
            match store.submit(r) {
                (_, Ok(_)) => break,
                (back, Err(_)) => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    r = Arc::unwrap_or_clone(back);
                    r.prev_hash.clear();
                    r.record_hash.clear();
                }
            }
        }
    }
    store.shutdown();
    eprintln!("{rows} rows in {:.1} s", t0.elapsed().as_secs_f64());
}
