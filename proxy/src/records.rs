//! Where flow records go: a bounded backlog the control socket serves (`flows after N`), and
//! optionally a JSON-lines file. Counters for `status`.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::flow::Flow;

/// Records kept for queries.
pub const BACKLOG: usize = 16 * 1024;

/// Proxy counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections refused at accept (over `max_connections`).
    pub connections_refused: AtomicU64,
    /// Requests seen.
    pub requests: AtomicU64,
    /// Requests forwarded.
    pub forwarded: AtomicU64,
    /// Requests denied by policy.
    pub denied: AtomicU64,
    /// Requests refused as malformed or ambiguous (400 / 431, framing violations).
    pub rejected: AtomicU64,
    /// Upstream failures (502 / 503 / 504).
    pub upstream_errors: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Serialize)]
pub struct CounterValues {
    connections: u64,
    connections_open: u64,
    connections_refused: u64,
    requests: u64,
    forwarded: u64,
    denied: u64,
    rejected: u64,
    upstream_errors: u64,
}

impl Counters {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Current values.
    pub fn values(&self) -> CounterValues {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            connections: g(&self.connections),
            connections_open: g(&self.connections_open),
            connections_refused: g(&self.connections_refused),
            requests: g(&self.requests),
            forwarded: g(&self.forwarded),
            denied: g(&self.denied),
            rejected: g(&self.rejected),
            upstream_errors: g(&self.upstream_errors),
        }
    }
}

/// The record sink.
#[derive(Debug)]
pub struct Records {
    seq: AtomicU64,
    backlog: Mutex<VecDeque<Flow>>,
    file: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

impl Records {
    /// A sink, with a JSON-lines file when `log` is given.
    pub fn new(log: Option<&Path>) -> std::io::Result<Self> {
        let file = match log {
            Some(p) => Some(Mutex::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p)?,
            ))),
            None => None,
        };
        Ok(Self { seq: AtomicU64::new(0), backlog: Mutex::new(VecDeque::with_capacity(1024)), file })
    }

    /// Numbers and stores a record.
    pub fn emit(&self, mut f: Flow) {
        let line = {
            // Numbered under the lock: the backlog is in sequence order, so a follower asking for
            // records after N never skips one.
            let Ok(mut b) = self.backlog.lock() else { return };
            f.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let line = self.file.as_ref().and_then(|_| serde_json::to_string(&f).ok());
            if b.len() >= BACKLOG {
                b.pop_front();
            }
            b.push_back(f);
            line
        };
        if let (Some(file), Some(line)) = (&self.file, line)
            && let Ok(mut w) = file.lock()
        {
            let _ = writeln!(w, "{line}");
            let _ = w.flush();
        }
    }

    /// Records numbered above `after`, at most `limit`; and the newest number.
    pub fn after(&self, after: u64, limit: usize) -> (Vec<Flow>, u64) {
        let last = self.seq.load(Ordering::Relaxed);
        let b = self.backlog.lock().map(|b| b.iter().filter(|f| f.seq > after).take(limit).cloned().collect());
        (b.unwrap_or_default(), last)
    }
}
