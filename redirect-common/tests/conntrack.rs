//! The datapath's decisions ([`redirect_common::datapath`], the code the tc programs run) driven by
//! a model of the node: a client pod T, a server pod D whose port 80 needs the L7 proxy, the proxy's
//! sockets, a clock and LRU eviction. Random interleavings of client, proxy and server packets on
//! equal tuples — the proxy's upstream ports are drawn from the same few ports the client uses —
//! must never let a client packet of the L7 flow reach the server, nor leave a non-proxied
//! conntrack entry for it.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use redirect_common::datapath::{self, Action, Decision, Kernel, Packet, proto, tcp};
use redirect_common::{
    CtKey, CtValue, FQDN_MAX_SELECTORS, FqdnValue, IfaceValue, IpcacheValue, PolicyKey, PolicyValue, ct_flag,
    direction, event_kind, family, iface_flag, ipcache_flag, listener, mark, policy_flag, reason, verdict,
};

const T_IP: [u8; 4] = [10, 0, 0, 1];
const D_IP: [u8; 4] = [10, 0, 0, 2];
const T_EP: u32 = 1;
const D_EP: u32 = 2;
const T_ID: u32 = 1001;
const D_ID: u32 = 1002;
/// The server port whose flows need the proxy.
const L7_PORT: u16 = 80;
/// A server port allowed without the proxy.
const L4_PORT: u16 = 81;
const NS: u64 = 1_000_000_000;
/// Another node's endpoint whose flows must come authenticated (its ipcache entry says: tunnel).
const R_IP: [u8; 4] = [10, 0, 1, 7];
const R_ID: u32 = 1003;
/// D's port whose allow (from T and R) requires authentication.
const AUTH_PORT: u16 = 8080;

fn addr(ip: [u8; 4]) -> [u8; 16] {
    let mut a = [0; 16];
    a[..4].copy_from_slice(&ip);
    a
}

fn packet(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Packet {
    Packet {
        family: family::V4,
        proto: proto::TCP,
        saddr: addr(src.0),
        daddr: addr(dst.0),
        sport: src.1,
        dport: dst.1,
        tcp_flags: flags,
        ct_ports: Some((src.1, dst.1)),
    }
}

/// A socket of the node's network namespace (the proxy's), by (local, remote).
type Sock = (([u8; 4], u16), ([u8; 4], u16));

/// The DNS server's port (T's egress to D sends it to the DNS proxy).
const DNS_PORT: u16 = 53;
/// An address outside the cluster (world).
const W_IP: [u8; 4] = [192, 0, 2, 7];
/// FQDN selector identities in T's egress policy towards learned addresses: port 80 through the
/// HTTP proxy; ports 80 and 443 allowed; port 22 denied; port 80 through the Kafka proxy.
const S_HTTP: u32 = 0x0140_0000;
const S_ALLOW: u32 = 0x0140_0001;
const S_DENY: u32 = 0x0140_0002;
const S_KAFKA: u32 = 0x0140_0003;

/// The node: conntrack, the proxy's sockets, the clock; which interface and mark the packet has.
#[derive(Default)]
struct Node {
    now: u64,
    ct: BTreeMap<CtKey, CtValue>,
    /// Open proxy sockets; the bool: TIME_WAIT.
    sockets: BTreeMap<Sock, bool>,
    /// The DNS proxy's connected upstream UDP sockets.
    udp_sockets: BTreeSet<Sock>,
    /// Datagrams the DNS proxy's UDP listener received.
    udp_received: usize,
    listener_up: bool,
    iface: u32,
    mark: u32,
    /// What the DNS proxy learned.
    fqdn: BTreeMap<[u8; 16], FqdnValue>,
    /// Every endpoint's policy in audit mode.
    audit: bool,
    /// Events reported: (kind, reason).
    events: Vec<(u8, u8)>,
    /// D's ingress from T on the L4 port is redirected for visibility only.
    visibility: bool,
    /// SYNs handed to a TIME_WAIT socket.
    time_wait_syns: usize,
}

fn learned(selectors: &[u32]) -> FqdnValue {
    let mut v = FqdnValue { count: u32::try_from(selectors.len()).unwrap(), selectors: [0; FQDN_MAX_SELECTORS] };
    v.selectors[..selectors.len()].copy_from_slice(selectors);
    v
}

impl Kernel for Node {
    fn now_ns(&self) -> u64 {
        self.now
    }
    fn config(&self, _index: u32, default: u32) -> u32 {
        default
    }
    fn ipcache(&self, _generation: u8, _family: u8, a: &[u8; 16]) -> Option<IpcacheValue> {
        match a[..4] {
            [10, 0, 0, 1] => Some(IpcacheValue { identity: T_ID, endpoint: T_EP, flags: 0 }),
            [10, 0, 0, 2] => Some(IpcacheValue { identity: D_ID, endpoint: D_EP, flags: 0 }),
            [10, 0, 1, 7] => Some(IpcacheValue { identity: R_ID, endpoint: 0, flags: ipcache_flag::TUNNEL }),
            _ => None,
        }
    }
    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
        let flags = if self.audit { redirect_common::policy_flag::AUDIT } else { 0 };
        self.policy_table(key).map(|v| PolicyValue { flags: v.flags | flags, ..v })
    }
    fn fqdn(&self, _family: u8, a: &[u8; 16]) -> Option<&FqdnValue> {
        self.fqdn.get(a)
    }
    fn iface(&self) -> Option<IfaceValue> {
        let ip = if self.iface == T_EP { T_IP } else { D_IP };
        Some(IfaceValue {
            endpoint: self.iface,
            flags: iface_flag::HAS_V4,
            ipv4: ip,
            bridge: 0,
            ipv6: [0; 16],
            mac: [0; 6],
            _pad_mac: [0; 2],
        })
    }
    fn mark(&self) -> u32 {
        self.mark
    }
    fn ct_get(&mut self, key: &CtKey) -> Option<&mut CtValue> {
        self.ct.get_mut(key)
    }
    fn ct_insert(&mut self, key: &CtKey, value: &CtValue) {
        self.ct.insert(*key, *value);
    }
    fn ct_remove(&mut self, key: &CtKey) {
        self.ct.remove(key);
    }
    fn assign_proxy_socket(&mut self, pkt: &Packet, syn_listener: Option<u8>) -> bool {
        self.assign_socket(pkt, syn_listener)
    }
    fn assign_proxy_listener(&mut self, pkt: &Packet, id: u8) -> bool {
        self.assign_listener(pkt, id)
    }
    fn count(&mut self, _index: u32) {}
    fn emit(&mut self, kind: u8, why: u8, _pkt: &Packet, _d: &Decision) {
        self.events.push((kind, why));
    }
}

impl Node {
    /// The policy map's contents (without audit flags).
    fn policy_table(&self, key: &PolicyKey) -> Option<PolicyValue> {
        let allow = PolicyValue { verdict: verdict::ALLOW, listener: 0, flags: 0, _pad: 0, rule: 1 };
        let v = |verdict, listener| Some(PolicyValue { verdict, listener, flags: 0, _pad: 0, rule: 3 });
        let port = u16::from_be_bytes(key.dport);
        // T's egress: DNS to D through the DNS proxy; world only by FQDN selectors.
        if key.endpoint == T_EP && key.direction == direction::EGRESS {
            match (key.identity, key.proto, port) {
                (D_ID, proto::UDP | proto::TCP, DNS_PORT) => return v(verdict::REDIRECT, listener::DNS),
                (S_HTTP, proto::TCP, 80) => return v(verdict::REDIRECT, listener::HTTP),
                (S_KAFKA, proto::TCP, 80) => return v(verdict::REDIRECT, listener::KAFKA),
                (S_ALLOW, proto::TCP, 80 | 443) => return v(verdict::ALLOW, 0),
                (S_DENY, proto::TCP, 22) => return v(verdict::DROP_DENY, 0),
                (redirect_common::identity::WORLD_IPV4, _, _) | (S_HTTP | S_ALLOW | S_DENY | S_KAFKA, _, _) => {
                    return v(verdict::DROP_NO_ALLOW, 0);
                }
                _ => {}
            }
        }
        // D's ingress from T: port 80 through the proxy, port 81 allowed. Everything else of
        // every direction is allowed: the most a stray packet could ride on.
        if key.endpoint == D_EP
            && key.direction == direction::INGRESS
            && matches!(key.identity, T_ID | R_ID)
            && u16::from_be_bytes(key.dport) == AUTH_PORT
        {
            return Some(PolicyValue { flags: policy_flag::AUTH, ..allow });
        }
        if key.endpoint == D_EP && key.direction == direction::INGRESS && key.identity == T_ID {
            return match u16::from_be_bytes(key.dport) {
                L7_PORT => Some(PolicyValue { verdict: verdict::REDIRECT, listener: 1, flags: 0, _pad: 0, rule: 2 }),
                L4_PORT if self.visibility => Some(PolicyValue {
                    verdict: verdict::REDIRECT,
                    listener: listener::HTTP,
                    flags: redirect_common::policy_flag::VISIBILITY,
                    _pad: 0,
                    rule: 1,
                }),
                L4_PORT => Some(allow),
                _ => None,
            };
        }
        (key.identity == 0).then_some(allow)
    }
    fn assign_socket(&mut self, pkt: &Packet, syn_listener: Option<u8>) -> bool {
        let local = (ip4(&pkt.daddr), pkt.dport);
        let remote = (ip4(&pkt.saddr), pkt.sport);
        if pkt.proto == proto::UDP {
            return self.udp_sockets.contains(&(local, remote));
        }
        match (self.sockets.get(&(local, remote)), syn_listener) {
            (Some(true), Some(id)) if pkt.opens_connection() => {
                // The kernel's TIME_WAIT path: the listener's lookup finds `id`, which takes the
                // SYN, and the TIME_WAIT socket goes; without the listener the TIME_WAIT socket
                // answers (an ACK) and the SYN goes no further.
                self.time_wait_syns += 1;
                if self.listener_up {
                    self.sockets.remove(&(local, remote));
                    self.assign_listener(pkt, id);
                }
                true
            }
            (Some(true), _) => !pkt.opens_connection(),
            (Some(false), _) => true,
            (None, _) => false,
        }
    }
    fn assign_listener(&mut self, pkt: &Packet, id: u8) -> bool {
        if !self.listener_up {
            return false;
        }
        if pkt.proto == proto::UDP {
            assert_eq!(id, listener::DNS);
            self.udp_received += 1;
            return true;
        }
        assert!(id == listener::HTTP || id == listener::DNS || id == listener::KAFKA || id == listener::TUNNEL);
        if pkt.opens_connection() {
            // The proxy accepts: its socket's local address is the original destination.
            self.sockets.insert(((ip4(&pkt.daddr), pkt.dport), (ip4(&pkt.saddr), pkt.sport)), false);
        }
        true
    }
}

fn ip4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Where a packet went.
#[derive(Debug, PartialEq)]
enum Fate {
    /// Into a proxy socket.
    Proxy,
    /// Dropped by one of the programs.
    Dropped(u8),
    /// Delivered to the other pod.
    Delivered,
}

impl Node {
    /// A packet from pod `from` (its veth's tc ingress), routed to the other pod's veth (tc egress).
    fn send_from_pod(&mut self, from: u32, pkt: &Packet) -> Fate {
        self.iface = from;
        self.mark = 0;
        match datapath::from_endpoint(self, pkt) {
            Action::Proxy => Fate::Proxy,
            Action::Drop(r) => Fate::Dropped(r),
            Action::Pass => self.send_to_pod(if from == T_EP { D_EP } else { T_EP }, pkt, 0),
        }
    }

    /// A packet from the node (the proxy, marked or not) to a pod.
    fn send_to_pod(&mut self, to: u32, pkt: &Packet, mark: u32) -> Fate {
        self.iface = to;
        self.mark = mark;
        match datapath::to_endpoint(self, pkt) {
            Action::Pass => Fate::Delivered,
            Action::Drop(r) => Fate::Dropped(r),
            Action::Proxy => unreachable!("tc egress never assigns sockets"),
        }
    }

    /// Non-proxied entries of the L7 flow's tuples (client port `*` → D:80, or turned around).
    fn direct_l7_entries(&self) -> Vec<CtKey> {
        self.ct
            .iter()
            .filter(|(k, v)| {
                let (s, d) = (ip4(&k.saddr), ip4(&k.daddr));
                let (sp, dp) = (u16::from_be_bytes(k.sport), u16::from_be_bytes(k.dport));
                let l7 = (s == T_IP && d == D_IP && dp == L7_PORT) || (s == D_IP && d == T_IP && sp == L7_PORT);
                l7 && v.flags & ct_flag::PROXIED == 0
            })
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Ports both the client and the proxy's upstream connections use: collisions are the point.
const PORTS: [u16; 3] = [40000, 40001, 40002];

#[derive(Clone, Debug)]
enum Step {
    /// The client sends on (port → D:80 or D:81) with any flags (a raw socket can).
    Client { port: usize, l7: bool, flags: u8 },
    /// The proxy opens an upstream connection from T's address, the kernel picking `port`.
    ProxyConnect { port: usize },
    /// The proxy sends on its upstream connection (marked).
    ProxyUpstream { port: usize, flags: u8 },
    /// The proxy answers the client on the connection it accepted (not marked).
    ProxyAnswer { port: usize, flags: u8 },
    /// The server sends on (D:80 → port) with flags that do not open a connection.
    Server { port: usize, l7: bool, flags: u8 },
    /// A proxy socket of this port closes (or enters TIME_WAIT).
    Close { port: usize, upstream: bool, time_wait: bool },
    /// The proxy stops (its listener leaves the SOCKMAP) or starts.
    Listener { up: bool },
    /// Time passes.
    Tick { secs: u64 },
    /// Conntrack evicts an entry (LRU pressure).
    Evict { nth: usize },
}

fn flags() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(tcp::SYN),
        Just(tcp::SYN | tcp::ACK),
        Just(tcp::ACK),
        Just(tcp::ACK | tcp::FIN),
        Just(tcp::RST),
        Just(tcp::ACK | tcp::RST),
        any::<u8>(),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let port = 0..PORTS.len();
    prop_oneof![
        4 => (port.clone(), prop::bool::weighted(0.8), flags()).prop_map(|(port, l7, flags)| Step::Client { port, l7, flags }),
        2 => port.clone().prop_map(|port| Step::ProxyConnect { port }),
        2 => (port.clone(), flags()).prop_map(|(port, flags)| Step::ProxyUpstream { port, flags }),
        2 => (port.clone(), flags()).prop_map(|(port, flags)| Step::ProxyAnswer { port, flags }),
        3 => (port.clone(), prop::bool::weighted(0.8), flags().prop_filter("server packets do not open connections", |f| f & (tcp::SYN | tcp::ACK) != tcp::SYN))
            .prop_map(|(port, l7, flags)| Step::Server { port, l7, flags }),
        2 => (port, any::<bool>(), any::<bool>()).prop_map(|(port, upstream, time_wait)| Step::Close { port, upstream, time_wait }),
        1 => any::<bool>().prop_map(|up| Step::Listener { up }),
        2 => prop_oneof![0..3u64, 9..12u64, Just(61), Just(7 * 3600)].prop_map(|secs| Step::Tick { secs }),
        1 => (0..8usize).prop_map(|nth| Step::Evict { nth }),
    ]
}

/// Runs a sequence of steps and checks the properties after each.
fn run(steps: &[Step], audit: bool) -> Result<(), TestCaseError> {
    let mut node = Node { listener_up: true, now: 1_000 * NS, audit, ..Node::default() };
    for (i, s) in steps.iter().enumerate() {
        match *s {
            Step::Client { port, l7, flags } => {
                let dport = if l7 { L7_PORT } else { L4_PORT };
                let pkt = packet((T_IP, PORTS[port]), (D_IP, dport), flags);
                let fate = node.send_from_pod(T_EP, &pkt);
                // The L7 flow's client packets reach the proxy or nothing.
                prop_assert!(
                    !(l7 && fate == Fate::Delivered),
                    "step {i} {s:?}: a client packet of the L7 flow reached the server directly"
                );
            }
            Step::ProxyConnect { port } => {
                let sock = ((T_IP, PORTS[port]), (D_IP, L7_PORT));
                if let std::collections::btree_map::Entry::Vacant(e) = node.sockets.entry(sock) {
                    e.insert(false);
                    let syn = packet((T_IP, PORTS[port]), (D_IP, L7_PORT), tcp::SYN);
                    prop_assert_eq!(node.send_to_pod(D_EP, &syn, mark::FROM_PROXY), Fate::Delivered);
                }
            }
            Step::ProxyUpstream { port, flags } => {
                if node.sockets.get(&((T_IP, PORTS[port]), (D_IP, L7_PORT))) == Some(&false) {
                    let pkt = packet((T_IP, PORTS[port]), (D_IP, L7_PORT), flags & !tcp::SYN | tcp::ACK);
                    prop_assert_eq!(node.send_to_pod(D_EP, &pkt, mark::FROM_PROXY), Fate::Delivered);
                }
            }
            Step::ProxyAnswer { port, flags } => {
                if node.sockets.get(&((D_IP, L7_PORT), (T_IP, PORTS[port]))) == Some(&false) {
                    let pkt = packet((D_IP, L7_PORT), (T_IP, PORTS[port]), flags & !tcp::SYN | tcp::ACK);
                    node.send_to_pod(T_EP, &pkt, 0);
                }
            }
            Step::Server { port, l7, flags } => {
                let sport = if l7 { L7_PORT } else { L4_PORT };
                let upstream = node.sockets.get(&((T_IP, PORTS[port]), (D_IP, sport))) == Some(&false);
                let pkt = packet((D_IP, sport), (T_IP, PORTS[port]), flags);
                let fate = node.send_from_pod(D_EP, &pkt);
                // The server's answers to the proxy's upstream connection never reach the client.
                prop_assert!(
                    !(upstream && fate == Fate::Delivered),
                    "step {i} {s:?}: the server's packet for the proxy's upstream reached the client"
                );
            }
            Step::Close { port, upstream, time_wait } => {
                let sock = if upstream {
                    ((T_IP, PORTS[port]), (D_IP, L7_PORT))
                } else {
                    ((D_IP, L7_PORT), (T_IP, PORTS[port]))
                };
                if time_wait && node.sockets.contains_key(&sock) {
                    node.sockets.insert(sock, true);
                } else {
                    node.sockets.remove(&sock);
                }
            }
            Step::Listener { up } => node.listener_up = up,
            Step::Tick { secs } => node.now += secs * NS,
            Step::Evict { nth } => {
                if let Some(k) = node.ct.keys().nth(nth).copied() {
                    node.ct.remove(&k);
                }
            }
        }
        let direct = node.direct_l7_entries();
        prop_assert!(direct.is_empty(), "step {i} {s:?}: non-proxied conntrack entries for the L7 flow: {direct:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, max_shrink_iters: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn an_l7_flow_reaches_its_server_only_through_the_proxy(steps in prop::collection::vec(step(), 1..120), audit: bool) {
        // Audit mode lets policy drops through; it never lets an L7 flow past the proxy.
        run(&steps, audit)?;
    }
}

/// The sequence the load found: the proxy's upstream gets the client's own port, the
/// server and the proxy answer, the sockets close, and the client's next SYN on that port must be
/// judged again (before: it rode a direct entry created by the answers, and reached the server).
#[test]
fn the_upstream_taking_the_clients_port_opens_no_bypass() {
    let mut node = Node { listener_up: true, now: NS, ..Node::default() };
    let p = PORTS[0];
    let client = |f| packet((T_IP, p), (D_IP, L7_PORT), f);
    let answer = |f| packet((D_IP, L7_PORT), (T_IP, p), f);
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::SYN)), Fate::Proxy);
    assert_eq!(node.send_to_pod(T_EP, &answer(tcp::SYN | tcp::ACK), 0), Fate::Delivered);
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::ACK)), Fate::Proxy);
    // Upstream from the same port: the client's entry stays PROXIED.
    node.sockets.insert(((T_IP, p), (D_IP, L7_PORT)), false);
    assert_eq!(node.send_to_pod(D_EP, &client(tcp::SYN), mark::FROM_PROXY), Fate::Delivered);
    let key = client(0).ct_key(false).unwrap();
    assert_ne!(node.ct[&key].flags & ct_flag::PROXIED, 0, "the upstream SYN left the client's entry alone");
    // The server answers the upstream: to the proxy's socket; the proxy answers the client.
    assert_eq!(node.send_from_pod(D_EP, &answer(tcp::SYN | tcp::ACK)), Fate::Proxy);
    assert_eq!(node.send_to_pod(T_EP, &answer(tcp::ACK | tcp::FIN), 0), Fate::Delivered);
    // Everything closes and the entries lapse; stray answers keep coming.
    node.sockets.clear();
    node.now += 20 * NS;
    assert_eq!(node.send_to_pod(T_EP, &answer(tcp::ACK), 0), Fate::Delivered, "allowed stray passes");
    // The server's stray on the tuple of a proxied flow: the proxy's or nothing (rule 3).
    assert_eq!(node.send_from_pod(D_EP, &answer(tcp::ACK | tcp::FIN)), Fate::Dropped(reason::PROXY_UNAVAILABLE));
    node.ct.clear();
    assert_eq!(node.send_from_pod(D_EP, &answer(tcp::ACK | tcp::FIN)), Fate::Delivered, "allowed stray passes");
    assert!(node.direct_l7_entries().is_empty(), "strays created no state: {:?}", node.direct_l7_entries());
    // The next connection from that port is judged, and goes to the proxy.
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::SYN)), Fate::Proxy);
    // A segment that does not open a connection, with no proxy socket, is dropped.
    node.sockets.clear();
    node.ct.clear();
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::ACK)), Fate::Dropped(reason::NO_PROXY_CONNECTION));
}

/// The client reuses its port for a new connection while the proxy's socket of the last one on
/// that tuple is in TIME_WAIT (the proxy closed first): the SYN goes to the TIME_WAIT socket for
/// the kernel's TIME_WAIT path to hand to the listener, and the rest of the handshake reaches the
/// new connection. Without the listener the SYN goes nowhere, never to the server.
#[test]
fn a_reused_port_meets_the_proxys_time_wait_socket() {
    let mut node = Node { listener_up: true, now: NS, ..Node::default() };
    let p = PORTS[0];
    let client = |f| packet((T_IP, p), (D_IP, L7_PORT), f);
    let accepted = ((D_IP, L7_PORT), (T_IP, p));
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::SYN)), Fate::Proxy);
    assert_eq!(node.sockets.get(&accepted), Some(&false));
    // The proxy closed first: its accepted socket waits.
    node.sockets.insert(accepted, true);
    node.now += NS;
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::SYN)), Fate::Proxy);
    assert_eq!(node.time_wait_syns, 1);
    assert_eq!(node.sockets.get(&accepted), Some(&false), "the listener took the SYN; TIME_WAIT retired");
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::ACK)), Fate::Proxy);
    // Again, with the proxy down: the SYN ends at the TIME_WAIT socket.
    node.sockets.insert(accepted, true);
    node.listener_up = false;
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::SYN)), Fate::Proxy);
    assert_eq!(node.sockets.get(&accepted), Some(&true));
    // A segment that is not a SYN still reaches the TIME_WAIT socket (it answers or resets it).
    assert_eq!(node.send_from_pod(T_EP, &client(tcp::ACK)), Fate::Proxy);
    assert!(node.direct_l7_entries().is_empty());
}

/// A direct flow is tracked by its SYN and its answers ride it; a stray segment creates nothing.
#[test]
fn direct_flows_are_opened_by_their_syn_only() {
    let mut node = Node { listener_up: true, now: NS, ..Node::default() };
    let out = |f| packet((T_IP, 40000), (D_IP, L4_PORT), f);
    let back = |f| packet((D_IP, L4_PORT), (T_IP, 40000), f);
    assert_eq!(node.send_from_pod(T_EP, &out(tcp::ACK)), Fate::Delivered);
    assert!(node.ct.is_empty(), "a non-SYN segment created an entry");
    assert_eq!(node.send_from_pod(T_EP, &out(tcp::SYN)), Fate::Delivered);
    assert_eq!(node.ct.len(), 1);
    assert_eq!(node.send_from_pod(D_EP, &back(tcp::SYN | tcp::ACK)), Fate::Delivered);
    let flags = node.ct.values().next().unwrap().flags;
    assert_ne!(flags & ct_flag::SEEN_REPLY, 0);
    let all: BTreeSet<_> = node.ct.keys().copied().collect();
    assert_eq!(all.len(), 1, "one entry per flow");
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Packet {
    Packet { proto: proto::UDP, tcp_flags: 0, ..packet(src, dst, 0) }
}

/// DNS over UDP: the client's datagrams reach the DNS proxy's listener (the first one judged, the
/// rest by their PROXIED entry), never the server; the server's answers reach the proxy's upstream
/// socket, also when the kernel gave that socket the client's own port; the proxy's answers reach
/// the client; a server datagram no proxy socket waits for is dropped, not delivered.
#[test]
fn dns_over_udp_goes_through_the_proxy_both_ways() {
    let mut node = Node { listener_up: true, now: NS, ..Node::default() };
    let query = udp((T_IP, 5000), (D_IP, DNS_PORT));
    assert_eq!(node.send_from_pod(T_EP, &query), Fate::Proxy);
    let key = query.ct_key(false).unwrap();
    assert_ne!(node.ct[&key].flags & ct_flag::PROXIED, 0);
    assert_eq!((node.ct[&key].flags & ct_flag::LISTENER_MASK) >> ct_flag::LISTENER_SHIFT, u32::from(listener::DNS));
    // The client's next datagram on the same tuple: to the listener again.
    assert_eq!(node.send_from_pod(T_EP, &query), Fate::Proxy);
    assert_eq!(node.udp_received, 2);
    // The proxy forwards from the client's address (marked): the server gets it.
    for upstream_port in [6000, 5000] {
        node.udp_sockets.insert(((T_IP, upstream_port), (D_IP, DNS_PORT)));
        let fwd = udp((T_IP, upstream_port), (D_IP, DNS_PORT));
        assert_eq!(node.send_to_pod(D_EP, &fwd, mark::FROM_PROXY), Fate::Delivered);
        // The server answers the upstream socket: the proxy gets it, not the client.
        let answer = udp((D_IP, DNS_PORT), (T_IP, upstream_port));
        assert_eq!(node.send_from_pod(D_EP, &answer), Fate::Proxy, "upstream port {upstream_port}");
        node.udp_sockets.clear();
    }
    // The proxy answers the client from the server's address (marked).
    let reply = udp((D_IP, DNS_PORT), (T_IP, 5000));
    assert_eq!(node.send_to_pod(T_EP, &reply, mark::FROM_PROXY), Fate::Delivered);
    // A server datagram to the client's port that no proxy socket waits for: dropped (it would
    // be an answer the proxy never judged).
    assert_eq!(node.send_from_pod(D_EP, &reply), Fate::Dropped(reason::PROXY_UNAVAILABLE));
    // Without the proxy the client's datagrams go nowhere.
    node.listener_up = false;
    assert_eq!(node.send_from_pod(T_EP, &query), Fate::Dropped(reason::PROXY_UNAVAILABLE));
    assert_eq!(
        node.send_from_pod(T_EP, &udp((T_IP, 5001), (D_IP, DNS_PORT))),
        Fate::Dropped(reason::PROXY_UNAVAILABLE)
    );
    assert!(node.direct_l7_entries().is_empty());
}

/// Egress to an address learned from DNS is judged on its own identity and its names' FQDN
/// selector identities, combined as the policy engine merges them.
#[test]
fn fqdn_selectors_judge_egress_to_learned_addresses() {
    let mut node = Node { listener_up: true, now: NS, iface: T_EP, ..Node::default() };
    let syn = |port| packet((T_IP, 40000), (W_IP, port), tcp::SYN);
    let verdict_for = |node: &mut Node, sels: &[u32], port: u16| {
        node.ct.clear();
        node.sockets.clear();
        node.fqdn.clear();
        if !sels.is_empty() {
            node.fqdn.insert(addr(W_IP), learned(sels));
        }
        node.iface = T_EP;
        datapath::from_endpoint(node, &syn(port))
    };
    assert_eq!(verdict_for(&mut node, &[], 80), Action::Drop(reason::POLICY_DENIED), "not learned: world, dropped");
    assert_eq!(verdict_for(&mut node, &[S_HTTP], 80), Action::Proxy);
    assert_eq!(verdict_for(&mut node, &[S_HTTP], 443), Action::Drop(reason::POLICY_DENIED));
    assert_eq!(verdict_for(&mut node, &[S_ALLOW], 443), Action::Pass);
    assert_eq!(verdict_for(&mut node, &[S_ALLOW, S_HTTP], 80), Action::Proxy, "a redirect wins over an allow");
    assert_eq!(verdict_for(&mut node, &[S_ALLOW, S_DENY], 22), Action::Drop(reason::POLICY_DENY));
    assert_eq!(verdict_for(&mut node, &[S_DENY, S_ALLOW], 443), Action::Pass, "the deny is for port 22 only");
    assert_eq!(
        verdict_for(&mut node, &[S_HTTP, S_KAFKA], 80),
        Action::Drop(reason::POLICY_DENIED),
        "two parsers for one flow: fail closed"
    );
}

/// Audit mode: a flow policy drops is reported (`AUDIT`, with the reason) and passes, tracked like
/// an allowed one; drops that are not policy's still drop.
#[test]
fn audit_mode_reports_policy_drops_and_lets_them_pass() {
    let world = [203, 0, 113, 5];
    let out = |f| packet((T_IP, 40000), (world, 80), f);
    let mut node = Node { listener_up: true, now: NS, ..Node::default() };
    assert_eq!(node.send_from_pod(T_EP, &out(tcp::SYN)), Fate::Dropped(reason::POLICY_DENIED));
    assert_eq!(node.events, vec![(event_kind::DROP, reason::POLICY_DENIED)]);

    let mut node = Node { listener_up: true, now: NS, audit: true, ..Node::default() };
    node.iface = T_EP;
    assert_eq!(datapath::from_endpoint(&mut node, &out(tcp::SYN)), Action::Pass);
    assert_eq!(node.events, vec![(event_kind::AUDIT, reason::POLICY_DENIED)]);
    assert_eq!(node.ct.len(), 1, "tracked like an allowed flow");
    assert_eq!(datapath::from_endpoint(&mut node, &out(tcp::ACK)), Action::Pass);
    assert_eq!(node.events.len(), 1, "its later packets ride the entry");
    // A deny rule is audited too, with its own reason.
    node.fqdn.insert(addr(world), learned(&[S_DENY]));
    let ssh = packet((T_IP, 40001), (world, 22), tcp::SYN);
    assert_eq!(datapath::from_endpoint(&mut node, &ssh), Action::Pass);
    assert_eq!(node.events.last(), Some(&(event_kind::AUDIT, reason::POLICY_DENY)));
    // A spoofed source is not policy's to audit.
    let spoofed = packet(([10, 0, 0, 9], 40002), (world, 80), tcp::SYN);
    assert_eq!(datapath::from_endpoint(&mut node, &spoofed), Action::Drop(reason::INVALID_SOURCE));
    // An L7 flow still goes to the proxy, and its bypass still drops.
    assert_eq!(node.send_from_pod(T_EP, &packet((T_IP, 40003), (D_IP, L7_PORT), tcp::SYN)), Fate::Proxy);
    assert_eq!(
        node.send_to_pod(D_EP, &packet((T_IP, 40003), (D_IP, L7_PORT), tcp::ACK), 0),
        Fate::Dropped(reason::BYPASSES_PROXY)
    );
}

/// A redirect for visibility only goes to the proxy when it can take the flow, and otherwise
/// passes as the allow it is; a rule's redirect fails closed.
#[test]
fn visibility_redirects_never_drop_what_is_allowed() {
    let to = |port| packet((T_IP, 40000), (D_IP, port), tcp::SYN);
    let mut node = Node { listener_up: true, now: NS, visibility: true, ..Node::default() };
    assert_eq!(node.send_from_pod(T_EP, &to(L4_PORT)), Fate::Proxy);
    let mut node = Node { listener_up: false, now: NS, visibility: true, ..Node::default() };
    assert_eq!(node.send_from_pod(T_EP, &to(L4_PORT)), Fate::Delivered, "no listener: allowed, unparsed");
    assert_eq!(node.send_from_pod(T_EP, &to(L7_PORT)), Fate::Dropped(reason::PROXY_UNAVAILABLE));
    // From outside the endpoints (the host's address is T's here: what matters is the missing
    // entry), at the pod's tc egress where nothing can be handed to the proxy.
    let mut node = Node { listener_up: true, now: NS, visibility: true, ..Node::default() };
    assert_eq!(node.send_to_pod(D_EP, &to(L4_PORT), 0), Fate::Delivered);
    assert_eq!(
        node.send_to_pod(D_EP, &packet((T_IP, 40001), (D_IP, L7_PORT), tcp::SYN), 0),
        Fate::Dropped(reason::PROXY_UNAVAILABLE)
    );
}

/// `authentication: {mode: required}`: a flow that must come authenticated reaches the endpoint
/// from another node only from the proxy (which relays the authenticated tunnel); between the
/// node's own endpoints it is authentic; to another node's endpoint that wants it, TCP goes to
/// the tunnel listener.
#[test]
fn flows_that_must_come_authenticated_come_through_the_tunnel() {
    let from_r = |port, f| packet((R_IP, 40000), (D_IP, port), f);
    let mut node = Node { listener_up: true, now: NS, ..Node::default() };
    // Arriving in plain from another node: not taken by the uplink's program, dropped at the pod.
    assert_eq!(datapath::from_world(&mut node, &from_r(AUTH_PORT, tcp::SYN)), Action::Pass);
    assert_eq!(node.send_to_pod(D_EP, &from_r(AUTH_PORT, tcp::SYN), 0), Fate::Dropped(reason::AUTH_REQUIRED));
    assert_eq!(node.events.last(), Some(&(event_kind::DROP, reason::AUTH_REQUIRED)));
    assert_eq!(node.send_to_pod(D_EP, &from_r(AUTH_PORT, tcp::ACK), 0), Fate::Dropped(reason::AUTH_REQUIRED));
    let mut udp_from_r = from_r(AUTH_PORT, 0);
    udp_from_r.proto = proto::UDP;
    udp_from_r.tcp_flags = 0;
    assert_eq!(node.send_to_pod(D_EP, &udp_from_r, 0), Fate::Dropped(reason::AUTH_REQUIRED));
    // The proxy's connection (it judged the authenticated stream) passes.
    assert_eq!(node.send_to_pod(D_EP, &from_r(AUTH_PORT, tcp::SYN), mark::FROM_PROXY), Fate::Delivered);
    // Between the node's own endpoints the flow is authentic.
    assert_eq!(node.send_from_pod(T_EP, &packet((T_IP, 40001), (D_IP, AUTH_PORT), tcp::SYN)), Fate::Delivered);
    // Audit mode reports the missing authentication and lets the flow on.
    let mut audit = Node { listener_up: true, now: NS, audit: true, ..Node::default() };
    assert_eq!(audit.send_to_pod(D_EP, &from_r(AUTH_PORT, tcp::SYN), 0), Fate::Delivered);
    assert_eq!(audit.events.last(), Some(&(event_kind::AUDIT, reason::AUTH_REQUIRED)));

    // T's TCP flows to R go to the tunnel listener; without it they drop (R's node would).
    let to_r = |sport, f| packet((T_IP, sport), (R_IP, 80), f);
    assert_eq!(node.send_from_pod(T_EP, &to_r(40010, tcp::SYN)), Fate::Proxy);
    let entry = node.ct.get(&to_r(40010, tcp::SYN).ct_key(false).unwrap()).unwrap();
    assert_eq!(entry.flags & ct_flag::PROXIED, ct_flag::PROXIED);
    assert_eq!((entry.flags & ct_flag::LISTENER_MASK) >> ct_flag::LISTENER_SHIFT, u32::from(listener::TUNNEL));
    assert_eq!(node.send_from_pod(T_EP, &to_r(40010, tcp::ACK)), Fate::Proxy, "rides its proxied entry");
    node.iface = T_EP;
    assert_eq!(
        datapath::from_endpoint(&mut node, &to_r(40011, tcp::ACK)),
        Action::Drop(reason::NO_PROXY_CONNECTION),
        "never around the tunnel"
    );
    let mut down = Node { listener_up: false, now: NS, ..Node::default() };
    assert_eq!(down.send_from_pod(T_EP, &to_r(40012, tcp::SYN)), Fate::Dropped(reason::PROXY_UNAVAILABLE));
    // Not TCP: nothing to tunnel; it goes on (R's node judges it).
    let mut udp_to_r = to_r(40013, 0);
    udp_to_r.proto = proto::UDP;
    node.iface = T_EP;
    assert_eq!(datapath::from_endpoint(&mut node, &udp_to_r), Action::Pass);
}
