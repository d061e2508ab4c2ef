//! Flow records shaped like Hubble's `Flow` (`api/v1/flow/flow.proto`): what `porin observe` prints
//! and the agent's control socket returns. Datapath events become records here; the L7 proxy's
//! request/response records use the same shape.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use policy_engine::snapshot::Snapshot;
use redirect_common::{Event, direction, event_kind, family, reason, verdict};

/// A peer of a flow.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct FlowEndpoint {
    /// Security identity.
    pub identity: u32,
    /// Namespace (endpoints only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Pod name (endpoints only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    /// Identity labels.
    pub labels: Vec<String>,
}

/// IP part.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowIp {
    /// Source address.
    pub source: String,
    /// Destination address.
    pub destination: String,
    /// `IPv4` / `IPv6`.
    #[serde(rename = "ipVersion")]
    pub ip_version: &'static str,
}

/// A flow record.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Flow {
    /// Sequence number (per agent).
    pub seq: u64,
    /// Kernel timestamp (ns, monotonic).
    pub time_ns: u64,
    /// `FORWARDED`, `DROPPED`, `REDIRECTED`.
    pub verdict: &'static str,
    /// Drop reason code (0 when not dropped).
    pub drop_reason: u8,
    /// Drop reason name.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub drop_reason_desc: &'static str,
    /// `L3_L4` or `L7`.
    #[serde(rename = "Type")]
    pub flow_type: &'static str,
    /// `policy-verdict` or `drop`.
    pub event_type: &'static str,
    /// `INGRESS`, `EGRESS` or `TRAFFIC_DIRECTION_UNKNOWN`.
    pub traffic_direction: &'static str,
    /// Addresses.
    #[serde(rename = "IP")]
    pub ip: FlowIp,
    /// Transport: `{"TCP": {"source_port": .., "destination_port": ..}}` and the like.
    pub l4: BTreeMap<&'static str, BTreeMap<&'static str, u16>>,
    /// Source.
    pub source: FlowEndpoint,
    /// Destination.
    pub destination: FlowEndpoint,
    /// The policy rule that decided (`namespace/name path`), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Interface index the packet was seen on.
    pub ifindex: u32,
}

/// The name of a drop reason.
pub fn reason_name(r: u8) -> &'static str {
    match r {
        reason::NONE => "",
        reason::INVALID_SOURCE => "INVALID_SOURCE_IP",
        reason::POLICY_DENIED => "POLICY_DENIED",
        reason::POLICY_DENY => "POLICY_DENY",
        reason::UNKNOWN_ENDPOINT => "UNKNOWN_ENDPOINT",
        reason::FRAGMENT => "FRAGMENT_NOT_SUPPORTED",
        reason::PROXY_UNAVAILABLE => "PROXY_UNAVAILABLE",
        reason::MALFORMED => "MALFORMED_PACKET",
        _ => "UNKNOWN",
    }
}

fn addr(fam: u8, a: &[u8; 16]) -> String {
    if fam == family::V4 { IpAddr::from([a[0], a[1], a[2], a[3]]).to_string() } else { IpAddr::from(*a).to_string() }
}

/// Describes a peer from the snapshot: the endpoint owning the address, else the identity's labels.
fn peer(snap: Option<&Snapshot>, identity: u32, ip: &str) -> FlowEndpoint {
    let mut out = FlowEndpoint { identity, ..Default::default() };
    let Some(snap) = snap else { return out };
    if let Some(ep) = ip.parse().ok().and_then(|ip| snap.endpoint_by_ip(ip)) {
        out.namespace = ep.namespace.clone();
        out.pod_name = ep.name.clone();
    }
    if let Some(id) = snap.identity(identity) {
        out.labels = id.labels.iter().map(ToString::to_string).collect();
    }
    out
}

/// Turns a datapath event into a flow record.
pub fn from_event(seq: u64, e: &Event, snap: Option<&Snapshot>) -> Flow {
    let (src, dst) = (addr(e.family, &e.saddr), addr(e.family, &e.daddr));
    let sport = u16::from_be_bytes(e.sport);
    let dport = u16::from_be_bytes(e.dport);
    let mut l4: BTreeMap<&'static str, BTreeMap<&'static str, u16>> = BTreeMap::new();
    match e.proto {
        6 | 17 | 132 => {
            let name = match e.proto {
                6 => "TCP",
                17 => "UDP",
                _ => "SCTP",
            };
            l4.insert(name, BTreeMap::from([("source_port", sport), ("destination_port", dport)]));
        }
        1 => drop(l4.insert("ICMPv4", BTreeMap::from([("type", dport)]))),
        58 => drop(l4.insert("ICMPv6", BTreeMap::from([("type", dport)]))),
        _ => {}
    }
    let policy = (e.rule != 0)
        .then(|| snap.and_then(|s| s.origin(policy_engine::snapshot::OriginId(e.rule - 1))))
        .flatten()
        .map(|o| format!("{} {}", o.policy, o.path));
    Flow {
        seq,
        time_ns: e.ts_ns,
        verdict: match (e.kind, e.verdict) {
            (event_kind::DROP, _) => "DROPPED",
            (_, verdict::REDIRECT) => "REDIRECTED",
            _ => "FORWARDED",
        },
        drop_reason: e.reason,
        drop_reason_desc: reason_name(e.reason),
        flow_type: "L3_L4",
        event_type: if e.kind == event_kind::DROP { "drop" } else { "policy-verdict" },
        traffic_direction: match e.direction {
            direction::INGRESS => "INGRESS",
            direction::EGRESS => "EGRESS",
            _ => "TRAFFIC_DIRECTION_UNKNOWN",
        },
        ip: FlowIp {
            ip_version: if e.family == family::V4 { "IPv4" } else { "IPv6" },
            source: src.clone(),
            destination: dst.clone(),
        },
        l4,
        source: peer(snap, e.src_identity, &src),
        destination: peer(snap, e.dst_identity, &dst),
        policy,
        ifindex: e.ifindex,
    }
}
