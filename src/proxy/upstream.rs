//! The proxy's upstream client: hyper-util's pooled client, HTTP/1.1 or HTTP/2 (ALPN) over
//! rustls with the platform's certificate verifier, through `HTTPS_PROXY`/`HTTP_PROXY` (CONNECT
//! tunnel) when the environment names one for the upstream.
//!
//! Not reqwest: on the proxy path its request builder, URL type and response wrapper cost more
//! than the whole audit (callgrind, 2026-11-26: ~25k instructions per call, a full URL parse
//! among them). Here a request is a prebuilt `Uri` and the client's own `Request`.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, Method, Request, Response, Uri};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;

use crate::wire::{PooledClient, http_connector, https, pooled};

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The platform's TLS set-up failed.
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// The upstream base and a pooled client to reach it.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Route,
    /// `scheme://authority/base-path`, no trailing slash.
    base: Arc<str>,
}

#[derive(Clone, Debug)]
enum Route {
    Direct(PooledClient<HttpsConnector<HttpConnector>>),
    Tunnel(PooledClient<HttpsConnector<Tunnel<HttpConnector>>>),
}

/// A failed exchange, classified the way the proxy answers it.
#[derive(Debug)]
pub enum SendError {
    /// The TCP connection did not open within `connect_timeout`.
    ConnectTimeout,
    /// Anything else (refused, reset, TLS, protocol), as one line.
    Transport(String),
}

impl Upstream {
    /// A client for `base` (an http(s) URL, checked by the caller) with the given connect
    /// timeout. `loopback` upstreams never go through an environment proxy.
    pub fn new(base: &str, connect_timeout: Duration, loopback: bool) -> Result<Self, ClientError> {
        let base: Arc<str> = Arc::from(base.trim_end_matches('/'));
        let http = http_connector(connect_timeout);
        let tls_error = |e: rustls::Error| ClientError::Tls(e.to_string());
        let proxy = if loopback {
            None
        } else {
            base.parse::<Uri>()
                .ok()
                .and_then(|uri| Matcher::from_env().intercept(&uri))
        };
        let client = match proxy {
            None => Route::Direct(pooled(https(http).map_err(tls_error)?)),
            Some(intercept) => {
                let mut tunnel = Tunnel::new(intercept.uri().clone(), http);
                if let Some(auth) = intercept.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Route::Tunnel(pooled(https(tunnel).map_err(tls_error)?))
            }
        };
        Ok(Self { client, base })
    }

    /// The upstream URI for a request to `path` (which starts with `/v1`) and `query`: the
    /// configured base joined with the path after `/v1`.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, SendError> {
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let mut s =
            String::with_capacity(self.base.len() + rest.len() + 1 + query.map_or(0, str::len));
        s.push_str(&self.base);
        s.push_str(rest);
        if let Some(q) = query {
            s.push('?');
            s.push_str(q);
        }
        s.parse()
            .map_err(|e| SendError::Transport(format!("invalid upstream URL: {e}")))
    }

    /// Sends one request; resolves when the answer's head arrived.
    pub async fn send(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, SendError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let result = match &self.client {
            Route::Direct(c) => c.request(request).await,
            Route::Tunnel(c) => c.request(request).await,
        };
        result.map_err(|e| {
            let timed_out = e.is_connect()
                && std::iter::successors(std::error::Error::source(&e), |s| s.source()).any(|s| {
                    s.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
                });
            if timed_out {
                SendError::ConnectTimeout
            } else {
                SendError::Transport(crate::wire::error_chain(&e))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_join_after_v1() {
        let up =
            Upstream::new("https://api.example.com/v1", Duration::from_secs(1), false).unwrap();
        assert_eq!(
            up.uri("/v1/chat/completions", Some("a=1")).unwrap(),
            "https://api.example.com/v1/chat/completions?a=1"
        );
        let up = Upstream::new("http://127.0.0.1:8000/v1/", Duration::from_secs(1), true).unwrap();
        assert_eq!(
            up.uri("/v1/models", None).unwrap(),
            "http://127.0.0.1:8000/v1/models"
        );
        let up = Upstream::new("http://127.0.0.1:8000", Duration::from_secs(1), true).unwrap();
        assert_eq!(
            up.uri("/v1/embeddings", None).unwrap(),
            "http://127.0.0.1:8000/embeddings"
        );
    }
}
