//! The audit record and everything that computes its values: request parsing and hashing,
//! usage extraction, token estimation, pricing, duplicate detection, and the [`Recorder`]
//! that emits span, metrics and row from one set of values.

pub mod canonical;
pub mod duplicates;
pub mod estimate;
pub mod pricing;
pub mod record;
pub mod recorder;
pub mod request;
pub mod usage;

pub use pricing::{Cost, PriceTable};
pub use record::{AuditRecord, CostStatus, Operation, Outcome, UsageSource};
pub use recorder::{CallEnd, CallStart, Emitted, InFlight, Recorder, RecorderError};
pub use request::{ParsedRequest, RequestError};
pub use usage::{ResponseSummary, SseScanner, Usage, UsageError};
