//! Where the proxy's flow records go: the shared bounded [`Backlog`] the control socket serves
//! (`flows after N`, and the record stream: [`Records`] is its [`FlowSource`]), and optionally a
//! JSON-lines file. Counters for `status`.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use porin_flow::backlog::Backlog;
use porin_flow::flow::{DnsInfo, DropReason, Flow, FlowEndpoint, HttpProtocol, KafkaInfo, Verdict};
use porin_flow::stream::{self, Batch, FlowSource, StreamError, WireEnd, WireEnds, WireHttp, WireRecord};
use serde::Serialize;

use crate::policy::Ends;

/// Records kept for queries.
pub const BACKLOG: usize = 8 * 1024;

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
    /// Flow records the JSON-lines file could not take (write or serialisation errors).
    pub flow_log_errors: AtomicU64,
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
    records_evicted: u64,
    connections_shed: u64,
}

impl Counters {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Current values (`shed`: connections the connection table let go; `evicted`: records the
    /// backlog let go).
    pub fn values(&self, shed: u64, evicted: u64) -> CounterValues {
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
            flow_log_errors: g(&self.flow_log_errors),
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
}

/// Now, nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)
}

impl Record {
    /// This record on the wire ([`stream`]), its connection being `ends` of the batch.
    pub fn wire(&self, seq: u64, ends: u32) -> WireRecord {
        let (mut http, mut dns, mut kafka) = (None, None, None);
        match &self.detail {
            Detail::Http { method, url, protocol, code } => {
                http = Some(WireHttp {
                    method: method.as_str().to_owned(),
                    url: url.to_string(),
                    protocol: protocol.number(),
                    code: u32::from(*code),
                });
            }
            Detail::Dns(d) => dns = Some(DnsInfo::clone(d)),
            Detail::Kafka(k) => kafka = Some(KafkaInfo::clone(k)),
        }
        WireRecord {
            seq,
            ends,
            time_ns: self.time_ns,
            reply: self.reply,
            verdict: self.verdict.number(),
            reason: self.reason.map_or(0, |r| u32::from(r.code())),
            udp: self.transport == Transport::Udp,
            latency_ns: self.latency_ns,
            policy: self.policy.as_deref().map(str::to_owned),
            summary: self.summary.clone(),
            http,
            dns,
            kafka,
        }
    }

    /// The Hubble-shaped record ([`stream::to_flow`], the one conversion).
    pub fn to_flow(&self, seq: u64) -> Result<Flow, StreamError> {
        stream::to_flow(&wire_ends(&self.ends), self.wire(seq, 0))
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
    WireEnds { source: Some(end(&e.source)), destination: Some(end(&e.destination)), direction: e.direction.number() }
}

/// The record sink.
#[derive(Debug)]
pub struct Records {
    backlog: Mutex<Backlog<Arc<Record>>>,
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
    /// A sink, with a JSON-lines file when `log` is given; `enabled: false` keeps nothing.
    pub fn new(log: Option<&Path>, enabled: bool) -> std::io::Result<Self> {
        let file = match log {
            Some(p) => Some(Mutex::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p)?,
            ))),
            None => None,
        };
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Ok(Self { backlog: Mutex::new(Backlog::new(BACKLOG)), epoch, file, metrics: Default::default(), enabled })
    }

    /// What the sink holds: `{enabled, kept, capacity, seen, evicted}`.
    pub fn status(&self) -> serde_json::Value {
        let b = lock(&self.backlog);
        serde_json::json!({
            "enabled": self.enabled, "kept": b.len(), "capacity": BACKLOG, "seen": b.last(), "evicted": b.evicted(),
        })
    }

    /// Numbers and stores a record (and appends it to the file); a record the file could not
    /// take is counted in `counters.flow_log_errors`.
    pub fn emit(&self, r: Record, counters: &Counters) {
        if !self.enabled {
            return;
        }
        crate::metrics::observe(&self.metrics, &r);
        let line = {
            // Numbered under the lock: the backlog is in sequence order, so a follower asking for
            // records after N never skips one.
            let mut b = lock(&self.backlog);
            let line = self.file.as_ref().map(|_| {
                r.to_flow(b.last() + 1)
                    .map_err(|e| e.to_string())
                    .and_then(|f| serde_json::to_string(&f).map_err(|e| e.to_string()))
            });
            b.push(Arc::new(r));
            line
        };
        let written = match (&self.file, line) {
            (Some(file), Some(Ok(line))) => {
                let mut w = lock(file);
                writeln!(w, "{line}").and_then(|()| w.flush()).is_ok()
            }
            (_, Some(Err(e))) => {
                crate::log_limited!(warn, error = %e, "A flow record could not be written to the flow log");
                false
            }
            _ => true,
        };
        if !written {
            Counters::inc(&counters.flow_log_errors);
        }
    }

    /// Records numbered above `after`, at most `limit`; the newest number; how many after `after`
    /// the backlog let go before this was asked.
    pub fn after(&self, after: u64, limit: usize) -> (Vec<Flow>, u64, u64) {
        let (picked, last, missed) = self.page(after, limit);
        // Records the proxy made itself: one that does not convert is a bug, logged, not served.
        let flows = picked
            .iter()
            .filter_map(|(n, r)| {
                r.to_flow(*n).map_err(|e| crate::log_limited!(error, error = %e, "A flow record is malformed")).ok()
            })
            .collect();
        (flows, last, missed)
    }

    /// Records numbered above `after`, at most `limit` (shared, taken under the lock), the newest
    /// number and what the backlog let go.
    fn page(&self, after: u64, limit: usize) -> (Vec<(u64, Arc<Record>)>, u64, u64) {
        let b = lock(&self.backlog);
        let page = b.after(after, limit);
        (page.items.into_iter().map(|(n, r)| (n, Arc::clone(r))).collect(), page.last, page.missed)
    }

    /// This run's id: record numbers start again when it changes.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records the backlog let go because it was full.
    pub fn evicted(&self) -> u64 {
        lock(&self.backlog).evicted()
    }
}

impl FlowSource for Records {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn last(&self) -> u64 {
        lock(&self.backlog).last()
    }

    /// Encoded off the lock: the lock is held only to take the records' `Arc`s.
    fn batch(&self, after: u64, max: usize, max_bytes: usize) -> Batch {
        let (picked, last, missed) = self.page(after, max);
        let mut ends: Vec<WireEnds> = Vec::new();
        // A connection's ends once per batch: the records keep them alive, so their addresses
        // name them for the batch's lifetime.
        let mut index: std::collections::HashMap<*const Ends, u32> = std::collections::HashMap::new();
        let (mut records, mut bytes) = (Vec::with_capacity(picked.len()), 0);
        for (n, r) in &picked {
            let key = Arc::as_ptr(&r.ends);
            let (i, ends_bytes) = match index.get(&key) {
                Some(i) => (*i, 0),
                None => {
                    let e = wire_ends(&r.ends);
                    let size = prost::Message::encoded_len(&e) + 8;
                    ends.push(e);
                    (u32::try_from(ends.len() - 1).unwrap_or(u32::MAX), size)
                }
            };
            let mut wire = r.wire(*n, i);
            stream::cut_field(&mut wire.summary);
            if let Some(h) = wire.http.as_mut() {
                stream::cut_field(&mut h.url);
            }
            bytes += ends_bytes + prost::Message::encoded_len(&wire) + 8;
            if bytes > max_bytes && !records.is_empty() {
                // The rest go in the next frame (with their ends again).
                if ends_bytes > 0 {
                    ends.pop();
                }
                break;
            }
            index.insert(key, i);
            records.push(wire);
        }
        Batch { epoch: self.epoch, last, missed, ends, records }
    }
}
