//! The proxy's record stream: how its L7 records reach a follower (the agent's ring, `porin
//! observe --proxy -f`) without JSON and without asking again.
//!
//! A reader sends one control request, `{"cmd":"flow_stream","after":N,"epoch":E}`, gets one JSON
//! reply line (`{"reply":"done"}` or an error), and from then on reads frames until it hangs up:
//! a 4-byte big-endian length, then a protobuf [`Batch`]. A batch carries the records numbered
//! after the previous one (at most [`FRAME_RECORDS`]), each naming its connection's two ends by
//! their index in the batch's `ends` (sent once per batch, not once per record), and what the
//! proxy's backlog let go before the stream reached it (`missed`). The writer sends a batch as
//! soon as it has records (it looks every [`TICK`]), its first one at once (it tells the reader the
//! run and the newest number) and an empty one every [`HEARTBEAT`] so a reader can tell a quiet
//! proxy from a gone one. A frame stops at [`FRAME_RECORDS`] records or about [`FRAME_BYTES`]
//! bytes, whichever comes first; the next follows at once.
//!
//! The messages are prost-derived here (the endpoint, DNS and Kafka parts are [`crate::flow`]'s
//! own types); the proxy writes its records with [`RecordRef::encode`] and [`frame`];
//! [`Batch::into_flows`] turns them into Hubble-shaped [`Flow`]s, the only place that does, for
//! the proxy's own JSON answers and file as well as for readers of the stream.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use crate::control::{ControlError, Reply, Request};
use crate::flow::{
    AuthType, DnsInfo, DropReason, Emitter, EventType, Flow, FlowEndpoint, FlowIp, FlowService, FlowType, HttpInfo,
    HttpProtocol, IpVersion, KafkaInfo, L7Type, Layer4, Layer7, Ports, TrafficDirection, Verdict, rfc3339,
};

/// At most this many records in one frame.
pub const FRAME_RECORDS: usize = 4096;
/// How often the writer looks for new records.
pub const TICK: Duration = Duration::from_millis(20);
/// An empty batch at least this often.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A frame longer than this is refused (a record is a few hundred bytes).
pub const MAX_FRAME: usize = 64 << 20;
/// The writer stops adding records to a frame at this size (long URLs make long records).
pub const FRAME_BYTES: usize = 4 << 20;
/// A record's URL or summary longer than this is cut in the stream, so that one record always
/// fits a frame whatever the proxy's header limits.
pub const MAX_FIELD: usize = 64 << 10;

/// One frame.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    /// Which run of the proxy numbered the records (see `Reply::Flows::epoch`).
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// The newest number the proxy had when it wrote the frame.
    #[prost(uint64, tag = "2")]
    pub last: u64,
    /// Records after the previous frame that the backlog let go before the stream reached them.
    #[prost(uint64, tag = "3")]
    pub missed: u64,
    /// The connections the records belong to.
    #[prost(message, repeated, tag = "4")]
    pub ends: Vec<WireEnds>,
    /// The records, oldest first.
    #[prost(message, repeated, tag = "5")]
    pub records: Vec<WireRecord>,
}

/// A connection's two ends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireEnds {
    /// The client.
    #[prost(message, optional, tag = "1")]
    pub source: Option<WireEnd>,
    /// The server.
    #[prost(message, optional, tag = "2")]
    pub destination: Option<WireEnd>,
    /// Whose policy judges: [`TrafficDirection`] as Hubble numbers it (1 ingress, 2 egress).
    #[prost(int32, tag = "3")]
    pub direction: i32,
    /// What the batch's records call it (unique among a process's live connections).
    #[prost(uint64, tag = "4")]
    pub id: u64,
    /// The SPIFFE ID of the client's certificate: the connection came through the mTLS tunnel
    /// (empty otherwise).
    #[prost(string, tag = "5")]
    pub spiffe_id: String,
}

/// One end.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireEnd {
    /// The endpoint (identity, namespace, pod, labels).
    #[prost(message, optional, tag = "1")]
    pub endpoint: Option<FlowEndpoint>,
    /// The address: 4 or 16 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub ip: Vec<u8>,
    /// The port.
    #[prost(uint32, tag = "3")]
    pub port: u32,
    /// Names the DNS proxy learned the address under.
    #[prost(string, repeated, tag = "4")]
    pub names: Vec<String>,
}

/// One request or response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireRecord {
    /// Its number.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Its connection: the `id` of one of [`Batch::ends`].
    #[prost(uint64, tag = "2")]
    pub ends: u64,
    /// Wall clock, nanoseconds since the Unix epoch.
    #[prost(uint64, tag = "3")]
    pub time_ns: u64,
    /// A response.
    #[prost(bool, tag = "4")]
    pub reply: bool,
    /// [`Verdict`] as Hubble numbers it.
    #[prost(int32, tag = "5")]
    pub verdict: i32,
    /// [`DropReason::code`]; 0 when not dropped.
    #[prost(uint32, tag = "6")]
    pub reason: u32,
    /// Over UDP (else TCP).
    #[prost(bool, tag = "7")]
    pub udp: bool,
    /// Request to response (responses).
    #[prost(uint64, tag = "8")]
    pub latency_ns: u64,
    /// The deciding rule.
    #[prost(string, optional, tag = "9")]
    pub policy: Option<String>,
    /// Why (refusals, errors).
    #[prost(string, tag = "10")]
    pub summary: String,
    /// HTTP (and gRPC).
    #[prost(message, optional, tag = "11")]
    pub http: Option<WireHttp>,
    /// DNS.
    #[prost(message, optional, tag = "12")]
    pub dns: Option<DnsInfo>,
    /// Kafka.
    #[prost(message, optional, tag = "13")]
    pub kafka: Option<KafkaInfo>,
    /// `namespace/name` of the service the request was balanced within; empty when none.
    #[prost(string, tag = "14")]
    pub service: String,
    /// An L3/L4 flow the proxy relayed through (or refused at) the mTLS tunnel: no L7 part.
    #[prost(bool, tag = "15")]
    pub tunnel: bool,
}

/// The HTTP part of a record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireHttp {
    /// Method.
    #[prost(string, tag = "1")]
    pub method: String,
    /// URL as judged.
    #[prost(string, tag = "2")]
    pub url: String,
    /// 10, 11 or 20: the version the client spoke.
    #[prost(uint32, tag = "3")]
    pub protocol: u32,
    /// Response status (responses).
    #[prost(uint32, tag = "4")]
    pub code: u32,
}

/// Hubble's numbers of verdicts and directions, and HTTP versions as the wire carries them.
impl Verdict {
    /// Hubble's number (`flow.proto`).
    pub fn number(self) -> i32 {
        match self {
            Self::Unknown => 0,
            Self::Forwarded => 1,
            Self::Dropped => 2,
            Self::Error => 3,
            Self::Audit => 4,
            Self::Redirected => 5,
        }
    }

    /// The verdict of a number (`None`: not one Porin writes).
    pub fn from_number(n: i32) -> Option<Self> {
        [Self::Unknown, Self::Forwarded, Self::Dropped, Self::Error, Self::Audit, Self::Redirected]
            .into_iter()
            .find(|v| v.number() == n)
    }
}

impl TrafficDirection {
    /// Hubble's number (`flow.proto`).
    pub fn number(self) -> i32 {
        match self {
            Self::Unknown => 0,
            Self::Ingress => 1,
            Self::Egress => 2,
        }
    }

    /// The direction of a number.
    pub fn from_number(n: i32) -> Option<Self> {
        [Self::Unknown, Self::Ingress, Self::Egress].into_iter().find(|d| d.number() == n)
    }
}

impl HttpProtocol {
    /// 10, 11 or 20.
    pub fn number(self) -> u32 {
        match self {
            Self::Http10 => 10,
            Self::Http11 => 11,
            Self::Http2 => 20,
        }
    }

    /// The version of a number.
    pub fn from_number(n: u32) -> Option<Self> {
        [Self::Http10, Self::Http11, Self::Http2].into_iter().find(|p| p.number() == n)
    }
}

/// The address of a [`WireEnd`].
pub fn wire_ip(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A stream that cannot be read: what and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The socket failed or closed.
    #[error("{path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// What happened.
        #[source]
        source: std::io::Error,
    },
    /// The process refused the stream (or does not serve it).
    #[error("{path}: {source}")]
    Refused {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: ControlError,
    },
    /// A frame longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes (at most {MAX_FRAME})")]
    FrameTooLong(usize),
    /// A frame that is not a batch.
    #[error("undecodable frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A record that does not make sense.
    #[error("record {seq}: {what}")]
    Record {
        /// Its number.
        seq: u64,
        /// What is wrong.
        what: String,
    },
}

fn bad(r: &WireRecord, what: impl Into<String>) -> StreamError {
    StreamError::Record { seq: r.seq, what: what.into() }
}

/// One end, as every record of its connection shows it.
#[derive(Clone, Debug)]
struct Side {
    ip: IpAddr,
    ip_text: String,
    port: u16,
    endpoint: std::sync::Arc<FlowEndpoint>,
    names: Vec<String>,
}

/// A connection's ends, checked once for all of its records in a batch.
#[derive(Clone, Debug)]
struct Resolved {
    client: Side,
    server: Side,
    direction: TrafficDirection,
    spiffe_id: Option<String>,
}

impl Resolved {
    fn of(ends: &WireEnds) -> Result<Self, String> {
        let side = |end: Option<&WireEnd>| -> Result<Side, String> {
            let end = end.ok_or("an end is missing")?;
            let ip = match end.ip.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(&end.ip[..]).map_err(|_| "address")?),
                16 => IpAddr::from(<[u8; 16]>::try_from(&end.ip[..]).map_err(|_| "address")?),
                n => return Err(format!("address of {n} bytes")),
            };
            Ok(Side {
                ip,
                ip_text: ip.to_string(),
                port: u16::try_from(end.port).map_err(|_| format!("port {}", end.port))?,
                endpoint: std::sync::Arc::new(end.endpoint.clone().unwrap_or_default()),
                names: end.names.clone(),
            })
        };
        Ok(Self {
            client: side(ends.source.as_ref())?,
            server: side(ends.destination.as_ref())?,
            direction: TrafficDirection::from_number(ends.direction)
                .ok_or_else(|| format!("direction {}", ends.direction))?,
            spiffe_id: (!ends.spiffe_id.is_empty()).then(|| ends.spiffe_id.clone()),
        })
    }
}

/// One record as Hubble shapes it, with the connection it belongs to.
fn flow(ends: &Resolved, r: WireRecord) -> Result<Flow, StreamError> {
    let (src, dst) = if r.reply { (&ends.server, &ends.client) } else { (&ends.client, &ends.server) };
    let ports = Ports { source_port: src.port, destination_port: dst.port };
    let verdict = Verdict::from_number(r.verdict).ok_or_else(|| bad(&r, format!("verdict {}", r.verdict)))?;
    let drop_reason = match r.reason {
        0 => None,
        n => Some(
            u8::try_from(n).ok().and_then(DropReason::from_code).ok_or_else(|| bad(&r, format!("drop reason {n}")))?,
        ),
    };
    let l7_parts = usize::from(r.http.is_some()) + usize::from(r.dns.is_some()) + usize::from(r.kafka.is_some());
    if l7_parts != usize::from(!r.tunnel) {
        return Err(bad(&r, "not exactly one of HTTP, DNS and Kafka (or none, for a tunnelled L3/L4 flow)"));
    }
    let http = match &r.http {
        Some(h) => Some((
            u16::try_from(h.code).map_err(|_| bad(&r, format!("HTTP status {}", h.code)))?,
            HttpProtocol::from_number(h.protocol).ok_or_else(|| bad(&r, format!("HTTP version {}", h.protocol)))?,
        )),
        None => None,
    };
    let service = match r.service.as_str() {
        "" => None,
        s => Some(FlowService::parse(s).ok_or_else(|| bad(&r, format!("service {s:?} is not namespace/name")))?),
    };
    let (source_service, destination_service) = if r.reply { (service, None) } else { (None, service) };
    let http = http.zip(r.http).map(|((code, protocol), h)| HttpInfo { code, protocol, method: h.method, url: h.url });
    let time = rfc3339(r.time_ns / 1_000_000_000, u32::try_from(r.time_ns % 1_000_000_000).unwrap_or(0));
    let (flow_type, event_type) = match (r.tunnel, verdict) {
        (false, _) => (FlowType::L7, EventType::AccessLog),
        (true, Verdict::Dropped) => (FlowType::L3L4, EventType::Drop),
        (true, _) => (FlowType::L3L4, EventType::PolicyVerdict),
    };
    let l7 = (!r.tunnel).then_some(Layer7 {
        kind: if r.reply { L7Type::Response } else { L7Type::Request },
        latency_ns: r.latency_ns,
        http,
        dns: r.dns,
        kafka: r.kafka,
    });
    Ok(Flow {
        time,
        seq: r.seq,
        emitter: Emitter::Proxy,
        verdict,
        drop_reason,
        flow_type,
        event_type,
        traffic_direction: ends.direction,
        is_reply: r.reply,
        ip: Some(FlowIp {
            source: src.ip_text.clone(),
            destination: dst.ip_text.clone(),
            ip_version: if src.ip.is_ipv4() { IpVersion::IPv4 } else { IpVersion::IPv6 },
        }),
        l4: Some(if r.udp { Layer4::Udp(ports) } else { Layer4::Tcp(ports) }),
        source: src.endpoint.clone(),
        destination: dst.endpoint.clone(),
        destination_names: dst.names.clone(),
        source_service,
        destination_service,
        l7,
        policy: r.policy,
        ifindex: 0,
        summary: r.summary,
        auth_type: if ends.spiffe_id.is_some() { AuthType::Spire } else { AuthType::Disabled },
        spiffe_id: ends.spiffe_id.clone(),
    })
}

impl Batch {
    /// The batch's records as flows, oldest first; a record that makes no sense is an error
    /// naming it (the rest are still returned).
    pub fn into_flows(self) -> (Vec<Flow>, Vec<StreamError>) {
        let mut flows = Vec::with_capacity(self.records.len());
        let mut errors = Vec::new();
        for f in self.flows() {
            match f {
                Ok(f) => flows.push(f),
                Err(e) => errors.push(e),
            }
        }
        (flows, errors)
    }

    /// The same, one at a time: a reader that judges each flow as it comes (and lets most go)
    /// never holds the batch's flows at once.
    pub fn flows(self) -> impl Iterator<Item = Result<Flow, StreamError>> {
        let ends: std::collections::HashMap<u64, Result<Resolved, String>> =
            self.ends.iter().map(|e| (e.id, Resolved::of(e))).collect();
        self.records.into_iter().map(move |r| match ends.get(&r.ends) {
            Some(Ok(e)) => flow(e, r),
            Some(Err(what)) => Err(bad(&r, what.clone())),
            None => Err(bad(&r, format!("connection {} is not in the batch", r.ends))),
        })
    }
}

/// A record as the proxy has it, borrowed: [`RecordRef::encode`] writes it as one `records`
/// entry of a [`Batch`] without building a [`WireRecord`] (no allocation on the proxy's hot path;
/// the stored bytes are copied into frames as they are).
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    /// Its number.
    pub seq: u64,
    /// Its connection's [`WireEnds::id`].
    pub ends: u64,
    /// Wall clock, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// A response.
    pub reply: bool,
    /// The verdict.
    pub verdict: Verdict,
    /// Why it was dropped.
    pub reason: Option<DropReason>,
    /// Over UDP (else TCP).
    pub udp: bool,
    /// Request to response (responses).
    pub latency_ns: u64,
    /// The deciding rule.
    pub policy: Option<&'a str>,
    /// Why (refusals, errors); cut to [`MAX_FIELD`].
    pub summary: &'a str,
    /// The request or response.
    pub detail: DetailRef<'a>,
    /// `namespace/name` of the service the request was balanced within.
    pub service: Option<&'a str>,
}

/// The L7 part of a [`RecordRef`].
#[derive(Clone, Copy, Debug)]
pub enum DetailRef<'a> {
    /// HTTP (and gRPC); the URL is cut to [`MAX_FIELD`].
    Http {
        /// Method.
        method: &'a str,
        /// URL as judged.
        url: &'a str,
        /// The version the client spoke.
        protocol: HttpProtocol,
        /// Response status (responses).
        code: u16,
    },
    /// DNS.
    Dns(&'a DnsInfo),
    /// Kafka.
    Kafka(&'a KafkaInfo),
    /// An L3/L4 flow relayed through (or refused at) the mTLS tunnel.
    Tunnel,
}

/// Where protobuf bytes go: a buffer, or a count of them (to know a length before writing it).
trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn byte(&mut self, b: u8) {
        self.put(&[b]);
    }
    /// A message's fields (its length is written before).
    fn message(&mut self, m: &impl prost::Message);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn byte(&mut self, b: u8) {
        self.push(b);
    }
    fn message(&mut self, m: &impl prost::Message) {
        // A `Vec` grows: encoding into one never runs out of room, the only way `encode` fails.
        m.encode(self).unwrap_or_default();
    }
}

impl Sink for usize {
    fn put(&mut self, bytes: &[u8]) {
        *self += bytes.len();
    }
    fn message(&mut self, m: &impl prost::Message) {
        *self += m.encoded_len();
    }
}

/// Protobuf's wire format for the few field kinds a record has (proto3: zero values are left out).
struct Pb<'s, S: Sink>(&'s mut S);

impl<S: Sink> Pb<'_, S> {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.byte((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.byte(v as u8);
    }
    fn key(&mut self, tag: u32, wire_type: u8) {
        self.varint(u64::from(tag << 3 | u32::from(wire_type)));
    }
    fn uint(&mut self, tag: u32, v: u64) {
        if v != 0 {
            self.key(tag, 0);
            self.varint(v);
        }
    }
    fn bytes(&mut self, tag: u32, b: &[u8]) {
        self.key(tag, 2);
        self.varint(b.len() as u64);
        self.0.put(b);
    }
    fn string(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(tag, s.as_bytes());
        }
    }
    fn message(&mut self, tag: u32, m: &impl prost::Message) {
        self.key(tag, 2);
        self.varint(m.encoded_len() as u64);
        self.0.message(m);
    }
}

impl RecordRef<'_> {
    fn body<S: Sink>(&self, s: &mut S) {
        let mut pb = Pb(s);
        pb.uint(1, self.seq);
        pb.uint(2, self.ends);
        pb.uint(3, self.time_ns);
        pb.uint(4, u64::from(self.reply));
        pb.uint(5, u64::try_from(self.verdict.number()).unwrap_or(0));
        pb.uint(6, self.reason.map_or(0, |r| u64::from(r.code())));
        pb.uint(7, u64::from(self.udp));
        pb.uint(8, self.latency_ns);
        if let Some(p) = self.policy {
            // Optional: present even when empty.
            pb.bytes(9, p.as_bytes());
        }
        pb.string(10, cut(self.summary));
        match self.detail {
            DetailRef::Http { method, url, protocol, code } => {
                fn fields<S: Sink>(pb: &mut Pb<'_, S>, method: &str, url: &str, protocol: HttpProtocol, code: u16) {
                    pb.string(1, method);
                    pb.string(2, cut(url));
                    pb.uint(3, u64::from(protocol.number()));
                    pb.uint(4, u64::from(code));
                }
                let mut len = 0;
                fields(&mut Pb(&mut len), method, url, protocol, code);
                pb.key(11, 2);
                pb.varint(len as u64);
                fields(&mut pb, method, url, protocol, code);
            }
            DetailRef::Dns(d) => pb.message(12, d),
            DetailRef::Kafka(k) => pb.message(13, k),
            DetailRef::Tunnel => {}
        }
        pb.string(14, cut(self.service.unwrap_or_default()));
        if matches!(self.detail, DetailRef::Tunnel) {
            pb.uint(15, 1);
        }
    }

    /// Appends the record as one `records` entry of a [`Batch`] (its key, its length, its fields).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut len = 0;
        self.body(&mut len);
        let mut pb = Pb(out);
        pb.key(5, 2);
        pb.varint(len as u64);
        self.body(out);
    }
}

/// `s` cut to [`MAX_FIELD`] bytes at a character boundary (the stream marks no cut: the record's
/// other fields say what it was).
fn cut(s: &str) -> &str {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut at = MAX_FIELD;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    &s[..at]
}

/// A whole frame (length prefix included): the batch's header and connections, then record
/// entries as [`RecordRef::encode`] wrote them.
pub fn frame(epoch: u64, last: u64, missed: u64, ends: Vec<WireEnds>, records: &[u8]) -> std::io::Result<Vec<u8>> {
    let head = Batch { epoch, last, missed, ends, records: Vec::new() };
    let len = prost::Message::encoded_len(&head) + records.len();
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("a frame of {len} bytes (at most {MAX_FRAME})")));
    }
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    prost::Message::encode(&head, &mut out).map_err(std::io::Error::other)?;
    out.extend_from_slice(records);
    Ok(out)
}

/// Reads one frame (`buf` is reused between frames).
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Batch, FrameError> {
    let mut len = [0; 4];
    r.read_exact(&mut len)?;
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len > MAX_FRAME {
        return Err(FrameError::Stream(StreamError::FrameTooLong(len)));
    }
    // Grown as bytes arrive, not to what the prefix claims.
    buf.clear();
    let got = r.take(u64::try_from(len).unwrap_or(u64::MAX)).read_to_end(buf)?;
    if got < len {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let batch = prost::Message::decode(&buf[..]).map_err(StreamError::from);
    // One long frame does not keep its buffer for the rest of the stream.
    if buf.capacity() > FRAME_BYTES * 2 {
        *buf = Vec::new();
    }
    Ok(batch?)
}

/// Why a frame could not be read: the socket, or its content.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The content.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// A reader of a proxy's record stream (blocking).
#[derive(Debug)]
pub struct StreamReader {
    socket: String,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    buf: Vec<u8>,
}

impl StreamReader {
    /// Asks the proxy at `socket` for its records after `after` of run `epoch` (0, or another
    /// run's: from the oldest it holds).
    pub fn connect(socket: &Path, after: u64, epoch: u64) -> Result<Self, StreamError> {
        let path = socket.display().to_string();
        let io = |source| StreamError::Io { path: path.clone(), source };
        let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(io)?;
        // A live stream sends at least a heartbeat a second.
        s.set_read_timeout(Some(HEARTBEAT * 10)).map_err(io)?;
        let mut line =
            serde_json::to_string(&Request::FlowStream { after, epoch }).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        s.write_all(line.as_bytes()).map_err(io)?;
        let mut reader = std::io::BufReader::new(s);
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut reader, &mut answer).map_err(io)?;
        let refused = |source| StreamError::Refused { path: path.clone(), source };
        match serde_json::from_str::<Reply>(&answer) {
            Ok(r) => drop(r.ok().map_err(refused)?),
            Err(source) => return Err(refused(ControlError::BadReply { path: path.clone(), line: answer, source })),
        }
        Ok(Self { socket: path, reader, buf: Vec::new() })
    }

    /// The next batch (blocks until the proxy sends one).
    pub fn next_batch(&mut self) -> Result<Batch, StreamError> {
        read_frame(&mut self.reader, &mut self.buf).map_err(|e| match e {
            FrameError::Io(source) => StreamError::Io { path: self.socket.clone(), source },
            FrameError::Stream(e) => e,
        })
    }
}

/// What a process streams from: the proxy's record backlog.
pub trait FlowSource: Send + Sync + 'static {
    /// This run's id.
    fn epoch(&self) -> u64;
    /// The records numbered after `after`, at most `max` and about `max_bytes` encoded (at least
    /// one when there is one), as one frame.
    fn frame(&self, after: u64, max: usize, max_bytes: usize) -> std::io::Result<Frame>;
    /// The newest number (cheap: the writer asks every [`TICK`]).
    fn last(&self) -> u64;
}

/// A frame ready to write.
#[derive(Debug)]
pub struct Frame {
    /// The bytes, length prefix included.
    pub bytes: Vec<u8>,
    /// The number of its last record (`last` when it has none).
    pub through: u64,
    /// The newest number when it was made.
    pub last: u64,
}

/// Writes `source`'s records after `after` to `w` until the reader hangs up, stops reading (a
/// write that cannot go on for `stall` ends the stream) or the process lets go of its records.
/// Blocking: run it on its own thread.
pub fn write_stream(
    source: &std::sync::Weak<dyn FlowSource>,
    w: &mut std::os::unix::net::UnixStream,
    after: u64,
    epoch: u64,
    stall: Duration,
) -> std::io::Result<()> {
    w.set_write_timeout(Some(stall))?;
    let Some(first) = source.upgrade() else { return Ok(()) };
    let mut after = if epoch == first.epoch() { after } else { 0 };
    drop(first);
    // None: nothing written yet (the first frame goes at once).
    let mut wrote: Option<std::time::Instant> = None;
    loop {
        let Some(records) = source.upgrade() else { return Ok(()) };
        let last = records.last();
        if last <= after && wrote.is_some_and(|t| t.elapsed() < HEARTBEAT) {
            drop(records);
            std::thread::sleep(TICK);
            continue;
        }
        // A reader ahead of this run (numbers from another one that `epoch` did not tell)
        // starts again from the oldest.
        if last < after {
            after = 0;
        }
        let frame = records.frame(after, FRAME_RECORDS, FRAME_BYTES)?;
        drop(records);
        after = frame.through;
        w.write_all(&frame.bytes)?;
        wrote = Some(std::time::Instant::now());
        if after >= frame.last {
            std::thread::sleep(TICK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(ip: &str, port: u32, pod: &str) -> WireEnd {
        WireEnd {
            endpoint: Some(FlowEndpoint {
                identity: 1000,
                namespace: "default".into(),
                pod_name: pod.into(),
                labels: vec!["k8s:app=x".into()],
            }),
            ip: wire_ip(ip.parse().unwrap()),
            port,
            names: vec![],
        }
    }

    fn batch() -> Batch {
        Batch {
            epoch: 7,
            last: 3,
            missed: 1,
            ends: vec![WireEnds {
                source: Some(end("10.0.0.1", 40000, "client")),
                destination: Some(end("10.0.0.2", 80, "server")),
                direction: TrafficDirection::Ingress.number(),
                id: 0,
                spiffe_id: "spiffe://cluster.local/ns/default/sa/client".into(),
            }],
            records: vec![
                WireRecord {
                    seq: 2,
                    time_ns: 1_700_000_000_123_456_789,
                    verdict: Verdict::Forwarded.number(),
                    http: Some(WireHttp { method: "GET".into(), url: "http://x/a".into(), protocol: 11, code: 0 }),
                    policy: Some("default/p ingress[0]".into()),
                    service: "default/deathstar".into(),
                    ..Default::default()
                },
                WireRecord {
                    seq: 3,
                    reply: true,
                    verdict: Verdict::Dropped.number(),
                    reason: u32::from(DropReason::PolicyDeny.code()),
                    udp: true,
                    dns: Some(DnsInfo { query: "a.example.".into(), rcode: 5, ..Default::default() }),
                    service: "kube-system/kube-dns".into(),
                    ..Default::default()
                },
                WireRecord {
                    seq: 4,
                    verdict: Verdict::Dropped.number(),
                    reason: u32::from(DropReason::AuthRequired.code()),
                    tunnel: true,
                    summary: "the certificate does not name the client".into(),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn a_batch_round_trips_and_becomes_flows() {
        // A batch of prost-built records, framed as the writer frames its stored ones.
        let b = batch();
        let records: Vec<u8> = prost::Message::encode_to_vec(&Batch { records: b.records.clone(), ..Batch::default() });
        let wire = frame(b.epoch, b.last, b.missed, b.ends, &records).unwrap();
        let back = read_frame(&mut &wire[..], &mut Vec::new()).unwrap();
        assert_eq!(back, batch());
        let (flows, errors) = back.into_flows();
        assert!(errors.is_empty(), "{errors:?}");
        let (req, resp) = (&flows[0], &flows[1]);
        assert_eq!((req.seq, req.verdict, req.is_reply), (2, Verdict::Forwarded, false));
        assert_eq!(req.time, "2023-11-14T22:13:20.123456789Z");
        assert_eq!(req.source.pod_name, "client");
        assert_eq!(req.ip.as_ref().unwrap().destination, "10.0.0.2");
        assert_eq!(req.l4, Some(Layer4::Tcp(Ports { source_port: 40000, destination_port: 80 })));
        assert_eq!(req.l7.as_ref().unwrap().http.as_ref().unwrap().url, "http://x/a");
        assert_eq!(req.policy.as_deref(), Some("default/p ingress[0]"));
        // A request goes to its service; a response comes from it.
        let svc = |ns: &str, name: &str| Some(FlowService { name: name.into(), namespace: ns.into() });
        assert_eq!((&req.source_service, &req.destination_service), (&None, &svc("default", "deathstar")));
        assert_eq!((&resp.source_service, &resp.destination_service), (&svc("kube-system", "kube-dns"), &None));
        // A response travels from the server back: the ends swap.
        assert_eq!((resp.source.pod_name.as_str(), resp.drop_reason), ("server", Some(DropReason::PolicyDeny)));
        assert_eq!(resp.l4, Some(Layer4::Udp(Ports { source_port: 80, destination_port: 40000 })));
        assert_eq!(resp.l7.as_ref().unwrap().dns.as_ref().unwrap().rcode, 5);
        // The connection came through the tunnel: every record says who the certificate named.
        for f in &flows {
            assert_eq!(f.auth_type, crate::flow::AuthType::Spire);
            assert_eq!(f.spiffe_id.as_deref(), Some("spiffe://cluster.local/ns/default/sa/client"));
        }
        // A tunnelled L3/L4 flow: no L7 part.
        let t = &flows[2];
        assert_eq!(
            (t.flow_type, t.event_type, t.drop_reason),
            (FlowType::L3L4, EventType::Drop, Some(DropReason::AuthRequired))
        );
        assert!(t.l7.is_none());
    }

    #[test]
    fn nonsense_is_named_not_panicked_on() {
        let mut b = batch();
        b.records.truncate(2);
        b.records[0].ends = 9;
        b.records[1].verdict = 99;
        let (flows, errors) = b.into_flows();
        assert!(flows.is_empty());
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["record 2: connection 9 is not in the batch", "record 3: verdict 99"]);
        let mut b = batch();
        b.records.truncate(2);
        b.ends[0].source.as_mut().unwrap().ip = vec![1, 2, 3];
        b.records[1].dns = None;
        let text: Vec<String> = b.clone().into_flows().1.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["record 2: address of 3 bytes", "record 3: address of 3 bytes"]);
        b.ends[0].source.as_mut().unwrap().ip = vec![1, 2, 3, 4];
        assert_eq!(
            b.into_flows().1[0].to_string(),
            "record 3: not exactly one of HTTP, DNS and Kafka (or none, for a tunnelled L3/L4 flow)"
        );
        let mut b = batch();
        b.records.truncate(2);
        b.records[0].service = "deathstar".into();
        b.records[1].service = "a/b/c".into();
        let text: Vec<String> = b.into_flows().1.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "record 2: service \"deathstar\" is not namespace/name",
                "record 3: service \"a/b/c\" is not namespace/name"
            ]
        );
        // Frames: too long, cut short, not a batch.
        let mut long = (u32::try_from(MAX_FRAME).unwrap() + 1).to_be_bytes().to_vec();
        long.extend([0; 8]);
        assert!(matches!(
            read_frame(&mut &long[..], &mut Vec::new()),
            Err(FrameError::Stream(StreamError::FrameTooLong(_)))
        ));
        assert!(matches!(read_frame(&mut &[0, 0, 0, 9, 1][..], &mut Vec::new()), Err(FrameError::Io(_))));
        assert!(matches!(
            read_frame(&mut &[0, 0, 0, 2, 0xff, 0xff][..], &mut Vec::new()),
            Err(FrameError::Stream(StreamError::Decode(_)))
        ));
    }

    /// What the hot path writes is what prost reads: every field, zero values, an empty rule
    /// name, long URLs cut, DNS and Kafka parts; records concatenated after a header make a batch.
    #[test]
    fn encoded_records_are_what_prost_decodes() {
        let dns = DnsInfo { query: "a.example.".into(), ips: vec!["192.0.2.1".into()], rcode: 3, ..Default::default() };
        let kafka = KafkaInfo { api_key: "produce".into(), topic: "t".into(), error_code: -1, ..Default::default() };
        let long = "x".repeat(MAX_FIELD + 10);
        let refs = [
            RecordRef {
                seq: 1,
                ends: 7,
                time_ns: u64::MAX,
                reply: false,
                verdict: Verdict::Forwarded,
                reason: None,
                udp: false,
                latency_ns: 0,
                policy: Some(""),
                summary: "",
                detail: DetailRef::Http { method: "GET", url: &long, protocol: HttpProtocol::Http2, code: 0 },
                service: Some("default/deathstar"),
            },
            RecordRef {
                seq: 300,
                ends: u64::MAX,
                time_ns: 5,
                reply: true,
                verdict: Verdict::Dropped,
                reason: Some(DropReason::PolicyDeny),
                udp: true,
                latency_ns: 1 << 40,
                policy: None,
                summary: "refused: é",
                detail: DetailRef::Dns(&dns),
                service: None,
            },
            RecordRef {
                seq: 301,
                ends: 0,
                time_ns: 0,
                reply: true,
                verdict: Verdict::Audit,
                reason: Some(DropReason::PolicyDenied),
                udp: false,
                latency_ns: 9,
                policy: Some("default/k ingress[0]"),
                summary: "",
                detail: DetailRef::Kafka(&kafka),
                service: Some(""),
            },
        ];
        let mut bytes = Vec::new();
        for r in &refs {
            r.encode(&mut bytes);
        }
        let ends = batch().ends;
        let framed = frame(3, 301, 2, ends.clone(), &bytes).unwrap();
        let b = read_frame(&mut &framed[..], &mut Vec::new()).unwrap();
        assert_eq!((b.epoch, b.last, b.missed, &b.ends), (3, 301, 2, &ends));
        let want = [
            WireRecord {
                seq: 1,
                ends: 7,
                time_ns: u64::MAX,
                verdict: 1,
                policy: Some(String::new()),
                http: Some(WireHttp { method: "GET".into(), url: "x".repeat(MAX_FIELD), protocol: 20, code: 0 }),
                service: "default/deathstar".into(),
                ..Default::default()
            },
            WireRecord {
                seq: 300,
                ends: u64::MAX,
                time_ns: 5,
                reply: true,
                verdict: 2,
                reason: u32::from(DropReason::PolicyDeny.code()),
                udp: true,
                latency_ns: 1 << 40,
                summary: "refused: é".into(),
                dns: Some(dns.clone()),
                ..Default::default()
            },
            WireRecord {
                seq: 301,
                reply: true,
                verdict: 4,
                reason: u32::from(DropReason::PolicyDenied.code()),
                latency_ns: 9,
                policy: Some("default/k ingress[0]".into()),
                kafka: Some(kafka.clone()),
                ..Default::default()
            },
        ];
        assert_eq!(b.records, want);
    }

    #[test]
    fn long_fields_are_cut_at_a_character_boundary() {
        assert_eq!(cut("http://x/a"), "http://x/a");
        let long = "é".repeat(MAX_FIELD);
        let c = cut(&long);
        assert!(c.len() <= MAX_FIELD && c.len() >= MAX_FIELD - 1 && c.chars().all(|ch| ch == 'é'), "{}", c.len());
    }

    #[test]
    fn numbers_are_hubbles() {
        for v in [
            Verdict::Unknown,
            Verdict::Forwarded,
            Verdict::Dropped,
            Verdict::Error,
            Verdict::Audit,
            Verdict::Redirected,
        ] {
            assert_eq!(Verdict::from_number(v.number()), Some(v));
        }
        assert_eq!((Verdict::Audit.number(), TrafficDirection::Egress.number()), (4, 2));
        for p in [HttpProtocol::Http10, HttpProtocol::Http11, HttpProtocol::Http2] {
            assert_eq!(HttpProtocol::from_number(p.number()), Some(p));
        }
    }
}
