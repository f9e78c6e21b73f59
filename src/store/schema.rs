//! The `audit_logs` table: the seed's columns first, with its names, types and indexes, so the
//! seed's SQL keeps working; then ours. Records are only ever inserted.

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use crate::audit::record::{AuditRecord, CostStatus, Outcome, UsageSource};

/// The seed's columns, verbatim: queries written for the seed keep working on our database.
const SEED_COLUMNS: &str = "id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp TEXT NOT NULL,
    request_id TEXT UNIQUE NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    latency_ms REAL,
    status_code INTEGER,
    cost_usd REAL,
    user_id TEXT,
    request_hash TEXT,
    response_preview TEXT,
    ip_address TEXT,
    error_message TEXT,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP";

/// Our columns, each addable to a seed-era table with `ALTER TABLE … ADD COLUMN`.
const ADDED_COLUMNS: [(&str, &str); 19] = [
    ("provider", "TEXT NOT NULL DEFAULT ''"),
    ("endpoint", "TEXT NOT NULL DEFAULT ''"),
    ("response_model", "TEXT"),
    ("response_id", "TEXT"),
    ("stream", "INTEGER NOT NULL DEFAULT 0"),
    ("finish_reason", "TEXT"),
    ("cached_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("reasoning_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("usage_source", "TEXT NOT NULL DEFAULT 'reported'"),
    ("cost_status", "TEXT NOT NULL DEFAULT 'priced'"),
    ("outcome", "TEXT NOT NULL DEFAULT 'ok'"),
    ("ttft_ms", "REAL"),
    ("key_id", "TEXT"),
    ("attempts", "INTEGER NOT NULL DEFAULT 1"),
    ("trace_id", "TEXT"),
    ("span_id", "TEXT"),
    ("cost_picousd", "INTEGER NOT NULL DEFAULT 0"),
    ("prev_hash", "TEXT NOT NULL DEFAULT ''"),
    ("record_hash", "TEXT NOT NULL DEFAULT ''"),
];

/// Meta key: rows with `id` at or below this value predate the chain (a seed-era database
/// that was upgraded); verification starts after them.
pub const CHAIN_START_AFTER: &str = "chain_start_after";

/// Creates the table and indexes if missing (upgrading a seed-era table in place), and sets the
/// connection's pragmas.
pub fn prepare(conn: &Connection, synchronous_full: bool) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode can lose the last commits on power loss but never corrupts;
    // `durability = "sync"` asks for FULL so an acknowledged record survives power loss too.
    conn.pragma_update(
        None,
        "synchronous",
        if synchronous_full { "FULL" } else { "NORMAL" },
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let added: Vec<String> = ADDED_COLUMNS
        .iter()
        .map(|(n, t)| format!("{n} {t}"))
        .collect();
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS audit_logs ({SEED_COLUMNS}, {});
        CREATE TABLE IF NOT EXISTS llm_audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT OR IGNORE INTO llm_audit_meta (key, value) VALUES ('schema_version', '1');",
        added.join(", ")
    ))?;
    upgrade_seed_table(conn)?;
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS idx_timestamp ON audit_logs(timestamp);
        CREATE INDEX IF NOT EXISTS idx_model ON audit_logs(model);
        CREATE INDEX IF NOT EXISTS idx_request_hash ON audit_logs(request_hash);
        CREATE INDEX IF NOT EXISTS idx_user_id ON audit_logs(user_id);",
    )
}

/// A table created by the seed lacks our columns: add them, and mark its existing rows as
/// predating the chain, in one transaction.
fn upgrade_seed_table(conn: &Connection) -> rusqlite::Result<()> {
    let existing: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('audit_logs')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if existing.iter().any(|c| c == "record_hash") {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let upgrade = || -> rusqlite::Result<()> {
        for (name, ty) in ADDED_COLUMNS {
            if !existing.iter().any(|c| c == name) {
                conn.execute_batch(&format!("ALTER TABLE audit_logs ADD COLUMN {name} {ty}"))?;
            }
        }
        let (rows, max_id): (i64, Option<i64>) =
            conn.query_row("SELECT COUNT(*), MAX(id) FROM audit_logs", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        // The chain starts after every id the seed ever assigned (deleted tail rows included).
        let start = max_id.max(highest_assigned_id(conn)?).unwrap_or(0);
        set_meta(conn, CHAIN_START_AFTER, &start.to_string())?;
        set_meta(conn, SEED_ROWS, &rows.to_string())?;
        Ok(())
    };
    match upgrade() {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Meta key: the `prev_hash` the first row after `chain_start_after` links to (the
/// `record_hash` of the last pruned row; absent means GENESIS).
pub const CHAIN_ANCHOR: &str = "chain_anchor";
/// Meta key: how many rows an upgraded seed table had (they sit below the chain, unchained).
pub const SEED_ROWS: &str = "seed_rows";
/// Meta key: when the log was last pruned (UTC, the record timestamp format).
pub const PRUNED_AT: &str = "pruned_at";

/// Does the database hold a table or index (`kind`) of this name?
pub fn exists(conn: &Connection, kind: &str, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = ?1 AND name = ?2",
        [kind, name],
        |r| r.get(0),
    )
}

/// Does `audit_logs` have this column (a seed-era table lacks ours)?
pub fn has_column(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('audit_logs') WHERE name = ?1",
        [name],
        |r| r.get(0),
    )
}

/// The highest `id` `audit_logs` ever assigned (AUTOINCREMENT remembers it after deletions).
pub fn highest_assigned_id(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT seq FROM sqlite_sequence WHERE name = 'audit_logs'",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// Sets a value of the meta table.
pub fn set_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO llm_audit_meta (key, value) VALUES (?1, ?2)",
        params![key, value],
    )
    .map(|_| ())
}

/// A value of the meta table.
pub fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM llm_audit_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

/// Rows at or below this `id` predate the chain (0 when every row is chained).
pub fn chain_start_after(conn: &Connection) -> rusqlite::Result<i64> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM llm_audit_meta WHERE key = ?1",
            [CHAIN_START_AFTER],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// The chained columns in chain order (everything but `id`, `created_at` and the two hashes).
pub const COLUMNS: &str = "timestamp, request_id, model, prompt_tokens, completion_tokens, \
    total_tokens, latency_ms, status_code, cost_usd, user_id, request_hash, response_preview, \
    ip_address, error_message, provider, endpoint, response_model, response_id, stream, \
    finish_reason, cached_tokens, reasoning_tokens, usage_source, cost_status, outcome, ttft_ms, \
    key_id, attempts, trace_id, span_id, cost_picousd";

/// Inserts one record (inside the caller's transaction).
pub fn insert(stmt: &mut rusqlite::CachedStatement<'_>, r: &AuditRecord) -> rusqlite::Result<()> {
    stmt.execute(params![
        r.timestamp,
        r.request_id,
        r.model,
        r.prompt_tokens,
        r.completion_tokens,
        r.total_tokens,
        r.latency_ms,
        r.status_code,
        r.cost_usd,
        r.user_id,
        r.request_hash,
        r.response_preview,
        r.ip_address,
        r.error_message,
        r.provider,
        r.endpoint,
        r.response_model,
        r.response_id,
        r.stream,
        r.finish_reason,
        r.cached_tokens,
        r.reasoning_tokens,
        r.usage_source.as_str(),
        r.cost_status.as_str(),
        r.outcome.as_str(),
        r.ttft_ms,
        r.key_id,
        r.attempts,
        r.trace_id,
        r.span_id,
        r.cost_picousd,
        r.prev_hash,
        r.record_hash,
    ])?;
    Ok(())
}

/// The INSERT statement matching [`insert`].
pub fn insert_sql() -> String {
    format!(
        "INSERT INTO audit_logs ({COLUMNS}, prev_hash, record_hash) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
         ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33)"
    )
}

/// The SELECT that [`from_row`] reads: `id`, then [`COLUMNS`], then the hashes.
pub fn select_sql() -> String {
    format!("SELECT id, {COLUMNS}, prev_hash, record_hash FROM audit_logs")
}

/// Reads a row selected with [`select_sql`]. Unknown enum spellings are kept as an error so
/// verification reports the row instead of guessing.
pub fn from_row(row: &Row<'_>) -> rusqlite::Result<(i64, AuditRecord)> {
    let text = |i: usize| -> rusqlite::Result<String> {
        row.get::<_, Option<String>>(i)
            .map(Option::unwrap_or_default)
    };
    let bad = |i: usize, v: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown value {v:?}").into(),
        )
    };
    let usage_source = match text(23)?.as_str() {
        "reported" => UsageSource::Reported,
        "estimated" => UsageSource::Estimated,
        "missing" => UsageSource::Missing,
        v => return Err(bad(23, v)),
    };
    let cost_status = match text(24)?.as_str() {
        "priced" => CostStatus::Priced,
        "fallback" => CostStatus::Fallback,
        "unpriced" => CostStatus::Unpriced,
        v => return Err(bad(24, v)),
    };
    let outcome = match text(25)?.as_str() {
        "ok" => Outcome::Ok,
        "error" => Outcome::Error,
        "aborted" => Outcome::Aborted,
        v => return Err(bad(25, v)),
    };
    let record = AuditRecord {
        timestamp: text(1)?,
        request_id: text(2)?,
        model: text(3)?,
        prompt_tokens: row.get(4)?,
        completion_tokens: row.get(5)?,
        total_tokens: row.get(6)?,
        latency_ms: row.get(7)?,
        status_code: row.get(8)?,
        cost_usd: row.get(9)?,
        user_id: row.get(10)?,
        request_hash: text(11)?,
        response_preview: text(12)?,
        ip_address: row.get(13)?,
        error_message: row.get(14)?,
        provider: text(15)?,
        endpoint: text(16)?,
        response_model: row.get(17)?,
        response_id: row.get(18)?,
        stream: row.get(19)?,
        finish_reason: row.get(20)?,
        cached_tokens: row.get(21)?,
        reasoning_tokens: row.get(22)?,
        usage_source,
        cost_status,
        outcome,
        ttft_ms: row.get(26)?,
        key_id: row.get(27)?,
        attempts: row.get(28)?,
        trace_id: row.get(29)?,
        span_id: row.get(30)?,
        cost_picousd: row.get(31)?,
        prev_hash: text(32)?,
        record_hash: text(33)?,
    };
    Ok((row.get(0)?, record))
}
