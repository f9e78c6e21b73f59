#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The audit store against a real SQLite file (DESIGN §3, §4): every record lands, in one
//! unbroken hash chain, whatever the concurrency; tampering is named; the seed's columns and
//! queries still work; a failing store follows its failure mode and counts what it loses;
//! shutdown loses nothing; `sync` durability means committed.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_audit::Recorder;
use llm_audit::audit::usage::parse_json_response;
use llm_audit::audit::{
    AuditRecord, CallEnd, CallStart, Emitted, Operation, ParsedRequest, PriceTable, ResponseSummary,
};
use llm_audit::config::{AuditConfig, Durability, OnStoreFailure, Secret};
use llm_audit::store::chain::{self, BreakKind, ChainReport, GENESIS};
use llm_audit::store::{Dropped, Store, schema};
use llm_audit::telemetry::Metrics;
use rusqlite::{Connection, OptionalExtension as _};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// Longest wait for the writer to reach a state; the tests poll, they do not sleep-and-hope.
const DEADLINE: Duration = Duration::from_secs(5);

const MODELS: [&str; 4] = [
    "gpt-4.1",
    "deepseek-chat",
    "gemini-2.5-flash",
    "my-local-llama",
];

fn call(model: &str, user: &str, content: &str) -> CallStart {
    let body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a security analyst."},
            {"role": "user", "content": content},
        ],
        "user": user,
    });
    let req = ParsedRequest::from_value(Operation::Chat, body, None).unwrap();
    CallStart::from_request(req, Arc::from("openai"))
}

fn answer(model: &str, prompt: i64, completion: i64, text: &str) -> ResponseSummary {
    let body = json!({
        "id": format!("chatcmpl-{prompt}-{completion}"),
        "object": "chat.completion",
        "created": 1_750_000_000,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    });
    parse_json_response(body.to_string().as_bytes()).unwrap()
}

/// One successful call through the real recorder.
fn record_ok(recorder: &Recorder, i: usize) -> Emitted {
    let model = MODELS[i % MODELS.len()];
    let flight = recorder.begin(call(model, &format!("user-{}", i % 7), &format!("q{i}")));
    let tokens = i64::try_from(i).unwrap();
    flight.finish(CallEnd::ok(
        200,
        answer(
            model,
            100 + tokens,
            10 + tokens % 50,
            &format!("answer {i}"),
        ),
    ))
}

fn open(db: &Path) -> Connection {
    let conn = Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

fn verify(db: &Path, key: Option<&Secret>) -> ChainReport {
    chain::verify(&open(db), key).unwrap()
}

fn count_rows(conn: &Connection) -> i64 {
    conn.query_row("SELECT COUNT(*) FROM audit_logs", [], |r| r.get(0))
        .unwrap()
}

/// `(id, request_id, prev_hash, record_hash)` in id order.
fn links(conn: &Connection) -> Vec<(i64, String, String, String)> {
    let mut stmt = conn
        .prepare("SELECT id, request_id, prev_hash, record_hash FROM audit_logs ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn assert_linked(rows: &[(i64, String, String, String)]) {
    let mut prev = GENESIS.to_owned();
    for (id, _, prev_hash, record_hash) in rows {
        assert_eq!(
            prev_hash, &prev,
            "row {id}: prev_hash is not the previous record_hash"
        );
        assert_eq!(
            record_hash.len(),
            64,
            "row {id}: record_hash is not SHA-256 hex"
        );
        prev.clone_from(record_hash);
    }
}

fn read_record(conn: &Connection, id: i64) -> AuditRecord {
    conn.query_row(
        &format!("{} WHERE id = ?1", schema::select_sql()),
        [id],
        schema::from_row,
    )
    .unwrap()
    .1
}

fn insert_record(conn: &Connection, record: &AuditRecord) {
    let mut stmt = conn.prepare_cached(&schema::insert_sql()).unwrap();
    schema::insert(&mut stmt, record).unwrap();
}

/// Polls `cond` until it holds or [`DEADLINE`] passes.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn dropped(h: &common::Harness, reason: &str) -> u64 {
    h.metrics.records_dropped.with_label_values(&[reason]).get()
}

fn inject_failure(db: &Path) -> Connection {
    let conn = open(db);
    conn.execute_batch(
        "CREATE TRIGGER fail BEFORE INSERT ON audit_logs BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    )
    .unwrap();
    conn
}

fn heal(conn: &Connection) {
    conn.execute_batch("DROP TRIGGER fail;").unwrap();
}

// ── 1. Concurrency ──────────────────────────────────────────────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_all_land_in_one_unbroken_chain() {
    const TASKS: usize = 40;
    const PER_TASK: usize = 50;
    const N: usize = TASKS * PER_TASK;
    let h = common::harness();

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let recorder = h.recorder.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let e = record_ok(&recorder, t * PER_TASK + i);
                assert_eq!(e.dropped, None);
                out.push((e.record.request_id.clone(), e.record.record_hash.clone()));
                tokio::task::yield_now().await;
            }
            out
        }));
    }
    // What each call put on its span: the record hash is the independent copy of the link.
    let mut emitted: HashMap<String, String> = HashMap::new();
    for t in tasks {
        emitted.extend(t.await.unwrap());
    }
    assert_eq!(emitted.len(), N);
    h.store.shutdown_async().await;

    let conn = open(&h.db);
    let rows = links(&conn);
    assert_eq!(rows.len(), N);
    assert_linked(&rows);
    let hashes: HashSet<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    assert_eq!(hashes.len(), N, "record hashes must be unique");
    for (_, request_id, _, record_hash) in &rows {
        assert_eq!(
            emitted.get(request_id),
            Some(record_hash),
            "the stored link differs from the one emitted for {request_id}"
        );
    }
    let report = verify(&h.db, None);
    assert_eq!(report.rows, N as u64);
    assert_eq!(report.first_break, None);
    assert_eq!(h.metrics.records_written.get(), N as u64);
    for reason in ["queue_full", "closed", "write_failed"] {
        assert_eq!(dropped(&h, reason), 0, "{reason}");
    }
    assert_eq!(h.metrics.store_errors.get(), 0);
    assert_eq!(h.metrics.store_queue_depth.get(), 0);
}

// ── 2. Tamper evidence ──────────────────────────────────────────────────────────────────────

/// A committed log of `n` records; returns the harness (store shut down).
fn committed_log(n: usize) -> common::Harness {
    let h = common::harness();
    for i in 0..n {
        assert_eq!(record_ok(&h.recorder, i).dropped, None);
    }
    h.store.shutdown();
    h
}

/// A consistent copy of the log, to tamper with.
fn copy_of(h: &common::Harness, name: &str) -> std::path::PathBuf {
    let path = h.dir.path().join(name);
    open(&h.db)
        .execute("VACUUM INTO ?1", [path.to_str().unwrap()])
        .unwrap();
    path
}

fn request_id_of(conn: &Connection, id: i64) -> String {
    conn.query_row(
        "SELECT request_id FROM audit_logs WHERE id = ?1",
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

fn assert_break(db: &Path, key: Option<&Secret>, row_id: i64, request_id: &str, kind: BreakKind) {
    let report = verify(db, key);
    let b = report
        .first_break
        .unwrap_or_else(|| panic!("tampering at row {row_id} was not detected"));
    assert_eq!(
        (b.row_id, b.request_id.as_str(), b.kind),
        (row_id, request_id, kind)
    );
    // Rows up to and including the bad one were checked, none after it.
    assert_eq!(report.rows, u64::try_from(row_id).unwrap());
}

#[test]
fn tampering_is_detected_and_names_the_row() {
    let h = committed_log(10);

    // Untouched.
    let report = verify(&h.db, None);
    assert_eq!((report.rows, report.first_break), (10, None));
    let pristine = copy_of(&h, "pristine.db");
    let report = verify(&pristine, None);
    assert_eq!((report.rows, report.first_break), (10, None));

    // A cost edited.
    let db = copy_of(&h, "cost.db");
    let conn = open(&db);
    conn.execute(
        "UPDATE audit_logs SET cost_usd = cost_usd / 2 WHERE id = 4",
        [],
    )
    .unwrap();
    assert_break(
        &db,
        None,
        4,
        &request_id_of(&conn, 4),
        BreakKind::HashMismatch,
    );

    // A model renamed.
    let db = copy_of(&h, "model.db");
    let conn = open(&db);
    conn.execute(
        "UPDATE audit_logs SET model = 'gpt-4.1-mini' WHERE id = 6",
        [],
    )
    .unwrap();
    assert_break(
        &db,
        None,
        6,
        &request_id_of(&conn, 6),
        BreakKind::HashMismatch,
    );

    // The exact cost column is chained too.
    let db = copy_of(&h, "pico.db");
    let conn = open(&db);
    conn.execute("UPDATE audit_logs SET cost_picousd = 0 WHERE id = 2", [])
        .unwrap();
    assert_break(
        &db,
        None,
        2,
        &request_id_of(&conn, 2),
        BreakKind::HashMismatch,
    );

    // A row's own hash recomputed after an edit: the next row no longer follows it.
    let db = copy_of(&h, "rehash.db");
    let conn = open(&db);
    let mut r = read_record(&conn, 3);
    r.user_id = Some("someone-else".into());
    r.record_hash = chain::link_hash(&r.prev_hash, &chain::canonical_bytes(&r), None);
    conn.execute(
        "UPDATE audit_logs SET user_id = ?1, record_hash = ?2 WHERE id = 3",
        (&r.user_id, &r.record_hash),
    )
    .unwrap();
    assert_break(
        &db,
        None,
        4,
        &request_id_of(&conn, 4),
        BreakKind::PrevMismatch,
    );

    // A middle row deleted.
    let db = copy_of(&h, "delete.db");
    let conn = open(&db);
    conn.execute("DELETE FROM audit_logs WHERE id = 5", [])
        .unwrap();
    let report = verify(&db, None);
    let b = report.first_break.unwrap();
    assert_eq!(
        (b.row_id, b.request_id, b.kind),
        (6, request_id_of(&conn, 6), BreakKind::PrevMismatch)
    );

    // The first row deleted.
    let db = copy_of(&h, "delete-first.db");
    let conn = open(&db);
    conn.execute("DELETE FROM audit_logs WHERE id = 1", [])
        .unwrap();
    let b = verify(&db, None).first_break.unwrap();
    assert_eq!((b.row_id, b.kind), (2, BreakKind::PrevMismatch));

    // A forged row appended: a copy of row 3 with a new request_id and a correct hash of its
    // own contents, but linked to row 3 instead of the last row.
    let db = copy_of(&h, "forged.db");
    let conn = open(&db);
    let mut forged = read_record(&conn, 3);
    forged.request_id = uuid::Uuid::now_v7().to_string();
    forged.cost_usd = 0.0;
    forged.cost_picousd = 0;
    forged.prev_hash = read_record(&conn, 3).record_hash;
    forged.record_hash =
        chain::link_hash(&forged.prev_hash, &chain::canonical_bytes(&forged), None);
    insert_record(&conn, &forged);
    assert_break(&db, None, 11, &forged.request_id, BreakKind::PrevMismatch);

    // A row replaced by a forged one that links correctly backwards: the forged row checks
    // out on its own, the row after it no longer follows.
    let db = copy_of(&h, "replaced.db");
    let conn = open(&db);
    let mut forged = read_record(&conn, 5);
    conn.execute("DELETE FROM audit_logs WHERE id = 5", [])
        .unwrap();
    forged.request_id = uuid::Uuid::now_v7().to_string();
    forged.completion_tokens += 1000;
    forged.record_hash =
        chain::link_hash(&forged.prev_hash, &chain::canonical_bytes(&forged), None);
    insert_record(&conn, &forged);
    conn.execute(
        "UPDATE audit_logs SET id = 5 WHERE request_id = ?1",
        [&forged.request_id],
    )
    .unwrap();
    assert_break(
        &db,
        None,
        6,
        &request_id_of(&conn, 6),
        BreakKind::PrevMismatch,
    );

    // A value the record type cannot hold.
    let db = copy_of(&h, "unreadable.db");
    let conn = open(&db);
    conn.execute(
        "UPDATE audit_logs SET usage_source = 'trust-me' WHERE id = 7",
        [],
    )
    .unwrap();
    assert_break(
        &db,
        None,
        7,
        &request_id_of(&conn, 7),
        BreakKind::Unreadable,
    );

    // The original was never touched.
    assert_eq!(verify(&h.db, None).first_break, None);
}

#[test]
fn chain_key_is_needed_to_verify_and_to_forge() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("chain.key");
    // Editors add a trailing newline; it is not part of the key.
    std::fs::write(&key_file, "k3y-f0r-th3-ch41n\n").unwrap();
    let h = common::harness_with(|cfg| cfg.store.chain_key_file = Some(key_file.clone()));
    let mut emitted = Vec::new();
    for i in 0..6 {
        emitted.push(record_ok(&h.recorder, i).record);
    }
    h.store.shutdown();
    let key = Secret::new("k3y-f0r-th3-ch41n");

    let report = verify(&h.db, Some(&key));
    assert_eq!((report.rows, report.first_break), (6, None));
    // Without the key (or with another one) not even the first row checks out.
    let conn = open(&h.db);
    let first = request_id_of(&conn, 1);
    assert_break(&h.db, None, 1, &first, BreakKind::HashMismatch);
    let wrong = Secret::new("k3y-f0r-th3-ch41n\n");
    assert_break(&h.db, Some(&wrong), 1, &first, BreakKind::HashMismatch);
    // The keyed link is the HMAC, and it is what went on the span.
    let last = &emitted[5];
    assert_eq!(
        last.record_hash,
        chain::link_hash(&last.prev_hash, &chain::canonical_bytes(last), Some(&key))
    );

    // An attacker without the key appends a row that links correctly to the last one.
    let mut forged = read_record(&conn, 6);
    forged.request_id = uuid::Uuid::now_v7().to_string();
    forged.prev_hash = forged.record_hash.clone();
    forged.record_hash =
        chain::link_hash(&forged.prev_hash, &chain::canonical_bytes(&forged), None);
    insert_record(&conn, &forged);
    assert_break(
        &h.db,
        Some(&key),
        7,
        &forged.request_id,
        BreakKind::HashMismatch,
    );
}

#[test]
fn without_a_chain_key_a_well_linked_append_is_undetectable() {
    // Documents why `chain_key` exists: plain SHA-256 links can be extended by anyone with
    // write access; only the keyed chain (and the span copies of `record_hash`) stop that.
    let h = committed_log(3);
    let conn = open(&h.db);
    let mut forged = read_record(&conn, 3);
    forged.request_id = uuid::Uuid::now_v7().to_string();
    forged.prev_hash = forged.record_hash.clone();
    forged.record_hash =
        chain::link_hash(&forged.prev_hash, &chain::canonical_bytes(&forged), None);
    insert_record(&conn, &forged);
    let report = verify(&h.db, None);
    assert_eq!((report.rows, report.first_break), (4, None));
}

#[test]
fn reopening_the_store_continues_the_chain() {
    let h = committed_log(5);
    let mut cfg = AuditConfig::default();
    cfg.store.path = h.db.clone();
    cfg.store.flush_interval.0 = Duration::from_millis(5);
    let metrics = Arc::new(Metrics::new(1000, 200, 100_000).unwrap());
    let store = Store::open(&cfg.store, metrics.clone()).unwrap();
    let recorder = Recorder::new(
        metrics.clone(),
        store.clone(),
        PriceTable::default(),
        cfg.capture.clone(),
        &cfg.thresholds,
        None,
    );
    let last_before = read_record(&open(&h.db), 5).record_hash;
    let first_after = record_ok(&recorder, 100).record;
    assert_eq!(first_after.prev_hash, last_before);
    for i in 101..105 {
        record_ok(&recorder, i);
    }
    store.shutdown();
    assert_eq!(metrics.records_written.get(), 5);
    let rows = links(&open(&h.db));
    assert_eq!(rows.len(), 10);
    assert_linked(&rows);
    assert_eq!(verify(&h.db, None).first_break, None);
}

// ── 3. Seed compatibility ───────────────────────────────────────────────────────────────────

#[test]
fn seed_columns_indexes_and_queries_still_work() {
    let h = common::harness();
    let started = chrono::Utc::now();

    // Before the window: 3 calls.
    for i in 0..3 {
        record_ok(&h.recorder, i);
    }
    std::thread::sleep(Duration::from_millis(3));
    // The seed computes `since` as `(datetime.utcnow() - timedelta(...)).isoformat()`:
    // microseconds, no `Z`.
    let since = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6f")
        .to_string();
    std::thread::sleep(Duration::from_millis(3));

    // In the window: 4 answered calls, a 500 and a 429.
    let mut expected_cost = 0.0;
    let mut expected_tokens = 0;
    for i in 10..14 {
        let e = record_ok(&h.recorder, i);
        expected_cost += e.record.cost_usd;
        expected_tokens += e.record.total_tokens;
    }
    let failed = h.recorder.begin(call("gpt-4.1", "mallory", "q500"));
    failed.finish(CallEnd::error(500, "upstream", "Internal server error"));
    let limited = h.recorder.begin(call("gpt-4.1", "mallory", "q429"));
    limited.finish(CallEnd::error(
        429,
        "upstream",
        "Rate limit reached for gpt-4.1",
    ));

    // The seed's preview is the first 200 characters of the answer; its request hash is
    // SHA-256 of json.dumps(messages, sort_keys=True, separators=(',', ':'), ensure_ascii=False).
    let long_answer: String = "Réponse détaillée — ".repeat(20);
    let f = h
        .recorder
        .begin(call("deepseek-chat", "zoë", "Résumé, s'il vous plaît"));
    let e = f.finish(CallEnd::ok(
        200,
        answer("deepseek-chat", 30, 400, &long_answer),
    ));
    expected_cost += e.record.cost_usd;
    expected_tokens += e.record.total_tokens;
    let python_dumps = r#"[{"content":"You are a security analyst.","role":"system"},{"content":"Résumé, s'il vous plaît","role":"user"}]"#;
    let seed_hash = hex::encode(Sha256::digest(python_dumps.as_bytes()));
    h.store.shutdown();
    let finished = chrono::Utc::now();

    let conn = open(&h.db);
    // Columns: the seed's names and declared types, in the seed's order.
    let mut stmt = conn.prepare("PRAGMA table_info(audit_logs)").unwrap();
    let columns: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let seed = [
        ("id", "INTEGER"),
        ("timestamp", "TEXT"),
        ("request_id", "TEXT"),
        ("model", "TEXT"),
        ("prompt_tokens", "INTEGER"),
        ("completion_tokens", "INTEGER"),
        ("total_tokens", "INTEGER"),
        ("latency_ms", "REAL"),
        ("status_code", "INTEGER"),
        ("cost_usd", "REAL"),
        ("user_id", "TEXT"),
        ("request_hash", "TEXT"),
        ("response_preview", "TEXT"),
        ("ip_address", "TEXT"),
        ("error_message", "TEXT"),
        ("created_at", "TIMESTAMP"),
    ];
    for (i, (name, ty)) in seed.iter().enumerate() {
        assert_eq!(
            (columns[i].0.as_str(), columns[i].1.as_str()),
            (*name, *ty),
            "seed column {i}"
        );
    }
    let names: HashSet<&str> = columns.iter().map(|c| c.0.as_str()).collect();
    for ours in [
        "provider",
        "endpoint",
        "response_model",
        "response_id",
        "stream",
        "finish_reason",
        "cached_tokens",
        "reasoning_tokens",
        "usage_source",
        "cost_status",
        "outcome",
        "ttft_ms",
        "key_id",
        "attempts",
        "trace_id",
        "span_id",
        "prev_hash",
        "record_hash",
    ] {
        assert!(names.contains(ours), "column {ours} missing");
    }
    // Indexes on timestamp, model, request_hash and user_id; request_id unique.
    let mut stmt = conn
        .prepare(
            "SELECT ii.name, il.\"unique\" FROM pragma_index_list('audit_logs') il \
             JOIN pragma_index_info(il.name) ii",
        )
        .unwrap();
    let indexed: Vec<(String, bool)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for col in ["timestamp", "model", "request_hash", "user_id"] {
        assert!(indexed.iter().any(|(c, _)| c == col), "no index on {col}");
    }
    assert!(indexed.contains(&("request_id".to_owned(), true)));

    // The seed's statistics query.
    let (total, failures, cost, tokens, avg_latency): (i64, i64, f64, i64, f64) = conn
        .query_row(
            "SELECT COUNT(*) as total_requests, \
             SUM(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END) as failed_requests, \
             SUM(cost_usd) as total_cost, SUM(total_tokens) as total_tokens, \
             AVG(latency_ms) as avg_latency FROM audit_logs WHERE timestamp >= ?",
            [&since],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!((total, failures, tokens), (7, 2, expected_tokens));
    assert!(
        (cost - expected_cost).abs() < 1e-12,
        "{cost} vs {expected_cost}"
    );
    assert!(avg_latency >= 0.0);
    assert_eq!(count_rows(&conn), 10);
    // Its error breakdown and top users.
    let errors: Vec<(String, i64)> = conn
        .prepare(
            "SELECT error_message, COUNT(*) as count FROM audit_logs \
             WHERE timestamp >= ? AND error_message IS NOT NULL \
             GROUP BY error_message ORDER BY count DESC LIMIT 10",
        )
        .unwrap()
        .query_map([&since], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(errors.len(), 2);
    assert!(errors.contains(&("Internal server error".into(), 1)));
    let mallory: (i64, f64) = conn
        .query_row(
            "SELECT COUNT(*), SUM(cost_usd) FROM audit_logs \
             WHERE timestamp >= ? AND user_id = 'mallory'",
            [&since],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(mallory, (2, 0.0));

    // Timestamps: `YYYY-MM-DDTHH:MM:SS.ffffffZ`, UTC, within the test; created_at filled.
    let mut stmt = conn
        .prepare("SELECT timestamp, created_at FROM audit_logs ORDER BY id")
        .unwrap();
    let stamps: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let lower = started - chrono::Duration::milliseconds(1);
    let upper = finished + chrono::Duration::milliseconds(1);
    for (ts, created_at) in &stamps {
        let shape = "0000-00-00T00:00:00.000000Z";
        assert_eq!(ts.len(), shape.len(), "{ts}");
        for (c, s) in ts.chars().zip(shape.chars()) {
            if s == '0' {
                assert!(c.is_ascii_digit(), "{ts}");
            } else {
                assert_eq!(c, s, "{ts}");
            }
        }
        let parsed = chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H:%M:%S%.6fZ")
            .unwrap()
            .and_utc();
        assert!(lower <= parsed && parsed <= upper, "{ts} outside the test");
        assert!(
            chrono::NaiveDateTime::parse_from_str(created_at, "%Y-%m-%d %H:%M:%S").is_ok(),
            "created_at {created_at}"
        );
    }
    // Preview and request hash as the seed computed them.
    let (preview, hash, user): (String, String, String) = conn
        .query_row(
            "SELECT response_preview, request_hash, user_id FROM audit_logs WHERE user_id = 'zoë'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(preview, long_answer.chars().take(200).collect::<String>());
    assert_eq!(preview.chars().count(), 200);
    assert_eq!(hash, seed_hash);
    assert_eq!(user, "zoë");
    assert_eq!(verify(&h.db, None).first_break, None);
}

// ── 4. A store that cannot write ────────────────────────────────────────────────────────────

#[test]
fn continue_mode_keeps_accepting_counts_errors_and_recovers() {
    let h = common::harness();
    for i in 0..3 {
        record_ok(&h.recorder, i);
    }
    wait_for("the first records", || h.metrics.records_written.get() == 3);
    assert!(h.store.is_healthy());

    let saboteur = inject_failure(&h.db);
    for i in 3..13 {
        let e = record_ok(&h.recorder, i);
        assert_eq!(
            e.dropped, None,
            "continue mode accepts records while failing"
        );
        assert_eq!(e.record.record_hash.len(), 64);
    }
    wait_for("store errors", || {
        h.metrics.store_errors.get() >= 2 && !h.store.is_healthy()
    });
    assert!(h.store.accepting(), "continue mode keeps serving");
    assert_eq!(h.metrics.records_written.get(), 3);
    assert_eq!(count_rows(&saboteur), 3, "a failed batch commits nothing");

    heal(&saboteur);
    wait_for("recovery", || {
        h.metrics.records_written.get() == 13 && h.store.is_healthy()
    });
    h.store.shutdown();
    let conn = open(&h.db);
    assert_eq!(count_rows(&conn), 13);
    assert_linked(&links(&conn));
    assert_eq!(verify(&h.db, None).first_break, None);
    for reason in ["queue_full", "closed", "write_failed"] {
        assert_eq!(dropped(&h, reason), 0, "{reason}");
    }
}

#[test]
fn reject_mode_stops_accepting_while_failing_and_resumes() {
    let h = common::harness_with(|cfg| cfg.store.on_store_failure = OnStoreFailure::Reject);
    record_ok(&h.recorder, 0);
    wait_for("the first record", || h.metrics.records_written.get() == 1);
    assert!(h.store.accepting());

    let saboteur = inject_failure(&h.db);
    record_ok(&h.recorder, 1);
    wait_for("the store to fail", || !h.store.is_healthy());
    assert!(
        !h.store.accepting(),
        "reject mode refuses calls while the store fails"
    );
    assert!(h.metrics.store_errors.get() >= 1);

    heal(&saboteur);
    wait_for("recovery", || h.store.accepting());
    assert!(h.store.is_healthy());
    wait_for("the held record", || h.metrics.records_written.get() == 2);
    h.store.shutdown();
    assert_eq!(count_rows(&open(&h.db)), 2);
    assert_eq!(verify(&h.db, None).first_break, None);
}

#[test]
fn a_full_queue_drops_counted_records_without_breaking_the_chain() {
    const CAPACITY: usize = 4;
    let h = common::harness_with(|cfg| cfg.store.queue_capacity = CAPACITY);
    let saboteur = inject_failure(&h.db);

    // The writer takes the first record and keeps retrying it.
    let held = record_ok(&h.recorder, 0);
    assert_eq!(held.dropped, None);
    wait_for("the first failure", || h.metrics.store_errors.get() >= 1);

    let mut landed = vec![held.record.request_id.clone()];
    let mut lost = Vec::new();
    for i in 1..=12 {
        let e = record_ok(&h.recorder, i);
        match e.dropped {
            None => landed.push(e.record.request_id.clone()),
            Some(reason) => {
                assert_eq!(reason, Dropped::QueueFull);
                // A dropped record takes no link.
                assert!(e.record.record_hash.is_empty() && e.record.prev_hash.is_empty());
                lost.push(e.record.request_id.clone());
            }
        }
    }
    assert_eq!(landed.len(), 1 + CAPACITY);
    assert_eq!(lost.len(), 12 - CAPACITY);
    assert_eq!(dropped(&h, "queue_full"), lost.len() as u64);
    assert_eq!(h.metrics.store_queue_depth.get(), CAPACITY as i64);

    heal(&saboteur);
    wait_for("the queued records", || {
        h.metrics.records_written.get() == landed.len() as u64
    });
    h.store.shutdown();
    let conn = open(&h.db);
    let rows = links(&conn);
    let stored: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    assert_eq!(stored, landed, "exactly the accepted records, in order");
    assert_linked(&rows);
    let report = verify(&h.db, None);
    assert_eq!(
        (report.rows, report.first_break),
        (landed.len() as u64, None)
    );
}

// ── 5. Shutdown ─────────────────────────────────────────────────────────────────────────────

#[test]
fn shutdown_commits_everything_queued_then_drops_as_closed() {
    const N: usize = 5000;
    let h = common::harness_with(|cfg| {
        cfg.store.flush_interval.0 = Duration::from_secs(60);
        cfg.store.queue_capacity = 65_536;
    });
    for i in 0..N {
        assert_eq!(record_ok(&h.recorder, i).dropped, None);
    }
    let t = Instant::now();
    h.store.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown must not wait out the 60 s flush interval"
    );
    assert_eq!(h.metrics.records_written.get(), N as u64);
    let conn = open(&h.db);
    assert_eq!(count_rows(&conn), N as i64);
    let report = verify(&h.db, None);
    assert_eq!((report.rows, report.first_break), (N as u64, None));

    // After shutdown: dropped as `closed`, counted, never linked; shutdown is idempotent.
    let late = record_ok(&h.recorder, N);
    assert_eq!(late.dropped, Some(Dropped::Closed));
    assert!(late.record.record_hash.is_empty());
    assert_eq!(dropped(&h, "closed"), 1);
    h.store.shutdown();
    assert_eq!(count_rows(&conn), N as i64);
    let gone: Option<i64> = conn
        .query_row(
            "SELECT id FROM audit_logs WHERE request_id = ?1",
            [&late.record.request_id],
            |r| r.get(0),
        )
        .optional()
        .unwrap();
    assert_eq!(gone, None);
}

// ── 6. Sync durability ──────────────────────────────────────────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_durability_acknowledges_only_committed_records() {
    let h = common::harness_with(|cfg| {
        cfg.store.durability = Durability::Sync;
        // A long interval proves the writer does not wait for it in sync mode.
        cfg.store.flush_interval.0 = Duration::from_secs(30);
    });
    assert_eq!(h.store.durability(), Durability::Sync);
    let reader = open(&h.db);
    for i in 0..5 {
        let mut e = record_ok(&h.recorder, i);
        let t = Instant::now();
        assert!(e.committed().await);
        assert!(t.elapsed() < Duration::from_secs(5));
        let stored: (String, i64) = reader
            .query_row(
                "SELECT record_hash, cost_picousd FROM audit_logs WHERE request_id = ?1",
                [&e.record.request_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            stored,
            (e.record.record_hash.clone(), e.record.cost_picousd)
        );
    }
    assert_eq!(h.metrics.records_written.get(), 5);
    h.store.shutdown_async().await;
    assert_eq!(verify(&h.db, None).first_break, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_record_on_a_store_failing_through_shutdown_is_not_acknowledged() {
    let h = common::harness_with(|cfg| cfg.store.durability = Durability::Sync);
    let saboteur = inject_failure(&h.db);
    let mut e = record_ok(&h.recorder, 0);
    assert_eq!(e.dropped, None);
    let metrics = h.metrics.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the first failure", || metrics.store_errors.get() >= 1);
    })
    .await
    .unwrap();
    // Shutdown gives up on the batch after a bounded number of retries.
    h.store.shutdown_async().await;
    assert!(
        !e.committed().await,
        "a record that never reached the disk is not acknowledged"
    );
    assert_eq!(dropped(&h, "write_failed"), 1);
    assert_eq!(count_rows(&saboteur), 0);
}

#[test]
fn a_batch_given_up_at_shutdown_does_not_break_the_chain_of_later_rows() {
    let h = common::harness();
    for i in 0..3 {
        record_ok(&h.recorder, i);
    }
    wait_for("the first records", || h.metrics.records_written.get() == 3);
    let saboteur = inject_failure(&h.db);
    // The writer holds this one and keeps retrying it…
    record_ok(&h.recorder, 3);
    wait_for("the first failure", || h.metrics.store_errors.get() >= 1);
    // …while these queue behind it.
    for i in 4..10 {
        assert_eq!(record_ok(&h.recorder, i).dropped, None);
    }
    let store = h.store.clone();
    let shutdown = std::thread::spawn(move || store.shutdown());
    // Shutdown retries the held batch a bounded number of times and gives it up; then the
    // store comes back (a lock released, a disk freed) while the others are still queued.
    wait_for("the held batch to be given up", || {
        dropped(&h, "write_failed") >= 1
    });
    heal(&saboteur);
    shutdown.join().unwrap();

    let written = h.metrics.records_written.get();
    let lost = dropped(&h, "write_failed");
    assert_eq!(
        written + lost,
        10,
        "every record either landed or was counted"
    );
    assert_eq!(count_rows(&open(&h.db)), i64::try_from(written).unwrap());
    // A counted, alerted drop must not read as tampering: no row may link to a record that
    // never reached the table.
    assert_eq!(verify(&h.db, None).first_break, None);
}

#[test]
fn shutdown_with_a_dead_store_is_bounded_and_counts_every_record() {
    const N: usize = 1200;
    let h = common::harness();
    let _saboteur = inject_failure(&h.db);
    record_ok(&h.recorder, 0);
    wait_for("the first failure", || h.metrics.store_errors.get() >= 1);
    // Several batches' worth queue behind the failing one.
    for i in 1..N {
        assert_eq!(record_ok(&h.recorder, i).dropped, None);
    }
    let t = Instant::now();
    h.store.shutdown();
    let took = t.elapsed();
    assert_eq!(h.metrics.records_written.get(), 0);
    assert_eq!(dropped(&h, "write_failed"), N as u64);
    // One bounded round of retries, not one per batch: with the default 65,536-record queue
    // a per-batch budget (~1.5 s × 128 batches) outlasts any service manager's stop timeout.
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
}

#[test]
fn a_seed_database_is_upgraded_in_place_and_its_rows_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.db");
    {
        // The seed's DDL, verbatim, with one of its rows.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS audit_logs (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
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
                created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
            );
            CREATE INDEX IF NOT EXISTS idx_timestamp ON audit_logs(timestamp);
            CREATE INDEX IF NOT EXISTS idx_model ON audit_logs(model);
            CREATE INDEX IF NOT EXISTS idx_request_hash ON audit_logs(request_hash);
            INSERT INTO audit_logs (timestamp, request_id, model, prompt_tokens,
                completion_tokens, total_tokens, latency_ms, status_code, cost_usd, user_id,
                request_hash, response_preview, ip_address, error_message)
            VALUES ('2025-06-01T10:00:00.000000Z', 'req_1748772000000', 'gpt-4.1', 12, 30, 42,
                812.5, 200, 0.001056, 'alice', 'ab', 'Hello', '10.0.0.1', NULL);",
        )
        .unwrap();
    }
    let mut cfg = AuditConfig::default();
    cfg.store.path = path.clone();
    let metrics = Arc::new(Metrics::new(1000, 200, 100_000).unwrap());
    // Upgraded in place: our columns are added, the seed's rows predate the chain.
    let store = Store::open(&cfg.store, metrics.clone()).unwrap();
    let recorder = Recorder::new(
        metrics.clone(),
        store.clone(),
        PriceTable::default(),
        cfg.capture.clone(),
        &cfg.thresholds,
        None,
    );
    record_ok(&recorder, 1);
    store.shutdown();
    assert_eq!(metrics.records_written.get(), 1);
    assert_eq!(metrics.store_errors.get(), 0);
    let report = verify(&path, None);
    assert_eq!(report.first_break, None, "{report:?}");
    assert_eq!((report.rows, report.chain_start_after), (1, 1));
    // A reopened store continues the chain after the upgrade.
    let store = Store::open(&cfg.store, metrics.clone()).unwrap();
    store.shutdown();
    assert_eq!(verify(&path, None).first_break, None);
    let conn = open(&path);
    let seed_row: (String, f64) = conn
        .query_row(
            "SELECT request_id, cost_usd FROM audit_logs WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(seed_row, ("req_1748772000000".to_owned(), 0.001056));
}
