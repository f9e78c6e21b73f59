//! The durable audit log: SQLite behind one writer thread.
//!
//! One writer because SQLite allows one writer; a bounded channel so the request path never
//! waits on disk; batches so one fsync covers hundreds of records. The chain link is computed
//! at hand-off, under one short lock, so channel order is chain order and the hash can also go
//! on the call's span. A record that does not fit in the channel is dropped *before* it takes a
//! link, so a drop never breaks the chain — and it is counted and logged at ERROR.

pub mod chain;
pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::audit::record::AuditRecord;
use crate::config::{Durability, OnStoreFailure, Secret, StoreConfig};
use crate::telemetry::Metrics;

/// Most records committed in one transaction.
const MAX_BATCH: usize = 512;
/// Retries of a failing batch once shutdown has begun, before its records count as dropped.
const SHUTDOWN_RETRIES: u32 = 5;

/// A store that cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("audit store {path}")]
    Sqlite {
        /// Database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// A key file could not be read.
    #[error("cannot read key file {path}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The writer thread could not start.
    #[error("cannot start the store writer: {0}")]
    Thread(std::io::Error),
}

/// Why a record did not make it into the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// The queue is full (the store is slower than traffic, or failing).
    #[error("audit queue full")]
    QueueFull,
    /// The store was shut down.
    #[error("audit store closed")]
    Closed,
}

impl Dropped {
    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::Closed => "closed",
        }
    }
}

/// The record could not be committed (sync durability).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit record was not committed")]
pub struct NotCommitted;

/// Resolves when a record sent with sync durability is committed.
pub type CommitAck = oneshot::Receiver<Result<(), NotCommitted>>;

struct Envelope {
    record: Arc<AuditRecord>,
    ack: Option<oneshot::Sender<Result<(), NotCommitted>>>,
}

struct ChainState {
    prev_hash: String,
    tx: Option<Sender<Envelope>>,
}

struct Shared {
    chain: Mutex<ChainState>,
    chain_key: Option<Secret>,
    durability: Durability,
    on_failure: OnStoreFailure,
    healthy: AtomicBool,
    closing: AtomicBool,
    metrics: Arc<Metrics>,
    writer: Mutex<Option<JoinHandle<()>>>,
    stop: Mutex<Option<Sender<()>>>,
    path: PathBuf,
}

/// Cheap handle to the store; clone it freely.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .finish()
    }
}

fn read_key(path: &Option<PathBuf>) -> Result<Option<Secret>, StoreError> {
    path.as_ref()
        .map(|p| {
            Secret::from_file(p).map_err(|source| StoreError::KeyFile {
                path: p.clone(),
                source,
            })
        })
        .transpose()
}

impl Store {
    /// Opens (creating if needed) the database and starts the writer. Failing to open is an
    /// error here — a wrong path should stop start-up, not silently lose a day of records.
    pub fn open(cfg: &StoreConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let chain_key = read_key(&cfg.chain_key_file)?;
        let sqlite = |source| StoreError::Sqlite {
            path: cfg.path.clone(),
            source,
        };
        let conn = Connection::open(&cfg.path).map_err(sqlite)?;
        schema::prepare(&conn, cfg.durability == Durability::Sync).map_err(sqlite)?;
        let prev_hash = chain::last_hash(&conn).map_err(sqlite)?;
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity.max(1));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let shared = Arc::new(Shared {
            chain: Mutex::new(ChainState {
                prev_hash,
                tx: Some(tx),
            }),
            chain_key,
            durability: cfg.durability,
            on_failure: cfg.on_store_failure,
            healthy: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            metrics,
            writer: Mutex::new(None),
            stop: Mutex::new(Some(stop_tx)),
            path: cfg.path.clone(),
        });
        let writer = Writer {
            conn,
            rx,
            stop: stop_rx,
            shared: shared.clone(),
            flush_interval: cfg.flush_interval.0,
            abandoned: false,
        };
        let durability = cfg.durability;
        let handle = std::thread::Builder::new()
            .name("llm-audit-store".into())
            .spawn(move || {
                // In sync mode every answer waits for the writer's commit: it keeps the
                // request path's priority there.
                if durability == Durability::Batched {
                    crate::background::lower_current_thread();
                }
                writer.run();
            })
            .map_err(StoreError::Thread)?;
        *shared.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(Self { shared })
    }

    /// Database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Whether new calls should be accepted: always in `continue` mode; in `reject` mode only
    /// while the store writes.
    pub fn accepting(&self) -> bool {
        self.shared.on_failure == OnStoreFailure::Continue || self.is_healthy()
    }

    /// Durability mode.
    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Links `record` into the chain and queues it: fills `prev_hash` and `record_hash`, and
    /// returns the record (shared with the writer, never copied) with a commit acknowledgement
    /// in `sync` mode, or why it was dropped. Never blocks on disk.
    pub fn submit(
        &self,
        mut record: AuditRecord,
    ) -> (Arc<AuditRecord>, Result<Option<CommitAck>, Dropped>) {
        let bytes = chain::canonical_bytes(&record);
        let (ack_tx, ack_rx) = match self.shared.durability {
            Durability::Sync => {
                let (t, r) = oneshot::channel();
                (Some(t), Some(r))
            }
            Durability::Batched => (None, None),
        };
        let mut guard = self.shared.chain.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        let Some(tx) = state.tx.as_ref() else {
            drop(guard);
            let reason = self.count_drop(Dropped::Closed, &record);
            return (Arc::new(record), Err(reason));
        };
        record.record_hash =
            chain::link_hash(&state.prev_hash, &bytes, self.shared.chain_key.as_ref());
        record.prev_hash.clone_from(&state.prev_hash);
        let record = Arc::new(record);
        let envelope = Envelope {
            record: record.clone(),
            ack: ack_tx,
        };
        match tx.try_send(envelope) {
            Ok(()) => {
                let depth = tx.len();
                state.prev_hash.clone_from(&record.record_hash);
                drop(guard);
                self.shared.metrics.store_queue_depth.set(depth as i64);
                (record, Ok(ack_rx))
            }
            Err(e) => {
                drop(guard);
                let reason = match e {
                    TrySendError::Full(_) => Dropped::QueueFull,
                    TrySendError::Disconnected(_) => Dropped::Closed,
                };
                // Release the envelope's reference so the record is taken back, not copied.
                drop(e);
                // The record never took its link: hand it back without one.
                let mut record = Arc::unwrap_or_clone(record);
                record.prev_hash.clear();
                record.record_hash.clear();
                let reason = self.count_drop(reason, &record);
                (Arc::new(record), Err(reason))
            }
        }
    }

    fn count_drop(&self, reason: Dropped, record: &AuditRecord) -> Dropped {
        let counter = self
            .shared
            .metrics
            .records_dropped
            .with_label_values(&[reason.reason()]);
        counter.inc();
        // Every drop is counted; the log line is rate-limited (1st, 2nd, 4th, 8th, … drop of a
        // reason) so a failing store does not also make every request write to stderr.
        let n = counter.get();
        if n.is_power_of_two() {
            tracing::error!(
                reason = reason.reason(),
                request_id = %record.request_id,
                dropped_so_far = n,
                "Audit record dropped."
            );
        }
        reason
    }

    /// Stops accepting records, lets the writer commit everything queued, and waits for it.
    /// Idempotent; later submits are dropped as `closed`.
    pub fn shutdown(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        // Dropping the only sender disconnects the channel; the writer drains, then exits.
        let tx = self
            .shared
            .chain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tx
            .take();
        drop(tx);
        drop(
            self.shared
                .stop
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        let handle = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// [`shutdown`](Self::shutdown) on the blocking pool, for async callers.
    pub async fn shutdown_async(&self) {
        let store = self.clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
    }
}

struct Writer {
    conn: Connection,
    rx: Receiver<Envelope>,
    /// Never sent on; disconnected by shutdown to cut the batching sleep short.
    stop: Receiver<()>,
    shared: Arc<Shared>,
    flush_interval: Duration,
    /// Shutdown gave up on a batch: every later record links to a lost one, so none is written.
    abandoned: bool,
}

impl Writer {
    fn run(mut self) {
        let mut batch: Vec<Envelope> = Vec::with_capacity(MAX_BATCH);
        // `recv` fails only when the channel is disconnected *and* empty: everything queued
        // before shutdown is committed.
        while let Ok(first) = self.rx.recv() {
            batch.push(first);
            self.fill(&mut batch);
            if self.abandoned {
                self.give_up(&mut batch);
            } else {
                self.commit(&mut batch);
            }
        }
    }

    /// Gathers more records. Batched mode sleeps until the flush deadline and then drains what
    /// queued meanwhile: one wake-up per batch, not one per record (waking the writer on every
    /// send costs the request path a futex call and cross-thread contention). A backlog of a
    /// full batch, shutdown, or sync mode (a caller is waiting) skip the sleep.
    fn fill(&self, batch: &mut Vec<Envelope>) {
        let wait = self.shared.durability == Durability::Batched
            && self.rx.len() + 1 < MAX_BATCH
            && !self.shared.closing.load(Ordering::Relaxed);
        if wait {
            // Returns at the deadline, or at once when shutdown drops the sender.
            let _ = self.stop.recv_timeout(self.flush_interval);
        }
        while batch.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<Envelope>) {
        let metrics = &self.shared.metrics;
        let mut attempt = 0u32;
        loop {
            match write_batch(&mut self.conn, batch) {
                Ok(()) => {
                    metrics.records_written.inc_by(batch.len() as u64);
                    metrics.store_queue_depth.set(self.rx.len() as i64);
                    self.shared.healthy.store(true, Ordering::Relaxed);
                    for e in batch.drain(..) {
                        if let Some(ack) = e.ack {
                            let _ = ack.send(Ok(()));
                        }
                    }
                    return;
                }
                Err(err) => {
                    attempt += 1;
                    metrics.store_errors.inc();
                    self.shared.healthy.store(false, Ordering::Relaxed);
                    tracing::error!(error = %err, records = batch.len(), attempt, "Audit store write failed; retrying.");
                    if self.shared.closing.load(Ordering::Relaxed) && attempt >= SHUTDOWN_RETRIES {
                        self.give_up(batch);
                        self.abandoned = true;
                        return;
                    }
                    // Keep the batch (it holds the next chain links) and retry with backoff;
                    // meanwhile new records queue, and past capacity they are counted drops.
                    let backoff = Duration::from_millis(50u64 << attempt.min(6));
                    std::thread::sleep(backoff);
                }
            }
        }
    }

    fn give_up(&self, batch: &mut Vec<Envelope>) {
        let dropped = self
            .shared
            .metrics
            .records_dropped
            .with_label_values(&["write_failed"]);
        for e in batch.drain(..) {
            dropped.inc();
            tracing::error!(request_id = %e.record.request_id, "Audit record dropped: store failing at shutdown.");
            if let Some(ack) = e.ack {
                let _ = ack.send(Err(NotCommitted));
            }
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[Envelope]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(&schema::insert_sql())?;
        for e in batch {
            schema::insert(&mut stmt, &e.record)?;
        }
    }
    tx.commit()
}
