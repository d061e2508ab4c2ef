//! The datapath's decisions: what the tc programs do with a parsed packet, written once over a
//! [`Kernel`] that gives the maps, the socket helpers and the clock.
//!
//! `redirect-ebpf` implements [`Kernel`] with BPF maps and helpers and runs [`from_endpoint`] /
//! [`to_endpoint`]; the tests implement it with a model of the node (sockets, clock, LRU
//! eviction) and check, over random interleavings, the properties the proxy's security rests on
//! (`tests/conntrack.rs`). Nothing here may allocate, loop without a bound or recurse: it is
//! compiled for the BPF target.
//!
//! # Conntrack and the L7 proxy
//!
//! One entry per flow, keyed by the tuple of the packet that opened it. The rules that make "a flow
//! whose policy requires L7 reaches its server only through the proxy" hold whatever ports the
//! proxy or the clients choose:
//!
//! 1. **A TCP connection is judged by its SYN, always.** A segment that opens a connection (SYN
//!    without ACK) never rides an existing entry at its source: it is judged by policy in its own
//!    direction, and its verdict replaces whatever the tuple had (both directions). A SYN is never
//!    a "reply".
//! 2. **Only a SYN creates TCP state.** A TCP segment that matches no entry and no proxy socket is
//!    judged, and passes (allowed) or drops (denied) *without* creating an entry; if its flow
//!    needs the proxy it is dropped ([`reason::NO_PROXY_CONNECTION`]): the proxy never saw it start.
//! 3. **A PROXIED entry is the client's.** Its packets go to a proxy socket or are dropped, never
//!    the direct path. The server's packets on the same tuple (answers to the proxy's upstream
//!    connection, whose port the kernel may pick equal to a client's) look for the proxy's socket
//!    and never change the entry.
//! 4. **The proxy's upstream connections never touch a PROXIED entry.** They are marked
//!    ([`mark::FROM_PROXY`]) and pass unjudged; their SYN removes only *direct* entries of its
//!    tuple (stale ones would carry the server's answers past the proxy's socket).
//!
//! UDP, SCTP and ICMP have no connection opener: any packet that is allowed creates an entry. A
//! proxied UDP flow (DNS) remembers its listener in the entry: the client's later packets go to
//! that listener; the server's answers to the proxy's upstream socket find that socket.
//!
//! # Addresses learned from DNS
//!
//! An address the DNS proxy learned carries, besides its own identity, the identities of the
//! `toFQDNs` selectors that match its names ([`crate::FqdnValue`]). An endpoint's egress verdict
//! towards it is the [`combine`]d verdict over all of them: what the policy engine decides for a
//! peer that is several identities at once.

use crate::{
    CtKey, CtValue, FQDN_MAX_SELECTORS, FqdnValue, IfaceValue, IpcacheValue, PolicyKey, PolicyValue, config, counter,
    ct_flag, direction, event_kind, family, identity, iface_flag, ipcache_flag, listener, mark, policy_flag, reason,
    verdict,
};

/// IP protocol numbers the programs know.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// TCP flag bits (the 14th byte of the TCP header).
pub mod tcp {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

const NS_PER_SEC: u64 = 1_000_000_000;

/// What the programs need of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// [`family`].
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Source address (IPv4 in the first 4 bytes).
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
    /// Host byte order; ICMP: 0.
    pub sport: u16,
    /// Host byte order; ICMP: the type.
    pub dport: u16,
    /// TCP flags ([`tcp`]); 0 for other protocols.
    pub tcp_flags: u8,
    /// Conntrack ports (host order): TCP/UDP/SCTP ports, ICMP echo identifier twice; `None`: untracked.
    pub ct_ports: Option<(u16, u16)>,
}

impl Packet {
    /// A packet of no flow (for drops before parsing).
    pub const EMPTY: Self =
        Self { family: 0, proto: 0, saddr: [0; 16], daddr: [0; 16], sport: 0, dport: 0, tcp_flags: 0, ct_ports: None };

    /// TCP.
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == proto::TCP
    }

    /// UDP.
    #[inline(always)]
    pub fn is_udp(&self) -> bool {
        self.proto == proto::UDP
    }

    /// A TCP segment that opens a connection: SYN without ACK (with or without other flags, as
    /// the kernel's listen path takes it).
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN
    }

    /// The conntrack key of this packet's tuple, as sent (`reverse` = false) or turned around.
    #[inline(always)]
    pub fn ct_key(&self, reverse: bool) -> Option<CtKey> {
        let (sport, dport) = self.ct_ports?;
        let (s, d, sp, dp) =
            if reverse { (self.daddr, self.saddr, dport, sport) } else { (self.saddr, self.daddr, sport, dport) };
        Some(CtKey {
            family: self.family,
            proto: self.proto,
            sport: sp.to_be_bytes(),
            dport: dp.to_be_bytes(),
            _pad: [0; 2],
            saddr: s,
            daddr: d,
        })
    }
}

/// Whose policy decided a packet, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// [`direction`] of the policy (0: none).
    pub direction: u8,
    /// Endpoint whose policy decided.
    pub endpoint: u32,
    /// Source identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// The policy entry.
    pub value: PolicyValue,
}

const NO_VERDICT: PolicyValue = PolicyValue { verdict: 0, listener: 0, flags: 0, _pad: 0, rule: 0 };

impl Decision {
    /// No policy was consulted.
    pub const fn none(direction: u8, endpoint: u32) -> Self {
        Self { direction, endpoint, src_identity: 0, dst_identity: 0, value: NO_VERDICT }
    }
}

/// What becomes of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forwarded on the normal path.
    Pass,
    /// Assigned to a proxy socket (a listener for a new flow, or a connection the proxy holds) and
    /// marked [`mark::TO_PROXY`].
    Proxy,
    /// Dropped, for a [`reason`].
    Drop(u8),
}

/// What the decisions need of the kernel: the maps, the socket helpers and the clock.
pub trait Kernel {
    /// Monotonic clock, nanoseconds.
    fn now_ns(&self) -> u64;
    /// A [`config`] value.
    fn config(&self, index: u32, default: u32) -> u32;
    /// The ipcache entry for an address (longest prefix) in `generation`.
    fn ipcache(&self, generation: u8, family: u8, addr: &[u8; 16]) -> Option<IpcacheValue>;
    /// The policy entry for a full key (longest prefix over protocol and port).
    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue>;
    /// The FQDN selector identities of an address the DNS proxy learned.
    fn fqdn(&self, family: u8, addr: &[u8; 16]) -> Option<&FqdnValue>;
    /// The interface the packet is on, if it is an endpoint's.
    fn iface(&self) -> Option<IfaceValue>;
    /// The packet's mark.
    fn mark(&self) -> u32;
    /// A conntrack entry, to read and update in place.
    fn ct_get(&mut self, key: &CtKey) -> Option<&mut CtValue>;
    /// Creates or replaces a conntrack entry.
    fn ct_insert(&mut self, key: &CtKey, value: &CtValue);
    /// Removes a conntrack entry (if there is one).
    fn ct_remove(&mut self, key: &CtKey);
    /// Assigns the packet to the proxy socket that holds its connection, if there is one: TCP not
    /// a listener; UDP a connected socket of the proxy's own (marked [`mark::FROM_PROXY`]). Marks
    /// the packet [`mark::TO_PROXY`] when assigned.
    ///
    /// A SYN on the tuple of a TIME_WAIT socket (the client reusing its port soon after the proxy
    /// closed that connection) opens a new connection only when `syn_listener` names the listener
    /// that is to take it: the SYN is assigned to the TIME_WAIT socket and the tuple recorded for
    /// the kernel's TIME_WAIT path, whose listener lookup (`sk_lookup`) then finds that listener
    /// and retires the TIME_WAIT socket — as the kernel does for a local server. (A SYN given to
    /// the listener instead would leave the TIME_WAIT socket in place and the handshake stuck.)
    fn assign_proxy_socket(&mut self, pkt: &Packet, syn_listener: Option<u8>) -> bool;
    /// Assigns the packet to proxy listener `listener` of its protocol (TCP or UDP; false when it
    /// is not there). Marks it.
    fn assign_proxy_listener(&mut self, pkt: &Packet, listener: u8) -> bool;
    /// Adds one to a [`counter`].
    fn count(&mut self, index: u32);
    /// Reports an event.
    fn emit(&mut self, kind: u8, why: u8, pkt: &Packet, d: &Decision);
}

/// Counts and reports a drop. Not inlined: the event it builds stays off its callers' stacks (the
/// BPF stack is 512 bytes for a whole call chain).
#[inline(never)]
fn drop_pkt<K: Kernel>(k: &mut K, why: u8, pkt: &Packet, d: &Decision) -> Action {
    k.count(counter::DROPPED);
    k.count(match why {
        reason::POLICY_DENY => counter::DROP_POLICY_DENY,
        reason::POLICY_DENIED => counter::DROP_POLICY_DENIED,
        reason::INVALID_SOURCE => counter::DROP_INVALID_SOURCE,
        reason::PROXY_UNAVAILABLE => counter::DROP_PROXY_UNAVAILABLE,
        reason::NO_PROXY_CONNECTION | reason::BYPASSES_PROXY => counter::DROP_NOT_PROXIED,
        reason::AUTH_REQUIRED => counter::DROP_AUTH_REQUIRED,
        _ => counter::DROP_OTHER,
    });
    k.emit(event_kind::DROP, why, pkt, d);
    Action::Drop(why)
}

/// Drops a packet that could not be parsed (no flow to name).
pub fn drop_unparsed<K: Kernel>(k: &mut K, why: u8) -> Action {
    drop_pkt(k, why, &Packet::EMPTY, &Decision::none(0, 0))
}

fn identity_of<K: Kernel>(k: &K, generation: u8, fam: u8, addr: &[u8; 16]) -> IpcacheValue {
    k.ipcache(generation, fam, addr).unwrap_or(IpcacheValue {
        identity: if fam == family::V4 { identity::WORLD_IPV4 } else { identity::WORLD_IPV6 },
        endpoint: 0,
        flags: 0,
    })
}

/// Policy of `endpoint` for a peer: identity-specific entries first, then any-identity ones. No entry
/// at all (an endpoint without resolved policy) fails closed.
fn policy<K: Kernel>(k: &K, generation: u8, endpoint: u32, peer: u32, dir: u8, pkt: &Packet) -> PolicyValue {
    let mut key = PolicyKey {
        generation,
        direction: dir,
        _pad: [0; 2],
        endpoint,
        identity: peer,
        proto: pkt.proto,
        dport: pkt.dport.to_be_bytes(),
        _pad2: 0,
    };
    if let Some(v) = k.policy(&key) {
        return v;
    }
    key.identity = 0;
    k.policy(&key).unwrap_or(PolicyValue { verdict: verdict::DROP_NO_ALLOW, listener: 0, flags: 0, _pad: 0, rule: 0 })
}

/// The active generation and the packet's source and destination in its ipcache. Not inlined:
/// its lookup keys stay off the callers' stacks.
#[inline(never)]
fn identities<K: Kernel>(k: &K, pkt: &Packet) -> (u8, IpcacheValue, IpcacheValue) {
    let generation = k.config(config::GENERATION, 0) as u8;
    let src = identity_of(k, generation, pkt.family, &pkt.saddr);
    let dst = identity_of(k, generation, pkt.family, &pkt.daddr);
    (generation, src, dst)
}

/// `endpoint`'s policy in direction `dir` for the packet's peer (the destination for egress, the
/// source for ingress).
fn decide<K: Kernel>(
    k: &K,
    generation: u8,
    endpoint: u32,
    dir: u8,
    (src, dst): (IpcacheValue, IpcacheValue),
    pkt: &Packet,
) -> Decision {
    let peer = if dir == direction::EGRESS { dst.identity } else { src.identity };
    let mut value = policy(k, generation, endpoint, peer, dir, pkt);
    // Egress to an address learned from DNS: its FQDN selectors judge too.
    if dir == direction::EGRESS && value.verdict != verdict::DROP_DENY {
        value = with_fqdn_selectors(k, generation, endpoint, pkt, value);
    }
    Decision { direction: dir, endpoint, src_identity: src.identity, dst_identity: dst.identity, value }
}

/// `value` combined with the endpoint's egress verdict towards each FQDN selector identity of the
/// destination, if the DNS proxy learned it. Not inlined: its keys stay off the caller's stack
/// (the BPF stack is 512 bytes for a whole call chain).
#[inline(never)]
fn with_fqdn_selectors<K: Kernel>(
    k: &K,
    generation: u8,
    endpoint: u32,
    pkt: &Packet,
    value: PolicyValue,
) -> PolicyValue {
    let Some(f) = k.fqdn(pkt.family, &pkt.daddr) else { return value };
    let mut value = value;
    for i in 0..FQDN_MAX_SELECTORS {
        if i as u32 >= f.count {
            break;
        }
        let Some(sel) = f.selectors.get(i) else { break };
        value = combine(value, policy(k, generation, endpoint, *sel, direction::EGRESS, pkt));
    }
    value
}

fn is_drop(v: &PolicyValue) -> Option<u8> {
    match v.verdict {
        verdict::ALLOW | verdict::REDIRECT => None,
        verdict::DROP_DENY => Some(reason::POLICY_DENY),
        _ => Some(reason::POLICY_DENIED),
    }
}

/// Enforces a policy verdict: `Ok(audited)` when it lets the packet on, the drop otherwise. A
/// policy drop of an endpoint in audit mode is reported ([`event_kind::AUDIT`], always, like
/// drops: it is the flow's record) and lets the packet on as though allowed without the proxy.
#[inline(always)]
fn enforce<K: Kernel>(k: &mut K, pkt: &Packet, d: &Decision) -> Result<bool, Action> {
    let Some(why) = is_drop(&d.value) else { return Ok(false) };
    if d.value.flags & policy_flag::AUDIT != 0 {
        // A TCP segment that opens nothing creates no state (rule 2): it is not reported again
        // for every packet of a flow whose entry lapsed.
        if !pkt.is_tcp() || pkt.opens_connection() {
            audit_pkt(k, why, pkt, d);
        }
        return Ok(true);
    }
    Err(drop_pkt(k, why, pkt, d))
}

/// Enforces an allowing entry's authentication requirement on a new flow from outside the node's
/// endpoints that did not come from the proxy: dropped with [`reason::AUTH_REQUIRED`] (audit
/// mode reports it and lets it on). `Ok(audited)` when it may go on.
#[inline(always)]
fn enforce_auth<K: Kernel>(k: &mut K, pkt: &Packet, d: &Decision) -> Result<bool, Action> {
    if d.value.flags & policy_flag::AUTH == 0 || is_drop(&d.value).is_some() {
        return Ok(false);
    }
    if d.value.flags & policy_flag::AUDIT != 0 {
        if !pkt.is_tcp() || pkt.opens_connection() {
            audit_pkt(k, reason::AUTH_REQUIRED, pkt, d);
        }
        return Ok(true);
    }
    Err(drop_pkt(k, reason::AUTH_REQUIRED, pkt, d))
}

/// Counts and reports a policy drop that audit mode lets pass. Not inlined, as [`drop_pkt`].
#[inline(never)]
fn audit_pkt<K: Kernel>(k: &mut K, why: u8, pkt: &Packet, d: &Decision) {
    k.count(counter::AUDITED);
    k.emit(event_kind::AUDIT, why, pkt, d);
}

/// The verdict towards a peer that is two identities at once (an address and an FQDN selector of
/// its names), from the verdict towards each: a deny wins, then a parser conflict (redirects to
/// different listeners conflict too); otherwise a redirect wins over an allow, an allow over no
/// allow.
/// This is the policy engine's merge of the entries matching either identity.
#[inline(always)]
pub fn combine(a: PolicyValue, b: PolicyValue) -> PolicyValue {
    let rank = |v: &PolicyValue| match v.verdict {
        verdict::DROP_DENY => 5,
        verdict::DROP_CONFLICT => 4,
        verdict::REDIRECT => 3,
        verdict::ALLOW => 2,
        _ => 1,
    };
    // Visibility only redirects what is otherwise allowed: a rule's redirect replaces it.
    let visibility = |v: &PolicyValue| v.verdict == verdict::REDIRECT && v.flags & policy_flag::VISIBILITY != 0;
    if a.verdict == verdict::REDIRECT && b.verdict == verdict::REDIRECT && visibility(&a) != visibility(&b) {
        return if visibility(&a) { b } else { a };
    }
    if a.verdict == verdict::REDIRECT && b.verdict == verdict::REDIRECT && a.listener != b.listener {
        return PolicyValue {
            verdict: verdict::DROP_CONFLICT,
            listener: 0,
            flags: a.flags | b.flags,
            _pad: 0,
            rule: a.rule,
        };
    }
    if rank(&b) > rank(&a) { b } else { a }
}

/// Idle timeouts of one protocol's entries, read from [`config`] before an entry is borrowed.
#[derive(Clone, Copy)]
struct Timeouts {
    /// Established (TCP: reply seen, not closing), nanoseconds.
    open: u64,
    /// TCP before the reply is seen, and after FIN both ways or RST, nanoseconds.
    closing: u64,
}

impl Timeouts {
    fn of<K: Kernel>(k: &K, protocol: u8) -> Self {
        Self::from_config(protocol, |i, d| k.config(i, d))
    }

    /// From [`config`] values (`config(index, default)`).
    fn from_config(protocol: u8, config: impl Fn(u32, u32) -> u32) -> Self {
        let secs = |i, d| u64::from(config(i, d)) * NS_PER_SEC;
        match protocol {
            proto::TCP => Self { open: secs(config::CT_TCP_SECS, 21600), closing: secs(config::CT_TCP_CLOSE_SECS, 10) },
            proto::ICMP | proto::ICMPV6 => {
                let t = secs(config::CT_ICMP_SECS, 30);
                Self { open: t, closing: t }
            }
            _ => {
                let t = secs(config::CT_UDP_SECS, 60);
                Self { open: t, closing: t }
            }
        }
    }

    /// Whether an entry with `flags`, last seen at `last`, has expired at `now`.
    fn expired(self, protocol: u8, flags: u32, last: u64, now: u64) -> bool {
        let tcp_closing = protocol == proto::TCP && (closed(flags) || flags & ct_flag::SEEN_REPLY == 0);
        now.saturating_sub(last) > if tcp_closing { self.closing } else { self.open }
    }
}

/// Whether a conntrack entry of `protocol` has expired at `now` (`bpf_ktime_get_ns` time), with the
/// timeouts `config(index, default)` gives: what the programs would decide on its next packet.
/// User space asks it to know which flows still live.
pub fn ct_entry_expired(protocol: u8, value: &CtValue, now: u64, config: impl Fn(u32, u32) -> u32) -> bool {
    Timeouts::from_config(protocol, config).expired(protocol, value.flags, value.last_seen_ns, now)
}

#[inline(always)]
fn closed(flags: u32) -> bool {
    flags & ct_flag::RST != 0 || flags & (ct_flag::FIN_FWD | ct_flag::FIN_REV) == (ct_flag::FIN_FWD | ct_flag::FIN_REV)
}

/// Which program looks: they see the two sides of a proxied flow differently.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `porin_from_ep`: packets from an endpoint.
    FromEndpoint,
    /// `porin_to_ep`: packets to an endpoint.
    ToEndpoint,
}

/// What conntrack knows of a packet. A plain struct, every field set on every path (an enum
/// whose variants leave bytes undefined compiles to code that reads them, which the verifier
/// refuses).
#[derive(Clone, Copy)]
struct CtHit {
    /// The packet matched an entry.
    found: bool,
    /// In its original direction (false) or turned around.
    reply: bool,
    /// The entry's flow goes through the proxy (for UDP, to `listener`).
    proxied: bool,
    listener: u8,
}

impl CtHit {
    const MISS: Self = Self { found: false, reply: false, proxied: false, listener: 0 };

    #[inline(always)]
    fn hit(reply: bool, flags: u32) -> Self {
        Self { found: true, reply, proxied: flags & ct_flag::PROXIED != 0, listener: listener_of(flags) }
    }
}

#[inline(always)]
fn listener_of(flags: u32) -> u8 {
    ((flags & ct_flag::LISTENER_MASK) >> ct_flag::LISTENER_SHIFT) as u8
}

/// Looks a packet that does not open a connection up in conntrack (both directions), expiring
/// entries and recording the client leg's TCP state.
fn ct_lookup<K: Kernel>(k: &mut K, pkt: &Packet, now: u64, side: Side) -> CtHit {
    let timeouts = Timeouts::of(k, pkt.proto);
    for reverse in [false, true] {
        let Some(key) = pkt.ct_key(reverse) else { return CtHit::MISS };
        let Some(ct) = k.ct_get(&key) else { continue };
        let proxied = ct.flags & ct_flag::PROXIED != 0;
        // The server answering the proxy's upstream connection (rule 3): leave the client's entry be.
        if proxied && reverse && side == Side::FromEndpoint {
            return CtHit::hit(true, ct.flags);
        }
        if timeouts.expired(pkt.proto, ct.flags, ct.last_seen_ns, now) {
            k.ct_remove(&key);
            continue;
        }
        ct.last_seen_ns = now;
        if pkt.is_tcp() {
            if pkt.tcp_flags & tcp::RST != 0 {
                ct.flags |= ct_flag::RST;
            }
            if pkt.tcp_flags & tcp::FIN != 0 {
                ct.flags |= if reverse { ct_flag::FIN_REV } else { ct_flag::FIN_FWD };
            }
        }
        if reverse {
            ct.flags |= ct_flag::SEEN_REPLY;
        }
        return CtHit::hit(reverse, ct.flags);
    }
    CtHit::MISS
}

/// Records a new flow after its first packet was judged. A TCP opener's verdict replaces whatever
/// the tuple had, in both directions (rule 1).
#[inline(always)]
fn ct_open<K: Kernel>(k: &mut K, pkt: &Packet, now: u64, d: &Decision, proxied: bool) {
    let Some(key) = pkt.ct_key(false) else { return };
    let mut flags = if proxied {
        ct_flag::PROXIED | (u32::from(d.value.listener) << ct_flag::LISTENER_SHIFT) & ct_flag::LISTENER_MASK
    } else {
        0
    };
    if pkt.is_tcp() {
        if pkt.tcp_flags & tcp::RST != 0 {
            flags |= ct_flag::RST;
        }
        if pkt.tcp_flags & tcp::FIN != 0 {
            flags |= ct_flag::FIN_FWD;
        }
        if let Some(rev) = pkt.ct_key(true) {
            k.ct_remove(&rev);
        }
    }
    let value = CtValue {
        created_ns: now,
        last_seen_ns: now,
        flags,
        src_identity: d.src_identity,
        dst_identity: d.dst_identity,
        rule: d.value.rule,
    };
    k.ct_insert(&key, &value);
}

/// Removes the entries of a tuple that are not PROXIED (rule 4).
fn ct_clear_direct<K: Kernel>(k: &mut K, pkt: &Packet) {
    for reverse in [false, true] {
        let Some(key) = pkt.ct_key(reverse) else { return };
        let direct = match k.ct_get(&key) {
            Some(ct) => ct.flags & ct_flag::PROXIED == 0,
            None => false,
        };
        if direct {
            k.ct_remove(&key);
        }
    }
}

/// Forwards a packet of a tracked flow, in its original direction or as a reply.
#[inline(always)]
fn pass_tracked<K: Kernel>(k: &mut K, reply: bool) -> Action {
    k.count(if reply { counter::CT_REPLY } else { counter::CT_ESTABLISHED });
    Action::Pass
}

/// Forwards a judged, allowed packet: a packet that may open a flow records it (rule 2: for TCP
/// only a SYN) and reports the verdict (when `report`); any other passes as it is.
fn admit<K: Kernel>(k: &mut K, pkt: &Packet, d: &Decision, report: bool) -> Action {
    if pkt.is_tcp() && !pkt.opens_connection() {
        k.count(counter::UNTRACKED_PASS);
        return Action::Pass;
    }
    let now = k.now_ns();
    ct_open(k, pkt, now, d, false);
    k.count(counter::CT_NEW);
    if report && k.config(config::VERDICT_EVENTS, 1) != 0 {
        k.emit(event_kind::VERDICT, reason::NONE, pkt, d);
    }
    Action::Pass
}

/// Hands a judged flow to the proxy: the connection it already holds for this tuple (a
/// retransmitted SYN), else listener `d.value.listener`. Only a SYN can start a proxied TCP flow;
/// only TCP and UDP flows can be proxied. Reports the verdict when `report`. `None`: a redirect
/// for visibility only that the proxy cannot take — the caller admits it as the allow it is.
fn redirect<K: Kernel>(k: &mut K, pkt: &Packet, d: &Decision, report: bool) -> Option<Action> {
    if pkt.is_tcp() && !pkt.opens_connection() {
        if d.value.flags & policy_flag::VISIBILITY != 0 {
            return None;
        }
        return Some(drop_pkt(k, reason::NO_PROXY_CONNECTION, pkt, d));
    }
    let assigned = (pkt.is_tcp() || pkt.is_udp())
        && ((pkt.is_tcp() && k.assign_proxy_socket(pkt, Some(d.value.listener)))
            || k.assign_proxy_listener(pkt, d.value.listener));
    if !assigned {
        if d.value.flags & policy_flag::VISIBILITY != 0 {
            return None;
        }
        // The L7 proxy must take the flow; without its listener the flow must not pass unparsed.
        return Some(drop_pkt(k, reason::PROXY_UNAVAILABLE, pkt, d));
    }
    let now = k.now_ns();
    ct_open(k, pkt, now, d, true);
    k.count(counter::REDIRECTED);
    if report && k.config(config::VERDICT_EVENTS, 1) != 0 {
        k.emit(event_kind::VERDICT, reason::NONE, pkt, d);
    }
    Some(Action::Proxy)
}

/// `porin_from_ep`: a packet from the endpoint behind this interface.
pub fn from_endpoint<K: Kernel>(k: &mut K, pkt: &Packet) -> Action {
    let Some(iface) = k.iface() else {
        return drop_pkt(k, reason::UNKNOWN_ENDPOINT, pkt, &Decision::none(0, 0));
    };
    // Anti-spoofing: the source must be the endpoint's own address.
    let own = if pkt.family == family::V4 {
        iface.flags & iface_flag::HAS_V4 != 0 && pkt.saddr[..4] == iface.ipv4
    } else {
        iface.flags & iface_flag::HAS_V6 != 0 && pkt.saddr == iface.ipv6
    };
    if !own {
        return drop_pkt(k, reason::INVALID_SOURCE, pkt, &Decision::none(direction::EGRESS, iface.endpoint));
    }
    let now = k.now_ns();
    if !pkt.opens_connection() {
        let hit = ct_lookup(k, pkt, now, Side::FromEndpoint);
        if hit.found && hit.proxied {
            // Rule 3: the client's packets, and the server's answers to the proxy's upstream
            // connection, go to the proxy's socket or nowhere. A UDP client's next datagram goes
            // to the listener again (there is no connection to find).
            let assigned = if pkt.is_udp() && !hit.reply {
                k.assign_proxy_listener(pkt, hit.listener)
            } else {
                k.assign_proxy_socket(pkt, None)
            };
            if assigned {
                k.count(counter::PROXY_SOCKET);
                return Action::Proxy;
            }
            let d = Decision::none(direction::EGRESS, iface.endpoint);
            return drop_pkt(k, reason::PROXY_UNAVAILABLE, pkt, &d);
        }
        if hit.found {
            return pass_tracked(k, hit.reply);
        }
        // No entry: a socket the proxy holds (the server answering an upstream connection whose
        // tuple conntrack does not know; a proxied connection whose entry lapsed)?
        if k.assign_proxy_socket(pkt, None) {
            k.count(counter::PROXY_SOCKET);
            return Action::Proxy;
        }
    }
    // A new flow (rule 1: every SYN): the endpoint's egress policy and, when the destination is a
    // local endpoint, that endpoint's ingress policy. Any drop wins; a redirect at either side
    // sends the flow to the proxy.
    let (generation, src, dst) = identities(k, pkt);
    let mut d = decide(k, generation, iface.endpoint, direction::EGRESS, (src, dst), pkt);
    let mut audited = match enforce(k, pkt, &d) {
        Ok(audited) => audited,
        Err(dropped) => return dropped,
    };
    let mut proxied = d.value.verdict == verdict::REDIRECT;
    if dst.endpoint != 0 {
        let ingress = policy(k, generation, dst.endpoint, src.identity, direction::INGRESS, pkt);
        let i = Decision { direction: direction::INGRESS, endpoint: dst.endpoint, value: ingress, ..d };
        match enforce(k, pkt, &i) {
            Ok(a) => audited |= a,
            Err(dropped) => return dropped,
        }
        if ingress.verdict == verdict::REDIRECT || !proxied {
            d = i;
        }
        proxied |= ingress.verdict == verdict::REDIRECT;
    }
    // Another node's endpoint whose flows must come authenticated: a TCP flow no L7 rule of the
    // source's sends to the proxy goes to its tunnel listener, which carries it to that node's
    // proxy over mTLS (an L7 listener's upstream connection takes the tunnel itself). Without the
    // tunnel listener the flow drops (PROXY_UNAVAILABLE): the destination would drop it anyway.
    if !proxied && pkt.is_tcp() && dst.flags & ipcache_flag::TUNNEL != 0 {
        d.value.verdict = verdict::REDIRECT;
        d.value.listener = listener::TUNNEL;
        proxied = true;
        if pkt.opens_connection() {
            k.count(counter::TUNNELLED);
        }
    }
    // An audited flow's record is its AUDIT event.
    let report = !audited;
    if proxied && let Some(action) = redirect(k, pkt, &d, report) {
        return action;
    }
    admit(k, pkt, &d, report)
}

/// `porin_to_ep`: a packet to the endpoint behind this interface (from another endpoint, after
/// `from_endpoint` passed it; from the proxy; from the host or the world).
pub fn to_endpoint<K: Kernel>(k: &mut K, pkt: &Packet) -> Action {
    // The proxy's upstream connections were judged by the proxy (a pod cannot set this mark: it is
    // cleared when a packet crosses from a pod's namespace). Rule 4.
    if k.mark() & mark::MASK == mark::FROM_PROXY {
        if pkt.opens_connection() {
            ct_clear_direct(k, pkt);
        }
        k.count(counter::PROXY_UPSTREAM);
        return Action::Pass;
    }
    let now = k.now_ns();
    let hit = if pkt.opens_connection() {
        // A SYN that a local endpoint sent was judged (and recorded) at its source a moment ago:
        // it matches its entry in its own direction. A SYN is never a reply (rule 1).
        let timeouts = Timeouts::of(k, pkt.proto);
        match pkt.ct_key(false).and_then(|key| k.ct_get(&key)) {
            Some(ct) if !closed(ct.flags) && !timeouts.expired(pkt.proto, ct.flags, ct.last_seen_ns, now) => {
                ct.last_seen_ns = now;
                CtHit::hit(false, ct.flags)
            }
            _ => CtHit::MISS,
        }
    } else {
        ct_lookup(k, pkt, now, Side::ToEndpoint)
    };
    if hit.found {
        // The client's side of a proxied flow reaches the server only from the proxy (marked).
        if hit.proxied && !hit.reply {
            return drop_pkt(k, reason::BYPASSES_PROXY, pkt, &Decision::none(direction::INGRESS, 0));
        }
        return pass_tracked(k, hit.reply);
    }
    let Some(iface) = k.iface() else {
        return drop_pkt(k, reason::UNKNOWN_ENDPOINT, pkt, &Decision::none(0, 0));
    };
    let (generation, src, dst) = identities(k, pkt);
    let d = decide(k, generation, iface.endpoint, direction::INGRESS, (src, dst), pkt);
    let audited = match enforce(k, pkt, &d) {
        Ok(audited) => audited,
        Err(dropped) => return dropped,
    };
    // Nothing from outside the node's endpoints comes authenticated here: what the proxy relays
    // from the tunnel is marked and passed above.
    let audited = match enforce_auth(k, pkt, &d) {
        Ok(a) => audited || a,
        Err(dropped) => return dropped,
    };
    if d.value.verdict == verdict::REDIRECT && d.value.flags & policy_flag::VISIBILITY == 0 {
        // Flows from outside the node's endpoints (the host, the world) reach the pod here, at tc
        // egress, where a socket cannot be assigned: they are not handed to the proxy yet (a
        // redirect for visibility only passes as the allow it is).
        return drop_pkt(k, reason::PROXY_UNAVAILABLE, pkt, &d);
    }
    admit(k, pkt, &d, !audited)
}

/// `porin_from_world`: a packet arriving on the node's uplink, from outside the node's endpoints
/// (tc ingress, where — unlike at an endpoint's tc egress — a socket can be assigned).
///
/// It hands the proxy what belongs to it: the answers of servers outside the node to the proxy's
/// upstream connections (rule 3: on the tuple of a proxied flow, the proxy's socket or nothing),
/// the rest of outside clients' proxied flows, and new flows to a local endpoint whose ingress
/// policy needs the proxy. Everything else passes on: `porin_to_ep` judges it at the endpoint.
pub fn from_world<K: Kernel>(k: &mut K, pkt: &Packet) -> Action {
    let now = k.now_ns();
    if !pkt.opens_connection() {
        let hit = ct_lookup(k, pkt, now, Side::FromEndpoint);
        if hit.found && hit.proxied {
            let assigned = if pkt.is_udp() && !hit.reply {
                k.assign_proxy_listener(pkt, hit.listener)
            } else {
                k.assign_proxy_socket(pkt, None)
            };
            if assigned {
                k.count(counter::PROXY_SOCKET);
                return Action::Proxy;
            }
            return drop_pkt(k, reason::PROXY_UNAVAILABLE, pkt, &Decision::none(direction::INGRESS, 0));
        }
        if hit.found {
            return Action::Pass;
        }
        if k.assign_proxy_socket(pkt, None) {
            k.count(counter::PROXY_SOCKET);
            return Action::Proxy;
        }
    }
    let (generation, src, dst) = identities(k, pkt);
    if dst.endpoint == 0 {
        return Action::Pass;
    }
    let d = decide(k, generation, dst.endpoint, direction::INGRESS, (src, dst), pkt);
    // A flow that must come authenticated is not taken in plain: `porin_to_ep` drops it
    // (AUTH_REQUIRED) unless audit mode lets it on.
    let plain_ok = d.value.flags & policy_flag::AUTH == 0 || d.value.flags & policy_flag::AUDIT != 0;
    if d.value.verdict == verdict::REDIRECT
        && plain_ok
        && let Some(action) = redirect(k, pkt, &d, true)
    {
        return action;
    }
    // Allowed or dropped, the endpoint's interface judges it again and records it.
    Action::Pass
}
