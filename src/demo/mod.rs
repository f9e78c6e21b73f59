//! `llm-audit demo`: the whole product with no API key and no network beyond 127.0.0.1.
//!
//! ```text
//! traffic generator ──reqwest──▶ proxy (serve::launch) ──▶ simulated upstream (127.0.0.1:0)
//!   10 users, JSON + SSE,           audit log, /metrics,      latencies, usage, 429/500, SSE
//!   repeats, one huge prompt        spans (OTEL_* if set)
//! ```
//!
//! On exit (duration reached, Ctrl-C or SIGTERM) the stack stops in order and the run's security
//! report is printed: `llm-audit report` over the run's period (the seed's statistics and anomaly
//! checks, judged with the configured `[thresholds]`) and the state of the hash chain.

mod traffic;
mod upstream;

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use crate::cli::DemoArgs;
use crate::config::{AuthConfig, Config, Secret};
use crate::store::chain;
use crate::telemetry::Metrics;
use crate::{report, serve};
use traffic::{Counters, Traffic};

/// `gen_ai.provider.name` of the simulated upstream, so demo data is never mistaken for real.
pub const DEMO_PROVIDER: &str = "demo";

/// `llm-audit demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.rps.is_finite() && args.rps > 0.0 && args.rps <= 10_000.0,
        "--rps must be above 0 and at most 10000, not {}",
        args.rps
    );
    let cfg = demo_config(&args)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(demo(cfg, &args))
}

/// Defaults, then `LLM_AUDIT_<SECTION>__<KEY>` variables, then the flags. The upstream is always
/// the simulated one and takes any key, so `[auth]` is always passthrough.
pub fn demo_config(args: &DemoArgs) -> anyhow::Result<Config> {
    let mut cfg = Config::load(None, std::env::vars())?;
    cfg.auth = AuthConfig::default();
    cfg.upstream.provider = DEMO_PROVIDER.into();
    if let Some(a) = args.listen {
        cfg.server.listen = a;
    }
    if let Some(a) = args.metrics_listen {
        cfg.server.metrics_listen = a;
    }
    if let Some(db) = &args.db {
        cfg.store.path.clone_from(db);
    }
    Ok(cfg)
}

async fn demo(mut cfg: Config, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let upstream = upstream::start()
        .await
        .context("starting the simulated upstream")?;
    cfg.upstream.url = upstream.base_url();
    let stack = match serve::launch(&cfg, true).await {
        Ok(s) => s,
        Err(e) => {
            upstream.shutdown().await;
            return Err(e);
        }
    };
    serve::announce(&stack, &cfg.store.path);
    // The run's records are the ones stamped from here on (earlier runs' rows come before).
    let run_start = Utc::now();
    eprintln!(
        "simulated upstream on {} (no API key, no network); sending {} requests/s {}",
        upstream.base_url(),
        args.rps,
        match args.duration {
            0 => "until Ctrl-C".to_owned(),
            s => format!("for {s} s (Ctrl-C stops early)"),
        }
    );

    let started = Instant::now();
    let traffic = match Traffic::start(&format!("http://{}/v1", stack.running.addr), args.rps) {
        Ok(t) => t,
        Err(e) => {
            stack.shutdown().await;
            upstream.shutdown().await;
            return Err(e);
        }
    };
    let progress = Progress {
        tty: std::io::stderr().is_terminal(),
        counters: traffic.counters.clone(),
        metrics: stack.metrics.clone(),
        started,
    };
    let interrupted = progress.run_until_done(args.duration).await;
    progress.end_line();
    eprintln!(
        "{}: finishing the calls in flight, then closing the proxy and the audit log",
        if interrupted {
            "interrupted"
        } else {
            "duration reached"
        }
    );
    traffic.stop().await;
    progress.show_final();
    stack.shutdown().await;
    upstream.shutdown().await;

    let summary = summarize(&cfg, run_start)
        .with_context(|| format!("summarising the audit log {}", cfg.store.path.display()))?;
    print!("{summary}");
    std::io::stdout().flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The one-line progress indicator: in place every second on a terminal, a plain line every
/// five seconds otherwise (logs, CI).
struct Progress {
    tty: bool,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
    started: Instant,
}

impl Progress {
    fn line(&self) -> String {
        let c = &self.counters;
        format!(
            "[{:>4}s] sent {}  ok {}  errors {}  cost ${:.4}",
            self.started.elapsed().as_secs(),
            c.sent.load(Ordering::Relaxed),
            c.ok.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
            self.metrics.cost.total_picousd() as f64 / 1e12,
        )
    }

    fn show(&self) {
        if self.tty {
            eprint!("\r\x1b[2K{}", self.line());
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{}", self.line());
        }
    }

    /// Shows progress until `duration` seconds have passed (0: forever) or a signal arrives.
    /// Returns whether a signal ended it.
    async fn run_until_done(&self, duration: u64) -> bool {
        let signal = serve::signal();
        tokio::pin!(signal);
        let deadline = async {
            match duration {
                0 => std::future::pending().await,
                s => tokio::time::sleep(Duration::from_secs(s)).await,
            }
        };
        tokio::pin!(deadline);
        let every = Duration::from_secs(if self.tty { 1 } else { 5 });
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                () = &mut signal => return true,
                () = &mut deadline => return false,
                _ = ticks.tick() => self.show(),
            }
        }
    }

    /// Ends the in-place line on a terminal, so the next message starts on its own line.
    fn end_line(&self) {
        if self.tty {
            eprintln!();
        }
    }

    fn show_final(&self) {
        eprintln!("{} (final)", self.line());
    }
}

/// The run's security report — `llm-audit report` over the run's period, judged with the
/// configured `[thresholds]` — and the state of the hash chain.
fn summarize(cfg: &Config, since: DateTime<Utc>) -> anyhow::Result<String> {
    let now = Utc::now();
    let db = &cfg.store.path;
    let conn = report::open_read_only(db)?;
    let summary = report::build(
        &conn,
        &db.display().to_string(),
        report::Period::new(since, Some(now), now),
        &cfg.thresholds,
        crate::period::stamp(now),
    )?;
    let key = match &cfg.store.chain_key_file {
        Some(f) => {
            Some(Secret::from_file(f).with_context(|| format!("chain key file {}", f.display()))?)
        }
        None => None,
    };
    let chain = chain::verify(&conn, key.as_ref())?;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut out = format!("\n{}\n", report::render::text(&summary, colour));
    let _ = match chain.first_break {
        None => writeln!(
            out,
            "hash chain: intact ({} rows checked)",
            report::render::thousands(chain.rows)
        ),
        Some(b) => writeln!(
            out,
            "hash chain: TAMPERED at row {}: {}",
            b.row_id, b.tamper
        ),
    };
    let _ = writeln!(
        out,
        "the whole log: llm-audit report --db {db}\ncheck the chain: llm-audit verify --db {db}",
        db = db.display()
    );
    Ok(out)
}
