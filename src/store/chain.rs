//! The hash chain (DESIGN §4): `record_hash = SHA-256(prev_hash ‖ canonical bytes)`, or
//! HMAC-SHA256 with the chain key, starting from [`GENESIS`].
//!
//! The canonical bytes are the JSON array of the chained columns in [`schema::COLUMNS`] order,
//! written exactly as Python's `json.dumps(values, separators=(',', ':'), ensure_ascii=False)`
//! would, so an auditor can re-check the chain with a ten-line script and no llm-audit code.

use hmac::{Hmac, KeyInit, Mac};
use rusqlite::{Connection, OptionalExtension as _};
use sha2::{Digest, Sha256};

use super::schema;
use crate::audit::canonical::{write_json_f64, write_json_str};
use crate::audit::record::AuditRecord;
use crate::config::Secret;

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The bytes a record contributes to the chain.
pub fn canonical_bytes(r: &AuditRecord) -> String {
    let mut out = String::with_capacity(512 + r.response_preview.len());
    out.push('[');
    let sep = |out: &mut String| {
        if out.len() > 1 {
            out.push(',');
        }
    };
    let str_field = |out: &mut String, v: &str| write_json_str(v, out);
    let opt_str = |out: &mut String, v: &Option<String>| match v {
        Some(s) => write_json_str(s, out),
        None => out.push_str("null"),
    };
    macro_rules! push {
        (str $v:expr) => {{
            sep(&mut out);
            str_field(&mut out, &$v);
        }};
        (opt $v:expr) => {{
            sep(&mut out);
            opt_str(&mut out, &$v);
        }};
        (int $v:expr) => {{
            sep(&mut out);
            // Same digits as `to_string`, without an allocation per field.
            out.push_str(itoa::Buffer::new().format($v));
        }};
        (float $v:expr) => {{
            sep(&mut out);
            write_json_f64($v, &mut out);
        }};
    }
    push!(str r.timestamp);
    push!(str r.request_id);
    push!(str r.model);
    push!(int r.prompt_tokens);
    push!(int r.completion_tokens);
    push!(int r.total_tokens);
    push!(float r.latency_ms);
    push!(int r.status_code);
    push!(float r.cost_usd);
    push!(opt r.user_id);
    push!(str r.request_hash);
    push!(str r.response_preview);
    push!(opt r.ip_address);
    push!(opt r.error_message);
    push!(str r.provider);
    push!(str r.endpoint);
    push!(opt r.response_model);
    push!(opt r.response_id);
    push!(int i64::from(r.stream));
    push!(opt r.finish_reason);
    push!(int r.cached_tokens);
    push!(int r.reasoning_tokens);
    push!(str r.usage_source.as_str());
    push!(str r.cost_status.as_str());
    push!(str r.outcome.as_str());
    sep(&mut out);
    match r.ttft_ms {
        Some(t) => write_json_f64(t, &mut out),
        None => out.push_str("null"),
    }
    push!(opt r.key_id);
    push!(int r.attempts);
    push!(opt r.trace_id);
    push!(opt r.span_id);
    push!(int r.cost_picousd);
    out.push(']');
    out
}

/// The link hash of a record with canonical bytes `bytes` following `prev_hash`.
pub fn link_hash(prev_hash: &str, bytes: &str, key: Option<&Secret>) -> String {
    match key {
        None => {
            let mut h = Sha256::new();
            h.update(prev_hash.as_bytes());
            h.update(bytes.as_bytes());
            hex::encode(h.finalize())
        }
        Some(key) => {
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose().as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(prev_hash.as_bytes());
            mac.update(bytes.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
    }
}

/// The first place where the chain does not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainBreak {
    /// `id` of the first bad row.
    pub row_id: i64,
    /// Its `request_id`.
    pub request_id: String,
    /// What does not match.
    pub kind: BreakKind,
    /// What was most likely done to the log, and where.
    pub tamper: Tamper,
}

/// How a row fails the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakKind {
    /// `prev_hash` is not the previous row's `record_hash`: a row before it was deleted,
    /// or this row was inserted or moved.
    PrevMismatch,
    /// The row's contents do not hash to its `record_hash`: it was altered.
    HashMismatch,
    /// The row cannot even be read back as a record.
    Unreadable,
    /// Rows are missing after the last one (the highest id ever assigned is beyond it).
    TailMissing,
    /// The checkpoint does not fit the rows below it.
    Checkpoint,
}

/// The likely tampering behind a break, worked out from where the broken link points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// The row's contents were changed (or the chain key is not the one it was written with).
    Altered {
        /// `id` of the changed row.
        row_id: i64,
    },
    /// Rows were deleted.
    Deleted {
        /// First missing `id`.
        first_id: i64,
        /// Last missing `id`.
        last_id: i64,
    },
    /// A row that the chain does not pass through was inserted.
    Inserted {
        /// `id` of the first inserted row.
        row_id: i64,
    },
    /// Rows were moved: this row links to one that comes after it.
    Reordered {
        /// The row whose hash this row names as its predecessor.
        links_to: i64,
    },
    /// The row does not read back as a record (a field holds an impossible value).
    Unreadable,
    /// The checkpoint (where verification starts) does not fit the log: it was moved to hide
    /// rows from verification, or rows were put below it.
    Checkpoint {
        /// What does not fit.
        why: &'static str,
    },
}

impl std::fmt::Display for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Altered { row_id } => write!(
                f,
                "altered: row {row_id}'s contents do not match the chain (or the chain key is wrong)"
            ),
            Self::Deleted { first_id, last_id } if first_id == last_id => {
                write!(f, "deleted: row {first_id} is missing")
            }
            Self::Deleted { first_id, last_id } => {
                write!(f, "deleted: rows {first_id} to {last_id} are missing")
            }
            Self::Inserted { row_id } => {
                write!(f, "inserted: row {row_id} is not part of the chain")
            }
            Self::Reordered { links_to } => write!(
                f,
                "reordered: the row links to row {links_to}, which comes after it"
            ),
            Self::Unreadable => write!(f, "unreadable: a field holds a value no record can have"),
            Self::Checkpoint { why } => write!(f, "checkpoint moved: {why}"),
        }
    }
}

/// Where verification starts: after `after_id`, from `anchor` (GENESIS for a log that was
/// never pruned; the `record_hash` of the last pruned row otherwise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Rows with `id` at or below this are not checked (pruned, or predating the chain).
    pub after_id: i64,
    /// The `prev_hash` the first remaining row must carry.
    pub anchor: String,
    /// When the log was last pruned, if ever.
    pub pruned_at: Option<String>,
}

impl Checkpoint {
    /// Reads the checkpoint from the log's meta table.
    pub fn read(conn: &Connection) -> rusqlite::Result<Self> {
        if !schema::exists(conn, "table", "llm_audit_meta")? {
            return Ok(Self {
                after_id: 0,
                anchor: GENESIS.to_owned(),
                pruned_at: None,
            });
        }
        Ok(Self {
            after_id: schema::chain_start_after(conn)?,
            anchor: schema::meta(conn, schema::CHAIN_ANCHOR)?.unwrap_or_else(|| GENESIS.to_owned()),
            pruned_at: schema::meta(conn, schema::PRUNED_AT)?,
        })
    }
}

/// Result of walking the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    /// Rows checked.
    pub rows: u64,
    /// Rows with `id` at or below this predate the chain (an upgraded seed database, or
    /// pruned rows).
    pub chain_start_after: i64,
    /// The first break, if any.
    pub first_break: Option<ChainBreak>,
}

/// The `record_hash` of the last row, or the checkpoint's anchor (GENESIS for a new log).
pub fn last_hash(conn: &Connection) -> rusqlite::Result<String> {
    let cp = Checkpoint::read(conn)?;
    let last: Option<String> = conn
        .query_row(
            "SELECT record_hash FROM audit_logs WHERE id > ?1 ORDER BY id DESC LIMIT 1",
            [cp.after_id],
            |row| row.get(0),
        )
        .optional()?;
    Ok(last.unwrap_or(cp.anchor))
}

/// Walks every row in `id` order and reports the first break.
pub fn verify(conn: &Connection, key: Option<&Secret>) -> rusqlite::Result<ChainReport> {
    verify_with_progress(conn, key, |_| {})
}

/// [`verify`], calling `progress` with the number of rows checked every few thousand rows.
pub fn verify_with_progress(
    conn: &Connection,
    key: Option<&Secret>,
    progress: impl FnMut(u64),
) -> rusqlite::Result<ChainReport> {
    // One read snapshot for the checkpoint, the walk and the id sequence: rows the proxy
    // commits meanwhile must not look like rows missing from the end.
    let snapshot = conn
        .is_autocommit()
        .then(|| conn.unchecked_transaction())
        .transpose()?;
    let report = walk_chain(conn, key, progress)?;
    if let Some(tx) = snapshot {
        tx.commit()?;
    }
    Ok(report)
}

/// Rows at or below the checkpoint must be unchained rows of an upgraded seed database, and
/// no more of them than the upgrade found: otherwise the checkpoint was moved over chained rows
/// (hiding them from verification) or rows were slipped in below it.
fn check_checkpoint(conn: &Connection, cp: &Checkpoint) -> rusqlite::Result<Option<&'static str>> {
    let (below, chained_below): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(record_hash != '' OR prev_hash != ''), 0) \
         FROM audit_logs WHERE id <= ?1",
        [cp.after_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if chained_below > 0 {
        return Ok(Some(
            "chained rows sit at or below it, out of verification's reach",
        ));
    }
    let seed_rows: Option<i64> =
        schema::meta(conn, schema::SEED_ROWS)?.and_then(|v| v.parse().ok());
    let allowed = match (seed_rows, cp.pruned_at.is_some(), cp.after_id) {
        (Some(n), _, _) => Some(n),
        // Never upgraded from the seed and never pruned: nothing may sit below the chain.
        (None, false, 0) => Some(0),
        _ => None,
    };
    if allowed.is_some_and(|n| below > n) {
        return Ok(Some(
            "more unchained rows sit below it than the seed database had",
        ));
    }
    if cp.after_id > schema::highest_assigned_id(conn)?.unwrap_or(0) {
        return Ok(Some("it lies beyond the highest id the log ever assigned"));
    }
    Ok(None)
}

fn walk_chain(
    conn: &Connection,
    key: Option<&Secret>,
    mut progress: impl FnMut(u64),
) -> rusqlite::Result<ChainReport> {
    let cp = Checkpoint::read(conn)?;
    let start = cp.after_id;
    if let Some(why) = check_checkpoint(conn, &cp)? {
        return Ok(ChainReport {
            rows: 0,
            chain_start_after: start,
            first_break: Some(ChainBreak {
                row_id: start,
                request_id: String::new(),
                kind: BreakKind::Checkpoint,
                tamper: Tamper::Checkpoint { why },
            }),
        });
    }
    let mut stmt = conn.prepare(&format!(
        "{} WHERE id > ?1 ORDER BY id",
        schema::select_sql()
    ))?;
    let mut rows = stmt.query([start])?;
    let mut expected_prev = cp.anchor.clone();
    let mut prev_id: Option<i64> = None;
    let mut count = 0u64;
    let report = |rows, first_break| ChainReport {
        rows,
        chain_start_after: start,
        first_break,
    };
    while let Some(row) = rows.next()? {
        count += 1;
        if count.is_multiple_of(8192) {
            progress(count);
        }
        let (id, record) = match schema::from_row(row) {
            Ok(r) => r,
            Err(_) => {
                let row_id: i64 = row.get(0)?;
                let request_id: Option<String> = row.get(2).ok();
                return Ok(report(
                    count,
                    Some(ChainBreak {
                        row_id,
                        request_id: request_id.unwrap_or_default(),
                        kind: BreakKind::Unreadable,
                        tamper: Tamper::Unreadable,
                    }),
                ));
            }
        };
        let kind = if record.prev_hash != expected_prev {
            Some(BreakKind::PrevMismatch)
        } else {
            (link_hash(&record.prev_hash, &canonical_bytes(&record), key) != record.record_hash)
                .then_some(BreakKind::HashMismatch)
        };
        if let Some(kind) = kind {
            let tamper = match kind {
                // A row whose own link does not hash was edited itself (its prev_hash
                // included); only a self-consistent row points at a problem before it.
                BreakKind::PrevMismatch
                    if link_hash(&record.prev_hash, &canonical_bytes(&record), key)
                        != record.record_hash =>
                {
                    Tamper::Altered { row_id: id }
                }
                BreakKind::PrevMismatch => diagnose_link(
                    conn,
                    &cp,
                    prev_id.map(|p| (p, expected_prev.as_str())),
                    id,
                    &record.prev_hash,
                )?,
                _ => Tamper::Altered { row_id: id },
            };
            return Ok(report(
                count,
                Some(ChainBreak {
                    row_id: id,
                    request_id: record.request_id,
                    kind,
                    tamper,
                }),
            ));
        }
        expected_prev = record.record_hash;
        prev_id = Some(id);
    }
    progress(count);
    // Rows deleted from the end leave every remaining link intact; AUTOINCREMENT's record of
    // the highest id ever assigned still shows them.
    let last = prev_id.unwrap_or(start);
    if let Some(seq) = schema::highest_assigned_id(conn)?.filter(|&seq| seq > last) {
        return Ok(report(
            count,
            Some(ChainBreak {
                row_id: last + 1,
                request_id: String::new(),
                kind: BreakKind::TailMissing,
                tamper: Tamper::Deleted {
                    first_id: last + 1,
                    last_id: seq,
                },
            }),
        ));
    }
    Ok(report(count, None))
}

/// Works out why row `id` (whose `prev_hash` is `prev_hash`) does not link to its
/// predecessor `pred` (`id`, `record_hash`; `None` for the first row after the checkpoint).
fn diagnose_link(
    conn: &Connection,
    cp: &Checkpoint,
    pred: Option<(i64, &str)>,
    id: i64,
    prev_hash: &str,
) -> rusqlite::Result<Tamper> {
    let id_with = |column: &str, hash: &str| -> rusqlite::Result<Option<i64>> {
        conn.query_row(
            &format!(
                "SELECT id FROM audit_logs WHERE id > ?1 AND {column} = ?2 ORDER BY id LIMIT 1"
            ),
            rusqlite::params![cp.after_id, hash],
            |r| r.get(0),
        )
        .optional()
    };
    // The row it names as predecessor comes after it: rows were moved.
    if let Some(target) = id_with("record_hash", prev_hash)? {
        if target > id {
            return Ok(Tamper::Reordered { links_to: target });
        }
        // It names an earlier row than the one before it: everything in between was inserted.
        let first_inserted: i64 = conn.query_row(
            "SELECT MIN(id) FROM audit_logs WHERE id > ?1",
            [target],
            |r| r.get(0),
        )?;
        return Ok(Tamper::Inserted {
            row_id: first_inserted,
        });
    }
    // Only the first row may link to the chain's start: a later one doing so had rows put in
    // front of it.
    if pred.is_some() && prev_hash == cp.anchor {
        let first: i64 = conn.query_row(
            "SELECT MIN(id) FROM audit_logs WHERE id > ?1",
            [cp.after_id],
            |r| r.get(0),
        )?;
        return Ok(Tamper::Inserted { row_id: first });
    }
    let (pred_id, pred_hash) = pred.unwrap_or((cp.after_id, cp.anchor.as_str()));
    // The chain goes on from the predecessor further down: this row (and any up to there)
    // was inserted.
    if let Some(successor) = id_with("prev_hash", pred_hash)?
        && successor > id
    {
        return Ok(Tamper::Inserted { row_id: id });
    }
    if id - pred_id > 1 {
        return Ok(Tamper::Deleted {
            first_id: pred_id + 1,
            last_id: id - 1,
        });
    }
    // Nothing is missing, yet the row links to a hash no row has: the predecessor was
    // rewritten, its record_hash recomputed (the row after it still names the original).
    Ok(Tamper::Altered {
        row_id: if pred.is_some() { pred_id } else { id },
    })
}
