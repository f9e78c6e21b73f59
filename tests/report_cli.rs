#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The built `llm-audit report` on audit logs written by the real store (and, for the seed
//! comparison, by the real `serve` proxy under `llm-audit demo`), with contents the tests choose:
//! every number of the JSON against an independent computation in Rust, each anomaly on both
//! sides of its threshold, empty periods and unusable files, the text and Markdown forms, the
//! seed's own SQL side by side, and a million rows in bounded memory.

mod common;
mod report_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_audit::audit::{CallEnd, CallStart, Operation};
use rusqlite::{Connection, OpenFlags, params};
use serde_json::{Value, json};

use report_support::{
    Acc, HOUR_US, MINUTE_US, Rec, Row, Th, assert_json_eq, at, dollars, finding, findings,
    prompt_hash, repeated_hashes, report, report_json, rt, seed_price, sep, write_db,
};
use support::llm_audit;

// ── The main fixture ────────────────────────────────────────────────────────────────────────

const SINCE: &str = "2026-03-01T10:00:00Z";
const UNTIL: &str = "2026-03-01T12:00:00Z";

/// 13 distinct error messages (more than the 10 listed) with their statuses and counts; the
/// 9th–11th tie at 4, so the cut at 10 falls inside a tie and the name decides.
const ERRORS: [(&str, u16, usize); 13] = [
    ("Request timeout (60s)", 408, 12),
    ("upstream 500: internal server error", 500, 10),
    ("rate limit exceeded, retry after 20s", 429, 9),
    ("invalid api key", 401, 9),
    ("upstream 502: bad gateway", 502, 8),
    ("upstream 503: service unavailable", 503, 7),
    ("context length exceeded", 400, 6),
    ("upstream connection reset", 502, 5),
    ("model overloaded", 503, 4),
    ("content policy violation", 400, 4),
    ("billing hard limit reached", 429, 4),
    ("stream aborted by client", 499, 2),
    ("unknown model", 404, 1),
];

/// The model of call `i`: gpt-4.1-mini 3/9, deepseek-chat and gemini-2.5-flash 2/9 each (a
/// tie), gpt-4.1 and an unknown model 1/9 each (another tie); in each tie the name that sorts
/// last is seen first.
const MODEL_CYCLE: [&str; 9] = [
    "gpt-4.1-mini",
    "gpt-4.1-mini",
    "gpt-4.1-mini",
    "gemini-2.5-flash",
    "deepseek-chat",
    "gemini-2.5-flash",
    "deepseek-chat",
    "my-local-llama",
    "gpt-4.1",
];

const FAQ: &str = "FAQ: what are your opening hours?";

/// 453 calls in [SINCE, UNTIL) from 25 users (more than the 20 listed; the 20th–22nd tie at
/// 10 requests) and 15 anonymous ones; 81 failures with the 13 messages above plus 3 without a
/// message; one prompt sent 5 times, one exactly 3 times; one request of 150,000 tokens; and
/// two calls just outside the period (1 µs before it, and at its exclusive end) that would
/// change every number if they were counted.
fn fixture() -> Vec<Rec> {
    let mut per_user: Vec<usize> = (12..=30).rev().collect();
    per_user.extend([10, 10, 10, 5, 3, 1]);
    let mut owners: Vec<Option<String>> = Vec::new();
    for (k, n) in per_user.iter().enumerate() {
        // Names not in count order, so sorting by name is visible.
        owners.extend(std::iter::repeat_n(
            Some(format!("user-{:02}", (k * 7) % 25)),
            *n,
        ));
    }
    owners.extend(std::iter::repeat_n(None, 15));
    let n = owners.len();
    let mut outcomes: Vec<(u16, Option<&str>)> = Vec::new();
    for (message, status, count) in ERRORS {
        outcomes.extend(std::iter::repeat_n((status, Some(message)), count));
    }
    outcomes.extend(std::iter::repeat_n((400, None), 3));
    outcomes.resize(n, (200, None));

    let mut recs = Vec::with_capacity(n + 2);
    let mut huge = false;
    for i in 0..n {
        let ts = at(SINCE, i as i64 * 15_000_000 + (i as i64 * 37) % 1_000_000);
        let model = MODEL_CYCLE[i % 9];
        let prompt = if i % 90 == 7 {
            FAQ.to_owned()
        } else if i % 150 == 11 {
            "sent exactly three times".to_owned()
        } else {
            format!("question {}", i % 400)
        };
        // Spread users and outcomes over the period (both multipliers are prime to n = 453).
        let user = owners[(i * 101) % n].clone();
        let (status, error) = outcomes[(i * 7919) % n];
        let mut r = if status < 400 {
            let (mut input, mut output) =
                (100 + (i as i64 * 37) % 5000, 10 + (i as i64 * 53) % 2000);
            if !huge && i >= 100 && user.is_some() {
                (input, output) = (140_000, 10_000);
                huge = true;
            }
            Rec::ok(ts, model, &prompt, input, output)
        } else {
            Rec::failed(ts, model, &prompt, status, error)
        };
        r.user = user;
        // Multiples of 1/4 ms: every sum is exact, whatever order SQLite adds them in.
        r.latency = 50.0 + ((i * 613) % 4000) as f64 * 0.25;
        recs.push(r);
    }
    recs.push(Rec::ok(at(SINCE, -1), "gpt-4.1", FAQ, 900_000, 0).user("user-outside"));
    recs.push(
        Rec::failed(
            at(UNTIL, 0),
            "gpt-4.1",
            "late",
            401,
            Some("outside the period"),
        )
        .user("user-outside"),
    );
    recs
}

/// The fixture's calls inside [SINCE, UNTIL), by comparing timestamps in Rust.
fn inside(recs: &[Rec]) -> Vec<&Rec> {
    let (since, until) = (at(SINCE, 0), at(UNTIL, 0));
    recs.iter()
        .filter(|r| r.ts >= since && r.ts < until)
        .collect()
}

fn sorted_counts(counts: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut v: Vec<u64> = counts.into_iter().collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

// ── 1. Every number of the JSON ─────────────────────────────────────────────────────────────

#[test]
fn json_numbers_match_an_independent_computation() {
    let recs = fixture();
    let h = write_db(&recs);
    let report = report_json(&h.db, &["--since", SINCE, "--until", UNTIL]);

    let inside = inside(&recs);
    assert_eq!(
        inside.len(),
        recs.len() - 2,
        "the two boundary calls are outside"
    );
    assert_eq!(
        report["period"],
        json!({
            "since": at(SINCE, 0),
            "until": at(UNTIL, 0),
            "minutes": 120.0,
            "last_hour_since": at(UNTIL, -HOUR_US),
        })
    );
    assert_eq!(report["report_version"], 1);

    let mut acc = Acc::of_recs(inside.iter().copied());
    // The limits are exercised, and each cut falls inside a tie (broken by name).
    assert!(acc.users.len() > 20 && acc.errors.len() > 10);
    let users = sorted_counts(acc.users.values().map(|u| u.0));
    assert_eq!(users[19], users[20], "a tie across the top-20 cut");
    let errors = sorted_counts(acc.errors.values().copied());
    assert_eq!(errors[9], errors[10], "a tie across the top-10 cut");
    let models = sorted_counts(acc.models.values().map(|m| m.0));
    assert!(models.windows(2).any(|w| w[0] == w[1]), "tied models");

    let expected = acc.stats();
    assert_json_eq(&report["stats"], &expected, "stats");
    assert_eq!(report["stats"]["top_users"].as_array().unwrap().len(), 20);
    assert_eq!(report["stats"]["errors"].as_array().unwrap().len(), 10);

    let last_hour = at(UNTIL, -HOUR_US);
    let last_hour_pico: u128 = inside
        .iter()
        .filter(|r| r.ts >= last_hour)
        .map(|r| r.pico())
        .sum();
    let th = Th::default();
    let want = acc.findings(&th, 120.0, last_hour_pico);
    assert_eq!(findings(&report), want);
    let want_kinds: BTreeSet<&str> = want.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(
        want_kinds,
        BTreeSet::from([
            "EXCESSIVE_TOKEN_USAGE",
            "REPEATED_REQUESTS",
            "UNPRICED_MODEL"
        ]),
        "the fixture trips these three at the seed's thresholds"
    );
    assert_eq!(repeated_hashes(&report), vec![(prompt_hash(FAQ), 5)]);
    assert_eq!(report["thresholds"]["requests_per_minute"], 100.0);
    assert_eq!(report["thresholds"]["max_tokens_per_request"], 100_000);
}

// ── 2. Each anomaly fires above its threshold, not at it ────────────────────────────────────

/// The findings of one kind.
fn of_kind(report: &Value, kind: &str) -> Vec<report_support::Finding> {
    findings(report)
        .into_iter()
        .filter(|f| f.0 == kind)
        .collect()
}

#[test]
fn high_request_rate_fires_only_above_the_threshold() {
    const START: &str = "2026-03-03T10:00:00Z";
    const END: &str = "2026-03-03T10:10:00Z";
    // n calls spread over the 10-minute period; the seed's threshold is 100 per minute.
    let calls = |n: usize| -> Vec<Rec> {
        (0..n)
            .map(|i| {
                Rec::ok(
                    at(START, i as i64 * 599_000),
                    "gpt-4.1-mini",
                    &format!("rate {i}"),
                    10,
                    5,
                )
            })
            .collect()
    };
    let at_limit = write_db(&calls(1000));
    let over = write_db(&calls(1001));
    let period = ["--since", START, "--until", END];

    let r = report_json(&at_limit.db, &period);
    assert_eq!(r["stats"]["total_requests"], 1000);
    assert_eq!(r["period"]["minutes"], 10.0);
    assert_eq!(
        of_kind(&r, "HIGH_REQUEST_RATE"),
        vec![],
        "100.0 is not > 100"
    );

    let r = report_json(&over.db, &period);
    assert_eq!(
        of_kind(&r, "HIGH_REQUEST_RATE"),
        vec![finding("HIGH_REQUEST_RATE", None, 100.1, 100.0)]
    );

    // A lower threshold from --config [thresholds]: the same 100 per minute now fires.
    let dir = at_limit.dir.path();
    let lower = Th {
        rpm: 99.9,
        ..Th::default()
    }
    .config(dir, "lower.toml");
    let mut args = period.to_vec();
    args.extend(["--config", lower.to_str().unwrap()]);
    let r = report_json(&at_limit.db, &args);
    assert_eq!(
        of_kind(&r, "HIGH_REQUEST_RATE"),
        vec![finding("HIGH_REQUEST_RATE", None, 100.0, 99.9)]
    );
    assert_eq!(r["thresholds"]["requests_per_minute"], 99.9);

    // The text form of the busier log: thousands separated, the anomaly with its severity.
    let text = report(&over.db, &period);
    assert_eq!(text.code, Some(0), "{}", text.stderr);
    assert!(
        text.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("requests") && l.trim_end().ends_with("1,001")),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("[WARNING] HIGH_REQUEST_RATE"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("100.1 requests per minute"),
        "{}",
        text.stdout
    );
}

#[test]
fn high_failure_rate_fires_above_the_ratio_and_only_above_the_volume_guard() {
    const DAY: &str = "2026-03-04T00:00:00Z";
    // (calls, failed, fires at the seed's 0.5 with more than 10 calls), one hour each.
    let cases: [(usize, usize, bool); 5] = [
        (12, 6, false),  // exactly 0.5
        (12, 7, true),   // 0.583
        (10, 10, false), // all failed, but not more than 10 calls
        (11, 6, true),   // 11 > 10 and 0.545
        (11, 5, false),  // 0.455
    ];
    let mut recs = Vec::new();
    for (k, (calls, failed, _)) in cases.iter().enumerate() {
        for j in 0..*calls {
            let ts = at(DAY, k as i64 * HOUR_US + j as i64 * MINUTE_US);
            let prompt = format!("case {k} call {j}");
            recs.push(if j < *failed {
                Rec::failed(ts, "gpt-4.1", &prompt, 500, Some("upstream 500"))
            } else {
                Rec::ok(ts, "gpt-4.1", &prompt, 10, 10)
            });
        }
    }
    let h = write_db(&recs);
    let window = |k: usize| {
        (
            at(DAY, k as i64 * HOUR_US),
            at(DAY, (k as i64 + 1) * HOUR_US),
        )
    };
    for (k, (calls, failed, fires)) in cases.iter().enumerate() {
        let (since, until) = window(k);
        let r = report_json(&h.db, &["--since", &since, "--until", &until]);
        assert_eq!(r["stats"]["total_requests"], *calls as u64);
        assert_eq!(r["stats"]["failed_requests"], *failed as u64);
        let ratio = *failed as f64 / *calls as f64;
        assert_eq!(r["stats"]["failure_ratio"], rt(ratio));
        let want = if *fires {
            vec![finding("HIGH_FAILURE_RATE", None, ratio, 0.5)]
        } else {
            vec![]
        };
        assert_eq!(of_kind(&r, "HIGH_FAILURE_RATE"), want, "case {k}");
    }
    // The guard is the configured one: with more than 9 calls required, 10 of 10 fires.
    let cfg = Th {
        min_requests: 9,
        ..Th::default()
    }
    .config(h.dir.path(), "guard.toml");
    let (since, until) = window(2);
    let r = report_json(
        &h.db,
        &[
            "--since",
            &since,
            "--until",
            &until,
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    assert_eq!(
        of_kind(&r, "HIGH_FAILURE_RATE"),
        vec![finding("HIGH_FAILURE_RATE", None, 1.0, 0.5)]
    );
}

#[test]
fn cost_overrun_counts_the_last_hour_of_the_period_and_fires_above_the_limit() {
    const DAY: &str = "2026-03-05T00:00:00Z";
    let h_ = |h: i64, us: i64| at(DAY, h * HOUR_US + us);
    // gpt-4.1 output is 32 USD per 1M tokens: 31,250 tokens are exactly 1 USD.
    let recs = vec![
        // Window A [10:00, 12:00): $2 in its first hour, exactly $1 in its last hour (the row
        // at 11:00:00.000000 is the first instant of that hour), $5 at its exclusive end.
        Rec::ok(h_(10, 30 * MINUTE_US), "gpt-4.1", "a-first-hour", 0, 62_500),
        Rec::ok(h_(11, 0), "gpt-4.1", "a-last-hour", 0, 31_250),
        Rec::ok(h_(12, 0), "gpt-4.1", "a-at-until", 0, 156_250),
        // Window B [14:00, 16:00): $1 plus one more output token in the last hour.
        Rec::ok(h_(15, 0), "gpt-4.1", "b-dollar", 0, 31_250),
        Rec::ok(h_(15, HOUR_US - 1), "gpt-4.1", "b-one-token", 0, 1),
    ];
    assert_eq!(recs[1].pico(), 1_000_000_000_000, "exactly one dollar");
    let h = write_db(&recs);
    let cfg = Th {
        cost_per_hour: 1.0,
        ..Th::default()
    }
    .config(h.dir.path(), "cost.toml");
    let cfg = cfg.to_str().unwrap();

    let a = report_json(
        &h.db,
        &[
            "--since",
            &h_(10, 0),
            "--until",
            &h_(12, 0),
            "--config",
            cfg,
        ],
    );
    assert_eq!(a["period"]["last_hour_since"], h_(11, 0));
    assert_eq!(a["stats"]["total_cost"]["picousd"], "3000000000000");
    assert_eq!(of_kind(&a, "COST_OVERRUN"), vec![], "$1.00 is not > $1");

    let b = report_json(
        &h.db,
        &[
            "--since",
            &h_(14, 0),
            "--until",
            &h_(16, 0),
            "--config",
            cfg,
        ],
    );
    let hourly = (recs[3].pico() + recs[4].pico()) as f64 / 1e12;
    assert_eq!(hourly, 1.000032);
    assert_eq!(
        of_kind(&b, "COST_OVERRUN"),
        vec![finding("COST_OVERRUN", None, hourly, 1.0)]
    );
    // At the seed's $100 an hour, nothing.
    let b = report_json(&h.db, &["--since", &h_(14, 0), "--until", &h_(16, 0)]);
    assert_eq!(of_kind(&b, "COST_OVERRUN"), vec![]);
}

#[test]
fn excessive_token_usage_names_the_user_above_the_limit() {
    const T: &str = "2026-03-06T10:00:00Z";
    let t = |m: i64| at(T, m * MINUTE_US);
    let recs = vec![
        Rec::ok(t(1), "deepseek-chat", "at-1", 100_000, 0).user("at-limit"),
        Rec::ok(t(2), "deepseek-chat", "at-2", 40, 10).user("at-limit"),
        Rec::ok(t(3), "deepseek-chat", "over-1", 100_000, 1).user("over"),
        Rec::ok(t(4), "deepseek-chat", "over-2", 5, 5).user("over"),
        // No user: the seed's check is per user, so a huge anonymous call is not named.
        Rec::ok(t(5), "deepseek-chat", "anonymous", 500_000, 0),
    ];
    let h = write_db(&recs);
    let period = ["--since", T, "--until", "2026-03-06T11:00:00Z"];
    let r = report_json(&h.db, &period);
    assert_eq!(
        of_kind(&r, "EXCESSIVE_TOKEN_USAGE"),
        vec![finding(
            "EXCESSIVE_TOKEN_USAGE",
            Some("over"),
            100_001.0,
            100_000.0
        )]
    );
    let cfg = Th {
        max_tokens: 99_999,
        ..Th::default()
    }
    .config(h.dir.path(), "tokens.toml");
    let mut args = period.to_vec();
    args.extend(["--config", cfg.to_str().unwrap()]);
    let r = report_json(&h.db, &args);
    assert_eq!(
        of_kind(&r, "EXCESSIVE_TOKEN_USAGE"),
        vec![
            finding("EXCESSIVE_TOKEN_USAGE", Some("over"), 100_001.0, 99_999.0),
            finding(
                "EXCESSIVE_TOKEN_USAGE",
                Some("at-limit"),
                100_000.0,
                99_999.0
            ),
        ]
    );
}

#[test]
fn repeated_requests_list_hashes_above_the_count_and_judge_the_duplicate_ratio() {
    const DAY: &str = "2026-03-07T00:00:00Z";
    // Window 1: A×3 (not > 3), B×4, C×2, 6 single prompts, 5 calls without a prompt ('' hash)
    //   = 20 calls, duplicates (3-1)+(4-1)+(2-1) = 6: a ratio of exactly 0.3, not > 0.3.
    // Window 2: the same with C×3 and 5 singles: 7 duplicates of 20 = 0.35.
    // Counted as a hash, '' (5 times) would be listed and window 1's ratio would be 0.5.
    let window = |k: i64, c: usize, singles: usize| -> Vec<Rec> {
        let mut prompts: Vec<Option<String>> = Vec::new();
        for (p, n) in [("A", 3), ("B", 4), ("C", c)] {
            prompts.extend(std::iter::repeat_n(Some(p.to_owned()), n));
        }
        prompts.extend((0..singles).map(|s| Some(format!("single {k}-{s}"))));
        prompts.extend(std::iter::repeat_n(None, 5));
        assert_eq!(prompts.len(), 20);
        prompts
            .into_iter()
            .enumerate()
            .map(|(j, p)| {
                let ts = at(DAY, k * HOUR_US + j as i64 * MINUTE_US);
                match p {
                    Some(p) => Rec::ok(ts, "gpt-4.1-mini", &p, 10, 10),
                    None => Rec::failed(ts, "gpt-4.1-mini", "", 400, Some("invalid JSON body"))
                        .no_prompt(),
                }
            })
            .collect()
    };
    let mut recs = window(1, 2, 6);
    recs.extend(window(2, 3, 5));
    let h = write_db(&recs);
    let period = |k: i64| (at(DAY, k * HOUR_US), at(DAY, (k + 1) * HOUR_US));
    let hash_b = prompt_hash("B");

    let (s, u) = period(1);
    let r = report_json(&h.db, &["--since", &s, "--until", &u]);
    assert_eq!(r["stats"]["total_requests"], 20);
    assert_eq!(repeated_hashes(&r), vec![(hash_b.clone(), 4)]);
    assert_eq!(
        of_kind(&r, "REPEATED_REQUESTS"),
        vec![finding("REPEATED_REQUESTS", Some(&hash_b), 4.0, 3.0)]
    );

    let (s, u) = period(2);
    let r = report_json(&h.db, &["--since", &s, "--until", &u]);
    assert_eq!(repeated_hashes(&r), vec![(hash_b.clone(), 4)]);
    assert_eq!(
        of_kind(&r, "REPEATED_REQUESTS"),
        vec![
            finding("REPEATED_REQUESTS", Some(&hash_b), 4.0, 3.0),
            finding("REPEATED_REQUESTS", None, 0.35, 0.3),
        ]
    );
}

/// The proxy records a call it rejects before reading the body (415 unsupported media type,
/// 413 body too large, oversized headers) with `CallStart::unparsed(op, provider, b"", _)`
/// (src/proxy/handler.rs). Such calls carried no prompt: they must have no request hash (not
/// SHA-256 of the empty body), so neither the report nor the duplicate detector counts them as
/// repeats.
#[test]
fn calls_rejected_before_the_body_was_read_are_not_repeats() {
    let h = common::harness();
    for _ in 0..5 {
        let mut call = CallStart::unparsed(Operation::Chat, Arc::from("openai"), b"", None);
        call.ip_address = Some("192.0.2.9".into());
        let e = h.recorder.begin(call).finish(CallEnd::error(
            415,
            "unsupported_media_type",
            "unsupported content type text/plain",
        ));
        assert_eq!(e.dropped, None);
    }
    h.store.shutdown();
    let r = report_json(&h.db, &["--since", "1h"]);
    assert_eq!(r["stats"]["total_requests"], 5);
    assert_eq!(
        repeated_hashes(&r),
        vec![],
        "five calls without a prompt are listed as one prompt repeated"
    );
    assert_eq!(of_kind(&r, "REPEATED_REQUESTS"), vec![]);
}

#[test]
fn unpriced_models_are_named_when_they_had_usage() {
    const T: &str = "2026-03-08T10:00:00Z";
    let t = |m: i64| at(T, m * MINUTE_US);
    let mut recs = Vec::new();
    for j in 0..3 {
        recs.push(Rec::ok(
            t(j),
            "my-local-llama",
            &format!("llama {j}"),
            1000,
            500,
        ));
    }
    for j in 3..5 {
        // Failed before any usage: nothing was priced, so nothing says the table lacks it.
        recs.push(Rec::failed(
            t(j),
            "my-local-llama",
            &format!("llama {j}"),
            500,
            Some("boom"),
        ));
    }
    recs.push(Rec::ok(t(5), "other-llm", "other", 100, 100).no_fallback());
    for j in 6..11 {
        recs.push(Rec::ok(t(j), "gpt-4.1", &format!("gpt {j}"), 100, 100));
    }
    let h = write_db(&recs);
    let r = report_json(&h.db, &["--since", T, "--until", "2026-03-08T11:00:00Z"]);
    assert_eq!(
        of_kind(&r, "UNPRICED_MODEL"),
        vec![
            finding("UNPRICED_MODEL", Some("my-local-llama"), 3.0, 0.0),
            finding("UNPRICED_MODEL", Some("other-llm"), 1.0, 0.0),
        ]
    );
    // Fallback-priced at the seed's 10 / 30 USD per 1M; unpriced costs 0, never a guess.
    let mut acc = Acc::of_recs(&recs);
    assert_json_eq(&r["stats"], &acc.stats(), "stats");
    let llama = seed_price("my-local-llama");
    assert_eq!(llama.0 * 1000 + llama.1 * 500, 25_000_000_000);
}

/// Deliberate difference from the seed: cost is summed exactly. Three calls of about 4.8 million
/// USD each: their picodollars (1.44e19) overflow SQLite's 64-bit `SUM`, and no f64 holds the
/// total exactly; the report's `picousd` string does, and the text shows it with separators.
#[test]
fn cost_sums_are_exact_beyond_the_range_of_sqlite_integers() {
    const T: &str = "2026-03-12T10:00:00Z";
    let recs: Vec<Rec> = (0..3)
        .map(|j| {
            Rec::ok(
                at(T, j * MINUTE_US),
                "gpt-4.1",
                &format!("big {j}"),
                600_000_000_001 + j,
                7,
            )
            .user("whale")
        })
        .collect();
    let pico: u128 = recs.iter().map(Rec::pico).sum();
    assert!(pico > i64::MAX as u128 && pico > 1 << 53);
    let h = write_db(&recs);
    let period = ["--since", T, "--until", "2026-03-12T11:00:00Z"];
    let r = report_json(&h.db, &period);
    assert_eq!(r["stats"]["total_cost"]["picousd"], pico.to_string());
    assert_eq!(r["stats"]["models"][0]["cost"]["picousd"], pico.to_string());
    assert_eq!(
        r["stats"]["top_users"][0]["cost"]["picousd"],
        pico.to_string()
    );
    assert_json_eq(&r["stats"], &Acc::of_recs(&recs).stats(), "stats");
    let text = report(&h.db, &period);
    assert_eq!(text.code, Some(0), "{}", text.stderr);
    assert!(
        line(&text.stdout, "cost").ends_with(&format!(" {}", dollars(pico))),
        "{}",
        text.stdout
    );
    assert_eq!(dollars(pico), "$14,400,000.0007");
}

#[test]
fn auth_failures_fire_above_the_limit() {
    const DAY: &str = "2026-03-09T00:00:00Z";
    let mut recs = Vec::new();
    for (k, n) in [(0i64, 20usize), (1, 21)] {
        for j in 0..n {
            recs.push(
                Rec::failed(
                    at(DAY, k * HOUR_US + j as i64 * MINUTE_US),
                    "gpt-4.1",
                    &format!("auth {k} {j}"),
                    401,
                    Some("invalid api key"),
                )
                .rejected(),
            );
        }
        // An upstream 401 (a bad key passed through) is a failed call, not a failed
        // authentication at the proxy: it never counts here.
        recs.push(Rec::failed(
            at(DAY, k * HOUR_US + 59 * MINUTE_US),
            "gpt-4.1",
            &format!("upstream {k}"),
            401,
            Some("Incorrect API key provided"),
        ));
    }
    let h = write_db(&recs);
    let r = report_json(
        &h.db,
        &["--since", &at(DAY, 0), "--until", &at(DAY, HOUR_US)],
    );
    assert_eq!(of_kind(&r, "AUTH_FAILURES"), vec![], "20 is not > 20");
    let r = report_json(
        &h.db,
        &[
            "--since",
            &at(DAY, HOUR_US),
            "--until",
            &at(DAY, 2 * HOUR_US),
        ],
    );
    assert_eq!(
        of_kind(&r, "AUTH_FAILURES"),
        vec![finding("AUTH_FAILURES", None, 21.0, 20.0)]
    );
}

// ── 3. Empty periods and unusable files ─────────────────────────────────────────────────────

#[test]
fn an_empty_period_is_reported_as_such_and_unusable_files_exit_2() {
    let h = write_db(&[Rec::ok(
        at("2026-03-10T10:00:00Z", 0),
        "gpt-4.1",
        "hello",
        10,
        10,
    )]);
    let period = [
        "--since",
        "2026-03-11T00:00:00Z",
        "--until",
        "2026-03-11T01:00:00Z",
    ];
    for format in ["text", "markdown"] {
        let mut args = period.to_vec();
        args.extend(["--format", format]);
        let run = report(&h.db, &args);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        assert!(
            run.stdout.contains("No audit records in this period."),
            "{format}:\n{}",
            run.stdout
        );
        assert!(!run.stdout.contains('\x1b'));
    }
    let r = report_json(&h.db, &period);
    let mut none = Acc::default();
    assert_json_eq(&r["stats"], &none.stats(), "stats");
    assert_eq!(r["stats"]["total_requests"], 0);
    assert_eq!(r["stats"]["failure_ratio"], 0.0);
    assert_eq!(r["stats"]["avg_latency_ms"], Value::Null);
    assert_eq!(r["anomalies"], json!([]));
    assert_eq!(r["repeated_hashes"], json!([]));

    // A log with the schema and not a single row: the default period (24 h), exit 0.
    let empty = common::harness();
    empty.store.shutdown();
    let r = report_json(&empty.db, &[]);
    assert_eq!(r["stats"]["total_requests"], 0);
    assert_eq!(r["anomalies"], json!([]));

    let dir = tempfile::tempdir().unwrap();
    // No file: exit 2, and report does not create one.
    let missing = dir.path().join("missing.db");
    for format in ["text", "json"] {
        let run = report(&missing, &["--format", format]);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains("no audit log at"), "{}", run.stderr);
        assert!(run.stdout.is_empty());
        assert!(!missing.exists(), "report created {}", missing.display());
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // Not SQLite: exit 2, the file untouched.
    let junk = dir.path().join("junk.db");
    let text = "this is not a database\n".repeat(200);
    std::fs::write(&junk, &text).unwrap();
    let run = report(&junk, &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("is not an llm-audit database"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_to_string(&junk).unwrap(), text);

    // SQLite, but not an audit log.
    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE notes (body TEXT);")
        .unwrap();
    let run = report(&other, &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("is not an llm-audit database"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("no audit_logs table"), "{}", run.stderr);
}

// ── 4. Text and Markdown ────────────────────────────────────────────────────────────────────

/// The first line whose text starts with `label` (after the indent).
fn line<'t>(text: &'t str, label: &str) -> &'t str {
    text.lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no line {label:?} in:\n{text}"))
}

/// The index of the first line containing every one of `parts`.
fn line_index(text: &str, parts: &[&str]) -> usize {
    text.lines()
        .position(|l| parts.iter().all(|p| l.contains(p)))
        .unwrap_or_else(|| panic!("no line with {parts:?} in:\n{text}"))
}

/// The text from the line `from` to the line `to`.
fn section<'t>(text: &'t str, from: &str, to: &str) -> &'t str {
    let start = text
        .find(&format!("\n{from}\n"))
        .unwrap_or_else(|| panic!("no {from}:\n{text}"));
    let end = text[start..]
        .find(&format!("\n{to}\n"))
        .unwrap_or_else(|| panic!("no {to}:\n{text}"));
    &text[start..start + end]
}

fn ms(v: &Value) -> String {
    format!("{:.2} ms", v.as_f64().unwrap())
}

#[test]
fn text_and_markdown_show_the_numbers_for_people() {
    let recs = fixture();
    let h = write_db(&recs);
    let mut acc = Acc::of_recs(inside(&recs));
    let s = acc.stats();
    let period = ["--since", SINCE, "--until", UNTIL];
    let total_tokens = s["total_tokens"].as_u64().unwrap();
    assert!(total_tokens >= 1000, "a number that needs separators");
    let pico = |v: &Value| v["picousd"].as_str().unwrap().parse::<u128>().unwrap();

    // Text, with a terminal-ish environment but stdout a pipe: no colour.
    let out = llm_audit()
        .arg("report")
        .arg("--db")
        .arg(&h.db)
        .args(period)
        .env("TERM", "xterm-256color")
        .env("CLICOLOR_FORCE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('\x1b'), "ANSI escapes on a pipe:\n{text}");
    assert!(text.starts_with("llm-audit security report\n"), "{text}");
    assert!(line(&text, "requests").ends_with(&format!(" {}", s["total_requests"])));
    assert!(line(&text, "failed (status >= 400)").ends_with(&format!(
        " {} ({:.1}%)",
        s["failed_requests"],
        s["failure_ratio"].as_f64().unwrap() * 100.0
    )));
    assert!(line(&text, "cost").ends_with(&format!(" {}", dollars(pico(&s["total_cost"])))));
    assert!(line(&text, "tokens (input / output)").ends_with(&format!(
        " {} ({} / {})",
        sep(u128::from(total_tokens)),
        sep(u128::from(s["prompt_tokens"].as_u64().unwrap())),
        sep(u128::from(s["completion_tokens"].as_u64().unwrap())),
    )));
    assert!(line(&text, "latency avg").ends_with(&format!(" {}", ms(&s["avg_latency_ms"]))));
    let l = &s["latency_ms"];
    assert!(line(&text, "latency p50 / p95 / p99").ends_with(&format!(
        " {} / {} / {}",
        ms(&l["p50"]),
        ms(&l["p95"]),
        ms(&l["p99"])
    )));
    // Per model, in the report's order.
    let mut last = 0;
    for m in s["models"].as_array().unwrap() {
        let name = m["model"].as_str().unwrap();
        let i = line_index(
            &text,
            &[
                &format!("  {name} "),
                &format!(" {} ", m["requests"]),
                &dollars(pico(&m["cost"])),
                &ms(&m["avg_latency_ms"]),
            ],
        );
        assert!(i > last, "{name} out of order:\n{text}");
        last = i;
    }
    // The 10 errors and 20 users listed, the others not.
    let listed_errors: Vec<&str> = s["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap())
        .collect();
    let errors = section(&text, "Top errors", "Top users");
    for (message, _, count) in ERRORS {
        if listed_errors.contains(&message) {
            line_index(errors, &[message, &format!(" {count}")]);
        } else {
            assert!(!errors.contains(message), "{message} listed:\n{text}");
        }
    }
    let listed_users: Vec<&str> = s["top_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    let users = section(&text, "Top users", "Anomalies");
    for user in acc.users.keys() {
        assert_eq!(
            users.contains(user.as_str()),
            listed_users.contains(&user.as_str()),
            "{user}:\n{text}"
        );
    }
    assert!(!text.contains("user-outside"));
    for u in s["top_users"].as_array().unwrap() {
        line_index(
            &text,
            &[
                u["user_id"].as_str().unwrap(),
                &format!(" {} ", u["requests"]),
                &dollars(pico(&u["cost"])),
            ],
        );
    }
    // Anomalies with their severities, and the repeated hash.
    for a in [
        "[WARNING] EXCESSIVE_TOKEN_USAGE",
        "[INFO] REPEATED_REQUESTS",
        "[WARNING] UNPRICED_MODEL",
    ] {
        assert_eq!(text.matches(a).count(), 1, "{a}:\n{text}");
    }
    line_index(&text, &[&prompt_hash(FAQ), " 5"]);

    // Markdown.
    let mut args = period.to_vec();
    args.extend(["--format", "markdown"]);
    let run = report(&h.db, &args);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let md = run.stdout;
    assert!(!md.contains('\x1b'));
    assert!(md.starts_with("## llm-audit security report\n"), "{md}");
    for row in [
        format!("| Requests | {} |", s["total_requests"]),
        format!(
            "| Failed (status ≥ 400) | {} ({:.1}%) |",
            s["failed_requests"],
            s["failure_ratio"].as_f64().unwrap() * 100.0
        ),
        format!("| Cost | {} |", dollars(pico(&s["total_cost"]))),
        format!("| Tokens | {} |", sep(u128::from(total_tokens))),
        format!("| Latency avg | {} |", ms(&s["avg_latency_ms"])),
        format!("| Latency p50 | {} |", ms(&l["p50"])),
        format!("| Latency p95 | {} |", ms(&l["p95"])),
        format!("| Latency p99 | {} |", ms(&l["p99"])),
    ] {
        assert!(md.contains(&row), "no {row:?} in:\n{md}");
    }
    let mut last = 0;
    for m in s["models"].as_array().unwrap() {
        let row = format!(
            "| {} | {} | {} | {} |",
            m["model"].as_str().unwrap(),
            m["requests"],
            dollars(pico(&m["cost"])),
            ms(&m["avg_latency_ms"])
        );
        let i = line_index(&md, &[&row]);
        assert!(i > last, "{row} out of order:\n{md}");
        last = i;
    }
    for e in s["errors"].as_array().unwrap() {
        line_index(
            &md,
            &[&format!(
                "| {} | {} |",
                e["error"].as_str().unwrap(),
                e["count"]
            )],
        );
    }
    for u in s["top_users"].as_array().unwrap() {
        line_index(
            &md,
            &[&format!(
                "| {} | {} | {} |",
                u["user_id"].as_str().unwrap(),
                u["requests"],
                dollars(pico(&u["cost"]))
            )],
        );
    }
    for a in [
        "- **WARNING** `EXCESSIVE_TOKEN_USAGE` — ",
        "- **INFO** `REPEATED_REQUESTS` — ",
        "- **WARNING** `UNPRICED_MODEL` — ",
    ] {
        assert_eq!(md.matches(a).count(), 1, "{a}:\n{md}");
    }
    line_index(&md, &[&format!("| `{}` | 5 |", prompt_hash(FAQ))]);
}

// ── 5. The seed's own SQL on the same database ──────────────────────────────────────────────

fn close(a: f64, b: f64, rel: f64, what: &str) {
    let scale = a.abs().max(b.abs()).max(f64::MIN_POSITIVE);
    assert!(
        (a - b).abs() / scale <= rel,
        "{what}: seed {a} vs report {b}"
    );
}

/// A top list with `LIMIT`: the seed orders by count only, so among equal counts its order —
/// and, at the cut, its choice — is arbitrary. Equal: the sequence of counts, and the names
/// of every entry counted more than the last one listed.
fn assert_same_top(seed: &[(String, u64)], report: &[(String, u64)], limit: usize, what: &str) {
    let report = &report[..report.len().min(limit)];
    let counts = |v: &[(String, u64)]| v.iter().map(|e| e.1).collect::<Vec<_>>();
    assert_eq!(counts(seed), counts(report), "{what}: counts");
    let cut = if seed.len() == limit {
        seed.last().map_or(0, |e| e.1)
    } else {
        0
    };
    let above = |v: &[(String, u64)]| {
        v.iter()
            .filter(|e| e.1 > cut)
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(above(seed), above(report), "{what}: entries above the cut");
}

fn pairs(v: &Value, name: &str, count: &str) -> Vec<(String, u64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[name].as_str().unwrap().to_owned(),
                e[count].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Runs `report` over [since, until) — `minutes` long, after every row — with thresholds that
/// make the rate and cost checks show their values, then the seed's `get_request_stats` and
/// `detect_anomalies` queries verbatim with the report's own `period.since` (the seed has no
/// upper bound), and compares.
fn assert_seed_queries_agree(db: &Path, dir: &Path, since: &str, until: &str, minutes: i64) {
    let th = Th {
        rpm: 0.0,
        cost_per_hour: 0.0,
        max_tokens: 2000,
        ..Th::default()
    };
    let cfg = th.config(dir, "seed-compare.toml");
    let r = report_json(
        db,
        &[
            "--since",
            since,
            "--until",
            until,
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    assert_eq!(r["period"]["minutes"], minutes as f64);
    let since = r["period"]["since"].as_str().unwrap();
    let last_hour_since = r["period"]["last_hour_since"].as_str().unwrap();
    let s = &r["stats"];
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();

    // get_request_stats: totals.
    let (total, failed, cost, tokens, avg): (i64, i64, f64, i64, f64) = conn
        .query_row(
            "SELECT
COUNT(*) as total_requests,
SUM(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END) as failed_requests,
SUM(cost_usd) as total_cost,
SUM(total_tokens) as total_tokens,
AVG(latency_ms) as avg_latency
FROM audit_logs
WHERE timestamp >= ?",
            [since],
            |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            },
        )
        .unwrap();
    assert!(total > 0);
    assert_eq!(s["total_requests"], total);
    assert_eq!(s["failed_requests"], failed);
    assert_eq!(s["failure_ratio"], rt(failed as f64 / total as f64));
    close(
        cost,
        s["total_cost"]["usd"].as_f64().unwrap(),
        1e-9,
        "total cost",
    );
    assert_eq!(s["total_tokens"], tokens);
    close(
        avg,
        s["avg_latency_ms"].as_f64().unwrap(),
        1e-12,
        "avg latency",
    );

    // Per model.
    let seed_models: Vec<(String, i64, f64, f64)> = conn
        .prepare(
            "SELECT
model,
COUNT(*) as count,
SUM(cost_usd) as cost,
AVG(latency_ms) as avg_latency
FROM audit_logs
WHERE timestamp >= ?
GROUP BY model
ORDER BY count DESC",
        )
        .unwrap()
        .query_map([since], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let report_models: BTreeMap<&str, &Value> = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["model"].as_str().unwrap(), m))
        .collect();
    assert_eq!(seed_models.len(), report_models.len());
    for (model, count, cost, avg) in &seed_models {
        let m = report_models[model.as_str()];
        assert_eq!(m["requests"], *count, "{model}");
        close(*cost, m["cost"]["usd"].as_f64().unwrap(), 1e-9, model);
        close(*avg, m["avg_latency_ms"].as_f64().unwrap(), 1e-12, model);
    }
    let seed_order: Vec<i64> = seed_models.iter().map(|m| m.1).collect();
    let report_order: Vec<i64> = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["requests"].as_i64().unwrap())
        .collect();
    assert_eq!(seed_order, report_order);

    // Errors, top 10.
    let seed_errors: Vec<(String, u64)> = conn
        .prepare(
            "SELECT
error_message,
COUNT(*) as count
FROM audit_logs
WHERE timestamp >= ? AND error_message IS NOT NULL
GROUP BY error_message
ORDER BY count DESC
LIMIT 10",
        )
        .unwrap()
        .query_map([since], |row| {
            Ok((row.get(0)?, row.get::<_, i64>(1)? as u64))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_same_top(
        &seed_errors,
        &pairs(&s["errors"], "error", "count"),
        10,
        "errors",
    );

    // Users, top 20, with their cost.
    let seed_users: Vec<(String, u64, f64)> = conn
        .prepare(
            "SELECT
user_id,
COUNT(*) as request_count,
SUM(cost_usd) as cost
FROM audit_logs
WHERE timestamp >= ? AND user_id IS NOT NULL
GROUP BY user_id
ORDER BY request_count DESC
LIMIT 20",
        )
        .unwrap()
        .query_map([since], |row| {
            Ok((row.get(0)?, row.get::<_, i64>(1)? as u64, row.get(2)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let seed_pairs: Vec<(String, u64)> = seed_users.iter().map(|u| (u.0.clone(), u.1)).collect();
    assert_same_top(
        &seed_pairs,
        &pairs(&s["top_users"], "user_id", "requests"),
        20,
        "users",
    );
    for (user, _, cost) in &seed_users {
        if let Some(u) = s["top_users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["user_id"] == user.as_str())
        {
            close(*cost, u["cost"]["usd"].as_f64().unwrap(), 1e-9, user);
        }
    }

    // detect_anomalies 1: requests per minute, an integer division in SQLite.
    let rpm: i64 = conn
        .query_row(
            "SELECT
COUNT(*) / ? as requests_per_minute
FROM audit_logs
WHERE timestamp >= ?",
            params![minutes, since],
            |row| row.get(0),
        )
        .unwrap();
    let rate = of_kind(&r, "HIGH_REQUEST_RATE");
    assert_eq!(rate.len(), 1);
    assert_eq!(
        rate[0].4,
        rt(total as f64 / minutes as f64),
        "not truncated"
    );
    assert_eq!(rate[0].4.floor() as i64, rpm, "the seed's truncated rate");

    // 2: failure ratio, judged above 10 calls.
    let (all, bad): (i64, i64) = conn
        .query_row(
            "SELECT
COUNT(*) as total,
SUM(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END) as failed
FROM audit_logs
WHERE timestamp >= ?",
            [since],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    let seed_fires = all > 10 && bad as f64 / all as f64 > 0.5;
    assert_eq!(!of_kind(&r, "HIGH_FAILURE_RATE").is_empty(), seed_fires);

    // 3: cost of the last hour.
    let hourly: Option<f64> = conn
        .query_row(
            "SELECT SUM(cost_usd)
FROM audit_logs
WHERE timestamp >= ?",
            [last_hour_since],
            |row| row.get(0),
        )
        .unwrap();
    let hourly = hourly.unwrap_or(0.0);
    let overrun = of_kind(&r, "COST_OVERRUN");
    if hourly > 0.0 {
        close(hourly, overrun[0].4, 1e-9, "hourly cost");
    } else {
        assert_eq!(overrun, vec![]);
    }

    // 4: users over the token limit.
    let seed_over: BTreeSet<(String, i64)> = conn
        .prepare(
            "SELECT
user_id,
MAX(total_tokens) as max_tokens,
COUNT(*) as count
FROM audit_logs
WHERE timestamp >= ? AND user_id IS NOT NULL
GROUP BY user_id
HAVING max_tokens > ?",
        )
        .unwrap()
        .query_map(params![since, th.max_tokens], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let report_over: BTreeSet<(String, i64)> = of_kind(&r, "EXCESSIVE_TOKEN_USAGE")
        .into_iter()
        .map(|f| (f.3.unwrap(), f.4 as i64))
        .collect();
    assert!(!seed_over.is_empty());
    assert_eq!(seed_over, report_over);

    // 5: repeated request hashes. The report leaves out '' (calls rejected before their prompt
    // was parsed); neither database here has such a row, and the filter is kept for the record.
    let seed_repeated: Vec<(String, u64)> = conn
        .prepare(
            "SELECT
request_hash,
COUNT(*) as count
FROM audit_logs
WHERE timestamp >= ?
GROUP BY request_hash
HAVING count > 3
ORDER BY count DESC
LIMIT 10",
        )
        .unwrap()
        .query_map([since], |row| {
            Ok((row.get(0)?, row.get::<_, i64>(1)? as u64))
        })
        .unwrap()
        .map(Result::unwrap)
        .filter(|(h, _): &(String, u64)| !h.is_empty())
        .collect();
    assert!(!seed_repeated.is_empty());
    assert_same_top(&seed_repeated, &repeated_hashes(&r), 10, "repeated hashes");
}

#[test]
fn the_seeds_queries_agree_with_the_report_on_the_fixture() {
    let recs = fixture();
    let h = write_db(&recs);
    // Until 13:00 so that the seed (no upper bound) and the report see the same rows.
    assert!(recs.iter().all(|r| r.ts < at(UNTIL, HOUR_US)));
    assert_seed_queries_agree(&h.db, h.dir.path(), SINCE, "2026-03-01T13:00:00Z", 180);
}

#[test]
fn the_seeds_queries_agree_with_the_report_on_a_log_written_by_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    // The period: whole minutes, from before the first call to after the last one.
    let start = chrono::Utc::now() - chrono::Duration::minutes(1);
    let since = start.format("%Y-%m-%dT%H:%M:00Z").to_string();
    let until = at(&since, 15 * MINUTE_US);

    // `llm-audit demo`: the real `serve` proxy in front of the simulated upstream, with ten
    // users, eight models (one unknown), 429/500s, repeated prompts and one huge prompt.
    let mut child = llm_audit()
        .args(["demo", "--duration", "3", "--rps", "40"])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--db")
        .arg(&db)
        .stdout(File::create(dir.path().join("demo.out")).unwrap())
        .stderr(File::create(dir.path().join("demo.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("demo did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(dir.path().join("demo.err")).unwrap_or_default();
    assert!(status.success(), "demo failed ({status}):\n{log}");
    assert!(chrono::Utc::now() < chrono::DateTime::parse_from_rfc3339(&until).unwrap());

    let r = report_json(&db, &["--since", &since, "--until", &until]);
    let s = &r["stats"];
    assert!(s["total_requests"].as_u64().unwrap() > 50, "{s}");
    assert!(s["models"].as_array().unwrap().len() > 3, "{s}");
    assert!(!s["top_users"].as_array().unwrap().is_empty(), "{s}");
    assert!(!r["repeated_hashes"].as_array().unwrap().is_empty(), "{r}");
    assert_seed_queries_agree(&db, dir.path(), &since, &until, 15);
}

// ── 6. A million rows ───────────────────────────────────────────────────────────────────────

const BULK_ROWS: usize = 1_000_000;
const BULK_DAY: &str = "2026-02-01T00:00:00Z";
const BULK_MODELS: [&str; 5] = [
    "gpt-4.1-mini",
    "deepseek-chat",
    "gpt-4.1",
    "gemini-2.5-flash",
    "bulk-llama",
];
/// Peak resident memory allowed to `report` over the million rows.
const BULK_RSS_LIMIT_KB: u64 = 100 * 1024;

/// Row `i` of the bulk log: one day, 86.4 ms apart; 5 models (one unknown); 250 users and some
/// anonymous calls; 300,000 distinct prompts (so 100,000 sent 4 times); 5% failed with 13
/// messages, 2% rate limited; latencies in quarter milliseconds.
struct BulkRow {
    ts: String,
    model: &'static str,
    user: Option<String>,
    hash: String,
    input: i64,
    output: i64,
    latency: f64,
    status: i64,
    error: Option<String>,
    usage: bool,
    pico: u128,
    priced: bool,
    /// In the last hour of the day.
    last_hour: bool,
}

fn bulk_row(i: usize) -> BulkRow {
    let us = i as i64 * 86_400;
    let (secs, frac) = (us / 1_000_000, us % 1_000_000);
    let ts = format!(
        "2026-02-01T{:02}:{:02}:{:02}.{frac:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    let model = BULK_MODELS[i % 5];
    let (status, error) = if i.is_multiple_of(20) {
        (500, Some(format!("upstream error {}", i % 13)))
    } else if i % 50 == 1 {
        (429, Some("rate limited".to_owned()))
    } else {
        (200, None)
    };
    let usage = status == 200;
    let (input, output) = if usage {
        (50 + (i % 1000) as i64, 5 + (i * 7 % 500) as i64)
    } else {
        (0, 0)
    };
    let (pin, pout, priced) = seed_price(model);
    BulkRow {
        ts,
        model,
        user: (i % 100 != 99).then(|| format!("bulk-user-{:03}", i % 250)),
        hash: format!("{:064x}", i % 300_000),
        input,
        output,
        latency: ((i * 7919) % 100_000) as f64 * 0.25,
        status,
        error,
        usage,
        pico: u128::from(pin) * input as u128 + u128::from(pout) * output as u128,
        priced,
        last_hour: us >= 23 * HOUR_US,
    }
}

/// Inserts rows `0..rows` of the bulk log into `db` (a log created by the store) in one
/// transaction with one prepared statement, handing each row to `each` as well. The rows are
/// not chained: the report does not read the chain.
fn bulk_fill(db: &Path, rows: usize, mut each: impl FnMut(&BulkRow)) {
    let mut conn = Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    conn.pragma_update(None, "cache_size", -262_144).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO audit_logs (timestamp, request_id, model, prompt_tokens, \
                 completion_tokens, total_tokens, latency_ms, status_code, cost_usd, user_id, \
                 request_hash, response_preview, ip_address, error_message, provider, endpoint, \
                 usage_source, cost_status, outcome, cost_picousd) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, '', '192.0.2.1', ?12, \
                 'openai', '/v1/chat/completions', ?13, ?14, ?15, ?16)",
            )
            .unwrap();
        for i in 0..rows {
            let r = bulk_row(i);
            let pico = i64::try_from(r.pico).unwrap();
            insert
                .execute(params![
                    r.ts,
                    format!("bulk-{i:07}"),
                    r.model,
                    r.input,
                    r.output,
                    r.input + r.output,
                    r.latency,
                    r.status,
                    pico as f64 / 1e12,
                    r.user,
                    r.hash,
                    r.error,
                    if r.usage { "reported" } else { "missing" },
                    if r.priced { "priced" } else { "fallback" },
                    if r.usage { "ok" } else { "error" },
                    pico,
                ])
                .unwrap();
            each(&r);
        }
    }
    tx.commit().unwrap();
}

/// Runs `cmd` with stdout to `out`, sampling the child's peak resident set
/// ([`support::wait_sampling_peak_rss`]).
fn run_measured(cmd: &mut std::process::Command, out: &Path) -> (ExitStatus, Duration, u64) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(File::create(out).unwrap())
        .stderr(File::create(out.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let (status, peak_kb) = support::wait_sampling_peak_rss(&mut child);
    (status, started.elapsed(), peak_kb)
}

#[test]
fn a_million_rows_report_correctly_in_bounded_memory() {
    // The schema from the real store, with a few chained records (outside the bulk period).
    let h = write_db(&[
        Rec::ok(at("2026-01-31T12:00:00Z", 0), "gpt-4.1", "schema 1", 10, 10),
        Rec::ok(at("2026-01-31T12:00:00Z", 1), "gpt-4.1", "schema 2", 10, 10),
        Rec::ok(at("2026-01-31T12:00:00Z", 2), "gpt-4.1", "schema 3", 10, 10),
    ]);

    let started = Instant::now();
    let mut acc = Acc::default();
    let mut last_hour_pico = 0u128;
    bulk_fill(&h.db, BULK_ROWS, |r| {
        acc.add(&Row {
            model: r.model,
            user: r.user.as_deref(),
            hash: &r.hash,
            input: r.input,
            output: r.output,
            latency: r.latency,
            status: r.status,
            error: r.error.as_deref(),
            pico: r.pico,
            unpriced: r.usage && !r.priced,
        });
        if r.last_hour {
            last_hour_pico += r.pico;
        }
    });
    let filled = started.elapsed();

    let dir = h.dir.path();
    let out = dir.join("bulk.json");
    let mut cmd = llm_audit();
    cmd.arg("report").arg("--db").arg(&h.db).args([
        "--since",
        BULK_DAY,
        "--until",
        "2026-02-02T00:00:00Z",
        "--format",
        "json",
    ]);
    let (status, took, peak_kb) = run_measured(&mut cmd, &out);
    let stderr = std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
    // For scale: the same binary reporting an empty period of the same file.
    let mut idle = llm_audit();
    idle.arg("report")
        .arg("--db")
        .arg(&h.db)
        .args([
            "--since",
            "2025-01-01T00:00:00Z",
            "--until",
            "2025-01-02T00:00:00Z",
        ])
        .args(["--format", "json"]);
    let (_, idle_took, idle_kb) = run_measured(&mut idle, &dir.join("idle.json"));
    eprintln!(
        "report_cli bulk: {BULK_ROWS} rows generated and inserted in {:.1} s; \
         `report --format json` took {:.1} s with a peak RSS of {:.1} MB \
         (an empty period of the same file: {:.2} s, {:.1} MB)",
        filled.as_secs_f64(),
        took.as_secs_f64(),
        peak_kb as f64 / 1024.0,
        idle_took.as_secs_f64(),
        idle_kb as f64 / 1024.0
    );
    assert!(status.success(), "report failed ({status}): {stderr}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    assert_eq!(acc.n, BULK_ROWS as u64);
    assert_json_eq(&r["stats"], &acc.stats(), "stats");
    let th = Th::default();
    assert_eq!(repeated_hashes(&r), acc.repeated(&th));
    assert_eq!(repeated_hashes(&r).len(), 100, "the list is capped at 100");
    assert_eq!(findings(&r), acc.findings(&th, 1440.0, last_hour_pico));
    assert!(peak_kb > 0, "no VmHWM sample");
    assert!(
        peak_kb < BULK_RSS_LIMIT_KB,
        "report used {peak_kb} kB over {BULK_ROWS} rows"
    );
}

/// A report is one snapshot of the log, even while the proxy keeps writing to it: its totals and
/// its breakdowns are read from the same rows. 100,000 rows make each query take a moment; a
/// thread appends records through the real store (committed every few milliseconds) for the
/// whole run of `report` over an open-ended period (`--since` only, as `--hours` is).
#[test]
fn a_report_is_one_snapshot_of_a_log_being_written() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let h = common::harness();
    bulk_fill(&h.db, 100_000, |_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let store = h.store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let r = Rec::ok(
                    at("2026-02-01T12:00:00Z", i as i64),
                    "gpt-4.1",
                    &format!("live {i}"),
                    10,
                    10,
                );
                let (_, queued) = store.submit(r.to_record(1_000_000 + i));
                assert!(queued.is_ok());
                i += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            i
        })
    };
    let r = report_json(&h.db, &["--since", BULK_DAY]);
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    h.store.shutdown();
    assert!(written > 0);

    let s = &r["stats"];
    let total = s["total_requests"].as_u64().unwrap();
    assert!(total >= 100_000);
    let models = s["models"].as_array().unwrap();
    let per_model: u64 = models.iter().map(|m| m["requests"].as_u64().unwrap()).sum();
    let pico = |v: &Value| v["picousd"].as_str().unwrap().parse::<u128>().unwrap();
    let per_model_cost: u128 = models.iter().map(|m| pico(&m["cost"])).sum();
    assert_eq!(
        (per_model, per_model_cost),
        (total, pico(&s["total_cost"])),
        "per-model requests and cost vs the totals: read from different snapshots \
         ({written} records were written during the report)"
    );
}
