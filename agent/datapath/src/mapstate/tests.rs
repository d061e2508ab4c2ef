use super::*;
use std::sync::Arc;

use policy_engine::http::HttpRuleSet;
use policy_engine::snapshot::{EntryAction, L7Set, OriginId, PolicyEntry};
use policy_engine::visibility::Visibility;
use proptest::prelude::*;

#[test]
fn port_blocks_cover_exactly() {
    assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
    assert_eq!(port_blocks(0, u16::MAX), vec![(0, 0)]);
    assert_eq!(port_blocks(8000, 8003), vec![(8000, 14)]);
    assert_eq!(port_blocks(9000, 9100).iter().map(|(_, b)| 1u32 << (16 - b)).sum::<u32>(), 101);
    for (a, b) in [(1u16, 7u16), (3, 1000), (65530, 65535), (0, 0)] {
        let mut covered = vec![];
        for (start, bits) in port_blocks(a, b) {
            let size = 1u32 << (16 - bits);
            assert_eq!(u32::from(start) % size, 0, "aligned");
            covered.extend(u32::from(start)..u32::from(start) + size);
        }
        assert_eq!(covered, (u32::from(a)..=u32::from(b)).collect::<Vec<_>>());
    }
}

#[derive(Clone, Debug)]
enum Act {
    Deny,
    Allow,
    Redirect,
    RedirectKafka,
}

fn arb_entry() -> impl Strategy<Value = PolicyEntry> {
    (
        proptest::option::of(proptest::collection::vec(1u32..6, 1..3)),
        proptest::option::of(prop_oneof![
            Just(Proto::Tcp),
            Just(Proto::Udp),
            Just(Proto::Icmp),
            Just(Proto::Other(112)),
            Just(Proto::Other(2))
        ]),
        0u16..20,
        prop_oneof![Just(0u16), Just(1), Just(3), Just(30), Just(u16::MAX)],
        prop_oneof![4 => Just(Act::Deny), 4 => Just(Act::Allow), 4 => Just(Act::Redirect), 1 => Just(Act::RedirectKafka)],
        0u32..4,
        proptest::bool::weighted(0.3),
    )
        .prop_map(|(peers, proto, start, len, act, origin, auth)| {
            let peers = match peers {
                None => PeerSet::All,
                Some(mut v) => {
                    v.sort_unstable();
                    v.dedup();
                    PeerSet::Ids(v.into())
                }
            };
            let action = match act {
                Act::Deny => EntryAction::Deny,
                Act::Allow => EntryAction::Allow,
                Act::Redirect => EntryAction::Redirect {
                    rules: L7Set::Http(Arc::new(HttpRuleSet::compile(vec![]).unwrap())),
                    rule_origins: Arc::from([OriginId(origin)]),
                },
                Act::RedirectKafka => EntryAction::Redirect {
                    rules: L7Set::Kafka(Arc::new(policy_engine::kafka::KafkaRuleSet::new(vec![]))),
                    rule_origins: Arc::from([OriginId(origin)]),
                },
            };
            PolicyEntry {
                peers,
                proto: proto.map_or(ProtoMatch::Any, ProtoMatch::Only),
                port_start: start,
                port_end: start.saturating_add(len),
                action,
                origins: vec![OriginId(origin)],
                auth,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    // The entries written for a direction make the kernel's two-step LPM lookup return exactly the
    // engine's verdict, for every identity, protocol and port.
    #[test]
    fn kernel_lookup_equals_engine(
        entries in proptest::collection::vec(arb_entry(), 0..7),
        enforced: bool,
        audit: bool,
        visible in proptest::collection::vec((prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)], prop_oneof![1u16..40, Just(65535u16)]), 0..3),
        flows in proptest::collection::vec((0u32..8, prop_oneof![Just(Proto::Tcp), Just(Proto::Udp), Just(Proto::Sctp), Just(Proto::Icmp), Just(Proto::Icmpv6), Just(Proto::Other(47)), Just(Proto::Other(112)), Just(Proto::Other(2)), Just(Proto::Other(99))], prop_oneof![0u16..40, Just(65535u16), 65000u16..65535]), 40),
    ) {
        // Visibility ports (their own segments) and audit mode (a flag on every value) included.
        let visibility = visible
            .into_iter()
            .map(|(proto, port)| Visibility {
                direction: policy_engine::model::Direction::Ingress,
                port,
                proto,
                parser: if proto == Proto::Tcp { L7Parser::Http } else { L7Parser::Dns },
            })
            .collect();
        let dp = DirectionPolicy { enforced, entries, enforced_by: vec![OriginId(9)], audit, visibility, ..Default::default() };
        let mut map = BTreeMap::new();
        direction_entries(&dp, direction::INGRESS, 7, &mut map);
        for (id, proto, port) in flows {
            let port_or_0 = if matches!(proto, Proto::Other(_)) { 0 } else { port };
            let want = value_at(&dp, id, proto, port_or_0);
            prop_assert_eq!(want.flags & policy_flag::AUDIT != 0, audit);
            prop_assert_eq!(want.flags & policy_flag::AUTH != 0, dp.auth_required_for(&[id], proto, port_or_0));
            let got = lookup(&map, direction::INGRESS, 7, id, proto.number(), port);
            prop_assert_eq!(got, want, "identity {} {} port {}", id, proto, port);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    // An address learned from DNS is its own identity and its names' FQDN selector identities: the
    // kernel combines its lookups for each (`datapath::combine`) into the engine's verdict on the
    // union (`l4_verdict_for`).
    #[test]
    fn kernel_combination_equals_engine_for_learned_addresses(
        entries in proptest::collection::vec(arb_entry(), 0..7),
        enforced: bool,
        visible in proptest::collection::vec((prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)], 1u16..40), 0..3),
        flows in proptest::collection::vec((0u32..8, proptest::collection::vec(1u32..6, 0..4), prop_oneof![Just(Proto::Tcp), Just(Proto::Udp), Just(Proto::Other(112))], prop_oneof![0u16..40, Just(65535u16)]), 40),
    ) {
        // Egress visibility too: the kernel's combination must give a rule's redirect precedence
        // over a visibility one, as the engine does.
        let visibility = visible
            .into_iter()
            .map(|(proto, port)| Visibility {
                direction: policy_engine::model::Direction::Egress,
                port,
                proto,
                parser: if proto == Proto::Tcp { L7Parser::Kafka } else { L7Parser::Dns },
            })
            .collect();
        let dp = DirectionPolicy { enforced, entries, enforced_by: vec![OriginId(9)], visibility, ..Default::default() };
        let mut map = BTreeMap::new();
        direction_entries(&dp, direction::EGRESS, 7, &mut map);
        for (id, mut fqdn, proto, port) in flows {
            fqdn.sort_unstable();
            fqdn.dedup();
            let port = if matches!(proto, Proto::Other(_)) { 0 } else { port };
            let peers: Vec<u32> = std::iter::once(id).chain(fqdn.iter().copied()).collect();
            let want = value_of(&dp.l4_verdict_for(&peers, proto, port));
            let got = lookup_learned(&map, 7, id, &fqdn, proto.number(), port);
            // The deciding rule may be another of the merged ones; the verdict and listener may not.
            prop_assert_eq!((got.verdict, got.listener), (want.verdict, want.listener), "identity {} fqdn {:?} {} port {}", id, fqdn, proto, port);
        }
    }
}

#[test]
fn identities_like_the_wildcard_get_no_entries() {
    let entry = |peers: PeerSet, port: u16, action: EntryAction| PolicyEntry {
        peers,
        proto: ProtoMatch::Only(Proto::Tcp),
        port_start: port,
        port_end: port,
        action,
        origins: vec![OriginId(0)],
        auth: false,
    };
    // 1 and 2 allowed on 80, everyone on 443: identity 3 never appears; 1 and 2 have one profile each.
    let dp = DirectionPolicy {
        enforced: true,
        entries: vec![
            entry(PeerSet::Ids(Arc::from([1, 2])), 80, EntryAction::Allow),
            entry(PeerSet::All, 443, EntryAction::Allow),
        ],
        ..Default::default()
    };
    let mut map = BTreeMap::new();
    direction_entries(&dp, direction::INGRESS, 1, &mut map);
    let ids: BTreeSet<u32> = map.keys().map(|s| s.identity).collect();
    assert_eq!(ids, BTreeSet::from([0, 1, 2]));
    assert_eq!(lookup(&map, direction::INGRESS, 1, 3, 6, 80).verdict, verdict::DROP_NO_ALLOW);
    assert_eq!(lookup(&map, direction::INGRESS, 1, 3, 6, 443).verdict, verdict::ALLOW);
    assert_eq!(lookup(&map, direction::INGRESS, 1, 2, 6, 80).verdict, verdict::ALLOW);
}

#[test]
fn the_kernels_numbers_are_the_engines() {
    use policy_engine::identity::reserved;
    // The datapath assigns world identities to addresses the ipcache does not know.
    assert_eq!(redirect_common::identity::WORLD_IPV4, reserved::WORLD_IPV4);
    assert_eq!(redirect_common::identity::WORLD_IPV6, reserved::WORLD_IPV6);
    // Every L7 parser has its own listener id.
    let ids = [L7Parser::Http, L7Parser::Kafka, L7Parser::Dns].map(listener_of);
    assert_eq!(
        ids,
        [redirect_common::listener::HTTP, redirect_common::listener::KAFKA, redirect_common::listener::DNS]
    );
    assert!(ids.iter().all(|id| redirect_common::proxy_index(*id, true) < redirect_common::sizes::PROXY));
}

#[test]
fn a_frame_for_the_proxy_is_addressed_to_the_bridge_on_a_bridge_port_and_to_the_interface_otherwise() {
    use crate::interfaces::Bridge;
    use redirect_common::iface_flag;
    let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
    let own = [2, 0, 0, 0, 0, 5];
    let routed = iface_value(7, &ips, &Interface { index: 40, mac: Some(own), bridge: None });
    assert_eq!((routed.endpoint, routed.ipv4, routed.bridge, routed.mac), (7, [10, 0, 0, 5], 0, own));
    assert_eq!(routed.flags, iface_flag::HAS_V4 | iface_flag::HAS_V6 | iface_flag::HAS_MAC);
    let bridge = Bridge { index: 3, mac: [2, 0, 0, 0, 0, 1] };
    let port = iface_value(7, &ips, &Interface { index: 41, mac: Some(own), bridge: Some(bridge) });
    assert_eq!((port.bridge, port.mac), (3, bridge.mac));
    assert_ne!(port.flags & iface_flag::HAS_MAC, 0);
    let no_mac = iface_value(7, &ips, &Interface { index: 42, mac: None, bridge: None });
    assert_eq!((no_mac.flags & iface_flag::HAS_MAC, no_mac.bridge), (0, 0));
}
