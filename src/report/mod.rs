//! `llm-audit report`: the seed's statistics and security checks, computed from the audit log.
//!
//! Every number is one SQL aggregate over `audit_logs` for the period, selected the seed's way
//! (`timestamp` compared as text), so a database written by llm-audit answers the seed's own
//! queries with the same values (tests/report_cli.rs runs them side by side). Differences from
//! the seed, each on purpose:
//! - cost is summed exactly from `cost_picousd` in 128-bit integers (SQLite's `SUM` overflows
//!   past 9.2 million USD of picodollars and a float sum drifts), split into two 32-bit halves
//!   so SQLite never overflows either;
//! - requests per minute is not truncated to an integer;
//! - ties in the top lists are broken by name, so output is stable;
//! - request hashes of calls that carried no prompt (rejected before parsing) are not "repeats";
//! - two checks of our own that the alert rules also have: unpriced models and auth failures.

pub mod render;

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;

use crate::config::ThresholdsConfig;
use crate::rules::{self, Anomaly};
use crate::store::schema;

/// Most error messages listed (the seed's 10).
pub const TOP_ERRORS: usize = 10;
/// Most users listed (the seed's 20).
pub const TOP_USERS: usize = 20;
/// Most repeated request hashes listed.
pub const MAX_REPEATED_HASHES: usize = 100;

/// The period a report covers: `timestamp >= since` and, when set, `timestamp < until`.
#[derive(Clone, Debug, Serialize)]
pub struct Period {
    /// Inclusive lower bound, in the log's timestamp format.
    pub since: String,
    /// Exclusive upper bound; `null` means "up to now" (the seed's queries have none).
    pub until: Option<String>,
    /// Length of the period in minutes (requests per minute divide by it, as the seed does).
    pub minutes: f64,
    /// Start of the last hour of the period (the cost check's window, like the seed's).
    pub last_hour_since: String,
}

impl Period {
    /// From `since` to `until` (`None`: up to `now`, with no upper bound in the queries).
    pub fn new(
        since: chrono::DateTime<chrono::Utc>,
        until: Option<chrono::DateTime<chrono::Utc>>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        let end = until.unwrap_or(now);
        Self {
            since: crate::period::stamp(since),
            until: until.map(crate::period::stamp),
            minutes: (end - since).num_milliseconds() as f64 / 60_000.0,
            last_hour_since: crate::period::stamp(
                end.checked_sub_signed(chrono::Duration::hours(1))
                    .unwrap_or(end),
            ),
        }
    }
}

/// A report of one period.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// JSON layout version; bumped only on incompatible changes.
    pub report_version: u32,
    /// When the report was made (UTC).
    pub generated_at: String,
    /// The database read.
    pub database: String,
    /// The period.
    pub period: Period,
    /// The thresholds the checks used (the `[thresholds]` section, as the alert rules).
    pub thresholds: ThresholdsConfig,
    /// The seed's statistics.
    pub stats: Stats,
    /// What crossed a threshold; empty when nothing did.
    pub anomalies: Vec<Finding>,
    /// Request hashes seen more than `repeated_request_count` times, most repeated first.
    pub repeated_hashes: Vec<HashCount>,
}

/// An exact amount of money: USD as a number for people and charts, picodollars as a string
/// for exact sums (beyond what a JSON number holds exactly).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Money(pub i128);

impl Money {
    /// In USD.
    pub fn usd(self) -> f64 {
        self.0 as f64 / 1e12
    }
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("Money", 2)?;
        st.serialize_field("usd", &self.usd())?;
        st.serialize_field("picousd", &self.0.to_string())?;
        st.end()
    }
}

/// Latency percentiles (nearest rank), in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

/// The seed's `get_request_stats`, plus percentiles and exact cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Records in the period.
    pub total_requests: u64,
    /// Records with `status_code >= 400`.
    pub failed_requests: u64,
    /// failed / total (0 for an empty period).
    pub failure_ratio: f64,
    /// Total cost.
    pub total_cost: Money,
    /// Sum of `total_tokens`.
    pub total_tokens: i64,
    /// Sum of `prompt_tokens`.
    pub prompt_tokens: i64,
    /// Sum of `completion_tokens`.
    pub completion_tokens: i64,
    /// Mean `latency_ms` (`null` for an empty period).
    pub avg_latency_ms: Option<f64>,
    /// `latency_ms` percentiles.
    pub latency_ms: Percentiles,
    /// Per model, most requests first.
    pub models: Vec<ModelStats>,
    /// The most frequent error messages.
    pub errors: Vec<ErrorCount>,
    /// The users with the most requests.
    pub top_users: Vec<UserStats>,
}

/// One model's share.
#[derive(Clone, Debug, Serialize)]
pub struct ModelStats {
    /// `model` as requested.
    pub model: String,
    /// Records.
    pub requests: u64,
    /// Cost.
    pub cost: Money,
    /// Mean latency.
    pub avg_latency_ms: Option<f64>,
}

/// An error message and how often it occurred.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorCount {
    /// `error_message`.
    pub error: String,
    /// Records.
    pub count: u64,
}

/// One user's share.
#[derive(Clone, Debug, Serialize)]
pub struct UserStats {
    /// `user_id`.
    pub user_id: String,
    /// Records.
    pub requests: u64,
    /// Cost.
    pub cost: Money,
}

/// A request hash and how often it was seen.
#[derive(Clone, Debug, Serialize)]
pub struct HashCount {
    /// `request_hash`.
    pub request_hash: String,
    /// Records.
    pub count: u64,
}

/// One anomaly found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// The seed's anomaly type (`HIGH_REQUEST_RATE`, …), also the alert rules' `anomaly` label.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `CRITICAL`, `WARNING` or `INFO`.
    pub severity: &'static str,
    /// The Prometheus alert watching the same condition.
    pub alert: &'static str,
    /// What it is about (a user, a request hash, a model), when not the whole period.
    pub subject: Option<String>,
    /// The measured value.
    pub value: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// One line for people.
    pub details: String,
    /// What to do.
    pub recommendation: &'static str,
}

impl Finding {
    fn new(
        a: Anomaly,
        subject: Option<String>,
        value: f64,
        threshold: f64,
        details: String,
    ) -> Self {
        Self {
            kind: a.name,
            severity: a.severity.upper(),
            alert: a.alert,
            subject,
            value,
            threshold,
            details,
            recommendation: a.recommendation,
        }
    }
}

/// Why a report or another read of the log could not be made (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No file.
    #[error("no audit log at {0}")]
    Missing(String),
    /// Not SQLite, or no `audit_logs` table.
    #[error("{path} is not an llm-audit database: {reason}")]
    NotAuditLog {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Opens an audit log read-only (never creating one), checking it has an `audit_logs` table.
pub fn open_read_only(path: &Path) -> Result<Connection, OpenError> {
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(OpenError::Missing(shown));
    }
    let not_log = |reason: String| OpenError::NotAuditLog {
        path: shown.clone(),
        reason,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| not_log(e.to_string()))?;
    let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
    let has_table = crate::store::schema::exists(&conn, "table", "audit_logs")
        .map_err(|e| not_log(e.to_string()))?;
    if !has_table {
        return Err(not_log("it has no audit_logs table".into()));
    }
    Ok(conn)
}

/// Reads the whole report from `conn`.
pub fn build(
    conn: &Connection,
    database: &str,
    period: Period,
    thresholds: &ThresholdsConfig,
    generated_at: String,
) -> rusqlite::Result<Report> {
    // One read transaction: every query sees the same snapshot of a log that the proxy may be
    // writing (or pruning) meanwhile, so totals and breakdowns add up.
    let snapshot = conn.unchecked_transaction()?;
    let q = Queries::new(conn, &period)?;
    let stats = q.stats()?;
    let (anomalies, repeated_hashes) = q.anomalies(&stats, thresholds)?;
    snapshot.commit()?;
    Ok(Report {
        report_version: 1,
        generated_at,
        database: database.to_owned(),
        period,
        thresholds: thresholds.clone(),
        stats,
        anomalies,
        repeated_hashes,
    })
}

struct Queries<'c> {
    conn: &'c Connection,
    period: &'c Period,
    /// Per-row cost in picodollars; rows of an upgraded seed database have only `cost_usd`.
    cost: &'static str,
    has_ours: bool,
    /// The period's upper bound ([`END_OF_TIME`] when open-ended).
    until: &'c str,
    /// The table, pinned to the timestamp index when there is one: grouping queries otherwise
    /// walk the model/user/hash index over the whole log, however short the period.
    from: &'static str,
}

/// The period filter; `?1` since, `?2` until (NULL: none).
const IN_PERIOD: &str = "timestamp >= ?1 AND timestamp < ?2";

/// The upper bound of an open-ended period: after any timestamp the log can hold. Binding a
/// bound always lets SQLite range-scan the timestamp index from both ends.
const END_OF_TIME: &str = "9999-12-31T23:59:59.999999Z";

impl<'c> Queries<'c> {
    fn new(conn: &'c Connection, period: &'c Period) -> rusqlite::Result<Self> {
        let has_ours = schema::has_column(conn, "cost_picousd")?;
        let cost = if has_ours {
            "(CASE WHEN cost_picousd = 0 AND cost_usd > 0 \
             THEN CAST(ROUND(cost_usd * 1e12) AS INTEGER) ELSE cost_picousd END)"
        } else {
            "CAST(ROUND(COALESCE(cost_usd, 0) * 1e12) AS INTEGER)"
        };
        let has_time_index = schema::exists(conn, "index", "idx_timestamp")?;
        Ok(Self {
            conn,
            period,
            cost,
            has_ours,
            until: period.until.as_deref().unwrap_or(END_OF_TIME),
            from: if has_time_index {
                "audit_logs INDEXED BY idx_timestamp"
            } else {
                "audit_logs"
            },
        })
    }

    /// `SUM` of the cost as two 32-bit halves: neither can overflow an i64 below 2^31 rows.
    fn cost_sums(&self) -> String {
        format!(
            "COALESCE(SUM({c} >> 32), 0), COALESCE(SUM({c} & 4294967295), 0)",
            c = self.cost
        )
    }

    fn stats(&self) -> rusqlite::Result<Stats> {
        let from = self.from;
        let p = params![self.period.since, self.until];
        let mut s = self.conn.query_row(
            &format!(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END), 0), \
                 {}, COALESCE(SUM(total_tokens), 0), COALESCE(SUM(prompt_tokens), 0), \
                 COALESCE(SUM(completion_tokens), 0), AVG(latency_ms) \
                 FROM {from} WHERE {IN_PERIOD}",
                self.cost_sums()
            ),
            p,
            |r| {
                Ok(Stats {
                    total_requests: r.get::<_, i64>(0)? as u64,
                    failed_requests: r.get::<_, i64>(1)? as u64,
                    total_cost: money(r.get(2)?, r.get(3)?),
                    total_tokens: r.get(4)?,
                    prompt_tokens: r.get(5)?,
                    completion_tokens: r.get(6)?,
                    avg_latency_ms: r.get(7)?,
                    ..Stats::default()
                })
            },
        )?;
        if s.total_requests > 0 {
            s.failure_ratio = s.failed_requests as f64 / s.total_requests as f64;
        }
        s.latency_ms = self.percentiles()?;
        s.models = self
            .conn
            .prepare(&format!(
                "SELECT model, COUNT(*) AS n, {}, AVG(latency_ms) FROM {from} \
                 WHERE {IN_PERIOD} GROUP BY model ORDER BY n DESC, model",
                self.cost_sums()
            ))?
            .query_map(p, |r| {
                Ok(ModelStats {
                    model: r.get(0)?,
                    requests: r.get::<_, i64>(1)? as u64,
                    cost: money(r.get(2)?, r.get(3)?),
                    avg_latency_ms: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        s.errors = self
            .conn
            .prepare(&format!(
                "SELECT error_message, COUNT(*) AS n FROM {from} \
                 WHERE {IN_PERIOD} AND error_message IS NOT NULL \
                 GROUP BY error_message ORDER BY n DESC, error_message LIMIT {TOP_ERRORS}"
            ))?
            .query_map(p, |r| {
                Ok(ErrorCount {
                    error: r.get(0)?,
                    count: r.get::<_, i64>(1)? as u64,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        s.top_users = self
            .conn
            .prepare(&format!(
                "SELECT user_id, COUNT(*) AS n, {} FROM {from} \
                 WHERE {IN_PERIOD} AND user_id IS NOT NULL \
                 GROUP BY user_id ORDER BY n DESC, user_id LIMIT {TOP_USERS}",
                self.cost_sums()
            ))?
            .query_map(p, |r| {
                Ok(UserStats {
                    user_id: r.get(0)?,
                    requests: r.get::<_, i64>(1)? as u64,
                    cost: money(r.get(2)?, r.get(3)?),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(s)
    }

    /// Nearest-rank percentiles, exact, by radix selection over the latencies' bit patterns:
    /// a few sequential scans with 65,536 counters each instead of sorting every row, so time
    /// stays linear and memory flat however many rows the period has.
    fn percentiles(&self) -> rusqlite::Result<Percentiles> {
        let from = self.from;
        let mut stmt = self.conn.prepare(&format!(
            "SELECT latency_ms FROM {from} WHERE {IN_PERIOD} AND latency_ms IS NOT NULL"
        ))?;
        let mut scan = |f: &mut dyn FnMut(f64)| -> rusqlite::Result<()> {
            let mut rows = stmt.query(params![self.period.since, self.until])?;
            while let Some(row) = rows.next()? {
                f(row.get(0)?);
            }
            Ok(())
        };
        let found = select_quantiles(&mut scan, &[0.50, 0.95, 0.99])?;
        Ok(Percentiles {
            p50: found[0],
            p95: found[1],
            p99: found[2],
        })
    }

    fn anomalies(
        &self,
        s: &Stats,
        t: &ThresholdsConfig,
    ) -> rusqlite::Result<(Vec<Finding>, Vec<HashCount>)> {
        let from = self.from;
        let p = params![self.period.since, self.until];
        let mut out = Vec::new();
        let minutes = self.period.minutes;

        // 1. Requests per minute over the period (the seed: COUNT(*) / minutes).
        let rpm = if minutes > 0.0 {
            s.total_requests as f64 / minutes
        } else {
            0.0
        };
        if rpm > t.requests_per_minute {
            out.push(Finding::new(
                rules::HIGH_REQUEST_RATE,
                None,
                rpm,
                t.requests_per_minute,
                format!(
                    "{rpm:.1} requests per minute (threshold: {})",
                    t.requests_per_minute
                ),
            ));
        }

        // 2. Failure ratio, judged only above the low-volume guard.
        if s.total_requests > t.min_requests_for_failure_ratio
            && s.failure_ratio > t.failed_requests_ratio
        {
            out.push(Finding::new(
                rules::HIGH_FAILURE_RATE,
                None,
                s.failure_ratio,
                t.failed_requests_ratio,
                format!(
                    "{:.1}% of {} requests failed (threshold: {}% with more than {} requests)",
                    s.failure_ratio * 100.0,
                    s.total_requests,
                    t.failed_requests_ratio * 100.0,
                    t.min_requests_for_failure_ratio
                ),
            ));
        }

        // 3. Cost in the last hour of the period.
        let (hi, lo): (i64, i64) = self.conn.query_row(
            &format!("SELECT {} FROM {from} WHERE {IN_PERIOD}", self.cost_sums()),
            params![self.period.last_hour_since, self.until],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let hourly = money(hi, lo).usd();
        if hourly > t.max_cost_per_hour_usd {
            out.push(Finding::new(
                rules::COST_OVERRUN,
                None,
                hourly,
                t.max_cost_per_hour_usd,
                format!(
                    "${hourly:.2} in the last hour (threshold: ${})",
                    t.max_cost_per_hour_usd
                ),
            ));
        }

        // 4. Users whose largest request exceeds the token limit.
        let mut stmt = self.conn.prepare(&format!(
            // Filtering rows before grouping finds the same users as the seed's
            // `HAVING MAX(total_tokens) > ?` without grouping every row.
            "SELECT user_id, MAX(total_tokens) AS m FROM {from} \
             WHERE {IN_PERIOD} AND user_id IS NOT NULL AND total_tokens > ?3 \
             GROUP BY user_id ORDER BY m DESC, user_id"
        ))?;
        let users = stmt.query_map(
            params![
                self.period.since,
                self.until,
                t.max_tokens_per_request as i64
            ],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )?;
        for u in users {
            let (user, max) = u?;
            out.push(Finding::new(
                rules::EXCESSIVE_TOKEN_USAGE,
                Some(user.clone()),
                max as f64,
                t.max_tokens_per_request as f64,
                format!(
                    "user {user}: a request of {max} tokens (threshold: {})",
                    t.max_tokens_per_request
                ),
            ));
        }

        // 5. Repeated prompts: each hash seen more than the threshold, and the share of
        //    requests that repeat an earlier one.
        // One grouping pass gives both the most repeated hashes and, through the window
        // totals over all groups, how many requests repeated an earlier one.
        let mut repeated: Vec<HashCount> = Vec::new();
        let (mut hashed, mut distinct) = (0i64, 0i64);
        let mut stmt = self.conn.prepare(&format!(
            "WITH g AS (SELECT request_hash, COUNT(*) AS n FROM {from} \
             WHERE {IN_PERIOD} AND request_hash IS NOT NULL AND request_hash != '' \
             GROUP BY request_hash) \
             SELECT request_hash, n, SUM(n) OVER (), COUNT(*) OVER () FROM g \
             ORDER BY n DESC, request_hash LIMIT {MAX_REPEATED_HASHES}"
        ))?;
        let mut rows = stmt.query(p)?;
        while let Some(r) = rows.next()? {
            hashed = r.get(2)?;
            distinct = r.get(3)?;
            let count = r.get::<_, i64>(1)? as u64;
            if count > t.repeated_request_count {
                repeated.push(HashCount {
                    request_hash: r.get(0)?,
                    count,
                });
            }
        }
        for h in &repeated {
            out.push(Finding::new(
                rules::REPEATED_REQUESTS,
                Some(h.request_hash.clone()),
                h.count as f64,
                t.repeated_request_count as f64,
                format!(
                    "request hash {}: sent {} times (threshold: {})",
                    h.request_hash, h.count, t.repeated_request_count
                ),
            ));
        }
        if s.total_requests > t.min_requests_for_failure_ratio {
            let ratio = (hashed - distinct) as f64 / s.total_requests as f64;
            if ratio > t.duplicate_request_ratio {
                out.push(Finding::new(
                    rules::REPEATED_REQUESTS,
                    None,
                    ratio,
                    t.duplicate_request_ratio,
                    format!(
                        "{:.1}% of {} requests repeated an earlier prompt (threshold: {}%)",
                        ratio * 100.0,
                        s.total_requests,
                        t.duplicate_request_ratio * 100.0
                    ),
                ));
            }
        }

        // Ours, as in the alert rules: calls priced by fallback or not at all, per model…
        if self.has_ours {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT model, COUNT(*) AS n FROM {from} WHERE {IN_PERIOD} \
                 AND cost_status != 'priced' AND usage_source != 'missing' \
                 GROUP BY model ORDER BY n DESC, model"
            ))?;
            for m in stmt.query_map(p, |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (model, n) = m?;
                out.push(Finding::new(
                    rules::UNPRICED_MODEL,
                    Some(model.clone()),
                    n as f64,
                    0.0,
                    format!("{n} call(s) to {model} priced at the fallback rate or not at all"),
                ));
            }
        }
        // …and failed authentications: 401s the proxy answered itself (never sent upstream,
        // so no attempt), as `llm_audit_auth_failures_total` counts them. An upstream 401
        // (a bad key passed through) is a failed call, not a failed authentication here.
        let rejected = if self.has_ours {
            " AND attempts = 0"
        } else {
            ""
        };
        let auth: i64 = self.conn.query_row(
            &format!(
                "SELECT COUNT(*) FROM {from} WHERE {IN_PERIOD} AND status_code = 401{rejected}"
            ),
            p,
            |r| r.get(0),
        )?;
        if auth as u64 > t.max_auth_failures {
            out.push(Finding::new(
                rules::AUTH_FAILURES,
                None,
                auth as f64,
                t.max_auth_failures as f64,
                format!(
                    "{auth} failed authentications (threshold: {})",
                    t.max_auth_failures
                ),
            ));
        }
        Ok((out, repeated))
    }
}

/// Feeds every value of a column to the callback, once per call.
pub type Scan<'a> = dyn FnMut(&mut dyn FnMut(f64)) -> rusqlite::Result<()> + 'a;

/// A total order on f64 as u64 (negative values below positive ones).
fn order_key(v: f64) -> u64 {
    let b = v.to_bits();
    if b >> 63 == 1 { !b } else { b | 1 << 63 }
}

/// The nearest-rank quantiles `qs` of the values `scan` yields (each call must yield the same
/// values), exactly, with a radix selection: each pass counts 16 more bits of the values' order
/// keys under the prefixes chosen so far; a bucket small enough is then collected and sorted.
/// Memory: 65,536 counters per quantile plus at most [`COLLECT_AT_MOST`] values.
pub fn select_quantiles(scan: &mut Scan<'_>, qs: &[f64]) -> rusqlite::Result<Vec<Option<f64>>> {
    const COLLECT_AT_MOST: u64 = 65_536;
    let mut n = 0u64;
    scan(&mut |_| n += 1)?;
    if n == 0 {
        return Ok(vec![None; qs.len()]);
    }
    // Per quantile: the key prefix chosen so far, its bit length, and the rank within it.
    struct Target {
        prefix: u64,
        bits: u32,
        rank: u64,
        in_bucket: u64,
    }
    let mut targets: Vec<Target> = qs
        .iter()
        .map(|q| Target {
            prefix: 0,
            bits: 0,
            rank: ((q * n as f64).ceil() as u64).clamp(1, n),
            in_bucket: n,
        })
        .collect();
    let matches = |t: &Target, key: u64| t.bits == 0 || key >> (64 - t.bits) == t.prefix;
    while targets
        .iter()
        .any(|t| t.in_bucket > COLLECT_AT_MOST && t.bits < 64)
    {
        let mut counts = vec![vec![0u64; 1 << 16]; targets.len()];
        scan(&mut |v| {
            let key = order_key(v);
            for (t, c) in targets.iter().zip(counts.iter_mut()) {
                if t.in_bucket > COLLECT_AT_MOST && t.bits < 64 && matches(t, key) {
                    c[((key << t.bits) >> 48) as usize] += 1;
                }
            }
        })?;
        for (t, c) in targets.iter_mut().zip(&counts) {
            if !(t.in_bucket > COLLECT_AT_MOST && t.bits < 64) {
                continue;
            }
            let mut below = 0u64;
            for (digit, &count) in c.iter().enumerate() {
                if below + count >= t.rank {
                    t.prefix = (t.prefix << 16) | digit as u64;
                    t.bits += 16;
                    t.rank -= below;
                    t.in_bucket = count;
                    break;
                }
                below += count;
            }
        }
    }
    // Every bucket is now small (or a single key): collect and pick.
    let mut buckets: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    scan(&mut |v| {
        let key = order_key(v);
        for (t, b) in targets.iter().zip(buckets.iter_mut()) {
            if matches(t, key) {
                b.push(v);
            }
        }
    })?;
    Ok(targets
        .iter()
        .zip(buckets.iter_mut())
        .map(|(t, b)| {
            b.sort_by(f64::total_cmp);
            b.get(t.rank as usize - 1).copied()
        })
        .collect())
}

/// Picodollars from the two 32-bit halves summed by SQLite.
fn money(hi: i64, lo: i64) -> Money {
    Money((i128::from(hi) << 32) + i128::from(lo))
}

/// `llm-audit report`.
pub fn run(args: crate::cli::ReportArgs) -> anyhow::Result<std::process::ExitCode> {
    use std::io::{IsTerminal as _, Write as _};

    let now = chrono::Utc::now();
    let cfg = crate::config::Config::load(args.config.as_deref(), std::env::vars())?;
    crate::rules::validate(&cfg.thresholds)?;
    let db = args.db.clone().unwrap_or_else(|| cfg.store.path.clone());
    let (since, until) = match (&args.since, args.hours) {
        (Some(s), _) => (crate::period::parse_time(s, now)?, None),
        (None, h) => {
            let h = h.unwrap_or(24.0);
            anyhow::ensure!(
                h.is_finite() && h > 0.0,
                "--hours must be a positive number"
            );
            let since = chrono::Duration::try_milliseconds((h * 3_600_000.0) as i64)
                .and_then(|d| now.checked_sub_signed(d))
                .ok_or_else(|| anyhow::anyhow!("--hours {h} reaches before any date"))?;
            (since, None)
        }
    };
    let until = match &args.until {
        Some(u) => Some(crate::period::parse_time(u, now)?),
        None => until,
    };
    anyhow::ensure!(
        since < until.unwrap_or(now),
        "the period is empty: --since must be before --until"
    );
    let period = Period::new(since, until, now);
    let conn = open_read_only(&db)?;
    let report = build(
        &conn,
        &db.display().to_string(),
        period,
        &cfg.thresholds,
        crate::period::stamp(now),
    )?;
    let stdout = std::io::stdout();
    let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let text = match args.format {
        crate::cli::ReportFormat::Text => render::text(&report, colour),
        crate::cli::ReportFormat::Markdown => render::markdown(&report),
        crate::cli::ReportFormat::Json => {
            let mut s = serde_json::to_string_pretty(&report)?;
            s.push('\n');
            s
        }
    };
    let mut out = stdout.lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantiles(values: &[f64], qs: &[f64]) -> Vec<Option<f64>> {
        let mut scan = |f: &mut dyn FnMut(f64)| -> rusqlite::Result<()> {
            values.iter().copied().for_each(f);
            Ok(())
        };
        select_quantiles(&mut scan, qs).unwrap_or_default()
    }

    fn nearest_rank(values: &[f64], q: f64) -> Option<f64> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v.get(rank - 1).copied()
    }

    #[test]
    fn radix_selection_is_exact() {
        let mut rng = fastrand::Rng::with_seed(3);
        let shapes: Vec<Vec<f64>> = vec![
            (0..300_000).map(|_| rng.f64() * 2_000.0).collect(),
            vec![42.0; 200_000],
            (0..200_000)
                .map(|i| if i % 2 == 0 { 1.5 } else { 1.5 + f64::EPSILON })
                .collect(),
            (0..100_000).map(|i| -(i as f64)).collect(),
            vec![7.0],
            (0..10).map(f64::from).collect(),
        ];
        for values in shapes {
            let qs = [0.5, 0.95, 0.99];
            let want: Vec<Option<f64>> = qs.iter().map(|&q| nearest_rank(&values, q)).collect();
            assert_eq!(quantiles(&values, &qs), want);
        }
        assert_eq!(quantiles(&[], &[0.5]), vec![None]);
    }
}
