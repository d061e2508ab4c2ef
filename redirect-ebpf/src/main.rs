//! Porin's tc programs, attached (clsact, TCX) to the host-side end of every endpoint's veth:
//!
//! * `porin_from_ep` (tc ingress): traffic *from* an endpoint. Checks the source address belongs to
//!   the endpoint, passes established flows (conntrack), and judges a new flow once: the endpoint's
//!   egress policy and, when the destination is a local endpoint, that endpoint's ingress policy.
//! * `porin_to_ep` (tc egress): traffic *to* an endpoint that did not come from a local endpoint
//!   (the host, the world): judges the endpoint's ingress policy for new flows.
//! * `porin_from_world` (tc ingress on the node's uplink): hands the proxy what comes from outside
//!   for it — servers' answers to its upstream connections, outside clients' proxied flows, and new
//!   flows to an endpoint whose ingress policy needs L7 — and passes the rest on.
//!
//! DNS over UDP is proxied too: a new UDP flow to redirect goes to the proxy's UDP socket (from
//! `PORIN_PROXY_UDP`), its later datagrams to the same socket, and the DNS server's answers to the
//! proxy's connected upstream socket (`bpf_sk_lookup_udp`, only sockets the proxy marked). Egress
//! to an address the DNS proxy learned is judged with its FQDN selector identities too
//! (`PORIN_FQDN`, written by the proxy).
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
//! A client reusing its port soon after the proxy closed that tuple's connection (the proxy's
//! socket in TIME_WAIT) sends a SYN the listener alone cannot take (the TIME_WAIT socket would meet
//! the rest of the handshake): the SYN is assigned to the TIME_WAIT socket, and the kernel's
//! TIME_WAIT path looks for a listener — `porin_tw_lookup` (`sk_lookup`, `time_wait.rs`) gives it
//! the proxy's, from the tuple the tc program recorded (`PORIN_TW_SYN`), as TPROXY does.
//!
//! Policy comes from maps the agent writes (layouts in `redirect-common`); identities from the ipcache.
//! Services are balanced at the socket (`sock.rs`): cgroup `connect`/`sendmsg` programs rewrite a
//! service frontend to a backend before anything is routed, `recvmsg`/`getpeername` programs show
//! the frontend back; the tc programs then see (and judge) the backend's address like any other.
//!
//! Everything fails closed: an unknown interface, a spoofed source, an unparseable header, a missing
//! policy entry or an absent proxy listener drops the packet with an event that names the reason.
//! The programs only read maps the agent owns, write conntrack, counters and events, and change
//! packets in one case: a frame assigned to a proxy socket is addressed to the node and made
//! host-bound (`Tc::to_stack`; from a bridge port it also goes to the bridge's own input, not
//! through the bridge).
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map helpers take Borrow<K>: references avoid copying keys onto the 512-byte BPF stack"
)]

use aya_ebpf::EbpfContext as _;
use aya_ebpf::bindings::{
    BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, TC_ACT_OK, TC_ACT_SHOT, bpf_sock_tuple,
};
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::{
    bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_redirect, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release,
    bpf_skb_change_type, bpf_skc_lookup_tcp,
};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::{Key, LpmTrie};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockMap};
use aya_ebpf::programs::TcContext;
use redirect_common::datapath::{self, Action, Decision, Kernel, Packet, proto};
use redirect_common::{
    CtKey, CtValue, Event, FqdnKey, FqdnValue, IPCACHE_PREFIX_BITS, IfaceValue, IpcacheKey, IpcacheValue,
    POLICY_FULL_BITS, PolicyKey, PolicyValue, config, counter, family, iface_flag, lb, mark, proxy_index, reason,
    sizes,
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
#[map]
static PORIN_PROXY_UDP: SockMap = SockMap::pinned(sizes::PROXY_UDP, 0);
#[map]
static PORIN_FQDN: HashMap<FqdnKey, FqdnValue> = HashMap::pinned(sizes::FQDN, 0);
#[map]
static PORIN_LB_SVC: HashMap<lb::ServiceKey, lb::ServiceValue> = HashMap::pinned(sizes::LB_SERVICES, 0);
#[map]
static PORIN_LB_BE: HashMap<lb::BackendKey, lb::Addr> = HashMap::pinned(sizes::LB_BACKENDS, 0);
#[map]
static PORIN_LB_MEMBER: HashMap<lb::MemberKey, u8> = HashMap::pinned(sizes::LB_MEMBERS, 0);
#[map]
static PORIN_LB_AFF: LruHashMap<lb::AffinityKey, lb::AffinityValue> = LruHashMap::pinned(sizes::LB_AFFINITY, 0);
#[map]
static PORIN_LB_REV: LruHashMap<lb::RevKey, lb::Addr> = LruHashMap::pinned(sizes::LB_REV, 0);
#[map]
static PORIN_LB_CONN: LruHashMap<CtKey, lb::Addr> = LruHashMap::pinned(sizes::LB_CONN, 0);
/// Key: the tuple as `bpf_skc_lookup_tcp` took it (zeroed, then the IPv4 or IPv6 member set).
#[map]
static PORIN_TW_SYN: LruHashMap<bpf_sock_tuple, u32> = LruHashMap::pinned(sizes::TW_SYN, 0);

mod sock;
mod time_wait;

/// No listener for a SYN meeting a TIME_WAIT socket (listener ids are `u8`).
const NO_LISTENER: u32 = u32::MAX;

/// `TCP_ESTABLISHED`: also the state of a connected UDP socket.
const SK_ESTABLISHED: u32 = 1;

const ETH_HLEN: usize = 14;
/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

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
    let mut pkt = Packet::EMPTY;
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
        proto::TCP => {
            let t = load::<[u8; 14]>(ctx, off)?;
            pkt.sport = u16::from_be_bytes([t[0], t[1]]);
            pkt.dport = u16::from_be_bytes([t[2], t[3]]);
            pkt.tcp_flags = t[13];
            pkt.ct_ports = Some((pkt.sport, pkt.dport));
        }
        proto::UDP | proto::SCTP => {
            let t = load::<[u8; 4]>(ctx, off)?;
            pkt.sport = u16::from_be_bytes([t[0], t[1]]);
            pkt.dport = u16::from_be_bytes([t[2], t[3]]);
            pkt.ct_ports = Some((pkt.sport, pkt.dport));
        }
        proto::ICMP | proto::ICMPV6 => {
            let t = load::<[u8; 8]>(ctx, off)?;
            let (kind, echo) = (t[0], if pkt.proto == proto::ICMP { [0, 8] } else { [129, 128] });
            // Neighbour discovery and multicast listener messages keep IPv6 working: always pass.
            if pkt.proto == proto::ICMPV6 && matches!(kind, 130..=137 | 143) {
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

/// The kernel side of [`Kernel`]: this packet's context, the maps and the helpers.
struct Tc<'a> {
    ctx: &'a TcContext,
}

impl<'a> Tc<'a> {
    fn new(ctx: &'a TcContext) -> Self {
        Self { ctx }
    }

    /// The bridge (index) a frame handed to the proxy from this interface goes to the input of
    /// ([`Tc::to_stack`]); 0: none, it goes on.
    #[inline(always)]
    fn bridge(&self) -> u32 {
        // SAFETY: a value of a map only the agent writes, read within this program's run.
        unsafe { PORIN_IFACES.get(&self.ifindex()) }.map_or(0, |i| i.bridge)
    }
}

impl Tc<'_> {
    fn ifindex(&self) -> u32 {
        // SAFETY: the context's skb pointer is valid for the program's run.
        unsafe { (*self.ctx.skb.skb).ifindex }
    }

    /// Assigns the packet to a proxy socket, marks it for local delivery, and makes its frame one
    /// the node's stack takes ([`Tc::to_stack`]): only a frame that was assigned is rewritten.
    /// False when either fails; the frame then carries the socket and the mark (it reaches the
    /// proxy's socket or, stripped of it, no socket: never the destination).
    fn assign(&self, sk: *mut c_void) -> bool {
        // SAFETY: both pointers are valid; the caller releases the socket reference.
        let assigned = unsafe { bpf_sk_assign(self.ctx.as_ptr(), sk, 0) } == 0;
        if !assigned {
            return false;
        }
        self.ctx.set_mark(mark::TO_PROXY);
        self.to_stack()
    }

    /// Makes a frame assigned to a proxy socket one the node's stack takes for itself: addressed
    /// to the MAC the node has on the endpoint's segment, packet type host. On a bridge port
    /// (`bridge` CNI plugin) the frame is also sent to the bridge's own input (`Tc::bridge`, by
    /// [`tc_action`]), where the bridge's MAC makes it the host's: the bridge, which runs after
    /// tc ingress, would otherwise switch a frame for a pod on the same bridge straight to that
    /// pod's port, and its `br_netfilter` hook drops an assigned socket. A routed (`ptp`) pod
    /// addresses the node already: nothing changes. False when the frame cannot be rewritten.
    /// An interface that is not an endpoint's (the uplink: what comes for the proxy there is
    /// addressed to the node) is left as it is.
    fn to_stack(&self) -> bool {
        // By reference: a copy of the entry would cost stack the deepest call chain lacks.
        // SAFETY: a value of a map only the agent writes, read within this program's run.
        let Some(iface) = (unsafe { PORIN_IFACES.get(&self.ifindex()) }) else {
            return true;
        };
        if iface.flags & iface_flag::HAS_MAC == 0 {
            return true;
        }
        match self.ctx.load::<[u8; 6]>(0) {
            Ok(dst) if dst == iface.mac => {}
            Ok(_) => {
                if self.ctx.store(0, &iface.mac, 0).is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
        // SAFETY: the context's skb pointer is valid for the program's run.
        let skb = self.ctx.skb.skb;
        // SAFETY: as above; the helper only changes the packet type (host is always allowed).
        unsafe { (*skb).pkt_type == PACKET_HOST || bpf_skb_change_type(skb, PACKET_HOST) == 0 }
    }

    /// `bpf_skc_lookup_tcp` / `bpf_sk_lookup_udp` on the packet's tuple in this namespace;
    /// `syn_listener` is [`NO_LISTENER`] or a listener id (see `Kernel::assign_proxy_socket`).
    fn proxy_socket(&mut self, pkt: &Packet, syn_listener: u32) -> bool {
        let udp = pkt.proto == datapath::proto::UDP;
        if !pkt.is_tcp() && !udp {
            return false;
        }
        // SAFETY: an all-zero tuple is a valid value of this plain-data union.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        let be32 = |b: &[u8; 16], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let sport = u16::from_ne_bytes(pkt.sport.to_be_bytes());
        let dport = u16::from_ne_bytes(pkt.dport.to_be_bytes());
        let netns = BPF_F_CURRENT_NETNS as u64;
        let ctx = self.ctx.as_ptr();
        // The tuple size must be a constant at each call site.
        let sk = if pkt.family == family::V4 {
            tuple.__bindgen_anon_1.ipv4.saddr = be32(&pkt.saddr, 0);
            tuple.__bindgen_anon_1.ipv4.daddr = be32(&pkt.daddr, 0);
            tuple.__bindgen_anon_1.ipv4.sport = sport;
            tuple.__bindgen_anon_1.ipv4.dport = dport;
            // SAFETY: the context pointer and the tuple are valid for the call.
            unsafe {
                if udp {
                    bpf_sk_lookup_udp(ctx, &mut tuple, 12, netns, 0)
                } else {
                    bpf_skc_lookup_tcp(ctx, &mut tuple, 12, netns, 0)
                }
            }
        } else {
            tuple.__bindgen_anon_1.ipv6.saddr =
                [be32(&pkt.saddr, 0), be32(&pkt.saddr, 4), be32(&pkt.saddr, 8), be32(&pkt.saddr, 12)];
            tuple.__bindgen_anon_1.ipv6.daddr =
                [be32(&pkt.daddr, 0), be32(&pkt.daddr, 4), be32(&pkt.daddr, 8), be32(&pkt.daddr, 12)];
            tuple.__bindgen_anon_1.ipv6.sport = sport;
            tuple.__bindgen_anon_1.ipv6.dport = dport;
            // SAFETY: as above.
            unsafe {
                if udp {
                    bpf_sk_lookup_udp(ctx, &mut tuple, 36, netns, 0)
                } else {
                    bpf_skc_lookup_tcp(ctx, &mut tuple, 36, netns, 0)
                }
            }
        };
        if sk.is_null() {
            return false;
        }
        // SAFETY: a socket reference the helper returned; released below on every path.
        let (state, sk_mark) = unsafe { ((*sk).state, (*sk).mark) };
        let usable = if udp {
            // Only the proxy's own connected upstream sockets: never a host socket that happens
            // to be bound to the port.
            state == SK_ESTABLISHED && sk_mark & mark::MASK == mark::FROM_PROXY
        } else if state == BPF_TCP_TIME_WAIT && pkt.opens_connection() {
            syn_listener != NO_LISTENER && self.hand_over_time_wait(&tuple, pkt.family, syn_listener)
        } else {
            state != BPF_TCP_LISTEN
        };
        let assigned = usable && self.assign(sk.cast());
        // SAFETY: releases the reference taken by the lookup.
        unsafe { bpf_sk_release(sk.cast()) };
        assigned
    }

    /// Records that the SYN about to be assigned to a TIME_WAIT socket is listener `listener`'s,
    /// under the tuple it was looked up with (for `time_wait::porin_tw_lookup`: the key costs no
    /// stack). False when it cannot be recorded: the SYN then goes to the listener directly (its
    /// handshake may stall on the TIME_WAIT socket; it never reaches anything else).
    #[inline(always)]
    fn hand_over_time_wait(&mut self, tuple: &bpf_sock_tuple, fam: u8, listener: u32) -> bool {
        #[expect(clippy::cast_possible_truncation, reason = "a listener id, from a u8")]
        let index = proxy_index(listener as u8, fam == family::V6);
        if PORIN_TW_SYN.insert(tuple, &index, 0).is_err() {
            self.count(counter::TIME_WAIT_FAILED);
            return false;
        }
        self.count(counter::TIME_WAIT_SYN);
        true
    }
}

impl Kernel for Tc<'_> {
    #[inline(always)]
    fn now_ns(&self) -> u64 {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    }

    #[inline(always)]
    fn config(&self, index: u32, default: u32) -> u32 {
        PORIN_CONFIG.get(index).copied().unwrap_or(default)
    }

    fn ipcache(&self, generation: u8, fam: u8, addr: &[u8; 16]) -> Option<IpcacheValue> {
        let bits = if fam == family::V4 { 32 } else { 128 };
        let key =
            Key::new(IPCACHE_PREFIX_BITS + bits, IpcacheKey { generation, family: fam, _pad: [0; 2], addr: *addr });
        PORIN_IPCACHE.get(&key).copied()
    }

    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
        PORIN_POLICY.get(&Key::new(POLICY_FULL_BITS, *key)).copied()
    }

    fn fqdn(&self, fam: u8, addr: &[u8; 16]) -> Option<&FqdnValue> {
        let key = FqdnKey { family: fam, _pad: [0; 3], addr: *addr };
        // SAFETY: a value of a map the agent and the proxy only ever replace whole; read within
        // this program's run.
        unsafe { PORIN_FQDN.get(&key) }
    }

    fn iface(&self) -> Option<IfaceValue> {
        // SAFETY: the value is copied out at once.
        unsafe { PORIN_IFACES.get(&self.ifindex()) }.copied()
    }

    #[inline(always)]
    fn mark(&self) -> u32 {
        // SAFETY: the context's skb pointer is valid for the program's run.
        unsafe { (*self.ctx.skb.skb).mark }
    }

    #[inline(always)]
    fn ct_get(&mut self, key: &CtKey) -> Option<&mut CtValue> {
        // SAFETY: a value pointer the map returned, valid for the program's run; entries are plain
        // data and concurrent updates only lose a timestamp or flag update.
        PORIN_CT.get_ptr_mut(key).map(|p| unsafe { &mut *p })
    }

    fn ct_insert(&mut self, key: &CtKey, value: &CtValue) {
        if PORIN_CT.insert(key, value, 0).is_err() {
            self.count(counter::CT_INSERT_FAILED);
        }
    }

    fn ct_remove(&mut self, key: &CtKey) {
        // Absent is fine: the entry is gone either way.
        let _ = PORIN_CT.remove(key);
    }

    #[inline(always)]
    fn assign_proxy_socket(&mut self, pkt: &Packet, syn_listener: Option<u8>) -> bool {
        // An `Option` passed in registers leaves its value undefined when `None`, which the
        // verifier refuses to see read: a plain number crosses the call.
        self.proxy_socket(pkt, syn_listener.map_or(NO_LISTENER, u32::from))
    }

    /// The listener from the SOCKMAP of the packet's protocol.
    fn assign_proxy_listener(&mut self, pkt: &Packet, listener: u8) -> bool {
        let map = if pkt.is_tcp() {
            core::ptr::addr_of!(PORIN_PROXY).cast_mut().cast::<c_void>()
        } else if pkt.proto == datapath::proto::UDP {
            core::ptr::addr_of!(PORIN_PROXY_UDP).cast_mut().cast::<c_void>()
        } else {
            return false;
        };
        let index = proxy_index(listener, pkt.family == family::V6);
        // SAFETY: a SOCKMAP lookup returns a referenced socket (or null), released below.
        let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&index).cast()) };
        if sk.is_null() {
            return false;
        }
        let assigned = self.assign(sk);
        // SAFETY: releases the reference taken by the lookup.
        unsafe { bpf_sk_release(sk) };
        assigned
    }

    #[inline(always)]
    fn count(&mut self, index: u32) {
        if let Some(p) = PORIN_COUNTERS.get_ptr_mut(index) {
            // SAFETY: a per-CPU slot of this CPU, valid for the program's run.
            unsafe { *p += 1 };
        }
    }

    fn emit(&mut self, kind: u8, why: u8, pkt: &Packet, d: &Decision) {
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
                    ifindex: self.ifindex(),
                    saddr: pkt.saddr,
                    daddr: pkt.daddr,
                    ts_ns: self.now_ns(),
                });
                entry.submit(0);
            }
            None => self.count(counter::EVENTS_LOST),
        }
    }
}

fn tc_action(k: &Tc<'_>, a: Action) -> i32 {
    match a {
        Action::Proxy => match k.bridge() {
            0 => TC_ACT_OK,
            bridge => {
                // SAFETY: a helper without preconditions; it returns TC_ACT_REDIRECT or TC_ACT_SHOT.
                #[expect(clippy::cast_possible_truncation, reason = "a tc action code")]
                let act = unsafe { bpf_redirect(bridge, u64::from(BPF_F_INGRESS)) } as i32;
                act
            }
        },
        Action::Pass => TC_ACT_OK,
        Action::Drop(_) => TC_ACT_SHOT,
    }
}

#[classifier]
pub fn porin_from_ep(ctx: TcContext) -> i32 {
    let mut k = Tc::new(&ctx);
    let action = match parse(&ctx) {
        Ok(Parsed::Pass) => Action::Pass,
        Ok(Parsed::Ip(pkt)) => datapath::from_endpoint(&mut k, &pkt),
        Err(why) => datapath::drop_unparsed(&mut k, why),
    };
    tc_action(&k, action)
}

#[classifier]
pub fn porin_to_ep(ctx: TcContext) -> i32 {
    let mut k = Tc::new(&ctx);
    let action = match parse(&ctx) {
        Ok(Parsed::Pass) => Action::Pass,
        Ok(Parsed::Ip(pkt)) => datapath::to_endpoint(&mut k, &pkt),
        Err(why) => datapath::drop_unparsed(&mut k, why),
    };
    tc_action(&k, action)
}

#[classifier]
pub fn porin_from_world(ctx: TcContext) -> i32 {
    let mut k = Tc::new(&ctx);
    let action = match parse(&ctx) {
        Ok(Parsed::Pass) => Action::Pass,
        Ok(Parsed::Ip(pkt)) => datapath::from_world(&mut k, &pkt),
        // What the uplink brings that does not parse is the endpoints' business (or nobody's).
        Err(_) => Action::Pass,
    };
    tc_action(&k, action)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
