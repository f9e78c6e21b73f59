//! `llm-audit` command line. Subcommands (serve, demo, report, verify, rules, export, prune)
//! arrive with their issues; today the binary reports its version and points to the example.

use std::process::ExitCode;

// mimalloc: cheaper small allocations and no glibc arena contention between request threads
// and the store writer (measured in benches/recorder.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version" | "-V") => {
            println!("llm-audit {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "llm-audit {}: the audit core is a library today; run `cargo run --example audited_chat` \
                 for a demonstration. Subcommands come with the proxy.",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
