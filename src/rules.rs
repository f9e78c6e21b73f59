//! `llm-audit rules`: the Prometheus alert rules of DESIGN §6, rendered from `[thresholds]`.
//!
//! The same [`ThresholdsConfig`] drives `llm-audit report`, so the numbers an operator sees in
//! an alert and in the report cannot drift apart. The shipped `alerts/llm-audit.rules.yml` is
//! [`render`] of the defaults (a test keeps them equal).
//!
//! Every counter rule counts with [`increase_incl_new`] instead of a bare `increase()`: a series
//! born with its first increment (a user whose first request is oversized, the first dropped
//! record after start-up) has no earlier sample, so `increase()` alone never sees it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::ThresholdsConfig;
use crate::telemetry::metrics::names;

/// Where `runbook_url` annotations point unless `--runbook-url` says otherwise.
pub const DEFAULT_RUNBOOK_URL: &str =
    "https://github.com/llm-audit/llm-audit/blob/main/docs/runbook.md";

/// The Prometheus job name the rules expect llm-audit to be scraped under.
pub const JOB: &str = "llm-audit";

/// How loud an anomaly is (the seed's severities; lower-case as Alertmanager routes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Worth a look.
    Info,
    /// Act soon.
    Warning,
    /// Page someone.
    Critical,
}

impl Severity {
    /// The `severity` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    /// The seed's spelling (`CRITICAL`, …), used by the report.
    pub const fn upper(self) -> &'static str {
        match self {
            Self::Info => "INFO",
            Self::Warning => "WARNING",
            Self::Critical => "CRITICAL",
        }
    }
}

/// One kind of anomaly: its alert, its seed name, how loud it is and what to do about it.
#[derive(Clone, Copy, Debug)]
pub struct Anomaly {
    /// Prometheus alert name.
    pub alert: &'static str,
    /// The `anomaly` label (the seed's names where the seed has the check).
    pub name: &'static str,
    /// The `severity` label.
    pub severity: Severity,
    /// The `component` label: what part of the system the anomaly is about. Alertmanager
    /// silences a warning while a critical alert of the same component fires (its page already
    /// covers it): `traffic`, `cost`, `pipeline` or `tracing`.
    pub component: &'static str,
    /// The `recommendation` annotation (the seed's advice, in English).
    pub recommendation: &'static str,
}

/// Requests per minute over the threshold.
pub const HIGH_REQUEST_RATE: Anomaly = Anomaly {
    alert: "LlmAuditHighRequestRate",
    name: "HIGH_REQUEST_RATE",
    severity: Severity::Warning,
    component: "traffic",
    recommendation: "Apply rate limiting per client IP or key; check for a runaway loop or a leaked key.",
};
/// Failed / all over the threshold, above the low-volume guard.
pub const HIGH_FAILURE_RATE: Anomaly = Anomaly {
    alert: "LlmAuditHighFailureRatio",
    name: "HIGH_FAILURE_RATE",
    severity: Severity::Critical,
    component: "traffic",
    recommendation: "Check the API key's validity and the upstream endpoint's reachability.",
};
/// Cost of the last hour over the threshold.
pub const COST_OVERRUN: Anomaly = Anomaly {
    alert: "LlmAuditCostOverrun",
    name: "COST_OVERRUN",
    severity: Severity::Critical,
    component: "cost",
    recommendation: "Tighten max_tokens limits and review the choice of models.",
};
/// One request over the token threshold.
pub const EXCESSIVE_TOKEN_USAGE: Anomaly = Anomaly {
    alert: "LlmAuditExcessiveTokens",
    name: "EXCESSIVE_TOKEN_USAGE",
    severity: Severity::Warning,
    component: "cost",
    recommendation: "Set per-user token quotas.",
};
/// The same prompt sent again and again.
pub const REPEATED_REQUESTS: Anomaly = Anomaly {
    alert: "LlmAuditRepeatedRequests",
    name: "REPEATED_REQUESTS",
    severity: Severity::Info,
    component: "traffic",
    recommendation: "Cache repeated requests or add duplicate prevention on the client side.",
};
/// Calls priced at the fallback rate or not at all.
pub const UNPRICED_MODEL: Anomaly = Anomaly {
    alert: "LlmAuditUnpricedModel",
    name: "UNPRICED_MODEL",
    severity: Severity::Warning,
    component: "cost",
    recommendation: "Add the model to the price table ([pricing] file) so its cost is exact.",
};
/// Failed authentications over the threshold.
pub const AUTH_FAILURES: Anomaly = Anomaly {
    alert: "LlmAuditAuthFailures",
    name: "AUTH_FAILURES",
    severity: Severity::Warning,
    component: "traffic",
    recommendation: "Find the client presenting unknown keys (ip_address in the audit log); rotate a leaked key.",
};
/// Audit records lost.
pub const RECORDS_DROPPED: Anomaly = Anomaly {
    alert: "LlmAuditRecordsDropped",
    name: "RECORDS_DROPPED",
    severity: Severity::Critical,
    component: "pipeline",
    recommendation: "Check the audit store (disk space, permissions, queue_capacity); consider on_store_failure = \"reject\".",
};
/// The audit store failing to write.
pub const STORE_FAILING: Anomaly = Anomaly {
    alert: "LlmAuditStoreFailing",
    name: "STORE_FAILING",
    severity: Severity::Critical,
    component: "pipeline",
    recommendation: "Check the audit database's disk, permissions and the proxy's log for the SQLite error.",
};
/// Spans not reaching the trace backend.
pub const SPAN_EXPORT_FAILING: Anomaly = Anomaly {
    alert: "LlmAuditSpanExportFailing",
    name: "SPAN_EXPORT_FAILING",
    severity: Severity::Warning,
    component: "tracing",
    recommendation: "Check the OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT) and the collector's health.",
};
/// llm-audit not scraped.
pub const EXPORTER_DOWN: Anomaly = Anomaly {
    alert: "LlmAuditExporterDown",
    name: "EXPORTER_DOWN",
    severity: Severity::Critical,
    component: "pipeline",
    recommendation: "Check that llm-audit runs and that Prometheus reaches its metrics listener.",
};
/// The running proxy's token threshold differs from the rules': the excessive-tokens rule
/// reads a histogram bucket that does not exist and could never fire.
pub const THRESHOLD_MISMATCH: Anomaly = Anomaly {
    alert: "LlmAuditThresholdMismatch",
    name: "THRESHOLD_MISMATCH",
    severity: Severity::Warning,
    component: "pipeline",
    recommendation: "Render the rules from the proxy's own configuration: llm-audit rules --config <the proxy's file>.",
};

/// Every anomaly the rules know, in the order they are rendered.
pub const ANOMALIES: [Anomaly; 12] = [
    HIGH_REQUEST_RATE,
    HIGH_FAILURE_RATE,
    COST_OVERRUN,
    EXCESSIVE_TOKEN_USAGE,
    REPEATED_REQUESTS,
    UNPRICED_MODEL,
    AUTH_FAILURES,
    RECORDS_DROPPED,
    STORE_FAILING,
    SPAN_EXPORT_FAILING,
    EXPORTER_DOWN,
    THRESHOLD_MISMATCH,
];

/// Thresholds that cannot be rendered into a meaningful rule.
#[derive(Debug, thiserror::Error)]
#[error("thresholds.{key}: {problem}")]
pub struct ThresholdError {
    key: &'static str,
    problem: &'static str,
}

/// Checks the thresholds that rules and report rely on.
pub fn validate(t: &ThresholdsConfig) -> Result<(), ThresholdError> {
    let bad = |key, problem| Err(ThresholdError { key, problem });
    if t.window.0 < Duration::from_secs(60) || t.window.0.subsec_nanos() != 0 {
        return bad("window", "must be whole seconds, at least 1m");
    }
    for (key, v) in [
        ("requests_per_minute", t.requests_per_minute),
        ("max_cost_per_hour_usd", t.max_cost_per_hour_usd),
    ] {
        if !v.is_finite() || v < 0.0 {
            return bad(key, "must be a finite number >= 0");
        }
    }
    for (key, v) in [
        ("failed_requests_ratio", t.failed_requests_ratio),
        ("duplicate_request_ratio", t.duplicate_request_ratio),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return bad(key, "must be a ratio between 0 and 1");
        }
    }
    Ok(())
}

/// A Prometheus duration for `d` (whole seconds): `1h`, `5m`, `90s`.
pub fn prom_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `{agg} (…)` over how much the counter (or histogram component) `sel` grew over `window`,
/// counting series born inside the window from zero; one term per line, for people reading the
/// rules file.
///
/// - Series that had a sample in the window before this one: `increase()`. Looked up with
///   `last_over_time(…[w] offset w)`, not a plain `offset`: one failed scrape writes staleness
///   markers, and a plain `offset` landing on them would make every old series look new.
/// - Series born since: their whole current value — but only where that value is known to be
///   recent: the target was scraped successfully in the window before (so the series is new,
///   not just newly seen), or the process itself is younger than `window`. A Prometheus that
///   has just started scraping a long-running llm-audit would otherwise count every counter's
///   lifetime total.
pub fn increase_incl_new(agg: &str, sel: &str, window: Duration) -> String {
    let w = prom_duration(window);
    let secs = window.as_secs();
    format!(
        "{agg} (\n    increase({sel}[{w}]) and last_over_time({sel}[{w}] offset {w})\n  or\n    \
         ({sel} unless last_over_time({sel}[{w}] offset {w}))\n    \
         and on (job, instance) (max_over_time(up[{w}] offset {w}) == 1 or time() - {start} < {secs})\n)",
        start = names::PROCESS_START,
    )
}

/// The `le` matcher for a bucket bound: Prometheus 3 normalises `le="100000"` to
/// `le="100000.0"` at scrape time, 2.x keeps it as exposed; the rules must work on both.
fn le_matcher(bound: u64) -> String {
    format!("le=~\"{bound}(\\\\.0)?\"")
}

/// A number as PromQL and humans read it (`100`, `0.5`).
fn num(v: f64) -> String {
    format!("{v}")
}

struct Rule {
    anomaly: Anomaly,
    expr: String,
    for_: Option<&'static str>,
    summary: String,
    description: String,
}

fn rules(t: &ThresholdsConfig) -> Vec<Rule> {
    let w = t.window.0;
    let wp = prom_duration(w);
    let minutes = num(w.as_secs_f64() / 60.0);
    let sum = |sel: &str| increase_incl_new("sum", sel, w);
    let requests = sum(names::REQUESTS);
    let failed = sum(&format!(
        "{}{{status=~\"[4-9][0-9][0-9]\"}}",
        names::REQUESTS
    ));
    let min_req = t.min_requests_for_failure_ratio;
    let tokens_sel = names::USER_REQUEST_TOKENS;
    let le = le_matcher(t.max_tokens_per_request);
    vec![
        Rule {
            anomaly: HIGH_REQUEST_RATE,
            expr: format!("{requests}\n/ {minutes} > {}", num(t.requests_per_minute)),
            for_: Some("1m"),
            summary: "High request rate to the LLM API".into(),
            description: format!(
                "{{{{ $value | printf \"%.1f\" }}}} requests per minute over the last {wp} \
                 (threshold: {}).",
                num(t.requests_per_minute)
            ),
        },
        Rule {
            anomaly: HIGH_FAILURE_RATE,
            expr: format!(
                "(\n{failed}\n/\n{requests}\n) > {}\nand\n{requests} > {min_req}",
                num(t.failed_requests_ratio)
            ),
            for_: Some("1m"),
            summary: "Most LLM API calls are failing".into(),
            description: format!(
                "{{{{ $value | humanizePercentage }}}} of the calls in the last {wp} failed \
                 (status >= 400; threshold: {} with more than {min_req} calls).",
                num(t.failed_requests_ratio)
            ),
        },
        Rule {
            anomaly: COST_OVERRUN,
            expr: format!(
                "{} > {}",
                increase_incl_new("sum", names::COST, Duration::from_secs(3600)),
                num(t.max_cost_per_hour_usd)
            ),
            for_: Some("1m"),
            summary: "LLM API cost over budget".into(),
            description: format!(
                "${{{{ $value | printf \"%.2f\" }}}} spent in the last hour (threshold: ${}).",
                num(t.max_cost_per_hour_usd)
            ),
        },
        Rule {
            anomaly: EXCESSIVE_TOKEN_USAGE,
            expr: format!(
                "{}\n-\n{}\n> 0",
                increase_incl_new("sum by (user)", &format!("{tokens_sel}_count"), w),
                increase_incl_new("sum by (user)", &format!("{tokens_sel}_bucket{{{le}}}"), w),
            ),
            for_: None,
            summary: "A user sent an oversized request".into(),
            description: format!(
                "User {{{{ $labels.user }}}} made {{{{ $value }}}} request(s) of more than {} \
                 tokens in the last {wp}.",
                t.max_tokens_per_request
            ),
        },
        Rule {
            anomaly: REPEATED_REQUESTS,
            expr: format!(
                "(\n{}\n/\n{requests}\n) > {}\nand\n{requests} > {min_req}",
                sum(names::DUPLICATES),
                num(t.duplicate_request_ratio)
            ),
            for_: Some("5m"),
            summary: "Many requests repeat an earlier prompt".into(),
            description: format!(
                "{{{{ $value | humanizePercentage }}}} of the calls in the last {wp} repeated a \
                 prompt seen within the window (threshold: {}).",
                num(t.duplicate_request_ratio)
            ),
        },
        Rule {
            anomaly: UNPRICED_MODEL,
            expr: format!(
                "{} > 0",
                increase_incl_new("sum by (provider, model)", names::UNPRICED, w)
            ),
            for_: None,
            summary: "Calls to a model missing from the price table".into(),
            description: format!(
                "{{{{ $value }}}} call(s) to {{{{ $labels.provider }}}}/{{{{ $labels.model }}}} in \
                 the last {wp} were priced at the fallback rate or not at all."
            ),
        },
        Rule {
            anomaly: AUTH_FAILURES,
            expr: format!("{} > {}", sum(names::AUTH_FAILURES), t.max_auth_failures),
            for_: None,
            summary: "Repeated failed authentications at the proxy".into(),
            description: format!(
                "{{{{ $value }}}} failed authentications in the last {wp} (threshold: {}).",
                t.max_auth_failures
            ),
        },
        Rule {
            anomaly: RECORDS_DROPPED,
            expr: format!(
                "{} > 0",
                increase_incl_new("sum by (reason)", names::RECORDS_DROPPED, w)
            ),
            for_: None,
            summary: "Audit records are being lost".into(),
            description: format!(
                "{{{{ $value }}}} audit record(s) dropped in the last {wp} (reason: \
                 {{{{ $labels.reason }}}}). Calls went unaudited."
            ),
        },
        Rule {
            anomaly: STORE_FAILING,
            expr: format!("{} > 0", sum(names::STORE_ERRORS)),
            for_: None,
            summary: "The audit store cannot write".into(),
            description: format!("{{{{ $value }}}} audit store error(s) in the last {wp}."),
        },
        Rule {
            anomaly: SPAN_EXPORT_FAILING,
            expr: format!("{} > 0", sum(names::SPAN_EXPORT_ERRORS)),
            for_: Some("5m"),
            summary: "Spans are not reaching the trace backend".into(),
            description: format!(
                "{{{{ $value }}}} span export error(s) in the last {wp}; the audit log and \
                 metrics are unaffected."
            ),
        },
        Rule {
            anomaly: EXPORTER_DOWN,
            expr: format!("up{{job=\"{JOB}\"}} == 0\nor\nabsent(up{{job=\"{JOB}\"}})"),
            for_: Some("1m"),
            summary: "llm-audit is not being scraped".into(),
            description: format!(
                "Prometheus cannot scrape job {JOB} ({{{{ with $labels.instance }}}}{{{{ . }}}}\
                 {{{{ else }}}}no target at all{{{{ end }}}}); no other llm-audit alert can fire \
                 while it is down."
            ),
        },
        Rule {
            anomaly: THRESHOLD_MISMATCH,
            // Per instance: a replica with no user series yet has nothing to compare.
            expr: format!(
                "count by (job, instance) ({tokens_sel}_bucket)\nunless on (job, instance)\n\
                 count by (job, instance) ({tokens_sel}_bucket{{{le}}})"
            ),
            for_: Some("10m"),
            summary: "llm-audit runs with another token threshold than its alert rules".into(),
            description: format!(
                "{{{{ $labels.instance }}}} exports no request-size bucket at {} tokens: it runs \
                 with a different max_tokens_per_request than these rules were rendered with, so \
                 LlmAuditExcessiveTokens cannot fire for it.",
                t.max_tokens_per_request
            ),
        },
    ]
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Renders the rules file for `t`, with `runbook_url`s under `runbook`.
pub fn render(t: &ThresholdsConfig, runbook: &str) -> Result<String, ThresholdError> {
    validate(t)?;
    let mut out = String::new();
    // `write!` into a String cannot fail.
    let _ = writeln!(
        out,
        "# Generated by `llm-audit rules` from the [thresholds] configuration; do not edit.\n\
         # Regenerate: llm-audit rules --config llm-audit.toml > alerts/llm-audit.rules.yml\n\
         # Expects llm-audit scraped as job \"{JOB}\". Valid for Prometheus 2.x and 3.x.\n\
         groups:\n  - name: llm-audit\n    rules:"
    );
    for r in rules(t) {
        let a = r.anomaly;
        let _ = writeln!(out, "      - alert: {}", a.alert);
        let _ = writeln!(out, "        expr: |-");
        for line in r.expr.lines() {
            let _ = writeln!(out, "          {line}");
        }
        if let Some(f) = r.for_ {
            let _ = writeln!(out, "        for: {f}");
        }
        let _ = writeln!(out, "        labels:");
        let _ = writeln!(out, "          severity: {}", a.severity.label());
        let _ = writeln!(out, "          anomaly: {}", a.name);
        let _ = writeln!(out, "          component: {}", a.component);
        let _ = writeln!(out, "        annotations:");
        let _ = writeln!(out, "          summary: {}", quoted(&r.summary));
        let _ = writeln!(out, "          description: {}", quoted(&r.description));
        let _ = writeln!(
            out,
            "          recommendation: {}",
            quoted(a.recommendation)
        );
        let _ = writeln!(
            out,
            "          runbook_url: {}",
            quoted(&format!("{runbook}#{}", a.alert.to_lowercase()))
        );
    }
    Ok(out)
}

/// `llm-audit rules`: prints the rules for the configured thresholds on stdout.
pub fn run(args: crate::cli::RulesArgs) -> anyhow::Result<std::process::ExitCode> {
    let cfg = crate::config::Config::load(args.config.as_deref(), std::env::vars())?;
    let text = render(&cfg.thresholds, &args.runbook_url)?;
    print!("{text}");
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(prom_duration(Duration::from_secs(300)), "5m");
        assert_eq!(prom_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(prom_duration(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn thresholds_reach_the_rules() {
        let mut t = ThresholdsConfig::default();
        let default = render(&t, DEFAULT_RUNBOOK_URL).unwrap_or_default();
        t.max_tokens_per_request = 50_000;
        let changed = render(&t, DEFAULT_RUNBOOK_URL).unwrap_or_default();
        assert!(default.contains("le=~\"100000(\\\\.0)?\""), "{default}");
        assert!(changed.contains("le=~\"50000(\\\\.0)?\""), "{changed}");
        assert_ne!(default, changed);
    }

    #[test]
    fn nonsense_thresholds_are_refused() {
        let t = ThresholdsConfig {
            failed_requests_ratio: 1.5,
            ..ThresholdsConfig::default()
        };
        assert!(render(&t, DEFAULT_RUNBOOK_URL).is_err());
    }
}
