//! A Cilium rule: its subject (endpoints or nodes, namespaced), its four lists, default deny.

use super::element::{ElementEnv, elements};
use super::*;

/// Converts one Cilium rule.
pub(crate) fn rule(r: &raw::Rule, scope: &Scope<'_>, ctx: &mut Ctx, path: &str) -> Option<Rule> {
    let before = ctx.errors.len();
    let subject = match (&r.endpoint_selector, &r.node_selector) {
        (None, None) => {
            ctx.err(path, "rule must have one of EndpointSelector or NodeSelector");
            return None;
        }
        (Some(_), Some(_)) => {
            ctx.err(path, "rule cannot have both EndpointSelector and NodeSelector");
            return None;
        }
        (Some(es), None) => {
            let sel = selector(es, ctx, &format!("{path}.endpointSelector"))?;
            let sel = match scope.namespace {
                Some(ns) => sel.with_exact(LabelKey::k8s(labels::POD_NAMESPACE), ns),
                None => sel,
            };
            Subject::Endpoints(sel)
        }
        (None, Some(ns)) => {
            if scope.kind != PolicyKind::CiliumClusterwideNetworkPolicy {
                ctx.err(
                    format!("{path}.nodeSelector"),
                    "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy",
                );
            }
            let sel = selector(ns, ctx, &format!("{path}.nodeSelector"))?;
            ctx.warn(
                &format!("{path}.nodeSelector"),
                "host policies are not enforced by Porin yet (the rule has no effect)",
            );
            Subject::Nodes(sel)
        }
    };
    let host_policy = matches!(subject, Subject::Nodes(_));
    let matches_init = match &subject {
        Subject::Endpoints(s) => s.mentions("init", &[LabelSource::Reserved]),
        Subject::Nodes(_) => false,
    };
    let n_in = r.ingress.as_ref().map_or(0, Vec::len);
    let n_in_deny = r.ingress_deny.as_ref().map_or(0, Vec::len);
    let n_eg = r.egress.as_ref().map_or(0, Vec::len);
    let n_eg_deny = r.egress_deny.as_ref().map_or(0, Vec::len);
    if n_in + n_in_deny + n_eg + n_eg_deny == 0 {
        ctx.err(path, "rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny");
        return None;
    }
    let env = ElementEnv { scope, subject_matches_init: matches_init, host_policy };
    let mut ingress = elements(r.ingress.as_deref(), &env, ctx, path);
    ingress.extend(elements(r.ingress_deny.as_deref(), &env, ctx, path));
    let mut egress = elements(r.egress.as_deref(), &env, ctx, path);
    egress.extend(elements(r.egress_deny.as_deref(), &env, ctx, path));
    // A deny Porin cannot enforce would fail open: reject it instead.
    for el in ingress.iter().chain(&egress) {
        if el.action == Action::Deny
            && let Some(reason) = &el.unsupported
        {
            ctx.err(&el.path, format!("cannot enforce this deny rule: {reason}"));
        }
    }
    for el in ingress.iter().chain(&egress).filter(|e| e.action == Action::Allow) {
        if let Some(reason) = &el.unsupported {
            ctx.warn(&el.path, format_args!("{reason}; this element allows nothing"));
        }
        if let L4Spec::Ports(prs) = &el.l4 {
            for pr in prs {
                if let Some(reason) = &pr.unsupported {
                    ctx.warn(&pr.path, format_args!("{reason}; this port rule allows nothing"));
                }
            }
        }
    }
    if ctx.errors.len() != before {
        return None;
    }
    let dd = r.enable_default_deny.clone().unwrap_or_default();
    Some(Rule {
        path: path.to_owned(),
        namespace: scope.namespace.map(str::to_owned),
        subject,
        ingress,
        egress,
        default_deny_ingress: dd.ingress.unwrap_or(n_in + n_in_deny > 0),
        default_deny_egress: dd.egress.unwrap_or(n_eg + n_eg_deny > 0),
    })
}
