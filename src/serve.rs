//! `llm-audit serve`: load the configuration, start the proxy, stop it in order.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::audit::Recorder;
use crate::cli::ServeArgs;
use crate::config::Config;
use crate::proxy::{self, AppState, Running};
use crate::store::Store;
use crate::telemetry::{self, Metrics, TelemetryConfig, TelemetryGuard};

/// Everything a running proxy owns, stopped in order by [`Stack::shutdown`].
pub struct Stack {
    /// The proxy and metrics listeners.
    pub running: Running,
    /// The audit store.
    pub store: Store,
    /// The metric catalog.
    pub metrics: Arc<Metrics>,
    telemetry: Option<TelemetryGuard>,
}

/// Reads the config file and `LLM_AUDIT_<SECTION>__<KEY>` variables, then applies the flags.
pub fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(a) = args.listen {
        cfg.server.listen = a;
    }
    if let Some(a) = args.metrics_listen {
        cfg.server.metrics_listen = a;
    }
    if let Some(u) = &args.upstream {
        cfg.upstream.url.clone_from(u);
    }
    if let Some(db) = &args.db {
        cfg.store.path.clone_from(db);
    }
    Ok(cfg)
}

/// Starts the proxy for `cfg`. `install_tracing` installs the global subscriber (once per
/// process: the binary does, in-process tests do not).
pub async fn launch(cfg: &Config, install_tracing: bool) -> anyhow::Result<Stack> {
    let metrics = Arc::new(Metrics::new(
        cfg.metrics.max_user_labels,
        cfg.metrics.max_model_labels,
        cfg.thresholds.max_tokens_per_request,
    )?);
    let telemetry = if install_tracing {
        Some(telemetry::init(&TelemetryConfig::from_env()?, &metrics)?)
    } else {
        None
    };
    let store = Store::open(&cfg.store, metrics.clone())
        .with_context(|| format!("opening the audit store {}", cfg.store.path.display()))?;
    let recorder = Recorder::from_config(&cfg.audit(), metrics.clone(), store.clone())?;
    let state = AppState::new(cfg, recorder, |k| std::env::var(k).ok())?;
    let running = proxy::start(cfg, state).await?;
    Ok(Stack {
        running,
        store,
        metrics,
        telemetry,
    })
}

impl Stack {
    /// The numbered shutdown: (1) stop accepting, (2) let in-flight calls finish within the
    /// grace period, (3) close the record channel and let the writer commit everything,
    /// (4) flush spans.
    pub async fn shutdown(self) {
        self.running.shutdown().await;
        self.store.shutdown_async().await;
        if let Some(t) = self.telemetry {
            t.shutdown().await;
        }
    }
}

/// SIGINT/SIGTERM handlers, installed before anything listens so a signal that arrives during
/// start-up still shuts down in order instead of killing the process.
pub struct Signals {
    #[cfg(unix)]
    handlers: Vec<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers (inside a Tokio runtime).
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let handlers = [SignalKind::interrupt(), SignalKind::terminate()]
                .into_iter()
                .filter_map(|k| signal(k).ok())
                .collect();
            Self { handlers }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for SIGINT or SIGTERM.
    pub async fn wait(self) {
        #[cfg(unix)]
        {
            let waits = self.handlers.into_iter().map(|mut s| {
                Box::pin(async move {
                    s.recv().await;
                })
            });
            if waits.len() > 0 {
                futures_util::future::select_all(waits).await;
                return;
            }
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Waits for SIGINT or SIGTERM (handlers installed now).
pub async fn signal() {
    Signals::install().wait().await;
}

/// Prints where the proxy listens, in the stable form scripts and tests parse.
pub fn announce(stack: &Stack, db: &Path) {
    eprintln!("listening on http://{}", stack.running.addr);
    eprintln!("metrics on http://{}/metrics", stack.running.metrics_addr);
    eprintln!("audit log {}", db.display());
}

/// `llm-audit serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&args)?;
    if args.check_config {
        check(&cfg)?;
        println!("{}", toml::to_string_pretty(&cfg)?);
        eprintln!("configuration OK");
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let signals = Signals::install();
        let stack = launch(&cfg, true).await?;
        announce(&stack, &cfg.store.path);
        signals.wait().await;
        eprintln!("shutting down: finishing in-flight calls, then the audit log");
        stack.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Everything `serve` would refuse at start-up, without binding or opening anything.
fn check(cfg: &Config) -> anyhow::Result<()> {
    crate::audit::PriceTable::from_config(&cfg.pricing)?;
    let url = reqwest::Url::parse(&cfg.upstream.url)
        .with_context(|| format!("upstream.url {:?}", cfg.upstream.url))?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https"),
        "upstream.url {:?} is not http(s)",
        cfg.upstream.url
    );
    crate::proxy::identity::Auth::from_config(&cfg.auth, |k| std::env::var(k).ok())?;
    for f in [&cfg.store.chain_key_file, &cfg.store.hash_key_file]
        .into_iter()
        .flatten()
    {
        std::fs::metadata(f).with_context(|| format!("key file {}", f.display()))?;
    }
    Ok(())
}
