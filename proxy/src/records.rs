//! Where flow records go: a bounded backlog the control socket serves (`flows after N`), and
//! optionally a JSON-lines file. Counters for `status`.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::flow::{Flow, FlowEndpoint, FlowIp, HttpInfo, Layer7, Text, rfc3339};
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
    connections_shed: u64,
}

impl Counters {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Current values (`shed`: connections the connection table let go).
    pub fn values(&self, shed: u64) -> CounterValues {
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
            connections_shed: shed,
        }
    }
}

/// One request or response, as recorded on the hot path: what differs per request, and an `Arc`
/// of what the connection shares. Turned into a Hubble-shaped [`Flow`] when someone asks.
#[derive(Clone, Debug)]
pub struct Record {
    /// Wall clock, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// A response (travels from the server back to the client).
    pub reply: bool,
    /// `FORWARDED`, `DROPPED`, `ERROR`.
    pub verdict: &'static str,
    /// Drop reason name (empty when not dropped).
    pub reason: Text,
    /// The connection's ends.
    pub ends: Arc<Ends>,
    /// Method.
    pub method: http::Method,
    /// URL as judged.
    pub url: Arc<str>,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: Text,
    /// Response status (responses).
    pub code: u16,
    /// Request to response headers (responses).
    pub latency_ns: u64,
    /// The deciding rule.
    pub policy: Option<Arc<str>>,
    /// Why (refusals, errors).
    pub summary: String,
}

impl Record {
    /// The Hubble-shaped record.
    pub fn to_flow(&self, seq: u64) -> Flow {
        let e = &self.ends;
        let (src, dst) = if self.reply { (&e.destination, &e.source) } else { (&e.source, &e.destination) };
        let ports =
            BTreeMap::from([(Cow::Borrowed("source_port"), src.port), (Cow::Borrowed("destination_port"), dst.port)]);
        Flow {
            time: rfc3339(self.time_ns / 1_000_000_000, u32::try_from(self.time_ns % 1_000_000_000).unwrap_or(0)),
            seq,
            emitter: Cow::Borrowed("proxy"),
            verdict: Cow::Borrowed(self.verdict),
            drop_reason: 0,
            drop_reason_desc: self.reason.clone(),
            flow_type: Cow::Borrowed("L7"),
            event_type: Cow::Borrowed("access-log"),
            traffic_direction: e.direction.clone(),
            is_reply: self.reply,
            ip: FlowIp {
                source: src.ip.to_string(),
                destination: dst.ip.to_string(),
                ip_version: Cow::Borrowed(if src.ip.is_ipv4() { "IPv4" } else { "IPv6" }),
            },
            l4: BTreeMap::from([(Cow::Borrowed("TCP"), ports)]),
            source: FlowEndpoint::clone(&src.record),
            destination: FlowEndpoint::clone(&dst.record),
            l7: Some(Layer7 {
                kind: Cow::Borrowed(if self.reply { "RESPONSE" } else { "REQUEST" }),
                latency_ns: self.latency_ns,
                http: Some(HttpInfo {
                    code: self.code,
                    method: self.method.as_str().to_owned(),
                    url: self.url.to_string(),
                    protocol: self.protocol.clone(),
                }),
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
    seq: AtomicU64,
    backlog: Mutex<VecDeque<(u64, Record)>>,
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
    pub fn emit(&self, r: Record) {
        let line = {
            // Numbered under the lock: the backlog is in sequence order, so a follower asking for
            // records after N never skips one.
            let Ok(mut b) = self.backlog.lock() else { return };
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let line = self.file.as_ref().and_then(|_| serde_json::to_string(&r.to_flow(seq)).ok());
            if b.len() >= BACKLOG {
                b.pop_front();
            }
            b.push_back((seq, r));
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
        let picked: Vec<(u64, Record)> = self
            .backlog
            .lock()
            .map(|b| b.iter().filter(|(s, _)| *s > after).take(limit).cloned().collect())
            .unwrap_or_default();
        (picked.iter().map(|(s, r)| r.to_flow(*s)).collect(), last)
    }
}
