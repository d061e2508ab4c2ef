//! Where the proxy's flow records go: the shared bounded [`Backlog`] the control socket serves
//! (`flows after N`), and optionally a JSON-lines file. Counters for `status`.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use porin_flow::backlog::Backlog;
use porin_flow::flow::{
    DnsInfo, DropReason, Emitter, EventType, Flow, FlowEndpoint, FlowIp, FlowType, HttpInfo, HttpProtocol, IpVersion,
    KafkaInfo, L7Type, Layer4, Layer7, Ports, Verdict, rfc3339,
};
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
    /// The Hubble-shaped record.
    pub fn to_flow(&self, seq: u64) -> Flow {
        let e = &self.ends;
        let (src, dst) = if self.reply { (&e.destination, &e.source) } else { (&e.source, &e.destination) };
        let ports = Ports { source_port: src.port, destination_port: dst.port };
        let (mut http, mut dns, mut kafka) = (None, None, None);
        match &self.detail {
            Detail::Http { method, url, protocol, code } => {
                http = Some(HttpInfo {
                    code: *code,
                    method: method.as_str().to_owned(),
                    url: url.to_string(),
                    protocol: *protocol,
                });
            }
            Detail::Dns(d) => dns = Some(DnsInfo::clone(d)),
            Detail::Kafka(k) => kafka = Some(KafkaInfo::clone(k)),
        }
        Flow {
            time: rfc3339(self.time_ns / 1_000_000_000, u32::try_from(self.time_ns % 1_000_000_000).unwrap_or(0)),
            seq,
            emitter: Emitter::Proxy,
            verdict: self.verdict,
            drop_reason: self.reason,
            flow_type: FlowType::L7,
            event_type: EventType::AccessLog,
            traffic_direction: e.direction,
            is_reply: self.reply,
            ip: Some(FlowIp {
                source: src.ip.to_string(),
                destination: dst.ip.to_string(),
                ip_version: if src.ip.is_ipv4() { IpVersion::IPv4 } else { IpVersion::IPv6 },
            }),
            l4: Some(match self.transport {
                Transport::Tcp => Layer4::Tcp(ports),
                Transport::Udp => Layer4::Udp(ports),
            }),
            source: FlowEndpoint::clone(&src.record),
            destination: FlowEndpoint::clone(&dst.record),
            destination_names: dst.names().to_vec(),
            l7: Some(Layer7 {
                kind: if self.reply { L7Type::Response } else { L7Type::Request },
                latency_ns: self.latency_ns,
                http,
                dns,
                kafka,
            }),
            policy: self.policy.as_deref().map(str::to_owned),
            ifindex: 0,
            summary: self.summary.clone(),
        }
    }
}

/// The record sink.
#[derive(Debug)]
pub struct Records {
    backlog: Mutex<Backlog<Record>>,
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
            let line = self.file.as_ref().map(|_| serde_json::to_string(&r.to_flow(b.last() + 1)));
            b.push(r);
            line
        };
        let written = match (&self.file, line) {
            (Some(file), Some(Ok(line))) => {
                let mut w = lock(file);
                writeln!(w, "{line}").and_then(|()| w.flush()).is_ok()
            }
            (_, Some(Err(_))) => false,
            _ => true,
        };
        if !written {
            Counters::inc(&counters.flow_log_errors);
        }
    }

    /// Records numbered above `after`, at most `limit`; the newest number; how many after `after`
    /// the backlog let go before this was asked.
    pub fn after(&self, after: u64, limit: usize) -> (Vec<Flow>, u64, u64) {
        let (picked, last, missed): (Vec<(u64, Record)>, u64, u64) = {
            let b = lock(&self.backlog);
            let page = b.after(after, limit);
            (page.items.into_iter().map(|(n, r)| (n, r.clone())).collect(), page.last, page.missed)
        };
        (picked.iter().map(|(n, r)| r.to_flow(*n)).collect(), last, missed)
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
