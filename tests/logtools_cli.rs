#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The built `llm-audit verify`, `export` and `prune` on audit logs written by the real store
//! (DESIGN §3, §4): every kind of tampering is named at the right row with the right exit code
//! (altered, deleted in the middle or at the tail, inserted, reordered, forged without the chain
//! key, rewritten with a recomputed hash); unusable inputs exit 2 and never create a file;
//! `export` gives every column of every row exactly, in JSON lines and in CSV, filtered by time,
//! in flat memory and quietly into a closed pipe; `prune` deletes exactly the old prefix, keeps
//! the rest verifiable from its checkpoint (also after new records, twice, and down to nothing),
//! and refuses a tampered log; a million chained rows verify quickly in bounded memory.

mod support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use llm_audit::AuditRecord;
use llm_audit::audit::record::{CostStatus, Outcome, UsageSource};
use llm_audit::config::{HumanDuration, Secret, StoreConfig};
use llm_audit::store::chain::{self, GENESIS};
use llm_audit::store::{Store, schema};
use llm_audit::telemetry::Metrics;
use rusqlite::{Connection, OptionalExtension as _};
use serde_json::value::RawValue;

use support::{llm_audit, wait_sampling_peak_rss};

/// The chain key of the keyed logs; the forger does not have it.
const CHAIN_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0-chain";
/// Peak resident memory allowed to `verify` and `export` on the large logs.
const RSS_LIMIT_KB: u64 = 60 * 1024;

// ── Running the binary ──────────────────────────────────────────────────────────────────────

/// What a finished command left.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let out = llm_audit().args(args).output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn verify(db: &Path, key: Option<&Path>) -> Run {
    let mut args: Vec<&OsStr> = vec!["verify".as_ref(), "--db".as_ref(), db.as_os_str()];
    if let Some(k) = key {
        args.extend(["--chain-key-file".as_ref(), k.as_os_str()]);
    }
    run(&args)
}

fn export(db: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<&OsStr> = vec!["export".as_ref(), "--db".as_ref(), db.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    run(&args)
}

fn prune(db: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<&OsStr> = vec!["prune".as_ref(), "--db".as_ref(), db.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    run(&args)
}

#[track_caller]
fn assert_intact(run: &Run, rows: &str) {
    assert_eq!(run.code, Some(0), "{run:#?}");
    let want = format!("intact: {rows} rows verified in ");
    assert!(
        run.stdout.lines().any(|l| l.starts_with(&want)),
        "expected {want:?}: {run:#?}"
    );
    assert!(!run.stdout.contains("TAMPERED"), "{run:#?}");
}

/// Exit 1 and the headline `TAMPERED at row <row> (request_id <id>): <detail>…`.
#[track_caller]
fn assert_tampered(run: &Run, row: i64, request_id: Option<&str>, detail: &str) {
    assert_eq!(run.code, Some(1), "{run:#?}");
    let headline = run
        .stdout
        .lines()
        .find(|l| l.starts_with("TAMPERED at row "))
        .unwrap_or_else(|| panic!("no TAMPERED line: {run:#?}"));
    let want = match request_id {
        Some(r) => format!("TAMPERED at row {row} (request_id {r}): {detail}"),
        None => format!("TAMPERED at row {row}: {detail}"),
    };
    assert!(
        headline.starts_with(&want),
        "expected {want:?}, got {headline:?}\n{run:#?}"
    );
    assert!(!run.stdout.contains("intact:"), "{run:#?}");
}

#[track_caller]
fn assert_could_not_check(run: &Run, needle: &str) {
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.starts_with("error: ") && run.stderr.contains(needle),
        "expected {needle:?} on stderr: {run:#?}"
    );
    assert!(run.stdout.is_empty(), "{run:#?}");
}

/// A finished command with its child's peak resident set.
struct Measured {
    status: ExitStatus,
    took: Duration,
    peak_kb: u64,
    /// Lines and bytes written to stdout.
    lines: u64,
    bytes: u64,
    /// The first and last line of stdout.
    first: String,
    last: String,
    stderr: String,
}

/// Runs `cmd`, reading its stdout as it comes (counting, keeping the first and last line) and
/// sampling the child's peak resident set ([`wait_sampling_peak_rss`]).
fn measured(cmd: &mut Command) -> Measured {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(1 << 20, stdout);
        let (mut lines, mut bytes) = (0u64, 0u64);
        let (mut first, mut last) = (String::new(), String::new());
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line).unwrap();
            if n == 0 {
                break;
            }
            lines += 1;
            bytes += n as u64;
            if lines == 1 {
                first = String::from_utf8_lossy(&line).into_owned();
            }
            last.clear();
            last.push_str(&String::from_utf8_lossy(&line));
        }
        (lines, bytes, first, last)
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let (status, peak_kb) = wait_sampling_peak_rss(&mut child);
    let took = started.elapsed();
    let (lines, bytes, first, last) = reader.join().unwrap();
    Measured {
        status,
        took,
        peak_kb,
        lines,
        bytes,
        first,
        last,
        stderr: err_reader.join().unwrap(),
    }
}

// ── Writing logs through the real store ─────────────────────────────────────────────────────

fn t0() -> DateTime<Utc> {
    at("2026-03-01T10:00:00Z")
}

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .with_timezone(&Utc)
}

/// Record `i` at time `when`, covering the column shapes: failures with messages, nulls,
/// awkward floats (0.1 + 0.2, thirds, tiny values), non-ASCII text, quotes, commas, tabs and
/// line breaks (for CSV and JSON escaping).
fn record(i: usize, when: DateTime<Utc>) -> AuditRecord {
    let n = i as i64;
    let failed = i % 5 == 4;
    let model = ["gpt-4.1-mini", "deepseek-chat", "my-local-llama"][i % 3];
    let prompt = 10 + (n * 37) % 900;
    let completion = if failed { 0 } else { 1 + (n * 13) % 400 };
    let pico = if i % 3 == 2 {
        0
    } else {
        prompt * 400_000 + completion * 1_600_000
    };
    let latency_ms = match i % 4 {
        0 => 0.1 + 0.2,
        1 => 100.0 + n as f64 / 3.0,
        2 => 250.0,
        _ => 1e-7 * (n as f64 + 1.0),
    };
    AuditRecord {
        timestamp: AuditRecord::format_timestamp(when),
        request_id: format!("req-{i:06}"),
        model: model.into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        latency_ms,
        status_code: if failed { 502 } else { 200 },
        cost_usd: pico as f64 / 1e12,
        user_id: (!failed).then(|| format!("user-{}", i % 4)),
        request_hash: format!("{:064x}", (i * 7919) % 1000),
        response_preview: if failed {
            String::new()
        } else {
            format!("Ответ №{i}: \"quoted\", comma;\ttab — ✓\nsecond line")
        },
        ip_address: (!i.is_multiple_of(3)).then(|| format!("10.0.0.{}", i % 250)),
        error_message: failed.then(|| {
            format!("upstream 502: {{\"error\": \"bad, \\\"gateway\\\"\"}}\r\nattempt #{i}")
        }),
        provider: "openai".into(),
        endpoint: "/v1/chat/completions".into(),
        response_model: (!failed).then(|| format!("{model}-2026-01-01")),
        response_id: (!failed).then(|| format!("chatcmpl-{i}")),
        stream: i % 2 == 1,
        finish_reason: (!failed).then(|| "stop".to_owned()),
        cached_tokens: if i % 6 == 1 { prompt / 2 } else { 0 },
        reasoning_tokens: 0,
        usage_source: if failed {
            UsageSource::Missing
        } else {
            UsageSource::Reported
        },
        cost_status: if i % 3 == 2 {
            CostStatus::Unpriced
        } else {
            CostStatus::Priced
        },
        outcome: if failed { Outcome::Error } else { Outcome::Ok },
        ttft_ms: (i % 2 == 1).then_some(12.5 + n as f64 * 0.1),
        key_id: Some("key_0123456789abcdef".into()),
        attempts: 1 + n % 2,
        trace_id: i.is_multiple_of(2).then(|| format!("{:032x}", i + 1)),
        span_id: i.is_multiple_of(2).then(|| format!("{:016x}", i + 1)),
        cost_picousd: pico,
        prev_hash: String::new(),
        record_hash: String::new(),
    }
}

/// Opens the real store on `db` (creating it), submits `records` in order, shuts down.
fn write_through_store(
    db: &Path,
    key_file: Option<&Path>,
    records: impl IntoIterator<Item = AuditRecord>,
) {
    let cfg = StoreConfig {
        path: db.to_owned(),
        flush_interval: HumanDuration(Duration::from_millis(5)),
        chain_key_file: key_file.map(Path::to_owned),
        ..StoreConfig::default()
    };
    let metrics = Arc::new(Metrics::new(1000, 200, 100_000).unwrap());
    let store = Store::open(&cfg, metrics).unwrap();
    for r in records {
        let (_, queued) = store.submit(r);
        assert!(queued.is_ok(), "record dropped: {queued:?}");
    }
    store.shutdown();
}

/// A log in its own temp dir.
struct Log {
    dir: tempfile::TempDir,
    db: PathBuf,
    /// The chain key file it was written with, if any.
    key: Option<PathBuf>,
}

impl Log {
    fn with(keyed: bool, records: Vec<AuditRecord>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let key = keyed.then(|| {
            let p = dir.path().join("chain.key");
            std::fs::write(&p, format!("{CHAIN_KEY}\n")).unwrap();
            p
        });
        write_through_store(&db, key.as_deref(), records);
        Self { dir, db, key }
    }

    /// `n` records a minute apart from [`t0`].
    fn plain(n: usize) -> Self {
        Self::with(false, minutes(0, n))
    }

    fn keyed(n: usize) -> Self {
        Self::with(true, minutes(0, n))
    }

    /// The store opened again on the same file, `records` appended.
    fn append(&self, records: Vec<AuditRecord>) {
        write_through_store(&self.db, self.key.as_deref(), records);
    }

    fn conn(&self) -> Connection {
        open(&self.db)
    }

    /// `verify` with the log's own key (if it has one).
    fn verify(&self) -> Run {
        verify(&self.db, self.key.as_deref())
    }

    /// A consistent copy (meta table and `sqlite_sequence` included).
    fn copy(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        self.conn()
            .execute("VACUUM INTO ?1", [path.to_str().unwrap()])
            .unwrap();
        path
    }
}

/// Records `from..from + n`, a minute apart from [`t0`].
fn minutes(from: usize, n: usize) -> Vec<AuditRecord> {
    (from..from + n)
        .map(|i| record(i, t0() + chrono::Duration::minutes(i as i64)))
        .collect()
}

// ── Tampering by hand ───────────────────────────────────────────────────────────────────────

fn open(db: &Path) -> Connection {
    let conn = Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

fn read(conn: &Connection, id: i64) -> AuditRecord {
    conn.query_row(
        &format!("{} WHERE id = ?1", schema::select_sql()),
        [id],
        schema::from_row,
    )
    .unwrap()
    .1
}

/// `request_id` of row `id` (read directly: the row may no longer read back as a record).
fn request_id(conn: &Connection, id: i64) -> String {
    conn.query_row(
        "SELECT request_id FROM audit_logs WHERE id = ?1",
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

fn count(conn: &Connection) -> i64 {
    conn.query_row("SELECT COUNT(*) FROM audit_logs", [], |r| r.get(0))
        .unwrap()
}

fn ids(conn: &Connection) -> Vec<i64> {
    let mut stmt = conn
        .prepare("SELECT id FROM audit_logs ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn meta(conn: &Connection, key: &str) -> Option<String> {
    conn.query_row(
        "SELECT value FROM llm_audit_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
    .unwrap()
}

fn sqlite_seq(conn: &Connection) -> Option<i64> {
    conn.query_row(
        "SELECT seq FROM sqlite_sequence WHERE name = 'audit_logs'",
        [],
        |r| r.get(0),
    )
    .optional()
    .unwrap()
}

/// Sets the record's `record_hash` to the link a forger can compute: plain SHA-256 unless
/// given the key.
fn relink(r: &mut AuditRecord, key: Option<&Secret>) {
    r.record_hash = chain::link_hash(&r.prev_hash, &chain::canonical_bytes(r), key);
}

/// Writes `r` as row `id` (replacing it if present), every column set, without touching
/// `sqlite_sequence` unless `id` is beyond it.
fn put(conn: &Connection, id: i64, r: &AuditRecord) {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS forge_target (id INTEGER NOT NULL); \
         DELETE FROM forge_target;",
    )
    .unwrap();
    conn.execute("INSERT INTO forge_target (id) VALUES (?1)", [id])
        .unwrap();
    let slots: Vec<String> = (1..=33).map(|i| format!("?{i}")).collect();
    let sql = format!(
        "INSERT OR REPLACE INTO audit_logs (id, {}, prev_hash, record_hash) \
         VALUES ((SELECT id FROM forge_target), {})",
        schema::COLUMNS,
        slots.join(", ")
    );
    let mut stmt = conn.prepare_cached(&sql).unwrap();
    schema::insert(&mut stmt, r).unwrap();
}

/// Moves rows `from..` one id up, leaving `from` free.
fn shift_up(conn: &Connection, from: i64) {
    conn.execute("UPDATE audit_logs SET id = -id WHERE id >= ?1", [from])
        .unwrap();
    conn.execute("UPDATE audit_logs SET id = 1 - id WHERE id < 0", [])
        .unwrap();
}

fn key_secret() -> Secret {
    Secret::new(CHAIN_KEY)
}

// ── 1. verify ───────────────────────────────────────────────────────────────────────────────

#[test]
fn an_untouched_log_is_intact_and_verify_only_reads_it() {
    let log = Log::plain(12);
    let before = std::fs::read(&log.db).unwrap();
    let r = log.verify();
    assert_intact(&r, "12");
    assert!(r.stderr.is_empty(), "{r:#?}");
    assert!(
        !r.stdout.contains("checkpoint"),
        "never pruned, no checkpoint line: {r:#?}"
    );
    assert_eq!(
        std::fs::read(&log.db).unwrap(),
        before,
        "verify changed the database file"
    );

    // An empty log (the store opened, nothing recorded yet).
    let empty = Log::plain(0);
    assert_intact(&empty.verify(), "0");

    // Thousands are grouped.
    let big = Log::plain(1234);
    assert_intact(&big.verify(), "1,234");
}

#[test]
fn an_edited_field_is_named_as_altered_at_its_row() {
    let edits = [
        ("total_tokens = total_tokens + 1", 5),
        ("cost_usd = cost_usd * 2", 8),
        ("cost_picousd = 0", 2),
        ("user_id = NULL", 3),
        ("model = 'gpt-4.1-nano'", 7),
        ("error_message = NULL", 10),
        ("latency_ms = 1.0", 4),
        ("timestamp = '2026-03-01T09:00:00.000000Z'", 12),
        ("response_preview = response_preview || ' '", 1),
        ("stream = 1 - stream", 6),
    ];
    for (set, row) in edits {
        let log = Log::plain(12);
        let conn = log.conn();
        let before = read(&conn, row);
        conn.execute(&format!("UPDATE audit_logs SET {set} WHERE id = ?1"), [row])
            .unwrap();
        assert_ne!(read(&conn, row), before, "{set} changed nothing");
        let r = log.verify();
        assert_tampered(
            &r,
            row,
            Some(&request_id(&conn, row)),
            &format!(
                "altered: row {row}'s contents do not match the chain (or the chain key is wrong)"
            ),
        );
        assert!(
            r.stdout.contains(&format!(
                "{} row{} checked before the break",
                row - 1,
                if row == 2 { "" } else { "s" }
            )),
            "{set}: {r:#?}"
        );
        assert!(
            !r.stdout.contains("hint:") || row == 1,
            "no key hint past row 1"
        );
    }

    // A value no record can have is named too, not a crash.
    let log = Log::plain(12);
    let conn = log.conn();
    conn.execute("UPDATE audit_logs SET outcome = 'bogus' WHERE id = 8", [])
        .unwrap();
    assert_tampered(
        &log.verify(),
        8,
        Some(&request_id(&conn, 8)),
        "unreadable: a field holds a value no record can have",
    );
}

#[test]
fn deleted_rows_are_named_in_the_middle_at_the_start_and_at_the_tail() {
    // One row in the middle: the break is at the next row, the missing id is named.
    let log = Log::plain(12);
    let conn = log.conn();
    conn.execute("DELETE FROM audit_logs WHERE id = 6", [])
        .unwrap();
    assert_tampered(
        &log.verify(),
        7,
        Some(&request_id(&conn, 7)),
        "deleted: row 6 is missing",
    );

    // A run of rows.
    let log = Log::plain(12);
    let conn = log.conn();
    conn.execute("DELETE FROM audit_logs WHERE id BETWEEN 4 AND 6", [])
        .unwrap();
    assert_tampered(
        &log.verify(),
        7,
        Some(&request_id(&conn, 7)),
        "deleted: rows 4 to 6 are missing",
    );

    // The first row.
    let log = Log::plain(12);
    let conn = log.conn();
    conn.execute("DELETE FROM audit_logs WHERE id = 1", [])
        .unwrap();
    assert_tampered(
        &log.verify(),
        2,
        Some(&request_id(&conn, 2)),
        "deleted: row 1 is missing",
    );

    // The last rows: every remaining link holds; AUTOINCREMENT's sqlite_sequence remembers.
    let log = Log::plain(12);
    let conn = log.conn();
    assert_eq!(sqlite_seq(&conn), Some(12));
    conn.execute("DELETE FROM audit_logs WHERE id >= 10", [])
        .unwrap();
    let r = log.verify();
    assert_tampered(&r, 10, None, "deleted: rows 10 to 12 are missing");
    assert!(
        r.stdout.contains("9 rows checked before the break"),
        "{r:#?}"
    );

    let log = Log::plain(12);
    log.conn()
        .execute("DELETE FROM audit_logs WHERE id = 12", [])
        .unwrap();
    assert_tampered(&log.verify(), 12, None, "deleted: row 12 is missing");

    // Every row.
    let log = Log::plain(12);
    log.conn().execute("DELETE FROM audit_logs", []).unwrap();
    assert_tampered(&log.verify(), 1, None, "deleted: rows 1 to 12 are missing");

    // Known limit (why record_hash is also a span attribute, DESIGN §4): cutting the tail *and*
    // rewinding sqlite_sequence leaves nothing in the file to notice.
    let log = Log::plain(12);
    log.conn()
        .execute_batch(
            "DELETE FROM audit_logs WHERE id >= 10; \
             UPDATE sqlite_sequence SET seq = 9 WHERE name = 'audit_logs';",
        )
        .unwrap();
    assert_intact(&log.verify(), "9");
}

#[test]
fn inserted_and_forged_rows_are_named() {
    // A well-linked forged row squeezed in between 5 and 6 (later rows renumbered): row 7
    // (formerly 6) still names row 5 as its predecessor, so row 6 is the insertion.
    let log = Log::plain(12);
    let conn = log.conn();
    shift_up(&conn, 6);
    let mut forged = record(900, t0() + chrono::Duration::seconds(270));
    forged.request_id = "forged-6".into();
    forged.prev_hash = read(&conn, 5).record_hash;
    relink(&mut forged, None);
    put(&conn, 6, &forged);
    assert_eq!(count(&conn), 13);
    assert_tampered(
        &log.verify(),
        7,
        Some(&request_id(&conn, 7)),
        "inserted: row 6 is not part of the chain",
    );

    // The same with a made-up prev_hash: the chain goes on from row 5 further down.
    let log = Log::plain(12);
    let conn = log.conn();
    shift_up(&conn, 6);
    forged.prev_hash = "ab".repeat(32);
    relink(&mut forged, None);
    put(&conn, 6, &forged);
    assert_tampered(
        &log.verify(),
        6,
        Some("forged-6"),
        "inserted: row 6 is not part of the chain",
    );

    // A well-linked forged row put first (every row renumbered): the original first row, now
    // row 2, still starts from GENESIS, so row 1 is the insertion.
    let log = Log::plain(12);
    let conn = log.conn();
    shift_up(&conn, 1);
    let mut first = record(901, t0() - chrono::Duration::minutes(1));
    first.request_id = "forged-1".into();
    first.prev_hash = GENESIS.to_owned();
    relink(&mut first, None);
    put(&conn, 1, &first);
    assert_eq!(read(&conn, 2).prev_hash, GENESIS);
    assert_tampered(
        &log.verify(),
        2,
        Some("req-000000"),
        "inserted: row 1 is not part of the chain",
    );

    // Row 6 replaced by a forged row with the same id that links to row 5 with a valid SHA-256
    // hash: row 7 still names the original row 6, so row 6 is named (as altered: a replaced row
    // and an edited one look the same).
    let log = Log::plain(12);
    let conn = log.conn();
    conn.execute("DELETE FROM audit_logs WHERE id = 6", [])
        .unwrap();
    let mut forged = record(6, t0() + chrono::Duration::minutes(6));
    forged.total_tokens += 1000;
    forged.request_id = "forged-6".into();
    forged.prev_hash = read(&conn, 5).record_hash;
    relink(&mut forged, None);
    put(&conn, 6, &forged);
    assert_tampered(
        &log.verify(),
        7,
        Some(&request_id(&conn, 7)),
        "altered: row 6's contents do not match the chain",
    );

    // Without a chain key, a forged row appended with a valid SHA-256 link is undetectable from
    // the file alone (store.rs documents the same in process): that is what the key is for.
    let log = Log::plain(12);
    let conn = log.conn();
    let mut forged = record(12, t0() + chrono::Duration::minutes(12));
    forged.request_id = "forged-13".into();
    forged.prev_hash = read(&conn, 12).record_hash;
    relink(&mut forged, None);
    put(&conn, 13, &forged);
    assert_intact(&log.verify(), "13");

    // With a chain key the forger lacks, the same append is caught at the forged row.
    let log = Log::keyed(12);
    let conn = log.conn();
    forged.prev_hash = read(&conn, 12).record_hash;
    relink(&mut forged, None);
    put(&conn, 13, &forged);
    assert_tampered(
        &log.verify(),
        13,
        Some("forged-13"),
        "altered: row 13's contents do not match the chain",
    );

    // And a row replaced in the middle of a keyed log, linked to its predecessor with SHA-256,
    // is caught at itself.
    let log = Log::keyed(12);
    let conn = log.conn();
    conn.execute("DELETE FROM audit_logs WHERE id = 6", [])
        .unwrap();
    // Same request_id as the row it replaces (req-000005): UNIQUE would refuse another.
    let mut forged = record(5, t0() + chrono::Duration::minutes(5));
    forged.cost_usd = 0.0;
    forged.cost_picousd = 0;
    forged.prev_hash = read(&conn, 5).record_hash;
    relink(&mut forged, None);
    put(&conn, 6, &forged);
    assert_tampered(
        &log.verify(),
        6,
        Some("req-000005"),
        "altered: row 6's contents do not match the chain",
    );
}

/// Exchanges every column but `id` between rows `a` and `b`.
fn swap(conn: &Connection, a: i64, b: i64) {
    let (ra, rb) = (read(conn, a), read(conn, b));
    conn.execute("DELETE FROM audit_logs WHERE id IN (?1, ?2)", [a, b])
        .unwrap();
    put(conn, a, &rb);
    put(conn, b, &ra);
}

#[test]
fn swapped_rows_are_named_as_reordered() {
    let log = Log::plain(12);
    let conn = log.conn();
    swap(&conn, 4, 8);
    assert_eq!(request_id(&conn, 4), "req-000007");
    assert_eq!(count(&conn), 12);
    assert_tampered(
        &log.verify(),
        4,
        Some("req-000007"),
        "reordered: the row links to row 7, which comes after it",
    );

    // Neighbours.
    let log = Log::plain(12);
    let conn = log.conn();
    swap(&conn, 5, 6);
    assert_tampered(
        &log.verify(),
        5,
        Some("req-000005"),
        "reordered: the row links to row 6, which comes after it",
    );

    // In a keyed log too.
    let log = Log::keyed(12);
    let conn = log.conn();
    swap(&conn, 2, 11);
    assert_tampered(
        &log.verify(),
        2,
        Some("req-000010"),
        "reordered: the row links to row 10, which comes after it",
    );
}

#[test]
fn a_chain_key_is_needed_to_verify_and_to_forge() {
    let log = Log::keyed(12);
    let key = log.key.clone().unwrap();
    assert_intact(&verify(&log.db, Some(&key)), "12");

    // Without the key: the first row fails, with the hint.
    let r = verify(&log.db, None);
    assert_tampered(&r, 1, Some("req-000000"), "altered: row 1's");
    assert!(
        r.stdout
            .contains("hint: if this log was written with a chain key, pass --chain-key-file"),
        "{r:#?}"
    );

    // With the wrong key: the first row fails (no hint: a key was given).
    let wrong = log.dir.path().join("wrong.key");
    std::fs::write(&wrong, "not-the-key\n").unwrap();
    let r = verify(&log.db, Some(&wrong));
    assert_tampered(
        &r,
        1,
        Some("req-000000"),
        "altered: row 1's contents do not match the chain (or the chain key is wrong)",
    );
    assert!(!r.stdout.contains("hint:"), "{r:#?}");

    // The key file is read like the store reads it: a missing trailing newline is the same key.
    let bare = log.dir.path().join("bare.key");
    std::fs::write(&bare, CHAIN_KEY).unwrap();
    assert_intact(&verify(&log.db, Some(&bare)), "12");

    // A plain log checked with a key fails too.
    let plain = Log::plain(3);
    assert_tampered(
        &verify(&plain.db, Some(&key)),
        1,
        Some("req-000000"),
        "altered: row 1's",
    );

    // The forger edits row 5 and re-links it and every later row consistently, with SHA-256
    // (the best they can do without the key): the key catches row 5, the first rewritten one.
    let copy = log.copy("rechained.db");
    let conn = open(&copy);
    let mut prev = read(&conn, 4).record_hash;
    for id in 5..=12 {
        let mut r = read(&conn, id);
        if id == 5 {
            r.cost_usd /= 10.0;
            r.cost_picousd /= 10;
        }
        r.prev_hash = prev;
        relink(&mut r, None);
        prev = r.record_hash.clone();
        put(&conn, id, &r);
    }
    assert_eq!(sqlite_seq(&conn), Some(12));
    assert_tampered(
        &verify(&copy, Some(&key)),
        5,
        Some("req-000004"),
        "altered: row 5's contents do not match the chain",
    );

    // Re-linking the whole log from GENESIS with SHA-256 makes a chain that verifies without
    // the key, and the key still rejects it at row 1.
    let copy = log.copy("rechained-all.db");
    let conn = open(&copy);
    let mut prev = GENESIS.to_owned();
    for id in 1..=12 {
        let mut r = read(&conn, id);
        if id == 7 {
            r.total_tokens = 1;
        }
        r.prev_hash = prev;
        relink(&mut r, None);
        prev = r.record_hash.clone();
        put(&conn, id, &r);
    }
    assert_intact(&verify(&copy, None), "12");
    assert_tampered(
        &verify(&copy, Some(&key)),
        1,
        Some("req-000000"),
        "altered: row 1's",
    );

    // Only the key holder can re-link: with the key, the same rewrite verifies (so the key must
    // be kept from whoever can write the database).
    let copy = log.copy("rechained-with-key.db");
    let conn = open(&copy);
    let secret = key_secret();
    let mut r = read(&conn, 12);
    r.total_tokens = 1;
    relink(&mut r, Some(&secret));
    put(&conn, 12, &r);
    assert_intact(&verify(&copy, Some(&key)), "12");
}

#[test]
fn a_row_rewritten_with_its_hash_recomputed_is_named_as_altered() {
    // Row 5 edited and its record_hash recomputed (no key needed for a plain log); row 6 still
    // names the original hash, so the break is at row 6 and row 5 is the altered one.
    let log = Log::plain(12);
    let conn = log.conn();
    let mut r = read(&conn, 5);
    r.total_tokens += 1;
    relink(&mut r, None);
    put(&conn, 5, &r);
    assert_tampered(
        &log.verify(),
        6,
        Some("req-000005"),
        "altered: row 5's contents do not match the chain",
    );

    // The first row.
    let log = Log::plain(12);
    let conn = log.conn();
    let mut r = read(&conn, 1);
    r.user_id = Some("someone-else".into());
    relink(&mut r, None);
    put(&conn, 1, &r);
    assert_tampered(
        &log.verify(),
        2,
        Some("req-000001"),
        "altered: row 1's contents do not match the chain",
    );

    // The last row of a keyed log: recomputing with SHA-256 does not help.
    let log = Log::keyed(12);
    let conn = log.conn();
    let mut r = read(&conn, 12);
    r.error_message = None;
    relink(&mut r, None);
    put(&conn, 12, &r);
    assert_tampered(
        &log.verify(),
        12,
        Some("req-000011"),
        "altered: row 12's contents do not match the chain",
    );
}

#[test]
fn unusable_inputs_exit_2_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let listing = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    // A missing file: every command says so and none creates it.
    let missing = dir.path().join("nope.db");
    assert_could_not_check(&verify(&missing, None), "no audit log at");
    assert_could_not_check(&export(&missing, &[]), "no audit log at");
    assert_could_not_check(
        &prune(&missing, &["--older-than", "90d"]),
        "no audit log at",
    );
    assert_could_not_check(
        &prune(&missing, &["--older-than", "90d", "--dry-run"]),
        "no audit log at",
    );
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));

    // The default --db (./llm-audit.db) in an empty directory.
    let r = llm_audit()
        .arg("verify")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("no audit log at llm-audit.db"),
        "{r:?}"
    );
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));

    // Not SQLite.
    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "this is not a database, just some notes\n".repeat(200),
    )
    .unwrap();
    let before = std::fs::read(&text).unwrap();
    assert_could_not_check(&verify(&text, None), "is not an llm-audit database");
    assert_could_not_check(&export(&text, &[]), "is not an llm-audit database");
    assert_could_not_check(
        &prune(&text, &["--older-than", "1d"]),
        "is not an llm-audit database",
    );
    assert_eq!(std::fs::read(&text).unwrap(), before);

    // SQLite without audit_logs (and an empty file, which SQLite takes as an empty database).
    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
        .unwrap();
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    for db in [&other, &empty] {
        assert_could_not_check(&verify(db, None), "no audit_logs table");
        assert_could_not_check(&export(db, &[]), "no audit_logs table");
        assert_could_not_check(&prune(db, &["--older-than", "1d"]), "no audit_logs table");
    }
    let conn = Connection::open(&other).unwrap();
    let tables: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        tables, 1,
        "prune must not add its tables to a foreign database"
    );

    // An unreadable chain key file: missing, or a directory.
    let log = Log::keyed(3);
    let gone = log.dir.path().join("gone.key");
    assert_could_not_check(
        &verify(&log.db, Some(&gone)),
        "cannot read the chain key file",
    );
    assert_could_not_check(
        &verify(&log.db, Some(log.dir.path())),
        "cannot read the chain key file",
    );
    let r = run(&[
        OsStr::new("prune"),
        OsStr::new("--db"),
        log.db.as_os_str(),
        OsStr::new("--older-than"),
        OsStr::new("1d"),
        OsStr::new("--chain-key-file"),
        gone.as_os_str(),
    ]);
    assert_could_not_check(&r, "cannot read the chain key file");
    assert_eq!(count(&log.conn()), 3);

    // Bad arguments are usage errors (clap's exit 2).
    let r = prune(&log.db, &["--older-than", "ninety days"]);
    assert_eq!(r.code, Some(2), "{r:#?}");
    let r = export(&log.db, &["--since", "yesterday-ish"]);
    assert_eq!(r.code, Some(2), "{r:#?}");
    assert!(r.stderr.contains("is not a time"), "{r:#?}");
}

// ── 2. export ───────────────────────────────────────────────────────────────────────────────

/// Every row of the table as `(column names, rows of values)`, read by rusqlite.
type Table = (Vec<String>, Vec<Vec<rusqlite::types::Value>>);

fn table(conn: &Connection, filter: &str) -> Table {
    let mut stmt = conn
        .prepare(&format!("SELECT * FROM audit_logs {filter} ORDER BY id"))
        .unwrap();
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let n = names.len();
    let rows = stmt
        .query_map([], |row| {
            (0..n)
                .map(|i| row.get::<_, rusqlite::types::Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (names, rows)
}

/// Checks one JSON line against the row, exactly: integers as integers, floats to the bit
/// (read from the raw number text, not through a lossy float parser), nulls as null.
#[track_caller]
fn assert_json_row(line: &str, names: &[String], row: &[rusqlite::types::Value]) {
    use rusqlite::types::Value;
    let obj: BTreeMap<String, Box<RawValue>> = serde_json::from_str(line).unwrap();
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        {
            let mut k: Vec<&String> = names.iter().collect();
            k.sort();
            k
        },
        "columns of {line}"
    );
    for (name, value) in names.iter().zip(row) {
        let raw = obj[name].get();
        match value {
            Value::Null => assert_eq!(raw, "null", "{name} in {line}"),
            Value::Integer(i) => assert_eq!(raw, i.to_string(), "{name} in {line}"),
            Value::Real(f) => {
                let got: f64 = raw.parse().unwrap();
                assert_eq!(got.to_bits(), f.to_bits(), "{name}: {raw} vs {f:?}");
            }
            Value::Text(t) => {
                assert_eq!(&serde_json::from_str::<String>(raw).unwrap(), t, "{name}")
            }
            Value::Blob(b) => panic!("{name}: unexpected blob {b:?}"),
        }
    }
}

#[test]
fn export_jsonl_has_every_column_of_every_row_exactly() {
    let log = Log::plain(24);
    let (names, rows) = table(&log.conn(), "");
    assert_eq!(
        names.len(),
        35,
        "id, the 31 chained columns, created_at, the two hashes"
    );
    assert_eq!(rows.len(), 24);

    let r = export(&log.db, &[]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stderr.is_empty(), "{r:#?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), rows.len());
    assert!(r.stdout.ends_with('\n'));
    for (line, row) in lines.iter().zip(&rows) {
        assert_json_row(line, &names, row);
    }
    // `--format jsonl` is the default.
    assert_eq!(export(&log.db, &["--format", "jsonl"]).stdout, r.stdout);

    // The shapes the fixture promises really are in the export.
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["latency_ms"], serde_json::json!(0.30000000000000004));
    assert_eq!(first["user_id"], serde_json::json!("user-0"));
    assert_eq!(first["ttft_ms"], serde_json::Value::Null);
    let failed: serde_json::Value = serde_json::from_str(lines[4]).unwrap();
    assert_eq!(failed["user_id"], serde_json::Value::Null);
    assert!(
        failed["error_message"]
            .as_str()
            .unwrap()
            .contains("\"gateway\\\"")
    );
    assert_eq!(failed["stream"], serde_json::json!(0));
    assert_eq!(failed["prev_hash"].as_str().unwrap().len(), 64);

    // An empty log exports nothing, successfully.
    let empty = Log::plain(0);
    let r = export(&empty.db, &[]);
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), ""), "{r:#?}");
    let r = export(&empty.db, &["--format", "csv"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(r.stdout.lines().count(), 1, "just the header: {r:#?}");
}

#[test]
fn export_since_and_until_select_by_timestamp() {
    // 40 records, 6 hours apart, over 10 days from 2026-03-01T10:00Z.
    let recs: Vec<AuditRecord> = (0..40)
        .map(|i| record(i, t0() + chrono::Duration::hours(6 * i as i64)))
        .collect();
    let stamps: Vec<String> = recs.iter().map(|r| r.timestamp.clone()).collect();
    let log = Log::with(false, recs);
    let conn = log.conn();

    let exported = |args: &[&str]| -> Vec<String> {
        let r = export(&log.db, args);
        assert_eq!(r.code, Some(0), "{args:?}: {r:#?}");
        r.stdout
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["timestamp"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let expect = |since: &str, until: Option<&str>| -> Vec<String> {
        stamps
            .iter()
            .filter(|s| s.as_str() >= since && until.is_none_or(|u| s.as_str() < u))
            .cloned()
            .collect()
    };

    let got = exported(&["--since", "2026-03-04"]);
    assert_eq!(got, expect("2026-03-04T00:00:00.000000Z", None));
    assert_eq!(got.len(), 29, "from 2026-03-04T04:00Z on");

    // At a record's exact timestamp: included by --since, excluded by --until.
    let got = exported(&[
        "--since",
        "2026-03-02T10:00:00Z",
        "--until",
        "2026-03-03T10:00:00Z",
    ]);
    assert_eq!(
        got,
        expect(
            "2026-03-02T10:00:00.000000Z",
            Some("2026-03-03T10:00:00.000000Z")
        )
    );
    assert_eq!(got.len(), 4);
    assert_eq!(got[0], "2026-03-02T10:00:00.000000Z");

    // An offset is converted to UTC.
    let got = exported(&["--since", "2026-03-05T12:00:00+02:00"]);
    assert_eq!(got, expect("2026-03-05T10:00:00.000000Z", None));

    // --until alone, and the CSV form of the same filter.
    let got = exported(&["--until", "2026-03-02"]);
    assert_eq!(got, expect("", Some("2026-03-02T00:00:00.000000Z")));
    assert_eq!(got.len(), 3);
    let r = export(&log.db, &["--until", "2026-03-02", "--format", "csv"]);
    let mut rdr = csv::Reader::from_reader(r.stdout.as_bytes());
    assert_eq!(rdr.records().count(), 3);

    // Nothing in the period.
    assert!(exported(&["--since", "2027-01-01"]).is_empty());

    // A duration ago, on records written relative to now.
    let now = Utc::now();
    let recent: Vec<AuditRecord> = (0..10)
        .map(|i| {
            let mut r = record(100 + i, now - chrono::Duration::hours(12 + 24 * i as i64));
            r.request_id = format!("recent-{i}");
            r
        })
        .rev()
        .collect();
    log.append(recent);
    let got = exported(&["--since", "3d"]);
    assert_eq!(got.len(), 3, "12 h, 36 h and 60 h ago: {got:?}");
    let (_, rows) = table(&conn, "WHERE request_id LIKE 'recent-%'");
    assert_eq!(rows.len(), 10);
}

/// Checks one CSV record against the row: empty for null, integers in decimal, floats to the
/// bit, text verbatim.
#[track_caller]
fn assert_csv_row(rec: &csv::StringRecord, names: &[String], row: &[rusqlite::types::Value]) {
    use rusqlite::types::Value;
    assert_eq!(rec.len(), names.len());
    for ((name, value), cell) in names.iter().zip(row).zip(rec.iter()) {
        match value {
            Value::Null => assert_eq!(cell, "", "{name}"),
            Value::Integer(i) => assert_eq!(cell, i.to_string(), "{name}"),
            Value::Real(f) => {
                let got: f64 = cell.parse().unwrap();
                assert_eq!(got.to_bits(), f.to_bits(), "{name}: {cell} vs {f:?}");
            }
            Value::Text(t) => assert_eq!(cell, t, "{name}"),
            Value::Blob(b) => panic!("{name}: unexpected blob {b:?}"),
        }
    }
}

/// A minimal RFC 4180 reader, independent of the `csv` crate: quoted fields with doubled quotes
/// and embedded separators and line breaks; records end at CRLF or LF outside quotes.
fn rfc4180(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            _ => field.push(c),
        }
    }
    assert!(!quoted, "unterminated quoted field");
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    records
}

#[test]
fn export_csv_parses_back_to_every_column() {
    let log = Log::plain(24);
    let (names, rows) = table(&log.conn(), "");
    let r = export(&log.db, &["--format", "csv"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stderr.is_empty(), "{r:#?}");

    // The header is every column name, in table order.
    assert_eq!(r.stdout.lines().next().unwrap(), names.join(","));

    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(r.stdout.as_bytes());
    let header: Vec<String> = rdr.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(header, names);
    let recs: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(recs.len(), rows.len());
    for (rec, row) in recs.iter().zip(&rows) {
        assert_csv_row(rec, &names, row);
    }

    // The independent reader agrees, line breaks inside fields and all.
    let parsed = rfc4180(&r.stdout);
    assert_eq!(parsed.len(), rows.len() + 1);
    assert_eq!(parsed[0], names);
    for (p, rec) in parsed[1..].iter().zip(&recs) {
        assert_eq!(p, &rec.iter().map(str::to_owned).collect::<Vec<_>>());
    }
    let preview = names.iter().position(|n| n == "response_preview").unwrap();
    assert_eq!(
        parsed[1][preview],
        "Ответ №0: \"quoted\", comma;\ttab — ✓\nsecond line"
    );
    let error = names.iter().position(|n| n == "error_message").unwrap();
    assert!(
        parsed[5][error].ends_with("\r\nattempt #4"),
        "{:?}",
        parsed[5]
    );
}

#[test]
fn export_into_a_closed_pipe_exits_0_quietly() {
    // About 2 MB of output: far more than a pipe holds, so the writes after `head` quits fail.
    let log = Log::with(false, minutes(0, 2000));
    for format in ["jsonl", "csv"] {
        let mut child = llm_audit()
            .args(["export", "--format", format, "--db"])
            .arg(&log.db)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        drop(out);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        if format == "jsonl" {
            assert!(first.starts_with('{'), "{first}");
        } else {
            assert!(first.starts_with("id,timestamp,"), "{first}");
        }
        assert_eq!(
            status.code(),
            Some(0),
            "`export --format {format} | head -1` failed: {stderr}"
        );
        assert!(stderr.is_empty(), "{format}: {stderr}");
    }
}

// ── Large logs, written with the writer's own code ──────────────────────────────────────────

/// Row `i` of a bulk log: realistic sizes, a few shapes.
fn bulk_record(i: usize, when: DateTime<Utc>) -> AuditRecord {
    const MODELS: [&str; 5] = [
        "gpt-4.1",
        "gpt-4.1-mini",
        "deepseek-chat",
        "gemini-2.5-flash",
        "llama-3.3-70b-instruct",
    ];
    let n = i as i64;
    let failed = i % 25 == 3;
    let model = MODELS[i % MODELS.len()];
    let prompt = 20 + (n * 7919) % 4000;
    let completion = if failed { 0 } else { 1 + (n * 104_729) % 800 };
    let cost = prompt * 1_500_000 + completion * 6_000_000;
    AuditRecord {
        timestamp: AuditRecord::format_timestamp(when),
        request_id: format!("bulk-{i:08}"),
        model: model.into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        latency_ms: 50.0 + (n * 37 % 20_000) as f64 / 10.0,
        status_code: if failed { 500 } else { 200 },
        cost_usd: cost as f64 / 1e12,
        user_id: Some(format!("user-{}", i % 500)),
        request_hash: format!("{:064x}", (i * 31) % 200_000),
        response_preview: if failed {
            String::new()
        } else {
            "The capital of France is Paris. It has been the capital since".into()
        },
        ip_address: Some(format!("10.0.{}.{}", i % 256, (i / 256) % 256)),
        error_message: failed
            .then(|| "The server had an error while processing your request.".to_owned()),
        provider: "openai".into(),
        endpoint: "/v1/chat/completions".into(),
        response_model: Some(model.into()),
        response_id: Some(format!("chatcmpl-{i}")),
        stream: i.is_multiple_of(2),
        finish_reason: (!failed).then(|| "stop".to_owned()),
        cached_tokens: 0,
        reasoning_tokens: 0,
        usage_source: if failed {
            UsageSource::Missing
        } else {
            UsageSource::Reported
        },
        cost_status: CostStatus::Priced,
        outcome: if failed { Outcome::Error } else { Outcome::Ok },
        ttft_ms: None,
        key_id: Some("key_0123456789abcdef".into()),
        attempts: 1,
        trace_id: None,
        span_id: None,
        cost_picousd: cost,
        prev_hash: String::new(),
        record_hash: String::new(),
    }
}

/// Appends `n` bulk rows to the log at `db` (whose schema the real store created), timestamps
/// `first + i × step`, linked exactly as the store links them — `canonical_bytes` (which does not
/// depend on the link, so a second thread computes it ahead), then `link_hash` from the log's
/// current last hash — and inserted with the writer's `schema::insert`, in one transaction.
fn append_bulk(db: &Path, n: usize, first: DateTime<Utc>, step: chrono::Duration) -> Duration {
    const CHUNK: usize = 4096;
    let started = Instant::now();
    let mut conn = open(db);
    schema::prepare(&conn, false).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    conn.pragma_update(None, "cache_size", -131_072).unwrap();
    let mut prev = chain::last_hash(&conn).unwrap();
    // A bulk load: no journal, and the indexes built once at the end rather than row by row
    // (both put back by the same `prepare` afterwards).
    conn.pragma_update(None, "journal_mode", "OFF").unwrap();
    conn.execute_batch(
        "DROP INDEX idx_timestamp; DROP INDEX idx_model; DROP INDEX idx_request_hash; \
         DROP INDEX idx_user_id;",
    )
    .unwrap();
    let tx = conn.transaction().unwrap();
    std::thread::scope(|s| {
        let (send, recv) = std::sync::mpsc::sync_channel::<Vec<(AuditRecord, String)>>(8);
        s.spawn(move || {
            for from in (0..n).step_by(CHUNK) {
                let chunk = (from..(from + CHUNK).min(n))
                    .map(|i| {
                        let r = bulk_record(i, first + step * i as i32);
                        let bytes = chain::canonical_bytes(&r);
                        (r, bytes)
                    })
                    .collect();
                if send.send(chunk).is_err() {
                    return;
                }
            }
        });
        let mut stmt = tx.prepare_cached(&schema::insert_sql()).unwrap();
        for chunk in recv {
            for (mut r, bytes) in chunk {
                r.record_hash = chain::link_hash(&prev, &bytes, None);
                r.prev_hash = prev;
                schema::insert(&mut stmt, &r).unwrap();
                prev = r.record_hash;
            }
        }
    });
    tx.commit().unwrap();
    schema::prepare(&conn, false).unwrap();
    started.elapsed()
}

/// A log whose first 3 records went through the real store and the next `n` through
/// [`append_bulk`], a second apart from 2026-01-01.
fn bulk_log(n: usize) -> (Log, Duration) {
    let log = Log::with(
        false,
        (0..3)
            .map(|i| {
                record(
                    i,
                    at("2025-12-31T23:59:00Z") + chrono::Duration::seconds(i as i64),
                )
            })
            .collect(),
    );
    let took = append_bulk(
        &log.db,
        n,
        at("2026-01-01T00:00:00Z"),
        chrono::Duration::seconds(1),
    );
    (log, took)
}

#[test]
fn export_streams_a_large_log_in_flat_memory() {
    const ROWS: usize = 300_000;
    let (log, generated) = bulk_log(ROWS);
    let total = ROWS as u64 + 3;
    for format in ["jsonl", "csv"] {
        let mut cmd = llm_audit();
        cmd.args(["export", "--format", format, "--db"])
            .arg(&log.db);
        let m = measured(&mut cmd);
        eprintln!(
            "logtools_cli export: {ROWS} rows generated in {:.1} s; `export --format {format}` \
             wrote {} lines ({:.0} MB) in {:.1} s with a peak RSS of {:.1} MB",
            generated.as_secs_f64(),
            m.lines,
            m.bytes as f64 / 1e6,
            m.took.as_secs_f64(),
            m.peak_kb as f64 / 1024.0
        );
        assert!(m.status.success(), "export failed: {}", m.stderr);
        assert!(m.stderr.is_empty(), "{}", m.stderr);
        // CSV adds its header, and keeps the line break inside the response preview of each
        // of the 3 records from the store (JSON escapes it).
        let extra = if format == "csv" { 1 + 3 } else { 0 };
        assert_eq!(m.lines, total + extra);
        assert!(
            m.last.contains(&format!("bulk-{:08}", ROWS - 1)),
            "{}",
            m.last
        );
        if format == "jsonl" {
            assert!(
                m.first.contains("\"request_id\":\"req-000000\""),
                "{}",
                m.first
            );
        }
        assert!(m.peak_kb > 0, "no VmHWM sample");
        assert!(
            m.peak_kb < RSS_LIMIT_KB,
            "export --format {format} used {} kB over {total} rows",
            m.peak_kb
        );
    }
}

// ── 3. prune ────────────────────────────────────────────────────────────────────────────────

/// 200 records one day apart, from 199.5 days ago to half a day ago (so no record is within
/// 12 hours of a whole-day cutoff), written in time order through the store.
fn two_hundred_days(keyed: bool) -> (Log, DateTime<Utc>) {
    let now = Utc::now();
    let recs = (0..200)
        .map(|i| {
            record(
                i,
                now - chrono::Duration::hours(12) - chrono::Duration::days(199 - i as i64),
            )
        })
        .collect();
    (Log::with(keyed, recs), now)
}

/// How many of the 200 records are older than `days`.
fn older_than(days: i64) -> i64 {
    // Record i is 199.5 - i days old.
    (0..200).filter(|i| 199.5 - *i as f64 > days as f64).count() as i64
}

#[test]
fn prune_deletes_the_old_prefix_and_the_rest_still_verifies() {
    let (log, now) = two_hundred_days(false);
    let conn = log.conn();
    let gone = older_than(90);
    assert_eq!(gone, 110);
    let anchor = read(&conn, gone).record_hash;
    let last_hash = read(&conn, 200).record_hash;

    // A dry run says how many and deletes nothing.
    let r = prune(&log.db, &["--older-than", "90d", "--dry-run"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(
        r.stdout.starts_with(&format!(
            "would delete {gone} rows (ids up to {gone}, older than "
        )),
        "{r:#?}"
    );
    assert_eq!(count(&conn), 200);
    assert_eq!(meta(&conn, schema::CHAIN_START_AFTER), None);
    assert_eq!(meta(&conn, schema::PRUNED_AT), None);

    // The real thing: exactly the rows older than the cutoff, a prefix.
    let r = prune(&log.db, &["--older-than", "90d"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(
        r.stdout
            .starts_with(&format!("pruned {gone} rows older than ")),
        "{r:#?}"
    );
    assert!(
        r.stdout.contains(&format!(
            "(ids up to {gone}); the chain now starts after row {gone}"
        )),
        "{r:#?}"
    );
    assert_eq!(ids(&conn), (gone + 1..=200).collect::<Vec<_>>());
    let cutoff = AuditRecord::format_timestamp(now - chrono::Duration::days(90));
    let old_left: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM audit_logs WHERE timestamp < ?1",
            [&cutoff],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old_left, 0);
    assert_eq!(
        meta(&conn, schema::CHAIN_START_AFTER),
        Some(gone.to_string())
    );
    assert_eq!(meta(&conn, schema::CHAIN_ANCHOR), Some(anchor.clone()));
    let pruned_at = meta(&conn, schema::PRUNED_AT).unwrap();
    assert!(
        pruned_at >= AuditRecord::format_timestamp(now),
        "{pruned_at}"
    );

    // verify starts from the checkpoint and says so.
    let r = log.verify();
    assert_intact(&r, "90");
    assert_eq!(
        r.stdout.lines().next().unwrap(),
        format!(
            "checkpoint: rows up to id {gone} were pruned on {pruned_at}; the chain resumes from \
             record hash {anchor}"
        )
    );

    // A tampered row after pruning is still found, and so is a deleted first kept row.
    let copy = log.copy("edited.db");
    open(&copy)
        .execute(
            "UPDATE audit_logs SET total_tokens = total_tokens + 1 WHERE id = 150",
            [],
        )
        .unwrap();
    let r = verify(&copy, None);
    assert_tampered(&r, 150, Some("req-000149"), "altered: row 150's");
    assert!(r.stdout.contains("pruned on"), "{r:#?}");
    let copy = log.copy("first-kept-gone.db");
    open(&copy)
        .execute("DELETE FROM audit_logs WHERE id = ?1", [gone + 1])
        .unwrap();
    assert_tampered(
        &verify(&copy, None),
        gone + 2,
        Some(&format!("req-{:06}", gone + 1)),
        &format!("deleted: row {} is missing", gone + 1),
    );
    // The first kept row edited: it no longer hashes from the anchor.
    let copy = log.copy("first-kept-edited.db");
    open(&copy)
        .execute(
            "UPDATE audit_logs SET total_tokens = 7 WHERE id = ?1",
            [gone + 1],
        )
        .unwrap();
    assert_tampered(
        &verify(&copy, None),
        gone + 1,
        Some(&format!("req-{gone:06}")),
        &format!("altered: row {}'s", gone + 1),
    );

    // New records after pruning (the store opened again) continue the chain.
    let fresh: Vec<AuditRecord> = (0..5)
        .map(|i| {
            let mut r = record(300 + i, Utc::now());
            r.request_id = format!("after-prune-{i}");
            r
        })
        .collect();
    log.append(fresh);
    assert_eq!(read(&conn, 201).prev_hash, last_hash);
    assert_eq!(read(&conn, 201).request_id, "after-prune-0");
    assert_intact(&log.verify(), "95");

    // Pruning again moves the checkpoint on.
    let more = older_than(30) - gone;
    assert_eq!(more, 60);
    let anchor = read(&conn, gone + more).record_hash;
    let r = prune(&log.db, &["--older-than", "30d"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(
        r.stdout.starts_with(&format!("pruned {more} rows")),
        "{r:#?}"
    );
    assert_eq!(
        meta(&conn, schema::CHAIN_START_AFTER),
        Some((gone + more).to_string())
    );
    assert_eq!(meta(&conn, schema::CHAIN_ANCHOR), Some(anchor));
    assert_eq!(count(&conn), 35);
    let r = log.verify();
    assert_intact(&r, "35");
    assert!(
        r.stdout.contains(&format!(
            "checkpoint: rows up to id {} were pruned on",
            gone + more
        )),
        "{r:#?}"
    );

    // And a third time with nothing old enough.
    let r = prune(&log.db, &["--older-than", "30d"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(
        r.stdout
            .starts_with("nothing to prune: no row is older than"),
        "{r:#?}"
    );
    assert_eq!(count(&conn), 35);
    assert_intact(&log.verify(), "35");

    // export reads the pruned log as it is.
    let r = export(&log.db, &[]);
    assert_eq!(r.stdout.lines().count(), 35);
}

#[test]
fn prune_refuses_a_tampered_log_and_deletes_nothing() {
    // Tampering in the part that would be pruned, and in the part that would stay.
    for (row, what) in [(20, "deleted"), (150, "altered")] {
        let (log, _) = two_hundred_days(false);
        let conn = log.conn();
        if what == "deleted" {
            conn.execute("DELETE FROM audit_logs WHERE id = ?1", [row])
                .unwrap();
        } else {
            conn.execute("UPDATE audit_logs SET model = 'x' WHERE id = ?1", [row])
                .unwrap();
        }
        let before = count(&conn);
        for dry in [false, true] {
            let mut args = vec!["--older-than", "90d"];
            if dry {
                args.push("--dry-run");
            }
            let r = prune(&log.db, &args);
            assert_eq!(r.code, Some(1), "{r:#?}");
            let broken_at = if what == "deleted" { row + 1 } else { row };
            assert!(
                r.stdout.starts_with(&format!(
                    "refusing to prune: the chain is broken at row {broken_at} ({what}:"
                )),
                "{r:#?}"
            );
            assert_eq!(count(&conn), before);
            assert_eq!(meta(&conn, schema::CHAIN_START_AFTER), None);
            assert_eq!(meta(&conn, schema::PRUNED_AT), None);
        }
    }

    // A keyed log: without its key the chain does not hold, so nothing is pruned; with it,
    // pruning works and the rest verifies with the key.
    let (log, _) = two_hundred_days(true);
    let conn = log.conn();
    let key = log.key.clone().unwrap();
    let r = prune(&log.db, &["--older-than", "90d"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stdout.starts_with("refusing to prune"), "{r:#?}");
    assert_eq!(count(&conn), 200);
    let r = prune(
        &log.db,
        &[
            "--older-than",
            "90d",
            "--chain-key-file",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(count(&conn), 90);
    assert_intact(&log.verify(), "90");
    let r = verify(&log.db, None);
    assert_tampered(&r, 111, Some("req-000110"), "altered: row 111's");
    assert!(
        r.stdout.contains("hint: "),
        "the first row after the checkpoint: {r:#?}"
    );
    log.append(vec![record(500, Utc::now())]);
    assert_intact(&log.verify(), "91");
}

#[test]
fn prune_on_empty_all_old_and_all_new_logs() {
    // Empty.
    let empty = Log::plain(0);
    let r = prune(&empty.db, &["--older-than", "90d"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(
        r.stdout.lines().next().unwrap(),
        "nothing to prune: the audit log is empty"
    );
    let r = prune(&empty.db, &["--older-than", "90d", "--dry-run"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_intact(&empty.verify(), "0");

    // Every row young enough.
    let (log, _) = two_hundred_days(false);
    let r = prune(&log.db, &["--older-than", "365d"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(
        r.stdout
            .starts_with("nothing to prune: no row is older than"),
        "{r:#?}"
    );
    assert_eq!(count(&log.conn()), 200);

    // Every row old: all go, the checkpoint is the last one, and the log still works.
    let r = prune(&log.db, &["--older-than", "11h"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.starts_with("pruned 200 rows"), "{r:#?}");
    let conn = log.conn();
    assert_eq!(count(&conn), 0);
    assert_eq!(meta(&conn, schema::CHAIN_START_AFTER), Some("200".into()));
    let r = log.verify();
    assert_intact(&r, "0");
    assert!(
        r.stdout
            .starts_with("checkpoint: rows up to id 200 were pruned on"),
        "{r:#?}"
    );
    assert_eq!(export(&log.db, &[]).stdout, "");
    let r = prune(&log.db, &["--older-than", "1d"]);
    assert_eq!(
        (r.code, r.stdout.lines().next()),
        (Some(0), Some("nothing to prune: the audit log is empty"))
    );

    let fresh: Vec<AuditRecord> = (0..3)
        .map(|i| {
            let mut r = record(i, Utc::now());
            r.request_id = format!("after-{i}");
            r
        })
        .collect();
    log.append(fresh);
    assert_eq!(ids(&conn), vec![201, 202, 203]);
    assert_eq!(
        read(&conn, 201).prev_hash,
        meta(&conn, schema::CHAIN_ANCHOR).unwrap()
    );
    assert_intact(&log.verify(), "3");
    // Rows deleted after the checkpoint are still missed at the tail.
    conn.execute("DELETE FROM audit_logs WHERE id = 203", [])
        .unwrap();
    assert_tampered(&log.verify(), 203, None, "deleted: row 203 is missing");
}

#[test]
fn prune_of_many_rows_goes_in_batches_and_keeps_the_chain() {
    // 60,000 rows 144 s apart over 100 days, each half a step off a whole second count so the
    // 40-day cutoff falls between rows: exactly 36,000 are older (two delete batches).
    const ROWS: usize = 60_000;
    let now = Utc::now();
    let step = chrono::Duration::seconds(144);
    let first = now - chrono::Duration::days(100) + chrono::Duration::seconds(72);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    write_through_store(&db, None, std::iter::empty());
    let generated = append_bulk(&db, ROWS, first, step);
    let conn = open(&db);

    let started = Instant::now();
    let r = prune(&db, &["--older-than", "40d"]);
    let took = started.elapsed();
    eprintln!(
        "logtools_cli prune: {ROWS} rows generated in {:.1} s; prune of 36,000 took {:.1} s",
        generated.as_secs_f64(),
        took.as_secs_f64()
    );
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.starts_with("pruned 36,000 rows"), "{r:#?}");
    assert_eq!(count(&conn), 24_000);
    let min: i64 = conn
        .query_row("SELECT MIN(id) FROM audit_logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(min, 36_001);
    assert_intact(&verify(&db, None), "24,000");
}

// ── 4. A million rows ───────────────────────────────────────────────────────────────────────

#[test]
fn a_million_rows_verify_quickly_in_bounded_memory() {
    const ROWS: usize = 1_000_000;
    let (log, generated) = bulk_log(ROWS);
    let total = ROWS as i64 + 3;
    let size = std::fs::metadata(&log.db).unwrap().len();

    let mut cmd = llm_audit();
    cmd.arg("verify").arg("--db").arg(&log.db);
    let m = measured(&mut cmd);
    eprintln!(
        "logtools_cli million: {ROWS} rows generated in {:.1} s ({:.0} MB); `verify` took {:.1} s \
         with a peak RSS of {:.1} MB: {}",
        generated.as_secs_f64(),
        size as f64 / 1e6,
        m.took.as_secs_f64(),
        m.peak_kb as f64 / 1024.0,
        m.first.trim_end()
    );
    assert!(
        m.status.success(),
        "verify failed: {} {}",
        m.first,
        m.stderr
    );
    assert!(
        m.first.starts_with("intact: 1,000,003 rows verified in "),
        "{}",
        m.first
    );
    assert!(m.took < Duration::from_secs(60), "verify took {:?}", m.took);
    assert!(m.peak_kb > 0, "no VmHWM sample");
    assert!(m.peak_kb < RSS_LIMIT_KB, "verify used {} kB", m.peak_kb);

    // One row near the end edited: found, named, after walking the whole chain again.
    let row = total - 7;
    let conn = log.conn();
    conn.execute(
        "UPDATE audit_logs SET cost_usd = cost_usd + 0.01 WHERE id = ?1",
        [row],
    )
    .unwrap();
    let rid = request_id(&conn, row);
    drop(conn);
    let mut cmd = llm_audit();
    cmd.arg("verify").arg("--db").arg(&log.db);
    let m = measured(&mut cmd);
    eprintln!(
        "logtools_cli million: tampered `verify` took {:.1} s with a peak RSS of {:.1} MB",
        m.took.as_secs_f64(),
        m.peak_kb as f64 / 1024.0
    );
    assert_eq!(m.status.code(), Some(1), "{} {}", m.first, m.stderr);
    assert!(
        m.first.starts_with(&format!(
            "TAMPERED at row {row} (request_id {rid}): altered: row {row}'s"
        )),
        "{}",
        m.first
    );
    assert!(
        m.last.starts_with("999,995 rows checked before the break"),
        "{}",
        m.last
    );
    assert!(m.peak_kb < RSS_LIMIT_KB, "verify used {} kB", m.peak_kb);
}

/// Review fixes: verification and pruning while the store keeps writing; a moved checkpoint;
/// a row whose own `prev_hash` was edited; a dry run that changes nothing.
#[test]
fn verify_and_prune_under_a_live_writer_see_one_snapshot() {
    let log = Log::plain(50);
    let db = log.db.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let cfg = StoreConfig {
                path: db,
                flush_interval: HumanDuration(Duration::from_millis(1)),
                ..StoreConfig::default()
            };
            let metrics = Arc::new(Metrics::new(1000, 200, 100_000).unwrap());
            let store = Store::open(&cfg, metrics).unwrap();
            let mut i = 10_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (_, queued) = store.submit(record(i, Utc::now()));
                assert!(queued.is_ok());
                i += 1;
                std::thread::sleep(Duration::from_micros(300));
            }
            store.shutdown();
            i - 10_000
        })
    };
    // Rows committed while a walk runs are neither missed nor taken for a cut tail.
    for _ in 0..8 {
        let r = log.verify();
        assert_eq!(r.code, Some(0), "{r:#?}");
    }
    // Prune under the writer: the old rows (from t0, long ago) go, busy moments are retried,
    // and nothing the walk did not see is deleted.
    let r = prune(&db, &["--older-than", "1d"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.contains("pruned 50 rows"), "{r:#?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 0);
    let r = log.verify();
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(count(&log.conn()), written as i64);
}

#[test]
fn a_moved_checkpoint_is_tampering() {
    let log = Log::plain(12);
    // Moving the checkpoint over chained rows would hide an edit from verification.
    let moved = log.copy("moved.db");
    let conn = open(&moved);
    conn.execute(
        "INSERT OR REPLACE INTO llm_audit_meta (key, value) VALUES ('chain_start_after', '8')",
        [],
    )
    .unwrap();
    conn.execute("UPDATE audit_logs SET total_tokens = 1 WHERE id = 3", [])
        .unwrap();
    let r = verify(&moved, None);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stdout.contains("checkpoint moved"), "{r:#?}");
    // Far beyond every id ever assigned.
    let beyond = log.copy("beyond.db");
    open(&beyond)
        .execute(
            "INSERT OR REPLACE INTO llm_audit_meta (key, value) VALUES ('chain_start_after', '999999999')",
            [],
        )
        .unwrap();
    let r = verify(&beyond, None);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stdout.contains("checkpoint moved"), "{r:#?}");
    // A row slipped in below the chain (an id no real row gets).
    let below = log.copy("below.db");
    let conn = open(&below);
    let mut forged = read(&conn, 5);
    forged.request_id = "forged".into();
    forged.prev_hash.clear();
    forged.record_hash.clear();
    put(&conn, -1, &forged);
    let r = verify(&below, None);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stdout.contains("checkpoint moved"), "{r:#?}");
}

#[test]
fn an_edited_prev_hash_is_named_at_its_own_row() {
    let log = Log::plain(10);
    let conn = log.conn();
    conn.execute(
        "UPDATE audit_logs SET prev_hash = ?1 WHERE id = 6",
        ["ab".repeat(32)],
    )
    .unwrap();
    let r = log.verify();
    assert_tampered(
        &r,
        6,
        Some(&request_id(&conn, 6)),
        "altered: row 6's contents",
    );
}

#[test]
fn a_dry_run_prune_changes_nothing() {
    let (log, _) = two_hundred_days(false);
    let before = std::fs::read(&log.db).unwrap();
    let r = prune(&log.db, &["--older-than", "90d", "--dry-run"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.contains("would delete"), "{r:#?}");
    assert_eq!(std::fs::read(&log.db).unwrap(), before);
}
