//! What the kernel maps must hold for a snapshot (pure computation; `datapath` writes it).
//!
//! The kernel looks a flow up in the policy LPM trie twice — identity-specific key, then identity 0 —
//! and takes the longest prefix over `(protocol, destination port)`. For that lookup to return exactly
//! what `DirectionPolicy::l4_verdict` decides, each *identity class* gets a complete profile:
//!
//! * the **wildcard class** (identity 0: every identity no entry names) gets, for each of TCP, UDP,
//!   SCTP, ICMP and ICMPv6, entries covering all 65,536 ports, plus one any-protocol entry for other
//!   protocols;
//! * an identity named by some entry gets its own complete profile only when its verdicts differ
//!   from the wildcard class's somewhere (then its lookup always hits its own entries).
//!
//! Verdicts are computed by calling `l4_verdict` on one representative port per elementary port
//! segment (ports between consecutive entry boundaries behave alike), adjacent equal segments are
//! merged, and each segment is split into LPM prefix blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::interfaces::Interface;
use ipnet::IpNet;
use policy_engine::identity::IdentityId;
use policy_engine::model::{ExtendedProto, L7Parser};
use policy_engine::snapshot::{DirectionPolicy, DropReason, L4Verdict, PeerSet, Proto, ProtoMatch, Snapshot};
use redirect_common::{
    IPCACHE_PREFIX_BITS, IfaceValue, IpcacheValue, POLICY_EXACT_BITS, PolicyValue, direction, family, ipcache_flag, lb,
    listener, policy_flag, verdict,
};

/// The protocols that have ports (or ICMP types) in policy keys.
pub const PORT_PROTOS: [Proto; 5] = [Proto::Tcp, Proto::Udp, Proto::Sctp, Proto::Icmp, Proto::Icmpv6];
/// Protocols without ports that rules can name (VRRP, IGMP, ...): each gets its own any-port entry
/// where its verdict differs from the other protocols'.
fn extended_protos() -> impl Iterator<Item = Proto> {
    ExtendedProto::ALL.into_iter().map(|e| Proto::Other(e.number()))
}
/// A protocol no rule can name: stands for every other protocol without ports.
const OTHER_PROTO: Proto = Proto::Other(255);
/// An identity no entry names: stands for the wildcard class.
const NOBODY: IdentityId = u32::MAX;

/// Proxy listener id of each L7 parser (index into the proxy SOCKMAP).
pub fn listener_of(parser: L7Parser) -> u8 {
    match parser {
        L7Parser::Http => listener::HTTP,
        L7Parser::Kafka => listener::KAFKA,
        L7Parser::Dns => listener::DNS,
    }
}

/// A policy key without its generation: `(prefix length, direction, endpoint, identity, proto, port)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicySlot {
    /// LPM prefix length (see `redirect_common::PolicyKey`).
    pub prefix_len: u32,
    /// `direction::INGRESS` / `EGRESS`.
    pub direction: u8,
    /// Endpoint id.
    pub endpoint: u32,
    /// Peer identity, 0 = any.
    pub identity: u32,
    /// IP protocol, 0 = any.
    pub proto: u8,
    /// First port of the prefix block.
    pub port: u16,
}

/// An ipcache key without its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheSlot {
    /// The prefix.
    pub prefix: IpNet,
}

impl IpcacheSlot {
    /// LPM prefix length of this slot.
    pub fn prefix_len(&self) -> u32 {
        IPCACHE_PREFIX_BITS + u32::from(self.prefix.prefix_len())
    }

    /// `family` and the 16-byte address field.
    pub fn family_addr(&self) -> (u8, [u8; 16]) {
        let mut addr = [0u8; 16];
        match self.prefix.network() {
            IpAddr::V4(a) => {
                addr[..4].copy_from_slice(&a.octets());
                (family::V4, addr)
            }
            IpAddr::V6(a) => (family::V6, a.octets()),
        }
    }
}

/// An endpoint of this node: its policy id and host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Endpoint id (policy map key), non-zero.
    pub endpoint: u32,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The host-side interface.
    pub interface: Interface,
}

/// The complete contents of the generation-carrying maps, and the interface map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// ipcache.
    pub ipcache: BTreeMap<IpcacheSlot, IpcacheValue>,
    /// policy.
    pub policy: BTreeMap<PolicySlot, PolicyValue>,
    /// ifindex → endpoint.
    pub ifaces: BTreeMap<u32, IfaceValue>,
    /// Service frontends (protocol, cluster IP and port) → their backends.
    pub lb: BTreeMap<(u8, lb::Addr), LbService>,
}

/// A service frontend's backends, in slot order, and its affinity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbService {
    /// Backends (the slots `0..len`).
    pub backends: Vec<lb::Addr>,
    /// `ClientIP` affinity timeout, seconds (0: none).
    pub affinity_secs: u32,
}

/// The kernel's form of an address and port.
pub fn lb_addr(ip: IpAddr, port: u16) -> lb::Addr {
    let (family, addr) = match ip {
        IpAddr::V4(v4) => {
            let mut a = [0; 16];
            a[..4].copy_from_slice(&v4.octets());
            (family::V4, a)
        }
        IpAddr::V6(v6) => (family::V6, v6.octets()),
    };
    lb::Addr { family, _pad: 0, port: port.to_be_bytes(), addr }
}

/// The socket load balancer's entries for `services`: one frontend per cluster IP and port, whose
/// backends are the ready ones of the same family serving that port (sorted: a backend keeps its
/// slot while the set does not change). A frontend with no backend is kept (with none): connects
/// to it are refused rather than sent to an address nothing answers.
pub fn lb_entries(services: &[policy_engine::services::Service]) -> BTreeMap<(u8, lb::Addr), LbService> {
    let mut out = BTreeMap::new();
    for s in services {
        for ip in &s.cluster_ips {
            for port in &s.ports {
                if !matches!(port.protocol, Proto::Tcp | Proto::Udp) {
                    continue;
                }
                let mut backends: Vec<lb::Addr> = s
                    .backends_of(port)
                    .filter(|(b, _)| b.is_ipv4() == ip.is_ipv4())
                    .map(|(b, p)| lb_addr(b, p))
                    .collect();
                backends.sort();
                backends.dedup();
                // A frontend two services claim stays the first's (`services::join` warns).
                out.entry((port.protocol.number(), lb_addr(*ip, port.port)))
                    .or_insert(LbService { backends, affinity_secs: s.affinity_secs.unwrap_or(0) });
            }
        }
    }
    out
}

fn rule_id(o: Option<&policy_engine::snapshot::OriginId>) -> u32 {
    o.map_or(0, |o| o.0 + 1)
}

/// The map value a verdict becomes.
pub fn value_of(v: &L4Verdict) -> PolicyValue {
    let (verdict, listener, rule) = match v {
        L4Verdict::Allow { by } => (verdict::ALLOW, 0, rule_id(by.first())),
        L4Verdict::Redirect(l7) if l7.visibility => {
            (verdict::REDIRECT, listener_of(l7.parser), rule_id(l7.wildcard.first()))
        }
        L4Verdict::Redirect(l7) => {
            let first = l7.sets.first().and_then(|(_, o)| o.first());
            (verdict::REDIRECT, listener_of(l7.parser), rule_id(first))
        }
        L4Verdict::Drop(DropReason::Denied { by }) => (verdict::DROP_DENY, 0, rule_id(by.first())),
        L4Verdict::Drop(DropReason::NoAllow { enforced_by }) => {
            (verdict::DROP_NO_ALLOW, 0, rule_id(enforced_by.first()))
        }
        L4Verdict::Drop(DropReason::ConflictingParsers { by }) => (verdict::DROP_CONFLICT, 0, rule_id(by.first())),
    };
    let flags = match v {
        L4Verdict::Redirect(l7) if l7.visibility => policy_flag::VISIBILITY,
        _ => 0,
    };
    PolicyValue { verdict, listener, flags, _pad: 0, rule }
}

/// Splits `[start, end]` into LPM prefix blocks `(first port, prefix bits of the port)`.
pub fn port_blocks(start: u16, end: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let mut a = u32::from(start);
    let b = u32::from(end);
    while a <= b {
        let mut size = 1u32;
        while size < 65536 && a % (size * 2) == 0 && a + size * 2 - 1 <= b {
            size *= 2;
        }
        out.push((u16::try_from(a).unwrap_or(u16::MAX), 16 - size.trailing_zeros()));
        a += size;
    }
    out
}

/// One identity class's verdicts: per protocol, merged segments `(start, end, value)`, plus the
/// value for protocols without ports.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Profile {
    per_proto: Vec<Vec<(u16, u16, PolicyValue)>>,
    /// Per extended protocol (in `extended_protos` order).
    extended: Vec<PolicyValue>,
    other: PolicyValue,
}

fn profile(dp: &DirectionPolicy, id: IdentityId, bounds: &[Vec<u16>]) -> Profile {
    let per_proto = PORT_PROTOS
        .iter()
        .zip(bounds)
        .map(|(p, starts)| {
            let mut segs: Vec<(u16, u16, PolicyValue)> = Vec::new();
            for (i, s) in starts.iter().enumerate() {
                let end = starts.get(i + 1).map_or(u16::MAX, |n| n - 1);
                let v = value_at(dp, id, *p, *s);
                match segs.last_mut() {
                    Some(last) if last.2 == v => last.1 = end,
                    _ => segs.push((*s, end, v)),
                }
            }
            segs
        })
        .collect();
    Profile {
        per_proto,
        extended: extended_protos().map(|p| value_at(dp, id, p, 0)).collect(),
        other: value_at(dp, id, OTHER_PROTO, 0),
    }
}

/// The map value of `dp`'s verdict for a flow with peer `id` (its audit mode and authentication
/// requirement included).
fn value_at(dp: &DirectionPolicy, id: IdentityId, proto: Proto, port: u16) -> PolicyValue {
    let mut value = value_of(&dp.l4_verdict(id, proto, port));
    if dp.audit {
        value.flags |= policy_flag::AUDIT;
    }
    if dp.auth_required_for(&[id], proto, port) {
        value.flags |= policy_flag::AUTH;
    }
    value
}

/// Segment starts per protocol: 0 and every entry and visibility port boundary.
fn boundaries(dp: &DirectionPolicy) -> Vec<Vec<u16>> {
    PORT_PROTOS
        .iter()
        .map(|p| {
            let mut b: BTreeSet<u16> = BTreeSet::from([0]);
            let mut range = |start: u16, end: u16| {
                b.insert(start);
                if let Some(next) = end.checked_add(1) {
                    b.insert(next);
                }
            };
            for e in &dp.entries {
                if e.proto == ProtoMatch::Only(*p) {
                    range(e.port_start, e.port_end);
                }
            }
            for v in dp.visibility.iter().filter(|v| v.proto == *p) {
                range(v.port, v.port);
            }
            b.into_iter().collect()
        })
        .collect()
}

fn write_profile(out: &mut BTreeMap<PolicySlot, PolicyValue>, dir: u8, endpoint: u32, identity: u32, prof: &Profile) {
    let slot = |prefix_len, proto, port| PolicySlot { prefix_len, direction: dir, endpoint, identity, proto, port };
    out.insert(slot(POLICY_EXACT_BITS, 0, 0), prof.other);
    for (p, v) in extended_protos().zip(&prof.extended) {
        if *v != prof.other {
            out.insert(slot(POLICY_EXACT_BITS + 8, p.number(), 0), *v);
        }
    }
    for (p, segs) in PORT_PROTOS.iter().zip(&prof.per_proto) {
        for (start, end, v) in segs {
            for (port, bits) in port_blocks(*start, *end) {
                out.insert(slot(POLICY_EXACT_BITS + 8 + bits, p.number(), port), *v);
            }
        }
    }
}

/// Policy entries of one endpoint direction.
pub fn direction_entries(dp: &DirectionPolicy, dir: u8, endpoint: u32, out: &mut BTreeMap<PolicySlot, PolicyValue>) {
    let bounds = boundaries(dp);
    let wildcard = profile(dp, NOBODY, &bounds);
    write_profile(out, dir, endpoint, 0, &wildcard);
    let named: BTreeSet<IdentityId> = dp
        .entries
        .iter()
        .filter_map(|e| match &e.peers {
            PeerSet::All => None,
            PeerSet::Ids(ids) => Some(ids.iter().copied()),
        })
        .flatten()
        .chain(dp.authenticated_peers.iter().copied())
        .collect();
    for id in named {
        let p = profile(dp, id, &bounds);
        if p != wildcard {
            write_profile(out, dir, endpoint, id, &p);
        }
    }
}

/// The interface entry of an endpoint: its id, its (first) IPv4 and IPv6 address, and how a frame
/// reaches the node from it (the bridge's MAC and index on a bridge port, else its own MAC).
pub fn iface_value(endpoint: u32, ips: &[IpAddr], interface: &Interface) -> IfaceValue {
    let (bridge, mac) = match interface.bridge {
        Some(b) => (b.index, Some(b.mac)),
        None => (0, interface.mac),
    };
    let mut v = IfaceValue {
        endpoint,
        flags: 0,
        ipv4: [0; 4],
        bridge,
        ipv6: [0; 16],
        mac: mac.unwrap_or_default(),
        _pad_mac: [0; 2],
    };
    if mac.is_some() {
        v.flags |= redirect_common::iface_flag::HAS_MAC;
    }
    if let Some(IpAddr::V4(a)) = ips.iter().find(|ip| ip.is_ipv4()) {
        v.ipv4 = a.octets();
        v.flags |= redirect_common::iface_flag::HAS_V4;
    }
    if let Some(IpAddr::V6(a)) = ips.iter().find(|ip| ip.is_ipv6()) {
        v.ipv6 = a.octets();
        v.flags |= redirect_common::iface_flag::HAS_V6;
    }
    v
}

/// Everything the maps must hold for a snapshot on this node.
pub fn desired(snapshot: &Snapshot, bindings: &[Binding], node_ips: &[IpAddr]) -> Desired {
    let mut d = Desired::default();
    let mut local: BTreeMap<IpAddr, u32> = BTreeMap::new();
    for b in bindings {
        if let Some(ep) = snapshot.endpoint(&b.namespace, &b.name) {
            local.extend(ep.ips.iter().map(|ip| (*ip, b.endpoint)));
            direction_entries(&ep.ingress, direction::INGRESS, b.endpoint, &mut d.policy);
            direction_entries(&ep.egress, direction::EGRESS, b.endpoint, &mut d.policy);
            d.ifaces.insert(b.interface.index, iface_value(b.endpoint, &ep.ips, &b.interface));
        }
    }
    for (prefix, id) in snapshot.ipcache().entries() {
        let endpoint = match prefix {
            p if p.prefix_len() == p.max_prefix_len() => local.get(&p.addr()).copied().unwrap_or(0),
            _ => 0,
        };
        // Another node's endpoint that wants its flows authenticated: tunnel to it.
        let tunnel = prefix.prefix_len() == prefix.max_prefix_len() && snapshot.tunnel_target(prefix.addr()).is_some();
        let flags = if tunnel { ipcache_flag::TUNNEL } else { 0 };
        d.ipcache.insert(IpcacheSlot { prefix: *prefix }, IpcacheValue { identity: *id, endpoint, flags });
    }
    for ip in node_ips {
        d.ipcache.insert(
            IpcacheSlot { prefix: IpNet::from(*ip) },
            IpcacheValue { identity: policy_engine::identity::reserved::HOST, endpoint: 0, flags: 0 },
        );
    }
    d
}

/// The kernel's verdict towards an address that is identity `identity` and the FQDN selector
/// identities `fqdn` (`redirect_common::datapath::combine` over each lookup), in userspace.
pub fn lookup_learned(
    policy: &BTreeMap<PolicySlot, PolicyValue>,
    endpoint: u32,
    identity: u32,
    fqdn: &[u32],
    proto: u8,
    port: u16,
) -> PolicyValue {
    let own = lookup(policy, direction::EGRESS, endpoint, identity, proto, port);
    if own.verdict == verdict::DROP_DENY {
        return own;
    }
    fqdn.iter().fold(own, |v, s| {
        redirect_common::datapath::combine(v, lookup(policy, direction::EGRESS, endpoint, *s, proto, port))
    })
}

/// The kernel's policy lookup, in userspace (for tests and `porin` diagnostics): the longest prefix
/// among identity-specific keys, else among identity-0 keys; no entry drops.
pub fn lookup(
    policy: &BTreeMap<PolicySlot, PolicyValue>,
    dir: u8,
    endpoint: u32,
    identity: u32,
    proto: u8,
    port: u16,
) -> PolicyValue {
    let key_bits = |s: &PolicySlot| -> Option<u32> {
        if s.direction != dir || s.endpoint != endpoint {
            return None;
        }
        if s.prefix_len == POLICY_EXACT_BITS {
            return Some(s.prefix_len);
        }
        if s.proto != proto {
            return None;
        }
        let port_bits = s.prefix_len - POLICY_EXACT_BITS - 8;
        let mask = if port_bits == 0 { 0 } else { u16::MAX << (16 - port_bits) };
        (port & mask == s.port).then_some(s.prefix_len)
    };
    for id in [identity, 0] {
        let best = policy
            .iter()
            .filter(|(s, _)| s.identity == id)
            .filter_map(|(s, v)| key_bits(s).map(|b| (b, *v)))
            .max_by_key(|(b, _)| *b);
        if let Some((_, v)) = best {
            return v;
        }
    }
    PolicyValue { verdict: verdict::DROP_NO_ALLOW, listener: 0, flags: 0, _pad: 0, rule: 0 }
}

#[cfg(test)]
mod tests;
