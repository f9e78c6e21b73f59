//! Command-line interface (DESIGN §12). Each flag also reads `LLM_AUDIT_<NAME>`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The audit layer for OpenAI-compatible LLM APIs.
#[derive(Debug, Parser)]
#[command(name = "llm-audit", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the auditing proxy: point any OpenAI SDK's base_url at it.
    Serve(ServeArgs),
    /// Run the proxy against a built-in simulated upstream with generated traffic (no key, no network).
    Demo(DemoArgs),
    /// Print the Prometheus alert rules rendered from the [thresholds] configuration.
    Rules(RulesArgs),
    /// Statistics and security checks of the audit log over a period (the seed's report).
    Report(ReportArgs),
    /// Walk the audit log's hash chain: exit 0 intact, 1 tampered, 2 could not check.
    Verify(VerifyArgs),
    /// Stream audit records as JSON lines or CSV, for a SIEM or a spreadsheet.
    Export(ExportArgs),
    /// Delete old records, keeping the rest of the chain verifiable from a checkpoint.
    Prune(PruneArgs),
}

/// `llm-audit serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "LLM_AUDIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Proxy listen address (default 127.0.0.1:8080; port 0 picks a free port).
    #[arg(long, env = "LLM_AUDIT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Metrics listen address (default 127.0.0.1:9464).
    #[arg(long, env = "LLM_AUDIT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Upstream base URL, e.g. https://api.openai.com/v1.
    #[arg(long, env = "LLM_AUDIT_UPSTREAM")]
    pub upstream: Option<String>,
    /// Audit database (default ./llm-audit.db).
    #[arg(long, env = "LLM_AUDIT_DB")]
    pub db: Option<PathBuf>,
    /// Validate the configuration, print it (secrets masked) and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// `llm-audit demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long to generate traffic, in seconds (0 = until Ctrl-C).
    #[arg(long, env = "LLM_AUDIT_DURATION", default_value_t = 30)]
    pub duration: u64,
    /// Requests per second of generated traffic.
    #[arg(long, env = "LLM_AUDIT_RPS", default_value_t = 20.0)]
    pub rps: f64,
    /// Proxy listen address (default 127.0.0.1:8080).
    #[arg(long, env = "LLM_AUDIT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Metrics listen address (default 127.0.0.1:9464).
    #[arg(long, env = "LLM_AUDIT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Audit database (default ./llm-audit.db).
    #[arg(long, env = "LLM_AUDIT_DB")]
    pub db: Option<PathBuf>,
}

/// `llm-audit rules`.
#[derive(Debug, Args)]
pub struct RulesArgs {
    /// TOML configuration file whose [thresholds] the rules use (defaults otherwise).
    #[arg(long, env = "LLM_AUDIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Base URL of the runbook the alerts link to (`#<alert name>` is appended).
    #[arg(long, env = "LLM_AUDIT_RUNBOOK_URL", default_value = crate::rules::DEFAULT_RUNBOOK_URL)]
    pub runbook_url: String,
}

/// Output format of `llm-audit report`.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum ReportFormat {
    /// Aligned terminal report (colour only on a TTY; NO_COLOR respected).
    #[default]
    Text,
    /// Stable JSON (documented in docs/report.md).
    Json,
    /// Markdown for a ticket or a wiki.
    Markdown,
}

/// `llm-audit report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Audit database (default: [store] path of the configuration, ./llm-audit.db).
    #[arg(long, env = "LLM_AUDIT_DB")]
    pub db: Option<PathBuf>,
    /// TOML configuration whose [thresholds] the checks use (defaults otherwise).
    #[arg(long, env = "LLM_AUDIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The last N hours (default 24, like the seed's daily report).
    #[arg(long, env = "LLM_AUDIT_HOURS", conflicts_with = "since")]
    pub hours: Option<f64>,
    /// Start of the period: 2026-11-26T10:00:00Z, 2026-11-26, or a duration ago such as 7d.
    #[arg(long, env = "LLM_AUDIT_SINCE")]
    pub since: Option<String>,
    /// End of the period (exclusive; default now).
    #[arg(long, env = "LLM_AUDIT_UNTIL", requires = "since")]
    pub until: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
}

/// `llm-audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Audit database (default: [store] path of the configuration, ./llm-audit.db).
    #[arg(long, env = "LLM_AUDIT_DB")]
    pub db: Option<PathBuf>,
    /// TOML configuration whose [store] names the database (and chain key) by default.
    #[arg(long, env = "LLM_AUDIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The chain key the log was written with (default: `store.chain_key_file`), if any.
    #[arg(long, env = "LLM_AUDIT_CHAIN_KEY_FILE")]
    pub chain_key_file: Option<PathBuf>,
}

/// Output format of `llm-audit export`.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per row and line, every column.
    #[default]
    Jsonl,
    /// RFC 4180 CSV with a header row.
    Csv,
}

/// `llm-audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Audit database (default: [store] path of the configuration, ./llm-audit.db).
    #[arg(long, env = "LLM_AUDIT_DB")]
    pub db: Option<PathBuf>,
    /// TOML configuration whose [store] names the database (and chain key) by default.
    #[arg(long, env = "LLM_AUDIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Only rows at or after this time: 2026-11-26T10:00:00Z, 2026-11-26, or a duration ago (24h).
    #[arg(long, env = "LLM_AUDIT_SINCE")]
    pub since: Option<String>,
    /// Only rows before this time.
    #[arg(long, env = "LLM_AUDIT_UNTIL")]
    pub until: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,
}

/// `llm-audit prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Audit database (default: [store] path of the configuration, ./llm-audit.db).
    #[arg(long, env = "LLM_AUDIT_DB")]
    pub db: Option<PathBuf>,
    /// TOML configuration whose [store] names the database (and chain key) by default.
    #[arg(long, env = "LLM_AUDIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Delete rows older than this, e.g. 90d.
    #[arg(long, env = "LLM_AUDIT_OLDER_THAN")]
    pub older_than: crate::config::HumanDuration,
    /// The chain key the log was written with, if any (the chain is verified before pruning).
    #[arg(long, env = "LLM_AUDIT_CHAIN_KEY_FILE")]
    pub chain_key_file: Option<PathBuf>,
    /// Show what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}
