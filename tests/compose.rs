#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The Docker Compose stack (`docker-compose.yml`, `Dockerfile`, `deploy/`) checked statically,
//! since CI has no Docker engine: the Compose specification's schema (check-jsonschema), every
//! bind-mounted path present, pinned images, the services pointing at each other's real names
//! and ports, `promtool check config` with the shipped rules, Alertmanager's secret files and
//! Grafana's provisioning, and the Dockerfile's build and runtime stages.
//!
//! YAML is read by the Python that runs check-jsonschema (its `ruamel.yaml`). Without
//! check-jsonschema or promtool a test is skipped with a note, unless `CI` is set (`.ci/run`
//! installs both), where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::{CommandFactory as _, Parser as _};
use llm_audit::cli::{Cli, Command as Sub};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// `found`, or — when it is missing — a panic in CI and a note (None) elsewhere.
fn required(test: &str, what: &str, found: Option<PathBuf>, how: &str) -> Option<PathBuf> {
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("{what} is required when CI is set: {how}")
        }
        None => {
            eprintln!("SKIPPED {test}: {what} not found ({how})");
            None
        }
    }
}

/// `LLM_AUDIT_CHECK_JSONSCHEMA`, else `target/sdk-venv/bin/check-jsonschema` (where `.ci/run`
/// installs it).
fn check_jsonschema(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("LLM_AUDIT_CHECK_JSONSCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/sdk-venv/bin/check-jsonschema"));
    required(
        test,
        "check-jsonschema",
        found.is_file().then_some(found),
        "`.ci/run` installs it into target/sdk-venv (pip install check-jsonschema), \
         or set LLM_AUDIT_CHECK_JSONSCHEMA",
    )
}

fn promtool(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    required(
        test,
        "promtool",
        found,
        "apt-get install prometheus, as `.ci/run` does",
    )
}

/// The interpreter check-jsonschema runs on (its script's `#!` line): it has `ruamel.yaml`.
fn python_of(script: &Path) -> PathBuf {
    let text = std::fs::read(script).unwrap();
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    match first.strip_prefix("#!") {
        Some(interp) if !interp.contains(' ') => PathBuf::from(interp.trim()),
        _ => script.with_file_name("python"),
    }
}

const YAML_TO_JSON: &str = r#"
import json, sys
from ruamel.yaml import YAML
yaml = YAML(typ="safe", pure=True)
docs = []
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        docs.append(yaml.load(f))
json.dump(docs, sys.stdout, default=str)
"#;

/// The YAML files `rel` (relative to the repository) as JSON values, in order; None when
/// check-jsonschema (and so its Python) is missing outside CI.
fn load_yaml(test: &str, rel: &[&str]) -> Option<Vec<Value>> {
    let cj = check_jsonschema(test)?;
    let python = python_of(&cj);
    let out = Command::new(&python)
        .arg("-c")
        .arg(YAML_TO_JSON)
        .args(rel.iter().map(|r| repo().join(r)))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "reading {rel:?} as YAML with {}: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(docs.len(), rel.len());
    Some(docs)
}

// ---------------------------------------------------------------------------------------------
// The stack's files
// ---------------------------------------------------------------------------------------------

const COMPOSE: &str = "docker-compose.yml";
const PROMETHEUS: &str = "deploy/prometheus/prometheus.yml";
const COLLECTOR: &str = "deploy/otel-collector/config.yaml";
const TEMPO: &str = "deploy/tempo/tempo.yaml";
const DATASOURCES: &str = "deploy/grafana/provisioning/datasources/datasources.yml";
const DASHBOARD_PROVIDERS: &str = "deploy/grafana/provisioning/dashboards/dashboards.yml";
const RULES: &str = "alerts/llm-audit.rules.yml";
const ALERTMANAGER: &str = "alerts/alertmanager.yml";

struct Stack {
    compose: Value,
    prometheus: Value,
    collector: Value,
    tempo: Value,
    datasources: Value,
    dashboard_providers: Value,
}

fn stack(test: &str) -> Option<Stack> {
    let mut docs = load_yaml(
        test,
        &[
            COMPOSE,
            PROMETHEUS,
            COLLECTOR,
            TEMPO,
            DATASOURCES,
            DASHBOARD_PROVIDERS,
        ],
    )?
    .into_iter();
    let mut next = || docs.next().unwrap();
    Some(Stack {
        compose: next(),
        prometheus: next(),
        collector: next(),
        tempo: next(),
        datasources: next(),
        dashboard_providers: next(),
    })
}

impl Stack {
    fn services(&self) -> &serde_json::Map<String, Value> {
        self.compose["services"].as_object().expect("services")
    }

    fn service(&self, name: &str) -> Service<'_> {
        Service {
            name: name.to_owned(),
            def: self
                .services()
                .get(name)
                .unwrap_or_else(|| panic!("no service {name:?} in {COMPOSE}")),
        }
    }

    fn is_service(&self, name: &str) -> bool {
        self.services().contains_key(name)
    }

    /// The service and container path that hold `container_path` of `service` (a bind mount of
    /// a repository file, or a path inside a bind-mounted directory) as a repository path.
    fn host_path_of(&self, service: &str, container_path: &str) -> Option<PathBuf> {
        self.service(service)
            .mounts()
            .into_iter()
            .filter(|m| m.bind)
            .find_map(|m| {
                let rest = container_path.strip_prefix(&m.target)?;
                if !(rest.is_empty() || rest.starts_with('/')) {
                    return None;
                }
                Some(repo_path(&m.source).join(rest.trim_start_matches('/')))
            })
    }

    /// The port a service listens on inside the compose network (its image default unless its
    /// command says otherwise; llm-audit: the metrics listener Prometheus scrapes).
    fn listen_port(&self, service: &str) -> u16 {
        match service {
            "prometheus" => web_listen_port(&self.service(service).command(), 9090),
            "alertmanager" => web_listen_port(&self.service(service).command(), 9093),
            "grafana" => 3000,
            "tempo" => port_of(&self.tempo["server"]["http_listen_port"]),
            "llm-audit" => self.llm_audit_demo().metrics_listen.unwrap().port(),
            other => panic!("no known port for {other}"),
        }
    }

    /// llm-audit's compose command, parsed by the real CLI as `demo`.
    fn llm_audit_demo(&self) -> llm_audit::cli::DemoArgs {
        let cmd = self.service("llm-audit").command();
        match Cli::try_parse_from(std::iter::once("llm-audit".to_owned()).chain(cmd.clone())) {
            Ok(Cli {
                command: Sub::Demo(args),
            }) => args,
            other => panic!("llm-audit's command {cmd:?} is not a `demo` command: {other:?}"),
        }
    }
}

fn web_listen_port(cmd: &[String], default: u16) -> u16 {
    flag(cmd, "--web.listen-address")
        .map_or(default, |a| a.rsplit(':').next().unwrap().parse().unwrap())
}

fn port_of(v: &Value) -> u16 {
    match v {
        Value::Number(n) => u16::try_from(n.as_u64().unwrap()).unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("not a port: {other}"),
    }
}

/// `./x/y` relative to the repository.
fn repo_path(source: &str) -> PathBuf {
    repo().join(source.trim_start_matches("./"))
}

struct Service<'a> {
    name: String,
    def: &'a Value,
}

#[derive(Debug)]
struct Mount {
    source: String,
    target: String,
    bind: bool,
}

impl Service<'_> {
    /// `command`, interpolated, as a list.
    fn command(&self) -> Vec<String> {
        match &self.def["command"] {
            Value::Null => Vec::new(),
            Value::String(s) => interpolate(s)
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            Value::Array(a) => a
                .iter()
                .map(|v| interpolate(v.as_str().expect("command items are strings")))
                .collect(),
            other => panic!("{}: command {other}", self.name),
        }
    }

    /// `environment`, interpolated.
    fn env(&self) -> BTreeMap<String, String> {
        match &self.def["environment"] {
            Value::Null => BTreeMap::new(),
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => interpolate(s),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect(),
            Value::Array(a) => a
                .iter()
                .map(|kv| {
                    let kv = interpolate(kv.as_str().unwrap());
                    let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
            other => panic!("{}: environment {other}", self.name),
        }
    }

    fn mounts(&self) -> Vec<Mount> {
        let Some(volumes) = self.def["volumes"].as_array() else {
            return Vec::new();
        };
        volumes
            .iter()
            .map(|v| match v {
                Value::String(s) => {
                    let s = interpolate(s);
                    let mut parts = s.splitn(3, ':');
                    let source = parts.next().unwrap().to_owned();
                    let target = parts
                        .next()
                        .unwrap_or_else(|| panic!("{}: anonymous volume {s}", self.name))
                        .to_owned();
                    let bind = source.starts_with(['.', '/', '~']);
                    Mount {
                        source,
                        target,
                        bind,
                    }
                }
                Value::Object(m) => Mount {
                    source: interpolate(m["source"].as_str().unwrap()),
                    target: m["target"].as_str().unwrap().to_owned(),
                    bind: m["type"] == "bind",
                },
                other => panic!("{}: volume {other}", self.name),
            })
            .collect()
    }

    /// `(host address, host port, container port)` of each published port.
    fn published(&self) -> Vec<(String, u16, u16)> {
        let Some(ports) = self.def["ports"].as_array() else {
            return Vec::new();
        };
        ports
            .iter()
            .map(|p| {
                let p = interpolate(p.as_str().unwrap_or_else(|| {
                    panic!("{}: write ports as \"127.0.0.1:HOST:CONTAINER\"", self.name)
                }));
                let parts: Vec<&str> = p.split(':').collect();
                let [ip, host, container] = parts[..] else {
                    panic!(
                        "{}: port {p:?} does not name the host address (127.0.0.1:HOST:CONTAINER)",
                        self.name
                    )
                };
                (
                    ip.to_owned(),
                    host.parse().unwrap(),
                    container.trim_end_matches("/tcp").parse().unwrap(),
                )
            })
            .collect()
    }

    fn depends_on(&self) -> Vec<String> {
        match &self.def["depends_on"] {
            Value::Null => Vec::new(),
            Value::Array(a) => a.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
            Value::Object(m) => m.keys().cloned().collect(),
            other => panic!("{}: depends_on {other}", self.name),
        }
    }
}

/// The value of `--name VALUE` or `--name=VALUE` (also with one dash) in a command.
fn flag(cmd: &[String], name: &str) -> Option<String> {
    cmd.iter().enumerate().find_map(|(i, arg)| {
        if arg == name {
            cmd.get(i + 1).cloned()
        } else {
            arg.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        }
    })
}

/// Compose's variable interpolation with no variable set: `${VAR:-default}` and
/// `${VAR-default}` give their default, `$$` a `$`. A variable without a default fails the
/// test: the stack must start with no .env file.
fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {s:?}"));
            let inner = &r[..end];
            let name_len = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            let default = inner[name_len..]
                .strip_prefix(":-")
                .or_else(|| inner[name_len..].strip_prefix('-'))
                .unwrap_or_else(|| {
                    panic!("${{{inner}}} in {s:?} has no default: the stack must start without a .env file")
                });
            out.push_str(default);
            rest = &r[end + 1..];
        } else {
            panic!("write variables as ${{NAME:-default}} in {s:?}");
        }
    }
    out.push_str(rest);
    out
}

/// `(host, port)` of `http://host:port/...` or `host:port`.
fn host_port(addr: &str) -> (String, u16) {
    let no_scheme = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = no_scheme.split('/').next().unwrap();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{addr:?} has no port"));
    (host.to_owned(), port.parse().unwrap())
}

// ---------------------------------------------------------------------------------------------
// The compose file
// ---------------------------------------------------------------------------------------------

#[test]
fn compose_file_follows_the_compose_specification() {
    let Some(cj) = check_jsonschema("compose_file_follows_the_compose_specification") else {
        return;
    };
    let out = Command::new(&cj)
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(repo().join(COMPOSE))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("ok -- validation done"),
        "check-jsonschema --builtin-schema vendor.compose-spec {COMPOSE}:\n{text}"
    );
}

#[test]
fn mounted_paths_exist_images_are_pinned_and_only_uis_are_published() {
    let Some(s) = stack("mounted_paths_exist_images_are_pinned_and_only_uis_are_published") else {
        return;
    };
    let named: BTreeSet<&String> = s
        .compose
        .get("volumes")
        .and_then(Value::as_object)
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let mut published = BTreeSet::new();
    for name in s.services().keys() {
        let svc = s.service(name);

        for m in svc.mounts() {
            if !m.bind {
                assert!(
                    named.contains(&m.source),
                    "{name}: volume {:?} is not declared under `volumes:`",
                    m.source
                );
                continue;
            }
            assert!(
                m.source.starts_with("./"),
                "{name}: bind mount {:?} must be relative to the repository (./...)",
                m.source
            );
            let path = repo_path(&m.source);
            // Docker creates a missing source as an empty directory, which then fails (or
            // silently hides the config): each one must exist, as a file or a directory.
            let file_like = Path::new(&m.source).extension().is_some();
            assert!(
                if file_like {
                    path.is_file()
                } else {
                    path.is_dir()
                },
                "{name}: bind-mounted {} {:?} is missing from the repository",
                if file_like { "file" } else { "directory" },
                m.source
            );
        }

        if let Some(build) = svc.def.get("build") {
            let context = repo_path(build["context"].as_str().unwrap_or("."));
            let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
            assert!(
                context.join(dockerfile).is_file(),
                "{name}: {dockerfile} not found in the build context"
            );
        }
        match svc.def["image"].as_str() {
            None => assert!(svc.def.get("build").is_some(), "{name}: no image, no build"),
            Some(image) => {
                let image = interpolate(image);
                let last = image.rsplit('/').next().unwrap();
                let tag = last.split_once(':').map(|(_, t)| t).unwrap_or_default();
                let tag = tag.split('@').next().unwrap();
                assert!(
                    !tag.is_empty() && tag != "latest",
                    "{name}: image {image:?} is not pinned to a tag"
                );
                assert!(
                    svc.def.get("build").is_some() || tag.contains(|c: char| c.is_ascii_digit()),
                    "{name}: image {image:?} should be pinned to a version"
                );
            }
        }

        for dep in svc.depends_on() {
            assert!(
                s.is_service(&dep),
                "{name} depends on unknown service {dep}"
            );
        }

        for (ip, host, container) in svc.published() {
            assert_eq!(
                ip, "127.0.0.1",
                "{name}: published port {host} must be bound to 127.0.0.1 by default"
            );
            assert_eq!(
                host, container,
                "{name}: keep host and container ports equal"
            );
            published.insert((name.clone(), container));
        }
    }

    // Only the proxy and the UIs; metrics, OTLP and Tempo stay inside the compose network.
    let proxy_port = s.llm_audit_demo().listen.unwrap().port();
    let expected: BTreeSet<(String, u16)> = [
        ("llm-audit", proxy_port),
        ("grafana", s.listen_port("grafana")),
        ("prometheus", s.listen_port("prometheus")),
        ("alertmanager", s.listen_port("alertmanager")),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_owned(), p))
    .collect();
    assert_eq!(published, expected, "published ports");
}

#[test]
fn llm_audit_runs_the_demo_forever_reachable_from_the_other_containers() {
    let Some(s) = stack("llm_audit_runs_the_demo_forever_reachable_from_the_other_containers")
    else {
        return;
    };
    let svc = s.service("llm-audit");
    let cmd = svc.command();
    let demo = s.llm_audit_demo();
    for (what, addr) in [
        ("--listen", demo.listen),
        ("--metrics-listen", demo.metrics_listen),
    ] {
        let addr: SocketAddr = addr.unwrap_or_else(|| panic!("llm-audit: no {what}"));
        assert!(
            addr.ip().is_unspecified(),
            "llm-audit {what} {addr}: other containers cannot reach a loopback address"
        );
    }

    // The same flags must work for `serve`, the documented switch to a real upstream.
    let mut serve_cmd = cmd.clone();
    serve_cmd[0] = "serve".into();
    match Cli::try_parse_from(std::iter::once("llm-audit".to_owned()).chain(serve_cmd.clone())) {
        Ok(Cli {
            command: Sub::Serve(args),
        }) => {
            assert_eq!(args.listen, demo.listen);
            assert_eq!(args.metrics_listen, demo.metrics_listen);
            assert_eq!(args.db, demo.db);
        }
        other => panic!("{serve_cmd:?} is not a valid `serve` command: {other:?}"),
    }

    // The flags the command leaves out come from the environment, under the CLI's names.
    let env = svc.env();
    let cli = Cli::command();
    let env_of = |sub: &str, arg: &str| {
        cli.find_subcommand(sub)
            .unwrap()
            .get_arguments()
            .find(|a| a.get_id() == arg)
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| panic!("`{sub} --{arg}` reads no variable"))
    };
    let duration = env_of("demo", "duration");
    assert!(
        flag(&cmd, "--duration").as_deref() == Some("0")
            || env.get(&duration).map(String::as_str) == Some("0"),
        "the demo must run until the container stops (--duration 0 or {duration}=0): {cmd:?}"
    );
    let upstream = env_of("serve", "upstream");
    let url = env
        .get(&upstream)
        .unwrap_or_else(|| panic!("llm-audit: {upstream} (serve's upstream) is not set"));
    assert!(url.starts_with("https://"), "{upstream}={url}");

    // Every LLM_AUDIT_<SECTION>__<KEY> variable is a real setting (unknown keys are errors).
    let vars: Vec<(String, String)> = env.clone().into_iter().collect();
    let cfg = llm_audit::config::Config::load(None, vars)
        .unwrap_or_else(|e| panic!("llm-audit's environment: {e}"));
    assert_eq!(cfg.upstream.provider, "openai");

    // The audit database lives on a volume.
    let db = demo.db.expect("--db").to_string_lossy().into_owned();
    assert!(
        svc.mounts()
            .iter()
            .any(|m| !m.bind && db.starts_with(&format!("{}/", m.target))),
        "llm-audit: --db {db} is not on a named volume"
    );

    // The healthcheck asks the proxy's own port.
    let test = svc.def["healthcheck"]["test"].to_string();
    assert!(
        test.contains(&format!(
            "/dev/tcp/127.0.0.1/{}",
            demo.listen.unwrap().port()
        )) && test.contains("/healthz"),
        "llm-audit healthcheck: {test}"
    );
}

#[test]
fn prometheus_scrapes_llm_audit_and_alerts_alertmanager() {
    let Some(s) = stack("prometheus_scrapes_llm_audit_and_alerts_alertmanager") else {
        return;
    };
    let prom = s.service("prometheus");
    let config = flag(&prom.command(), "--config.file").expect("prometheus --config.file");
    assert_eq!(
        s.host_path_of("prometheus", &config),
        Some(repo().join(PROMETHEUS)),
        "prometheus reads {config}, which must be {PROMETHEUS}"
    );

    let p = &s.prometheus;
    let global = p["global"]["scrape_interval"].as_str().unwrap_or("1m");
    let jobs = p["scrape_configs"].as_array().expect("scrape_configs");
    let mut llm_audit_job = None;
    for job in jobs {
        let name = job["job_name"].as_str().unwrap();
        if name == "llm-audit" {
            llm_audit_job = Some(job);
        }
        for sc in job["static_configs"].as_array().into_iter().flatten() {
            for t in sc["targets"].as_array().unwrap() {
                let (host, port) = host_port(t.as_str().unwrap());
                assert!(s.is_service(&host), "job {name}: {host} is not a service");
                assert_eq!(port, s.listen_port(&host), "job {name}: {host} port");
            }
        }
    }
    let job = llm_audit_job.expect("a scrape job named llm-audit");
    assert_eq!(
        job["scrape_interval"].as_str().unwrap_or(global),
        "15s",
        "llm-audit scrape interval"
    );
    assert!(matches!(
        job["metrics_path"].as_str(),
        None | Some("/metrics")
    ));
    let targets = job["static_configs"][0]["targets"].as_array().unwrap();
    assert_eq!(
        targets
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<Vec<_>>(),
        [format!("llm-audit:{}", s.listen_port("llm-audit"))]
    );

    let ams = p["alerting"]["alertmanagers"].as_array().expect("alerting");
    let am_targets: Vec<&str> = ams
        .iter()
        .flat_map(|a| a["static_configs"].as_array().unwrap())
        .flat_map(|sc| sc["targets"].as_array().unwrap())
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        am_targets,
        [format!("alertmanager:{}", s.listen_port("alertmanager"))]
    );

    // The rules: one named file (no glob), mounted from alerts/.
    let rule_files: Vec<&str> = p["rule_files"]
        .as_array()
        .expect("rule_files")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(rule_files.len(), 1, "rule_files: {rule_files:?}");
    assert!(!rule_files[0].contains(['*', '?', '[']), "no globs");
    assert_eq!(
        s.host_path_of("prometheus", rule_files[0]),
        Some(repo().join(RULES)),
        "prometheus loads {}, which must be {RULES}",
        rule_files[0]
    );
}

#[test]
fn prometheus_config_passes_promtool_with_the_shipped_rules() {
    let test = "prometheus_config_passes_promtool_with_the_shipped_rules";
    let Some(promtool) = promtool(test) else {
        return;
    };
    let Some(s) = stack(test) else {
        return;
    };
    // promtool reads rule_files as the container sees them: point a copy at the repository's
    // file (a path that matches nothing would pass with 0 rule files).
    let container_path = s.prometheus["rule_files"][0].as_str().unwrap().to_owned();
    let text = read(PROMETHEUS);
    assert_eq!(text.matches(&container_path).count(), 1);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("prometheus.yml");
    std::fs::write(
        &copy,
        text.replace(&container_path, &repo().join(RULES).to_string_lossy()),
    )
    .unwrap();
    let out = Command::new(promtool)
        .args(["check", "config"])
        .arg(&copy)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check config:\n{text}");
    assert!(
        text.contains("SUCCESS: 1 rule files found"),
        "promtool found no rule file:\n{text}"
    );
    let rules: u32 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("SUCCESS: ")?
                .strip_suffix(" rules found")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("promtool checked no rules:\n{text}"));
    assert!(rules >= 1, "{text}");
}

#[test]
fn spans_flow_from_llm_audit_through_the_collector_to_tempo() {
    let Some(s) = stack("spans_flow_from_llm_audit_through_the_collector_to_tempo") else {
        return;
    };
    // Collector: its config file is ours, its OTLP gRPC receiver listens on all interfaces.
    let collector = s.service("otel-collector");
    let config = flag(&collector.command(), "--config").expect("otel-collector --config");
    assert_eq!(
        s.host_path_of("otel-collector", &config),
        Some(repo().join(COLLECTOR))
    );
    let c = &s.collector;
    let grpc = c["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        .as_str()
        .expect("collector otlp grpc receiver endpoint");
    let (ip, grpc_port) = host_port(grpc);
    assert_eq!(
        ip, "0.0.0.0",
        "the collector's receiver must accept other containers"
    );

    // llm-audit exports there, over gRPC, with a scheme (no scheme would mean https).
    let env = s.service("llm-audit").env();
    let endpoint = env
        .get("OTEL_EXPORTER_OTLP_ENDPOINT")
        .expect("llm-audit OTEL_EXPORTER_OTLP_ENDPOINT");
    assert!(endpoint.starts_with("http://"), "{endpoint}");
    assert_eq!(
        host_port(endpoint),
        ("otel-collector".to_owned(), grpc_port)
    );
    assert!(matches!(
        env.get("OTEL_EXPORTER_OTLP_PROTOCOL").map(String::as_str),
        None | Some("grpc")
    ));
    assert!(env.get("OTEL_SERVICE_NAME").is_some_and(|n| !n.is_empty()));

    // The traces pipeline: OTLP in, batched, out to Tempo's OTLP gRPC receiver.
    let pipeline = &c["service"]["pipelines"]["traces"];
    let names = |key: &str| -> Vec<String> {
        pipeline[key]
            .as_array()
            .unwrap_or_else(|| panic!("traces pipeline {key}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names("receivers"), ["otlp"]);
    assert!(names("processors").iter().any(|p| p == "batch"));
    for p in names("processors") {
        assert!(
            c["processors"].get(&p).is_some(),
            "processor {p} not defined"
        );
    }
    let exporters = names("exporters");
    assert!(!exporters.is_empty());
    let tempo_cmd = s.service("tempo").command();
    let tempo_config = flag(&tempo_cmd, "-config.file").expect("tempo -config.file");
    assert_eq!(
        s.host_path_of("tempo", &tempo_config),
        Some(repo().join(TEMPO))
    );
    let (tempo_ip, tempo_grpc) = host_port(
        s.tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
            .as_str()
            .expect("tempo otlp grpc receiver endpoint"),
    );
    assert_eq!(
        tempo_ip, "0.0.0.0",
        "Tempo's receiver must accept other containers"
    );
    for e in exporters {
        let kind = e.split('/').next().unwrap();
        assert!(
            ["otlp_grpc", "otlp"].contains(&kind),
            "exporter {e}: expected OTLP gRPC to Tempo"
        );
        let endpoint = c["exporters"][&e]["endpoint"].as_str().unwrap();
        assert_eq!(
            host_port(endpoint),
            ("tempo".to_owned(), tempo_grpc),
            "exporter {e}"
        );
        assert_eq!(
            c["exporters"][&e]["tls"]["insecure"],
            Value::Bool(true),
            "exporter {e}: Tempo's receiver is plain gRPC"
        );
    }
}

#[test]
fn grafana_datasources_and_dashboards_are_wired() {
    let Some(s) = stack("grafana_datasources_and_dashboards_are_wired") else {
        return;
    };
    let datasources = s.datasources["datasources"]
        .as_array()
        .expect("datasources");
    let mut uids = BTreeMap::new();
    for ds in datasources {
        let uid = ds["uid"]
            .as_str()
            .expect("every datasource has a fixed uid");
        let kind = ds["type"].as_str().unwrap();
        let (host, port) = host_port(ds["url"].as_str().unwrap());
        assert!(
            s.is_service(&host),
            "datasource {uid}: {host} is not a service"
        );
        assert_eq!(
            port,
            s.listen_port(&host),
            "datasource {uid}: port of {host}"
        );
        uids.insert(uid.to_owned(), kind.to_owned());
    }
    assert_eq!(
        uids,
        BTreeMap::from([
            ("prometheus".to_owned(), "prometheus".to_owned()),
            ("tempo".to_owned(), "tempo".to_owned()),
        ])
    );
    let prom = datasources
        .iter()
        .find(|d| d["uid"] == "prometheus")
        .unwrap();
    assert_eq!(
        prom["jsonData"]["timeInterval"].as_str(),
        s.prometheus["global"]["scrape_interval"].as_str(),
        "the Prometheus datasource's timeInterval is the scrape interval ($__rate_interval)"
    );

    // The dashboards provider reads the mounted dashboards/ directory.
    let providers = s.dashboard_providers["providers"]
        .as_array()
        .expect("providers");
    assert!(!providers.is_empty());
    for p in providers {
        assert_eq!(p["type"], "file");
        let path = p["options"]["path"].as_str().unwrap();
        assert_eq!(
            s.host_path_of("grafana", path),
            Some(repo().join("dashboards")),
            "the dashboards provider reads {path}"
        );
    }
    for (host, container) in [
        (DATASOURCES, "/etc/grafana/provisioning/datasources"),
        (DASHBOARD_PROVIDERS, "/etc/grafana/provisioning/dashboards"),
    ] {
        let file = Path::new(host).file_name().unwrap().to_string_lossy();
        assert_eq!(
            s.host_path_of("grafana", &format!("{container}/{file}")),
            Some(repo().join(host)),
            "grafana provisioning {host}"
        );
    }

    // Every dashboard loads under file provisioning and names only provisioned datasources.
    let mut seen_uids = BTreeSet::new();
    let mut count = 0;
    for entry in std::fs::read_dir(repo().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        count += 1;
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let dash: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("dashboards/{name}: {e}"));
        assert!(
            dash.get("__inputs").is_none() && !text.contains("${DS_"),
            "dashboards/{name}: exported for sharing (__inputs / ${{DS_...}}) breaks file provisioning"
        );
        let uid = dash["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty(), "dashboards/{name}: no stable uid");
        assert!(
            seen_uids.insert(uid.to_owned()),
            "dashboards/{name}: uid {uid} twice"
        );
        let mut refs = Vec::new();
        datasource_uids(&dash, &mut refs);
        for r in refs {
            assert!(
                r.starts_with('$')
                    || uids.contains_key(&r)
                    || GRAFANA_BUILTIN_UIDS.contains(&r.as_str()),
                "dashboards/{name}: datasource uid {r:?} is not provisioned"
            );
        }
        // A `datasource` variable offers the provisioned datasources of its plugin type.
        for var in dash["templating"]["list"].as_array().into_iter().flatten() {
            if var["type"] == "datasource" {
                let kind = var["query"].as_str().unwrap_or_default();
                assert!(
                    uids.values().any(|k| k == kind),
                    "dashboards/{name}: variable {} wants a {kind:?} datasource",
                    var["name"]
                );
            }
        }
    }
    assert!(count > 0, "no dashboards/*.json to provision");

    // A home dashboard set by path is one of the mounted dashboards.
    if let Some(home) = s
        .service("grafana")
        .env()
        .get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    {
        let host = s
            .host_path_of("grafana", home)
            .unwrap_or_else(|| panic!("grafana home dashboard {home} is not mounted"));
        assert!(
            host.is_file(),
            "grafana home dashboard {home}: {} is missing",
            host.display()
        );
    }
}

/// Datasources Grafana always has (annotations use `-- Grafana --`).
const GRAFANA_BUILTIN_UIDS: &[&str] =
    &["-- Grafana --", "-- Mixed --", "-- Dashboard --", "grafana"];

/// Every `"datasource": {"uid": ...}` in a dashboard.
fn datasource_uids(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if k == "datasource"
                    && let Some(uid) = child.get("uid").and_then(Value::as_str)
                {
                    out.push(uid.to_owned());
                }
                datasource_uids(child, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| datasource_uids(c, out)),
        _ => {}
    }
}

#[test]
fn alertmanager_reads_its_config_and_secret_files_from_mounts() {
    let test = "alertmanager_reads_its_config_and_secret_files_from_mounts";
    let Some(s) = stack(test) else {
        return;
    };
    let config = flag(&s.service("alertmanager").command(), "--config.file")
        .expect("alertmanager --config.file");
    assert_eq!(
        s.host_path_of("alertmanager", &config),
        Some(repo().join(ALERTMANAGER)),
        "alertmanager reads {config}, which must be {ALERTMANAGER}"
    );
    assert!(
        repo().join(ALERTMANAGER).is_file(),
        "{ALERTMANAGER} is missing (docker-compose.yml mounts it)"
    );
    let Some(am) = load_yaml(test, &[ALERTMANAGER]) else {
        return;
    };
    // Every *_file (secrets) and template path alertmanager.yml names is inside a mount,
    // and the file is there (placeholders in deploy/alertmanager/secrets/).
    let mut paths = Vec::new();
    file_fields(&am[0], &mut paths);
    for (field, path) in paths {
        let host = s
            .host_path_of("alertmanager", &path)
            .unwrap_or_else(|| panic!("{ALERTMANAGER}: {field} {path} is not mounted"));
        assert!(
            host.is_file(),
            "{ALERTMANAGER}: {field} {path} -> {} does not exist",
            host.display()
        );
    }
    for t in am[0]["templates"].as_array().into_iter().flatten() {
        let t = t.as_str().unwrap();
        let dir = Path::new(t)
            .parent()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let host = s
            .host_path_of("alertmanager", &dir)
            .unwrap_or_else(|| panic!("{ALERTMANAGER}: templates {t} are not mounted"));
        assert!(host.is_dir(), "{ALERTMANAGER}: templates {t}");
    }
}

/// `(key, path)` of every `*_file` field.
fn file_fields(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                match child {
                    Value::String(p) if k.ends_with("_file") => out.push((k.clone(), p.clone())),
                    _ => file_fields(child, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| file_fields(c, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------------------------

/// One `FROM` stage: its image, its name and its instructions (continuation lines joined).
struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<(String, String)>,
}

fn dockerfile_stages() -> Vec<Stage> {
    let text = read("Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(cont) = t.strip_suffix('\\') {
            current.push_str(cont);
            current.push(' ');
        } else if t.starts_with('#') {
            // a comment inside a continued instruction
        } else {
            current.push_str(t);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (instr, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let instr = instr.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if instr == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let image = words
                .iter()
                .find(|w| !w.starts_with("--"))
                .unwrap()
                .to_string();
            let name = words
                .iter()
                .position(|w| w.eq_ignore_ascii_case("as"))
                .map(|i| words[i + 1].to_owned());
            stages.push(Stage {
                image,
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("an instruction before FROM")
                .instructions
                .push((instr, args));
        }
    }
    stages
}

/// `(major, minor)` of "1.95" or "1.89.0".
fn rust_version(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[test]
fn dockerfile_builds_locked_and_runs_unprivileged() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "a multi-stage build");
    let builder = &stages[0];
    let runtime = stages.last().unwrap();
    for st in &stages {
        assert!(
            st.image.contains(':') && !st.image.ends_with(":latest"),
            "FROM {} is not pinned",
            st.image
        );
    }

    // Builder: an official Rust image no older than Cargo.toml's rust-version.
    let (repo_name, tag) = builder.image.split_once(':').unwrap();
    assert_eq!(repo_name, "rust", "builder image");
    let (version, suite) = tag.split_once('-').expect("rust:VERSION-SUITE");
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    assert!(
        rust_version(version) >= rust_version(msrv),
        "builder rust {version} is older than rust-version {msrv}"
    );
    // Runtime: the same Debian release, so the binary finds the glibc it was linked against.
    assert_eq!(
        runtime.image,
        format!("debian:{suite}-slim"),
        "runtime image must match the builder's Debian release"
    );

    let builds: Vec<&String> = builder
        .instructions
        .iter()
        .filter(|(i, a)| i == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a)
        .collect();
    assert_eq!(builds.len(), 1, "one cargo build in the builder stage");
    for f in ["--release", "--locked"] {
        assert!(
            builds[0].contains(f),
            "cargo build without {f}: {}",
            builds[0]
        );
    }

    // The builder copies everything cargo reads, and .dockerignore keeps it in the context.
    let ignore = read(".dockerignore");
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target/", ".git/"] {
        assert!(ignored.contains(&must), ".dockerignore must exclude {must}");
    }
    let mut copied = Vec::new();
    for (i, args) in &builder.instructions {
        if i == "COPY" && !args.starts_with("--from") {
            let words: Vec<&str> = args.split_whitespace().collect();
            for src in &words[..words.len() - 1] {
                let src = src.trim_end_matches('/');
                assert!(repo().join(src).exists(), "COPY {src}: missing");
                assert!(
                    !ignored
                        .iter()
                        .any(|p| p.trim_end_matches('/') == src || p.trim_start_matches('/') == src),
                    "COPY {src}: excluded by .dockerignore"
                );
                copied.push(src.to_owned());
            }
        }
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src"] {
        assert!(
            copied.iter().any(|c| c == needed),
            "the builder must COPY {needed}"
        );
    }
    // Cargo reads every explicitly declared target's file when it loads the manifest.
    let mut declared = Vec::new();
    for (kind, dir) in [
        ("bench", "benches"),
        ("example", "examples"),
        ("test", "tests"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            declared.push(t.get("path").and_then(toml::Value::as_str).map_or_else(
                || format!("{dir}/{}.rs", t["name"].as_str().unwrap()),
                str::to_owned,
            ));
        }
    }
    for t in declared {
        assert!(
            copied
                .iter()
                .any(|c| t == *c || t.starts_with(&format!("{c}/"))),
            "Cargo.toml declares {t}, which the builder does not COPY"
        );
    }

    // Runtime: CA certificates, the binary from the builder, an unprivileged user, /data.
    let runtime_text: Vec<String> = runtime
        .instructions
        .iter()
        .map(|(i, a)| format!("{i} {a}"))
        .collect();
    assert!(
        runtime_text
            .iter()
            .any(|l| l.starts_with("RUN") && l.contains("ca-certificates")),
        "the runtime stage installs ca-certificates (HTTPS upstreams)"
    );
    let builder_name = builder.name.as_deref().expect("a named builder stage");
    assert!(
        runtime_text
            .iter()
            .any(|l| l.starts_with(&format!("COPY --from={builder_name}"))
                && l.contains("llm-audit")),
        "the runtime stage copies the llm-audit binary from {builder_name}"
    );
    let user = runtime
        .instructions
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.clone())
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "root" && uid != "0",
        "the runtime stage runs as root (USER {user})"
    );
    assert!(
        runtime_text
            .iter()
            .any(|l| l.starts_with("VOLUME") && l.contains("/data")),
        "VOLUME /data for the audit database"
    );
    let entry = runtime
        .instructions
        .iter()
        .find(|(i, _)| i == "ENTRYPOINT")
        .map(|(_, a)| a.clone())
        .expect("ENTRYPOINT");
    assert!(entry.contains("llm-audit"), "ENTRYPOINT {entry}");

    // The default command is a valid demo that outlives `docker run` and is reachable.
    let cmd = runtime
        .instructions
        .iter()
        .rev()
        .find(|(i, _)| i == "CMD")
        .map(|(_, a)| a.clone())
        .expect("CMD");
    let cmd: Vec<String> = serde_json::from_str(&cmd).expect("CMD in JSON (exec) form");
    match Cli::try_parse_from(std::iter::once("llm-audit".to_owned()).chain(cmd.clone())) {
        Ok(Cli {
            command: Sub::Demo(args),
        }) => {
            assert_eq!(args.duration, 0, "CMD {cmd:?}: the demo runs until stopped");
            assert!(
                args.listen.is_some_and(|a| a.ip().is_unspecified()),
                "{cmd:?}"
            );
            assert!(
                args.db.is_some_and(|d| d.starts_with("/data")),
                "CMD {cmd:?}: the database on /data"
            );
        }
        other => panic!("CMD {cmd:?} is not a demo command: {other:?}"),
    }
}
