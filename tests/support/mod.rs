//! Helpers shared by the integration tests that run processes: the built `llm-audit` with a clean
//! environment, child processes killed on drop, a child's output read line by line as it comes,
//! free loopback ports and a child's peak resident memory.
//!
//! Each file in `tests/` is its own crate and includes this module with `mod support;`. Most use
//! only some of these helpers, and the rest would be dead code there: hence `allow(dead_code)`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The built binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_llm-audit");

/// `llm-audit` with stdin null and none of the developer's `LLM_AUDIT_*` (they would change the
/// config and the arguments), `OTEL_*` (tracing export), `RUST_LOG` or `NO_COLOR` settings.
pub fn llm_audit() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("LLM_AUDIT_")
            || k.starts_with("OTEL_")
            || k == "RUST_LOG"
            || k == "NO_COLOR"
        {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// `serve` on ephemeral loopback ports (the process prints the bound addresses on its
/// `listening on` and `metrics on` lines) in front of `upstream`, logging to `db`.
pub fn serve_args<'c>(
    cmd: &'c mut Command,
    upstream: &str,
    db: &std::path::Path,
) -> &'c mut Command {
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
    ])
    .arg("--db")
    .arg(db)
}

/// Kills `child` if it is still running, and waits for it.
pub fn reap(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Kills a child process when dropped (test failure included).
pub struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        reap(&mut self.0);
    }
}

/// A loopback port free right now (the listener is closed before returning), for programs that
/// cannot report the port they got for port 0.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The lines of a child's output, read on a thread as they come: all kept, and each also handed
/// to [`Lines::wait_for`].
pub struct Lines {
    all: Arc<Mutex<String>>,
    rx: mpsc::Receiver<String>,
    reader: JoinHandle<()>,
}

impl Lines {
    /// Starts reading `from` (a child's `stderr` or `stdout`) until it ends.
    pub fn read(from: impl Read + Send + 'static) -> Self {
        let all = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let sink = all.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                {
                    let mut all = sink.lock().unwrap();
                    all.push_str(&line);
                    all.push('\n');
                }
                let _ = tx.send(line);
            }
        });
        Self { all, rx, reader }
    }

    /// The first of the lines not yet waited for that `pick` makes something of, within
    /// `within`; `None` when the time is up or the output ends first.
    pub fn wait_for<T>(
        &self,
        within: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some(found) = pick(&line) {
                        return Some(found);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        None
    }

    /// Everything read so far.
    pub fn so_far(&self) -> String {
        self.all.lock().unwrap().clone()
    }

    /// Everything, once the output has ended (the child exited or was killed).
    pub fn until_end(self) -> String {
        let Self { all, reader, .. } = self;
        reader.join().unwrap();
        all.lock().unwrap().clone()
    }
}

/// The address in the `metrics on http://ADDR/metrics` line `serve` and `demo` print.
pub fn metrics_addr(line: &str) -> Option<SocketAddr> {
    line.strip_prefix("metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
}

/// Waits for `child` to exit, sampling its peak resident set every 2 ms (`VmHWM`, a high-water
/// mark, so the last sample before exit is the peak up to then): its exit status and that peak
/// in kB (0 if no sample was taken).
pub fn wait_sampling_peak_rss(child: &mut Child) -> (ExitStatus, u64) {
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_file)
            && let Some(kb) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    (status, peak_kb)
}
