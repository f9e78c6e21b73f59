//! `llm-audit serve`: an OpenAI-compatible reverse proxy that audits every call.
//!
//! ```text
//! client ─▶ [catch-panic] ─▶ [sensitive headers] ─▶ router ─▶ handler::audited ─▶ upstream
//!                                                              │ identity, limits, parse
//!                                                              │ Recorder::begin … finish
//!                                                              └ tee::TeeBody for SSE
//! metrics listener ─▶ GET /metrics (its own port, so scraping never competes with traffic)
//! ```

pub mod error;
pub mod handler;
pub mod identity;
pub mod tee;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{any, get, post};
use axum::serve::ListenerExt as _;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::audit::{Operation, Recorder};
use crate::config::Config;
use identity::Auth;

/// Response header carrying the audit record's `request_id`.
pub const REQUEST_ID_HEADER: &str = "x-llm-audit-request-id";
/// Response header carrying the call's cost in USD (non-streamed answers).
pub const COST_HEADER: &str = "x-llm-audit-cost-usd";

/// What every handler needs, built once.
#[derive(Debug)]
pub struct AppState {
    recorder: Recorder,
    upstream: upstream::Upstream,
    server_address: Option<String>,
    server_port: Option<u16>,
    provider: Arc<str>,
    auth: Auth,
    max_body_bytes: usize,
    max_header_bytes: usize,
    trusted_proxies: Vec<IpNet>,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    retries: u32,
    shutdown: ShutdownGuard,
}

/// What lets shutdown finish every call's record before the store closes.
#[derive(Clone, Debug, Default)]
pub struct ShutdownGuard {
    /// Cancelled when the grace period is over: calls still running end now (503, recorded).
    pub abort: CancellationToken,
    /// Counts calls in flight (handlers and streams), so shutdown can wait for their records.
    pub tracker: tokio_util::task::TaskTracker,
}

/// A configuration the proxy cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `upstream.url` is not an http(s) URL.
    #[error("upstream.url {0:?} is not an http(s) URL")]
    UpstreamUrl(String),
    /// `[auth]` is inconsistent.
    #[error(transparent)]
    Auth(#[from] identity::AuthConfigError),
    /// The HTTP client could not be built.
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] upstream::ClientError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl AppState {
    /// Checks the proxy's sections of `cfg` and builds the shared state.
    pub fn new(
        cfg: &Config,
        recorder: Recorder,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, StartError> {
        let base = cfg.upstream.url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base).map_err(|_| StartError::UpstreamUrl(base.clone()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(StartError::UpstreamUrl(base));
        }
        let loopback = url.host_str().is_some_and(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        // HTTP(S)_PROXY is for reaching the outside; a local upstream (vLLM, Ollama, the demo)
        // is never behind it.
        let upstream =
            upstream::Upstream::new(url.as_str(), cfg.upstream.connect_timeout.0, loopback)?;
        Ok(Self {
            auth: Auth::from_config(&cfg.auth, env)?,
            recorder,
            upstream,
            server_address: url.host_str().map(str::to_owned),
            server_port: url.port_or_known_default(),
            provider: Arc::from(cfg.upstream.provider.as_str()),
            max_body_bytes: cfg.server.max_body_bytes,
            max_header_bytes: cfg.server.max_header_bytes,
            trusted_proxies: cfg.server.trusted_proxies.clone(),
            connect_timeout: cfg.upstream.connect_timeout.0,
            first_byte_timeout: cfg.upstream.first_byte_timeout.0,
            idle_timeout: cfg.upstream.idle_timeout.0,
            retries: cfg.upstream.retries,
            shutdown: ShutdownGuard::default(),
        })
    }
}

/// The proxy's routes and layers. Outermost first: a panic in any handler becomes an
/// OpenAI-shaped 500 instead of a dropped connection; `Authorization` is marked sensitive before
/// anything below could log or trace it.
pub fn router(state: Arc<AppState>) -> Router {
    let audited = |op: Operation| move |s, ci, req| handler::audited(op, s, ci, req);
    Router::new()
        .route("/v1/chat/completions", post(audited(Operation::Chat)))
        .route("/v1/completions", post(audited(Operation::TextCompletion)))
        .route("/v1/embeddings", post(audited(Operation::Embeddings)))
        .route("/v1/responses", post(audited(Operation::Responses)))
        .route("/v1/{*rest}", any(handler::passthrough))
        .route("/healthz", get(handler::healthz))
        .route("/readyz", get(handler::readyz))
        .method_not_allowed_fallback(handler::method_not_allowed)
        .fallback(handler::not_found)
        .with_state(state)
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        .layer(CatchPanicLayer::custom(panic_response))
}

/// Keeps a timer due within a second. Every call arms deadlines (first byte, idle; 60 s by
/// default), and Tokio's timer interrupts a parked runtime (an eventfd write and an extra
/// `epoll_wait`, measured once per request with strace) whenever a new deadline is earlier than
/// the one it sleeps towards; with this tick pending, call deadlines never are. One wake-up a
/// second instead of two system calls per request.
async fn timer_heartbeat(stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("A request handler panicked; answered 500.");
    handler::unaudited_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "internal_error",
        "internal error in the audit proxy".into(),
    )
}

/// A running proxy: its bound addresses and the handle to stop it.
#[derive(Debug)]
pub struct Running {
    /// Proxy address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    /// Metrics address actually bound.
    pub metrics_addr: SocketAddr,
    cancel: CancellationToken,
    proxy: JoinHandle<()>,
    metrics: JoinHandle<()>,
    grace: Duration,
    in_flight: ShutdownGuard,
}

/// Binds both listeners and serves until [`Running::shutdown`].
pub async fn start(cfg: &Config, state: AppState) -> Result<Running, StartError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(cfg.server.listen).await?;
    let metrics_listener = bind(cfg.server.metrics_listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.server.listen,
        source,
    })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.server.metrics_listen,
            source,
        })?;
    let cancel = CancellationToken::new();
    let metrics = state.recorder.metrics().clone();
    metrics.init_front_door_series(&state.provider);
    let in_flight = state.shutdown.clone();

    let app = router(Arc::new(state));
    // axum leaves TCP_NODELAY off; small SSE chunks would then wait for ACKs (STACK.md: c=1
    // p99 of 3.6 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(timer_heartbeat(cancel.clone()));
    let token = cancel.clone();
    let proxy = tokio::spawn(async move {
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { token.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "Proxy server failed.");
        }
    });
    let metrics_app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                let mut resp = metrics.encode().into_response();
                resp.headers_mut().insert(
                    axum::http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
        }),
    );
    let token = cancel.clone();
    let metrics = tokio::spawn(async move {
        let serve = axum::serve(metrics_listener, metrics_app)
            .with_graceful_shutdown(async move { token.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "Metrics server failed.");
        }
    });
    Ok(Running {
        addr,
        metrics_addr,
        cancel,
        proxy,
        metrics,
        grace: cfg.server.shutdown_grace.0,
        in_flight,
    })
}

impl Running {
    /// Shutdown steps 1–2: stop accepting, then let in-flight calls (streams included) finish
    /// within the grace period. Returns whether everything finished in time. The caller then
    /// drains the store (step 3) and flushes spans (step 4).
    pub async fn shutdown(self) -> bool {
        self.cancel.cancel();
        let finished = tokio::time::timeout(self.grace, self.proxy).await.is_ok();
        if !finished {
            tracing::warn!(grace = ?self.grace, "In-flight calls outlived the shutdown grace period; ending them.");
        }
        // Calls still running end now and write their records (503), before the caller closes
        // the store; waiting is bounded in case a connection task is stuck elsewhere.
        self.in_flight.abort.cancel();
        self.in_flight.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.in_flight.tracker.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.metrics).await;
        finished
    }
}
