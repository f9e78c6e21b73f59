#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The Grafana dashboards of DESIGN §11: their conventions (file provisioning, the `datasource`
//! variable, `$__rate_interval`, stable uids, units and descriptions), every query parsed by
//! `promtool`, and every query (and every alert rule) run on a real Prometheus scraping the
//! real `llm-audit demo`: each metric it names is exported and each panel gets data.

mod ops;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use llm_audit::telemetry::metrics::names;
use ops::{Dashboard, Demo, Prometheus, has_data, scan, substitute, substitutions};
use serde_json::{Value, json};

/// The dashboards DESIGN §11 ships.
const EXPECTED: [&str; 4] = ["cost", "overview", "pipeline", "security"];

/// Families with `provider` and `model` labels, and with `user`.
const PROVIDER_MODEL_FAMILIES: [&str; 7] = [
    names::REQUESTS,
    names::TOKENS,
    names::COST,
    names::REQUEST_DURATION,
    names::TTFT,
    names::DUPLICATES,
    names::UNPRICED,
];
const USER_FAMILIES: [&str; 3] = [
    names::USER_REQUESTS,
    names::USER_COST,
    names::USER_REQUEST_TOKENS,
];

/// Series names Prometheus makes itself that a dashboard or rule may query.
const PROMETHEUS_OWN: [&str; 3] = ["up", "ALERTS", "ALERTS_FOR_STATE"];

/// Every sample name the metric catalog exports (histograms as `_bucket`, `_sum`, `_count`).
fn catalog_sample_names() -> BTreeSet<String> {
    let plain = [
        names::REQUESTS,
        names::TOKENS,
        names::COST,
        names::DUPLICATES,
        names::UNPRICED,
        names::USER_REQUESTS,
        names::USER_COST,
        names::AUTH_FAILURES,
        names::RECORDS_WRITTEN,
        names::RECORDS_DROPPED,
        names::STORE_ERRORS,
        names::STORE_QUEUE_DEPTH,
        names::SPAN_EXPORT_ERRORS,
        names::BUILD_INFO,
        names::PASSTHROUGH,
        names::LABEL_OVERFLOW,
    ];
    let histograms = [
        names::REQUEST_DURATION,
        names::TTFT,
        names::OVERHEAD,
        names::USER_REQUEST_TOKENS,
        names::GENAI_TOKEN_USAGE,
        names::GENAI_DURATION,
    ];
    let mut out: BTreeSet<String> = plain.iter().map(|s| (*s).to_owned()).collect();
    for h in histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            out.insert(format!("{h}{suffix}"));
        }
    }
    out
}

/// The family a sample name belongs to (`x_bucket` → `x` for the histograms).
fn family_of(sample: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            return base;
        }
    }
    sample
}

/// Length of a JSON string (0 if absent or not a string).
fn text_len(v: &Value) -> usize {
    v.as_str().map_or(0, str::len)
}

fn ours(name: &str) -> bool {
    name.starts_with("llm_audit_") || name.starts_with("gen_ai_")
}

fn is_counter_sample(name: &str) -> bool {
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// The dashboards, after checking the expected set is there.
fn dashboards() -> Vec<Dashboard> {
    let all = ops::load_dashboards();
    let stems: Vec<&str> = all.iter().map(|d| d.stem.as_str()).collect();
    for want in EXPECTED {
        assert!(
            stems.contains(&want),
            "dashboards/{want}.json is missing (found {stems:?})"
        );
    }
    all
}

// ---------------------------------------------------------------------------------------------
// 1. Static conventions
// ---------------------------------------------------------------------------------------------

/// Every `datasource` object anywhere in the model: Prometheus via `${datasource}`, or
/// Grafana's own (built-in annotations).
fn check_datasources(v: &Value, path: &str, errors: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let here = format!("{path}.{k}");
                if k == "datasource" && child.is_object() {
                    let prom = json!({"type": "prometheus", "uid": "${datasource}"});
                    let grafana = child["uid"] == "-- Grafana --" && child["type"] == "grafana";
                    if *child != prom && !grafana {
                        errors.push(format!("{here} is {child}, not {prom}"));
                    }
                } else if k == "datasource" && !child.is_null() {
                    errors.push(format!(
                        "{here} is {child}: use an object with ${{datasource}}"
                    ));
                }
                check_datasources(child, &here, errors);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                check_datasources(child, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

fn check_dashboard(d: &Dashboard, errors: &mut Vec<String>) {
    let f = format!("dashboards/{}.json", d.stem);
    let j = &d.json;
    let mut err = |msg: String| errors.push(format!("{f}: {msg}"));

    // File provisioning: no export-for-sharing inputs, no hard-coded instance ids.
    if j.get("__inputs").is_some() || j.get("__requires").is_some() {
        err("has __inputs/__requires (export for sharing); file provisioning needs neither".into());
    }
    if d.text.contains("${DS_") || d.text.contains("$DS_") {
        err("refers to a ${DS_…} input".into());
    }
    if !j["id"].is_null() {
        err(format!("id is {} (must be null)", j["id"]));
    }
    let want_uid = format!("llm-audit-{}", d.stem);
    if j["uid"] != want_uid.as_str() {
        err(format!("uid is {} (want {want_uid:?})", j["uid"]));
    }
    if !j["title"]
        .as_str()
        .is_some_and(|t| t.starts_with("llm-audit"))
    {
        err(format!("title {} should start with llm-audit", j["title"]));
    }
    if text_len(&j["description"]) == 0 {
        err("no dashboard description".into());
    }
    if !j["tags"]
        .as_array()
        .is_some_and(|t| t.contains(&json!("llm-audit")))
    {
        err(format!("tags {} lack \"llm-audit\"", j["tags"]));
    }
    let schema = j["schemaVersion"].as_u64().unwrap_or(0);
    if !(36..=41).contains(&schema) {
        err(format!(
            "schemaVersion {schema} (want 36..=41, Grafana 9.4–11)"
        ));
    }
    let mut ds_errors = Vec::new();
    check_datasources(j, "", &mut ds_errors);
    for e in ds_errors {
        err(e);
    }

    // Template variables.
    let vars = d.variables();
    let mut var_names = BTreeSet::new();
    for v in &vars {
        let name = v["name"].as_str().unwrap_or("").to_owned();
        if !var_names.insert(name.clone()) {
            err(format!("variable {name:?} defined twice"));
        }
    }
    match vars.iter().find(|v| v["name"] == "datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        other => err(format!(
            "needs a `datasource` variable of type datasource, query prometheus (found {other:?})"
        )),
    }
    let builtins: BTreeSet<String> = ops::BUILTIN_VARIABLES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for v in &vars {
        let name = v["name"].as_str().unwrap_or("?");
        match v["type"].as_str() {
            Some("datasource") => {}
            Some("query") => {
                if v["includeAll"] != true || v["multi"] != true {
                    err(format!(
                        "query variable {name} must be includeAll and multi"
                    ));
                }
                let q = ops::variable_query(v);
                if !q.trim_start().starts_with("label_values(") {
                    err(format!(
                        "query variable {name}: {q:?} is not label_values(…)"
                    ));
                }
                for r in ops::referenced_variables(&q) {
                    if !var_names.contains(&r) {
                        err(format!("variable {name} refers to undefined ${r}"));
                    }
                }
            }
            Some("textbox" | "constant" | "custom") => {
                if substitutions(d, "1m")
                    .get(name)
                    .is_none_or(|value| value.is_empty())
                {
                    err(format!("variable {name} has no default value"));
                }
                if text_len(&v["description"]) == 0 {
                    err(format!(
                        "variable {name} needs a description (where its value comes from)"
                    ));
                }
            }
            other => err(format!("variable {name} has unexpected type {other:?}")),
        }
    }
    for (name, label) in [
        ("provider", "provider"),
        ("model", "model"),
        ("user", "user"),
    ] {
        if let Some(v) = vars.iter().find(|v| v["name"] == name) {
            if v["type"] != "query" {
                err(format!("variable {name} must be a query variable"));
            }
            let q = ops::variable_query(v);
            if !q
                .trim_end()
                .trim_end_matches(')')
                .trim_end()
                .ends_with(label)
            {
                err(format!("variable {name} should list label {label}: {q:?}"));
            }
        }
    }
    let mut used_vars: BTreeSet<String> = BTreeSet::new();

    // Panels.
    let panels = d.panels();
    if panels.iter().filter(|p| p["type"] != "row").count() < 4 {
        err("fewer than 4 panels".into());
    }
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, i64, i64, i64, i64)> = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?").to_owned();
        let pid = p["id"].as_u64();
        match pid {
            Some(id) if ids.insert(id) => {}
            _ => err(format!(
                "panel {title:?}: id {} missing or repeated",
                p["id"]
            )),
        }
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64().unwrap_or(-1),
            g["y"].as_i64().unwrap_or(-1),
            g["w"].as_i64().unwrap_or(0),
            g["h"].as_i64().unwrap_or(0),
        );
        if x < 0 || y < 0 || w < 1 || h < 1 || x + w > 24 {
            err(format!(
                "panel {title:?}: gridPos {g} outside the 24-column grid"
            ));
        }
        for (other, ox, oy, ow, oh) in &boxes {
            if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                err(format!("panel {title:?} overlaps {other:?}"));
            }
        }
        boxes.push((title.clone(), x, y, w, h));
        if p["type"] == "row" {
            if p["targets"].is_array() {
                err(format!("row {title:?} has queries"));
            }
            continue;
        }
        if title.is_empty() || title == "?" {
            err(format!("panel {pid:?} has no title"));
        }
        if text_len(&p["description"]) < 20 {
            err(format!("panel {title:?}: no description"));
        }
        if text_len(&p["fieldConfig"]["defaults"]["unit"]) == 0 {
            err(format!("panel {title:?}: no fieldConfig.defaults.unit"));
        }
        if p["datasource"] != json!({"type": "prometheus", "uid": "${datasource}"}) {
            err(format!("panel {title:?}: datasource {}", p["datasource"]));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            err(format!("panel {title:?}: no queries"));
        }
        let mut refs = BTreeSet::new();
        for t in &targets {
            if !refs.insert(t["refId"].as_str().unwrap_or("").to_owned()) {
                err(format!("panel {title:?}: refId {} repeated", t["refId"]));
            }
            if t["datasource"] != json!({"type": "prometheus", "uid": "${datasource}"}) {
                err(format!(
                    "panel {title:?}: target datasource {}",
                    t["datasource"]
                ));
            }
            if t["hide"] == true {
                err(format!("panel {title:?}: hidden query {}", t["refId"]));
            }
        }
    }

    // Queries.
    let subst = substitutions(d, "1m");
    let mut exprs: Vec<(String, String)> = d
        .queries()
        .into_iter()
        .map(|q| {
            let what = format!("panel {} {:?} query {}", q.panel_id, q.panel, q.ref_id);
            (what, q.expr)
        })
        .collect();
    for (name, sel, _) in d.variable_selectors() {
        exprs.push((format!("variable {name}"), sel));
    }
    let catalog = catalog_sample_names();
    for (what, expr) in &exprs {
        if expr.trim().is_empty() {
            err(format!("{what}: empty expr"));
            continue;
        }
        let refs = ops::referenced_variables(expr);
        for r in &refs {
            if !var_names.contains(r) && !builtins.contains(r) {
                err(format!("{what}: undefined variable ${r}"));
            }
            used_vars.insert(r.clone());
        }
        if refs.contains("datasource") {
            err(format!("{what}: $datasource inside a query"));
        }
        let s = match scan(expr) {
            Ok(s) => s,
            Err(e) => {
                err(format!("{what}: cannot scan {expr:?}: {e}"));
                continue;
            }
        };
        for w in &s.windows {
            if w.trim() != "$__rate_interval" {
                err(format!(
                    "{what}: window [{w}]; use [$__rate_interval] (Grafana adapts it to the scrape interval)"
                ));
            }
        }
        if s.grouping_labels.iter().any(|l| l == "instance") {
            err(format!(
                "{what}: groups by instance; aggregate across replicas"
            ));
        }
        let is_var = what.starts_with("variable ");
        for sel in &s.selectors {
            let n = sel.name.as_str();
            if ours(n) && !catalog.contains(n) {
                err(format!(
                    "{what}: {n} is not in the metric catalog (telemetry::metrics::names)"
                ));
            }
            if !ours(n) && !PROMETHEUS_OWN.contains(&n) {
                err(format!("{what}: unexpected series {n}"));
            }
            if is_var {
                continue;
            }
            if !sel.aggregated() {
                err(format!(
                    "{what}: {n} is not aggregated (sum … across replicas)"
                ));
            }
            let in_rate = matches!(sel.innermost(), Some("rate" | "increase" | "irate"));
            if ours(n) && is_counter_sample(n) && !in_rate {
                err(format!(
                    "{what}: counter {n} used without rate()/increase()"
                ));
            }
            if in_rate && !is_counter_sample(n) {
                err(format!(
                    "{what}: rate()/increase() of {n}, which is not a counter"
                ));
            }
            if in_rate && sel.window.as_deref().map(str::trim) != Some("$__rate_interval") {
                err(format!("{what}: {n} in rate() without [$__rate_interval]"));
            }
            let family = family_of(n);
            let filters: &[(&str, &str)] = if PROVIDER_MODEL_FAMILIES.contains(&family) {
                &[("provider", "$provider"), ("model", "$model")]
            } else if USER_FAMILIES.contains(&family) {
                &[("user", "$user")]
            } else {
                &[]
            };
            for (label, var) in filters {
                if !var_names.contains(&var[1..]) {
                    continue;
                }
                let m = sel.matcher(label);
                if !m.is_some_and(|m| m.op == "=~" && m.value == *var) {
                    err(format!(
                        "{what}: {n} should filter {label}=~\"{var}\" (the dashboard has the variable)"
                    ));
                }
            }
        }
        // Substitution leaves plain PromQL.
        match substitute(expr, &subst) {
            Ok(plain) if plain.contains('$') => {
                err(format!(
                    "{what}: {plain:?} still has a variable after substitution"
                ));
            }
            Ok(_) => {}
            Err(e) => err(format!("{what}: {e}")),
        }
    }
    for v in &vars {
        let name = v["name"].as_str().unwrap_or("");
        if name != "datasource" && !used_vars.contains(name) {
            err(format!("variable {name} is used by no query"));
        }
    }
}

#[test]
fn dashboards_follow_the_provisioning_conventions() {
    let all = dashboards();
    let mut errors = Vec::new();
    let mut uids = BTreeMap::new();
    let mut titles = BTreeSet::new();
    for d in &all {
        check_dashboard(d, &mut errors);
        if let Some(prev) = uids.insert(d.json["uid"].to_string(), d.stem.clone()) {
            errors.push(format!("{} and {prev} share uid {}", d.stem, d.json["uid"]));
        }
        if !titles.insert(d.json["title"].to_string()) {
            errors.push(format!("{}: title {} used twice", d.stem, d.json["title"]));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // What DESIGN §5 and the issue ask each dashboard to show.
    let mut missing = Vec::new();
    for (stem, wanted) in [
        (
            "overview",
            &[
                names::REQUESTS,
                "status=~\"[4-9]..\"",
                "llm_audit_request_duration_seconds_bucket",
                "histogram_quantile(0.99",
                names::TOKENS,
                names::COST,
                "llm_audit_time_to_first_token_seconds_bucket",
            ][..],
        ),
        (
            "cost",
            &[
                names::COST,
                "$cost_threshold",
                names::USER_COST,
                names::UNPRICED,
            ][..],
        ),
        (
            "security",
            &[
                names::USER_REQUESTS,
                "llm_audit_user_request_tokens_count",
                "le=~\"$token_threshold(\\\\.0)?\"",
                names::DUPLICATES,
                names::AUTH_FAILURES,
                "ALERTS{alertstate=\"firing\",alertname=~\"LlmAudit.*\"}",
            ][..],
        ),
        (
            "pipeline",
            &[
                names::RECORDS_WRITTEN,
                names::RECORDS_DROPPED,
                names::STORE_QUEUE_DEPTH,
                names::STORE_ERRORS,
                names::SPAN_EXPORT_ERRORS,
                "llm_audit_overhead_seconds_bucket",
                names::LABEL_OVERFLOW,
                names::PASSTHROUGH,
                names::BUILD_INFO,
            ][..],
        ),
    ] {
        let d = all.iter().find(|d| d.stem == stem).unwrap();
        let exprs: Vec<String> = d.queries().into_iter().map(|q| q.expr).collect();
        for w in wanted {
            if !exprs.iter().any(|e| e.contains(w)) {
                missing.push(format!("{stem}: no query with {w}"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));

    // The cost threshold and token threshold variables default to the config's defaults.
    let defaults = llm_audit::config::ThresholdsConfig::default();
    let cost = all.iter().find(|d| d.stem == "cost").unwrap();
    assert_eq!(
        substitutions(cost, "1m")["cost_threshold"]
            .parse::<f64>()
            .ok(),
        Some(defaults.max_cost_per_hour_usd)
    );
    let security = all.iter().find(|d| d.stem == "security").unwrap();
    assert_eq!(
        substitutions(security, "1m")["token_threshold"]
            .parse::<u64>()
            .ok(),
        Some(defaults.max_tokens_per_request)
    );
}

#[test]
fn the_promql_scanner_finds_selectors_windows_and_functions() {
    let s = scan(
        "histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~\"$model\",le=~\"1(\\\\.0)?\"}[$__rate_interval])))\n\
         / on (model) group_left sum(b_total offset 5m) > 1e+06 or vector(0) unless absent(up{job=\"x\"}) # c_total",
    )
    .unwrap();
    let names: Vec<&str> = s.selectors.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a_bucket", "b_total", "up"]);
    let a = &s.selectors[0];
    assert_eq!(a.enclosing, ["rate", "sum", "histogram_quantile"]);
    assert_eq!(a.window.as_deref(), Some("$__rate_interval"));
    assert_eq!(a.matcher("model").unwrap().value, "$model");
    assert_eq!(a.matcher("le").unwrap().value, "1(\\\\.0)?");
    assert!(a.aggregated());
    assert_eq!(s.selectors[1].enclosing, ["sum"]);
    assert_eq!(s.selectors[1].window, None);
    assert!(!s.selectors[2].aggregated());
    assert_eq!(s.windows, ["$__rate_interval"]);
    assert_eq!(s.grouping_labels, ["le", "model", "model"]);
    assert!(scan("sum(rate(x[5m:1m]))").unwrap().windows == ["5m:1m"]);
    assert!(scan("sum(rate(x[5m])").is_err());
    assert!(scan("{job=\"x\"}").is_err());

    let mut values = BTreeMap::new();
    values.insert("model".to_owned(), ".*".to_owned());
    values.insert("__rate_interval".to_owned(), "1m".to_owned());
    assert_eq!(
        substitute(
            "rate(x{model=~\"${model}\"}[$__rate_interval]) + $model",
            &values
        )
        .unwrap(),
        "rate(x{model=~\".*\"}[1m]) + .*"
    );
    assert!(substitute("x * $nope", &values).is_err());
    assert_eq!(
        ops::referenced_variables("a{b=~\"$b\",c=~\"[[c]]\",d=~\"${d:regex}\"}"),
        ["b", "c", "d"].iter().map(|s| (*s).to_owned()).collect()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. promtool parses every query
// ---------------------------------------------------------------------------------------------

/// Every dashboard query and variable selector with the variables substituted, named.
fn all_queries(all: &[Dashboard], window: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for d in all {
        let subst = substitutions(d, window);
        for q in d.queries() {
            let expr = substitute(&q.expr, &subst).unwrap_or_else(|e| panic!("{q}: {e}"));
            out.push((q.to_string(), expr));
        }
        for (name, sel, _) in d.variable_selectors() {
            let what = format!("{}.json variable {name}", d.stem);
            let expr = substitute(&sel, &subst).unwrap_or_else(|e| panic!("{what}: {e}"));
            out.push((what, expr));
        }
    }
    out
}

#[test]
fn promtool_parses_every_dashboard_query() {
    if !ops::tool_available("promtool") {
        return;
    }
    let all = dashboards();
    let queries = all_queries(&all, "1m");
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| json!({"record": format!("llm_audit_dashboard:query_{i}"), "expr": expr}))
        .collect();
    let count = rules.len();
    // JSON is YAML: no quoting of PromQL to get wrong.
    let file = json!({"groups": [{"name": "llm-audit-dashboards", "rules": rules}]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboards.rules.yml");
    std::fs::write(&path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The queries promtool names (all of them if it names none).
    let named: Vec<String> = queries
        .iter()
        .enumerate()
        .filter(|(i, _)| stdout.contains(&format!("query_{i}\"")))
        .map(|(i, (what, expr))| format!("query_{i}: {what}: {expr}\n"))
        .collect();
    let listing = if named.is_empty() {
        queries
            .iter()
            .enumerate()
            .map(|(i, (what, expr))| format!("query_{i}: {what}: {expr}\n"))
            .collect()
    } else {
        named.concat()
    };
    assert!(
        out.status.success(),
        "promtool check rules failed\n{stdout}\n{stderr}\n--- queries\n{listing}"
    );
    assert!(
        stdout.contains(&format!("SUCCESS: {count} rules found")),
        "expected {count} rules\n{stdout}\n{stderr}"
    );
    assert!(count >= 40, "only {count} queries in the dashboards");
}

// ---------------------------------------------------------------------------------------------
// 3. A real Prometheus scraping the real demo
// ---------------------------------------------------------------------------------------------

/// How long the demo runs; every live query happens well before it ends (after that the
/// target is down, its series are stale and instant selectors return nothing).
const DEMO_SECS: u64 = 40;

#[test]
fn every_dashboard_query_and_rule_works_on_prometheus_scraping_the_demo() {
    if !ops::tool_available("prometheus") {
        return;
    }
    let all = dashboards();
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(
        u32::try_from(DEMO_SECS).unwrap(),
        30,
        &dir.path().join("demo.db"),
    );
    let rules_file = ops::repo().join("alerts/llm-audit.rules.yml");
    let rule_files = if rules_file.exists() {
        format!("rule_files:\n  - {:?}\n", rules_file.display().to_string())
    } else {
        eprintln!(
            "note: {} does not exist yet; only the dashboards are checked",
            rules_file.display()
        );
        String::new()
    };
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         {rule_files}\
         scrape_configs:\n  - job_name: llm-audit\n    static_configs:\n      - targets: [\"{}\"]\n",
        demo.metrics
    );
    let prom = Prometheus::start(dir.path(), &config);
    let context = |extra: &str| {
        format!(
            "{extra}\n--- prometheus.yml\n{config}\n--- prometheus log (tail)\n{}\n--- demo stderr\n{}",
            prom.log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n"),
            demo.stderr()
        )
    };
    let deadline = demo.started + Duration::from_secs(DEMO_SECS - 4);

    // A few scrapes of a healthy target first, so 1-minute rates have samples to work with.
    let mut scrapes = 0.0;
    while Instant::now() < deadline {
        if let Ok(data) = prom.query("sum(sum_over_time(up{job=\"llm-audit\"}[1m]))") {
            scrapes = data["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if scrapes >= 6.0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        scrapes >= 6.0,
        "{}",
        context(&format!("only {scrapes} successful scrapes of the demo"))
    );

    // (a) Every metric a dashboard or a rule names is exported by the demo.
    let exported = demo.sample_names();
    let mut named: Vec<(String, String)> = all_queries(&all, "1m");
    let mut rule_names = BTreeSet::new();
    let mut rule_count = 0;
    if rules_file.exists() {
        let groups = prom
            .api("rules")
            .unwrap_or_else(|e| panic!("{}", context(&e)));
        for g in groups["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                rule_count += 1;
                let name = r["name"].as_str().unwrap_or("?").to_owned();
                if r["type"] == "recording" {
                    rule_names.insert(name.clone());
                }
                let query = r["query"].as_str().unwrap_or("").to_owned();
                named.push((format!("rule {name} ({})", g["file"]), query));
            }
        }
        assert!(
            rule_count > 0,
            "{}",
            context("Prometheus loaded no rule from alerts/llm-audit.rules.yml")
        );
    }
    let mut unknown = Vec::new();
    for (what, expr) in &named {
        let s = scan(expr).unwrap_or_else(|e| panic!("{what}: {e}"));
        for n in s.names() {
            let known = exported.contains(&n)
                || (!ours(&n) && PROMETHEUS_OWN.contains(&n.as_str()))
                || rule_names.contains(&n);
            if !known {
                unknown.push(format!("{what}: {n} (family {})", family_of(&n)));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "{}",
        context(&format!(
            "names not exported by the demo:\n{}\n--- exported\n{exported:?}",
            unknown.join("\n")
        ))
    );

    // (b) Every dashboard query returns data (retrying while the demo's traffic fills in
    // series such as a first failed call or a first duplicate).
    let queries = all_queries(&all, "1m");
    let mut pending: Vec<&(String, String)> = queries.iter().collect();
    let mut empty: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    while !pending.is_empty() {
        empty.clear();
        pending.retain(|(what, expr)| match prom.query(expr) {
            Ok(data) if has_data(&data) => false,
            Ok(data) => {
                empty.push(format!("{what}: no data for {expr}\n  {data}"));
                true
            }
            Err(e) => {
                // Not worth retrying: Prometheus rejected the query itself.
                errors.push(format!("{what}: {expr}\n  {e}"));
                false
            }
        });
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    errors.append(&mut empty);
    assert!(
        errors.is_empty(),
        "{}",
        context(&format!(
            "{} of {} dashboard queries failed on Prometheus:\n{}",
            errors.len(),
            queries.len(),
            errors.join("\n")
        ))
    );
    eprintln!(
        "all {} dashboard queries returned data {:.1?} after the demo started ({} rules checked)",
        queries.len(),
        demo.started.elapsed(),
        rule_count
    );

    // The numbers are real, not just present: the demo's traffic shows as requests, cost,
    // users and written records.
    for (what, promql) in [
        (
            "request rate",
            "sum(rate(llm_audit_requests_total[1m])) > 0",
        ),
        ("cost rate", "sum(rate(llm_audit_cost_usd_total[1m])) > 0"),
        (
            "ten users",
            "count(count by (user) (llm_audit_user_requests_total)) >= 10",
        ),
        (
            "records written",
            "sum(llm_audit_records_written_total) > 0",
        ),
        ("build info", "sum(llm_audit_build_info) == 1"),
    ] {
        let data = prom.query(promql).unwrap();
        assert!(
            has_data(&data),
            "{}",
            context(&format!("{what}: {promql} returned {data}"))
        );
    }

    // The rules evaluate without errors on the real series (e.g. no many-to-many matches).
    if rules_file.exists() {
        let groups = prom.api("rules").unwrap();
        let broken: Vec<String> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["health"] == "err")
            .map(|r| format!("{}: {}", r["name"], r["lastError"]))
            .collect();
        assert!(
            broken.is_empty(),
            "{}",
            context(&format!(
                "rules failing on Prometheus:\n{}",
                broken.join("\n")
            ))
        );
    }
    assert!(
        Instant::now() < demo.started + Duration::from_secs(DEMO_SECS),
        "the checks outlasted the demo; its series may have gone stale"
    );
    drop(prom);
    drop(demo);
}
