//! Shared test setup: a real recorder over a real SQLite file in a temp directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use llm_audit::Recorder;
use llm_audit::audit::PriceTable;
use llm_audit::config::{AuditConfig, CaptureConfig};
use llm_audit::store::Store;
use llm_audit::telemetry::Metrics;

/// A recorder, its metrics and store, writing to `db` in a fresh temp dir (kept alive by `dir`).
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub recorder: Recorder,
}

/// Harness with the default config, tweaked by `edit`.
pub fn harness_with(edit: impl FnOnce(&mut AuditConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AuditConfig::default();
    cfg.store.path = dir.path().join("audit.db");
    cfg.store.flush_interval.0 = std::time::Duration::from_millis(5);
    edit(&mut cfg);
    let metrics = Arc::new(
        Metrics::new(
            cfg.metrics.max_user_labels,
            cfg.metrics.max_model_labels,
            cfg.thresholds.max_tokens_per_request,
        )
        .unwrap(),
    );
    let store = Store::open(&cfg.store, metrics.clone()).unwrap();
    let prices = PriceTable::from_config(&cfg.pricing).unwrap();
    let recorder = Recorder::new(
        metrics.clone(),
        store.clone(),
        prices,
        cfg.capture.clone(),
        &cfg.thresholds,
        None,
    );
    Harness {
        db: cfg.store.path.clone(),
        dir,
        metrics,
        store,
        recorder,
    }
}

/// Harness with the default config.
pub fn harness() -> Harness {
    harness_with(|_| {})
}

/// Capture config with content on spans.
pub fn capture_content() -> CaptureConfig {
    CaptureConfig {
        preview_chars: 200,
        span_content: true,
    }
}
