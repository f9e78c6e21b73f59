//! Points in time on the command line (`--since`, `--until`), turned into the audit log's
//! timestamp text so that periods are selected the way the seed selects them: by comparing
//! `timestamp` strings, which sort chronologically in the record's fixed format.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

use crate::audit::AuditRecord;

/// A point in time given as `2026-11-26T10:00:00Z` (RFC 3339, any offset), `2026-11-26T10:00:00`
/// (UTC), `2026-11-26` (midnight UTC), or a duration meaning "that long ago" (`90m`, `24h`, `7d`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    let t = text.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(d) = NaiveDateTime::parse_from_str(t, fmt) {
            return Ok(d.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    if let Ok(ago) = humantime::parse_duration(t) {
        let ago = chrono::Duration::from_std(ago)
            .map_err(|_| anyhow::anyhow!("{text:?}: duration too long"))?;
        return now
            .checked_sub_signed(ago)
            .ok_or_else(|| anyhow::anyhow!("{text:?}: duration too long"));
    }
    anyhow::bail!(
        "{text:?} is not a time: use 2026-11-26T10:00:00Z, 2026-11-26 or a duration ago such as 24h"
    )
}

/// A point in time in the audit log's `timestamp` format.
pub fn stamp(t: DateTime<Utc>) -> String {
    AuditRecord::format_timestamp(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let now = DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default();
        let p = |s| parse_time(s, now).map(stamp).unwrap_or_default();
        assert_eq!(p("2026-11-26T10:00:00Z"), "2026-11-26T10:00:00.000000Z");
        assert_eq!(
            p("2026-11-26T10:00:00+02:00"),
            "2026-11-26T08:00:00.000000Z"
        );
        assert_eq!(p("2026-11-26T10:00:00"), "2026-11-26T10:00:00.000000Z");
        assert_eq!(p("2026-11-25"), "2026-11-25T00:00:00.000000Z");
        assert_eq!(p("2h"), "2026-11-26T10:00:00.000000Z");
        assert!(parse_time("yesterday-ish", now).is_err());
    }
}
