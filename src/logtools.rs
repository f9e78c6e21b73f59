//! The audit-log commands besides `report`: `verify` (walk the hash chain), `export` (stream
//! rows to other tools) and `prune` (retention with a checkpoint that keeps the rest
//! verifiable). Each opens the database itself; none needs the proxy to be stopped.

use std::io::{BufWriter, IsTerminal as _, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension as _, params};

use crate::cli::{ExportArgs, ExportFormat, PruneArgs, VerifyArgs};
use crate::config::Secret;
use crate::report::open_read_only;
use crate::report::render::thousands;
use crate::store::chain::{self, BreakKind, ChainReport, Checkpoint};
use crate::store::schema;

/// Exit code: a check failed (tampering found).
const TAMPERED: u8 = 1;

fn read_key(path: Option<&std::path::Path>) -> anyhow::Result<Option<Secret>> {
    path.map(|p| {
        Secret::from_file(p)
            .map_err(|e| anyhow::anyhow!("cannot read the chain key file {}: {e}", p.display()))
    })
    .transpose()
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
fn progress_bar(total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() || total < 100_000 {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {human_pos}/{human_len} rows ({per_sec}, {eta} left)",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    Some(bar)
}

/// Walks the chain of `conn` in one read snapshot, with a progress bar on a terminal. Returns
/// the report, the time taken and the highest id the snapshot held (what was verified).
fn walk(
    conn: &Connection,
    key: Option<&Secret>,
) -> anyhow::Result<(ChainReport, Duration, Option<i64>)> {
    let snapshot = conn.unchecked_transaction()?;
    let cp = Checkpoint::read(conn)?;
    // Counting costs a pass over the index: only for a progress bar someone watches.
    let bar = if std::io::stderr().is_terminal() {
        let total: i64 = conn.query_row(
            "SELECT COUNT(*) FROM audit_logs WHERE id > ?1",
            [cp.after_id],
            |r| r.get(0),
        )?;
        progress_bar(total.max(0) as u64, "verifying")
    } else {
        None
    };
    let started = Instant::now();
    let report = chain::verify_with_progress(conn, key, |n| {
        if let Some(b) = &bar {
            b.set_position(n);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let last: Option<i64> = conn.query_row("SELECT MAX(id) FROM audit_logs", [], |r| r.get(0))?;
    snapshot.commit()?;
    Ok((report, started.elapsed(), last))
}

/// Refuses a log whose rows carry no chain (a seed-era database never opened by llm-audit).
fn ensure_chained(conn: &Connection, db: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        schema::has_column(conn, "record_hash")?,
        "{} has no hash chain (a database written before llm-audit); `llm-audit serve` upgrades \
         it and chains every row written from then on",
        db.display()
    );
    Ok(())
}

/// The database and chain key a command uses: its flags, else the configuration's `[store]`.
fn store_paths(
    config: Option<&std::path::Path>,
    db: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
) -> anyhow::Result<(std::path::PathBuf, Option<std::path::PathBuf>)> {
    let cfg = crate::config::Config::load(config, std::env::vars())?;
    Ok((
        db.unwrap_or(cfg.store.path),
        key.or(cfg.store.chain_key_file),
    ))
}

/// `llm-audit verify`: exit 0 intact, 1 tampered, 2 could not check.
pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let (db, key_file) = store_paths(args.config.as_deref(), args.db, args.chain_key_file)?;
    let key = read_key(key_file.as_deref())?;
    let conn = open_read_only(&db)?;
    ensure_chained(&conn, &db)?;
    let cp = Checkpoint::read(&conn)?;
    let (report, took, _) = walk(&conn, key.as_ref())
        .map_err(|e| anyhow::anyhow!("could not check {}: {e:#}", db.display()))?;
    let mut out = std::io::stdout().lock();
    if cp.after_id > 0 {
        match &cp.pruned_at {
            Some(at) => writeln!(
                out,
                "checkpoint: rows up to id {} were pruned on {at}; the chain resumes from record hash {}",
                cp.after_id, cp.anchor
            )?,
            None => writeln!(
                out,
                "checkpoint: rows up to id {} predate the chain (written before llm-audit) and are not covered",
                cp.after_id
            )?,
        }
    }
    match report.first_break {
        None => {
            writeln!(
                out,
                "intact: {} rows verified in {:.2} s",
                thousands(report.rows),
                took.as_secs_f64()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Some(b) => {
            let request = if b.request_id.is_empty() {
                String::new()
            } else {
                format!(" (request_id {})", b.request_id)
            };
            writeln!(out, "TAMPERED at row {}{request}: {}", b.row_id, b.tamper)?;
            if key.is_none() && b.row_id == cp.after_id + 1 {
                writeln!(
                    out,
                    "hint: if this log was written with a chain key, pass --chain-key-file"
                )?;
            }
            // The breaking row was read too, except when rows are missing after the last one.
            let good = if b.kind == BreakKind::TailMissing {
                report.rows
            } else {
                report.rows.saturating_sub(1)
            };
            writeln!(
                out,
                "{} row{} checked before the break in {:.2} s",
                thousands(good),
                if good == 1 { "" } else { "s" },
                took.as_secs_f64()
            )?;
            Ok(ExitCode::from(TAMPERED))
        }
    }
}

/// `llm-audit prune`: deletes the oldest rows, keeping the rest verifiable.
pub fn prune(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let age = args.older_than.0;
    let (db, key_file) = store_paths(args.config.as_deref(), args.db, args.chain_key_file)?;
    let key = read_key(key_file.as_deref())?;
    // Never created, never migrated: a typo must not leave an empty database behind, and a
    // dry run must not change a byte.
    let mut conn = open_read_only(&db)?;
    ensure_chained(&conn, &db)?;
    if !args.dry_run {
        conn = Connection::open_with_flags(
            &db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
    }

    // Never destroy the evidence of tampering: the chain must hold before anything goes — and
    // only rows that this verification saw may go (the proxy may be appending meanwhile).
    let (report, _, verified_upto) = walk(&conn, key.as_ref())?;
    if let Some(b) = report.first_break {
        println!(
            "refusing to prune: the chain is broken at row {} ({}); run `llm-audit verify`",
            b.row_id, b.tamper
        );
        return Ok(ExitCode::from(TAMPERED));
    }
    let now = chrono::Utc::now();
    let cutoff = crate::period::stamp(
        chrono::Duration::from_std(age)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .ok_or_else(|| anyhow::anyhow!("--older-than is too long"))?,
    );
    // Only a prefix of the chain can go: everything up to the first row that is young enough
    // (a long stream can finish after a newer call, so a few old rows may stay).
    let first_kept: Option<i64> = conn
        .query_row(
            "SELECT MIN(id) FROM audit_logs WHERE timestamp >= ?1",
            [&cutoff],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let Some(last_id) = verified_upto else {
        println!("nothing to prune: the audit log is empty");
        return Ok(ExitCode::SUCCESS);
    };
    let upto = first_kept.map_or(last_id, |k| k - 1).min(last_id);
    let cp = Checkpoint::read(&conn)?;
    let lowest: Option<i64> = conn.query_row("SELECT MIN(id) FROM audit_logs", [], |r| r.get(0))?;
    if lowest.is_none_or(|l| l > upto) {
        println!("nothing to prune: no row is older than {cutoff}");
        return Ok(ExitCode::SUCCESS);
    }
    if args.dry_run {
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM audit_logs WHERE id <= ?1",
            [upto],
            |r| r.get(0),
        )?;
        println!(
            "would delete {} rows (ids up to {upto}, older than {cutoff})",
            thousands(n)
        );
        return Ok(ExitCode::SUCCESS);
    }

    // Batches keep each write transaction short, so a running proxy's writer is never held up
    // for long; each batch moves the checkpoint with its deletions, atomically.
    const BATCH: i64 = 20_000;
    let mut deleted = 0i64;
    let mut from = lowest.unwrap_or(upto);
    while from <= upto {
        let to = (from + BATCH - 1).min(upto);
        deleted += with_busy_retry(|| prune_batch(&mut conn, &cp, from, to, now))?;
        // Jump over id gaps (a sparse log must not cost one transaction per missing id).
        let next: Option<i64> =
            conn.query_row("SELECT MIN(id) FROM audit_logs WHERE id > ?1", [to], |r| {
                r.get(0)
            })?;
        from = next.unwrap_or(upto + 1).max(to + 1);
    }
    println!(
        "pruned {} rows older than {cutoff} (ids up to {upto}); the chain now starts after row {upto}",
        thousands(deleted)
    );
    println!(
        "the file keeps its size until `sqlite3 {} 'VACUUM'`",
        db.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Deletes ids `from..=to` and moves the checkpoint past them, in one IMMEDIATE transaction:
/// it takes the write lock before reading the anchor, so the proxy's writer committing in
/// between cannot invalidate the read (which a deferred transaction reports as busy at once).
fn prune_batch(
    conn: &mut Connection,
    cp: &Checkpoint,
    from: i64,
    to: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> rusqlite::Result<i64> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if to > cp.after_id {
        let anchor: String = tx.query_row(
            "SELECT record_hash FROM audit_logs WHERE id <= ?1 ORDER BY id DESC LIMIT 1",
            [to],
            |r| r.get(0),
        )?;
        schema::set_meta(&tx, schema::CHAIN_ANCHOR, &anchor)?;
        schema::set_meta(&tx, schema::CHAIN_START_AFTER, &to.to_string())?;
    }
    schema::set_meta(&tx, schema::PRUNED_AT, &crate::period::stamp(now))?;
    let n = tx.execute(
        "DELETE FROM audit_logs WHERE id >= ?1 AND id <= ?2",
        params![from, to],
    )?;
    tx.commit()?;
    Ok(n as i64)
}

/// Retries `f` while SQLite reports the database busy beyond its busy timeout (a proxy under
/// heavy load holds the write lock often), a few times with a short pause.
fn with_busy_retry<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 5 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// `llm-audit export`: every column of every row in the period, in id order, streamed.
pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let now = chrono::Utc::now();
    let since = args
        .since
        .as_deref()
        .map(|s| crate::period::parse_time(s, now).map(crate::period::stamp))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|s| crate::period::parse_time(s, now).map(crate::period::stamp))
        .transpose()?;
    let (db, _) = store_paths(args.config.as_deref(), args.db, None)?;
    let conn = open_read_only(&db)?;
    let stdout = std::io::stdout().lock();
    match write_export(&conn, since, until, args.format, stdout) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // `llm-audit export | head` is fine.
        Err(e) if is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
    }
}

/// The reader went away (`export | head`): not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    let pipe = |io: &std::io::Error| io.kind() == std::io::ErrorKind::BrokenPipe;
    e.downcast_ref::<std::io::Error>().is_some_and(pipe)
        || e.downcast_ref::<csv::Error>()
            .is_some_and(|c| matches!(c.kind(), csv::ErrorKind::Io(io) if pipe(io)))
}

fn write_export(
    conn: &Connection,
    since: Option<String>,
    until: Option<String>,
    format: ExportFormat,
    out: impl Write,
) -> anyhow::Result<()> {
    // Only the bounds given, so SQLite can range-scan the timestamp index for them.
    let mut filter = Vec::new();
    let mut bounds = Vec::new();
    if let Some(since) = since {
        filter.push("timestamp >= ?");
        bounds.push(since);
    }
    if let Some(until) = until {
        filter.push("timestamp < ?");
        bounds.push(until);
    }
    let filter = if filter.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", filter.join(" AND "))
    };
    let mut stmt = conn.prepare(&format!("SELECT * FROM audit_logs{filter} ORDER BY id"))?;
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let mut rows = stmt.query(rusqlite::params_from_iter(bounds))?;
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    match format {
        ExportFormat::Jsonl => {
            // Objects written directly, keys in column order and escaped once: no map per row.
            let keys: Vec<String> = names
                .iter()
                .map(|n| format!("{}:", serde_json::Value::from(n.as_str())))
                .collect();
            let mut line = Vec::with_capacity(2048);
            while let Some(row) = rows.next()? {
                line.clear();
                for (i, key) in keys.iter().enumerate() {
                    line.push(if i == 0 { b'{' } else { b',' });
                    line.extend_from_slice(key.as_bytes());
                    write_json_value(&mut line, row.get_ref(i)?)?;
                }
                line.extend_from_slice(b"}\n");
                out.write_all(&line)?;
            }
        }
        ExportFormat::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(&names)?;
            let mut cells: Vec<String> = vec![String::new(); names.len()];
            while let Some(row) = rows.next()? {
                for (i, cell) in cells.iter_mut().enumerate() {
                    cell.clear();
                    csv_cell(row.get_ref(i)?, cell);
                }
                w.write_record(&cells)?;
            }
            w.flush()?;
            return Ok(());
        }
    }
    out.flush()?;
    Ok(())
}

fn write_json_value(out: &mut Vec<u8>, v: ValueRef<'_>) -> serde_json::Result<()> {
    match v {
        ValueRef::Null => out.extend_from_slice(b"null"),
        ValueRef::Integer(i) => serde_json::to_writer(&mut *out, &i)?,
        // serde_json writes the shortest text that reads back as the same f64 (NaN/inf: null).
        ValueRef::Real(f) => serde_json::to_writer(&mut *out, &f)?,
        ValueRef::Text(t) => serde_json::to_writer(&mut *out, &String::from_utf8_lossy(t))?,
        ValueRef::Blob(b) => serde_json::to_writer(&mut *out, &hex::encode(b))?,
    }
    Ok(())
}

fn csv_cell(v: ValueRef<'_>, cell: &mut String) {
    use std::fmt::Write as _;
    match v {
        ValueRef::Null => {}
        ValueRef::Integer(i) => {
            let _ = write!(cell, "{i}");
        }
        // `{}` prints the shortest text that reads back as the same f64.
        ValueRef::Real(f) => {
            let _ = write!(cell, "{f}");
        }
        ValueRef::Text(t) => cell.push_str(&String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => cell.push_str(&hex::encode(b)),
    }
}
