//! Log lines with a budget: a line that can repeat once per request or per packet (a refused
//! request, an upstream failure, a dropped packet) goes through `log_limited!`, which lets at most
//! [`LINES_PER_WINDOW`] of each call site through per [`WINDOW`] and counts the rest. The next line
//! let through carries `suppressed = N`: nothing is lost silently, and a flood cannot fill a disk.
//! Per-request and per-packet facts belong in flow records and counters; logs say that something
//! is happening.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long one budget lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines of one call site per window.
pub const LINES_PER_WINDOW: u64 = 10;

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The budget of one call site.
#[derive(Debug)]
pub struct LineBudget {
    /// Start of the current window, ms since the process's first use of a budget (+1, so 0 means
    /// "never").
    window: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LineBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBudget {
    /// A fresh budget.
    pub const fn new() -> Self {
        Self { window: AtomicU64::new(0), used: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(lines suppressed since the last one let through)` when this line may be logged.
    pub fn take(&self) -> Option<u64> {
        let now = now_ms() + 1;
        let start = self.window.load(Ordering::Relaxed);
        let window_ms = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        if start == 0 || now.saturating_sub(start) >= window_ms {
            // A new window (a race here lets a line or two more through: harmless).
            self.window.store(now, Ordering::Relaxed);
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < LINES_PER_WINDOW {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log_limited!(info, field = value, ..., "Message")`: a `tracing` event at that level, within
/// this call site's budget, with `suppressed` = the lines dropped since the last one.
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $($rest:tt)+) => {{
        static BUDGET: $crate::log_limit::LineBudget = $crate::log_limit::LineBudget::new();
        if let Some(suppressed) = BUDGET.take() {
            tracing::$level!(suppressed, $($rest)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_and_counted() {
        let b = LineBudget::new();
        let let_through: Vec<u64> = (0..1000).filter_map(|_| b.take()).collect();
        assert_eq!(let_through.len() as u64, LINES_PER_WINDOW);
        assert!(let_through.iter().all(|s| *s == 0));
        assert_eq!(b.suppressed.load(Ordering::Relaxed), 1000 - LINES_PER_WINDOW);
        // The next window's first line reports what was dropped.
        b.window.store(0, Ordering::Relaxed);
        assert_eq!(b.take(), Some(1000 - LINES_PER_WINDOW));
        assert_eq!(b.take(), Some(0));
    }
}
