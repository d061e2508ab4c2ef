//! Datapath events: read from the ring buffer ([`Events`]) and turned into flow records
//! (`porin_flow::flow::Flow`, shaped like Hubble's, the same type the proxy's records take).

use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};

use aya::maps::{MapData, RingBuf};

use policy_engine::snapshot::Snapshot;
use porin_flow::flow::{
    DropReason, Emitter, EventType, Flow, FlowEndpoint, FlowIp, FlowType, IcmpType, IpVersion, Layer4, NoFields, Ports,
    TrafficDirection, Verdict, rfc3339,
};
use redirect_common::{Event, direction, event_kind, family, verdict};

/// The datapath's event ring buffer. Poll its descriptor for readiness, then [`Events::drain`].
pub struct Events(pub(crate) RingBuf<MapData>);

/// What one drain found.
#[derive(Debug, Default)]
pub struct Drained {
    /// The events, in order.
    pub events: Vec<Event>,
    /// Items that did not decode as events (counted, never silently lost).
    pub undecodable: u64,
}

impl Events {
    /// Takes every event the ring buffer holds.
    pub fn drain(&mut self) -> Drained {
        let mut out = Drained::default();
        while let Some(item) = self.0.next() {
            match Event::from_bytes(&item) {
                Some(e) => out.events.push(e),
                None => out.undecodable += 1,
            }
        }
        out
    }
}

impl AsRawFd for Events {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
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

/// The transport part of an event.
fn layer4(e: &Event) -> Option<Layer4> {
    let ports = Ports { source_port: u16::from_be_bytes(e.sport), destination_port: u16::from_be_bytes(e.dport) };
    // ICMP events carry the message type in the destination port.
    let icmp = IcmpType { kind: ports.destination_port };
    match e.proto {
        6 => Some(Layer4::Tcp(ports)),
        17 => Some(Layer4::Udp(ports)),
        132 => Some(Layer4::Sctp(ports)),
        1 => Some(Layer4::Icmpv4(icmp)),
        58 => Some(Layer4::Icmpv6(icmp)),
        112 => Some(Layer4::Vrrp(NoFields {})),
        2 => Some(Layer4::Igmp(NoFields {})),
        _ => None,
    }
}

/// Turns a datapath event into a flow record.
pub fn from_event(seq: u64, e: &Event, snap: Option<&Snapshot>) -> Flow {
    let (src, dst) = (addr(e.family, &e.saddr), addr(e.family, &e.daddr));
    let policy = (e.rule != 0)
        .then(|| snap.and_then(|s| s.origin(policy_engine::snapshot::OriginId(e.rule - 1))))
        .flatten()
        .map(|o| format!("{} {}", o.policy, o.path));
    let dropped = e.kind == event_kind::DROP;
    // An audited flow keeps the reason policy would have dropped it for.
    let audited = e.kind == event_kind::AUDIT;
    Flow {
        time: wall_time(e.ts_ns),
        seq,
        emitter: Emitter::Datapath,
        verdict: match (e.kind, e.verdict) {
            (event_kind::DROP, _) => Verdict::Dropped,
            (event_kind::AUDIT, _) => Verdict::Audit,
            (_, verdict::REDIRECT) => Verdict::Redirected,
            _ => Verdict::Forwarded,
        },
        drop_reason: if dropped || audited { DropReason::from_code(e.reason) } else { None },
        flow_type: FlowType::L3L4,
        event_type: if dropped { EventType::Drop } else { EventType::PolicyVerdict },
        traffic_direction: match e.direction {
            direction::INGRESS => TrafficDirection::Ingress,
            direction::EGRESS => TrafficDirection::Egress,
            _ => TrafficDirection::Unknown,
        },
        is_reply: false,
        ip: Some(FlowIp {
            ip_version: if e.family == family::V4 { IpVersion::IPv4 } else { IpVersion::IPv6 },
            source: src.clone(),
            destination: dst.clone(),
        }),
        l4: layer4(e),
        source: peer(snap, e.src_identity, &src).into(),
        destination: peer(snap, e.dst_identity, &dst).into(),
        // The names live in the proxy's FQDN cache; the kernel's record carries the address.
        destination_names: Vec::new(),
        source_service: None,
        destination_service: None,
        l7: None,
        policy,
        ifindex: e.ifindex,
        summary: String::new(),
        auth_type: porin_flow::flow::AuthType::Disabled,
        spiffe_id: None,
    }
}
