//! `llm-audit demo` (placeholder until the demo lands).

use std::process::ExitCode;

use crate::cli::DemoArgs;

/// `llm-audit demo`.
pub fn run(_args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("demo is not built yet")
}
