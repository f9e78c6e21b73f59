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

/// Walks the chain of `conn` with a progress bar on a terminal.
fn walk(conn: &Connection, key: Option<&Secret>) -> anyhow::Result<(ChainReport, Duration)> {
    let cp = Checkpoint::read(conn)?;
    let total: i64 = conn.query_row(
        "SELECT COUNT(*) FROM audit_logs WHERE id > ?1",
        [cp.after_id],
        |r| r.get(0),
    )?;
    let bar = progress_bar(total.max(0) as u64, "verifying");
    let started = Instant::now();
    let report = chain::verify_with_progress(conn, key, |n| {
        if let Some(b) = &bar {
            b.set_position(n);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((report, started.elapsed()))
}

/// `llm-audit verify`: exit 0 intact, 1 tampered, 2 could not check.
pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let key = read_key(args.chain_key_file.as_deref())?;
    let conn = open_read_only(&args.db)?;
    let cp = Checkpoint::read(&conn)?;
    let (report, took) = walk(&conn, key.as_ref())
        .map_err(|e| anyhow::anyhow!("could not check {}: {e:#}", args.db.display()))?;
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
    let key = read_key(args.chain_key_file.as_deref())?;
    // Opened read-write but never created: a typo must not leave an empty database behind.
    open_read_only(&args.db)?;
    let conn = Connection::open_with_flags(
        &args.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    schema::prepare(&conn, false)?;

    // Never destroy the evidence of tampering: the chain must hold before anything goes.
    let (report, _) = walk(&conn, key.as_ref())?;
    if let Some(b) = report.first_break {
        println!(
            "refusing to prune: the chain is broken at row {} ({}); run `llm-audit verify`",
            b.row_id, b.tamper
        );
        return Ok(ExitCode::from(TAMPERED));
    }

    let now = chrono::Utc::now();
    let cutoff = crate::period::stamp(
        now - chrono::Duration::from_std(age)
            .map_err(|_| anyhow::anyhow!("--older-than is too long"))?,
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
    let last_id: Option<i64> =
        conn.query_row("SELECT MAX(id) FROM audit_logs", [], |r| r.get(0))?;
    let Some(last_id) = last_id else {
        println!("nothing to prune: the audit log is empty");
        return Ok(ExitCode::SUCCESS);
    };
    let upto = first_kept.map_or(last_id, |k| k - 1);
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
        let tx = conn.unchecked_transaction()?;
        if to > cp.after_id {
            let anchor: String = tx.query_row(
                "SELECT record_hash FROM audit_logs WHERE id <= ?1 ORDER BY id DESC LIMIT 1",
                [to],
                |r| r.get(0),
            )?;
            set_meta(&tx, schema::CHAIN_ANCHOR, &anchor)?;
            set_meta(&tx, schema::CHAIN_START_AFTER, &to.to_string())?;
        }
        set_meta(&tx, schema::PRUNED_AT, &crate::period::stamp(now))?;
        deleted += tx.execute(
            "DELETE FROM audit_logs WHERE id >= ?1 AND id <= ?2",
            params![from, to],
        )? as i64;
        tx.commit()?;
        from = to + 1;
    }
    println!(
        "pruned {} rows older than {cutoff} (ids up to {upto}); the chain now starts after row {upto}",
        thousands(deleted)
    );
    println!(
        "the file keeps its size until `sqlite3 {} 'VACUUM'`",
        args.db.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO llm_audit_meta (key, value) VALUES (?1, ?2)",
        params![key, value],
    )
    .map(|_| ())
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
    let conn = open_read_only(&args.db)?;
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
    let mut stmt = conn.prepare(
        "SELECT * FROM audit_logs WHERE (?1 IS NULL OR timestamp >= ?1) \
         AND (?2 IS NULL OR timestamp < ?2) ORDER BY id",
    )?;
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let mut rows = stmt.query(params![since, until])?;
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
