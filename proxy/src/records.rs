//! Where the proxy's flow records go: the shared bounded [`Backlog`] the control socket serves
//! (`flows after N`, and the record stream: [`Records`] is its [`FlowSource`]), and optionally a
//! JSON-lines file. Counters for `status`.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use porin_flow::backlog::ByteBacklog;
use porin_flow::flow::{DnsInfo, DropReason, Flow, FlowEndpoint, HttpProtocol, KafkaInfo, Verdict};
use porin_flow::stream::{self, DetailRef, FlowSource, Frame, RecordRef, WireEnd, WireEnds};
use serde::Serialize;

use crate::policy::Ends;

/// Records kept for queries.
pub const BACKLOG: usize = 8 * 1024;

/// The bytes they may take: records of up to 4 KiB in one ring of this size, allocated at start
/// (the benchmark's HTTP records take ~120 bytes: 8,192 of them fill half of it; with longer URLs
/// the ring, not the count, is what bounds the backlog)...
pub const BACKLOG_BYTES: usize = 2 << 20;

/// ... and longer ones (long URLs) within this budget, allocated as they come. Whatever clients
/// send, the backlog holds at most the two. The backlog is a buffer for readers that keep up (the
/// stream sends within 20 ms), not retention: ~256 requests with maximal heads fill this budget,
/// and from then on each lets the oldest records go, as 8,192 short requests do.
pub const BACKLOG_LARGE_BYTES: usize = 16 << 20;

/// Proxy counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections refused at accept (a limit reached and every connection busy).
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
    /// Upstream connections that found no free port for the client's address (`EADDRNOTAVAIL`;
    /// also counted in `upstream_errors`).
    pub upstream_address_exhausted: AtomicU64,
    /// Requests whose client broke off its body while it was forwarded.
    pub downstream_errors: AtomicU64,
    /// Balanced requests sent to a second backend (none of them reached the first).
    pub retries: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Serialize)]
pub struct CounterValues {
    connections: u64,
    connections_refused: u64,
    requests: u64,
    forwarded: u64,
    denied: u64,
    rejected: u64,
    upstream_errors: u64,
    upstream_address_exhausted: u64,
    downstream_errors: u64,
    flow_log_errors: u64,
    retries: u64,
    records_evicted: u64,
    connections_shed: u64,
}

impl Counters {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Current values (`shed`: connections the connection table let go; `evicted`: records the
    /// backlog let go; `log_errors`: records the flow log could not take).
    pub fn values(&self, shed: u64, evicted: u64, log_errors: u64) -> CounterValues {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            connections: g(&self.connections),
            connections_refused: g(&self.connections_refused),
            requests: g(&self.requests),
            forwarded: g(&self.forwarded),
            denied: g(&self.denied),
            rejected: g(&self.rejected),
            upstream_errors: g(&self.upstream_errors),
            upstream_address_exhausted: g(&self.upstream_address_exhausted),
            downstream_errors: g(&self.downstream_errors),
            flow_log_errors: log_errors,
            retries: g(&self.retries),
            records_evicted: evicted,
            connections_shed: shed,
        }
    }
}

/// The transport a proxied request came over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// What a record says about the request or response itself.
#[derive(Clone, Debug)]
pub enum Detail {
    /// HTTP (and gRPC).
    Http {
        /// Method.
        method: http::Method,
        /// URL as judged.
        url: Arc<str>,
        /// The version the client spoke.
        protocol: HttpProtocol,
        /// Response status (responses).
        code: u16,
    },
    /// DNS.
    Dns(Box<DnsInfo>),
    /// Kafka.
    Kafka(Box<KafkaInfo>),
    /// An L3/L4 flow relayed through (or refused at) the mTLS tunnel.
    Tunnel,
}

/// One request or response, as recorded on the hot path: what differs per request, and an `Arc`
/// of what the connection shares. Turned into a Hubble-shaped [`Flow`] when someone asks.
#[derive(Clone, Debug)]
pub struct Record {
    /// Wall clock, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// A response (travels from the server back to the client).
    pub reply: bool,
    /// Forwarded, dropped (denied or refused), or an error.
    pub verdict: Verdict,
    /// Why it was dropped.
    pub reason: Option<DropReason>,
    /// The connection's ends.
    pub ends: Arc<Ends>,
    /// TCP or UDP.
    pub transport: Transport,
    /// The request or response.
    pub detail: Detail,
    /// Request to response (responses).
    pub latency_ns: u64,
    /// The deciding rule.
    pub policy: Option<Arc<str>>,
    /// Why (refusals, errors).
    pub summary: String,
    /// `namespace/name` of the service the request was balanced within.
    pub service: Option<Arc<str>>,
}

/// Now, nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)
}

impl Record {
    /// The record, borrowed for encoding ([`RecordRef::encode`]), numbered `seq`.
    pub fn wire(&self, seq: u64) -> RecordRef<'_> {
        RecordRef {
            seq,
            ends: self.ends.id,
            time_ns: self.time_ns,
            reply: self.reply,
            verdict: self.verdict,
            reason: self.reason,
            udp: self.transport == Transport::Udp,
            latency_ns: self.latency_ns,
            policy: self.policy.as_deref(),
            summary: &self.summary,
            detail: match &self.detail {
                Detail::Http { method, url, protocol, code } => {
                    DetailRef::Http { method: method.as_str(), url, protocol: *protocol, code: *code }
                }
                Detail::Dns(d) => DetailRef::Dns(d),
                Detail::Kafka(k) => DetailRef::Kafka(k),
                Detail::Tunnel => DetailRef::Tunnel,
            },
            service: self.service.as_deref(),
        }
    }
}

/// A connection's ends on the wire.
pub fn wire_ends(e: &Ends) -> WireEnds {
    let end = |end: &crate::policy::End| WireEnd {
        endpoint: Some(FlowEndpoint::clone(&end.record)),
        ip: stream::wire_ip(end.ip),
        port: u32::from(end.port),
        names: end.names().to_vec(),
    };
    WireEnds {
        source: Some(end(&e.source)),
        destination: Some(end(&e.destination)),
        direction: e.direction.number(),
        id: e.id,
        spiffe_id: e.spiffe_id.as_deref().unwrap_or_default().to_owned(),
    }
}

/// What the sink holds under its lock: the records as they go on the wire (each with its
/// connection: its id, kept beside it so a frame's reader tells connections apart without reading
/// the connection's shared `Arc`, whose count the data path keeps writing — it clones that `Arc`
/// once per connection per frame only), and the buffer a record is encoded in before it is kept.
#[derive(Debug)]
struct Held {
    kept: ByteBacklog<(u64, Arc<Ends>)>,
    scratch: Vec<u8>,
}

/// Records made but not yet kept: at most this many wait before the path that makes one keeps
/// them itself.
pub const PENDING_MAX: usize = 4096;

/// How long the records thread lets records gather after the first of a batch arrives.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// The record sink. The data path only hands a record over ([`Records::emit`]: one move into
/// `pending` under a lock nobody holds for long); numbering, counting in the metrics, encoding into
/// the backlog and the JSON-lines file ([`Records::flush`]) happen off it: on the records thread
/// (woken by the first record of a batch), on a reader's thread before it reads (the record
/// stream, `flows`, a metrics scrape: every reader sees every record made before it asked), or on
/// the data path itself when [`PENDING_MAX`] records wait.
#[derive(Debug)]
pub struct Records {
    /// Records handed over, in the order they were made.
    pending: Mutex<Vec<Record>>,
    /// The flusher's own buffer (swapped with `pending`); its lock orders flushes, so records are
    /// numbered in the order they were made.
    flushing: Mutex<Vec<Record>>,
    /// The records thread, woken when `pending` stops being empty.
    thread: std::sync::OnceLock<std::thread::Thread>,
    /// Records as they go on the wire: encoded once, as a batch, off the data path.
    backlog: Mutex<Held>,
    /// Flow records the JSON-lines file could not take (write or serialisation errors).
    log_errors: AtomicU64,
    /// This run's id (see `Reply::Flows::epoch`).
    epoch: u64,
    file: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    /// Hubble-named metrics of every record.
    pub metrics: std::sync::Arc<porin_flow::metrics::HubbleMetrics>,
    /// Records kept at all (`flow_records`).
    enabled: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Records and a file handle: a panic elsewhere cannot leave them half-written in memory.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Records {
    /// A sink, with a JSON-lines file when `log` is given; `enabled: false` keeps nothing. Its
    /// records thread ends within a second of the sink.
    pub fn start(log: Option<&Path>, enabled: bool) -> std::io::Result<Arc<Self>> {
        let records = Arc::new(Self::new(log, enabled)?);
        if enabled {
            let weak = Arc::downgrade(&records);
            let thread = std::thread::Builder::new().name("records".into()).spawn(move || {
                loop {
                    std::thread::park_timeout(std::time::Duration::from_secs(1));
                    let Some(records) = weak.upgrade() else { return };
                    if records.waiting() {
                        drop(records);
                        std::thread::sleep(GATHER);
                        let Some(records) = weak.upgrade() else { return };
                        records.flush();
                    }
                }
            })?;
            // Set here only, once: it cannot be set already.
            let _ = records.thread.set(thread.thread().clone());
        }
        Ok(records)
    }

    fn new(log: Option<&Path>, enabled: bool) -> std::io::Result<Self> {
        let file = match log {
            Some(p) => Some(Mutex::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p)?,
            ))),
            None => None,
        };
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        // Nothing kept, no ring.
        let (capacity, ring, large) = if enabled { (BACKLOG, BACKLOG_BYTES, BACKLOG_LARGE_BYTES) } else { (1, 1, 0) };
        let held = Held { kept: ByteBacklog::new(capacity, ring, large), scratch: Vec::with_capacity(1024) };
        Ok(Self {
            pending: Mutex::new(Vec::with_capacity(256)),
            flushing: Mutex::new(Vec::with_capacity(256)),
            thread: std::sync::OnceLock::new(),
            backlog: Mutex::new(held),
            log_errors: AtomicU64::new(0),
            epoch,
            file,
            metrics: Default::default(),
            enabled,
        })
    }

    /// What the sink holds: `{enabled, kept, capacity, seen, evicted}`.
    pub fn status(&self) -> serde_json::Value {
        self.flush();
        let b = &lock(&self.backlog).kept;
        serde_json::json!({
            "enabled": self.enabled, "kept": b.len(), "capacity": BACKLOG, "kept_bytes": b.kept_bytes(),
            "ring_bytes": b.ring_bytes(), "large_bytes": BACKLOG_LARGE_BYTES, "seen": b.last(), "evicted": b.evicted(),
        })
    }

    /// Hands a record over to be kept (see [`Records`]).
    pub fn emit(&self, r: Record) {
        if !self.enabled {
            return;
        }
        let waiting = {
            let mut pending = lock(&self.pending);
            pending.push(r);
            pending.len()
        };
        if waiting == 1 {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        } else if waiting >= PENDING_MAX {
            self.flush();
        }
    }

    /// Records handed over and not kept yet.
    fn waiting(&self) -> bool {
        !lock(&self.pending).is_empty()
    }

    /// Keeps the records handed over so far: counts each in the metrics, numbers and encodes it
    /// into the backlog (and appends it to the file); a record the file could not take is counted
    /// in `log_errors`.
    pub fn flush(&self) {
        let mut batch = lock(&self.flushing);
        std::mem::swap(&mut *lock(&self.pending), &mut *batch);
        if batch.is_empty() {
            return;
        }
        for r in batch.iter() {
            crate::metrics::observe(&self.metrics, r);
        }
        let lines = {
            // Numbered (and so encoded) under the lock: the backlog is in sequence order, so a
            // follower asking for records after N never skips one. Encoded into a buffer that
            // stays warm, then copied into the ring.
            let mut held = lock(&self.backlog);
            let Held { kept, scratch } = &mut *held;
            let mut lines = Vec::new();
            for r in batch.drain(..) {
                let seq = kept.last() + 1;
                scratch.clear();
                r.wire(seq).encode(scratch);
                if self.file.is_some() {
                    lines.push(
                        flows_of(self.epoch, seq, vec![wire_ends(&r.ends)], scratch)
                            .and_then(|(mut f, errors)| match errors.first() {
                                Some(e) => Err(e.to_string()),
                                None => f.pop().ok_or_else(|| "no flow".to_owned()),
                            })
                            .and_then(|f| serde_json::to_string(&f).map_err(|e| e.to_string())),
                    );
                }
                kept.push(scratch, (r.ends.id, r.ends));
                // A long record's buffer is not kept for the next.
                if scratch.capacity() > 64 * 1024 {
                    *scratch = Vec::with_capacity(1024);
                }
            }
            lines
        };
        // A burst's buffer is not kept either.
        if batch.capacity() > PENDING_MAX {
            *batch = Vec::with_capacity(256);
        }
        drop(batch);
        let Some(file) = &self.file else { return };
        let mut w = lock(file);
        let mut failed = 0u64;
        for line in lines {
            match line {
                Ok(line) => failed += u64::from(writeln!(w, "{line}").is_err()),
                Err(e) => {
                    crate::log_limited!(warn, error = %e, "A flow record could not be written to the flow log");
                    failed += 1;
                }
            }
        }
        if w.flush().is_err() {
            failed += 1;
        }
        if failed > 0 {
            self.log_errors.fetch_add(failed, Ordering::Relaxed);
        }
    }

    /// Flow records the JSON-lines file could not take.
    pub fn log_errors(&self) -> u64 {
        self.log_errors.load(Ordering::Relaxed)
    }

    /// Records numbered above `after`, at most `limit` (and what one frame holds); the number to
    /// ask after next time; how many after `after` the backlog let go before this was asked.
    pub fn after(&self, after: u64, limit: usize) -> (Vec<Flow>, u64, u64) {
        // As much as one frame holds: the answer's last number is the last record in it.
        let page = self.page(after, limit, stream::MAX_FRAME / 2);
        // Records the proxy made itself: ones that do not convert are a bug, logged, not served
        // (the rest are); a page that cannot be framed at all is asked for again, not skipped.
        match flows_of(self.epoch, page.last, page.ends, &page.bytes) {
            Ok((flows, errors)) => {
                for e in errors {
                    crate::log_limited!(error, error = %e, "A flow record is malformed");
                }
                (flows, page.through, page.missed)
            }
            Err(e) => {
                crate::log_limited!(error, error = %e, "Flow records could not be read back");
                (Vec::new(), after, page.missed)
            }
        }
    }

    /// Records numbered above `after`, at most `limit` and about `max_bytes` (at least one): their
    /// bytes and connections are copied under the lock, the connections encoded off it.
    fn page(&self, after: u64, limit: usize, max_bytes: usize) -> Page {
        self.flush();
        let (bytes, ends, through, last, missed) = {
            let held = lock(&self.backlog);
            let page = held.kept.after(after, limit);
            let mut bytes = Vec::new();
            let mut ends: Vec<Arc<Ends>> = Vec::new();
            let mut seen = rustc_hash::FxHashSet::default();
            let (mut through, mut size) = (page.last, 0);
            for (i, (n, (id, conn), [head, tail])) in page.items.iter().enumerate() {
                // A connection not in the frame yet counts too (once: its size is kept).
                let new = !seen.contains(id);
                let ends_len = if new {
                    *conn.wire_len.get_or_init(|| prost::Message::encoded_len(&wire_ends(conn)) + 8)
                } else {
                    0
                };
                let len = head.len() + tail.len();
                if i > 0 && size + len + ends_len > max_bytes {
                    // `through` stays at the last record taken: the rest come next time.
                    break;
                }
                size += len + ends_len;
                bytes.extend_from_slice(head);
                bytes.extend_from_slice(tail);
                if new {
                    seen.insert(*id);
                    ends.push(conn.clone());
                }
                through = *n;
            }
            (bytes, ends, through, page.last, page.missed)
        };
        Page { bytes, ends: ends.iter().map(|e| wire_ends(e)).collect(), through, last, missed }
    }

    /// This run's id: record numbers start again when it changes.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records the backlog let go because it was full.
    pub fn evicted(&self) -> u64 {
        self.flush();
        lock(&self.backlog).kept.evicted()
    }
}

/// What [`Records::page`] took.
struct Page {
    bytes: Vec<u8>,
    ends: Vec<WireEnds>,
    /// The number of the last record taken (`last` when none).
    through: u64,
    last: u64,
    missed: u64,
}

/// Stored records as flows (and the ones that do not convert): the same decoding a reader of the
/// stream does.
fn flows_of(
    epoch: u64,
    last: u64,
    ends: Vec<WireEnds>,
    bytes: &[u8],
) -> Result<(Vec<Flow>, Vec<stream::StreamError>), String> {
    let frame = stream::frame(epoch, last, 0, ends, bytes).map_err(|e| e.to_string())?;
    let batch = stream::read_frame(&mut &frame[..], &mut Vec::new()).map_err(|e| e.to_string())?;
    Ok(batch.into_flows())
}

impl FlowSource for Records {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Keeps what was handed over first: a reader's thread does that work, not the data path.
    fn last(&self) -> u64 {
        self.flush();
        lock(&self.backlog).kept.last()
    }

    /// The lock is held only to copy the records' bytes.
    fn frame(&self, after: u64, max: usize, max_bytes: usize) -> std::io::Result<Frame> {
        let page = self.page(after, max, max_bytes);
        let bytes = stream::frame(self.epoch, page.last, page.missed, page.ends, &page.bytes)?;
        Ok(Frame { bytes, through: page.through, last: page.last })
    }
}

impl Drop for Records {
    /// What was handed over reaches the file.
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::End;

    fn record(i: u64, ends: &Arc<Ends>) -> Record {
        Record {
            time_ns: now_ns(),
            reply: false,
            verdict: Verdict::Forwarded,
            reason: None,
            ends: ends.clone(),
            transport: Transport::Tcp,
            detail: Detail::Http {
                method: http::Method::GET,
                url: Arc::from(format!("http://x/{i}").as_str()),
                protocol: HttpProtocol::Http11,
                code: 0,
            },
            latency_ns: 0,
            policy: None,
            summary: String::new(),
            service: None,
        }
    }

    fn ends() -> Arc<Ends> {
        let end = |ip: &str, port| End { record: Arc::default(), ip: ip.parse().unwrap(), port, learned: None };
        Arc::new(Ends {
            source: end("10.0.0.1", 40000),
            destination: end("10.0.0.2", 80),
            direction: porin_flow::flow::TrafficDirection::Ingress,
            id: Ends::next_id(),
            wire_len: Default::default(),
            spiffe_id: None,
        })
    }

    fn urls(flows: &[Flow]) -> Vec<String> {
        flows.iter().map(|f| f.l7.as_ref().and_then(|l| l.http.as_ref()).unwrap().url.clone()).collect()
    }

    fn requests_counted(r: &Records) -> bool {
        r.metrics.render_text().lines().any(|l| l.starts_with("hubble_http_requests_total{") && l.ends_with(" 3"))
    }

    #[test]
    fn a_reader_sees_every_record_handed_over_before_it_asked_in_order() {
        let r = Records::start(None, true).unwrap();
        let e = ends();
        for i in 0..3 {
            r.emit(record(i, &e));
        }
        // Nothing waits for the records thread: the reader keeps what was handed over first.
        let (flows, last, missed) = r.after(0, 100);
        assert_eq!((last, missed), (3, 0));
        assert_eq!(urls(&flows), ["http://x/0", "http://x/1", "http://x/2"]);
        assert!(requests_counted(&r), "{}", r.metrics.render_text());
    }

    #[test]
    fn the_records_thread_keeps_them_without_a_reader() {
        let r = Records::start(None, true).unwrap();
        let e = ends();
        for i in 0..3 {
            r.emit(record(i, &e));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while r.waiting() {
            assert!(std::time::Instant::now() < deadline, "the records thread never kept the records");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(requests_counted(&r), "{}", r.metrics.render_text());
        assert_eq!(lock(&r.backlog).kept.last(), 3);
    }

    #[test]
    fn a_full_hand_over_is_kept_by_the_path_that_fills_it() {
        // No records thread (`new`): only the data path itself keeps them.
        let r = Records::new(None, true).unwrap();
        let e = ends();
        for i in 0..PENDING_MAX as u64 - 1 {
            r.emit(record(i, &e));
        }
        assert_eq!(lock(&r.pending).len(), PENDING_MAX - 1);
        r.emit(record(0, &e));
        assert!(!r.waiting());
        assert_eq!(lock(&r.backlog).kept.last(), PENDING_MAX as u64);
    }

    #[test]
    fn every_record_reaches_the_file_also_when_the_sink_goes() {
        struct Dir(std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Dir(std::env::temp_dir().join(format!("porin-records-{}-{}", std::process::id(), Ends::next_id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("flows.jsonl");
        // No records thread, so nothing else holds the sink when it goes.
        let r = Records::new(Some(&path), true).unwrap();
        let e = ends();
        for i in 0..3 {
            r.emit(record(i, &e));
        }
        drop(r);
        let text = std::fs::read_to_string(&path).unwrap();
        let got: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| v["l7"]["http"]["url"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, ["http://x/0", "http://x/1", "http://x/2"]);
    }

    #[test]
    fn a_sink_that_keeps_nothing_takes_nothing() {
        let r = Records::start(None, false).unwrap();
        r.emit(record(0, &ends()));
        assert!(!r.waiting());
        assert_eq!(r.after(0, 10).0.len(), 0);
    }
}
