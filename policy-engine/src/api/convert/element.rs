//! One element of a rule's lists (`ingress`, `ingressDeny`, `egress`, `egressDeny`): its peers
//! (endpoints, CIDRs, entities, services, FQDNs, ...) with Cilium's combination rules. The four
//! lists' items are read through one trait, so each check is written once.

use ipnet::IpNet;

use super::ports::{deny_port_rule, fqdn_selector, l4_spec, port_rule};
use super::*;

/// Cilium's `getEndpointSelector`: peers are confined to the policy namespace (or, for clusterwide
/// policies, to pods) unless they say otherwise; reserved selectors are left alone.
pub(super) fn peer_endpoints(sel: Selector, scope: &Scope<'_>, subject_matches_init: bool) -> Selector {
    if sel.has_reserved_key() {
        return sel;
    }
    let k8s_or_any = [LabelSource::K8s, LabelSource::Any];
    let mut sel = sel;
    if !sel.mentions(labels::POD_NAMESPACE, &k8s_or_any) {
        match scope.namespace {
            None => {
                if !subject_matches_init {
                    sel = sel.with(Requirement::Exists(LabelKey::k8s(labels::POD_NAMESPACE)));
                }
            }
            Some(ns) => {
                if !sel.mentions_prefix(labels::NAMESPACE_LABELS_PREFIX.trim_end_matches('.'), &k8s_or_any) {
                    sel = sel.with(Requirement::In(LabelKey::k8s(labels::POD_NAMESPACE), vec![ns.to_owned()]));
                }
            }
        }
    }
    if !sel.mentions(labels::CLUSTER, &k8s_or_any) {
        sel = sel.with(Requirement::In(LabelKey::k8s(labels::CLUSTER), vec![scope.cluster.to_owned()]));
    }
    sel
}

// === CIDRs ===

/// `api.CIDR`: a prefix or a bare address.
fn cidr(s: &str, ctx: &mut Ctx, path: &str) -> Option<IpNet> {
    if s.is_empty() {
        ctx.err(path, "IP must be specified");
        return None;
    }
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => Some(IpNet::from(ip)),
        Err(e) => {
            ctx.err(path, format!("unable to parse CIDR: {e}"));
            None
        }
    }
}

pub(super) fn cidr_rule(r: &raw::CidrRule, ctx: &mut Ctx, path: &str) -> Option<Peer> {
    let set = [r.cidr.is_some(), r.cidr_group_ref.is_some(), r.cidr_group_selector.is_some()];
    if set.iter().filter(|x| **x).count() != 1 {
        ctx.err(path, "exactly one of cidr, cidrGroupRef, cidrGroupSelector must be set");
        return None;
    }
    let mut except = Vec::new();
    let base = match &r.cidr {
        Some(c) => match c.parse::<IpNet>() {
            Ok(n) => Some(n.trunc()),
            Err(e) => {
                ctx.err(format!("{path}.cidr"), format!("Unable to parse CIDRRule {c:?}: {e}"));
                return None;
            }
        },
        None => None,
    };
    for (i, e) in r.except.iter().flatten().enumerate() {
        let epath = format!("{path}.except[{i}]");
        match e.parse::<IpNet>() {
            Ok(n) => {
                if let Some(b) = base
                    && !b.contains(&n.network())
                {
                    ctx.err(
                        &epath,
                        format!(
                            "allow CIDR prefix {} does not contain exclude CIDR prefix {e}",
                            r.cidr.as_deref().unwrap_or("")
                        ),
                    );
                    continue;
                }
                except.push(n.trunc());
            }
            Err(err) => ctx.err(&epath, format!("unable to parse CIDR: {err}")),
        }
    }
    if let Some(prefix) = base {
        return Some(Peer::Cidr { prefix, except });
    }
    if let Some(name) = &r.cidr_group_ref {
        return Some(Peer::CidrGroup { group: CidrGroupRef::Name(name.clone()), except });
    }
    let sel = selector(r.cidr_group_selector.as_ref()?, ctx, &format!("{path}.cidrGroupSelector"))?;
    Some(Peer::CidrGroup { group: CidrGroupRef::Selector(sel), except })
}

// === elements ===

/// The peer fields of one element, in Cilium's order (for "combining X and Y" messages).
pub(super) struct PeerFields<'a> {
    endpoints: Option<&'a [raw::LabelSelector]>,
    requires: Option<&'a [raw::LabelSelector]>,
    cidr: Option<&'a [String]>,
    cidr_set: Option<&'a [raw::CidrRule]>,
    entities: Option<&'a [String]>,
    services: Option<&'a [raw::ServiceSelector]>,
    fqdns: Option<&'a [raw::FqdnSelector]>,
    groups: Option<&'a [serde_yaml::Value]>,
    nodes: Option<&'a [raw::LabelSelector]>,
}

/// The peer fields of an ingress list item: its `from…` fields.
macro_rules! from_fields {
    ($e:expr) => {
        PeerFields {
            endpoints: $e.from_endpoints.as_deref(),
            requires: $e.from_requires.as_deref(),
            cidr: $e.from_cidr.as_deref(),
            cidr_set: $e.from_cidr_set.as_deref(),
            entities: $e.from_entities.as_deref(),
            services: None,
            fqdns: None,
            groups: $e.from_groups.as_deref(),
            nodes: $e.from_nodes.as_deref(),
        }
    };
}

/// The peer fields of an egress list item: its `to…` fields (`toFQDNs` only on allow lists).
macro_rules! to_fields {
    ($e:expr, $fqdns:expr) => {
        PeerFields {
            endpoints: $e.to_endpoints.as_deref(),
            requires: $e.to_requires.as_deref(),
            cidr: $e.to_cidr.as_deref(),
            cidr_set: $e.to_cidr_set.as_deref(),
            entities: $e.to_entities.as_deref(),
            services: $e.to_services.as_deref(),
            fqdns: $fqdns,
            groups: $e.to_groups.as_deref(),
            nodes: $e.to_nodes.as_deref(),
        }
    };
}

/// An item of one of a rule's four lists, read uniformly.
pub(super) trait RawElement {
    /// Its peers are sources (`from…`: ingress lists) or destinations (`to…`: egress lists).
    const FROM: bool;
    /// Allow or deny list.
    const ACTION: Action;
    /// The list's name in the policy.
    const LIST: &'static str;
    /// Its peer fields.
    fn peers(&self) -> PeerFields<'_>;
    /// Its authentication block (allow lists only).
    fn authentication(&self) -> Option<&raw::Authentication> {
        None
    }
    /// Its ports, protocols and L7 rules.
    fn l4(&self, ctx: &mut Ctx, path: &str, namespace: Option<&str>) -> L4Spec;
    /// What its L7 rules may not do on this list (host policies, DNS on ingress).
    fn check_l7(_l4: &L4Spec, _host_policy: bool, _ctx: &mut Ctx, _path: &str) {}
}

fn l7_parsers(l4: &L4Spec) -> Option<Vec<crate::model::L7Parser>> {
    match l4 {
        L4Spec::Ports(prs) => Some(prs.iter().filter_map(|p| p.l7.parser()).collect()),
        _ => None,
    }
}

impl RawElement for raw::IngressRule {
    const FROM: bool = true;
    const ACTION: Action = Action::Allow;
    const LIST: &'static str = "ingress";
    fn peers(&self) -> PeerFields<'_> {
        from_fields!(self)
    }
    fn authentication(&self) -> Option<&raw::Authentication> {
        self.authentication.as_ref()
    }
    fn l4(&self, ctx: &mut Ctx, path: &str, namespace: Option<&str>) -> L4Spec {
        l4_spec(self.to_ports.as_deref(), self.icmps.as_deref(), ctx, path, |p, ctx, path| {
            port_rule(p, true, ctx, path, namespace)
        })
    }
    fn check_l7(l4: &L4Spec, host_policy: bool, ctx: &mut Ctx, path: &str) {
        if let Some(parsers) = l7_parsers(l4) {
            if host_policy && !parsers.is_empty() {
                ctx.err(path, "L7 policy is not supported on host ingress yet");
            }
            if parsers.contains(&crate::model::L7Parser::Dns) {
                ctx.err(path, "L7 protocol DNS is not supported on ingress yet");
            }
        }
    }
}

impl RawElement for raw::IngressDenyRule {
    const FROM: bool = true;
    const ACTION: Action = Action::Deny;
    const LIST: &'static str = "ingressDeny";
    fn peers(&self) -> PeerFields<'_> {
        from_fields!(self)
    }
    fn l4(&self, ctx: &mut Ctx, path: &str, _namespace: Option<&str>) -> L4Spec {
        l4_spec(self.to_ports.as_deref(), self.icmps.as_deref(), ctx, path, deny_port_rule)
    }
}

impl RawElement for raw::EgressRule {
    const FROM: bool = false;
    const ACTION: Action = Action::Allow;
    const LIST: &'static str = "egress";
    fn peers(&self) -> PeerFields<'_> {
        to_fields!(self, self.to_fqdns.as_deref())
    }
    fn authentication(&self) -> Option<&raw::Authentication> {
        self.authentication.as_ref()
    }
    fn l4(&self, ctx: &mut Ctx, path: &str, namespace: Option<&str>) -> L4Spec {
        l4_spec(self.to_ports.as_deref(), self.icmps.as_deref(), ctx, path, |p, ctx, path| {
            port_rule(p, false, ctx, path, namespace)
        })
    }
    fn check_l7(l4: &L4Spec, host_policy: bool, ctx: &mut Ctx, path: &str) {
        if let Some(parsers) = l7_parsers(l4)
            && host_policy
            && parsers.iter().any(|p| *p != crate::model::L7Parser::Dns)
        {
            ctx.err(path, "host policies only support DNS L7 rules on egress");
        }
    }
}

impl RawElement for raw::EgressDenyRule {
    const FROM: bool = false;
    const ACTION: Action = Action::Deny;
    const LIST: &'static str = "egressDeny";
    fn peers(&self) -> PeerFields<'_> {
        to_fields!(self, None)
    }
    fn l4(&self, ctx: &mut Ctx, path: &str, _namespace: Option<&str>) -> L4Spec {
        l4_spec(self.to_ports.as_deref(), self.icmps.as_deref(), ctx, path, deny_port_rule)
    }
}

/// What every element of a rule shares.
pub(super) struct ElementEnv<'a> {
    /// The policy's scope (namespace defaulting).
    pub(super) scope: &'a Scope<'a>,
    /// The rule's subject selects `reserved:init` endpoints.
    pub(super) subject_matches_init: bool,
    /// The rule is a host policy (a node selector).
    pub(super) host_policy: bool,
}

/// Converts every item of one of a rule's lists (`path` is the rule's).
pub(super) fn elements<E: RawElement>(
    list: Option<&[E]>,
    env: &ElementEnv<'_>,
    ctx: &mut Ctx,
    path: &str,
) -> Vec<Element> {
    let mut out = Vec::new();
    for (i, e) in list.unwrap_or(&[]).iter().enumerate() {
        let epath = format!("{path}.{}[{i}]", E::LIST);
        let l4 = e.l4(ctx, &epath, env.scope.namespace);
        E::check_l7(&l4, env.host_policy, ctx, &epath);
        out.extend(element(e, l4, env, ctx, &epath));
    }
    out
}

fn element<E: RawElement>(e: &E, l4: L4Spec, env: &ElementEnv<'_>, ctx: &mut Ctx, path: &str) -> Option<Element> {
    let (dir_from, action, fields, auth) = (E::FROM, E::ACTION, e.peers(), e.authentication());
    let (scope, subject_matches_init) = (env.scope, env.subject_matches_init);
    let before = ctx.errors.len();
    let (pre, n) = if dir_from { ("From", "from") } else { ("To", "to") };
    let members: [(&str, usize); 8] = [
        ("Endpoints", fields.endpoints.map_or(0, <[_]>::len)),
        ("CIDR", fields.cidr.map_or(0, <[_]>::len)),
        ("CIDRSet", fields.cidr_set.map_or(0, <[_]>::len)),
        ("Entities", fields.entities.map_or(0, <[_]>::len)),
        ("Services", fields.services.map_or(0, <[_]>::len)),
        ("FQDNs", fields.fqdns.map_or(0, <[_]>::len)),
        ("Groups", fields.groups.map_or(0, <[_]>::len)),
        ("Nodes", fields.nodes.map_or(0, <[_]>::len)),
    ];
    let used: Vec<&str> = members.iter().filter(|(_, c)| *c > 0).map(|(m, _)| *m).collect();
    if let [a, b, ..] = used.as_slice() {
        ctx.err(path, format!("combining {pre}{a} and {pre}{b} is not supported yet"));
        return None;
    }
    if fields.requires.is_some_and(|r| !r.is_empty()) {
        ctx.err(
            format!("{path}.{n}Requires"),
            format!("{n}Requires is deprecated and not supported (Cilium's CRD allows no items)"),
        );
    }
    if fields.nodes.is_some_and(|r| !r.is_empty()) {
        ctx.err(
            format!("{path}.{n}Nodes"),
            "FromNodes/ToNodes rules can only be applied when the \"enable-node-selector-labels\" flag is set",
        );
    }
    let mut unsupported = None;
    let mut peers: Option<Vec<Peer>> = None;
    if let Some(eps) = fields.endpoints {
        let v: Vec<Peer> = eps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| selector(s, ctx, &format!("{path}.{n}Endpoints[{i}]")))
            .map(|s| Peer::Endpoints(peer_endpoints(s, scope, subject_matches_init)))
            .collect();
        peers = Some(v);
    }
    if let Some(cidrs) = fields.cidr {
        let field = if dir_from { "fromCIDR" } else { "toCIDR" };
        let v = cidrs
            .iter()
            .enumerate()
            .filter_map(|(i, c)| cidr(c, ctx, &format!("{path}.{field}[{i}]")))
            .map(|prefix| Peer::Cidr { prefix, except: vec![] })
            .collect();
        peers = Some(v);
    }
    if let Some(set) = fields.cidr_set {
        let field = if dir_from { "fromCIDRSet" } else { "toCIDRSet" };
        peers = Some(
            set.iter().enumerate().filter_map(|(i, c)| cidr_rule(c, ctx, &format!("{path}.{field}[{i}]"))).collect(),
        );
    }
    if let Some(ents) = fields.entities {
        let mut v = Vec::new();
        for (i, e) in ents.iter().enumerate() {
            match Entity::parse(e) {
                Some(ent) => v.push(Peer::Entity(ent)),
                None => ctx.err(format!("{path}.{n}Entities[{i}]"), format!("unsupported entity: {e}")),
            }
        }
        peers = Some(v);
    }
    if let Some(svcs) = fields.services {
        let mut v = Vec::new();
        for (i, s) in svcs.iter().enumerate() {
            let spath = format!("{path}.toServices[{i}]");
            // Cilium looks at the selector first and at the name only without one; an entry with
            // neither selects nothing (`ServiceSelector` in Cilium's `service.go`).
            match (&s.k8s_service, &s.k8s_service_selector) {
                (named, Some(k)) => {
                    if named.is_some() {
                        ctx.warn(
                            &spath,
                            "both k8sService and k8sServiceSelector are set: k8sServiceSelector is used, as in Cilium",
                        );
                    }
                    if let Some(sel) = selector(&k.selector, ctx, &format!("{spath}.k8sServiceSelector.selector")) {
                        let namespace =
                            k.namespace.clone().filter(|n| !n.is_empty()).or(scope.namespace.map(str::to_owned));
                        v.push(Peer::Service(ServiceRef::Selector { namespace, selector: sel }));
                    }
                }
                (Some(k), None) => {
                    let name = k.service_name.clone().unwrap_or_default();
                    if name.is_empty() {
                        ctx.err(format!("{spath}.k8sService.serviceName"), "serviceName must be specified");
                        continue;
                    }
                    let namespace = k
                        .namespace
                        .clone()
                        .filter(|n| !n.is_empty())
                        .or(scope.namespace.map(str::to_owned))
                        .unwrap_or_else(|| "default".into());
                    v.push(Peer::Service(ServiceRef::Name { namespace, name }));
                }
                (None, None) => {
                    ctx.warn(&spath, "empty entry (neither k8sService nor k8sServiceSelector) selects no service");
                }
            }
        }
        peers = Some(v);
    }
    if let Some(fqdns) = fields.fqdns {
        peers = Some(
            fqdns
                .iter()
                .enumerate()
                .filter_map(|(i, f)| fqdn_selector(f, ctx, &format!("{path}.toFQDNs[{i}]")))
                .map(Peer::Fqdn)
                .collect(),
        );
    }
    if let Some(groups) = fields.groups {
        if !groups.is_empty() {
            unsupported = Some(format!("{n}Groups: cloud-provider groups are not supported by Porin"));
        }
        peers = Some(vec![]);
    }
    if let Some(nodes) = fields.nodes
        && nodes.is_empty()
    {
        peers = Some(vec![]);
    }
    let mut auth_required = false;
    match auth.and_then(|a| a.mode.as_deref()) {
        None | Some("disabled") => {}
        Some("required") if dir_from => auth_required = true,
        Some("required") => {
            unsupported = Some(
                "authentication on an egress rule: Porin authenticates flows at their destination (put it on \
                 the destination's ingress rule)"
                    .to_owned(),
            );
        }
        Some(mode @ "test-always-fail") => {
            unsupported = Some(format!("authentication mode {mode:?}: a test mode Porin does not implement"));
        }
        Some(other) => ctx.err(format!("{path}.authentication.mode"), format!("invalid authentication mode {other:?}")),
    }
    if ctx.errors.len() != before {
        return None;
    }
    let peers = match peers {
        Some(list) => Peers::List(list),
        None if matches!(l4, L4Spec::Any) => Peers::List(vec![]),
        None => Peers::All,
    };
    Some(Element { path: path.to_owned(), action, peers, l4, unsupported, auth_required })
}
