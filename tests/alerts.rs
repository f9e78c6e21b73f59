#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The alerting operations files (DESIGN §6): the rules are the rendering of `[thresholds]` and
//! pass `promtool` and their unit tests; every alert has a runbook section; the Alertmanager
//! configuration is valid, routes by severity, inhibits as designed and keeps its secrets in
//! files; and the whole path works live — the real `llm-audit serve` scraped by a real
//! Prometheus evaluating the shipped rules, alerting a real Alertmanager running the shipped
//! configuration, whose notifications reach a local webhook, SMTP and Slack sink.
//!
//! Needs Debian's `prometheus` and `prometheus-alertmanager` (promtool, amtool): skipped with a
//! note when they are missing, failed when `CI` is set.

mod alerts_support;
mod fake_upstream;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use alerts_support::sinks::{HttpSink, Mail, Posted, SmtpSink};
use alerts_support::{
    Proc, alert_states, http, post_alerts, prom_get, prom_value, require_tools, run,
    start_alertmanager, start_prometheus,
};
use fake_upstream::{FakeUpstream, Reply};

const RULES: &str = "alerts/llm-audit.rules.yml";
const RULE_TESTS: &str = "alerts/tests";
const ALERTMANAGER: &str = "alerts/alertmanager.yml";
const RUNBOOK: &str = "docs/runbook.md";
const RUNBOOK_URL: &str = "https://github.com/llm-audit/llm-audit/blob/main/docs/runbook.md";

const PROMTOOL: &[&str] = &["promtool"];
const AMTOOL: &[&str] = &["amtool"];
const PROMETHEUS: &[&str] = &["prometheus"];
const ALERTMANAGER_BIN: &[&str] = &["prometheus-alertmanager", "alertmanager"];

/// Secret files `alerts/alertmanager.yml` reads, all under this directory.
const SECRETS_DIR: &str = "/etc/alertmanager/secrets/";
const SECRET_FILES: [&str; 3] = ["slack_api_url", "smtp_password", "webhook_token"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The built `llm-audit` ([`support::llm_audit`]), in the directory `cwd`.
fn llm_audit(cwd: &Path) -> Command {
    let mut cmd = support::llm_audit();
    cmd.current_dir(cwd);
    cmd
}

/// The rules file cut into blocks: `(alert name, lines)`, the header under `""`.
fn rule_blocks(rules: &str) -> Vec<(String, Vec<&str>)> {
    let mut blocks = vec![(String::new(), Vec::new())];
    for line in rules.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- alert: ") {
            blocks.push((name.trim().to_owned(), Vec::new()));
        }
        blocks.last_mut().unwrap().1.push(line);
    }
    blocks
}

fn alert_names(rules: &str) -> Vec<String> {
    rule_blocks(rules)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|n| !n.is_empty())
        .collect()
}

fn rule_test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(RULE_TESTS))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    files.sort();
    files
}

// ---------------------------------------------------------------------------------------------
// a. promtool
// ---------------------------------------------------------------------------------------------

/// Per alert name: (cases expecting it to fire, cases expecting no alert).
fn unit_test_cases(files: &[PathBuf]) -> BTreeMap<String, (usize, usize)> {
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        let mut current: Option<String> = None;
        for line in text.lines() {
            let t = line.trim().trim_start_matches("- ");
            if let Some(name) = t.strip_prefix("alertname:") {
                current = Some(name.trim().trim_matches('"').to_owned());
            } else if let Some(rest) = t.strip_prefix("exp_alerts:") {
                let name = current
                    .take()
                    .unwrap_or_else(|| panic!("{}: exp_alerts without alertname", file.display()));
                let entry = cases.entry(name).or_default();
                if rest.trim() == "[]" {
                    entry.1 += 1;
                } else {
                    entry.0 += 1;
                }
            }
        }
    }
    cases
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_cover_every_alert() {
    let test = "promtool_accepts_the_rules_and_their_unit_tests_cover_every_alert";
    let Some(tools) = require_tools(test, &[PROMTOOL]) else {
        return;
    };
    let promtool = &tools[0];
    let alerts = alert_names(&read(RULES));
    let expected: Vec<String> = llm_audit::rules::ANOMALIES
        .iter()
        .map(|a| a.alert.to_owned())
        .collect();
    assert_eq!(
        alerts, expected,
        "{RULES} holds every anomaly of src/rules.rs"
    );

    let (ok, out, err) = run(Command::new(promtool)
        .args(["check", "rules"])
        .arg(repo(RULES)));
    assert!(ok, "promtool check rules {RULES}:\n{out}\n{err}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{out}"
    );

    let files = rule_test_files();
    assert!(!files.is_empty(), "no unit tests in {RULE_TESTS}");
    let started = Instant::now();
    let (ok, out, err) = run(Command::new(promtool).args(["test", "rules"]).args(&files));
    assert!(ok, "promtool test rules {RULE_TESTS}/*.yml:\n{out}\n{err}");
    assert_eq!(
        out.matches("SUCCESS").count(),
        files.len(),
        "one SUCCESS per file:\n{out}"
    );
    eprintln!(
        "promtool test rules: {} files in {:?}",
        files.len(),
        started.elapsed()
    );

    // promtool compares all labels and annotations of a firing case, so "fires" cases pin the
    // annotations too; a quiet case for a misspelt alert name would pass vacuously, hence the
    // check that every name tested exists.
    let cases = unit_test_cases(&files);
    for name in cases.keys() {
        assert!(
            alerts.contains(name),
            "{RULE_TESTS} tests {name}, which is not an alert of {RULES}"
        );
    }
    for alert in &alerts {
        let (fires, quiet) = cases.get(alert).copied().unwrap_or_default();
        assert!(fires > 0, "{alert}: no unit test case where it fires");
        assert!(
            quiet > 0,
            "{alert}: no unit test case with `exp_alerts: []`"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// b. llm-audit rules
// ---------------------------------------------------------------------------------------------

fn render(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = llm_audit(dir.path())
        .arg("rules")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llm-audit rules {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_shipped_rules_are_the_rendering_of_the_default_thresholds() {
    let rendered = render(&[]);
    let shipped = read(RULES);
    if rendered != shipped {
        let first = rendered
            .lines()
            .zip(shipped.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| rendered.lines().count().min(shipped.lines().count()));
        panic!(
            "{RULES} differs from `llm-audit rules` at line {}:\n  shipped:  {:?}\n  rendered: {:?}\n\
             Regenerate: cargo run -- rules > {RULES}",
            first + 1,
            shipped.lines().nth(first),
            rendered.lines().nth(first)
        );
    }
}

#[test]
fn thresholds_from_a_config_file_change_exactly_their_rules() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("llm-audit.toml");
    std::fs::write(
        &config,
        "[thresholds]\nmax_tokens_per_request = 50000\nrequests_per_minute = 250\n",
    )
    .unwrap();
    let default = render(&[]);
    let changed = render(&["--config", config.to_str().unwrap()]);
    let (default, changed) = (rule_blocks(&default), rule_blocks(&changed));
    assert_eq!(
        default.iter().map(|b| &b.0).collect::<Vec<_>>(),
        changed.iter().map(|b| &b.0).collect::<Vec<_>>()
    );
    for ((name, old), (_, new)) in default.iter().zip(&changed) {
        // What each line must become: the two thresholds, nothing else.
        let expect: Vec<String> = match name.as_str() {
            // Both read the bucket at the token threshold.
            "LlmAuditExcessiveTokens" | "LlmAuditThresholdMismatch" => {
                old.iter().map(|l| l.replace("100000", "50000")).collect()
            }
            "LlmAuditHighRequestRate" => old
                .iter()
                .map(|l| {
                    l.replace("/ 5 > 100", "/ 5 > 250")
                        .replace("(threshold: 100)", "(threshold: 250)")
                })
                .collect(),
            _ => old.iter().map(|l| (*l).to_owned()).collect(),
        };
        assert_eq!(&expect, new, "rules of {name:?}");
        if name == "LlmAuditExcessiveTokens" {
            let text = new.join("\n");
            assert!(
                text.contains(r#"llm_audit_user_request_tokens_bucket{le=~"50000(\\.0)?"}"#),
                "{text}"
            );
            assert!(text.contains("more than 50000 tokens"), "{text}");
        }
        if name == "LlmAuditHighRequestRate" {
            assert!(new.iter().any(|l| l.trim() == "/ 5 > 250"), "{new:#?}");
        }
        let changes = [
            "LlmAuditExcessiveTokens",
            "LlmAuditHighRequestRate",
            "LlmAuditThresholdMismatch",
        ]
        .contains(&name.as_str());
        assert_eq!(changes, old != new, "{name:?} changes");
    }
}

#[test]
fn an_invalid_threshold_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("llm-audit.toml");
    std::fs::write(&config, "[thresholds]\nfailed_requests_ratio = 1.5\n").unwrap();
    let out = llm_audit(dir.path())
        .args(["rules", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "no partial rules file on stdout");
    assert!(
        stderr.contains("thresholds.failed_requests_ratio") && stderr.contains("between 0 and 1"),
        "the message names the key and the allowed range: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// c. runbook
// ---------------------------------------------------------------------------------------------

/// The anchor GitHub gives a Markdown heading.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_runbook_url_points_at_a_runbook_heading() {
    let runbook = read(RUNBOOK);
    let headings: Vec<&str> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .collect();
    let anchors: BTreeSet<String> = headings.iter().map(|h| github_anchor(h)).collect();
    let rules = read(RULES);
    let mut urls = 0;
    for (alert, lines) in rule_blocks(&rules).into_iter().skip(1) {
        assert!(
            headings.contains(&alert.as_str()),
            "{RUNBOOK} has no `## {alert}` heading"
        );
        let url = lines
            .iter()
            .find_map(|l| l.trim().strip_prefix("runbook_url: "))
            .unwrap_or_else(|| panic!("{alert} has no runbook_url"))
            .trim_matches('"');
        let (base, anchor) = url.split_once('#').unwrap();
        assert_eq!(base, RUNBOOK_URL, "{alert}");
        assert!(
            anchors.contains(anchor),
            "{alert}: #{anchor} is not a heading of {RUNBOOK} ({anchors:?})"
        );
        urls += 1;
    }
    assert_eq!(urls, llm_audit::rules::ANOMALIES.len());
}

// ---------------------------------------------------------------------------------------------
// d. Alertmanager configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn alertmanager_config_is_valid_routes_by_severity_and_keeps_secrets_in_files() {
    let test = "alertmanager_config_is_valid_routes_by_severity_and_keeps_secrets_in_files";
    let Some(tools) = require_tools(test, &[AMTOOL]) else {
        return;
    };
    let amtool = &tools[0];
    let config = repo(ALERTMANAGER);
    // amtool does not open the *_file paths (they exist only in the container).
    let (ok, out, err) = run(Command::new(amtool).arg("check-config").arg(&config));
    assert!(ok, "amtool check-config {ALERTMANAGER}:\n{out}\n{err}");
    for found in ["2 inhibit rules", "3 receivers"] {
        assert!(out.contains(found), "{out}");
    }
    let config_flag = format!("--config.file={}", config.display());
    for (severity, receiver) in [
        ("critical", "critical-pager"),
        ("warning", "warning-email"),
        ("info", "info-slack"),
    ] {
        for alert in ["LlmAuditHighFailureRatio", "LlmAuditExcessiveTokens"] {
            let (ok, out, err) = run(Command::new(amtool).args([
                "config",
                "routes",
                "test",
                &config_flag,
                &format!("--verify.receivers={receiver}"),
                &format!("alertname={alert}"),
                &format!("severity={severity}"),
                "anomaly=HIGH_FAILURE_RATE",
            ]));
            assert!(ok, "{severity} must reach {receiver} only:\n{out}\n{err}");
            assert_eq!(out.trim(), receiver, "{severity}");
        }
    }

    // Secrets: only *_file fields, all under the mounted directory, and no inline secret.
    let text = read(ALERTMANAGER);
    let mut secret_files = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let line = line.trim_start_matches("- ");
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        if key.ends_with("_file") {
            let name = value.strip_prefix(SECRETS_DIR).unwrap_or_else(|| {
                panic!("{key}: {value} is not under {SECRETS_DIR} (mounted by docker-compose)")
            });
            secret_files.insert(name.to_owned());
        }
        for inline in [
            "smtp_auth_password",
            "smtp_auth_secret",
            "slack_api_url",
            "api_url",
            "password",
            "credentials",
            "bearer_token",
            "api_key",
            "routing_key",
            "service_key",
        ] {
            assert_ne!(key, inline, "inline secret in {ALERTMANAGER}: {line}");
        }
    }
    assert_eq!(
        secret_files,
        SECRET_FILES.iter().map(|s| (*s).to_owned()).collect(),
        "the secret files docker-compose mounts"
    );

    // The inhibit rules as written (their effect is checked live below).
    let inhibit = text
        .split("\ninhibit_rules:")
        .nth(1)
        .and_then(|rest| rest.split("\nreceivers:").next())
        .expect("an inhibit_rules section before receivers");
    for expected in [
        r#"- source_matchers: ['severity="critical"', 'component=~".+"']"#,
        r#"target_matchers: ['severity="warning"']"#,
        "equal: [component]",
        r#"- source_matchers: ['alertname="LlmAuditExporterDown"']"#,
        r#"target_matchers: ['alertname=~"LlmAudit.+"', 'alertname!="LlmAuditExporterDown"']"#,
    ] {
        assert!(
            inhibit.contains(expected),
            "inhibit_rules lack {expected}:\n{inhibit}"
        );
    }
    assert!(text.contains("group_by: [alertname, anomaly]"), "{text}");
}

/// Replaces the value of every `key:` line (optionally a list item), keeping the indentation.
fn set_values(text: &str, key: &str, value: &str) -> String {
    let mut hits = 0;
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let body = line.trim_start();
            let indent = &line[..line.len() - body.len()];
            let (dash, rest) = match body.strip_prefix("- ") {
                Some(rest) => ("- ", rest),
                None => ("", body),
            };
            if rest.starts_with(&format!("{key}:")) {
                hits += 1;
                format!("{indent}{dash}{key}: {value}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(hits > 0, "{ALERTMANAGER} has no `{key}:` line to rewrite");
    out.join("\n") + "\n"
}

const PAGER_TOKEN: &str = "pager-token-from-the-secret-file";
const SMTP_PASSWORD: &str = "smtp-password-from-the-secret-file";

/// The shipped Alertmanager configuration, pointed at the test's receivers: the paging
/// webhook and Slack at `sink` (`/pager`, `/slack`), e-mail at `smtp`; secrets in temp files;
/// group timers shortened. Nothing else changes.
fn test_alertmanager_config(dir: &Path, sink: &HttpSink, smtp: &SmtpSink) -> PathBuf {
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    for (name, value) in [
        ("webhook_token", PAGER_TOKEN.to_owned()),
        ("smtp_password", SMTP_PASSWORD.to_owned()),
        ("slack_api_url", sink.url("/slack")),
    ] {
        std::fs::write(secrets.join(name), value).unwrap();
    }
    let shipped = read(ALERTMANAGER);
    let secret_lines = shipped
        .lines()
        .filter(|l| l.contains("_file:") && l.contains(SECRETS_DIR))
        .count();
    assert_eq!(secret_lines, SECRET_FILES.len(), "one test file per secret");
    let mut text = shipped.replace(SECRETS_DIR, &format!("{}/", secrets.display()));
    text = set_values(&text, "url", &format!("\"{}\"", sink.url("/pager")));
    text = set_values(&text, "smtp_smarthost", &format!("\"{}\"", smtp.addr));
    // The sink speaks plain SMTP; Go's client still sends AUTH PLAIN to 127.0.0.1.
    text = set_values(&text, "smtp_require_tls", "false");
    text = set_values(&text, "group_wait", "1s");
    text = set_values(&text, "group_interval", "2s");
    let path = dir.join("alertmanager.yml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn wait_states(am: &mut Proc, base: &str, want: &BTreeMap<String, String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        am.assert_running();
        let got = alert_states(base).await;
        if &got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "alert states\n  got:  {got:?}\n  want: {want:?}\n{}",
            am.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_inhibits_warnings_by_their_critical_and_everything_by_exporter_down() {
    let test = "alertmanager_inhibits_warnings_by_their_critical_and_everything_by_exporter_down";
    let Some(tools) = require_tools(test, &[ALERTMANAGER_BIN]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (sink, smtp) = (HttpSink::start().await, SmtpSink::start().await);
    let config = test_alertmanager_config(dir.path(), &sink, &smtp);
    let (mut am, base) = start_alertmanager(&tools[0], &config, dir.path()).await;

    let alert = |name: &str, labels: Value| {
        let mut l = labels;
        l["alertname"] = json!(name);
        json!({"labels": l, "annotations": {"summary": name}})
    };
    post_alerts(
        &base,
        json!([
            alert(
                "LlmAuditHighFailureRatio",
                json!({"severity": "critical", "anomaly": "HIGH_FAILURE_RATE", "component": "traffic"})
            ),
            // Warnings about the same component: silenced by the critical's page.
            alert(
                "LlmAuditAuthFailures",
                json!({"severity": "warning", "anomaly": "AUTH_FAILURES", "component": "traffic"})
            ),
            alert(
                "LlmAuditHighRequestRate",
                json!({"severity": "warning", "anomaly": "HIGH_REQUEST_RATE", "component": "traffic"})
            ),
            // A warning about another component: not silenced.
            alert(
                "LlmAuditExcessiveTokens",
                json!({"severity": "warning", "anomaly": "EXCESSIVE_TOKEN_USAGE",
                       "component": "cost", "user": "alice"})
            ),
            // Alerts of other systems sharing the Alertmanager, without a component label: a
            // critical one must not silence every warning that lacks the label too.
            alert("OtherTeamCritical", json!({"severity": "critical"})),
            alert("OtherTeamWarning", json!({"severity": "warning"})),
        ]),
    )
    .await;
    let mut want: BTreeMap<String, String> = [
        ("LlmAuditHighFailureRatio", "active"),
        ("LlmAuditAuthFailures", "suppressed"),
        ("LlmAuditHighRequestRate", "suppressed"),
        ("LlmAuditExcessiveTokens", "active"),
        ("OtherTeamCritical", "active"),
        ("OtherTeamWarning", "active"),
    ]
    .into_iter()
    .map(|(a, s)| (a.to_owned(), s.to_owned()))
    .collect();
    wait_states(&mut am, &base, &want).await;

    post_alerts(
        &base,
        json!([alert(
            "LlmAuditExporterDown",
            json!({"severity": "critical", "anomaly": "EXPORTER_DOWN", "component": "pipeline",
                   "job": "llm-audit", "instance": "127.0.0.1:9464"})
        )]),
    )
    .await;
    want.insert("LlmAuditExporterDown".into(), "active".into());
    for a in ["LlmAuditHighFailureRatio", "LlmAuditExcessiveTokens"] {
        want.insert(a.into(), "suppressed".into());
    }
    wait_states(&mut am, &base, &want).await;
}

// ---------------------------------------------------------------------------------------------
// e. Live: llm-audit → Prometheus → Alertmanager → receivers
// ---------------------------------------------------------------------------------------------

const MODEL: &str = "gpt-4.1-mini";
const CHAT: &str = "/v1/chat/completions";
const BIG_USER: &str = "big-spender";
const FAIL_PROMPT: &str = "fail: the upstream answers 500";
const NOTIFY_WITHIN: Duration = Duration::from_secs(60);

/// The fake provider: 500 in OpenAI's error shape for [`FAIL_PROMPT`], an answer of 120,500
/// tokens for [`BIG_USER`], a small answer otherwise.
fn provider(req: &fake_upstream::RecordedRequest, _: usize) -> Reply {
    let body = req.json();
    if body["messages"][0]["content"] == FAIL_PROMPT {
        Reply::error(
            500,
            "server_error",
            "The server had an error while processing your request. Sorry about that!",
        )
    } else if body["user"] == BIG_USER {
        Reply::chat(MODEL, "A very long summary.", 120_000, 500)
    } else {
        Reply::chat(MODEL, "Hello!", 12, 3)
    }
}

/// The shipped rules with every `for:` at 0s (ExporterDown keeps its 1m: Prometheus evaluates
/// before its first scrape, and a firing ExporterDown would inhibit everything else).
fn fast_rules(rules: &str) -> String {
    let mut changed = 0;
    let mut out = String::new();
    for (alert, lines) in rule_blocks(rules) {
        for line in lines {
            let body = line.trim_start();
            if body.starts_with("for: ") && alert != "LlmAuditExporterDown" {
                changed += 1;
                out.push_str(&line[..line.len() - body.len()]);
                out.push_str("for: 0s\n");
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert!(changed >= 4, "{changed} `for:` lines rewritten");
    out
}

/// `llm-audit serve` on free ports; returns it with the proxy's base URL and the metrics
/// target (`host:port`).
async fn start_proxy(dir: &Path, upstream: &str) -> (Proc, String, String) {
    let mut cmd = llm_audit(dir);
    support::serve_args(&mut cmd, upstream, &dir.join("audit.db"));
    let mut proxy = Proc::spawn("llm-audit", cmd, dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        proxy.assert_running();
        let log = proxy.log();
        let find = |prefix: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(prefix).map(str::to_owned))
        };
        if let (Some(base), Some(metrics)) = (find("listening on "), find("metrics on ")) {
            let target = metrics
                .trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_owned();
            return (proxy, base, target);
        }
        assert!(Instant::now() < deadline, "no listening lines:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything the receivers got: the paging webhook's and Slack's POSTs, and the e-mails.
struct Delivered {
    pager: Vec<Posted>,
    slack: Vec<Posted>,
    mails: Vec<Mail>,
}

impl Delivered {
    fn now(sink: &HttpSink, smtp: &SmtpSink) -> Self {
        let posts = sink.received();
        Self {
            pager: posts
                .iter()
                .filter(|p| p.path == "/pager")
                .cloned()
                .collect(),
            slack: posts
                .iter()
                .filter(|p| p.path == "/slack")
                .cloned()
                .collect(),
            mails: smtp.mails(),
        }
    }

    fn is_empty(&self) -> bool {
        self.pager.is_empty() && self.slack.is_empty() && self.mails.is_empty()
    }

    /// Alert names in the paging webhook's notifications.
    fn paged(&self) -> BTreeSet<String> {
        self.pager
            .iter()
            .flat_map(|p| p.body["alerts"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
            .collect()
    }

    fn summary(&self) -> String {
        format!(
            "pager: {:#?}\nslack: {:#?}\nmails: {:#?}",
            self.pager
                .iter()
                .map(|p| p.body.to_string())
                .collect::<Vec<_>>(),
            self.slack
                .iter()
                .map(|p| p.body.to_string())
                .collect::<Vec<_>>(),
            self.mails.iter().map(Mail::decoded).collect::<Vec<_>>()
        )
    }
}

fn all_running(procs: &mut [&mut Proc]) {
    procs.iter_mut().for_each(|p| p.assert_running());
}

async fn chat(http: &reqwest::Client, base: &str, body: Value) -> u16 {
    let r = http
        .post(format!("{base}{CHAT}"))
        .header("authorization", "Bearer sk-test-alerts-0123456789")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    r.bytes().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_proxy_prometheus_alertmanager_notify_the_right_receivers() {
    let test = "live_proxy_prometheus_alertmanager_notify_the_right_receivers";
    let Some(tools) = require_tools(test, &[PROMETHEUS, ALERTMANAGER_BIN]) else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (sink, smtp) = (HttpSink::start().await, SmtpSink::start().await);
    let upstream = FakeUpstream::start_with(provider).await;
    let (mut proxy, proxy_base, target) = start_proxy(dir, &upstream.base_url()).await;
    let am_config = test_alertmanager_config(dir, &sink, &smtp);
    let (mut am, am_base) = start_alertmanager(&tools[1], &am_config, dir).await;
    let rules = dir.join("llm-audit.rules.yml");
    std::fs::write(&rules, fast_rules(&read(RULES))).unwrap();
    let (mut prom, prom_base) = start_prometheus(&tools[0], dir, &rules, &target, &am_base).await;

    // The rules are loaded (a rule_files path that matches nothing would load none, silently).
    let groups = prom_get(&prom_base, "/api/v1/rules", &[]).await;
    let loaded: usize = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(loaded, llm_audit::rules::ANOMALIES.len(), "{groups}");

    // 1. Quiet traffic: five different, successful, priced calls.
    let client = http();
    for i in 0..5 {
        let body = json!({"model": MODEL, "user": "alice",
            "messages": [{"role": "user", "content": format!("Hello number {i}")}]});
        assert_eq!(chat(&client, &proxy_base, body).await, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom_value(&prom_base, "sum(llm_audit_requests_total)").await != Some(5.0) {
        all_running(&mut [&mut proxy, &mut am, &mut prom]);
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the 5 calls"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several evaluations and Alertmanager's group_wait later, still nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    all_running(&mut [&mut proxy, &mut am, &mut prom]);
    let alerts = prom_get(&prom_base, "/api/v1/alerts", &[]).await;
    assert_eq!(alerts["alerts"], json!([]), "no alert pending or firing");
    let quiet = Delivered::now(&sink, &smtp);
    assert!(
        quiet.is_empty(),
        "notifications for quiet traffic:\n{}",
        quiet.summary()
    );
    let phase2 = Instant::now();

    // 2. Twelve identical calls failing upstream (> 10 calls, 12 of 18 failed, 11 repeats) and
    //    one call of 120,500 tokens by BIG_USER.
    for _ in 0..12 {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": FAIL_PROMPT}]});
        assert_eq!(chat(&client, &proxy_base, body).await, 500);
    }
    let body = json!({"model": MODEL, "user": BIG_USER,
        "messages": [{"role": "user", "content": "Summarise this very long document."}]});
    assert_eq!(chat(&client, &proxy_base, body).await, 200);

    let deadline = Instant::now() + NOTIFY_WITHIN;
    let delivered = loop {
        all_running(&mut [&mut proxy, &mut am, &mut prom]);
        let d = Delivered::now(&sink, &smtp);
        let mailed = d
            .mails
            .iter()
            .any(|m| m.decoded().contains("LlmAuditExcessiveTokens"));
        if d.paged().contains("LlmAuditHighFailureRatio") && mailed && !d.slack.is_empty() {
            break d;
        }
        if Instant::now() > deadline {
            let alerts = prom_get(&prom_base, "/api/v1/alerts", &[]).await;
            panic!(
                "not every notification arrived within {NOTIFY_WITHIN:?}.\nPrometheus alerts: \
                 {alerts:#}\nDelivered:\n{}\nAlertmanager log:\n{}",
                d.summary(),
                am.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "notifications {:?} after the traffic ({:?} in all)",
        phase2.elapsed(),
        started.elapsed()
    );
    // Give stragglers a moment, then look at everything that was sent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = Delivered {
        pager: sink
            .received()
            .into_iter()
            .filter(|p| p.path == "/pager")
            .collect(),
        ..delivered
    };
    let runbook = |alert: &str| format!("{RUNBOOK_URL}#{}", alert.to_lowercase());

    // Critical → the paging webhook, with the bearer token from its secret file.
    assert_eq!(
        delivered.paged(),
        BTreeSet::from(["LlmAuditHighFailureRatio".to_owned()]),
        "{}",
        delivered.summary()
    );
    for p in &delivered.pager {
        assert_eq!(p.body["receiver"], "critical-pager");
        assert_eq!(
            p.header("authorization"),
            Some(format!("Bearer {PAGER_TOKEN}").as_str())
        );
    }
    let page = &delivered.pager[0].body["alerts"][0];
    assert_eq!(page["status"], "firing");
    assert_eq!(
        page["labels"],
        json!({"alertname": "LlmAuditHighFailureRatio", "severity": "critical",
               "anomaly": "HIGH_FAILURE_RATE", "component": "traffic"})
    );
    let notes = &page["annotations"];
    assert_eq!(notes["summary"], "Most LLM API calls are failing");
    assert_eq!(
        notes["recommendation"],
        "Check the API key's validity and the upstream endpoint's reachability."
    );
    assert_eq!(notes["runbook_url"], runbook("LlmAuditHighFailureRatio"));
    let description = notes["description"].as_str().unwrap();
    assert!(
        description.ends_with(
            "% of the calls in the last 5m failed (status >= 400; threshold: 0.5 with more than 10 calls)."
        ),
        "{description}"
    );

    // Warning → e-mail, authenticated with the password from its secret file.
    let mails: Vec<&Mail> = delivered.mails.iter().collect();
    let mail = mails
        .iter()
        .find(|m| m.decoded().contains("LlmAuditExcessiveTokens"))
        .unwrap();
    assert_eq!(
        mail.auth,
        Some((
            "llm-audit-alerts@example.com".to_owned(),
            SMTP_PASSWORD.to_owned()
        ))
    );
    assert!(
        mail.to
            .iter()
            .any(|t| t.contains("<llm-audit-oncall@example.com>")),
        "{:?}",
        mail.to
    );
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("[FIRING:1] LlmAuditExcessiveTokens (warning)")
    );
    let text = mail.decoded();
    for expected in [
        "[FIRING] A user sent an oversized request".to_owned(),
        format!("User {BIG_USER} made 1 request(s) of more than 100000 tokens in the last 5m."),
        "Recommendation: Set per-user token quotas.".to_owned(),
        format!("Runbook: {}", runbook("LlmAuditExcessiveTokens")),
        format!("user={BIG_USER}"),
    ] {
        assert!(
            text.contains(&expected),
            "e-mail lacks {expected:?}:\n{text}"
        );
    }
    for m in &mails {
        let text = m.decoded();
        assert!(
            !text.contains("LlmAuditHighFailureRatio")
                && !text.contains("LlmAuditRepeatedRequests"),
            "only warnings are e-mailed:\n{text}"
        );
    }

    // Info → Slack, at the URL read from its secret file.
    let slack = &delivered.slack[0].body;
    assert_eq!(slack["channel"], "#llm-audit-alerts", "{slack}");
    let attachment = &slack["attachments"][0];
    assert_eq!(
        attachment["title"],
        "[FIRING:1] LlmAuditRepeatedRequests (info)"
    );
    assert_eq!(
        attachment["title_link"],
        runbook("LlmAuditRepeatedRequests")
    );
    let text = attachment["text"].as_str().unwrap();
    for expected in [
        "*Many requests repeat an earlier prompt*".to_owned(),
        "of the calls in the last 5m repeated a prompt seen within the window (threshold: 0.3)."
            .to_owned(),
        "*Recommendation:* Cache repeated requests or add duplicate prevention on the client side."
            .to_owned(),
        format!(
            "*Runbook:* <{}|LlmAuditRepeatedRequests>",
            runbook("LlmAuditRepeatedRequests")
        ),
    ] {
        assert!(
            text.contains(&expected),
            "Slack text lacks {expected:?}:\n{text}"
        );
    }
    for s in &delivered.slack {
        let title = s.body["attachments"][0]["title"]
            .as_str()
            .unwrap_or_default();
        assert!(
            title.contains("LlmAuditRepeatedRequests"),
            "only info goes to Slack: {title}"
        );
    }

    // Nothing else fired: the quiet alerts stayed quiet under this traffic.
    let alerts = prom_get(&prom_base, "/api/v1/alerts", &[]).await;
    let firing: BTreeSet<&str> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["labels"]["alertname"].as_str().unwrap())
        .collect();
    assert_eq!(
        firing,
        BTreeSet::from([
            "LlmAuditExcessiveTokens",
            "LlmAuditHighFailureRatio",
            "LlmAuditRepeatedRequests"
        ]),
        "{alerts:#}"
    );
    eprintln!("{test}: {:?}", started.elapsed());
}
