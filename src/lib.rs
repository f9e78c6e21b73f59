//! llm-audit: every call to an OpenAI-compatible LLM API becomes exactly one audit record,
//! emitted three ways from the same values: a `tracing` span (exported over OTLP with the
//! OpenTelemetry GenAI conventions), Prometheus metrics, and a row in a hash-chained SQLite log.
//!
//! ```text
//! front door (client::Client, later the proxy)
//!     │ request::ParsedRequest  (model, stream, user, request hash)
//!     ▼
//! audit::Recorder::begin ──▶ InFlight (CLIENT span open, timers running)
//!     │ usage::ResponseSummary (JSON body or SSE scan)
//!     ▼
//! InFlight::finish ──▶ AuditRecord ──▶ span attributes   (telemetry::init → OTLP)
//!                                  ──▶ metrics            (telemetry::metrics catalog)
//!                                  ──▶ store::StoreHandle (bounded channel → writer thread → SQLite)
//! ```
//!
//! Only [`audit::Recorder`] turns an outcome into a record; front doors never touch a metric
//! or a row themselves, so the three views cannot disagree.

pub mod audit;
pub mod background;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod logtools;
pub mod period;
pub mod proxy;
pub mod report;
pub mod rules;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod wire;

pub use audit::{AuditRecord, Recorder};
pub use client::Client;
