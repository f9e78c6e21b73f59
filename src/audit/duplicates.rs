//! Duplicate detection: was the same request hash seen within the window?
//!
//! Two generations of hashes rotate every window, so memory is bounded by the traffic of two
//! windows (and by `max_entries`) without a per-entry expiry scan on the request path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Remembers recent request hashes.
#[derive(Debug)]
pub struct DuplicateDetector {
    window: Duration,
    max_entries: usize,
    state: Mutex<Generations>,
}

#[derive(Debug)]
struct Generations {
    started: Instant,
    current: HashMap<u64, Instant>,
    previous: HashMap<u64, Instant>,
}

impl DuplicateDetector {
    /// A detector for `window`, remembering at most `max_entries` hashes per generation.
    pub fn new(window: Duration, max_entries: usize) -> Self {
        Self {
            window,
            max_entries: max_entries.max(1),
            state: Mutex::new(Generations {
                started: Instant::now(),
                current: HashMap::new(),
                previous: HashMap::new(),
            }),
        }
    }

    /// Records `hash` seen at `now`; true when it was already seen within the window.
    pub fn observe(&self, hash: &str, now: Instant) -> bool {
        let key = short_key(hash);
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(g.started) >= self.window
            || g.current.len() >= self.max_entries
        {
            g.previous = std::mem::take(&mut g.current);
            g.started = now;
        }
        let seen = g
            .current
            .get(&key)
            .or_else(|| g.previous.get(&key))
            .is_some_and(|t| now.saturating_duration_since(*t) <= self.window);
        g.current.insert(key, now);
        seen
    }
}

/// The first 64 bits of the hex hash: collisions are negligible at any realistic window size,
/// and a `u64` key avoids a string allocation per request.
fn short_key(hash: &str) -> u64 {
    let head = hash.get(..16).unwrap_or(hash);
    u64::from_str_radix(head, 16).unwrap_or_else(|_| {
        // Not hex (should not happen): fall back to a stable fold of the bytes.
        hash.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_window_only() {
        let d = DuplicateDetector::new(Duration::from_secs(300), 1000);
        let t0 = Instant::now();
        let h = "ab".repeat(32);
        assert!(!d.observe(&h, t0));
        assert!(d.observe(&h, t0 + Duration::from_secs(10)));
        assert!(d.observe(&h, t0 + Duration::from_secs(305)));
        assert!(!d.observe(&h, t0 + Duration::from_secs(1000)));
        assert!(!d.observe(&"cd".repeat(32), t0 + Duration::from_secs(1000)));
    }
}
