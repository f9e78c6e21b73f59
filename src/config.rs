//! Configuration sections used by the audit core (DESIGN §9): raw serde structs with defaults
//! and `deny_unknown_fields`, so a typo in a key is an error, not a silently ignored setting.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret value (API key, HMAC key). Prints as `*****` in `Debug` and `Serialize`, so a
/// config dump or a log line can never leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Reads a secret from a file, trimming the trailing newline editors add.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Ok(Self(text.trim_end_matches(['\r', '\n']).to_owned()))
    }

    /// The secret itself; call sites are few and greppable on purpose.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("*****")
    }
}

/// A duration written the human way in config files: `50ms`, `5s`, `5m`, `90d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(HumanDuration)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// How a record reaches the disk (DESIGN §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Committed within `flush_interval`; the request path never waits on disk.
    #[default]
    Batched,
    /// The caller can wait until its record is committed.
    Sync,
}

/// What happens to traffic while the store cannot write (auditd's failure modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreFailure {
    /// Keep serving, keep retrying, count and alert.
    #[default]
    Continue,
    /// Refuse new calls (503) until the store writes again.
    Reject,
}

/// `[store]`: the local audit log.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite database file.
    pub path: PathBuf,
    /// `batched` (default) or `sync`.
    pub durability: Durability,
    /// Longest time a record waits in memory before its batch is committed.
    pub flush_interval: HumanDuration,
    /// Records that may wait for the writer; beyond that they are dropped and counted.
    pub queue_capacity: usize,
    /// `continue` (default) or `reject`.
    pub on_store_failure: OnStoreFailure,
    /// File holding the key that turns the chain hash into an HMAC.
    pub chain_key_file: Option<PathBuf>,
    /// File holding the key that turns the request hash into an HMAC.
    pub hash_key_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("llm-audit.db"),
            durability: Durability::Batched,
            flush_interval: HumanDuration(Duration::from_millis(50)),
            // The channel pre-allocates every slot, so records travel boxed: 65,536 slots cost
            // about 1 MiB idle instead of 40 MiB for inline 600-byte records (STACK.md).
            queue_capacity: 65_536,
            on_store_failure: OnStoreFailure::Continue,
            chain_key_file: None,
            hash_key_file: None,
        }
    }
}

/// `[capture]`: how much content is kept.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Characters of the answer kept in `response_preview` (the seed's 200); 0 keeps none.
    pub preview_chars: usize,
    /// Put prompts and completions on spans (off by default: content is sensitive).
    pub span_content: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            preview_chars: 200,
            span_content: false,
        }
    }
}

/// `[metrics]`: label caps that keep Prometheus series bounded.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Distinct `user` label values before the rest fold into `__other__`.
    pub max_user_labels: usize,
    /// Distinct unknown `model` label values before the rest fold into `__other__`.
    pub max_model_labels: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_user_labels: 1000,
            max_model_labels: 200,
        }
    }
}

/// `[pricing]`: where prices come from and what unknown models cost.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Price overrides: our TOML/JSON format or LiteLLM's `model_prices_and_context_window.json`.
    pub file: Option<PathBuf>,
    /// USD per 1M input tokens for models the table does not know (the seed's 10.0);
    /// `false` for none (unknown models are then `unpriced`).
    #[serde(deserialize_with = "price_or_off", serialize_with = "price_or_off_ser")]
    pub fallback_input: Option<f64>,
    /// USD per 1M output tokens for models the table does not know (the seed's 30.0);
    /// `false` for none.
    #[serde(deserialize_with = "price_or_off", serialize_with = "price_or_off_ser")]
    pub fallback_output: Option<f64>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        Self {
            file: None,
            fallback_input: Some(10.0),
            fallback_output: Some(30.0),
        }
    }
}

/// A price, or `false` for "no price" (TOML has no null, and an absent key means the default).
fn price_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P {
        Price(f64),
        Off(bool),
    }
    match P::deserialize(d)? {
        P::Price(p) => Ok(Some(p)),
        P::Off(false) => Ok(None),
        P::Off(true) => Err(serde::de::Error::custom(
            "expected a price (USD per 1M tokens) or false",
        )),
    }
}

fn price_or_off_ser<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(p) => s.serialize_f64(*p),
        None => s.serialize_bool(false),
    }
}

/// `[thresholds]`: the anomaly thresholds shared by the alert rules and the report.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThresholdsConfig {
    /// Detection window (the seed's 5 minutes); also the duplicate-detection window.
    pub window: HumanDuration,
    /// Requests per minute above which HIGH_REQUEST_RATE fires.
    pub requests_per_minute: f64,
    /// Failed / all above which HIGH_FAILURE_RATE fires.
    pub failed_requests_ratio: f64,
    /// The failure ratio is judged only above this many requests in the window.
    pub min_requests_for_failure_ratio: u64,
    /// USD per hour above which COST_OVERRUN fires.
    pub max_cost_per_hour_usd: f64,
    /// Tokens in one request above which EXCESSIVE_TOKEN_USAGE fires.
    pub max_tokens_per_request: u64,
    /// Duplicates / all above which REPEATED_REQUESTS fires.
    pub duplicate_request_ratio: f64,
    /// A request hash seen more than this many times in the window is listed as repeated.
    pub repeated_request_count: u64,
    /// Failed authentications in the window above which an alert fires.
    pub max_auth_failures: u64,
}

impl Default for ThresholdsConfig {
    fn default() -> Self {
        Self {
            window: HumanDuration(Duration::from_secs(300)),
            requests_per_minute: 100.0,
            failed_requests_ratio: 0.5,
            min_requests_for_failure_ratio: 10,
            max_cost_per_hour_usd: 100.0,
            max_tokens_per_request: 100_000,
            duplicate_request_ratio: 0.3,
            repeated_request_count: 3,
            max_auth_failures: 20,
        }
    }
}

/// The sections the audit core needs, as one value.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `[store]`
    pub store: StoreConfig,
    /// `[capture]`
    pub capture: CaptureConfig,
    /// `[metrics]`
    pub metrics: MetricsConfig,
    /// `[pricing]`
    pub pricing: PricingConfig,
    /// `[thresholds]`
    pub thresholds: ThresholdsConfig,
}

/// `[server]`: the proxy's listeners and request limits.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Proxy listener. Loopback by default: exposing it is a decision (`0.0.0.0:8080`).
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listener.
    pub metrics_listen: SocketAddr,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Largest request head (request line + headers) accepted.
    pub max_header_bytes: usize,
    /// Networks (CIDR) of reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Longest wait for in-flight calls (streams included) at shutdown.
    pub shutdown_grace: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            max_body_bytes: 10 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            trusted_proxies: Vec::new(),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// `[upstream]`: the OpenAI-compatible API behind the proxy.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL including the version path, e.g. `https://api.openai.com/v1`.
    pub url: String,
    /// `gen_ai.provider.name` (`openai`, `deepseek`, `gcp.gemini`, …).
    pub provider: String,
    /// TCP/TLS connect timeout.
    pub connect_timeout: HumanDuration,
    /// Longest wait for the response head (the seed's 60 s).
    pub first_byte_timeout: HumanDuration,
    /// Longest silence inside a response body or stream.
    pub idle_timeout: HumanDuration,
    /// Proxy-side retries of 429/5xx before anything reached the client.
    pub retries: u32,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "https://api.openai.com/v1".into(),
            provider: "openai".into(),
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            first_byte_timeout: HumanDuration(Duration::from_secs(60)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            retries: 0,
        }
    }
}

/// How clients authenticate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The client's `Authorization` goes upstream; only its fingerprint is recorded.
    #[default]
    Passthrough,
    /// Clients present proxy keys (stored hashed here); the proxy uses its own upstream key.
    Keys,
}

/// A managed client key: the SHA-256 hex of the key and the user it belongs to.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedKey {
    /// `sha256sum` of the key, lower-case hex.
    pub sha256: String,
    /// User id recorded for calls with this key.
    pub user: String,
}

/// `[auth]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `passthrough` (default) or `keys`.
    pub mode: AuthMode,
    /// Keys mode: file holding the key the proxy sends upstream.
    pub upstream_api_key_file: Option<PathBuf>,
    /// Keys mode: environment variable holding the upstream key (default `LLM_AUDIT_UPSTREAM_API_KEY`).
    pub upstream_api_key_env: Option<String>,
    /// Keys mode: the accepted client keys.
    pub keys: Vec<ManagedKey>,
}

/// The whole configuration file (DESIGN §9).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[upstream]`
    pub upstream: UpstreamConfig,
    /// `[auth]`
    pub auth: AuthConfig,
    /// `[store]`
    pub store: StoreConfig,
    /// `[capture]`
    pub capture: CaptureConfig,
    /// `[metrics]`
    pub metrics: MetricsConfig,
    /// `[pricing]`
    pub pricing: PricingConfig,
    /// `[thresholds]`
    pub thresholds: ThresholdsConfig,
}

/// A configuration that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file, or an `LLM_AUDIT_*` variable, is not valid (unknown keys included).
    #[error("invalid configuration ({origin}): {message}")]
    Invalid {
        /// File name or "environment".
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// Prefix of configuration variables: `LLM_AUDIT_<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "LLM_AUDIT_";

impl Config {
    /// Defaults, then `path` (TOML), then `LLM_AUDIT_<SECTION>__<KEY>` variables from `vars`.
    pub fn load(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let origin = path.map_or_else(|| "defaults".to_owned(), |p| p.display().to_string());
        let mut table = match path {
            None => toml::Table::new(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Io {
                    path: p.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Invalid {
                        origin: origin.clone(),
                        message: e.to_string(),
                    })?
            }
        };
        let mut from_env = Vec::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(section_table) = entry else {
                return Err(ConfigError::Invalid {
                    origin: "environment".into(),
                    message: format!("{name}: [{section}] is not a section"),
                });
            };
            section_table.insert(key, env_value(&value));
            from_env.push(name);
        }
        let origin = if from_env.is_empty() {
            origin
        } else {
            format!("{origin} + environment {}", from_env.join(", "))
        };
        toml::Value::Table(table)
            .try_into::<Config>()
            .map_err(|e| ConfigError::Invalid {
                origin,
                message: e.to_string(),
            })
    }

    /// The audit-core sections.
    pub fn audit(&self) -> AuditConfig {
        AuditConfig {
            store: self.store.clone(),
            capture: self.capture.clone(),
            metrics: self.metrics.clone(),
            pricing: self.pricing.clone(),
            thresholds: self.thresholds.clone(),
        }
    }
}

/// An environment value as TOML: numbers, booleans, arrays and inline tables keep their type
/// (`LLM_AUDIT_METRICS__MAX_USER_LABELS=50`, `LLM_AUDIT_SERVER__TRUSTED_PROXIES=["10.0.0.0/8"]`);
/// anything else is a string (`LLM_AUDIT_UPSTREAM__FIRST_BYTE_TIMEOUT=2s`).
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s:?}"), "*****");
        assert_eq!(serde_json::to_string(&s).unwrap_or_default(), "\"*****\"");
    }

    #[test]
    fn unknown_keys_are_errors_and_durations_parse() {
        let ok: AuditConfig = toml::from_str("[store]\nflush_interval = \"20ms\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.store.flush_interval.0, Duration::from_millis(20));
        let err = toml::from_str::<AuditConfig>("[store]\nflush_intervall = \"20ms\"\n");
        assert!(err.is_err());
        let err = toml::from_str::<AuditConfig>("[store]\nflush_interval = \"soon\"\n");
        assert!(err.is_err());
    }

    #[test]
    fn env_overrides_file_and_unknown_env_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[upstream]\nurl = \"http://a/v1\"\nretries = 1\n").unwrap();
        let vars = [
            ("LLM_AUDIT_UPSTREAM__FIRST_BYTE_TIMEOUT", "2s"),
            ("LLM_AUDIT_UPSTREAM__RETRIES", "3"),
            ("LLM_AUDIT_SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/8\"]"),
            (
                "LLM_AUDIT_UPSTREAM",
                "ignored: a flag variable, not a section key",
            ),
            ("OTHER__X", "1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let cfg = Config::load(Some(&path), vars).unwrap();
        assert_eq!(cfg.upstream.url, "http://a/v1");
        assert_eq!(cfg.upstream.retries, 3);
        assert_eq!(cfg.upstream.first_byte_timeout.0, Duration::from_secs(2));
        assert_eq!(cfg.server.trusted_proxies.len(), 1);
        let bad = [("LLM_AUDIT_UPSTREAM__URLL".to_owned(), "x".to_owned())];
        let err = Config::load(None, bad).unwrap_err().to_string();
        assert!(
            err.contains("urll") && err.contains("LLM_AUDIT_UPSTREAM__URLL"),
            "{err}"
        );
    }
}
