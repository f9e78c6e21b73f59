#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The Prometheus catalog of DESIGN §5 as a scraper sees it: families, HELP/TYPE, label names,
//! buckets, label caps, and counters that agree with the audit log's rows.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use llm_audit::audit::recorder::key_fingerprint;
use llm_audit::audit::usage::parse_json_response;
use llm_audit::audit::{CallEnd, CallStart, Emitted, Operation, ParsedRequest, ResponseSummary};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// A small parser for the Prometheus text exposition format
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Scrape {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn parse_labels(s: &str) -> (BTreeMap<String, String>, &str) {
    // `s` starts right after `{`; returns the labels and the rest after `}`.
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let eq = rest.find('=').expect("label name followed by =");
        let name = rest[..eq].to_owned();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name {name:?}"
        );
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .expect("label value opens with a quote");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next().expect("label value closes");
            match c {
                '\\' => match chars.next().expect("escape").1 {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    other => panic!("bad escape \\{other}"),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        rest = &rest[end + 1..];
        assert!(
            labels.insert(name.clone(), value).is_none(),
            "label {name} repeated"
        );
    }
}

fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(
                scrape.help.insert(name.into(), help.into()).is_none(),
                "HELP of {name} twice"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(
                scrape.types.insert(name.into(), ty.into()).is_none(),
                "TYPE of {name} twice"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let name_end = line.find(['{', ' ']).expect("sample name");
        let name = line[..name_end].to_owned();
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end + 1..])
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = rest.trim();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
        };
        scrape.samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    scrape
}

impl Scrape {
    /// Samples of one family (a histogram's `_bucket`, `_sum` and `_count` included).
    fn family(&self, family: &str) -> Vec<&Sample> {
        let histogram = self.types.get(family).map(String::as_str) == Some("histogram");
        self.samples
            .iter()
            .filter(|s| {
                s.name == family
                    || (histogram
                        && [
                            format!("{family}_bucket"),
                            format!("{family}_sum"),
                            format!("{family}_count"),
                        ]
                        .contains(&s.name))
            })
            .collect()
    }

    /// Plain samples (counters, gauges) or `_count` samples (histograms) of a family.
    fn series(&self, family: &str) -> Vec<&Sample> {
        let histogram = self.types.get(family).map(String::as_str) == Some("histogram");
        let name = if histogram {
            format!("{family}_count")
        } else {
            family.to_owned()
        };
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the one series of `family` with exactly these labels.
    fn value(&self, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.series(family)
            .into_iter()
            .find(|s| s.labels == want)
            .map(|s| s.value)
    }

    /// Sum over all series of a family whose labels include `filter`.
    fn sum(&self, family: &str, filter: &[(&str, &str)]) -> f64 {
        self.series(family)
            .into_iter()
            .filter(|s| {
                filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Distinct values of `label` in a family.
    fn label_values(&self, family: &str, label: &str) -> BTreeSet<String> {
        self.family(family)
            .into_iter()
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }

    /// Bucket bounds of a histogram family (one series' worth), `+Inf` excluded.
    fn bucket_bounds(&self, family: &str) -> Vec<f64> {
        let bucket = format!("{family}_bucket");
        let first = self
            .samples
            .iter()
            .find(|s| s.name == bucket)
            .unwrap_or_else(|| panic!("{family} has no bucket"));
        let mut others = first.labels.clone();
        others.remove("le");
        let mut bounds: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == bucket)
            .filter(|s| {
                let mut l = s.labels.clone();
                l.remove("le");
                l == others
            })
            .map(|s| s.labels["le"].parse::<f64>().unwrap())
            .filter(|b| b.is_finite())
            .collect();
        bounds.sort_by(f64::total_cmp);
        bounds
    }

    fn all_label_values(&self) -> Vec<(&str, &str, &str)> {
        self.samples
            .iter()
            .flat_map(|s| {
                s.labels
                    .iter()
                    .map(move |(k, v)| (s.name.as_str(), k.as_str(), v.as_str()))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Driving calls through the recorder
// ---------------------------------------------------------------------------------------------

fn chat(model: &str, user: Option<&str>, content: &str, stream: bool) -> CallStart {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 50,
        "stream": stream,
    });
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    CallStart::from_request(
        ParsedRequest::from_value(Operation::Chat, body, None).unwrap(),
        Arc::from("openai"),
    )
}

fn answer(
    model: Option<&str>,
    input: i64,
    output: i64,
    cached: i64,
    reasoning: i64,
) -> ResponseSummary {
    let mut body = json!({
        "id": "chatcmpl-metrics",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": input,
            "completion_tokens": output,
            "total_tokens": input + output,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}
        }
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    parse_json_response(body.to_string().as_bytes()).unwrap()
}

fn ok(input: i64, output: i64) -> CallEnd {
    CallEnd::ok(200, answer(Some("gpt-4.1-2025-04-14"), input, output, 0, 0))
}

fn run(h: &common::Harness, call: CallStart, end: CallEnd) -> Emitted {
    let e = h.recorder.begin(call).finish(end);
    assert!(e.dropped.is_none(), "record dropped: {:?}", e.dropped);
    e
}

/// A varied workload: priced and unknown models, users and no user, a stream with a first
/// chunk, a duplicate prompt, an upstream error, an aborted call with estimated usage.
fn workload(h: &common::Harness) -> Vec<Emitted> {
    let mut out = vec![
        run(
            h,
            chat("gpt-4.1", Some("alice"), "first question", false),
            CallEnd::ok(
                200,
                answer(Some("gpt-4.1-2025-04-14"), 1200, 300, 1000, 100),
            ),
        ),
        run(
            h,
            chat("deepseek-chat", Some("bob"), "second question", false),
            CallEnd::ok(200, answer(Some("deepseek-chat"), 777, 333, 0, 0)),
        ),
        run(
            h,
            chat("mystery-model-x", Some("carol"), "third question", false),
            CallEnd::ok(200, answer(Some("mystery-model-x"), 1000, 1000, 0, 0)),
        ),
        run(
            h,
            chat("gpt-4.1-mini", None, "fourth question", false),
            CallEnd::error(502, "transport", "boom"),
        ),
    ];
    let mut stream = h.recorder.begin(chat(
        "gpt-4.1-mini",
        Some("alice"),
        "streamed question",
        true,
    ));
    stream.mark_first_chunk();
    out.push(stream.finish(CallEnd::ok(200, answer(Some("gpt-4.1-mini"), 40, 12, 0, 0))));
    // The same prompt twice.
    out.push(run(
        h,
        chat("gpt-4.1", Some("dave"), "same prompt", false),
        ok(10, 5),
    ));
    out.push(run(
        h,
        chat("gpt-4.1", Some("dave"), "same prompt", false),
        ok(10, 5),
    ));
    // The client left mid-answer: no usage, tokens estimated from what arrived.
    let partial = ResponseSummary {
        text: "The answer begins like this and then".into(),
        ..ResponseSummary::default()
    };
    out.push(run(
        h,
        chat("gpt-4.1", Some("erin"), "a question left unanswered", true),
        CallEnd::aborted(200, partial),
    ));
    out
}

// ---------------------------------------------------------------------------------------------
// The catalog
// ---------------------------------------------------------------------------------------------

/// DESIGN §5: (family, type, label names).
const CATALOG: &[(&str, &str, &[&str])] = &[
    (
        "llm_audit_requests_total",
        "counter",
        &["provider", "model", "outcome", "status"],
    ),
    (
        "llm_audit_tokens_total",
        "counter",
        &["provider", "model", "type"],
    ),
    (
        "llm_audit_cost_usd_total",
        "counter",
        &["provider", "model", "cost_status"],
    ),
    (
        "llm_audit_request_duration_seconds",
        "histogram",
        &["provider", "model", "outcome"],
    ),
    (
        "llm_audit_time_to_first_token_seconds",
        "histogram",
        &["provider", "model"],
    ),
    ("llm_audit_overhead_seconds", "histogram", &[]),
    (
        "llm_audit_duplicate_requests_total",
        "counter",
        &["provider", "model"],
    ),
    (
        "llm_audit_unpriced_requests_total",
        "counter",
        &["provider", "model"],
    ),
    (
        "llm_audit_user_requests_total",
        "counter",
        &["user", "outcome"],
    ),
    ("llm_audit_user_cost_usd_total", "counter", &["user"]),
    ("llm_audit_user_request_tokens", "histogram", &["user"]),
    ("llm_audit_auth_failures_total", "counter", &["reason"]),
    ("llm_audit_records_written_total", "counter", &[]),
    ("llm_audit_records_dropped_total", "counter", &["reason"]),
    ("llm_audit_store_errors_total", "counter", &[]),
    ("llm_audit_store_queue_depth", "gauge", &[]),
    ("llm_audit_span_export_errors_total", "counter", &[]),
    ("llm_audit_build_info", "gauge", &["version"]),
    ("llm_audit_label_overflow_total", "counter", &["label"]),
    // The conventional process start time: the alert rules tell a young process from a
    // Prometheus that just started scraping an old one by it.
    ("process_start_time_seconds", "gauge", &[]),
    (
        "gen_ai_client_token_usage",
        "histogram",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_response_model",
            "gen_ai_token_type",
        ],
    ),
    (
        "gen_ai_client_operation_duration_seconds",
        "histogram",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_response_model",
            "error_type",
        ],
    ),
];

const DROP_REASONS: [&str; 3] = ["queue_full", "closed", "write_failed"];
const AUTH_FAILURE_REASONS: [&str; 3] = ["missing_key", "unknown_key", "malformed"];

#[test]
fn every_family_has_help_type_and_its_labels() {
    let h = common::harness();
    let emitted = workload(&h);
    let scrape = parse(&h.metrics.encode());

    for (family, ty, labels) in CATALOG {
        let help = scrape
            .help
            .get(*family)
            .unwrap_or_else(|| panic!("no # HELP for {family}"));
        assert!(!help.trim().is_empty(), "{family} has an empty HELP");
        assert_eq!(
            scrape.types.get(*family).map(String::as_str),
            Some(*ty),
            "# TYPE of {family}"
        );
        let samples = scrape.family(family);
        assert!(!samples.is_empty(), "{family} has no series after traffic");
        let want: BTreeSet<&str> = labels.iter().copied().collect();
        for s in samples {
            let mut have: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            if s.name.ends_with("_bucket") && *ty == "histogram" {
                assert!(have.remove("le"), "{} without le", s.name);
            }
            assert_eq!(have, want, "label names of {}", s.name);
        }
        if *ty == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                assert!(
                    scrape
                        .samples
                        .iter()
                        .any(|s| s.name == format!("{family}{suffix}")),
                    "{family}{suffix} missing"
                );
            }
        }
    }

    // Every family in the scrape is in the catalog (no stray or misspelt names).
    let catalog: HashSet<&str> = CATALOG.iter().map(|(f, _, _)| *f).collect();
    for family in scrape.types.keys() {
        assert!(
            catalog.contains(family.as_str()),
            "{family} not in DESIGN §5"
        );
    }

    // Values that the workload fixes.
    let v = |f: &str, l: &[(&str, &str)]| {
        scrape
            .value(f, l)
            .unwrap_or_else(|| panic!("no series {f}{l:?}"))
    };
    assert_eq!(
        v(
            "llm_audit_requests_total",
            &[
                ("provider", "openai"),
                ("model", "gpt-4.1-mini"),
                ("outcome", "error"),
                ("status", "502")
            ]
        ),
        1.0
    );
    assert_eq!(
        scrape.sum("llm_audit_requests_total", &[]),
        emitted.len() as f64
    );
    assert_eq!(
        scrape.sum("llm_audit_requests_total", &[("outcome", "aborted")]),
        1.0
    );
    assert_eq!(
        v(
            "llm_audit_time_to_first_token_seconds",
            &[("provider", "openai"), ("model", "gpt-4.1-mini")]
        ),
        1.0,
        "one streamed call marked its first chunk"
    );
    assert_eq!(
        scrape.sum("llm_audit_time_to_first_token_seconds", &[]),
        1.0,
        "calls without a first chunk observe no TTFT"
    );
    assert_eq!(
        v(
            "llm_audit_unpriced_requests_total",
            &[("provider", "openai"), ("model", "mystery-model-x")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "llm_audit_cost_usd_total",
            &[
                ("provider", "openai"),
                ("model", "mystery-model-x"),
                ("cost_status", "fallback")
            ]
        ),
        // Seed fallback: 1000 in × 10 + 1000 out × 30 USD per 1M tokens.
        0.04
    );
    assert_eq!(
        scrape.label_values("llm_audit_tokens_total", "type"),
        ["cache_read", "input", "output", "reasoning"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        v(
            "llm_audit_tokens_total",
            &[
                ("provider", "openai"),
                ("model", "gpt-4.1"),
                ("type", "cache_read")
            ]
        ),
        1000.0
    );
    assert_eq!(
        v(
            "llm_audit_tokens_total",
            &[
                ("provider", "openai"),
                ("model", "gpt-4.1"),
                ("type", "reasoning")
            ]
        ),
        100.0
    );
    assert_eq!(
        scrape.sum("llm_audit_user_requests_total", &[("user", "alice")]),
        2.0
    );
    assert_eq!(
        scrape.sum("llm_audit_user_requests_total", &[("user", "__none__")]),
        1.0,
        "calls without a user are counted under __none__"
    );
    assert_eq!(
        v(
            "llm_audit_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        v(
            "gen_ai_client_token_usage",
            &[
                ("gen_ai_operation_name", "chat"),
                ("gen_ai_provider_name", "openai"),
                ("gen_ai_request_model", "deepseek-chat"),
                ("gen_ai_response_model", "deepseek-chat"),
                ("gen_ai_token_type", "input"),
            ]
        ),
        1.0
    );
    assert_eq!(
        scrape.sum(
            "gen_ai_client_operation_duration_seconds",
            &[("error_type", "transport")]
        ),
        1.0
    );
    assert_eq!(
        scrape.label_values("gen_ai_client_token_usage", "gen_ai_token_type"),
        ["input", "output"].map(String::from).into()
    );

    // GenAI-convention buckets: tokens in powers of 4 from 1 to 67,108,864; durations doubling
    // from 10 ms to 81.92 s.
    let powers_of_4: Vec<f64> = (0..14).map(|i| 4f64.powi(i)).collect();
    assert_eq!(
        scrape.bucket_bounds("gen_ai_client_token_usage"),
        powers_of_4
    );
    assert_eq!(*powers_of_4.last().unwrap(), 67_108_864.0);
    let doubling: Vec<f64> = (0..14).map(|i| 0.01 * 2f64.powi(i)).collect();
    for family in [
        "gen_ai_client_operation_duration_seconds",
        "llm_audit_request_duration_seconds",
        "llm_audit_time_to_first_token_seconds",
    ] {
        let bounds = scrape.bucket_bounds(family);
        assert_eq!(bounds.len(), doubling.len(), "{family}: {bounds:?}");
        for (b, want) in bounds.iter().zip(&doubling) {
            assert!((b - want).abs() < 1e-9, "{family}: {bounds:?}");
        }
    }

    promtool_check(&h.metrics.encode());
}

/// `promtool check metrics`. Without promtool the check is skipped locally but fails in CI
/// (`CI` set), where `.ci/run` installs it.
fn promtool_check(text: &str) {
    use std::io::Write as _;
    let Some(promtool) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    }) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required when CI is set (apt-get install prometheus)"
        );
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn known_series_exist_at_zero_before_traffic() {
    let h = common::harness();
    let scrape = parse(&h.metrics.encode());
    for reason in DROP_REASONS {
        assert_eq!(
            scrape.value("llm_audit_records_dropped_total", &[("reason", reason)]),
            Some(0.0),
            "records_dropped{{reason={reason}}} at start-up"
        );
    }
    for reason in AUTH_FAILURE_REASONS {
        assert_eq!(
            scrape.value("llm_audit_auth_failures_total", &[("reason", reason)]),
            Some(0.0),
            "auth_failures{{reason={reason}}} at start-up"
        );
    }
    assert_eq!(
        llm_audit::telemetry::metrics::DROP_REASONS,
        DROP_REASONS,
        "the catalog's drop reasons"
    );
    assert_eq!(
        llm_audit::telemetry::metrics::AUTH_FAILURE_REASONS,
        AUTH_FAILURE_REASONS,
        "the catalog's auth failure reasons"
    );
    for (family, labels) in [
        ("llm_audit_records_written_total", vec![]),
        ("llm_audit_store_errors_total", vec![]),
        ("llm_audit_store_queue_depth", vec![]),
        ("llm_audit_span_export_errors_total", vec![]),
        ("llm_audit_overhead_seconds", vec![]),
        ("llm_audit_label_overflow_total", vec![("label", "user")]),
        ("llm_audit_label_overflow_total", vec![("label", "model")]),
    ] {
        assert_eq!(
            scrape.value(family, &labels),
            Some(0.0),
            "{family}{labels:?} at start-up"
        );
        assert!(scrape.help.contains_key(family) && scrape.types.contains_key(family));
    }
}

#[test]
fn user_label_is_capped() {
    let h = common::harness_with(|c| c.metrics.max_user_labels = 5);
    for i in 0..50 {
        let user = format!("user-{i:02}");
        run(
            &h,
            chat("gpt-4.1", Some(&user), &format!("question {i}"), false),
            ok(100, 10),
        );
    }
    let scrape = parse(&h.metrics.encode());
    for family in [
        "llm_audit_user_requests_total",
        "llm_audit_user_cost_usd_total",
        "llm_audit_user_request_tokens",
    ] {
        let users = scrape.label_values(family, "user");
        let named: Vec<&String> = users.iter().filter(|u| *u != "__other__").collect();
        assert!(
            named.len() <= 5,
            "{family} has {} users: {named:?}",
            named.len()
        );
        assert!(users.contains("__other__"), "{family}: {users:?}");
    }
    assert_eq!(scrape.sum("llm_audit_user_requests_total", &[]), 50.0);
    assert_eq!(
        scrape.sum("llm_audit_user_requests_total", &[("user", "__other__")]),
        45.0
    );
    assert_eq!(
        scrape.value("llm_audit_label_overflow_total", &[("label", "user")]),
        Some(45.0)
    );
    // The cap bounds labels, not the audit log: every user is in the rows.
    h.store.shutdown();
    let db = rusqlite::Connection::open(&h.db).unwrap();
    let distinct: i64 = db
        .query_row("SELECT COUNT(DISTINCT user_id) FROM audit_logs", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(distinct, 50);
}

#[test]
fn unknown_models_are_capped_priced_models_pass() {
    let h = common::harness_with(|c| c.metrics.max_model_labels = 3);
    let seed = [
        "gpt-4.1",
        "gpt-4.1-mini",
        "claude-sonnet-4-20250514",
        "claude-3-5-sonnet-20241022",
        "gemini-2.5-flash",
        "deepseek-chat",
        "deepseek-coder",
    ];
    for i in 0..10 {
        run(
            &h,
            chat(
                &format!("mystery-{i}"),
                None,
                &format!("unknown {i}"),
                false,
            ),
            // No `model` in the answer: only the requested name meets the cap.
            CallEnd::ok(200, answer(None, 10, 10, 0, 0)),
        );
    }
    for (i, model) in seed.iter().enumerate() {
        run(
            &h,
            chat(model, None, &format!("priced {i}"), false),
            CallEnd::ok(200, answer(None, 10, 10, 0, 0)),
        );
    }
    let scrape = parse(&h.metrics.encode());
    for family in [
        "llm_audit_requests_total",
        "llm_audit_tokens_total",
        "llm_audit_cost_usd_total",
        "llm_audit_request_duration_seconds",
    ] {
        let models = scrape.label_values(family, "model");
        for m in seed {
            assert!(
                models.contains(m),
                "{family}: priced {m} missing from {models:?}"
            );
        }
        let unknown: Vec<&String> = models
            .iter()
            .filter(|m| !seed.contains(&m.as_str()) && *m != "__other__")
            .collect();
        assert!(unknown.len() <= 3, "{family}: {unknown:?}");
        assert!(models.contains("__other__"), "{family}: {models:?}");
    }
    assert_eq!(
        scrape.sum("llm_audit_requests_total", &[("model", "__other__")]),
        7.0
    );
    assert_eq!(
        scrape.value("llm_audit_label_overflow_total", &[("label", "model")]),
        Some(7.0)
    );
    let genai_models = scrape.label_values(
        "gen_ai_client_operation_duration_seconds",
        "gen_ai_request_model",
    );
    assert!(genai_models.len() <= seed.len() + 3 + 1, "{genai_models:?}");
    // The rows keep the names as sent.
    h.store.shutdown();
    let db = rusqlite::Connection::open(&h.db).unwrap();
    let distinct: i64 = db
        .query_row("SELECT COUNT(DISTINCT model) FROM audit_logs", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(distinct, 17);
}

#[test]
fn user_request_tokens_has_a_bucket_at_the_threshold() {
    let h = common::harness();
    run(
        &h,
        chat("gpt-4.1", Some("alice"), "q", false),
        ok(60_000, 100),
    );
    let scrape = parse(&h.metrics.encode());
    let bounds = scrape.bucket_bounds("llm_audit_user_request_tokens");
    assert!(bounds.contains(&100_000.0), "{bounds:?}");
    assert!(
        h.metrics
            .encode()
            .contains("llm_audit_user_request_tokens_bucket{user=\"alice\",le=\"100000\"} 1"),
        "le=\"100000\" spelled as the alert rule expects"
    );

    let h = common::harness_with(|c| c.thresholds.max_tokens_per_request = 123_456);
    // Exactly at the threshold (inside le), and one token above it (outside).
    run(
        &h,
        chat("gpt-4.1", Some("bob"), "q1", false),
        ok(123_000, 456),
    );
    run(
        &h,
        chat("gpt-4.1", Some("bob"), "q2", false),
        ok(123_000, 457),
    );
    let scrape = parse(&h.metrics.encode());
    let bounds = scrape.bucket_bounds("llm_audit_user_request_tokens");
    assert!(bounds.contains(&123_456.0), "{bounds:?}");
    let bucket = |le: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.name == "llm_audit_user_request_tokens_bucket"
                    && s.labels.get("le").map(String::as_str) == Some(le)
                    && s.labels.get("user").map(String::as_str) == Some("bob")
            })
            .unwrap_or_else(|| panic!("no bucket le={le}"))
            .value
    };
    assert_eq!(bucket("123456"), 1.0);
    assert_eq!(bucket("64000"), 0.0);
    assert_eq!(bucket("128000"), 2.0);
    assert_eq!(bucket("+Inf"), 2.0);
}

#[test]
fn token_and_cost_counters_equal_the_rows() {
    let h = common::harness();
    let mut emitted = workload(&h);
    for i in 0..40_i64 {
        let model = ["gpt-4.1", "gpt-4.1-mini", "deepseek-chat", "unknown-llm"][i as usize % 4];
        emitted.push(run(
            &h,
            chat(
                model,
                Some(&format!("u{}", i % 7)),
                &format!("load {i}"),
                false,
            ),
            CallEnd::ok(
                200,
                answer(Some(model), 1 + i * 37, 3 + i * 11, i * 5, i % 3),
            ),
        ));
    }
    let scrape = parse(&h.metrics.encode());
    let total_picousd = h.metrics.cost.total_picousd();
    let user_picousd = h.metrics.user_cost.total_picousd();
    h.store.shutdown();

    let db = rusqlite::Connection::open(&h.db).unwrap();
    let (rows, input, output, cached, reasoning, cost_usd, cost_pico): (
        i64,
        i64,
        i64,
        i64,
        i64,
        f64,
        i64,
    ) = db
        .query_row(
            "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), \
             SUM(reasoning_tokens), SUM(cost_usd), SUM(cost_picousd) FROM audit_logs",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(rows, emitted.len() as i64);
    assert!(input > 0 && output > 0 && cached > 0 && reasoning > 0);
    for (kind, want) in [
        ("input", input),
        ("output", output),
        ("cache_read", cached),
        ("reasoning", reasoning),
    ] {
        assert_eq!(
            scrape.sum("llm_audit_tokens_total", &[("type", kind)]),
            want as f64,
            "tokens_total{{type={kind}}} vs SUM of the rows"
        );
    }
    // The GenAI histogram's sums count the same tokens.
    let genai_sum = |kind: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| {
                s.name == "gen_ai_client_token_usage_sum"
                    && s.labels.get("gen_ai_token_type").map(String::as_str) == Some(kind)
            })
            .map(|s| s.value)
            .sum()
    };
    assert_eq!(genai_sum("input"), input as f64);
    assert_eq!(genai_sum("output"), output as f64);

    assert_eq!(
        total_picousd,
        u128::try_from(cost_pico).unwrap(),
        "exact cost"
    );
    assert_eq!(
        user_picousd, total_picousd,
        "per-user cost adds up to the total"
    );
    let scraped_cost = scrape.sum("llm_audit_cost_usd_total", &[]);
    assert!(cost_usd > 0.0);
    assert!(
        (scraped_cost - cost_usd).abs() <= cost_usd * 1e-12,
        "cost counter {scraped_cost} vs SUM(cost_usd) {cost_usd}"
    );
    let scraped_user_cost = scrape.sum("llm_audit_user_cost_usd_total", &[]);
    assert!((scraped_user_cost - cost_usd).abs() <= cost_usd * 1e-12);

    // Store counters after the final commit.
    let after = parse(&h.metrics.encode());
    assert_eq!(
        after.value("llm_audit_records_written_total", &[]),
        Some(rows as f64)
    );
    assert_eq!(after.value("llm_audit_store_queue_depth", &[]), Some(0.0));
    assert_eq!(after.value("llm_audit_store_errors_total", &[]), Some(0.0));
    assert_eq!(after.sum("llm_audit_records_dropped_total", &[]), 0.0);
}

#[test]
fn duplicate_prompt_is_counted_once() {
    let h = common::harness();
    let first = run(
        &h,
        chat("deepseek-chat", Some("a"), "repeat me", false),
        ok(5, 5),
    );
    let second = run(
        &h,
        chat("deepseek-chat", Some("b"), "repeat me", false),
        ok(5, 5),
    );
    let other = run(
        &h,
        chat("deepseek-chat", Some("a"), "something else", false),
        ok(5, 5),
    );
    assert!(!first.duplicate);
    assert!(
        second.duplicate,
        "the second identical prompt is a duplicate"
    );
    assert!(!other.duplicate);
    assert_eq!(first.record.request_hash, second.record.request_hash);
    assert_ne!(first.record.request_hash, other.record.request_hash);
    let scrape = parse(&h.metrics.encode());
    assert_eq!(
        scrape.value(
            "llm_audit_duplicate_requests_total",
            &[("provider", "openai"), ("model", "deepseek-chat")]
        ),
        Some(1.0)
    );
    assert_eq!(scrape.sum("llm_audit_duplicate_requests_total", &[]), 1.0);
}

#[test]
fn no_ids_hashes_or_keys_in_label_values() {
    let h = common::harness();
    let raw_key = "sk-test-0123456789abcdefghijklmnopqrstuv";
    let fingerprint = key_fingerprint(raw_key);
    let mut emitted = workload(&h);
    for i in 0..5 {
        let mut call = chat("gpt-4.1", Some("keyed-user"), &format!("keyed {i}"), false);
        call.key_id = Some(fingerprint.clone());
        call.ip_address = Some("198.51.100.23".into());
        emitted.push(run(&h, call, ok(10, 10)));
    }
    // An awkward user id is escaped, not broken or dropped.
    let odd_user = "eve \"quoted\"\nline\\slash";
    emitted.push(run(
        &h,
        chat("gpt-4.1", Some(odd_user), "odd user", false),
        ok(1, 1),
    ));
    assert!(
        emitted.iter().all(|e| e.record.key_id.is_none()
            || e.record.key_id.as_deref() == Some(fingerprint.as_str()))
    );

    let text = h.metrics.encode();
    let scrape = parse(&text);
    assert!(
        scrape
            .label_values("llm_audit_user_requests_total", "user")
            .contains(odd_user),
        "escaped user label round-trips"
    );

    let ids: HashSet<&str> = emitted
        .iter()
        .map(|e| e.record.request_id.as_str())
        .collect();
    let hashes: HashSet<&str> = emitted
        .iter()
        .flat_map(|e| {
            [
                e.record.request_hash.as_str(),
                e.record.record_hash.as_str(),
            ]
        })
        .collect();
    let is_hex64 = |v: &str| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
    for (metric, label, value) in scrape.all_label_values() {
        assert!(!ids.contains(value), "{metric}{{{label}}} is a request id");
        assert!(!hashes.contains(value), "{metric}{{{label}}} is a hash");
        assert!(
            !is_hex64(value),
            "{metric}{{{label}}} looks like a hash: {value}"
        );
        assert!(
            !value.starts_with("key_") && !value.starts_with("sk-"),
            "{metric}{{{label}}} looks like a key: {value}"
        );
        assert_ne!(
            value, "198.51.100.23",
            "{metric}{{{label}}} is a client address"
        );
    }
    for secret in [raw_key, fingerprint.as_str(), &fingerprint[4..]] {
        assert!(!text.contains(secret), "{secret} in the scrape");
    }
    for id in &ids {
        assert!(!text.contains(id), "request id {id} in the scrape");
    }
    for hash in &hashes {
        assert!(!text.contains(hash), "hash {hash} in the scrape");
    }
}
