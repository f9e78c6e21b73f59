//! Helpers for `tests/alerts.rs`: finding the Prometheus tools, running them (and Prometheus
//! and Alertmanager servers) as child processes killed on drop, and talking to their APIs.
//! The receivers of Alertmanager's notifications are in [`sinks`].
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod sinks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::{free_port, reap};

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// The first of `names` found on `PATH`.
pub fn find_tool(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// One path per tool (each given as alternative names), or `None` after printing why the test
/// is skipped. Under CI (`CI` set) a missing tool fails the test instead: CI installs them.
pub fn require_tools(test: &str, tools: &[&[&str]]) -> Option<Vec<PathBuf>> {
    let mut found = Vec::new();
    for names in tools {
        match find_tool(names) {
            Some(p) => found.push(p),
            None if std::env::var_os("CI").is_some() => panic!(
                "{test}: {} not found on PATH. CI must install it: apt-get install -y \
                 --no-install-recommends prometheus prometheus-alertmanager",
                names.join(" or ")
            ),
            None => {
                eprintln!(
                    "SKIPPED {test}: {} not found on PATH (apt-get install prometheus \
                     prometheus-alertmanager)",
                    names.join(" or ")
                );
                return None;
            }
        }
    }
    Some(found)
}

/// Runs a tool to completion and returns (success, stdout, stderr); panics if it cannot start.
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A child process with its output in a log file; killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr to `dir/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// An HTTP client that never goes through a proxy from the environment.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Polls `url` until it answers 200, checking that `proc` is still alive.
pub async fn wait_ready(proc: &mut Proc, url: &str, within: Duration) {
    let http = http();
    let deadline = Instant::now() + within;
    loop {
        proc.assert_running();
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready at {url} within {within:?}:\n{}",
            proc.name,
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus and Alertmanager
// ---------------------------------------------------------------------------------------------

/// A running Alertmanager on a free loopback port, clustering off.
pub async fn start_alertmanager(bin: &Path, config: &Path, dir: &Path) -> (Proc, String) {
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .arg("--log.level=debug");
    let mut am = Proc::spawn("alertmanager", cmd, dir);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&mut am, &format!("{base}/-/ready"), Duration::from_secs(30)).await;
    (am, base)
}

/// Alert name → `active` or `suppressed`, as Alertmanager's API reports them.
pub async fn alert_states(base: &str) -> BTreeMap<String, String> {
    let alerts: Value = http()
        .get(format!("{base}/api/v2/alerts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    alerts
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap().to_owned(),
                a["status"]["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Posts alerts to Alertmanager's API, as Prometheus would.
pub async fn post_alerts(base: &str, alerts: Value) {
    let r = http()
        .post(format!("{base}/api/v2/alerts"))
        .json(&alerts)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

/// A running Prometheus on a free loopback port: scrapes `target` as job `llm-audit` and
/// evaluates `rules` every second, alerting `alertmanager`.
pub async fn start_prometheus(
    bin: &Path,
    dir: &Path,
    rules: &Path,
    target: &str,
    alertmanager: &str,
) -> (Proc, String) {
    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{am}\"]\n\
             scrape_configs:\n  - job_name: llm-audit\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = rules.display(),
            am = alertmanager.trim_start_matches("http://"),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("prom-data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let mut prom = Proc::spawn("prometheus", cmd, dir);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(
        &mut prom,
        &format!("{base}/-/ready"),
        Duration::from_secs(30),
    )
    .await;
    (prom, base)
}

/// `data` of a Prometheus API answer (asserting `status: success`).
pub async fn prom_get(base: &str, path: &str, query: &[(&str, &str)]) -> Value {
    let url = reqwest::Url::parse_with_params(&format!("{base}{path}"), query).unwrap();
    let v: Value = http().get(url).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "success", "{path}: {v}");
    v["data"].clone()
}

/// The value of a one-element instant query, if any.
pub async fn prom_value(base: &str, query: &str) -> Option<f64> {
    let data = prom_get(base, "/api/v1/query", &[("query", query)]).await;
    data["result"][0]["value"][1].as_str()?.parse().ok()
}
