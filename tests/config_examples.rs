#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The shipped configuration files: `llm-audit.example.toml` documents every key with its
//! default (and nothing else: anything that is not a default is commented out), and
//! `examples/configs/*.toml` change exactly the keys they say they change.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use llm_audit::config::{AuthMode, Config, HumanDuration};
use llm_audit::proxy::identity::Auth;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn example() -> PathBuf {
    root().join("llm-audit.example.toml")
}

fn load(path: &Path) -> Config {
    Config::load(Some(path), []).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(cfg: &Config) -> Value {
    serde_json::to_value(cfg).unwrap()
}

/// `text` written to a fresh temp file.
fn temp_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llm-audit.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The lines of `[section]` in `text`, up to the next table header that is not commented out.
fn section<'a>(text: &'a str, name: &str) -> &'a str {
    let header = format!("\n[{name}]\n");
    let start = text
        .find(&header)
        .unwrap_or_else(|| panic!("no [{name}] section"))
        + header.len();
    let end = text[start..]
        .find("\n[")
        .map_or(text.len(), |i| start + i + 1);
    &text[start..end]
}

#[test]
fn the_example_holds_exactly_the_defaults() {
    let cfg = load(&example());
    assert_eq!(
        json(&cfg),
        json(&Config::default()),
        "llm-audit.example.toml must hold only defaults; anything else belongs in a comment"
    );
}

#[test]
fn the_example_documents_every_section_and_key() {
    let text = std::fs::read_to_string(example()).unwrap();
    let defaults = json(&Config::default());
    for (name, keys) in defaults.as_object().unwrap() {
        let body = section(&text, name);
        for key in keys.as_object().unwrap().keys() {
            let documented = body.lines().any(|line| {
                let line = line.strip_prefix("# ").unwrap_or(line);
                line.starts_with(&format!("{key} = ")) || line == format!("[[{name}.{key}]]")
            });
            assert!(documented, "{name}.{key} is not in llm-audit.example.toml");
            // Every key is explained by a comment line just above it.
            let lines: Vec<&str> = body.lines().collect();
            let at = lines
                .iter()
                .position(|l| {
                    let l = l.strip_prefix("# ").unwrap_or(l);
                    l.starts_with(&format!("{key} = ")) || l == format!("[[{name}.{key}]]")
                })
                .unwrap();
            assert!(
                at > 0 && lines[at - 1].starts_with('#'),
                "{name}.{key} has no comment saying what it does"
            );
        }
    }
}

/// Uncommenting the example lines (`# key = value`, `# [[auth.keys]]`) gives a valid file:
/// the commented examples are not rotten.
#[test]
fn the_commented_examples_are_valid() {
    let text = std::fs::read_to_string(example()).unwrap();
    let is_key_line = |l: &str| {
        l.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
    };
    let active: HashSet<&str> = text
        .lines()
        .filter(|l| is_key_line(l))
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .collect();
    let mut uncommented = String::new();
    let mut trusted_proxies_example = None;
    for line in text.lines() {
        let inner = line.strip_prefix("# ");
        match inner {
            Some(l) if l == "[[auth.keys]]" => uncommented.push_str(l),
            Some(l) if is_key_line(l) => {
                let key = l.split_once(" = ").map(|(k, _)| k).unwrap_or_default();
                if key == "trusted_proxies" {
                    trusted_proxies_example = Some(l.to_owned());
                }
                if active.contains(key) {
                    uncommented.push_str(line);
                } else {
                    uncommented.push_str(l);
                }
            }
            _ => uncommented.push_str(line),
        }
        uncommented.push('\n');
    }
    let (_dir, path) = temp_config(&uncommented);
    let cfg = load(&path);
    assert_eq!(cfg.auth.keys.len(), 2);
    assert!(cfg.auth.upstream_api_key_file.is_some());
    assert!(cfg.auth.upstream_api_key_env.is_some());
    assert!(cfg.store.chain_key_file.is_some());
    assert!(cfg.store.hash_key_file.is_some());
    assert!(cfg.pricing.file.is_some());
    // The key hashes are real SHA-256 hex: keys mode accepts them.
    let mut auth = cfg.auth.clone();
    auth.mode = AuthMode::Keys;
    auth.upstream_api_key_file = None;
    Auth::from_config(&auth, |_| Some("sk-upstream-example".to_owned())).unwrap();

    let example_line = trusted_proxies_example.expect("a commented trusted_proxies example");
    let (_dir, path) = temp_config(&text.replace("trusted_proxies = []", &example_line));
    assert_eq!(load(&path).server.trusted_proxies.len(), 3);
}

#[test]
fn an_unknown_key_in_the_example_is_rejected_by_name() {
    let text = std::fs::read_to_string(example()).unwrap();
    for (from, to, name) in [
        (
            "queue_capacity = 65536",
            "queue_capacity = 65536\nqueue_capacityy = 1",
            "queue_capacityy",
        ),
        ("[thresholds]", "[threshold]", "threshold"),
    ] {
        assert!(text.contains(from));
        let (_dir, path) = temp_config(&text.replacen(from, to, 1));
        let err = Config::load(Some(&path), []).unwrap_err().to_string();
        assert!(err.contains(name), "error does not name {name:?}: {err}");
    }
}

/// Each upstream example: the keys it sets, everything else at its default.
fn expected(file: &str) -> Config {
    let mut c = Config::default();
    let local = |c: &mut Config, url: &str, provider: &str| {
        c.upstream.url = url.into();
        c.upstream.provider = provider.into();
        c.upstream.first_byte_timeout = HumanDuration(Duration::from_secs(300));
        c.pricing.fallback_input = Some(0.0);
        c.pricing.fallback_output = Some(0.0);
    };
    match file {
        "holysheep.toml" => {
            c.upstream.url = "https://api.holysheep.ai/v1".into();
            c.upstream.provider = "holysheep".into();
        }
        "openai.toml" => {}
        "deepseek.toml" => {
            c.upstream.url = "https://api.deepseek.com/v1".into();
            c.upstream.provider = "deepseek".into();
            c.upstream.idle_timeout = HumanDuration(Duration::from_secs(600));
        }
        "vllm.toml" => local(&mut c, "http://127.0.0.1:8000/v1", "vllm"),
        "ollama.toml" => local(&mut c, "http://127.0.0.1:11434/v1", "ollama"),
        other => panic!("examples/configs/{other} has no expectations in this test"),
    }
    c
}

#[test]
fn upstream_examples_set_their_upstream_and_keep_the_other_defaults() {
    let dir = root().join("examples/configs");
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    let want: BTreeSet<String> = ["deepseek", "holysheep", "ollama", "openai", "vllm"]
        .iter()
        .map(|n| format!("{n}.toml"))
        .collect();
    assert_eq!(files, want);
    for file in &files {
        let cfg = load(&dir.join(file));
        assert_eq!(json(&cfg), json(&expected(file)), "{file}");
        assert_eq!(cfg.auth.mode, AuthMode::Passthrough, "{file}");
    }
}

/// What `serve` itself says about every shipped file (prices, URL, auth), without starting.
#[test]
fn serve_check_config_accepts_every_shipped_file() {
    let mut files = vec![example()];
    for name in ["holysheep", "openai", "deepseek", "vllm", "ollama"] {
        files.push(root().join(format!("examples/configs/{name}.toml")));
    }
    for file in files {
        let out = support::llm_audit()
            .args(["serve", "--check-config", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {:?}\n{}{}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
