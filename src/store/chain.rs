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
            out.push_str(&$v.to_string());
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
}

/// Result of walking the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    /// Rows checked.
    pub rows: u64,
    /// Rows with `id` at or below this predate the chain (an upgraded seed database).
    pub chain_start_after: i64,
    /// The first break, if any.
    pub first_break: Option<ChainBreak>,
}

/// The `record_hash` of the last row, or [`GENESIS`] for an empty log.
pub fn last_hash(conn: &Connection) -> rusqlite::Result<String> {
    let start = schema::chain_start_after(conn)?;
    let last: Option<String> = conn
        .query_row(
            "SELECT record_hash FROM audit_logs WHERE id > ?1 ORDER BY id DESC LIMIT 1",
            [start],
            |row| row.get(0),
        )
        .optional()?;
    Ok(last.unwrap_or_else(|| GENESIS.to_owned()))
}

/// Walks every row in `id` order and reports the first break.
pub fn verify(conn: &Connection, key: Option<&Secret>) -> rusqlite::Result<ChainReport> {
    let start = schema::chain_start_after(conn)?;
    let mut stmt = conn.prepare(&format!(
        "{} WHERE id > ?1 ORDER BY id",
        schema::select_sql()
    ))?;
    let mut rows = stmt.query([start])?;
    let mut expected_prev = GENESIS.to_owned();
    let mut count = 0u64;
    while let Some(row) = rows.next()? {
        count += 1;
        let (id, record) = match schema::from_row(row) {
            Ok(r) => r,
            Err(_) => {
                let row_id: i64 = row.get(0)?;
                let request_id: Option<String> = row.get(2).ok();
                return Ok(ChainReport {
                    rows: count,
                    chain_start_after: start,
                    first_break: Some(ChainBreak {
                        row_id,
                        request_id: request_id.unwrap_or_default(),
                        kind: BreakKind::Unreadable,
                    }),
                });
            }
        };
        let kind = if record.prev_hash != expected_prev {
            Some(BreakKind::PrevMismatch)
        } else if link_hash(&record.prev_hash, &canonical_bytes(&record), key) != record.record_hash
        {
            Some(BreakKind::HashMismatch)
        } else {
            None
        };
        if let Some(kind) = kind {
            return Ok(ChainReport {
                rows: count,
                chain_start_after: start,
                first_break: Some(ChainBreak {
                    row_id: id,
                    request_id: record.request_id,
                    kind,
                }),
            });
        }
        expected_prev = record.record_hash;
    }
    Ok(ChainReport {
        rows: count,
        chain_start_after: start,
        first_break: None,
    })
}
