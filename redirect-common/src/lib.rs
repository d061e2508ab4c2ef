//! Map layouts shared by Porin's eBPF datapath (`redirect-ebpf`) and the agent that writes the maps.
//!
//! Every key and value is `#[repr(C)]`, has no implicit padding (explicit `_pad` fields), documents
//! the byte order of each multi-byte field, and has its size asserted at compile time. Map names and
//! sizes are constants used by both the `#[map]` declarations and the loader. This crate is `no_std`
//! and must stay free of anything the kernel side cannot compile.
//!
//! Generations: ipcache and policy keys carry a generation byte. The datapath reads the active
//! generation from [`config::GENERATION`] once per packet; the agent writes a new snapshot into the
//! inactive generation and flips that one 4-byte word, so a new flow always sees the old policy or the
//! new one, never a mix.
#![no_std]

use core::mem::size_of;

pub mod datapath;
pub mod lb;

/// Map names (at most 15 bytes: the kernel's object-name limit).
pub mod names {
    /// Address/prefix → identity (LPM trie).
    pub const IPCACHE: &str = "PORIN_IPCACHE";
    /// Per-endpoint policy (LPM trie).
    pub const POLICY: &str = "PORIN_POLICY";
    /// Host-side interface → endpoint.
    pub const IFACES: &str = "PORIN_IFACES";
    /// Connection tracking (LRU hash).
    pub const CONNTRACK: &str = "PORIN_CT";
    /// Settings and the active generation (array of `u32`).
    pub const CONFIG: &str = "PORIN_CONFIG";
    /// Per-CPU counters (array of `u64`).
    pub const COUNTERS: &str = "PORIN_COUNTERS";
    /// Drop and verdict events (ring buffer).
    pub const EVENTS: &str = "PORIN_EVENTS";
    /// Proxy listener sockets (SOCKMAP), indexed by listener id.
    pub const PROXY: &str = "PORIN_PROXY";
    /// Proxy UDP listener sockets (SOCKMAP), indexed as [`PROXY`].
    pub const PROXY_UDP: &str = "PORIN_PROXY_UDP";
    /// Addresses the DNS proxy learned → their FQDN selector identities (hash).
    pub const FQDN: &str = "PORIN_FQDN";
    /// Service frontends (hash; [`crate::lb`]).
    pub const LB_SERVICES: &str = "PORIN_LB_SVC";
    /// Service backend slots (hash).
    pub const LB_BACKENDS: &str = "PORIN_LB_BE";
    /// Service membership of backends (hash).
    pub const LB_MEMBERS: &str = "PORIN_LB_MEMBER";
    /// `ClientIP` affinity (LRU hash).
    pub const LB_AFFINITY: &str = "PORIN_LB_AFF";
    /// Sockets' translations, read back by `getpeername`/`recvmsg` (LRU hash).
    pub const LB_REV: &str = "PORIN_LB_REV";
    /// Connections whose connect the socket load balancer translated: tuple as sent ([`CtKey`],
    /// client → backend) → the service frontend ([`lb::Addr`]) asked for (LRU hash; removed when
    /// the socket closes). The L7 proxy balances only these, never a connection to a pod itself.
    pub const LB_CONN: &str = "PORIN_LB_CONN";
    /// SYNs of proxied flows handed to a TIME_WAIT socket of the proxy: tuple (as
    /// `bpf_skc_lookup_tcp` took it: `struct bpf_sock_tuple`, zeroed, the family's member set) → the
    /// [`PROXY`] index of the listener the kernel's TIME_WAIT path is to find (LRU hash).
    pub const TW_SYN: &str = "PORIN_TW_SYN";
}

/// Map capacities.
pub mod sizes {
    /// ipcache entries (both generations).
    pub const IPCACHE: u32 = 1 << 17;
    /// Policy entries (both generations).
    pub const POLICY: u32 = 1 << 20;
    /// Endpoint interfaces.
    pub const IFACES: u32 = 1 << 12;
    /// Tracked connections.
    pub const CONNTRACK: u32 = 1 << 18;
    /// Event ring buffer bytes (a power of two, a multiple of the page size).
    pub const EVENTS: u32 = 1 << 20;
    /// Proxy listeners.
    pub const PROXY: u32 = 16;
    /// Proxy UDP listeners.
    pub const PROXY_UDP: u32 = 8;
    /// Addresses learned from DNS.
    pub const FQDN: u32 = 1 << 16;
    /// Service frontends (both generations).
    pub const LB_SERVICES: u32 = 1 << 15;
    /// Backend slots (both generations).
    pub const LB_BACKENDS: u32 = 1 << 17;
    /// Memberships (both generations).
    pub const LB_MEMBERS: u32 = 1 << 17;
    /// Client namespace and service pairs with affinity.
    pub const LB_AFFINITY: u32 = 1 << 16;
    /// Translated sockets.
    pub const LB_REV: u32 = 1 << 18;
    /// Translated TCP connections open.
    pub const LB_CONN: u32 = 1 << 18;
    /// SYNs between the tc program and the kernel's TIME_WAIT path (an entry lives microseconds).
    pub const TW_SYN: u32 = 1 << 12;
}

/// Program names (the functions in `redirect-ebpf`).
pub mod programs {
    /// tc ingress on an endpoint's host-side interface: traffic *from* the endpoint.
    pub const FROM_ENDPOINT: &str = "porin_from_ep";
    /// tc egress on an endpoint's host-side interface: traffic *to* the endpoint.
    pub const TO_ENDPOINT: &str = "porin_to_ep";
    /// tc ingress on the node's uplink: traffic from outside the node's endpoints.
    pub const FROM_WORLD: &str = "porin_from_world";
    /// Socket load balancing (cgroup `sock_addr` programs, attached to the node's cgroup): name and
    /// attach point.
    pub const SOCK: [(&str, &str); 8] = [
        ("porin_sock_connect4", "connect4"),
        ("porin_sock_connect6", "connect6"),
        ("porin_sock_sendmsg4", "sendmsg4"),
        ("porin_sock_sendmsg6", "sendmsg6"),
        ("porin_sock_recvmsg4", "recvmsg4"),
        ("porin_sock_recvmsg6", "recvmsg6"),
        ("porin_sock_getpeername4", "getpeername4"),
        ("porin_sock_getpeername6", "getpeername6"),
    ];
    /// `sock_ops` on the node's cgroup: records translated TCP connections by tuple (for the L7
    /// proxy) and forgets them, and their translation, when they close.
    pub const SOCK_OPS: &str = "porin_sock_ops";
    /// `sk_lookup` on the node's network namespace: the listener lookup of the kernel's TIME_WAIT
    /// path finds the proxy's listener for a SYN the tc program handed to a TIME_WAIT socket.
    pub const TIME_WAIT_LOOKUP: &str = "porin_tw_lookup";
}

/// Address families (`family` fields).
pub mod family {
    /// IPv4: the address is in the first 4 bytes of a 16-byte field, the rest zero.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// Policy directions (`PolicyKey::direction`).
pub mod direction {
    /// Traffic into the endpoint.
    pub const INGRESS: u8 = 1;
    /// Traffic out of the endpoint.
    pub const EGRESS: u8 = 2;
}

/// `PolicyValue::verdict`.
pub mod verdict {
    /// Forward.
    pub const ALLOW: u8 = 1;
    /// Forward through the proxy listener `PolicyValue::listener`.
    pub const REDIRECT: u8 = 2;
    /// Drop: a deny rule matched.
    pub const DROP_DENY: u8 = 3;
    /// Drop: default deny and no allow.
    pub const DROP_NO_ALLOW: u8 = 4;
    /// Drop: rules with different L7 parsers cover the flow (whatever other identities of the
    /// peer allow; only a deny says more).
    pub const DROP_CONFLICT: u8 = 5;
}

/// Drop reasons in events (Cilium's numbers where Cilium has the reason).
pub mod reason {
    /// Allowed (policy-verdict events).
    pub const NONE: u8 = 0;
    /// Source address does not belong to the endpoint (Cilium `DROP_INVALID_SIP`).
    pub const INVALID_SOURCE: u8 = 132;
    /// Default deny, no allow matched (Cilium `DROP_POLICY`, "Policy denied").
    pub const POLICY_DENIED: u8 = 133;
    /// A deny rule matched (Cilium `DROP_POLICY_DENY`, "Policy denied by denylist").
    pub const POLICY_DENY: u8 = 181;
    /// The packet came from an interface no endpoint owns.
    pub const UNKNOWN_ENDPOINT: u8 = 200;
    /// A non-first fragment: its ports are unknown, so it cannot be judged.
    pub const FRAGMENT: u8 = 201;
    /// The flow needs the L7 proxy and no proxy listener is present: fail closed.
    pub const PROXY_UNAVAILABLE: u8 = 202;
    /// A header could not be parsed.
    pub const MALFORMED: u8 = 203;
    /// A TCP segment of a flow that needs the L7 proxy, which neither opens a connection nor
    /// belongs to one the proxy holds: the proxy never saw the connection start.
    pub const NO_PROXY_CONNECTION: u8 = 204;
    /// A packet of a proxied flow's client side that did not come through the proxy.
    pub const BYPASSES_PROXY: u8 = 205;
    /// The policy that allows the flow requires authentication and the flow did not come
    /// authenticated (from another node: not through the mTLS tunnel; Cilium `DROP_POLICY_AUTH_REQUIRED`).
    pub const AUTH_REQUIRED: u8 = 189;
}

/// Reserved security identities the datapath itself assigns (Cilium's numbers; the policy
/// engine's `identity::reserved` is the source of truth, a test ties the two).
pub mod identity {
    /// An IPv4 address the ipcache does not know.
    pub const WORLD_IPV4: u32 = 9;
    /// An IPv6 address the ipcache does not know.
    pub const WORLD_IPV6: u32 = 10;
}

/// Indexes into [`names::CONFIG`] (each a `u32`).
pub mod config {
    /// Active generation (0 or 1) of ipcache and policy entries.
    pub const GENERATION: u32 = 0;
    /// Established TCP idle timeout, seconds.
    pub const CT_TCP_SECS: u32 = 1;
    /// TCP timeout before the reply is seen, and after FIN in both directions or RST, seconds.
    pub const CT_TCP_CLOSE_SECS: u32 = 2;
    /// UDP and other protocols idle timeout, seconds.
    pub const CT_UDP_SECS: u32 = 3;
    /// ICMP echo idle timeout, seconds.
    pub const CT_ICMP_SECS: u32 = 4;
    /// Emit a policy-verdict event for every new allowed flow (1) or not (0).
    pub const VERDICT_EVENTS: u32 = 5;
    /// Number of entries.
    pub const LEN: u32 = 8;
}

/// Indexes into [`names::COUNTERS`] (each a per-CPU `u64`).
pub mod counter {
    /// Unused (forwarded packets are `CT_NEW + CT_ESTABLISHED + CT_REPLY + UNTRACKED_PASS`).
    pub const FORWARDED: u32 = 0;
    /// Packets dropped (any reason).
    pub const DROPPED: u32 = 1;
    /// New flows judged by policy and allowed.
    pub const CT_NEW: u32 = 2;
    /// Packets of an established flow (original direction).
    pub const CT_ESTABLISHED: u32 = 3;
    /// Packets of an established flow (reply direction).
    pub const CT_REPLY: u32 = 4;
    /// Drops: deny rule.
    pub const DROP_POLICY_DENY: u32 = 5;
    /// Drops: no allow.
    pub const DROP_POLICY_DENIED: u32 = 6;
    /// Drops: spoofed source.
    pub const DROP_INVALID_SOURCE: u32 = 7;
    /// Drops: proxy unavailable.
    pub const DROP_PROXY_UNAVAILABLE: u32 = 8;
    /// Drops: fragments and malformed packets.
    pub const DROP_OTHER: u32 = 9;
    /// Events lost (ring buffer full).
    pub const EVENTS_LOST: u32 = 10;
    /// Flows handed to the proxy.
    pub const REDIRECTED: u32 = 11;
    /// Packets delivered to a socket the proxy holds (the rest of a proxied connection, or the
    /// server's replies to the proxy's upstream connection).
    pub const PROXY_SOCKET: u32 = 12;
    /// Packets of the proxy's own upstream connections (marked; not judged again).
    pub const PROXY_UPSTREAM: u32 = 13;
    /// TCP segments with no conntrack entry that policy allowed: passed without creating one
    /// (only a SYN opens a TCP flow).
    pub const UNTRACKED_PASS: u32 = 14;
    /// Drops: a packet of an L7 flow that did not go through the proxy
    /// ([`super::reason::NO_PROXY_CONNECTION`], [`super::reason::BYPASSES_PROXY`]).
    pub const DROP_NOT_PROXIED: u32 = 15;
    /// Conntrack entries that could not be written (the flow passes; its later packets are judged
    /// again, or dropped when they need the proxy).
    pub const CT_INSERT_FAILED: u32 = 16;
    /// New flows policy would have dropped, passed because the endpoint's policy is in audit mode.
    pub const AUDITED: u32 = 17;
    /// Connects and sends to a service frontend given a backend.
    pub const LB_TRANSLATED: u32 = 18;
    /// Connects and sends to a service frontend refused: the service has no backend.
    pub const LB_NO_BACKEND: u32 = 19;
    /// Socket translations (`getpeername`/`recvmsg` then show the backend's address) or affinities
    /// (the next connect chooses anew) that could not be recorded.
    pub const LB_RECORD_FAILED: u32 = 20;
    /// SYNs of proxied flows that met a TIME_WAIT socket of the proxy on their tuple (a client
    /// reusing its port): handed to that socket, whose TIME_WAIT path finds the listener.
    pub const TIME_WAIT_SYN: u32 = 21;
    /// Such SYNs whose listener was gone when the TIME_WAIT path looked (refused: the client
    /// retries), or whose hand-over could not be recorded (sent to the listener directly).
    pub const TIME_WAIT_FAILED: u32 = 22;
    /// Drops of flows whose policy requires authentication that did not come through the tunnel
    /// ([`super::reason::AUTH_REQUIRED`]).
    pub const DROP_AUTH_REQUIRED: u32 = 23;
    /// New TCP flows to another node's endpoint handed to the proxy's tunnel listener.
    pub const TUNNELLED: u32 = 24;
    /// Number of counters (room to grow: the map is pinned across agent versions).
    pub const LEN: u32 = 32;

    /// Every counter with the name it is reported under.
    pub const NAMES: [(u32, &str); 25] = [
        (DROPPED, "dropped"),
        (CT_NEW, "ct_new"),
        (CT_ESTABLISHED, "ct_established"),
        (CT_REPLY, "ct_reply"),
        (UNTRACKED_PASS, "untracked_pass"),
        (DROP_POLICY_DENY, "drop_policy_deny"),
        (DROP_POLICY_DENIED, "drop_policy_denied"),
        (DROP_INVALID_SOURCE, "drop_invalid_source"),
        (DROP_PROXY_UNAVAILABLE, "drop_proxy_unavailable"),
        (DROP_NOT_PROXIED, "drop_not_proxied"),
        (DROP_OTHER, "drop_other"),
        (EVENTS_LOST, "events_lost"),
        (REDIRECTED, "redirected"),
        (PROXY_SOCKET, "proxy_socket"),
        (PROXY_UPSTREAM, "proxy_upstream"),
        (CT_INSERT_FAILED, "ct_insert_failed"),
        (FORWARDED, "forwarded"),
        (AUDITED, "audited"),
        (LB_TRANSLATED, "lb_translated"),
        (LB_NO_BACKEND, "lb_no_backend"),
        (LB_RECORD_FAILED, "lb_record_failed"),
        (TIME_WAIT_SYN, "time_wait_syn"),
        (TIME_WAIT_FAILED, "time_wait_failed"),
        (DROP_AUTH_REQUIRED, "drop_auth_required"),
        (TUNNELLED, "tunnelled"),
    ];
}

/// Data part of an ipcache LPM key. Prefix length = 32 (generation, family, padding) + the address
/// prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    /// Generation (0 or 1).
    pub generation: u8,
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// Address, network byte order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
}

/// ipcache value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    /// Security identity, host byte order.
    pub identity: u32,
    /// Local endpoint id (host byte order) when the address is a local endpoint's, else 0.
    pub endpoint: u32,
    /// [`ipcache_flag`] bits.
    pub flags: u32,
}

/// `IpcacheValue::flags`.
pub mod ipcache_flag {
    /// Another node's endpoint whose flows must come authenticated (its ingress policy requires
    /// it, or the mesh does): new TCP flows to it go to the proxy's tunnel listener
    /// ([`super::listener::TUNNEL`]), which carries them to that node's proxy over mTLS.
    pub const TUNNEL: u32 = 1;
}

/// Bits of an ipcache key before the address.
pub const IPCACHE_PREFIX_BITS: u32 = 32;

/// Data part of a policy LPM key. Generation, direction, endpoint and identity always match exactly;
/// then protocol (8 bits, 0 = any) and destination port (16 bits, prefix for ranges).
/// Prefix length: [`POLICY_EXACT_BITS`] for any protocol, +8 for one protocol, +8+n for a port prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Generation (0 or 1).
    pub generation: u8,
    /// [`direction::INGRESS`] or [`direction::EGRESS`].
    pub direction: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// Endpoint id, host byte order.
    pub endpoint: u32,
    /// Peer identity, host byte order; 0 = any peer.
    pub identity: u32,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port (ICMP: type), network byte order.
    pub dport: [u8; 2],
    /// Zero.
    pub _pad2: u8,
}

/// Bits of a policy key that always match exactly.
pub const POLICY_EXACT_BITS: u32 = 96;
/// Bits of a policy key with protocol and full port.
pub const POLICY_FULL_BITS: u32 = 120;

/// Policy value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// A [`verdict`] constant.
    pub verdict: u8,
    /// Proxy listener id (index into [`names::PROXY`]) for [`verdict::REDIRECT`].
    pub listener: u8,
    /// [`policy_flag`] bits.
    pub flags: u8,
    /// Zero.
    pub _pad: u8,
    /// Id of the rule that decided (for events; 0 = none), host byte order.
    pub rule: u32,
}

/// An endpoint's host-side interface, with the endpoint's own addresses for anti-spoofing (packets
/// from the endpoint must carry one of them as source), and how a frame reaches the node's stack
/// from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfaceValue {
    /// Endpoint id, host byte order.
    pub endpoint: u32,
    /// [`iface_flag`] bits.
    pub flags: u32,
    /// IPv4 address, network byte order (valid with [`iface_flag::HAS_V4`]).
    pub ipv4: [u8; 4],
    /// The Linux bridge the interface is a port of (`bridge` CNI plugin): its index, host byte
    /// order; 0 when none. A frame the datapath hands to the node's proxy from a bridge port is
    /// redirected to the bridge's own input: the bridge would otherwise switch a frame addressed
    /// to a pod on the same bridge straight to that pod's port, past the node's stack and its
    /// proxy, and (with `br_netfilter`, as Kubernetes nodes run) drop the socket assigned to it.
    pub bridge: u32,
    /// IPv6 address, network byte order (valid with [`iface_flag::HAS_V6`]).
    pub ipv6: [u8; 16],
    /// The address a frame for the node carries on this interface's segment (valid with
    /// [`iface_flag::HAS_MAC`]): the bridge's MAC when [`IfaceValue::bridge`] is set, else the
    /// interface's own. A frame handed to the proxy is addressed to it.
    pub mac: [u8; 6],
    /// Zero.
    pub _pad_mac: [u8; 2],
}

/// `IfaceValue::flags`.
pub mod iface_flag {
    /// `ipv4` is set.
    pub const HAS_V4: u32 = 1;
    /// `ipv6` is set.
    pub const HAS_V6: u32 = 2;
    /// `mac` is set (an Ethernet interface).
    pub const HAS_MAC: u32 = 4;
}

/// Conntrack key: the flow's tuple in its original direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Source port (ICMP echo: identifier), network byte order.
    pub sport: [u8; 2],
    /// Destination port (ICMP echo: identifier), network byte order.
    pub dport: [u8; 2],
    /// Zero.
    pub _pad: [u8; 2],
    /// Source address, network byte order.
    pub saddr: [u8; 16],
    /// Destination address, network byte order.
    pub daddr: [u8; 16],
}

/// Packet marks (`skb->mark`, bits `MASK`) between the datapath, the node's routing and the proxy.
pub mod mark {
    /// The bits Porin uses.
    pub const MASK: u32 = 0xf00;
    /// Set by the tc program on a packet it assigned to a proxy socket: the node routes it locally
    /// (`ip rule add fwmark 0x200/0xf00 lookup 2004 pref 9`, `local 0.0.0.0/0 dev lo table 2004`,
    /// the agent's policy routing).
    pub const TO_PROXY: u32 = 0x200;
    /// The routing table of what is marked [`TO_PROXY`]: one local default route.
    pub const PROXY_TABLE: u32 = 2004;
    /// The preference of the rule that sends [`TO_PROXY`] to [`PROXY_TABLE`] (before `main`).
    pub const PROXY_RULE_PRIORITY: u32 = 9;
    /// Set by the proxy (`SO_MARK`) on its upstream connections: already judged, never redirected.
    pub const FROM_PROXY: u32 = 0x400;
}

/// Proxy listener ids (`PolicyValue::listener`): which of the proxy's listeners a redirected flow goes
/// to. The agent maps L7 parsers to them, the proxy its listeners.
pub mod listener {
    /// HTTP/1.1, HTTP/2 and gRPC.
    pub const HTTP: u8 = 1;
    /// Kafka.
    pub const KAFKA: u8 = 2;
    /// DNS.
    pub const DNS: u8 = 3;
    /// The mTLS tunnel to other nodes' proxies: TCP flows to another node's endpoint whose flows
    /// must come authenticated, relayed as they are (no L7 rule of the source's asks for them).
    pub const TUNNEL: u8 = 4;
}

/// Index of a proxy listener in [`names::PROXY`] (TCP) and [`names::PROXY_UDP`]: one IPv4 and one
/// IPv6 socket per listener id.
pub const fn proxy_index(listener: u8, v6: bool) -> u32 {
    listener as u32 * 2 + v6 as u32
}

/// Most FQDN selector identities one learned address carries in [`FqdnValue`].
pub const FQDN_MAX_SELECTORS: usize = 15;

/// [`names::FQDN`] key: an address the DNS proxy learned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnKey {
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 3],
    /// Address, network byte order (IPv4 in the first 4 bytes, the rest zero).
    pub addr: [u8; 16],
}

/// [`names::FQDN`] value: the FQDN selector identities of the names the address was learned under
/// (sorted, host byte order). A flow to the address is judged as if it were each of them as well as
/// its own identity (`datapath::combine`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FqdnValue {
    /// How many of `selectors` are set.
    pub count: u32,
    /// Selector identities.
    pub selectors: [u32; FQDN_MAX_SELECTORS],
}

/// Conntrack flags.
pub mod ct_flag {
    /// A packet in the reply direction was seen.
    pub const SEEN_REPLY: u32 = 1;
    /// FIN seen in the original direction.
    pub const FIN_FWD: u32 = 2;
    /// FIN seen in the reply direction.
    pub const FIN_REV: u32 = 4;
    /// RST seen.
    pub const RST: u32 = 8;
    /// The flow goes through the proxy.
    pub const PROXIED: u32 = 16;
    /// Bits 8–15: the proxy listener id of a PROXIED flow without connections (UDP): its later
    /// packets go to that listener again.
    pub const LISTENER_SHIFT: u32 = 8;
    /// Mask of the listener bits.
    pub const LISTENER_MASK: u32 = 0xff00;
}

/// Conntrack value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// Creation time, `bpf_ktime_get_ns`.
    pub created_ns: u64,
    /// Last packet, `bpf_ktime_get_ns`.
    pub last_seen_ns: u64,
    /// [`ct_flag`] bits.
    pub flags: u32,
    /// Source identity when created.
    pub src_identity: u32,
    /// Destination identity when created.
    pub dst_identity: u32,
    /// Rule that allowed it.
    pub rule: u32,
}

/// Event kinds.
pub mod event_kind {
    /// A packet was dropped.
    pub const DROP: u8 = 1;
    /// A new flow was judged and allowed (or redirected).
    pub const VERDICT: u8 = 2;
    /// Policy would have dropped a new flow (`reason` says why); the endpoint's policy is in audit
    /// mode, so it passed.
    pub const AUDIT: u8 = 3;
}

/// Bits of [`PolicyValue::flags`].
pub mod policy_flag {
    /// The endpoint's policy is in audit mode (Cilium's `policy-audit-mode`): a policy drop
    /// ([`super::reason::POLICY_DENIED`], [`super::reason::POLICY_DENY`]) is reported and the flow
    /// passes. Every other drop (spoofing, a missing proxy, a bypass) still drops.
    pub const AUDIT: u8 = 1;
    /// A redirect for L7 visibility only (no L7 rule asks for it): where the proxy cannot take the
    /// flow (no listener; a flow from the host, which `porin_to_ep` cannot hand over) it passes as
    /// the allow it is, instead of failing closed.
    pub const VISIBILITY: u8 = 2;
    /// What the entry allows must come authenticated (`authentication: {mode: required}`): a new
    /// flow from outside the node's endpoints (another node, the host, the world) that does not
    /// come from the proxy (which judged an authenticated tunnel stream) is dropped with
    /// [`super::reason::AUTH_REQUIRED`]. Flows between the node's own endpoints are authentic
    /// (the node's kernel knows their interfaces).
    pub const AUTH: u8 = 4;
}

/// An event in [`names::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    /// [`event_kind`].
    pub kind: u8,
    /// [`reason`].
    pub reason: u8,
    /// [`direction`] of the policy that decided (0 when none).
    pub direction: u8,
    /// IP protocol number.
    pub proto: u8,
    /// [`family`].
    pub family: u8,
    /// [`verdict`] of the policy lookup (0 when none).
    pub verdict: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// Endpoint whose policy decided, host byte order.
    pub endpoint: u32,
    /// Source identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// Rule id (0 = none).
    pub rule: u32,
    /// Source port, network byte order.
    pub sport: [u8; 2],
    /// Destination port (ICMP: type), network byte order.
    pub dport: [u8; 2],
    /// Interface the packet was seen on.
    pub ifindex: u32,
    /// Source address, network byte order.
    pub saddr: [u8; 16],
    /// Destination address, network byte order.
    pub daddr: [u8; 16],
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
}

impl Event {
    /// Decodes an event from ring-buffer bytes (native byte order, as the kernel wrote it).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        fn arr<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
            b.get(at..at + N)?.try_into().ok()
        }
        let u32_at = |at| arr::<4>(b, at).map(u32::from_ne_bytes);
        Some(Self {
            kind: *b.first()?,
            reason: *b.get(1)?,
            direction: *b.get(2)?,
            proto: *b.get(3)?,
            family: *b.get(4)?,
            verdict: *b.get(5)?,
            _pad: [0; 2],
            endpoint: u32_at(8)?,
            src_identity: u32_at(12)?,
            dst_identity: u32_at(16)?,
            rule: u32_at(20)?,
            sport: arr(b, 24)?,
            dport: arr(b, 26)?,
            ifindex: u32_at(28)?,
            saddr: arr(b, 32)?,
            daddr: arr(b, 48)?,
            ts_ns: arr::<8>(b, 64).map(u64::from_ne_bytes)?,
        })
    }
}

const _: () = assert!(size_of::<IpcacheKey>() == 20);
const _: () = assert!(size_of::<IpcacheValue>() == 12);
const _: () = assert!(size_of::<PolicyKey>() == 16);
const _: () = assert!(size_of::<PolicyValue>() == 8);
const _: () = assert!(size_of::<IfaceValue>() == 40);
const _: () = assert!(size_of::<CtKey>() == 40);
const _: () = assert!(size_of::<CtValue>() == 32);
const _: () = assert!(size_of::<Event>() == 72);
const _: () = assert!(size_of::<FqdnKey>() == 20);
const _: () = assert!(size_of::<FqdnValue>() == 64);

#[cfg(feature = "user")]
mod user {
    //! `aya::Pod` for the map types: they are `#[repr(C)]`, `Copy`, without padding or invalid bit
    //! patterns (checked by the size assertions above).
    #![allow(unsafe_code, reason = "Pod is an unsafe marker trait")]
    use super::*;

    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for IfaceValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for FqdnKey {}
    unsafe impl aya::Pod for FqdnValue {}
    unsafe impl aya::Pod for lb::Addr {}
    unsafe impl aya::Pod for lb::ServiceKey {}
    unsafe impl aya::Pod for lb::ServiceValue {}
    unsafe impl aya::Pod for lb::BackendKey {}
    unsafe impl aya::Pod for lb::MemberKey {}
    unsafe impl aya::Pod for lb::AffinityKey {}
    unsafe impl aya::Pod for lb::AffinityValue {}
    unsafe impl aya::Pod for lb::RevKey {}
}
