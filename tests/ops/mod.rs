//! Helpers for the operations-file tests: the shipped Grafana dashboards as data, a small
//! PromQL scanner (metric selectors, windows, enclosing functions), Grafana variable
//! substitution, and a real Prometheus (plus the demo it scrapes) on loopback ports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::{Lines, Reap, free_port, llm_audit, metrics_addr};

// ---------------------------------------------------------------------------------------------
// The dashboards as data
// ---------------------------------------------------------------------------------------------

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One dashboard file.
pub struct Dashboard {
    /// File stem (`overview`, …).
    pub stem: String,
    /// The raw file text.
    pub text: String,
    /// The parsed JSON model.
    pub json: Value,
}

/// Every `dashboards/*.json`, sorted by name; panics on a file that is not JSON.
pub fn load_dashboards() -> Vec<Dashboard> {
    let dir = repo().join("dashboards");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            Dashboard {
                stem: path.file_stem().unwrap().to_string_lossy().into_owned(),
                text,
                json,
            }
        })
        .collect()
}

impl Dashboard {
    /// Every panel, rows included, with the panels of collapsed rows flattened in.
    pub fn panels(&self) -> Vec<&Value> {
        let mut out = Vec::new();
        for p in self.json["panels"].as_array().into_iter().flatten() {
            out.push(p);
            out.extend(p["panels"].as_array().into_iter().flatten());
        }
        out
    }

    /// The template variables.
    pub fn variables(&self) -> Vec<&Value> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .collect()
    }

    /// Every query of every panel.
    pub fn queries(&self) -> Vec<PanelQuery> {
        let mut out = Vec::new();
        for p in self.panels() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    dashboard: self.stem.clone(),
                    panel_id: p["id"].as_u64().unwrap_or(0),
                    panel: p["title"].as_str().unwrap_or("?").to_owned(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: t["expr"].as_str().unwrap_or("").to_owned(),
                });
            }
        }
        out
    }

    /// The series selector inside each `label_values(SELECTOR, label)` variable query, with
    /// the variable's name and the label.
    pub fn variable_selectors(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for v in self.variables() {
            if v["type"] != "query" {
                continue;
            }
            let q = variable_query(v);
            let name = v["name"].as_str().unwrap_or("?").to_owned();
            let inner = q
                .trim()
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{}: variable {name}: {q:?}", self.stem));
            let (sel, label) = inner
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("{}: variable {name}: {q:?}", self.stem));
            out.push((name, sel.trim().to_owned(), label.trim().to_owned()));
        }
        out
    }
}

/// The query string of a query variable (Grafana stores a string or `{query, refId}`).
pub fn variable_query(v: &Value) -> String {
    match &v["query"] {
        Value::String(s) => s.clone(),
        other => other["query"].as_str().unwrap_or("").to_owned(),
    }
}

/// One panel query.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel_id: u64,
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
}

impl std::fmt::Display for PanelQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.json panel {} {:?} query {}",
            self.dashboard, self.panel_id, self.panel, self.ref_id
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Grafana variables
// ---------------------------------------------------------------------------------------------

/// Grafana's own variables that a query may use.
pub const BUILTIN_VARIABLES: [&str; 6] = [
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

/// Where a variable reference sits in a query: its byte range and name.
fn variable_refs(expr: &str) -> Vec<(usize, usize, String)> {
    let b = expr.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() && b[i + 1] == b'{' {
            // ${name} or ${name:format}
            let end = expr[i..].find('}').map_or(b.len(), |e| i + e + 1);
            let inner = &expr[i + 2..end.saturating_sub(1)];
            let name = inner.split(':').next().unwrap_or("").to_owned();
            out.push((i, end, name));
            i = end;
        } else if b[i] == b'$' {
            let mut j = i + 1;
            while j < b.len() && word(b[j]) {
                j += 1;
            }
            out.push((i, j, expr[i + 1..j].to_owned()));
            i = j.max(i + 1);
        } else if b[i] == b'[' && b.get(i + 1) == Some(&b'[') {
            // [[name]] or [[name:format]]
            let end = expr[i..].find("]]").map_or(b.len(), |e| i + e + 2);
            let inner = &expr[i + 2..end.saturating_sub(2)];
            let name = inner.split(':').next().unwrap_or("").to_owned();
            out.push((i, end, name));
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The names of the variables a query refers to.
pub fn referenced_variables(expr: &str) -> BTreeSet<String> {
    variable_refs(expr).into_iter().map(|(_, _, n)| n).collect()
}

/// What each of a dashboard's variables stands for when a query is run outside Grafana:
/// `.*` for query variables (their "All"), the current value of text/constant/custom ones,
/// and `window` for Grafana's interval variables.
pub fn substitutions(d: &Dashboard, window: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for v in d.variables() {
        let name = v["name"].as_str().unwrap_or("").to_owned();
        let value = match v["type"].as_str() {
            Some("query") => ".*".to_owned(),
            Some("datasource") => continue,
            _ => {
                let current = &v["current"]["value"];
                match current {
                    Value::String(s) => s.clone(),
                    Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or("").to_owned(),
                    _ => variable_query(v),
                }
            }
        };
        map.insert(name, value);
    }
    for b in BUILTIN_VARIABLES {
        let value = match b {
            "__interval_ms" | "__range_ms" => "60000".to_owned(),
            "__range_s" => "60".to_owned(),
            _ => window.to_owned(),
        };
        map.insert(b.to_owned(), value);
    }
    map
}

/// `expr` with every variable replaced by its value in `values`; an unknown one is an error.
pub fn substitute(expr: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut last = 0;
    for (start, end, name) in variable_refs(expr) {
        out.push_str(&expr[last..start]);
        let value = values
            .get(&name)
            .ok_or_else(|| format!("unknown variable ${name} in {expr:?}"))?;
        out.push_str(value);
        last = end;
    }
    out.push_str(&expr[last..]);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// A PromQL scanner: enough of the grammar to find every metric selector, its matchers, its
// range window and the functions and aggregations around it. Not a validator (promtool is).
// ---------------------------------------------------------------------------------------------

/// PromQL aggregation operators.
pub const AGGREGATORS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// One label matcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    pub label: String,
    pub op: String,
    pub value: String,
}

/// One metric selector in a query.
#[derive(Clone, Debug)]
pub struct Selector {
    /// Metric name.
    pub name: String,
    /// Label matchers, as written (variables not substituted).
    pub matchers: Vec<Matcher>,
    /// The range window (`[…]` right after the selector), if any.
    pub window: Option<String>,
    /// Functions and aggregations around the selector, innermost first.
    pub enclosing: Vec<String>,
}

impl Selector {
    /// Whether an aggregation operator encloses the selector.
    pub fn aggregated(&self) -> bool {
        self.enclosing
            .iter()
            .any(|f| AGGREGATORS.contains(&f.as_str()))
    }

    /// The function directly around the selector.
    pub fn innermost(&self) -> Option<&str> {
        self.enclosing.first().map(String::as_str)
    }

    /// The matcher on `label`, if any.
    pub fn matcher(&self, label: &str) -> Option<&Matcher> {
        self.matchers.iter().find(|m| m.label == label)
    }
}

/// What the scanner found in one query.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub selectors: Vec<Selector>,
    /// Every `[…]` (range or subquery), as written.
    pub windows: Vec<String>,
    /// Every label named in `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`.
    pub grouping_labels: Vec<String>,
}

impl Scan {
    /// Distinct metric names.
    pub fn names(&self) -> BTreeSet<String> {
        self.selectors.iter().map(|s| s.name.clone()).collect()
    }
}

fn read_string(c: &[char], mut i: usize) -> Result<(String, usize), String> {
    let quote = c[i];
    i += 1;
    let mut s = String::new();
    while i < c.len() {
        match c[i] {
            '\\' if quote != '`' => {
                let next = *c.get(i + 1).ok_or("unterminated escape")?;
                s.push('\\');
                s.push(next);
                i += 2;
            }
            ch if ch == quote => return Ok((s, i + 1)),
            ch => {
                s.push(ch);
                i += 1;
            }
        }
    }
    Err(format!("unterminated string at {i}"))
}

fn skip_ws(c: &[char], mut i: usize) -> usize {
    while i < c.len() && c[i].is_whitespace() {
        i += 1;
    }
    i
}

fn is_ident_start(ch: char) -> bool {
    ch.is_ascii_alphabetic() || ch == '_' || ch == ':'
}

fn is_ident(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || ch == '_' || ch == ':'
}

/// Reads a `( label, … )` list starting at `c[i] == '('`.
fn read_label_list(c: &[char], i: usize) -> Result<(Vec<String>, usize), String> {
    let close = c[i..]
        .iter()
        .position(|&ch| ch == ')')
        .ok_or("unclosed label list")?;
    let text: String = c[i + 1..i + close].iter().collect();
    let labels = text
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    Ok((labels, i + close + 1))
}

fn read_matchers(c: &[char], mut i: usize) -> Result<(Vec<Matcher>, usize), String> {
    // c[i] == '{'
    i += 1;
    let mut out = Vec::new();
    loop {
        i = skip_ws(c, i);
        match c.get(i) {
            Some('}') => return Ok((out, i + 1)),
            Some(',') => i += 1,
            Some(&ch) if is_ident_start(ch) => {
                let start = i;
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
                let label: String = c[start..i].iter().collect();
                i = skip_ws(c, i);
                let op_start = i;
                while i < c.len() && matches!(c[i], '=' | '!' | '~') {
                    i += 1;
                }
                let op: String = c[op_start..i].iter().collect();
                if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
                    return Err(format!("bad matcher operator {op:?} after {label}"));
                }
                i = skip_ws(c, i);
                if !matches!(c.get(i), Some('"' | '\'' | '`')) {
                    return Err(format!("matcher {label}{op} without a string"));
                }
                let (value, next) = read_string(c, i)?;
                i = next;
                out.push(Matcher { label, op, value });
            }
            other => return Err(format!("unexpected {other:?} in matchers")),
        }
    }
}

/// Scans one PromQL expression. Grafana variables (`$x`, `${x}`) may stand where a value goes.
pub fn scan(expr: &str) -> Result<Scan, String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Scan::default();
    // One entry per open parenthesis: the function or aggregation it belongs to ("" if none).
    let mut stack: Vec<String> = Vec::new();
    let mut pending: Option<String> = None;
    // Index into out.selectors of the selector that may still take `{…}` or `[…]`.
    let mut open_selector: Option<usize> = None;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
            continue;
        }
        if ch == '#' {
            // comment to end of line
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
            continue;
        }
        match ch {
            '"' | '\'' | '`' => {
                i = read_string(&c, i)?.1;
                open_selector = None;
            }
            '{' => {
                let (matchers, next) = read_matchers(&c, i)?;
                let Some(s) = open_selector else {
                    return Err(format!("selector without a metric name at {i}: {expr}"));
                };
                out.selectors[s].matchers = matchers;
                i = next;
            }
            '[' => {
                let close = c[i..].iter().position(|&x| x == ']').ok_or("unclosed [")?;
                let window: String = c[i + 1..i + close].iter().collect();
                if let Some(s) = open_selector.take() {
                    out.selectors[s].window = Some(window.clone());
                }
                out.windows.push(window);
                i += close + 1;
            }
            '(' => {
                stack.push(pending.take().unwrap_or_default());
                open_selector = None;
                i += 1;
            }
            ')' => {
                stack
                    .pop()
                    .ok_or_else(|| format!("unbalanced ) in {expr}"))?;
                open_selector = None;
                i += 1;
            }
            '$' => {
                // A Grafana variable standing for a value.
                i += 1;
                if c.get(i) == Some(&'{') {
                    while i < c.len() && c[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                        i += 1;
                    }
                }
                open_selector = None;
            }
            ch if ch.is_ascii_digit()
                || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // number or duration: 0.95, 1e+06, 5m, 1h30m, 0x1f
                while i < c.len() {
                    let exponent_sign = matches!(c[i], '+' | '-') && matches!(c[i - 1], 'e' | 'E');
                    if c[i].is_ascii_alphanumeric() || c[i] == '.' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                open_selector = None;
            }
            ch if is_ident_start(ch) => {
                let start = i;
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let next = skip_ws(&c, i);
                open_selector = None;
                match word.as_str() {
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right" => {
                        if c.get(next) == Some(&'(') {
                            let (labels, after) = read_label_list(&c, next)?;
                            out.grouping_labels.extend(labels);
                            i = after;
                        }
                    }
                    "and" | "or" | "unless" | "bool" | "offset" | "atan2" => {}
                    w if w.eq_ignore_ascii_case("inf") || w.eq_ignore_ascii_case("nan") => {}
                    w if AGGREGATORS.contains(&w) || c.get(next) == Some(&'(') => {
                        pending = Some(word.clone());
                    }
                    _ => {
                        out.selectors.push(Selector {
                            name: word,
                            matchers: Vec::new(),
                            window: None,
                            enclosing: stack
                                .iter()
                                .rev()
                                .filter(|f| !f.is_empty())
                                .cloned()
                                .collect(),
                        });
                        open_selector = Some(out.selectors.len() - 1);
                    }
                }
            }
            '+' | '-' | '*' | '/' | '%' | '^' | '=' | '!' | '<' | '>' | ',' | '@' | ':' => {
                open_selector = None;
                i += 1;
            }
            other => return Err(format!("unexpected {other:?} at {i} in {expr}")),
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed ( in {expr}"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// External tools and processes
// ---------------------------------------------------------------------------------------------

/// Whether `tool --version` runs. Missing: a failure when `CI` is set (`.ci/run` installs
/// Debian's `prometheus` package), else a note and `false` so the caller skips.
pub fn tool_available(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required when CI is set (apt-get install prometheus)"
        );
        eprintln!("note: {tool} not found; skipping (apt-get install prometheus to run this)");
    }
    ok
}

/// `GET path` over HTTP/1.0 (no chunked bodies); the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `llm-audit demo` running as a child process, its stderr collected.
pub struct Demo {
    /// Held only to be killed on drop.
    _process: Reap,
    pub metrics: SocketAddr,
    pub started: Instant,
    stderr: Lines,
}

impl Demo {
    /// Starts the built binary's demo for `secs` seconds on loopback ports, the developer's
    /// settings removed ([`llm_audit`]), and waits for its `metrics on` line.
    pub fn start(secs: u32, rps: u32, db: &Path) -> Self {
        let mut cmd = llm_audit();
        cmd.args(["demo", "--duration", &secs.to_string(), "--rps"])
            .arg(rps.to_string())
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--db")
            .arg(db)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = Reap(cmd.spawn().unwrap());
        let stderr = Lines::read(child.0.stderr.take().unwrap());
        let metrics = stderr
            .wait_for(Duration::from_secs(30), metrics_addr)
            .unwrap_or_else(|| {
                panic!(
                    "the demo printed no `metrics on http://ADDR/metrics` line\n--- stderr\n{}",
                    stderr.so_far()
                )
            });
        Self {
            _process: child,
            metrics,
            started,
            stderr,
        }
    }

    /// What the demo printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.so_far()
    }

    /// The sample names of one scrape of `/metrics` (`x_bucket`, `x_sum`, … for histograms).
    pub fn sample_names(&self) -> BTreeSet<String> {
        let (status, body) = http_get(self.metrics, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                l.split(['{', ' '])
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .collect()
    }
}

/// A real Prometheus server on a loopback port, its data in a temp directory.
pub struct Prometheus {
    /// Held only to be killed on drop.
    _process: Reap,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` with `config` (YAML) in `dir`; retries on another port if the one
    /// picked was taken meanwhile. Returns once `/-/ready` answers 200.
    pub fn start(dir: &Path, config: &str) -> Self {
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut last_log = String::new();
        for attempt in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let log_file = File::create(&log).unwrap();
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::from(log_file.try_clone().unwrap()))
                .stderr(Stdio::from(log_file))
                .spawn()
                .unwrap();
            let mut child = Reap(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if child.0.try_wait().unwrap().is_some() {
                    break;
                }
                if matches!(http_get(addr, "/-/ready"), Ok((200, _))) {
                    return Self {
                        _process: child,
                        addr,
                        log,
                    };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("prometheus did not start\n--- its log\n{last_log}");
    }

    /// Prometheus' own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`; the `data` of a successful answer, or the error text.
    pub fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) =
            http_get(self.addr, &format!("/api/v1/{path}")).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!(
                "HTTP {status}: {} {}",
                v["errorType"].as_str().unwrap_or(""),
                v["error"].as_str().unwrap_or(&body)
            ))
        }
    }

    /// An instant query: its `data` (`resultType`, `result`).
    pub fn query(&self, promql: &str) -> Result<Value, String> {
        self.api(&format!("query?query={}", url_encode(promql)))
    }
}

/// Whether an instant query's `data` holds at least one sample.
pub fn has_data(data: &Value) -> bool {
    match data["resultType"].as_str() {
        Some("vector" | "matrix") => data["result"].as_array().is_some_and(|r| !r.is_empty()),
        Some("scalar" | "string") => true,
        _ => false,
    }
}
