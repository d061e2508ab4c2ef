//! Datapath events become flow records here (the record type, shared with the L7 proxy, is
//! [`proxy::flow::Flow`], shaped like Hubble's).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use policy_engine::snapshot::Snapshot;
pub use proxy::flow::{Flow, FlowEndpoint, FlowIp};
use proxy::flow::{Text, rfc3339};
use redirect_common::{Event, direction, event_kind, family, reason, verdict};

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
        reason::NO_PROXY_CONNECTION => "NO_PROXY_CONNECTION",
        reason::BYPASSES_PROXY => "PROXY_BYPASS",
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

/// Wall-clock time of a kernel timestamp (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
fn wall_time(ts_ns: u64) -> String {
    use nix::time::{ClockId, clock_gettime};
    let ns = |c: ClockId| {
        clock_gettime(c).map_or(0i128, |t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
    };
    let real = ns(ClockId::CLOCK_REALTIME) - (ns(ClockId::CLOCK_MONOTONIC) - i128::from(ts_ns));
    let real = u128::try_from(real).unwrap_or(0);
    rfc3339(u64::try_from(real / 1_000_000_000).unwrap_or(0), u32::try_from(real % 1_000_000_000).unwrap_or(0))
}

/// A record of a policy file the agent refused (the last good version keeps enforcing).
pub fn policy_error(seq: u64, error: &str) -> Flow {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Flow {
        time: rfc3339(now.as_secs(), now.subsec_nanos()),
        seq,
        emitter: Cow::Borrowed("agent"),
        verdict: Cow::Borrowed("ERROR"),
        flow_type: Cow::Borrowed("UNKNOWN_TYPE"),
        event_type: Cow::Borrowed("policy-error"),
        traffic_direction: Cow::Borrowed("TRAFFIC_DIRECTION_UNKNOWN"),
        summary: format!("invalid policy, not applied (the last good version keeps enforcing): {error}"),
        ..Flow::default()
    }
}

/// Turns a datapath event into a flow record.
pub fn from_event(seq: u64, e: &Event, snap: Option<&Snapshot>) -> Flow {
    let (src, dst) = (addr(e.family, &e.saddr), addr(e.family, &e.daddr));
    let sport = u16::from_be_bytes(e.sport);
    let dport = u16::from_be_bytes(e.dport);
    let mut l4: BTreeMap<Text, BTreeMap<Text, u16>> = BTreeMap::new();
    let port = |k: &'static str, v: u16| (Cow::Borrowed(k), v);
    match e.proto {
        6 | 17 | 132 => {
            let name = match e.proto {
                6 => "TCP",
                17 => "UDP",
                _ => "SCTP",
            };
            l4.insert(
                Cow::Borrowed(name),
                BTreeMap::from([port("source_port", sport), port("destination_port", dport)]),
            );
        }
        1 => drop(l4.insert(Cow::Borrowed("ICMPv4"), BTreeMap::from([port("type", dport)]))),
        58 => drop(l4.insert(Cow::Borrowed("ICMPv6"), BTreeMap::from([port("type", dport)]))),
        _ => {}
    }
    let policy = (e.rule != 0)
        .then(|| snap.and_then(|s| s.origin(policy_engine::snapshot::OriginId(e.rule - 1))))
        .flatten()
        .map(|o| format!("{} {}", o.policy, o.path));
    Flow {
        time: wall_time(e.ts_ns),
        seq,
        emitter: Cow::Borrowed("datapath"),
        verdict: Cow::Borrowed(match (e.kind, e.verdict) {
            (event_kind::DROP, _) => "DROPPED",
            (_, verdict::REDIRECT) => "REDIRECTED",
            _ => "FORWARDED",
        }),
        drop_reason: e.reason,
        drop_reason_desc: Cow::Borrowed(reason_name(e.reason)),
        flow_type: Cow::Borrowed("L3_L4"),
        event_type: Cow::Borrowed(if e.kind == event_kind::DROP { "drop" } else { "policy-verdict" }),
        traffic_direction: Cow::Borrowed(match e.direction {
            direction::INGRESS => "INGRESS",
            direction::EGRESS => "EGRESS",
            _ => "TRAFFIC_DIRECTION_UNKNOWN",
        }),
        is_reply: false,
        ip: FlowIp {
            ip_version: Cow::Borrowed(if e.family == family::V4 { "IPv4" } else { "IPv6" }),
            source: src.clone(),
            destination: dst.clone(),
        },
        l4,
        source: peer(snap, e.src_identity, &src),
        destination: peer(snap, e.dst_identity, &dst),
        l7: None,
        policy,
        ifindex: e.ifindex,
        summary: String::new(),
    }
}
