use super::*;
use crate::api::{LoadOptions, load_str};
use crate::snapshot::L4Verdict;
use proptest::prelude::*;
use std::net::Ipv4Addr;

fn snapshot(policy: &str) -> Snapshot {
    let loaded = load_str("p.yaml", policy, &LoadOptions::default());
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let env = Environment {
        endpoints: vec![Endpoint {
            name: "client".into(),
            namespace: "default".into(),
            labels: [("app".to_owned(), "client".to_owned())].into(),
            ips: vec!["10.99.0.1".parse().unwrap()],
            ..Default::default()
        }],
        ..Default::default()
    };
    resolve(&loaded.policies, &[], &env, &mut IdentityAllocator::new(), 1)
}

proptest! {
    // toCIDRSet selects exactly the addresses inside the CIDR and outside every except; pods are
    // never selected by CIDR, even when their address is inside.
    #[test]
    fn cidr_with_except(a in 0u8..4, b in 0u8..4, len in 8u8..=24, ex_c in 0u8..4, ex_len in 24u8..=30, ip in any::<[u8; 4]>()) {
        let cidr = IpNet::new(IpAddr::V4(Ipv4Addr::new(10, a, b, 0)), len).unwrap().trunc();
        let except = IpNet::new(IpAddr::V4(Ipv4Addr::new(10, a, ex_c, 128)), ex_len).unwrap().trunc();
        let except_list = if cidr.contains(&except.network()) { format!("[{except}]") } else { "[]".into() };
        let policy = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toCIDRSet: [{{cidr: {cidr}, except: {except_list}}}]\n"
        );
        let snap = snapshot(&policy);
        let client = snap.endpoint("default", "client").unwrap();
        let target = IpAddr::V4(Ipv4Addr::new(10, ip[1] % 4, ip[2] % 4, ip[3]));
        let id = snap.identity_of(target);
        let allowed = !matches!(client.egress.l4_verdict(id, Proto::Tcp, 443), L4Verdict::Drop(_));
        let want = cidr.contains(&target)
            && !(except_list != "[]" && except.contains(&target))
            && target != "10.99.0.1".parse::<IpAddr>().unwrap();
        prop_assert_eq!(allowed, want, "cidr {} except {} target {} (identity {})", cidr, except_list, target, id);
    }
}

#[test]
fn pods_are_not_selected_by_cidr() {
    let snap = snapshot(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [10.99.0.0/16]\n",
    );
    let client = snap.endpoint("default", "client").unwrap();
    let own = snap.identity_of("10.99.0.1".parse().unwrap());
    assert_eq!(own, client.identity);
    assert!(matches!(client.egress.l4_verdict(own, Proto::Tcp, 1), L4Verdict::Drop(_)));
    let other = snap.identity_of("10.99.3.3".parse().unwrap());
    assert!(matches!(client.egress.l4_verdict(other, Proto::Tcp, 1), L4Verdict::Allow { .. }));
}

/// `toServices` as Cilium reads an entry: the selector when there is one, else the name; an entry
/// with neither selects nothing (and still puts the endpoint into default deny).
#[test]
fn to_services_selector_wins_and_an_empty_entry_selects_nothing() {
    let service = |name: &str, labels: &[(&str, &str)], backend: &str| Service {
        name: name.into(),
        namespace: "default".into(),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        backends: vec![crate::services::Backend {
            ip: backend.parse().unwrap(),
            ports: vec![],
            ready: true,
            node: None,
        }],
        ..Default::default()
    };
    let env = Environment {
        endpoints: vec![Endpoint {
            name: "client".into(),
            namespace: "default".into(),
            labels: [("app".to_owned(), "client".to_owned())].into(),
            ips: vec!["10.99.0.1".parse().unwrap()],
            ..Default::default()
        }],
        services: vec![service("db", &[], "192.0.2.10"), service("replica", &[("tier", "db")], "192.0.2.20")],
        ..Default::default()
    };
    let verdicts = |egress: &str| {
        let policy = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{}}\n  egress:\n{egress}"
        );
        let loaded = load_str("p.yaml", &policy, &LoadOptions::default());
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let snap = resolve(&loaded.policies, &[], &env, &mut IdentityAllocator::new(), 1);
        let client = snap.endpoint("default", "client").unwrap();
        ["192.0.2.10", "192.0.2.20"].map(|ip| {
            let id = snap.identity_of(ip.parse().unwrap());
            !matches!(client.egress.l4_verdict(id, Proto::Tcp, 5432), L4Verdict::Drop(_))
        })
    };
    assert_eq!(verdicts("  - toServices: [{k8sService: {serviceName: db}}]\n"), [true, false]);
    assert_eq!(
        verdicts(
            "  - toServices: [{k8sService: {serviceName: db}, k8sServiceSelector: {selector: {matchLabels: {tier: db}}}}]\n"
        ),
        [false, true]
    );
    assert_eq!(verdicts("  - toServices: [{}]\n"), [false, false]);
}

/// The star wars pods with `deathstar_annotations` on the deathstar, under `policy`.
fn starwars(policy: &str, deathstar_annotations: &[(&str, &str)], audit: bool) -> Snapshot {
    let loaded = load_str("p.yaml", policy, &LoadOptions::default());
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let ep = |name: &str, org: &str, ip: &str| Endpoint {
        name: name.into(),
        namespace: "default".into(),
        labels: [("org".to_owned(), org.to_owned()), ("class".to_owned(), name.to_owned())].into(),
        ips: vec![ip.parse().unwrap()],
        ..Default::default()
    };
    let mut deathstar = ep("deathstar", "empire", "10.0.0.1");
    deathstar.annotations = deathstar_annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let env = Environment {
        endpoints: vec![deathstar, ep("tiefighter", "empire", "10.0.0.2"), ep("xwing", "alliance", "10.0.0.3")],
        policy_audit_mode: audit,
        ..Default::default()
    };
    resolve(&loaded.policies, &[], &env, &mut IdentityAllocator::new(), 1)
}

const STARWARS_L4: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: rule1}\nspec:\n  endpointSelector: {matchLabels: {class: deathstar}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {org: empire}}]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n";

#[test]
fn visibility_redirects_what_is_allowed_and_nothing_else() {
    let vis = [(crate::visibility::ANNOTATION, "<Ingress/80/TCP/HTTP>")];
    let snap = starwars(STARWARS_L4, &vis, false);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let ds = snap.endpoint("default", "deathstar").unwrap();
    let id = |n: &str| snap.endpoint("default", n).unwrap().identity;
    // The empire on 80: redirected for visibility, every request allowed (by rule1).
    let L4Verdict::Redirect(p) = ds.ingress.l4_verdict(id("tiefighter"), Proto::Tcp, 80) else {
        panic!("not redirected")
    };
    assert!(p.visibility);
    let req = crate::http::HttpRequestInfo { method: b"PUT", path: b"/v1/exhaust-port", authority: None };
    let mut log = crate::http::HeaderLog::default();
    let verdict = p.check_http(&req, &mut crate::http::SimpleHeaders::default(), &mut log);
    assert!(matches!(verdict, crate::snapshot::L7Verdict::Allow(Some(_))), "{verdict:?}");
    // What L3/L4 drops stays dropped; other ports are not redirected.
    assert!(matches!(ds.ingress.l4_verdict(id("xwing"), Proto::Tcp, 80), L4Verdict::Drop(_)));
    assert!(matches!(ds.ingress.l4_verdict(id("tiefighter"), Proto::Tcp, 81), L4Verdict::Drop(_)));
    // Egress is not enforced and not annotated: plain allow.
    assert!(matches!(ds.egress.l4_verdict(id("xwing"), Proto::Tcp, 80), L4Verdict::Allow { .. }));
    assert!(!ds.ingress.audit && !ds.egress.audit);

    // With L7 rules, the rules judge as written: visibility changes nothing.
    let l7 = STARWARS_L4.replace(
        "toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]",
        "toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{method: POST}]}}]",
    );
    let snap = starwars(&l7, &vis, false);
    let ds = snap.endpoint("default", "deathstar").unwrap();
    let L4Verdict::Redirect(p) =
        ds.ingress.l4_verdict(snap.endpoint("default", "tiefighter").unwrap().identity, Proto::Tcp, 80)
    else {
        panic!("not redirected")
    };
    assert!(!p.visibility);
    let verdict = p.check_http(&req, &mut crate::http::SimpleHeaders::default(), &mut log);
    assert_eq!(verdict, crate::snapshot::L7Verdict::Deny);
}

#[test]
fn a_bad_annotation_is_an_error_and_audit_mode_reaches_every_direction() {
    let snap = starwars(STARWARS_L4, &[(crate::visibility::ANNOTATION, "<Ingress/80/UDP/HTTP>")], true);
    let e = snap.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    assert!(e.contains("pod default/deathstar") && e.contains("proxy-visibility"), "{e}");
    let ds = snap.endpoint("default", "deathstar").unwrap();
    assert!(ds.ingress.visibility.is_empty());
    assert!(snap.endpoints().iter().all(|e| e.ingress.audit && e.egress.audit));
}

/// `authentication: {mode: required}` on an ingress rule: the entries it makes require it (where
/// another rule allows the same flow without asking, the flow still must: any covering rule asks
/// for it); a peer on another node whose ingress asks is a tunnel target; on an egress rule it is
/// not enforced (allows nothing, with a warning).
#[test]
fn authentication_required_marks_what_it_allows() {
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n    authentication: {mode: required}\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"80\"}, {port: \"81\"}]}]\n";
    let loaded = load_str("p.yaml", policy, &LoadOptions::default());
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let ep = |name: &str, ip: &str, node: &str| Endpoint {
        name: name.into(),
        namespace: "default".into(),
        labels: [("app".to_owned(), name.to_owned())].into(),
        ips: vec![ip.parse().unwrap()],
        node: Some(node.into()),
        ..Default::default()
    };
    let env = Environment {
        endpoints: vec![ep("client", "10.99.0.1", "a"), ep("server", "10.99.1.1", "b")],
        node: Some("a".into()),
        nodes: [
            ("a".to_owned(), vec!["192.0.2.1".parse().unwrap()]),
            ("b".to_owned(), vec!["192.0.2.2".parse().unwrap()]),
        ]
        .into(),
        ..Default::default()
    };
    let snap = resolve(&loaded.policies, &[], &env, &mut IdentityAllocator::new(), 1);
    let (client, server) = (snap.endpoint("default", "client").unwrap(), snap.endpoint("default", "server").unwrap());
    assert!(server.ingress.auth_required_for(&[client.identity], Proto::Tcp, 80));
    assert!(!server.ingress.auth_required_for(&[client.identity], Proto::Tcp, 81));
    assert!(!server.ingress.auth_required_for(&[client.identity], Proto::Udp, 80), "TCP only");
    assert!(server.ingress.requires_authentication() && !client.ingress.requires_authentication());
    let t = snap.tunnel_target("10.99.1.1".parse().unwrap()).expect("the server is a tunnel target");
    assert_eq!((t.node, t.node_ips), ("b", &["192.0.2.2".parse::<IpAddr>().unwrap()][..]));
    assert!(snap.tunnel_target("10.99.0.1".parse().unwrap()).is_none(), "the client's ingress asks nothing");

    let egress = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: server}}]\n    authentication: {mode: required}\n";
    let loaded = load_str("p.yaml", egress, &LoadOptions::default());
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let snap = resolve(&loaded.policies, &[], &env, &mut IdentityAllocator::new(), 1);
    assert!(snap.warnings.iter().any(|w| w.contains("authentication on an egress rule")), "{:?}", snap.warnings);
    let (client, server) = (snap.endpoint("default", "client").unwrap(), snap.endpoint("default", "server").unwrap());
    assert!(matches!(client.egress.l4_verdict(server.identity, Proto::Tcp, 80), L4Verdict::Drop(_)));
}
