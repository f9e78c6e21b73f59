//! `llm-audit demo`: the whole product with no API key and no network beyond 127.0.0.1.
//!
//! ```text
//! traffic generator ──reqwest──▶ proxy (serve::launch) ──▶ simulated upstream (127.0.0.1:0)
//!   10 users, JSON + SSE,           audit log, /metrics,      latencies, usage, 429/500, SSE
//!   repeats, one huge prompt        spans (OTEL_* if set)
//! ```
//!
//! On exit (duration reached, Ctrl-C or SIGTERM) the stack stops in order and a security summary
//! of the run is computed from the audit log with SQL over `audit_logs`: the seed's statistics and
//! its five anomaly checks, judged with the configured `[thresholds]`.

mod traffic;
mod upstream;

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::Connection;

use crate::audit::AuditRecord;
use crate::cli::DemoArgs;
use crate::config::{AuthConfig, Config, Secret, ThresholdsConfig};
use crate::serve;
use crate::store::chain;
use crate::telemetry::Metrics;
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
    let first_row = match rows_before(&cfg.store.path) {
        Ok(id) => id,
        Err(e) => {
            stack.shutdown().await;
            upstream.shutdown().await;
            return Err(e);
        }
    };
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
    let elapsed = started.elapsed();
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

    let summary = Summary::read(&cfg, first_row, elapsed)
        .with_context(|| format!("summarising the audit log {}", cfg.store.path.display()))?;
    print!("{}", summary.render(&cfg.thresholds));
    std::io::stdout().flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The highest row id before the run: the run's rows are the ones after it.
fn rows_before(db: &Path) -> anyhow::Result<i64> {
    let conn = Connection::open(db)?;
    Ok(
        conn.query_row("SELECT COALESCE(MAX(id), 0) FROM audit_logs", [], |r| {
            r.get(0)
        })?,
    )
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

/// What the run left in the audit log.
#[derive(Debug)]
struct Summary {
    db: PathBuf,
    elapsed: Duration,
    total: u64,
    failed: u64,
    streamed: u64,
    repeats: u64,
    cost: f64,
    tokens: u64,
    avg_latency_ms: f64,
    models: Vec<ModelRow>,
    cost_last_hour: f64,
    /// Users whose largest request exceeded the threshold: (user, max tokens, requests).
    heavy_users: Vec<(String, u64, u64)>,
    /// Request hashes seen more than `repeated_request_count` times: (hash, count).
    repeated: Vec<(String, u64)>,
    chain: String,
}

#[derive(Debug)]
struct ModelRow {
    model: String,
    count: u64,
    cost: f64,
    avg_latency_ms: f64,
    fallback_priced: bool,
}

/// The seed's five checks as (name, severity, recommendation), from the one table the alert
/// rules and `llm-audit report` use.
const fn check(a: crate::rules::Anomaly) -> (&'static str, &'static str, &'static str) {
    (a.name, a.severity.upper(), a.recommendation)
}
const HIGH_REQUEST_RATE: (&str, &str, &str) = check(crate::rules::HIGH_REQUEST_RATE);
const HIGH_FAILURE_RATE: (&str, &str, &str) = check(crate::rules::HIGH_FAILURE_RATE);
const COST_OVERRUN: (&str, &str, &str) = check(crate::rules::COST_OVERRUN);
const EXCESSIVE_TOKEN_USAGE: (&str, &str, &str) = check(crate::rules::EXCESSIVE_TOKEN_USAGE);
const REPEATED_REQUESTS: (&str, &str, &str) = check(crate::rules::REPEATED_REQUESTS);

impl Summary {
    /// SQL over the run's rows (`id > first_row`), as the seed's statistics and checks do.
    fn read(cfg: &Config, first_row: i64, elapsed: Duration) -> anyhow::Result<Self> {
        let t = &cfg.thresholds;
        let conn = Connection::open(&cfg.store.path)?;
        let (total, failed, streamed, repeats, cost, tokens, avg_latency_ms) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(outcome = 'error'), 0), COALESCE(SUM(stream), 0),
                    COUNT(*) - COUNT(DISTINCT request_hash), COALESCE(SUM(cost_usd), 0.0),
                    COALESCE(SUM(total_tokens), 0), COALESCE(AVG(latency_ms), 0.0)
             FROM audit_logs WHERE id > ?1",
            [first_row],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, f64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, f64>(6)?,
                ))
            },
        )?;
        let mut stmt = conn.prepare(
            "SELECT model, COUNT(*), COALESCE(SUM(cost_usd), 0.0), COALESCE(AVG(latency_ms), 0.0),
                    MAX(cost_status <> 'priced')
             FROM audit_logs WHERE id > ?1 GROUP BY model ORDER BY COUNT(*) DESC, model",
        )?;
        let models = stmt
            .query_map([first_row], |r| {
                Ok(ModelRow {
                    model: r.get(0)?,
                    count: count(r.get(1)?),
                    cost: r.get(2)?,
                    avg_latency_ms: r.get(3)?,
                    fallback_priced: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let hour_ago =
            AuditRecord::format_timestamp(chrono::Utc::now() - chrono::Duration::hours(1));
        let cost_last_hour: f64 = conn.query_row(
            "SELECT COALESCE(SUM(cost_usd), 0.0) FROM audit_logs WHERE id > ?1 AND timestamp >= ?2",
            rusqlite::params![first_row, hour_ago],
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare(
            "SELECT user_id, MAX(total_tokens), COUNT(*) FROM audit_logs
             WHERE id > ?1 AND user_id IS NOT NULL
             GROUP BY user_id HAVING MAX(total_tokens) > ?2 ORDER BY MAX(total_tokens) DESC",
        )?;
        let heavy_users = stmt
            .query_map(
                rusqlite::params![first_row, clamp_i64(t.max_tokens_per_request)],
                |r| Ok((r.get(0)?, count(r.get(1)?), count(r.get(2)?))),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT request_hash, COUNT(*) FROM audit_logs
             WHERE id > ?1 AND request_hash <> ''
             GROUP BY request_hash HAVING COUNT(*) > ?2 ORDER BY COUNT(*) DESC LIMIT 10",
        )?;
        let repeated = stmt
            .query_map(
                rusqlite::params![first_row, clamp_i64(t.repeated_request_count)],
                |r| Ok((r.get(0)?, count(r.get(1)?))),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let key = match &cfg.store.chain_key_file {
            Some(f) => Some(
                Secret::from_file(f).with_context(|| format!("chain key file {}", f.display()))?,
            ),
            None => None,
        };
        let report = chain::verify(&conn, key.as_ref())?;
        let chain = match report.first_break {
            None => format!("intact ({} rows checked)", group(report.rows)),
            Some(b) => format!(
                "BROKEN at row {} (request {}, {:?})",
                b.row_id, b.request_id, b.kind
            ),
        };
        Ok(Self {
            db: cfg.store.path.clone(),
            elapsed,
            total: count(total),
            failed: count(failed),
            streamed: count(streamed),
            repeats: count(repeats),
            cost,
            tokens: count(tokens),
            avg_latency_ms,
            models,
            cost_last_hour,
            heavy_users,
            repeated,
            chain,
        })
    }

    /// The five checks with the configured thresholds: (check, fired?, details).
    fn checks(&self, t: &ThresholdsConfig) -> Vec<((&str, &str, &str), bool, String)> {
        let minutes = self.elapsed.as_secs_f64().max(1.0) / 60.0;
        let rpm = self.total as f64 / minutes;
        let mut out = vec![(
            HIGH_REQUEST_RATE,
            rpm > t.requests_per_minute,
            format!(
                "{rpm:.1} requests per minute (threshold {})",
                t.requests_per_minute
            ),
        )];
        let ratio = ratio(self.failed, self.total);
        let judged = self.total > t.min_requests_for_failure_ratio;
        out.push((
            HIGH_FAILURE_RATE,
            judged && ratio > t.failed_requests_ratio,
            format!(
                "{:.1}% of {} requests failed (threshold {}%, judged above {} requests)",
                ratio * 100.0,
                self.total,
                t.failed_requests_ratio * 100.0,
                t.min_requests_for_failure_ratio
            ),
        ));
        out.push((
            COST_OVERRUN,
            self.cost_last_hour > t.max_cost_per_hour_usd,
            format!(
                "${:.2} in the last hour (threshold ${:.2})",
                self.cost_last_hour, t.max_cost_per_hour_usd
            ),
        ));
        if self.heavy_users.is_empty() {
            out.push((
                EXCESSIVE_TOKEN_USAGE,
                false,
                format!(
                    "no request above {} tokens",
                    group(t.max_tokens_per_request)
                ),
            ));
        }
        for (user, max, n) in &self.heavy_users {
            out.push((
                EXCESSIVE_TOKEN_USAGE,
                true,
                format!(
                    "user {user}: largest request {} tokens, {n} requests (threshold {})",
                    group(*max),
                    group(t.max_tokens_per_request)
                ),
            ));
        }
        if self.repeated.is_empty() {
            out.push((
                REPEATED_REQUESTS,
                false,
                format!(
                    "no request hash seen more than {} times",
                    t.repeated_request_count
                ),
            ));
        }
        for (hash, n) in &self.repeated {
            let short: String = hash.chars().take(16).collect();
            out.push((
                REPEATED_REQUESTS,
                true,
                format!(
                    "request hash {short}…: {n} times (threshold: more than {})",
                    t.repeated_request_count
                ),
            ));
        }
        out
    }

    fn render(&self, t: &ThresholdsConfig) -> String {
        let mut s = String::new();
        let rule = "─".repeat(72);
        let _ = writeln!(s, "\nllm-audit demo: security summary of this run");
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            "  period         {:.1} s, audit log {}",
            self.elapsed.as_secs_f64(),
            self.db.display()
        );
        let _ = writeln!(s, "  requests       {}", group(self.total));
        let _ = writeln!(
            s,
            "  failed         {} ({:.1}%)",
            group(self.failed),
            ratio(self.failed, self.total) * 100.0
        );
        let _ = writeln!(s, "  streamed       {}", group(self.streamed));
        let _ = writeln!(
            s,
            "  repeats        {} ({:.1}% of requests repeat an earlier prompt)",
            group(self.repeats),
            ratio(self.repeats, self.total) * 100.0
        );
        let _ = writeln!(s, "  total cost     ${:.6}", self.cost);
        let _ = writeln!(s, "  total tokens   {}", group(self.tokens));
        let _ = writeln!(s, "  avg latency    {:.1} ms", self.avg_latency_ms);
        let _ = writeln!(s, "  hash chain     {}", self.chain);
        let _ = writeln!(s, "\nper model");
        let _ = writeln!(
            s,
            "  {:<28} {:>8} {:>14} {:>12}",
            "model", "requests", "cost USD", "avg latency"
        );
        for m in &self.models {
            let _ = writeln!(
                s,
                "  {:<28} {:>8} {:>14.6} {:>9.1} ms{}",
                m.model,
                group(m.count),
                m.cost,
                m.avg_latency_ms,
                if m.fallback_priced {
                    "  (unknown model: fallback price)"
                } else {
                    ""
                }
            );
        }
        let checks = self.checks(t);
        let fired = checks.iter().filter(|c| c.1).count();
        let _ = writeln!(
            s,
            "\nanomaly checks over the run ([thresholds]): {fired} found"
        );
        let mut last_recommended = "";
        for (i, ((name, severity, recommendation), is_fired, details)) in checks.iter().enumerate()
        {
            let tag = if *is_fired {
                format!("[{severity}]")
            } else {
                "ok".to_owned()
            };
            let _ = writeln!(s, "  {tag:<11}{name}: {details}");
            // One recommendation per anomaly type, after its last instance.
            let next_same = checks.get(i + 1).is_some_and(|c| c.0.0 == *name && c.1);
            if *is_fired && !next_same && last_recommended != *name {
                let _ = writeln!(s, "  {:<11}→ {recommendation}", "");
                last_recommended = name;
            }
        }
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(
            s,
            "full report: llm-audit report --db {db}\ncheck the hash chain: llm-audit verify --db {db}",
            db = self.db.display()
        );
        s
    }
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// `1234567` → `1,234,567`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }
}
