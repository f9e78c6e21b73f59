//! Who is calling: the API key (checked in managed-keys mode, fingerprinted always), the user id,
//! the client address (trusting `X-Forwarded-For` only from configured proxies) and the incoming
//! W3C trace context.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use sha2::{Digest, Sha256};

use super::error::ProxyError;
use crate::audit::recorder::key_fingerprint;
use crate::config::{AuthConfig, AuthMode, Secret};

/// Header a client may use to name its user when the body does not.
pub const USER_HEADER: &str = "x-llm-audit-user";

/// How clients are authenticated, built once from `[auth]`.
#[derive(Debug)]
pub enum Auth {
    /// The client's key goes upstream unchanged.
    Passthrough,
    /// Clients present proxy keys; the proxy presents its own upstream key.
    Keys {
        /// SHA-256 hex of each accepted key → user id.
        users: HashMap<String, String>,
        /// `Authorization: Bearer …` sent upstream, built (and checked) once at start-up.
        upstream_authorization: HeaderValue,
    },
}

/// `[auth]` that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// A key hash is not 64 hex digits.
    #[error("auth.keys: {0:?} is not the SHA-256 hex of a key (64 hex digits)")]
    BadHash(String),
    /// Keys mode without keys.
    #[error("auth.mode = \"keys\" needs at least one [[auth.keys]] entry")]
    NoKeys,
    /// Keys mode without an upstream key.
    #[error("auth.mode = \"keys\" needs the upstream key: set auth.upstream_api_key_file or ${0}")]
    NoUpstreamKey(String),
    /// The upstream key holds characters an HTTP header cannot carry.
    #[error("the upstream API key contains characters not allowed in an HTTP header")]
    BadUpstreamKey,
    /// The upstream key file cannot be read.
    #[error("cannot read auth.upstream_api_key_file {0}: {1}")]
    KeyFile(String, std::io::Error),
}

/// Default variable holding the upstream key in keys mode.
pub const DEFAULT_UPSTREAM_KEY_ENV: &str = "LLM_AUDIT_UPSTREAM_API_KEY";

impl Auth {
    /// Checks `[auth]` and loads the upstream key (`env` reads environment variables).
    pub fn from_config(
        cfg: &AuthConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, AuthConfigError> {
        if cfg.mode == AuthMode::Passthrough {
            return Ok(Auth::Passthrough);
        }
        if cfg.keys.is_empty() {
            return Err(AuthConfigError::NoKeys);
        }
        let mut users = HashMap::new();
        for k in &cfg.keys {
            let hash = k.sha256.trim().to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(AuthConfigError::BadHash(k.sha256.clone()));
            }
            users.insert(hash, k.user.clone());
        }
        let var = cfg
            .upstream_api_key_env
            .clone()
            .unwrap_or_else(|| DEFAULT_UPSTREAM_KEY_ENV.to_owned());
        let upstream_key = match &cfg.upstream_api_key_file {
            Some(path) => Secret::from_file(path)
                .map_err(|e| AuthConfigError::KeyFile(path.display().to_string(), e))?,
            None => Secret::new(env(&var).ok_or(AuthConfigError::NoUpstreamKey(var))?),
        };
        let key = upstream_key.expose().trim_start_matches('\u{feff}').trim();
        let mut upstream_authorization = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| AuthConfigError::BadUpstreamKey)?;
        upstream_authorization.set_sensitive(true);
        Ok(Auth::Keys {
            users,
            upstream_authorization,
        })
    }

    /// Authenticates a request. Returns the key fingerprint and, in keys mode, the user.
    pub fn check(
        &self,
        headers: &HeaderMap,
    ) -> Result<(Option<String>, Option<String>), ProxyError> {
        let presented = bearer(headers);
        match self {
            Auth::Passthrough => Ok((presented.ok().flatten().map(key_fingerprint), None)),
            Auth::Keys { users, .. } => {
                let key = match presented {
                    Ok(Some(k)) => k,
                    Ok(None) => {
                        return Err(ProxyError::Unauthorized {
                            reason: "missing_key",
                            message: "missing API key: send Authorization: Bearer <key>",
                        });
                    }
                    Err(()) => {
                        return Err(ProxyError::Unauthorized {
                            reason: "malformed",
                            message: "malformed Authorization header: expected Bearer <key>",
                        });
                    }
                };
                let hash = hex::encode(Sha256::digest(key.as_bytes()));
                match users.get(&hash) {
                    Some(user) => Ok((Some(key_fingerprint(key)), Some(user.clone()))),
                    None => Err(ProxyError::Unauthorized {
                        reason: "unknown_key",
                        message: "incorrect API key provided",
                    }),
                }
            }
        }
    }

    /// The `Authorization` value to send upstream, if the proxy replaces the client's.
    pub fn upstream_authorization(&self) -> Option<&HeaderValue> {
        match self {
            Auth::Passthrough => None,
            Auth::Keys {
                upstream_authorization,
                ..
            } => Some(upstream_authorization),
        }
    }
}

/// The bearer token: `Ok(None)` when absent, `Err` when present but not `Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ()> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(())?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(());
    }
    Ok(Some(token))
}

/// The client's address: the socket peer, or — when the peer is a trusted proxy — the right-most
/// address in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer_ip = peer.ip().to_canonical();
    if !is_trusted(&peer_ip) {
        return peer_ip;
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .collect::<Vec<_>>();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer_ip)
}

/// The user id from the `x-llm-audit-user` header (lowest precedence).
pub fn header_user(headers: &HeaderMap) -> Option<String> {
    headers
        .get(USER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|u| !u.is_empty() && u.len() <= 256)
        .map(str::to_owned)
}

/// The incoming W3C trace context, if the client sent a valid `traceparent`.
pub fn parent_context(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::TraceContextExt as _;
    headers.get("traceparent")?;
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ManagedKey;

    #[test]
    fn keys_mode_builds_the_upstream_header_once_and_tolerates_a_bom() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "\u{feff}sk-upstream-123\n").unwrap();
        let cfg = AuthConfig {
            mode: AuthMode::Keys,
            upstream_api_key_file: Some(file),
            upstream_api_key_env: None,
            keys: vec![ManagedKey {
                sha256: hex::encode(Sha256::digest(b"client-key")),
                user: "alice".into(),
            }],
        };
        let auth = Auth::from_config(&cfg, |_| None).unwrap();
        let header = auth.upstream_authorization().unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer sk-upstream-123");
        assert!(header.is_sensitive());
        std::fs::write(cfg.upstream_api_key_file.as_ref().unwrap(), "bad\u{1}key").unwrap();
        assert!(matches!(
            Auth::from_config(&cfg, |_| None),
            Err(AuthConfigError::BadUpstreamKey)
        ));
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 10.1.2.3".parse().unwrap());
        let from_lb: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let from_internet: SocketAddr = "198.51.100.9:5000".parse().unwrap();
        assert_eq!(client_ip(from_lb, &h, &trusted).to_string(), "203.0.113.7");
        assert_eq!(
            client_ip(from_internet, &h, &trusted).to_string(),
            "198.51.100.9"
        );
    }
}
