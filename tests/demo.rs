#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `llm-audit demo` end to end, as a newcomer runs it: the built binary, the simulated upstream,
//! generated traffic; the metrics while it runs, the audit log and the summary after it exits.

mod support;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use llm_audit::store::chain;

use support::{Lines, Reap};

fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn demo_shows_metrics_audit_log_and_anomalies() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    let exe = support::BIN;
    let args = [
        "demo",
        "--duration",
        "6",
        "--rps",
        "15",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
    ];
    // The developer's own settings must not change the demo under test.
    let mut cmd = support::llm_audit();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = Reap(cmd.spawn().unwrap());
    let stderr = Lines::read(child.0.stderr.take().unwrap());
    let mut stdout = child.0.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stdout.read_to_string(&mut all);
        all
    });

    // While it runs: find the metrics listener, scrape until every family shows.
    let metrics_addr = stderr.wait_for(Duration::from_secs(30), support::metrics_addr);
    let wanted = [
        "llm_audit_requests_total",
        "llm_audit_cost_usd_total",
        "llm_audit_duplicate_requests_total",
        "llm_audit_user_request_tokens_bucket",
    ];
    let mut missing: Vec<&str> = wanted.to_vec();
    let mut scrape_error = None;
    if let Some(addr) = metrics_addr {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !missing.is_empty() && Instant::now() < deadline {
            match scrape(addr) {
                Ok(text) => {
                    missing.retain(|name| {
                        !text.lines().any(|l| {
                            l.starts_with(&format!("{name}{{"))
                                || l.starts_with(&format!("{name} "))
                        })
                    });
                }
                Err(e) => scrape_error = Some(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let scraped_at = started.elapsed();

    let status = wait_for_exit(&mut child.0, Duration::from_secs(90));
    let elapsed = started.elapsed();
    if status.is_none() {
        support::reap(&mut child.0);
    }
    let stderr = stderr.until_end();
    let stdout = out_reader.join().unwrap();
    let context = format!(
        "command: {exe} {}\nstatus: {status:?} after {elapsed:?} (metrics checked by {scraped_at:?})\n\
         --- stdout\n{stdout}\n--- stderr\n{stderr}",
        args.join(" ")
    );

    assert!(metrics_addr.is_some(), "no `metrics on` line\n{context}");
    assert!(
        missing.is_empty(),
        "metrics never showed {missing:?} (last scrape error: {scrape_error:?})\n{context}"
    );
    let status = status.unwrap_or_else(|| panic!("still running after 90 s\n{context}"));
    assert_eq!(status.code(), Some(0), "{context}");
    assert!(
        elapsed < Duration::from_secs(60),
        "a 6-second demo took {elapsed:?}\n{context}"
    );
    for expected in [
        "listening on http://127.0.0.1:".to_owned(),
        format!("audit log {}", db.display()),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(&expected)),
            "no {expected:?} on stderr\n{context}"
        );
    }
    for (severity, anomaly) in [
        ("[WARNING]", "EXCESSIVE_TOKEN_USAGE"),
        ("[INFO]", "REPEATED_REQUESTS"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(severity) && l.contains(anomaly)),
            "the summary does not report {severity} {anomaly}\n{context}"
        );
    }

    // The audit log: what the demo is meant to show.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let count = |sql: &str| -> i64 {
        conn.query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}\n{context}"))
    };
    let rows = count("SELECT COUNT(*) FROM audit_logs");
    assert!(
        (40..=200).contains(&rows),
        "{rows} rows for 6 s at 15 rps\n{context}"
    );
    for (what, sql) in [
        (
            "ok calls",
            "SELECT COUNT(*) FROM audit_logs WHERE outcome = 'ok'",
        ),
        (
            "failed calls",
            "SELECT COUNT(*) FROM audit_logs WHERE outcome = 'error' AND status_code >= 400",
        ),
        (
            "streamed calls with usage",
            "SELECT COUNT(*) FROM audit_logs WHERE stream = 1 AND outcome = 'ok' AND usage_source = 'reported'",
        ),
        (
            "a repeated request hash",
            "SELECT COUNT(*) FROM (SELECT request_hash FROM audit_logs GROUP BY request_hash HAVING COUNT(*) > 1)",
        ),
        (
            "a request over 100,000 tokens",
            "SELECT COUNT(*) FROM audit_logs WHERE total_tokens > 100000 AND outcome = 'ok'",
        ),
        (
            "cached input tokens",
            "SELECT COUNT(*) FROM audit_logs WHERE cached_tokens > 0",
        ),
        (
            "reasoning tokens",
            "SELECT COUNT(*) FROM audit_logs WHERE reasoning_tokens > 0",
        ),
        (
            "an unknown model at the fallback price",
            "SELECT COUNT(*) FROM audit_logs WHERE cost_status = 'fallback'",
        ),
    ] {
        assert!(count(sql) > 0, "no {what} in the audit log\n{context}");
    }
    let report = chain::verify(&conn, None).unwrap();
    assert_eq!(report.first_break, None, "{context}");
    assert_eq!(report.rows, u64::try_from(rows).unwrap(), "{context}");
}
