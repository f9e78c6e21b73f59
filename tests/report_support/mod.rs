//! What `tests/report_cli.rs` needs besides the tests themselves: running the built binary,
//! records with chosen values written through the real store, and an independent model of the
//! report (the seed's price table, request hash and statistics, computed in Rust from the list
//! of records the test generated — never from SQL).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use llm_audit::audit::{
    AuditRecord, Cost, Operation, Outcome, ParsedRequest, PriceTable, Usage, UsageSource,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::common;
use super::support::llm_audit;

// ── Running the binary ──────────────────────────────────────────────────────────────────────

/// What a finished `llm-audit report` left.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// `llm-audit report --db DB ARGS…`.
pub fn report(db: &Path, args: &[&str]) -> Run {
    let out = llm_audit()
        .arg("report")
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `llm-audit report --format json …`, which must succeed.
pub fn report_json(db: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let run = report(db, &all);
    assert_eq!(run.code, Some(0), "report {args:?} failed: {}", run.stderr);
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("report JSON does not parse ({e}):\n{}", run.stdout))
}

// ── Thresholds ──────────────────────────────────────────────────────────────────────────────

/// The `[thresholds]` the checks use (DESIGN §6); `Default` is the seed's.
#[derive(Clone, Copy, Debug)]
pub struct Th {
    pub rpm: f64,
    pub failed_ratio: f64,
    pub min_requests: u64,
    pub cost_per_hour: f64,
    pub max_tokens: i64,
    pub dup_ratio: f64,
    pub repeated: u64,
    pub auth: u64,
}

impl Default for Th {
    fn default() -> Self {
        Self {
            rpm: 100.0,
            failed_ratio: 0.5,
            min_requests: 10,
            cost_per_hour: 100.0,
            max_tokens: 100_000,
            dup_ratio: 0.3,
            repeated: 3,
            auth: 20,
        }
    }
}

impl Th {
    /// Writes a config file with these thresholds and returns its path.
    pub fn config(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let text = format!(
            "[thresholds]\n\
             requests_per_minute = {:?}\n\
             failed_requests_ratio = {:?}\n\
             min_requests_for_failure_ratio = {}\n\
             max_cost_per_hour_usd = {:?}\n\
             max_tokens_per_request = {}\n\
             duplicate_request_ratio = {:?}\n\
             repeated_request_count = {}\n\
             max_auth_failures = {}\n",
            self.rpm,
            self.failed_ratio,
            self.min_requests,
            self.cost_per_hour,
            self.max_tokens,
            self.dup_ratio,
            self.repeated,
            self.auth
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

// ── Time ────────────────────────────────────────────────────────────────────────────────────

/// `base` (RFC 3339) plus `offset_us` microseconds, in the audit log's timestamp format
/// (`YYYY-MM-DDTHH:MM:SS.ffffffZ`, DESIGN §3), formatted here, not by the crate.
pub fn at(base: &str, offset_us: i64) -> String {
    let t = DateTime::parse_from_rfc3339(base)
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::microseconds(offset_us);
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

pub const MINUTE_US: i64 = 60_000_000;
pub const HOUR_US: i64 = 60 * MINUTE_US;

// ── The seed's price table and request hash, independently ──────────────────────────────────

/// Picodollars per token (input, output) from the seed's table (USD per 1M tokens × 10^6), and
/// whether the model is in it; unknown models at the seed's fallback 10 / 30.
pub fn seed_price(model: &str) -> (u64, u64, bool) {
    match model {
        "gpt-4.1" => (8_000_000, 32_000_000, true),
        "gpt-4.1-mini" => (1_500_000, 6_000_000, true),
        "claude-sonnet-4-20250514" => (15_000_000, 75_000_000, true),
        "claude-3-5-sonnet-20241022" => (3_000_000, 15_000_000, true),
        "gemini-2.5-flash" => (2_500_000, 10_000_000, true),
        "deepseek-chat" => (420_000, 1_680_000, true),
        "deepseek-coder" => (550_000, 2_190_000, true),
        _ => (10_000_000, 30_000_000, false),
    }
}

/// Python's `sha256(json.dumps([{"role": "user", "content": p}], sort_keys=True,
/// separators=(",", ":"), ensure_ascii=False))` for an ASCII prompt, written out by hand.
pub fn prompt_hash(prompt: &str) -> String {
    let canonical = format!(
        r#"[{{"content":{},"role":"user"}}]"#,
        serde_json::to_string(prompt).unwrap()
    );
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

// ── Records with chosen values ──────────────────────────────────────────────────────────────

/// One audited call as the test chooses it.
#[derive(Clone, Debug)]
pub struct Rec {
    pub ts: String,
    pub model: String,
    pub user: Option<String>,
    /// `None`: a call rejected before its body was parsed (`request_hash` '').
    pub prompt: Option<String>,
    pub input: i64,
    pub output: i64,
    pub latency: f64,
    pub status: u16,
    pub error: Option<String>,
    /// Usage known (`reported`); `false`: `missing`, no tokens, no cost.
    pub usage: bool,
    /// Unknown models priced at the fallback rate (`false`: no fallback, `unpriced`).
    pub fallback: bool,
    /// Answered by the proxy itself, never sent upstream (`attempts` 0), like its 401s.
    pub rejected: bool,
}

impl Rec {
    /// A successful call.
    pub fn ok(ts: String, model: &str, prompt: &str, input: i64, output: i64) -> Self {
        Self {
            ts,
            model: model.to_owned(),
            user: None,
            prompt: Some(prompt.to_owned()),
            input,
            output,
            latency: 100.0,
            status: 200,
            error: None,
            usage: true,
            fallback: true,
            rejected: false,
        }
    }

    /// A failed call: the upstream's status and message, no usage.
    pub fn failed(ts: String, model: &str, prompt: &str, status: u16, error: Option<&str>) -> Self {
        Self {
            status,
            error: error.map(str::to_owned),
            input: 0,
            output: 0,
            usage: false,
            ..Self::ok(ts, model, prompt, 0, 0)
        }
    }

    /// The proxy answered this call itself (no upstream attempt).
    pub fn rejected(mut self) -> Self {
        self.rejected = true;
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    pub fn latency(mut self, ms: f64) -> Self {
        self.latency = ms;
        self
    }

    pub fn no_prompt(mut self) -> Self {
        self.prompt = None;
        self
    }

    pub fn no_fallback(mut self) -> Self {
        self.fallback = false;
        self
    }

    /// The request hash the test expects (independent of the crate).
    pub fn hash(&self) -> String {
        self.prompt.as_deref().map(prompt_hash).unwrap_or_default()
    }

    /// Cost in picodollars, from the seed's table.
    pub fn pico(&self) -> u128 {
        let (i, o, known) = seed_price(&self.model);
        if !self.usage || (!known && !self.fallback) {
            return 0;
        }
        u128::from(i) * self.input as u128 + u128::from(o) * self.output as u128
    }

    /// Priced from the table (not by fallback, not unpriced).
    pub fn priced(&self) -> bool {
        seed_price(&self.model).2
    }

    /// The record as the crate builds it: hash by `ParsedRequest`, cost by the real
    /// `PriceTable` (the recorder's arithmetic), both cross-checked against the test's own.
    pub fn to_record(&self, id: usize) -> AuditRecord {
        let request_hash = match &self.prompt {
            Some(p) => {
                let body =
                    json!({"model": self.model, "messages": [{"role": "user", "content": p}]});
                let parsed = ParsedRequest::from_value(Operation::Chat, body, None).unwrap();
                assert_eq!(parsed.request_hash, prompt_hash(p), "seed-compatible hash");
                parsed.request_hash
            }
            None => String::new(),
        };
        let usage = Usage {
            input: self.input,
            output: self.output,
            total: self.input + self.output,
            cached: 0,
            reasoning: 0,
        };
        let table = if self.fallback {
            PriceTable::default()
        } else {
            PriceTable::default().without_fallback()
        };
        let cost = if self.usage {
            table.cost(&self.model, None, &usage)
        } else {
            Cost {
                picousd: 0,
                status: table.cost(&self.model, None, &Usage::default()).status,
            }
        };
        assert_eq!(u128::from(cost.picousd), self.pico(), "cost of {self:?}");
        let failed = self.status >= 400;
        AuditRecord {
            timestamp: self.ts.clone(),
            request_id: format!("test-{id:07}"),
            model: self.model.clone(),
            prompt_tokens: self.input,
            completion_tokens: self.output,
            total_tokens: self.input + self.output,
            latency_ms: self.latency,
            status_code: i64::from(self.status),
            cost_usd: cost.picousd as f64 / 1e12,
            user_id: self.user.clone(),
            request_hash,
            response_preview: if failed { String::new() } else { "ok".into() },
            ip_address: Some("192.0.2.7".into()),
            error_message: self.error.clone(),
            provider: "openai".into(),
            endpoint: "/v1/chat/completions".into(),
            response_model: None,
            response_id: None,
            stream: false,
            finish_reason: (!failed).then(|| "stop".into()),
            cached_tokens: 0,
            reasoning_tokens: 0,
            usage_source: if self.usage {
                UsageSource::Reported
            } else {
                UsageSource::Missing
            },
            cost_status: cost.status,
            outcome: if failed { Outcome::Error } else { Outcome::Ok },
            ttft_ms: None,
            key_id: None,
            attempts: if self.rejected { 0 } else { 1 },
            trace_id: None,
            span_id: None,
            cost_picousd: i64::try_from(cost.picousd).unwrap(),
            prev_hash: String::new(),
            record_hash: String::new(),
        }
    }
}

/// A fresh audit log holding `recs`, written by the real store (its writer thread chains and
/// commits them); the store is shut down, so everything is on disk.
pub fn write_db(recs: &[Rec]) -> common::Harness {
    let h = common::harness();
    for (i, r) in recs.iter().enumerate() {
        let (_, queued) = h.store.submit(r.to_record(i));
        assert!(queued.is_ok(), "record {i} dropped: {queued:?}");
    }
    h.store.shutdown();
    h
}

// ── The report, computed independently ─────────────────────────────────────────────────────

/// One row as the model of the report sees it.
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    pub model: &'a str,
    pub user: Option<&'a str>,
    pub hash: &'a str,
    pub input: i64,
    pub output: i64,
    pub latency: f64,
    pub status: i64,
    pub error: Option<&'a str>,
    pub pico: u128,
    /// Priced by fallback or unpriced, with usage known (what UNPRICED_MODEL counts).
    pub unpriced: bool,
}

/// `(type, severity, alert, subject, value, threshold)` of one anomaly.
pub type Finding = (String, String, String, Option<String>, f64, f64);

/// Severity and alert of each anomaly, from DESIGN §6 (not from src/rules.rs).
pub fn kind(name: &str) -> (&'static str, &'static str) {
    match name {
        "HIGH_REQUEST_RATE" => ("WARNING", "LlmAuditHighRequestRate"),
        "HIGH_FAILURE_RATE" => ("CRITICAL", "LlmAuditHighFailureRatio"),
        "COST_OVERRUN" => ("CRITICAL", "LlmAuditCostOverrun"),
        "EXCESSIVE_TOKEN_USAGE" => ("WARNING", "LlmAuditExcessiveTokens"),
        "REPEATED_REQUESTS" => ("INFO", "LlmAuditRepeatedRequests"),
        "UNPRICED_MODEL" => ("WARNING", "LlmAuditUnpricedModel"),
        "AUTH_FAILURES" => ("WARNING", "LlmAuditAuthFailures"),
        other => panic!("unknown anomaly {other}"),
    }
}

pub fn finding(name: &str, subject: Option<&str>, value: f64, threshold: f64) -> Finding {
    let (severity, alert) = kind(name);
    (
        name.to_owned(),
        severity.to_owned(),
        alert.to_owned(),
        subject.map(str::to_owned),
        rt(value),
        rt(threshold),
    )
}

/// `x` as the tests read it back from the report: written the way the report writes it
/// (shortest round-trip digits) and parsed by the same serde_json. serde_json, built without
/// `float_roundtrip`, may parse a number one ULP off; this puts the expected value through the
/// same text, so equality still means "the report printed exactly this f64".
pub fn rt(x: f64) -> f64 {
    serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap()
}

/// A whole expected JSON value through the same text form (see [`rt`]).
pub fn rt_json(v: &Value) -> Value {
    serde_json::from_str(&v.to_string()).unwrap()
}

/// The anomalies of a report's JSON, in its order.
pub fn findings(report: &Value) -> Vec<Finding> {
    report["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["type"].as_str().unwrap().to_owned(),
                a["severity"].as_str().unwrap().to_owned(),
                a["alert"].as_str().unwrap().to_owned(),
                a["subject"].as_str().map(str::to_owned),
                a["value"].as_f64().unwrap(),
                a["threshold"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The types of a report's anomalies.
pub fn kinds(report: &Value) -> Vec<String> {
    findings(report).into_iter().map(|f| f.0).collect()
}

/// `Money` as the report serializes it: USD as a number, exact picodollars as a string.
pub fn money(pico: u128) -> Value {
    json!({"usd": pico as f64 / 1e12, "picousd": pico.to_string()})
}

/// Nearest rank: the value at rank ⌈q·n⌉ of the sorted values, ranks by integer arithmetic.
pub fn nearest_rank(sorted: &[f64], percent: usize) -> Value {
    if sorted.is_empty() {
        return Value::Null;
    }
    let n = sorted.len();
    let rank = (percent * n).div_ceil(100).max(1);
    json!(sorted[rank - 1])
}

/// Sorted most first, then by name; the first `limit`.
pub fn top<V: Clone>(
    map: &HashMap<String, V>,
    count: impl Fn(&V) -> u64,
    limit: usize,
) -> Vec<(String, V)> {
    let mut v: Vec<(String, V)> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| count(&b.1).cmp(&count(&a.1)).then_with(|| a.0.cmp(&b.0)));
    v.truncate(limit);
    v
}

/// Everything the report says about a set of rows, accumulated one row at a time (so a
/// million rows need no list of rows).
#[derive(Default)]
pub struct Acc {
    pub n: u64,
    pub failed: u64,
    pub pico: u128,
    pub prompt: i64,
    pub completion: i64,
    pub lat_sum: f64,
    pub lats: Vec<f64>,
    /// model → (requests, pico, latency sum)
    pub models: HashMap<String, (u64, u128, f64)>,
    pub errors: HashMap<String, u64>,
    /// user → (requests, pico)
    pub users: HashMap<String, (u64, u128)>,
    pub user_max: HashMap<String, i64>,
    pub hashes: HashMap<String, u64>,
    pub hashed: u64,
    pub unpriced: HashMap<String, u64>,
    pub auth: u64,
}

fn bump<V>(
    map: &mut HashMap<String, V>,
    key: &str,
    new: impl FnOnce() -> V,
    f: impl FnOnce(&mut V),
) {
    match map.get_mut(key) {
        Some(v) => f(v),
        None => {
            let mut v = new();
            f(&mut v);
            map.insert(key.to_owned(), v);
        }
    }
}

impl Acc {
    pub fn of_recs<'a>(recs: impl IntoIterator<Item = &'a Rec>) -> Self {
        let mut acc = Self::default();
        for r in recs {
            let hash = r.hash();
            acc.add(&Row {
                model: &r.model,
                user: r.user.as_deref(),
                hash: &hash,
                input: r.input,
                output: r.output,
                latency: r.latency,
                status: i64::from(r.status),
                error: r.error.as_deref(),
                pico: r.pico(),
                unpriced: r.usage && !r.priced(),
            });
        }
        acc
    }

    pub fn add(&mut self, r: &Row<'_>) {
        self.n += 1;
        if r.status >= 400 {
            self.failed += 1;
        }
        if r.status == 401 {
            self.auth += 1;
        }
        self.pico += r.pico;
        self.prompt += r.input;
        self.completion += r.output;
        self.lat_sum += r.latency;
        self.lats.push(r.latency);
        bump(
            &mut self.models,
            r.model,
            || (0, 0, 0.0),
            |m| {
                m.0 += 1;
                m.1 += r.pico;
                m.2 += r.latency;
            },
        );
        if let Some(e) = r.error {
            bump(&mut self.errors, e, || 0, |c| *c += 1);
        }
        if let Some(u) = r.user {
            bump(
                &mut self.users,
                u,
                || (0, 0),
                |s| {
                    s.0 += 1;
                    s.1 += r.pico;
                },
            );
            bump(
                &mut self.user_max,
                u,
                || i64::MIN,
                |m| *m = (*m).max(r.input + r.output),
            );
        }
        if !r.hash.is_empty() {
            self.hashed += 1;
            bump(&mut self.hashes, r.hash, || 0, |c| *c += 1);
        }
        if r.unpriced {
            bump(&mut self.unpriced, r.model, || 0, |c| *c += 1);
        }
    }

    /// `stats` of the report's JSON.
    pub fn stats(&mut self) -> Value {
        self.lats.sort_by(f64::total_cmp);
        let models: Vec<Value> = top(&self.models, |m| m.0, usize::MAX)
            .into_iter()
            .map(|(model, (n, pico, lat))| {
                json!({"model": model, "requests": n, "cost": money(pico), "avg_latency_ms": lat / n as f64})
            })
            .collect();
        let errors: Vec<Value> = top(&self.errors, |c| *c, 10)
            .into_iter()
            .map(|(error, count)| json!({"error": error, "count": count}))
            .collect();
        let users: Vec<Value> = top(&self.users, |u| u.0, 20)
            .into_iter()
            .map(|(user, (n, pico))| json!({"user_id": user, "requests": n, "cost": money(pico)}))
            .collect();
        json!({
            "total_requests": self.n,
            "failed_requests": self.failed,
            "failure_ratio": if self.n > 0 { self.failed as f64 / self.n as f64 } else { 0.0 },
            "total_cost": money(self.pico),
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "avg_latency_ms": if self.n > 0 { json!(self.lat_sum / self.n as f64) } else { Value::Null },
            "latency_ms": {
                "p50": nearest_rank(&self.lats, 50),
                "p95": nearest_rank(&self.lats, 95),
                "p99": nearest_rank(&self.lats, 99),
            },
            "models": models,
            "errors": errors,
            "top_users": users,
        })
    }

    /// Hashes seen more than `th.repeated` times, most first, then by hash; at most 100.
    pub fn repeated(&self, th: &Th) -> Vec<(String, u64)> {
        let mut v = top(&self.hashes, |c| *c, usize::MAX);
        v.retain(|(_, c)| *c > th.repeated);
        v.truncate(100);
        v
    }

    /// The anomalies, in the report's order, judged with strict `>` against `th`.
    pub fn findings(&self, th: &Th, minutes: f64, last_hour_pico: u128) -> Vec<Finding> {
        let mut out = Vec::new();
        let rpm = self.n as f64 / minutes;
        if rpm > th.rpm {
            out.push(finding("HIGH_REQUEST_RATE", None, rpm, th.rpm));
        }
        let ratio = if self.n > 0 {
            self.failed as f64 / self.n as f64
        } else {
            0.0
        };
        if self.n > th.min_requests && ratio > th.failed_ratio {
            out.push(finding("HIGH_FAILURE_RATE", None, ratio, th.failed_ratio));
        }
        let hourly = last_hour_pico as f64 / 1e12;
        if hourly > th.cost_per_hour {
            out.push(finding("COST_OVERRUN", None, hourly, th.cost_per_hour));
        }
        let mut over: Vec<(&String, &i64)> = self
            .user_max
            .iter()
            .filter(|(_, m)| **m > th.max_tokens)
            .collect();
        over.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for (user, max) in over {
            out.push(finding(
                "EXCESSIVE_TOKEN_USAGE",
                Some(user),
                *max as f64,
                th.max_tokens as f64,
            ));
        }
        for (hash, count) in self.repeated(th) {
            out.push(finding(
                "REPEATED_REQUESTS",
                Some(&hash),
                count as f64,
                th.repeated as f64,
            ));
        }
        if self.n > th.min_requests {
            let dups = self.hashed - self.hashes.len() as u64;
            let ratio = dups as f64 / self.n as f64;
            if ratio > th.dup_ratio {
                out.push(finding("REPEATED_REQUESTS", None, ratio, th.dup_ratio));
            }
        }
        for (model, n) in top(&self.unpriced, |c| *c, usize::MAX) {
            out.push(finding("UNPRICED_MODEL", Some(&model), n as f64, 0.0));
        }
        if self.auth > th.auth {
            out.push(finding(
                "AUTH_FAILURES",
                None,
                self.auth as f64,
                th.auth as f64,
            ));
        }
        out
    }
}

/// `repeated_hashes` of a report's JSON.
pub fn repeated_hashes(report: &Value) -> Vec<(String, u64)> {
    report["repeated_hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["request_hash"].as_str().unwrap().to_owned(),
                h["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Compares `actual` with `expected` key by key, so a failure names the number that is wrong.
pub fn assert_json_eq(actual: &Value, expected: &Value, what: &str) {
    json_eq(actual, &rt_json(expected), what);
}

fn json_eq(actual: &Value, expected: &Value, what: &str) {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            let mut ak: Vec<&String> = a.keys().collect();
            let mut ek: Vec<&String> = e.keys().collect();
            ak.sort();
            ek.sort();
            assert_eq!(ak, ek, "{what}: keys");
            for (k, v) in e {
                json_eq(&a[k], v, &format!("{what}.{k}"));
            }
        }
        (Value::Array(a), Value::Array(e)) => {
            assert_eq!(
                a.len(),
                e.len(),
                "{what}: length\nactual: {actual}\nexpected: {expected}"
            );
            for (i, (x, y)) in a.iter().zip(e).enumerate() {
                json_eq(x, y, &format!("{what}[{i}]"));
            }
        }
        _ => assert_eq!(actual, expected, "{what}"),
    }
}

// ── Formatting for people, independently ────────────────────────────────────────────────────

/// `1234567` → `1,234,567`.
pub fn sep(n: u128) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// USD as the report prints it: four decimals rounded half up from the exact picodollars,
/// thousands separated; six decimals for a non-zero amount under a cent.
pub fn dollars(pico: u128) -> String {
    if pico != 0 && pico < 10_000_000_000 {
        let micro = (pico + 500_000) / 1_000_000;
        return format!("${}.{:06}", micro / 1_000_000, micro % 1_000_000);
    }
    let q = (pico + 50_000_000) / 100_000_000;
    format!("${}.{:04}", sep(q / 10_000), q % 10_000)
}
