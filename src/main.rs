//! `llm-audit`: parse the command line, dispatch, map errors to exit codes
//! (0 ok, 1 a check failed, 2 usage or environment error).

use std::process::ExitCode;

use clap::Parser as _;
use llm_audit::cli::{Cli, Command};

// mimalloc: cheaper small allocations and no glibc arena contention between request threads
// and the store writer (measured in benches/recorder.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => llm_audit::serve::run(args),
        Command::Demo(args) => llm_audit::demo::run(args),
        Command::Rules(args) => llm_audit::rules::run(args),
        Command::Report(args) => llm_audit::report::run(args),
        Command::Verify(args) => llm_audit::logtools::verify(args),
        Command::Export(args) => llm_audit::logtools::export(args),
        Command::Prune(args) => llm_audit::logtools::prune(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
