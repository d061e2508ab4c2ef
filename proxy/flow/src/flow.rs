//! The flow record: Hubble's `Flow` fields, typed. Every enum serialises to the name Hubble
//! prints, so `porin observe -o json` reads like `hubble observe -o json`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use redirect_common::reason;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What happened to the flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// Not known.
    #[default]
    #[serde(rename = "VERDICT_UNKNOWN")]
    Unknown,
    /// Let through.
    Forwarded,
    /// Dropped (kernel) or denied / refused (proxy).
    Dropped,
    /// Handed to the L7 proxy.
    Redirected,
    /// Something failed (an upstream, an invalid policy file).
    Error,
    /// Policy would have dropped it; let through because audit mode is on (Cilium's
    /// `policy-audit-mode`).
    Audit,
}

impl Verdict {
    /// The name Hubble prints.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "VERDICT_UNKNOWN",
            Self::Forwarded => "FORWARDED",
            Self::Dropped => "DROPPED",
            Self::Redirected => "REDIRECTED",
            Self::Error => "ERROR",
            Self::Audit => "AUDIT",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Why a flow was dropped: Cilium's drop reasons where Cilium has one (the same numbers), Porin's
/// own above 200. The kernel's numbers are `redirect_common::reason`'s: the discriminants below
/// are those constants, so the two cannot drift.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// The source address is not the endpoint's own (Cilium `DROP_INVALID_SIP`).
    InvalidSourceIp = reason::INVALID_SOURCE,
    /// Default deny and no rule allows it (Cilium `DROP_POLICY`).
    PolicyDenied = reason::POLICY_DENIED,
    /// A deny rule matches (Cilium `DROP_POLICY_DENY`).
    PolicyDeny = reason::POLICY_DENY,
    /// The packet came from an interface no endpoint owns; the proxy: an end not in the snapshot.
    UnknownEndpoint = reason::UNKNOWN_ENDPOINT,
    /// A non-first fragment (its ports are unknown).
    FragmentNotSupported = reason::FRAGMENT,
    /// The flow needs the L7 proxy and it is not there: fail closed.
    ProxyUnavailable = reason::PROXY_UNAVAILABLE,
    /// A header could not be parsed.
    MalformedPacket = reason::MALFORMED,
    /// A TCP segment of an L7 flow that the proxy never saw start.
    NoProxyConnection = reason::NO_PROXY_CONNECTION,
    /// The client side of a proxied flow arrived without going through the proxy.
    ProxyBypass = reason::BYPASSES_PROXY,
    /// The allowing policy requires authentication and the flow did not come authenticated, or
    /// its peer's certificate does not name its identity (Cilium `DROP_POLICY_AUTH_REQUIRED`).
    AuthRequired = reason::AUTH_REQUIRED,
    /// The proxy refused a request as malformed or ambiguous (L7 only: no kernel number).
    MalformedRequest = 210,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [Self; 11] = [
        Self::InvalidSourceIp,
        Self::PolicyDenied,
        Self::PolicyDeny,
        Self::UnknownEndpoint,
        Self::FragmentNotSupported,
        Self::ProxyUnavailable,
        Self::MalformedPacket,
        Self::NoProxyConnection,
        Self::ProxyBypass,
        Self::AuthRequired,
        Self::MalformedRequest,
    ];

    /// The number (Cilium's where Cilium has the reason).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The reason of a number the kernel reported (`None`: not a drop, or unknown).
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The name Hubble prints (`drop_reason_desc`).
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidSourceIp => "INVALID_SOURCE_IP",
            Self::PolicyDenied => "POLICY_DENIED",
            Self::PolicyDeny => "POLICY_DENY",
            Self::UnknownEndpoint => "UNKNOWN_ENDPOINT",
            Self::FragmentNotSupported => "FRAGMENT_NOT_SUPPORTED",
            Self::ProxyUnavailable => "PROXY_UNAVAILABLE",
            Self::MalformedPacket => "MALFORMED_PACKET",
            Self::NoProxyConnection => "NO_PROXY_CONNECTION",
            Self::ProxyBypass => "PROXY_BYPASS",
            Self::AuthRequired => "AUTH_REQUIRED",
            Self::MalformedRequest => "MALFORMED_REQUEST",
        }
    }

    /// The reason of a name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// In JSON a drop reason is two fields, as Hubble prints them: `drop_reason` (the number) and
/// `drop_reason_desc` (the name); [`Flow`] flattens this in.
#[derive(Serialize, Deserialize)]
struct DropFields {
    drop_reason: u8,
    drop_reason_desc: String,
}

impl Serialize for DropReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        DropFields { drop_reason: self.code(), drop_reason_desc: self.name().to_owned() }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for DropReason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = DropFields::deserialize(d)?;
        Self::from_name(&f.drop_reason_desc)
            .or_else(|| Self::from_code(f.drop_reason))
            .ok_or_else(|| serde::de::Error::custom(format!("unknown drop reason {}", f.drop_reason_desc)))
    }
}

/// Which layer the record describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlowType {
    /// Not known (policy errors).
    #[default]
    #[serde(rename = "UNKNOWN_TYPE")]
    Unknown,
    /// A packet or connection (the kernel).
    #[serde(rename = "L3_L4")]
    L3L4,
    /// A request or response (the proxy).
    L7,
}

/// What kind of event made the record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventType {
    /// A new flow was judged and allowed or redirected (Cilium's policy-verdict notification).
    #[default]
    PolicyVerdict,
    /// A packet was dropped.
    Drop,
    /// An L7 request or response (Cilium's access log).
    AccessLog,
    /// A policy file was refused (the last good version keeps enforcing).
    PolicyError,
}

impl EventType {
    /// Cilium's monitor message type (`CiliumEventType.type`).
    pub fn cilium_type(self) -> u32 {
        match self {
            Self::Drop => 1,
            Self::PolicyVerdict => 5,
            Self::AccessLog => 129,
            Self::PolicyError => 0,
        }
    }
}

/// Which side's policy the flow was judged by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficDirection {
    /// Not known.
    #[default]
    #[serde(rename = "TRAFFIC_DIRECTION_UNKNOWN")]
    Unknown,
    /// Into the endpoint (its ingress policy).
    #[serde(rename = "INGRESS")]
    Ingress,
    /// Out of the endpoint (its egress policy).
    #[serde(rename = "EGRESS")]
    Egress,
}

impl fmt::Display for TrafficDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Unknown => "TRAFFIC_DIRECTION_UNKNOWN",
            Self::Ingress => "INGRESS",
            Self::Egress => "EGRESS",
        })
    }
}

/// Which process wrote the record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Emitter {
    /// The kernel datapath, through the agent.
    #[default]
    Datapath,
    /// The L7 proxy.
    Proxy,
    /// The agent itself (policy files).
    Agent,
}

/// A peer of a flow.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, prost::Message)]
#[prost(skip_debug)]
pub struct FlowEndpoint {
    /// Security identity.
    #[prost(uint32, tag = "1")]
    pub identity: u32,
    /// Namespace (endpoints only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Pod name (endpoints only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[prost(string, tag = "3")]
    pub pod_name: String,
    /// Identity labels (`source:key=value`).
    #[serde(default)]
    #[prost(string, repeated, tag = "4")]
    pub labels: Vec<String>,
}

/// IP version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpVersion {
    /// IPv4.
    #[default]
    IPv4,
    /// IPv6.
    IPv6,
}

/// IP part.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowIp {
    /// Source address.
    pub source: String,
    /// Destination address.
    pub destination: String,
    /// IPv4 or IPv6.
    #[serde(rename = "ipVersion")]
    pub ip_version: IpVersion,
}

/// Ports of a TCP, UDP or SCTP flow.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ports {
    /// Source port.
    pub source_port: u16,
    /// Destination port.
    pub destination_port: u16,
}

/// An ICMP message type.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IcmpType {
    /// The type.
    #[serde(rename = "type")]
    pub kind: u16,
}

/// Transport: `{"TCP": {"source_port": .., "destination_port": ..}}` and the like.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Layer4 {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp(Ports),
    /// UDP.
    #[serde(rename = "UDP")]
    Udp(Ports),
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp(Ports),
    /// ICMP.
    #[serde(rename = "ICMPv4")]
    Icmpv4(IcmpType),
    /// ICMPv6.
    #[serde(rename = "ICMPv6")]
    Icmpv6(IcmpType),
    /// VRRP (no fields recorded).
    #[serde(rename = "VRRP")]
    Vrrp(NoFields),
    /// IGMP (no fields recorded).
    #[serde(rename = "IGMP")]
    Igmp(NoFields),
}

/// A transport recorded by protocol alone.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NoFields {}

impl Layer4 {
    /// Hubble's name of the protocol.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tcp(_) => "TCP",
            Self::Udp(_) => "UDP",
            Self::Sctp(_) => "SCTP",
            Self::Icmpv4(_) => "ICMPv4",
            Self::Icmpv6(_) => "ICMPv6",
            Self::Vrrp(_) => "VRRP",
            Self::Igmp(_) => "IGMP",
        }
    }

    /// The destination port (TCP, UDP, SCTP).
    pub fn destination_port(&self) -> Option<u16> {
        match self {
            Self::Tcp(p) | Self::Udp(p) | Self::Sctp(p) => Some(p.destination_port),
            Self::Icmpv4(_) | Self::Icmpv6(_) | Self::Vrrp(_) | Self::Igmp(_) => None,
        }
    }
}

/// Request or response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum L7Type {
    /// A request.
    #[default]
    Request,
    /// A response.
    Response,
}

/// HTTP version as the client spoke it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpProtocol {
    /// HTTP/1.0.
    #[serde(rename = "HTTP/1.0")]
    Http10,
    /// HTTP/1.1.
    #[default]
    #[serde(rename = "HTTP/1.1")]
    Http11,
    /// HTTP/2.
    #[serde(rename = "HTTP/2")]
    Http2,
}

impl HttpProtocol {
    /// The name as it appears in records.
    pub fn name(self) -> &'static str {
        match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
            Self::Http2 => "HTTP/2",
        }
    }
}

/// The HTTP part of an L7 record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HttpInfo {
    /// Response status (0 on requests).
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub code: u16,
    /// Method.
    pub method: String,
    /// `http://authority/path?query`, with the path as the proxy judged and forwarded it.
    pub url: String,
    /// The version the client spoke.
    pub protocol: HttpProtocol,
}

/// The DNS part of an L7 record (Hubble's `DNS`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, prost::Message)]
#[prost(skip_debug)]
pub struct DnsInfo {
    /// The name asked for (fully qualified, as asked).
    #[prost(string, tag = "1")]
    pub query: String,
    /// Addresses in the answer (the A/AAAA records reached through the CNAME chain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[prost(string, repeated, tag = "2")]
    pub ips: Vec<String>,
    /// The lowest TTL of the records used, seconds.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    #[prost(uint32, tag = "3")]
    pub ttl: u32,
    /// The CNAME chain from the query to the addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[prost(string, repeated, tag = "4")]
    pub cnames: Vec<String>,
    /// Who saw it (`proxy`).
    #[prost(string, tag = "5")]
    pub observation_source: String,
    /// Response code (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED, ...; responses only).
    #[serde(default)]
    #[prost(uint32, tag = "6")]
    pub rcode: u32,
    /// Query types (`A`, `AAAA`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[prost(string, repeated, tag = "7")]
    pub qtypes: Vec<String>,
    /// Types of the answer records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[prost(string, repeated, tag = "8")]
    pub rrtypes: Vec<String>,
}

/// The Kafka part of an L7 record (Hubble's `Kafka`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, prost::Message)]
#[prost(skip_debug)]
pub struct KafkaInfo {
    /// The error code: of the broker's response on a response record; of the proxy's answer on a
    /// denied request; 0 otherwise.
    #[serde(default)]
    #[prost(int32, tag = "1")]
    pub error_code: i32,
    /// API version.
    #[prost(int32, tag = "2")]
    pub api_version: i32,
    /// API key name (`produce`, `fetch`, ...).
    #[prost(string, tag = "3")]
    pub api_key: String,
    /// Correlation id.
    #[prost(int32, tag = "4")]
    pub correlation_id: i32,
    /// The request's topics, comma-separated (Hubble records one topic).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[prost(string, tag = "5")]
    pub topic: String,
}

/// The L7 part of a record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layer7 {
    /// Request or response.
    #[serde(rename = "type")]
    pub kind: L7Type,
    /// Request to response headers (responses only).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub latency_ns: u64,
    /// HTTP details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpInfo>,
    /// DNS details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsInfo>,
    /// Kafka details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaInfo>,
}

/// A Kubernetes service a flow went to or came from (Hubble's `Service`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowService {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

impl FlowService {
    /// `namespace/name`.
    pub fn parse(s: &str) -> Option<Self> {
        let (namespace, name) = s.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains('/'))
            .then(|| Self { name: name.to_owned(), namespace: namespace.to_owned() })
    }
}

/// A flow record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flow {
    /// Wall-clock time, RFC 3339 (UTC, nanoseconds).
    pub time: String,
    /// Sequence number, per emitter.
    #[serde(default)]
    pub seq: u64,
    /// Who wrote it.
    #[serde(default)]
    pub emitter: Emitter,
    /// What happened.
    pub verdict: Verdict,
    /// Why it was dropped (`drop_reason` and `drop_reason_desc` in JSON).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<DropReason>,
    /// Which layer.
    #[serde(rename = "Type")]
    pub flow_type: FlowType,
    /// Which kind of event.
    pub event_type: EventType,
    /// Whose policy judged it.
    pub traffic_direction: TrafficDirection,
    /// Responses travel from the server back to the client.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_reply: bool,
    /// Addresses (none for policy errors).
    #[serde(rename = "IP", default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<FlowIp>,
    /// Transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<Layer4>,
    /// Source.
    #[serde(default)]
    pub source: std::sync::Arc<FlowEndpoint>,
    /// Destination.
    #[serde(default)]
    pub destination: std::sync::Arc<FlowEndpoint>,
    /// Names the DNS proxy learned the destination address under.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_names: Vec<String>,
    /// The service a response came from (the one its request was balanced within).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_service: Option<FlowService>,
    /// The service a request went to: the one the proxy balanced it within.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<FlowService>,
    /// L7 details (proxy records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<Layer7>,
    /// The policy rule that decided (`namespace/name path`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Interface index the packet was seen on (datapath records).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub ifindex: u32,
    /// One line for humans: why a request was refused, what failed upstream.
    #[serde(rename = "Summary", default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    /// How the flow's client was authenticated (Hubble's `auth_type`): `SPIRE` for a flow that
    /// came through the mTLS tunnel between node proxies.
    #[serde(default, skip_serializing_if = "AuthType::is_disabled")]
    pub auth_type: AuthType,
    /// The SPIFFE ID of the client's certificate (flows that came through the tunnel; Porin's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

/// How a flow's client was authenticated (Hubble's `AuthType`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum AuthType {
    /// Not authenticated.
    #[default]
    #[serde(rename = "DISABLED")]
    Disabled,
    /// Mutual TLS with SPIFFE certificates (Cilium's name for its SPIFFE-based mutual
    /// authentication; Porin's tunnel between node proxies).
    #[serde(rename = "SPIRE")]
    Spire,
}

impl AuthType {
    /// Not authenticated.
    pub fn is_disabled(&self) -> bool {
        *self == Self::Disabled
    }

    /// Hubble's number.
    pub fn number(self) -> i32 {
        match self {
            Self::Disabled => 0,
            Self::Spire => 1,
        }
    }
}

fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

impl Flow {
    /// The pod a filter names (`namespace/name` or just `name`) is this flow's source or destination.
    pub fn involves_pod(&self, pod: &str) -> bool {
        let is = |e: &FlowEndpoint| match pod.split_once('/') {
            Some((ns, name)) => e.namespace == ns && e.pod_name == name,
            None => e.pod_name == pod,
        };
        is(&self.source) || is(&self.destination)
    }

    /// The protocol a filter names: `tcp`, `udp`, `sctp`, `icmp`, `http`, `http/1.1`, `http/2`,
    /// `dns`, `l7`.
    pub fn has_protocol(&self, proto: &str) -> bool {
        let p = proto.to_ascii_lowercase();
        let http = self.l7.as_ref().and_then(|l| l.http.as_ref());
        match p.as_str() {
            "l7" => self.l7.is_some(),
            "http" => http.is_some(),
            "dns" => self.l7.as_ref().is_some_and(|l| l.dns.is_some()),
            "kafka" => self.l7.as_ref().is_some_and(|l| l.kafka.is_some()),
            "http/1.0" | "http/1.1" | "http/2" => http.is_some_and(|h| h.protocol.name().eq_ignore_ascii_case(&p)),
            "icmp" => matches!(self.l4, Some(Layer4::Icmpv4(_) | Layer4::Icmpv6(_))),
            _ => self.l4.as_ref().is_some_and(|l| l.name().eq_ignore_ascii_case(&p)),
        }
    }

    /// A record of a policy file the agent refused (the last good version keeps enforcing).
    pub fn policy_error(error: &str) -> Self {
        Self {
            time: now_rfc3339(),
            emitter: Emitter::Agent,
            verdict: Verdict::Error,
            flow_type: FlowType::Unknown,
            event_type: EventType::PolicyError,
            summary: format!("invalid policy, not applied (the last good version keeps enforcing): {error}"),
            ..Self::default()
        }
    }
}

/// Now, RFC 3339 UTC with nanoseconds.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_nanos())
}

/// Formats seconds since the Unix epoch (UTC) as RFC 3339 with nanoseconds.
pub fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if !(0..=9999).contains(&year) || nanos > 999_999_999 {
        return format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{nanos:09}Z");
    }
    // Every record gets one: fixed-width digits, without the formatting machinery.
    let mut out = *b"0000-00-00T00:00:00.000000000Z";
    let mut digits = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    digits(0, 4, n(year));
    digits(5, 2, n(month));
    digits(8, 2, n(day));
    digits(11, 2, hour);
    digits(14, 2, minute);
    digits(17, 2, second);
    digits(20, 9, u64::from(nanos));
    out.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_795_650_000, 0), "2026-11-25T23:40:00.000000000Z");
        assert_eq!(rfc3339(4_107_542_399, 0), "2100-02-28T23:59:59.000000000Z");
        assert_eq!(rfc3339(253_402_300_799, 999_999_999), "9999-12-31T23:59:59.999999999Z");
        assert_eq!(rfc3339(253_402_300_800, 0), "10000-01-01T00:00:00.000000000Z");
    }

    fn sample() -> Flow {
        Flow {
            time: now_rfc3339(),
            emitter: Emitter::Proxy,
            verdict: Verdict::Dropped,
            drop_reason: Some(DropReason::PolicyDenied),
            flow_type: FlowType::L7,
            event_type: EventType::AccessLog,
            traffic_direction: TrafficDirection::Ingress,
            ip: Some(FlowIp { source: "10.0.0.1".into(), destination: "10.0.0.2".into(), ip_version: IpVersion::IPv4 }),
            l4: Some(Layer4::Tcp(Ports { source_port: 40000, destination_port: 80 })),
            l7: Some(Layer7 {
                kind: L7Type::Request,
                http: Some(HttpInfo {
                    method: "PUT".into(),
                    url: "http://d/x".into(),
                    protocol: HttpProtocol::Http11,
                    code: 0,
                }),
                latency_ns: 0,
                dns: None,
                kafka: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn dns_records_use_hubbles_names() {
        let f = Flow {
            l4: Some(Layer4::Udp(Ports { source_port: 5353, destination_port: 53 })),
            destination_names: vec!["api.example.com.".into()],
            l7: Some(Layer7 {
                kind: L7Type::Response,
                dns: Some(DnsInfo {
                    query: "api.example.com.".into(),
                    ips: vec!["198.51.100.10".into()],
                    ttl: 30,
                    cnames: vec![],
                    observation_source: "proxy".into(),
                    rcode: 0,
                    qtypes: vec!["A".into()],
                    rrtypes: vec!["A".into()],
                }),
                ..Layer7::default()
            }),
            ..sample()
        };
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["l7"]["dns"]["query"], "api.example.com.");
        assert_eq!(json["l7"]["dns"]["ips"][0], "198.51.100.10");
        assert_eq!(json["l7"]["dns"]["qtypes"][0], "A");
        assert_eq!(json["destination_names"][0], "api.example.com.");
        assert!(f.has_protocol("dns") && f.has_protocol("l7") && f.has_protocol("udp") && !f.has_protocol("http"));
        let back: Flow = serde_json::from_value(json).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn records_round_trip_through_hubbles_json() {
        let f = sample();
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["verdict"], "DROPPED");
        assert_eq!(json["drop_reason"], 133);
        assert_eq!(json["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(json["Type"], "L7");
        assert_eq!(json["event_type"], "access-log");
        assert_eq!(json["traffic_direction"], "INGRESS");
        assert_eq!(json["IP"]["ipVersion"], "IPv4");
        assert_eq!(json["l4"]["TCP"]["destination_port"], 80);
        assert_eq!(json["l7"]["type"], "REQUEST");
        assert_eq!(json["l7"]["http"]["protocol"], "HTTP/1.1");
        let back: Flow = serde_json::from_value(json).unwrap();
        assert_eq!(back, f);
        assert!(back.has_protocol("http") && back.has_protocol("HTTP/1.1") && back.has_protocol("tcp"));
        assert!(!back.has_protocol("http/2") && !back.has_protocol("udp"));
        // Not dropped: neither drop field is written, and none comes back.
        let ok = Flow { verdict: Verdict::Forwarded, drop_reason: None, ..sample() };
        let json = serde_json::to_value(&ok).unwrap();
        assert!(json.get("drop_reason").is_none() && json.get("drop_reason_desc").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<Flow>(json).unwrap(), ok);
    }

    #[test]
    fn drop_reasons_are_the_kernels_numbers() {
        for (code, name) in [
            (reason::INVALID_SOURCE, "INVALID_SOURCE_IP"),
            (reason::POLICY_DENIED, "POLICY_DENIED"),
            (reason::POLICY_DENY, "POLICY_DENY"),
            (reason::UNKNOWN_ENDPOINT, "UNKNOWN_ENDPOINT"),
            (reason::FRAGMENT, "FRAGMENT_NOT_SUPPORTED"),
            (reason::PROXY_UNAVAILABLE, "PROXY_UNAVAILABLE"),
            (reason::MALFORMED, "MALFORMED_PACKET"),
            (reason::NO_PROXY_CONNECTION, "NO_PROXY_CONNECTION"),
            (reason::BYPASSES_PROXY, "PROXY_BYPASS"),
        ] {
            assert_eq!(DropReason::from_code(code).map(DropReason::name), Some(name));
        }
        assert_eq!(DropReason::from_code(reason::NONE), None);
        // Cilium's numbers where Cilium has the reason.
        assert_eq!((DropReason::PolicyDenied.code(), DropReason::PolicyDeny.code()), (133, 181));
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_name(r.name()), Some(r));
        }
    }
}
