//! Porin's tc programs, attached (clsact, TCX) to the host-side end of every endpoint's veth:
//!
//! * `porin_from_ep` (tc ingress): traffic *from* an endpoint. Checks the source address belongs to
//!   the endpoint, passes established flows (conntrack), and judges a new flow once: the endpoint's
//!   egress policy and, when the destination is a local endpoint, that endpoint's ingress policy.
//! * `porin_to_ep` (tc egress): traffic *to* an endpoint that did not come from a local endpoint
//!   (the host, the world): judges the endpoint's ingress policy for new flows.
//!
//! L7 flows go to the node's proxy without leaving the kernel's normal path: a new flow whose policy
//! says "redirect" is `bpf_sk_assign`ed to the proxy's transparent listener (from `PORIN_PROXY`) and
//! marked `mark::TO_PROXY`, which the node routes locally. Every later TCP packet that belongs to a
//! socket the proxy holds — the rest of the client's connection (its conntrack entry is flagged
//! PROXIED), and the server's replies to the proxy's upstream connection (which keeps the client's
//! address; conntrack does not know it) — is found with `bpf_skc_lookup_tcp` and assigned the same
//! way. Direct flows never pay for the socket lookup. The proxy marks its upstream packets
//! `mark::FROM_PROXY`: they were judged by the proxy and pass `porin_to_ep` as they are. A proxied
//! flow never falls back to the direct path: with its proxy socket gone, its packets are dropped.
//!
//! Policy comes from maps the agent writes (layouts in `redirect-common`); identities from the ipcache.
//! Everything fails closed: an unknown interface, a spoofed source, an unparseable header, a missing
//! policy entry or an absent proxy listener drops the packet with an event that names the reason.
//! The programs only read maps the agent owns, write conntrack, counters and events, and never modify
//! packets.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map helpers take Borrow<K>: references avoid copying keys onto the 512-byte BPF stack"
)]

use aya_ebpf::EbpfContext as _;
use aya_ebpf::bindings::{
    BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, TC_ACT_OK, TC_ACT_SHOT, bpf_sock_tuple,
};
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::{bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::{Key, LpmTrie};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockMap};
use aya_ebpf::programs::TcContext;
use redirect_common::{
    CtKey, CtValue, Event, IPCACHE_PREFIX_BITS, IfaceValue, IpcacheKey, IpcacheValue, POLICY_FULL_BITS, PolicyKey,
    PolicyValue, config, counter, ct_flag, direction, event_kind, family, iface_flag, mark, proxy_index, reason, sizes,
    verdict,
};

// Map statics are named as `redirect_common::names` (the name of a map is its static's name).
#[map]
static PORIN_IPCACHE: LpmTrie<IpcacheKey, IpcacheValue> = LpmTrie::pinned(sizes::IPCACHE, 0);
#[map]
static PORIN_POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(sizes::POLICY, 0);
#[map]
static PORIN_IFACES: HashMap<u32, IfaceValue> = HashMap::pinned(sizes::IFACES, 0);
#[map]
static PORIN_CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(sizes::CONNTRACK, 0);
#[map]
static PORIN_CONFIG: Array<u32> = Array::pinned(config::LEN, 0);
#[map]
static PORIN_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);
#[map]
static PORIN_EVENTS: RingBuf = RingBuf::pinned(sizes::EVENTS, 0);
#[map]
static PORIN_PROXY: SockMap = SockMap::pinned(sizes::PROXY, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const NS_PER_SEC: u64 = 1_000_000_000;
/// World identities for addresses the ipcache does not know.
const WORLD_IPV4: u32 = 9;
const WORLD_IPV6: u32 = 10;

/// What the programs need of a packet.
struct Packet {
    family: u8,
    proto: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// Host byte order; ICMP: 0.
    sport: u16,
    /// Host byte order; ICMP: the type.
    dport: u16,
    tcp_flags: u8,
    /// Conntrack ports (host order): TCP/UDP/SCTP ports, ICMP echo identifier twice; `None`: untracked.
    ct_ports: Option<(u16, u16)>,
}

/// Whose policy decided a packet, and how.
struct Decision {
    direction: u8,
    endpoint: u32,
    src_identity: u32,
    dst_identity: u32,
    value: PolicyValue,
}

impl Decision {
    const fn none(direction: u8, endpoint: u32, src_identity: u32, dst_identity: u32) -> Self {
        Self { direction, endpoint, src_identity, dst_identity, value: NO_VERDICT }
    }
}

enum Parsed {
    /// Not IP, or IPv6 neighbour discovery / multicast listener messages: not policy's business.
    Pass,
    Ip(Packet),
}

/// Reads a header chunk (`bpf_skb_load_bytes`: works on linear and non-linear packets alike).
#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u8> {
    ctx.load::<T>(off).map_err(|_| reason::MALFORMED)
}

fn parse(ctx: &TcContext) -> Result<Parsed, u8> {
    // Headers are read in a few chunks: each read is a helper call.
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let mut pkt = Packet {
        family: 0,
        proto: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        ct_ports: None,
    };
    let mut off;
    match ethertype {
        ETH_P_IP => {
            let h = load::<[u8; 20]>(ctx, ETH_HLEN)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return Err(reason::MALFORMED);
            }
            if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                return Err(reason::FRAGMENT);
            }
            pkt.family = family::V4;
            pkt.proto = h[9];
            pkt.saddr[..4].copy_from_slice(&h[12..16]);
            pkt.daddr[..4].copy_from_slice(&h[16..20]);
            off = ETH_HLEN + ihl;
        }
        ETH_P_IPV6 => {
            pkt.family = family::V6;
            let h = load::<[u8; 8]>(ctx, ETH_HLEN)?;
            let mut nh = h[6];
            pkt.saddr = load::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
            pkt.daddr = load::<[u8; 16]>(ctx, ETH_HLEN + 24)?;
            off = ETH_HLEN + 40;
            // Extension headers: hop-by-hop, routing, destination options, fragment (bounded walk).
            for _ in 0..4 {
                match nh {
                    0 | 43 | 60 => {
                        let x = load::<[u8; 8]>(ctx, off)?;
                        nh = x[0];
                        off += (usize::from(x[1]) + 1) * 8;
                    }
                    44 => {
                        let x = load::<[u8; 8]>(ctx, off)?;
                        if u16::from_be_bytes([x[2], x[3]]) >> 3 != 0 {
                            return Err(reason::FRAGMENT);
                        }
                        nh = x[0];
                        off += 8;
                    }
                    _ => break,
                }
            }
            if matches!(nh, 0 | 43 | 60 | 44) {
                // More extension headers than we walk: cannot find the transport header.
                return Err(reason::MALFORMED);
            }
            pkt.proto = nh;
        }
        _ => return Ok(Parsed::Pass),
    }
    match pkt.proto {
        IPPROTO_TCP => {
            let t = load::<[u8; 14]>(ctx, off)?;
            pkt.sport = u16::from_be_bytes([t[0], t[1]]);
            pkt.dport = u16::from_be_bytes([t[2], t[3]]);
            pkt.tcp_flags = t[13];
            pkt.ct_ports = Some((pkt.sport, pkt.dport));
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let t = load::<[u8; 4]>(ctx, off)?;
            pkt.sport = u16::from_be_bytes([t[0], t[1]]);
            pkt.dport = u16::from_be_bytes([t[2], t[3]]);
            pkt.ct_ports = Some((pkt.sport, pkt.dport));
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let t = load::<[u8; 8]>(ctx, off)?;
            let (kind, echo) = (t[0], if pkt.proto == IPPROTO_ICMP { [0, 8] } else { [129, 128] });
            // Neighbour discovery and multicast listener messages keep IPv6 working: always pass.
            if pkt.proto == IPPROTO_ICMPV6 && matches!(kind, 130..=137 | 143) {
                return Ok(Parsed::Pass);
            }
            pkt.dport = u16::from(kind);
            if kind == echo[0] || kind == echo[1] {
                let id = u16::from_be_bytes([t[4], t[5]]);
                pkt.ct_ports = Some((id, id));
            }
        }
        _ => {}
    }
    Ok(Parsed::Ip(pkt))
}

#[inline(always)]
fn config_value(idx: u32, default: u32) -> u32 {
    PORIN_CONFIG.get(idx).copied().unwrap_or(default)
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = PORIN_COUNTERS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU slot of this CPU, valid for the program's run.
        unsafe { *p += 1 };
    }
}

fn ipcache(generation: u8, fam: u8, addr: &[u8; 16]) -> Option<IpcacheValue> {
    let bits = if fam == family::V4 { 32 } else { 128 };
    let key = Key::new(IPCACHE_PREFIX_BITS + bits, IpcacheKey { generation, family: fam, _pad: [0; 2], addr: *addr });
    PORIN_IPCACHE.get(&key).copied()
}

fn identity_of(generation: u8, fam: u8, addr: &[u8; 16]) -> IpcacheValue {
    ipcache(generation, fam, addr)
        .unwrap_or(IpcacheValue { identity: if fam == family::V4 { WORLD_IPV4 } else { WORLD_IPV6 }, endpoint: 0 })
}

/// Policy of `endpoint` for a peer: identity-specific entries first, then any-identity ones. No entry
/// at all (an endpoint without resolved policy) fails closed.
fn policy(generation: u8, endpoint: u32, peer: u32, dir: u8, pkt: &Packet) -> PolicyValue {
    let mut key = Key::new(
        POLICY_FULL_BITS,
        PolicyKey {
            generation,
            direction: dir,
            _pad: [0; 2],
            endpoint,
            identity: peer,
            proto: pkt.proto,
            dport: pkt.dport.to_be_bytes(),
            _pad2: 0,
        },
    );
    if let Some(v) = PORIN_POLICY.get(&key) {
        return *v;
    }
    key.data.identity = 0;
    match PORIN_POLICY.get(&key) {
        Some(v) => *v,
        None => PolicyValue { verdict: verdict::DROP_NO_ALLOW, listener: 0, _pad: [0; 2], rule: 0 },
    }
}

fn emit(ctx: &TcContext, kind: u8, why: u8, pkt: &Packet, d: &Decision) {
    match PORIN_EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event {
                kind,
                reason: why,
                direction: d.direction,
                proto: pkt.proto,
                family: pkt.family,
                verdict: d.value.verdict,
                _pad: [0; 2],
                endpoint: d.endpoint,
                src_identity: d.src_identity,
                dst_identity: d.dst_identity,
                rule: d.value.rule,
                sport: pkt.sport.to_be_bytes(),
                dport: pkt.dport.to_be_bytes(),
                // SAFETY: the context's skb pointer is valid for the program's run.
                ifindex: unsafe { (*ctx.skb.skb).ifindex },
                saddr: pkt.saddr,
                daddr: pkt.daddr,
                // SAFETY: helper without preconditions.
                ts_ns: unsafe { bpf_ktime_get_ns() },
            });
            entry.submit(0);
        }
        None => count(counter::EVENTS_LOST),
    }
}

fn drop_pkt(ctx: &TcContext, why: u8, pkt: &Packet, d: &Decision) -> i32 {
    count(counter::DROPPED);
    count(match why {
        reason::POLICY_DENY => counter::DROP_POLICY_DENY,
        reason::POLICY_DENIED => counter::DROP_POLICY_DENIED,
        reason::INVALID_SOURCE => counter::DROP_INVALID_SOURCE,
        reason::PROXY_UNAVAILABLE => counter::DROP_PROXY_UNAVAILABLE,
        _ => counter::DROP_OTHER,
    });
    emit(ctx, event_kind::DROP, why, pkt, d);
    TC_ACT_SHOT
}

const NO_VERDICT: PolicyValue = PolicyValue { verdict: 0, listener: 0, _pad: [0; 2], rule: 0 };

fn drop_unparsed(ctx: &TcContext, why: u8) -> i32 {
    let pkt = Packet {
        family: 0,
        proto: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        ct_ports: None,
    };
    drop_pkt(ctx, why, &pkt, &Decision::none(0, 0, 0, 0))
}

fn ct_key(pkt: &Packet, sport: u16, dport: u16, reverse: bool) -> CtKey {
    let (s, d, sp, dp) =
        if reverse { (pkt.daddr, pkt.saddr, dport, sport) } else { (pkt.saddr, pkt.daddr, sport, dport) };
    CtKey {
        family: pkt.family,
        proto: pkt.proto,
        sport: sp.to_be_bytes(),
        dport: dp.to_be_bytes(),
        _pad: [0; 2],
        saddr: s,
        daddr: d,
    }
}

fn ct_timeout_ns(proto: u8, flags: u32) -> u64 {
    let secs = match proto {
        IPPROTO_TCP => {
            let closing = flags & ct_flag::RST != 0
                || flags & (ct_flag::FIN_FWD | ct_flag::FIN_REV) == (ct_flag::FIN_FWD | ct_flag::FIN_REV);
            if closing || flags & ct_flag::SEEN_REPLY == 0 {
                config_value(config::CT_TCP_CLOSE_SECS, 10)
            } else {
                config_value(config::CT_TCP_SECS, 21600)
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => config_value(config::CT_ICMP_SECS, 30),
        _ => config_value(config::CT_UDP_SECS, 60),
    };
    u64::from(secs) * NS_PER_SEC
}

enum CtHit {
    Miss,
    /// Original direction; the entry's flags.
    Established(u32),
    /// Reply direction; the entry's flags.
    Reply(u32),
}

/// Looks the packet up in conntrack (both directions), refreshing and closing entries.
fn ct_lookup(pkt: &Packet, now: u64) -> CtHit {
    let Some((sport, dport)) = pkt.ct_ports else { return CtHit::Miss };
    for reverse in [false, true] {
        let key = ct_key(pkt, sport, dport, reverse);
        let Some(entry) = PORIN_CT.get_ptr_mut(&key) else { continue };
        // SAFETY: a value pointer the map returned; entries are plain data and races only lose a
        // timestamp or flag update.
        let ct = unsafe { &mut *entry };
        let expired = now.saturating_sub(ct.last_seen_ns) > ct_timeout_ns(pkt.proto, ct.flags);
        let closed = ct.flags & ct_flag::RST != 0
            || ct.flags & (ct_flag::FIN_FWD | ct_flag::FIN_REV) == (ct_flag::FIN_FWD | ct_flag::FIN_REV);
        let new_syn = pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && !reverse;
        if expired || (closed && new_syn) {
            let _ = PORIN_CT.remove(&key);
            continue;
        }
        ct.last_seen_ns = now;
        if pkt.proto == IPPROTO_TCP {
            if pkt.tcp_flags & TCP_RST != 0 {
                ct.flags |= ct_flag::RST;
            }
            if pkt.tcp_flags & TCP_FIN != 0 {
                ct.flags |= if reverse { ct_flag::FIN_REV } else { ct_flag::FIN_FWD };
            }
        }
        if reverse {
            ct.flags |= ct_flag::SEEN_REPLY;
            return CtHit::Reply(ct.flags);
        }
        return CtHit::Established(ct.flags);
    }
    CtHit::Miss
}

fn ct_create(pkt: &Packet, now: u64, src_id: u32, dst_id: u32, rule: u32, proxied: bool) {
    let Some((sport, dport)) = pkt.ct_ports else { return };
    let mut flags = if proxied { ct_flag::PROXIED } else { 0 };
    if pkt.proto == IPPROTO_TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            flags |= ct_flag::RST;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            flags |= ct_flag::FIN_FWD;
        }
    }
    let value = CtValue { created_ns: now, last_seen_ns: now, flags, src_identity: src_id, dst_identity: dst_id, rule };
    let _ = PORIN_CT.insert(&ct_key(pkt, sport, dport, false), &value, 0);
}

fn is_drop(v: &PolicyValue) -> Option<u8> {
    match v.verdict {
        verdict::ALLOW | verdict::REDIRECT => None,
        verdict::DROP_DENY => Some(reason::POLICY_DENY),
        _ => Some(reason::POLICY_DENIED),
    }
}

/// Forwards an allowed new flow: records it and reports the verdict.
fn admit(ctx: &TcContext, pkt: &Packet, now: u64, d: &Decision) -> i32 {
    ct_create(pkt, now, d.src_identity, d.dst_identity, d.value.rule, false);
    count(counter::CT_NEW);
    if config_value(config::VERDICT_EVENTS, 1) != 0 {
        emit(ctx, event_kind::VERDICT, reason::NONE, pkt, d);
    }
    TC_ACT_OK
}

fn established(hit: &CtHit) -> Option<i32> {
    match hit {
        CtHit::Miss => None,
        CtHit::Established(_) => {
            count(counter::CT_ESTABLISHED);
            Some(TC_ACT_OK)
        }
        CtHit::Reply(_) => {
            count(counter::CT_REPLY);
            Some(TC_ACT_OK)
        }
    }
}

/// Delivers a TCP packet to the proxy socket it belongs to, if there is one: the rest of a proxied
/// client connection, or the server's reply to one of the proxy's upstream connections. Listeners are
/// not taken (new flows are policy's business), nor TIME_WAIT sockets for a SYN.
#[inline(always)]
fn to_proxy_socket(ctx: &TcContext, pkt: &Packet) -> bool {
    if pkt.proto != IPPROTO_TCP {
        return false;
    }
    // SAFETY: an all-zero tuple is a valid value of this plain-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let be32 = |b: &[u8; 16], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let sport = u16::from_ne_bytes(pkt.sport.to_be_bytes());
    let dport = u16::from_ne_bytes(pkt.dport.to_be_bytes());
    let netns = BPF_F_CURRENT_NETNS as u64;
    // The tuple size must be a constant at each call site.
    let sk = if pkt.family == family::V4 {
        tuple.__bindgen_anon_1.ipv4.saddr = be32(&pkt.saddr, 0);
        tuple.__bindgen_anon_1.ipv4.daddr = be32(&pkt.daddr, 0);
        tuple.__bindgen_anon_1.ipv4.sport = sport;
        tuple.__bindgen_anon_1.ipv4.dport = dport;
        // SAFETY: the context pointer and the tuple are valid for the call.
        unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, 12, netns, 0) }
    } else {
        tuple.__bindgen_anon_1.ipv6.saddr =
            [be32(&pkt.saddr, 0), be32(&pkt.saddr, 4), be32(&pkt.saddr, 8), be32(&pkt.saddr, 12)];
        tuple.__bindgen_anon_1.ipv6.daddr =
            [be32(&pkt.daddr, 0), be32(&pkt.daddr, 4), be32(&pkt.daddr, 8), be32(&pkt.daddr, 12)];
        tuple.__bindgen_anon_1.ipv6.sport = sport;
        tuple.__bindgen_anon_1.ipv6.dport = dport;
        // SAFETY: as above.
        unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, 36, netns, 0) }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket reference the helper returned; released below on every path.
    let state = unsafe { (*sk).state };
    let syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let usable = state != BPF_TCP_LISTEN && !(syn && state == BPF_TCP_TIME_WAIT);
    // SAFETY: both pointers are valid; the reference is released right after.
    let assigned = usable && unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) } == 0;
    // SAFETY: releases the reference taken by the lookup.
    unsafe { bpf_sk_release(sk.cast()) };
    if assigned {
        ctx.set_mark(mark::TO_PROXY);
    }
    assigned
}

/// Hands a new flow to the proxy's listener `listener`; false when it is not there (proxy down).
#[inline(always)]
fn to_proxy_listener(ctx: &TcContext, pkt: &Packet, listener: u8) -> bool {
    if pkt.proto != IPPROTO_TCP {
        return false;
    }
    let index = proxy_index(listener, pkt.family == family::V6);
    let map = core::ptr::addr_of!(PORIN_PROXY).cast_mut().cast::<c_void>();
    // SAFETY: a SOCKMAP lookup returns a referenced socket (or null), released below.
    let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&index).cast()) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: both pointers are valid; the reference is released right after.
    let assigned = unsafe { bpf_sk_assign(ctx.as_ptr(), sk, 0) } == 0;
    // SAFETY: releases the reference taken by the lookup.
    unsafe { bpf_sk_release(sk) };
    if assigned {
        ctx.set_mark(mark::TO_PROXY);
    }
    assigned
}

#[classifier]
pub fn porin_from_ep(ctx: TcContext) -> i32 {
    let pkt = match parse(&ctx) {
        Ok(Parsed::Pass) => return TC_ACT_OK,
        Ok(Parsed::Ip(p)) => p,
        Err(why) => return drop_unparsed(&ctx, why),
    };
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let Some(iface) = (unsafe { PORIN_IFACES.get(&ifindex) }).copied() else {
        return drop_pkt(&ctx, reason::UNKNOWN_ENDPOINT, &pkt, &Decision::none(0, 0, 0, 0));
    };
    // Anti-spoofing: the source must be the endpoint's own address.
    let own = if pkt.family == family::V4 {
        iface.flags & iface_flag::HAS_V4 != 0 && pkt.saddr[..4] == iface.ipv4
    } else {
        iface.flags & iface_flag::HAS_V6 != 0 && pkt.saddr == iface.ipv6
    };
    if !own {
        let d = Decision::none(direction::EGRESS, iface.endpoint, 0, 0);
        return drop_pkt(&ctx, reason::INVALID_SOURCE, &pkt, &d);
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let hit = ct_lookup(&pkt, now);
    // Direct flows ride conntrack without a socket lookup. Proxied flows and flows conntrack does
    // not know (new ones, and the server's replies to the proxy's upstream connections) look for a
    // proxy socket first.
    let proxied = matches!(hit, CtHit::Established(f) | CtHit::Reply(f) if f & ct_flag::PROXIED != 0);
    if (proxied || matches!(hit, CtHit::Miss)) && to_proxy_socket(&ctx, &pkt) {
        count(counter::PROXY_SOCKET);
        return TC_ACT_OK;
    }
    if proxied {
        // A proxied flow whose proxy socket is gone (proxy restarted, connection closed): never the
        // direct path. A new SYN on the same tuple is judged (and redirected) as a new flow.
        let syn = pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if !syn {
            let d = Decision::none(direction::EGRESS, iface.endpoint, 0, 0);
            return drop_pkt(&ctx, reason::PROXY_UNAVAILABLE, &pkt, &d);
        }
    } else if let Some(action) = established(&hit) {
        return action;
    }
    let generation = config_value(config::GENERATION, 0) as u8;
    let src = identity_of(generation, pkt.family, &pkt.saddr);
    let dst = identity_of(generation, pkt.family, &pkt.daddr);
    let mut d = Decision {
        direction: direction::EGRESS,
        endpoint: iface.endpoint,
        src_identity: src.identity,
        dst_identity: dst.identity,
        value: policy(generation, iface.endpoint, dst.identity, direction::EGRESS, &pkt),
    };
    if let Some(why) = is_drop(&d.value) {
        return drop_pkt(&ctx, why, &pkt, &d);
    }
    let mut redirect = d.value.verdict == verdict::REDIRECT;
    if dst.endpoint != 0 {
        let ingress = policy(generation, dst.endpoint, src.identity, direction::INGRESS, &pkt);
        let i = Decision { direction: direction::INGRESS, endpoint: dst.endpoint, value: ingress, ..d };
        if let Some(why) = is_drop(&ingress) {
            return drop_pkt(&ctx, why, &pkt, &i);
        }
        if ingress.verdict == verdict::REDIRECT || !redirect {
            d = i;
        }
        redirect |= ingress.verdict == verdict::REDIRECT;
    }
    if redirect {
        // The L7 proxy takes the flow over; without its listener the flow must not pass unparsed.
        if !to_proxy_listener(&ctx, &pkt, d.value.listener) {
            return drop_pkt(&ctx, reason::PROXY_UNAVAILABLE, &pkt, &d);
        }
        // Conntrack lets the proxy's answers (from the original destination's address) through
        // `porin_to_ep` of this endpoint, and keeps the flow from ever taking the direct path.
        let _ = PORIN_CT.remove(&ct_key(&pkt, pkt.sport, pkt.dport, false));
        ct_create(&pkt, now, d.src_identity, d.dst_identity, d.value.rule, true);
        count(counter::REDIRECTED);
        if config_value(config::VERDICT_EVENTS, 1) != 0 {
            emit(&ctx, event_kind::VERDICT, reason::NONE, &pkt, &d);
        }
        return TC_ACT_OK;
    }
    admit(&ctx, &pkt, now, &d)
}

#[classifier]
pub fn porin_to_ep(ctx: TcContext) -> i32 {
    let pkt = match parse(&ctx) {
        Ok(Parsed::Pass) => return TC_ACT_OK,
        Ok(Parsed::Ip(p)) => p,
        Err(why) => return drop_unparsed(&ctx, why),
    };
    // The proxy's upstream connections were judged by the proxy (a pod cannot set this mark: it is
    // cleared when a packet crosses from a pod's namespace).
    // SAFETY: the context's skb pointer is valid for the program's run.
    if unsafe { (*ctx.skb.skb).mark } & mark::MASK == mark::FROM_PROXY {
        // A new upstream connection reuses the client's address: a stale direct-flow entry for the
        // same tuple would send the server's replies past the proxy socket.
        if pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            let _ = PORIN_CT.remove(&ct_key(&pkt, pkt.sport, pkt.dport, false));
        }
        count(counter::PROXY_UPSTREAM);
        return TC_ACT_OK;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(action) = established(&ct_lookup(&pkt, now)) {
        return action;
    }
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let Some(iface) = (unsafe { PORIN_IFACES.get(&ifindex) }).copied() else {
        return drop_pkt(&ctx, reason::UNKNOWN_ENDPOINT, &pkt, &Decision::none(0, 0, 0, 0));
    };
    let generation = config_value(config::GENERATION, 0) as u8;
    let src = identity_of(generation, pkt.family, &pkt.saddr);
    let dst = identity_of(generation, pkt.family, &pkt.daddr);
    let d = Decision {
        direction: direction::INGRESS,
        endpoint: iface.endpoint,
        src_identity: src.identity,
        dst_identity: dst.identity,
        value: policy(generation, iface.endpoint, src.identity, direction::INGRESS, &pkt),
    };
    if let Some(why) = is_drop(&d.value) {
        return drop_pkt(&ctx, why, &pkt, &d);
    }
    if d.value.verdict == verdict::REDIRECT {
        // Flows from outside the node's endpoints (the host, the world) reach the pod here, at tc
        // egress, where a socket cannot be assigned: they are not handed to the proxy yet.
        return drop_pkt(&ctx, reason::PROXY_UNAVAILABLE, &pkt, &d);
    }
    admit(&ctx, &pkt, now, &d)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
