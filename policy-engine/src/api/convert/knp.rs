//! Kubernetes NetworkPolicy: converted into the same model as Cilium rules.

use super::element::cidr_rule;
use super::ports::port_protocol;
use super::*;

// === Kubernetes NetworkPolicy ===

/// Converts a pod or namespace selector of a NetworkPolicy (keys are `k8s:` labels).
fn knp_selector(raw: &raw::LabelSelector, key_prefix: &str, ctx: &mut Ctx, path: &str) -> Option<Selector> {
    let prefixed = raw::LabelSelector {
        match_labels: raw
            .match_labels
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (format!("k8s:{key_prefix}{k}"), v.clone())).collect()),
        match_expressions: raw.match_expressions.as_ref().map(|es| {
            es.iter()
                .map(|e| raw::LabelSelectorRequirement { key: format!("k8s:{key_prefix}{}", e.key), ..e.clone() })
                .collect()
        }),
    };
    selector(&prefixed, ctx, path)
}

fn knp_peers(peers: Option<&[raw::NetworkPolicyPeer]>, scope: &Scope<'_>, ctx: &mut Ctx, path: &str) -> Peers {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else { return Peers::All };
    let mut out = Vec::new();
    let ns = scope.namespace.unwrap_or("default");
    for (i, p) in peers.iter().enumerate() {
        let ppath = format!("{path}[{i}]");
        match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
            (None, None, None) => ctx.err(&ppath, "must specify one of podSelector, namespaceSelector or ipBlock"),
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                ctx.err(&ppath, "may not specify both ipBlock and another peer")
            }
            (None, None, Some(b)) => {
                let rule = raw::CidrRule { cidr: Some(b.cidr.clone()), except: b.except.clone(), ..Default::default() };
                out.extend(cidr_rule(&rule, ctx, &format!("{ppath}.ipBlock")));
            }
            (pod, nsel, None) => {
                let mut sel = match pod {
                    Some(ps) => match knp_selector(ps, "", ctx, &format!("{ppath}.podSelector")) {
                        Some(s) => s,
                        None => continue,
                    },
                    None => Selector::everything(),
                };
                match nsel {
                    None => sel = sel.with(Requirement::In(LabelKey::k8s(labels::POD_NAMESPACE), vec![ns.to_owned()])),
                    Some(n) => match knp_selector(
                        n,
                        labels::NAMESPACE_LABELS_PREFIX,
                        ctx,
                        &format!("{ppath}.namespaceSelector"),
                    ) {
                        Some(nsel) => {
                            sel = sel.with(Requirement::Exists(LabelKey::k8s(labels::POD_NAMESPACE)));
                            for r in nsel.requirements() {
                                sel = sel.with(r.clone());
                            }
                        }
                        None => continue,
                    },
                }
                sel = sel.with(Requirement::In(LabelKey::k8s(labels::CLUSTER), vec![scope.cluster.to_owned()]));
                out.push(Peer::Endpoints(sel));
            }
        }
    }
    Peers::List(out)
}

fn knp_ports(ports: Option<&[raw::NetworkPolicyPort]>, ctx: &mut Ctx, path: &str) -> L4Spec {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else { return L4Spec::Any };
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let ppath = format!("{path}[{i}]");
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        let pp = raw::PortProtocol {
            port: Some(p.port.clone().unwrap_or(raw::PortString("0".into()))),
            end_port: p.end_port,
            protocol: Some(proto),
        };
        if let Some(parsed) = port_protocol(&pp, false, ctx, &ppath) {
            out.push(PortRule {
                path: ppath,
                ports: vec![PortProto { port: parsed.port, protocol: parsed.protocol }],
                l7: L7Spec::None,
                unsupported: None,
            });
        }
    }
    L4Spec::Ports(out)
}

/// Converts a NetworkPolicy `spec` into one rule (Cilium's `ParseNetworkPolicy`).
pub(crate) fn network_policy(spec: &raw::NetworkPolicySpec, scope: &Scope<'_>, ctx: &mut Ctx) -> Option<Rule> {
    let before = ctx.errors.len();
    let ns = scope.namespace.unwrap_or("default");
    let pod = spec.pod_selector.clone().unwrap_or_default();
    let subject = knp_selector(&pod, "", ctx, "spec.podSelector")?.with_exact(LabelKey::k8s(labels::POD_NAMESPACE), ns);
    let types = spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_owned()];
        if spec.egress.is_some() {
            t.push("Egress".to_owned());
        }
        t
    });
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            ctx.err(
                format!("spec.policyTypes[{i}]"),
                format!("Unsupported value: {t:?}: supported values: \"Ingress\", \"Egress\""),
            );
        }
    }
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        let peers = knp_peers(r.from.as_deref(), scope, ctx, &format!("{path}.from"));
        let l4 = knp_ports(r.ports.as_deref(), ctx, &format!("{path}.ports"));
        ingress.push(Element { path, action: Action::Allow, peers, l4, unsupported: None, auth_required: false });
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        let peers = knp_peers(r.to.as_deref(), scope, ctx, &format!("{path}.to"));
        let l4 = knp_ports(r.ports.as_deref(), ctx, &format!("{path}.ports"));
        egress.push(Element { path, action: Action::Allow, peers, l4, unsupported: None, auth_required: false });
    }
    if ctx.errors.len() != before {
        return None;
    }
    let has = |t: &str| types.iter().any(|x| x == t);
    Some(Rule {
        path: "spec".into(),
        namespace: Some(ns.to_owned()),
        subject: Subject::Endpoints(subject),
        ingress: if has("Ingress") { ingress } else { vec![] },
        egress: if has("Egress") { egress } else { vec![] },
        default_deny_ingress: has("Ingress"),
        default_deny_egress: has("Egress"),
    })
}
