//! Conformance: the DNS proxy's allow decision (`dnsproxy_check_allowed.yaml`).
//!
//! Cilium's DNS proxy keeps, per endpoint and port/protocol, DNS rules per destination selector. Each
//! endpoint's rules are translated into the engine's resolved egress policy — one redirect entry per
//! (selector, port, protocol) holding the DNS rules — and each query is judged by the engine's L4
//! verdict then `check_dns`, as the proxy will do.

use std::collections::BTreeMap;
use std::sync::Arc;

use policy_engine::api::types::FqdnSelector;
use policy_engine::dns::{DnsRuleSet, NamePattern};
use policy_engine::snapshot::{
    DirectionPolicy, EntryAction, L4Verdict, L7Set, L7Verdict, OriginId, PeerSet, PolicyEntry, Proto, ProtoMatch,
};
use porin_tests::{cases, load_vectors, s};
use serde_yaml::Value;

/// Builds one endpoint's egress policy from `{ "53/UDP": { DstID1: [rules] | "nil ...", "*": [...] } }`.
fn endpoint_policy(rules: &Value, ids: &BTreeMap<String, u32>) -> DirectionPolicy {
    let mut entries = Vec::new();
    for (portproto, selectors) in rules.as_mapping().into_iter().flatten() {
        let Some(selectors) = selectors.as_mapping() else { continue }; // "no entry ..." => nothing
        let (port, proto) = portproto.as_str().unwrap().split_once('/').unwrap();
        let proto = Proto::parse(proto).unwrap();
        let port: u16 = port.parse().unwrap();
        for (sel, list) in selectors {
            let sel = sel.as_str().unwrap();
            let peers = if sel == "*" { PeerSet::All } else { PeerSet::Ids(Arc::from([ids[sel]])) };
            // A list of "matchPattern: '...'" / "matchName: '...'" strings, or a note meaning "no DNS
            // rules" (an L7 entry without rules allows every name).
            let patterns: Vec<NamePattern> = list
                .as_sequence()
                .map(|seq| {
                    seq.iter()
                        .map(|r| {
                            let sel: FqdnSelector = serde_yaml::from_str(r.as_str().unwrap()).unwrap();
                            NamePattern::new(sel.match_name.as_deref(), sel.match_pattern.as_deref()).unwrap()
                        })
                        .collect()
                })
                .unwrap_or_default();
            entries.push(PolicyEntry {
                peers,
                proto: ProtoMatch::Only(proto),
                port_start: port,
                port_end: port,
                action: EntryAction::Redirect {
                    rules: L7Set::Dns(Arc::new(DnsRuleSet::new(patterns))),
                    rule_origins: vec![OriginId(0)].into(),
                },
                origins: vec![OriginId(0)],
                auth: false,
            });
        }
    }
    DirectionPolicy { enforced: true, entries, ..Default::default() }
}

#[test]
fn dnsproxy_check_allowed() {
    let v = load_vectors("dnsproxy_check_allowed.yaml");
    let fixture = v.get("fixture").unwrap();
    let ids: BTreeMap<String, u32> = fixture["identities"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_owned(), u32::try_from(v.as_u64().unwrap()).unwrap()))
        .collect();
    let fpd_rules = fixture.get("rules_for_fpd_cases (TestFullPathDependence)").unwrap();
    let all = cases(&v, "cases");
    let mut failures = Vec::new();
    for c in all {
        let id = s(c, "id");
        let rules = c.get("rules").unwrap_or(fpd_rules);
        let ep = s(c, "source_endpoint");
        let policy =
            rules.get(ep).map(|r| endpoint_policy(r, &ids)).unwrap_or_else(|| endpoint_policy(&Value::Null, &ids));
        let dest = ids[s(c, "dest_identity")];
        let port = u16::try_from(c.get("dest_port").and_then(Value::as_u64).unwrap()).unwrap();
        let proto = Proto::parse(s(c, "protocol")).unwrap();
        let allowed = match policy.l4_verdict(dest, proto, port) {
            L4Verdict::Redirect(l7) => matches!(l7.check_dns(s(c, "qname")), L7Verdict::Allow(_)),
            L4Verdict::Allow { .. } => true,
            L4Verdict::Drop(_) => false,
        };
        let want = s(c, "expect") == "allow";
        if allowed != want {
            failures.push(format!("{id}: expected {}, got allowed={allowed}", s(c, "expect")));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), all.len(), failures.join("\n"));
    assert_eq!(all.len(), 12, "every decision case of the file is evaluated");

    // The wire cases assert the DNS proxy's replies, not the engine's decision: REFUSED / NXDOMAIN /
    // SERVFAIL and the question's case are checked in `proxy::dns::message::tests::cilium_wire_cases`,
    // forwarding over the client's transport by `agent/tests/fqdn_privileged.rs` (dig +tcp through
    // the real proxy). wire-03 (no original destination) cannot be answered transparently: the proxy
    // drops such a datagram and counts it (docs/semantics.md).
    assert_eq!(cases(&v, "wire_cases").len(), 5);
}
