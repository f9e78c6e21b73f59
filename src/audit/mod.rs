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

/// Parses JSON bytes with one UTF-8 check of the whole text, then a parse that does not
/// re-check every string (serde's slice reader validates each string it reads: ~5 % of a
/// streamed call's instructions). Bytes that are not UTF-8 go to the slice reader, for its
/// precise error.
pub(crate) fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}
