//! Resolution: validated policies + the cluster's endpoints → a [`Snapshot`].
//!
//! Steps: label every endpoint the way Cilium does (pod labels, namespace, namespace labels, service
//! account, cluster), keep the security-relevant ones and allocate identities; give every prefix the
//! policies can select (CIDRs, CIDR groups, service backends, IPs learned from DNS) a CIDR identity and
//! build the ipcache; turn each selector into the set of identities it selects (once per distinct
//! selector); then, per endpoint and direction, expand the selecting rules into entries, merge entries
//! with the same selector and port, and compile their L7 rules (once per distinct rule list).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::dns::{DnsRuleSet, NamePattern, normalize_name};
use crate::http::{HttpRule, HttpRuleSet};
use crate::identity::{self, Identity, IdentityAllocator, IdentityId, IdentityKind, IpCache, reserved};
use crate::kafka::{KafkaRule, KafkaRuleSet};
use crate::labels::{self, Label, LabelKey, LabelSource, Labels};
use crate::model::{
    Action, CidrGroup, CidrGroupRef, Direction, Element, Entity, HttpRuleSpec, IcmpFamily, L4Spec, L7Parser, L7Spec,
    Peer, Peers, Policy, PortSel, Protocol, SecretSource, ServiceRef, Subject,
};
use crate::selector::Selector;
use crate::snapshot::{
    DirectionPolicy, EndpointPolicy, EntryAction, L7Set, Origin, OriginId, PeerSet, PolicyEntry, Proto, ProtoMatch,
    ResolveError, Snapshot,
};

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedPort {
    /// Name (lower case).
    pub name: String,
    /// Number.
    pub port: u16,
    /// Protocol (IP protocol number: 6 TCP, 17 UDP, 132 SCTP).
    #[serde(with = "proto_number")]
    pub protocol: Proto,
}

mod proto_number {
    use super::Proto;
    pub(super) fn serialize<S: serde::Serializer>(p: &Proto, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(p.number())
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Proto, D::Error> {
        <u8 as serde::Deserialize>::deserialize(d).map(Proto::from_number)
    }
}

/// A workload endpoint (pod).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Pod labels (`k8s:` unless the key says otherwise).
    pub labels: BTreeMap<String, String>,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Named container ports.
    pub named_ports: Vec<NamedPort>,
    /// Service account (`default` when none).
    pub service_account: Option<String>,
}

/// A Kubernetes service.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service labels (for `k8sServiceSelector`).
    pub labels: BTreeMap<String, String>,
    /// Pod selector; none for services backed by external endpoints.
    pub selector: Option<BTreeMap<String, String>>,
    /// Backend addresses of a selector-less service.
    pub backends: Vec<IpAddr>,
}

/// Everything besides policies that resolution needs.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Environment {
    /// Local cluster name.
    pub cluster: String,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Namespace labels.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// What the DNS proxy learned: name → addresses.
    pub fqdn_cache: BTreeMap<String, Vec<IpAddr>>,
    /// Services.
    pub services: Vec<Service>,
    /// Secret values by `namespace/name`.
    pub secrets: BTreeMap<String, String>,
}

impl Default for Environment {
    fn default() -> Self {
        Self {
            cluster: labels::DEFAULT_CLUSTER.into(),
            endpoints: vec![],
            namespace_labels: BTreeMap::new(),
            fqdn_cache: BTreeMap::new(),
            services: vec![],
            secrets: BTreeMap::new(),
        }
    }
}

impl SecretSource for Environment {
    fn secret(&self, namespace: &str, name: &str) -> Option<String> {
        self.secrets.get(&format!("{namespace}/{name}")).cloned()
    }
}

impl Environment {
    /// Every label of an endpoint, as Cilium derives them.
    pub fn endpoint_labels(&self, ep: &Endpoint) -> Labels {
        let mut ls: Vec<Label> =
            ep.labels.iter().map(|(k, v)| Label::new(LabelKey::parse(k, LabelSource::K8s), v.clone())).collect();
        ls.push(Label::new(LabelKey::k8s(labels::POD_NAMESPACE), ep.namespace.clone()));
        let mut ns_labels = self.namespace_labels.get(&ep.namespace).cloned().unwrap_or_default();
        ns_labels.entry("kubernetes.io/metadata.name".into()).or_insert_with(|| ep.namespace.clone());
        for (k, v) in ns_labels {
            ls.push(Label::new(LabelKey::k8s(format!("{}{k}", labels::NAMESPACE_LABELS_PREFIX)), v));
        }
        ls.push(Label::new(
            LabelKey::k8s(labels::SERVICE_ACCOUNT),
            ep.service_account.clone().unwrap_or_else(|| "default".into()),
        ));
        ls.push(Label::new(LabelKey::k8s(labels::CLUSTER), self.cluster.clone()));
        Labels::new(ls)
    }
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// `inner` is a sub-prefix of (or equal to) `outer`.
fn within(inner: &IpNet, outer: &IpNet) -> bool {
    outer.contains(&inner.network()) && inner.prefix_len() >= outer.prefix_len()
}

/// The merge key of a peer: per selector, as Cilium keeps per-selector policies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PeerKey {
    All,
    Peer(Peer),
    Identity(IdentityId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ActionKind {
    Deny,
    Allow,
    Redirect(L7Parser),
}

#[derive(Default)]
struct Merged {
    peers: Option<PeerSet>,
    origins: Vec<OriginId>,
    http: Vec<(HttpRuleSpec, OriginId)>,
    kafka: Vec<(KafkaRule, OriginId)>,
    dns: Vec<(NamePattern, OriginId)>,
}

type EntryKey = (ProtoMatch, u16, u16, PeerKey, ActionKind);

/// One expanded port of an element: protocol, first and last port, L7 rules, and the named port to
/// resolve (if any).
type L4Item = (ProtoMatch, u16, u16, L7Spec, Option<(String, Protocol)>);

struct Resolver<'a> {
    env: &'a Environment,
    cidr_groups: &'a [CidrGroup],
    identities: BTreeMap<IdentityId, Identity>,
    endpoint_ips: BTreeSet<IpAddr>,
    ip_identity: HashMap<IpAddr, IdentityId>,
    peer_cache: HashMap<Peer, PeerSet>,
    http_cache: HashMap<Vec<HttpRule>, Option<Arc<HttpRuleSet>>>,
    origins: Vec<Origin>,
    origin_ids: HashMap<(usize, String), OriginId>,
    warnings: BTreeSet<String>,
    errors: Vec<ResolveError>,
}

/// Resolves policies against an environment. Identities come from `alloc`, which keeps them stable
/// across calls.
///
/// ```
/// use policy_engine::api::{load_str, LoadOptions};
/// use policy_engine::identity::IdentityAllocator;
/// use policy_engine::resolve::{resolve, Endpoint, Environment};
/// use policy_engine::snapshot::{L4Verdict, Proto};
/// let loaded = load_str("p.yaml", r#"
/// apiVersion: cilium.io/v2
/// kind: CiliumNetworkPolicy
/// metadata: {name: rule1}
/// spec:
///   endpointSelector: {matchLabels: {class: deathstar}}
///   ingress: [{fromEndpoints: [{matchLabels: {org: empire}}], toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]
/// "#, &LoadOptions::default());
/// let ep = |name: &str, org: &str, class: &str| Endpoint {
///     name: name.into(), namespace: "default".into(),
///     labels: [("org".to_string(), org.to_string()), ("class".to_string(), class.to_string())].into(),
///     ..Default::default()
/// };
/// let env = Environment { endpoints: vec![ep("deathstar", "empire", "deathstar"), ep("xwing", "alliance", "xwing")], ..Default::default() };
/// let snap = resolve(&loaded.policies, &[], &env, &mut IdentityAllocator::new(), 1);
/// let ds = snap.endpoint("default", "deathstar").unwrap();
/// let xwing = snap.endpoint("default", "xwing").unwrap().identity;
/// assert!(matches!(ds.ingress.l4_verdict(xwing, Proto::Tcp, 80), L4Verdict::Drop(_)));
/// ```
pub fn resolve(
    policies: &[Policy],
    cidr_groups: &[CidrGroup],
    env: &Environment,
    alloc: &mut IdentityAllocator,
    version: u64,
) -> Snapshot {
    let mut r = Resolver {
        env,
        cidr_groups,
        identities: BTreeMap::new(),
        endpoint_ips: env.endpoints.iter().flat_map(|e| e.ips.iter().copied()).collect(),
        ip_identity: HashMap::new(),
        peer_cache: HashMap::new(),
        http_cache: HashMap::new(),
        origins: Vec::new(),
        origin_ids: HashMap::new(),
        warnings: BTreeSet::new(),
        errors: Vec::new(),
    };
    let mut ipcache = IpCache::default();
    for (id, name) in reserved::ALL {
        r.identities
            .insert(*id, Identity { id: *id, labels: identity::reserved_labels(name), kind: IdentityKind::Reserved });
    }

    // Endpoint identities, allocated in label order so a fresh allocator is deterministic.
    let all_labels: Vec<Labels> = env.endpoints.iter().map(|e| env.endpoint_labels(e)).collect();
    let id_labels: Vec<Labels> = all_labels.iter().map(Labels::identity_relevant).collect();
    let mut distinct: Vec<&Labels> = id_labels.iter().collect();
    distinct.sort();
    distinct.dedup();
    for l in distinct {
        let id = alloc.endpoint(l);
        r.identities.insert(id, Identity { id, labels: l.clone(), kind: IdentityKind::Endpoint });
    }
    let ep_ids: Vec<IdentityId> = id_labels.iter().map(|l| alloc.endpoint(l)).collect();
    for (ep, id) in env.endpoints.iter().zip(&ep_ids) {
        for ip in &ep.ips {
            r.ip_identity.insert(*ip, *id);
        }
    }

    // CIDR identities for every prefix a selector could name.
    let prefixes = r.collect_prefixes(policies);
    for p in &prefixes {
        let id = alloc.cidr(*p);
        r.identities.insert(id, Identity { id, labels: identity::cidr_labels(p), kind: IdentityKind::Cidr(*p) });
        ipcache.insert(*p, id);
    }
    // Endpoint addresses win over any prefix of the same length.
    for (ep, id) in env.endpoints.iter().zip(&ep_ids) {
        for ip in &ep.ips {
            ipcache.insert(host_prefix(*ip), *id);
        }
    }

    for p in policies {
        for w in &p.warnings {
            r.warnings
                .insert(format!("{}: document {} ({} {}): {w}", p.source.file, p.source.document, p.id.kind, p.id));
        }
    }

    let mut endpoints = Vec::with_capacity(env.endpoints.len());
    for ((ep, labels), (idl, id)) in env.endpoints.iter().zip(all_labels).zip(id_labels.iter().zip(&ep_ids)) {
        let ingress = r.direction(policies, ep, idl, Direction::Ingress);
        let egress = r.direction(policies, ep, idl, Direction::Egress);
        endpoints.push(EndpointPolicy {
            name: ep.name.clone(),
            namespace: ep.namespace.clone(),
            identity: *id,
            ips: ep.ips.clone(),
            labels,
            ingress,
            egress,
        });
    }
    Snapshot {
        version,
        identities: r.identities.into_iter().collect(),
        ipcache,
        endpoints,
        origins: r.origins,
        warnings: r.warnings.into_iter().collect(),
        errors: r.errors,
    }
}

impl Resolver<'_> {
    fn collect_prefixes(&mut self, policies: &[Policy]) -> Vec<IpNet> {
        let mut out = BTreeSet::new();
        for p in policies {
            for rule in &p.rules {
                for el in rule.ingress.iter().chain(&rule.egress) {
                    let Peers::List(peers) = &el.peers else { continue };
                    for peer in peers {
                        match peer {
                            Peer::Cidr { prefix, except } => {
                                out.insert(*prefix);
                                out.extend(except.iter().copied());
                            }
                            Peer::CidrGroup { group, except } => {
                                out.extend(self.groups(group).into_iter().flat_map(|g| g.cidrs.iter().copied()));
                                out.extend(except.iter().copied());
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        for ips in self.env.fqdn_cache.values() {
            out.extend(ips.iter().filter(|ip| !self.endpoint_ips.contains(ip)).map(|ip| host_prefix(*ip)));
        }
        for svc in &self.env.services {
            out.extend(svc.backends.iter().filter(|ip| !self.endpoint_ips.contains(ip)).map(|ip| host_prefix(*ip)));
        }
        // A /0 selects the world identities themselves; it needs no CIDR identity of its own.
        out.into_iter().filter(|p| p.prefix_len() > 0).collect()
    }

    fn groups(&self, group: &CidrGroupRef) -> Vec<&CidrGroup> {
        self.cidr_groups
            .iter()
            .filter(|g| match group {
                CidrGroupRef::Name(n) => &g.name == n,
                CidrGroupRef::Selector(s) => s.matches(&g.labels),
            })
            .collect()
    }

    fn origin(&mut self, policy_idx: usize, policy: &Policy, path: &str) -> OriginId {
        if let Some(id) = self.origin_ids.get(&(policy_idx, path.to_owned())) {
            return *id;
        }
        let id = OriginId(u32::try_from(self.origins.len()).unwrap_or(u32::MAX));
        self.origins.push(Origin { policy: policy.id.clone(), path: path.to_owned(), source: policy.source.clone() });
        self.origin_ids.insert((policy_idx, path.to_owned()), id);
        id
    }

    fn select(&self, pred: impl Fn(&Identity) -> bool) -> PeerSet {
        PeerSet::Ids(self.identities.values().filter(|i| pred(i)).map(|i| i.id).collect::<Vec<_>>().into())
    }

    fn select_labels(&self, sels: &[Selector]) -> PeerSet {
        self.select(|i| sels.iter().any(|s| s.matches(&i.labels)))
    }

    fn cidr_set(&self, prefix: &IpNet, except: &[IpNet]) -> Vec<IdentityId> {
        let mut ids: Vec<IdentityId> = self
            .identities
            .values()
            .filter(|i| match &i.kind {
                IdentityKind::Cidr(p) => within(p, prefix) && !except.iter().any(|e| within(p, e)),
                _ => false,
            })
            .map(|i| i.id)
            .collect();
        if prefix.prefix_len() == 0 {
            ids.push(reserved::WORLD);
            ids.push(if prefix.addr().is_ipv4() { reserved::WORLD_IPV4 } else { reserved::WORLD_IPV6 });
        }
        ids
    }

    fn peer_set(&mut self, peer: &Peer) -> PeerSet {
        if let Some(s) = self.peer_cache.get(peer) {
            return s.clone();
        }
        let set = match peer {
            Peer::Endpoints(sel) => self.select_labels(std::slice::from_ref(sel)),
            Peer::Entity(e) => self.entity_set(*e),
            Peer::Cidr { prefix, except } => ids(self.cidr_set(prefix, except)),
            Peer::CidrGroup { group, except } => {
                let groups = self.groups(group);
                let found = !groups.is_empty();
                let prefixes: Vec<IpNet> = groups.iter().flat_map(|g| g.cidrs.iter().copied()).collect();
                if !found {
                    self.warnings.insert(format!("CIDR group {group} is not defined: it selects nothing"));
                }
                ids(prefixes.iter().flat_map(|p| self.cidr_set(p, except)).collect())
            }
            Peer::Fqdn(pattern) => {
                let re = pattern.to_regex();
                let mut out = Vec::new();
                for (name, addrs) in &self.env.fqdn_cache {
                    if re.is_match(&normalize_name(name)) {
                        for ip in addrs.iter().filter(|ip| !self.endpoint_ips.contains(ip)) {
                            out.extend(self.cidr_identity(&host_prefix(*ip)));
                        }
                    }
                }
                ids(out)
            }
            Peer::Service(svc) => self.service_set(svc),
        };
        self.peer_cache.insert(peer.clone(), set.clone());
        set
    }

    fn cidr_identity(&self, p: &IpNet) -> Option<IdentityId> {
        self.identities.values().find(|i| i.kind == IdentityKind::Cidr(*p)).map(|i| i.id)
    }

    fn entity_set(&self, e: Entity) -> PeerSet {
        let r = |names: &[&str]| names.iter().map(|n| Selector::reserved(n)).collect::<Vec<_>>();
        match e {
            Entity::All => PeerSet::All,
            Entity::None => PeerSet::Ids(Arc::from([])),
            Entity::World => self.select_labels(&r(&["world", "world-ipv4", "world-ipv6"])),
            Entity::WorldIpv4 => self.select_labels(&r(&["world-ipv4"])),
            Entity::WorldIpv6 => self.select_labels(&r(&["world-ipv6"])),
            Entity::Cluster | Entity::ClusterMesh => {
                let mut sels = r(&["host", "remote-node", "init", "ingress", "health", "unmanaged", "kube-apiserver"]);
                let cluster = LabelKey::k8s(labels::CLUSTER);
                sels.push(if e == Entity::Cluster {
                    Selector::new(vec![crate::selector::Requirement::In(cluster, vec![self.env.cluster.clone()])])
                } else {
                    Selector::new(vec![crate::selector::Requirement::Exists(cluster)])
                });
                self.select_labels(&sels)
            }
            Entity::Host => self.select_labels(&r(&["host"])),
            Entity::RemoteNode => self.select_labels(&r(&["remote-node"])),
            Entity::KubeApiserver => self.select_labels(&r(&["kube-apiserver"])),
            Entity::Health => self.select_labels(&r(&["health"])),
            Entity::Init => self.select_labels(&r(&["init"])),
            Entity::Unmanaged => self.select_labels(&r(&["unmanaged"])),
            Entity::Ingress => self.select_labels(&r(&["ingress"])),
        }
    }

    fn service_set(&mut self, svc: &ServiceRef) -> PeerSet {
        let services: Vec<&Service> = self
            .env
            .services
            .iter()
            .filter(|s| match svc {
                ServiceRef::Name { namespace, name } => &s.namespace == namespace && &s.name == name,
                ServiceRef::Selector { namespace, selector } => {
                    namespace.as_ref().is_none_or(|ns| ns == &s.namespace)
                        && selector.matches(&Labels::new(
                            s.labels.iter().map(|(k, v)| Label::new(LabelKey::k8s(k.clone()), v.clone())),
                        ))
                }
            })
            .collect();
        if services.is_empty() {
            self.warnings.insert(format!("toServices: no service matches {svc}: it selects nothing"));
        }
        let mut out = Vec::new();
        for s in services {
            match &s.selector {
                Some(sel) => {
                    for ep in self.env.endpoints.iter().filter(|ep| ep.namespace == s.namespace) {
                        if sel.iter().all(|(k, v)| ep.labels.get(k) == Some(v)) {
                            out.extend(ep.ips.first().and_then(|ip| self.ip_identity.get(ip)).copied());
                        }
                    }
                }
                None => {
                    for ip in s.backends.iter().filter(|ip| !self.endpoint_ips.contains(ip)) {
                        out.extend(self.cidr_identity(&host_prefix(*ip)));
                    }
                }
            }
        }
        ids(out)
    }

    fn direction(&mut self, policies: &[Policy], ep: &Endpoint, id_labels: &Labels, dir: Direction) -> DirectionPolicy {
        let mut out = DirectionPolicy::default();
        let mut merged: BTreeMap<EntryKey, Merged> = BTreeMap::new();
        for (pi, policy) in policies.iter().enumerate() {
            for rule in &policy.rules {
                let Subject::Endpoints(subject) = &rule.subject else { continue };
                if !subject.matches(id_labels) {
                    continue;
                }
                let rule_origin = self.origin(pi, policy, &rule.path);
                out.selected_by.push(rule_origin);
                if rule.default_deny(dir) {
                    out.enforced = true;
                    out.enforced_by.push(rule_origin);
                }
                for el in rule.elements(dir) {
                    let origin = self.origin(pi, policy, &el.path);
                    self.expand(el, ep, dir, rule.default_deny(dir), origin, &mut merged);
                }
            }
        }
        out.entries = self.finish(merged);
        out
    }

    /// Expands one element into raw entries, merged per (protocol, ports, selector, action).
    fn expand(
        &mut self,
        el: &Element,
        ep: &Endpoint,
        dir: Direction,
        rule_default_deny: bool,
        origin: OriginId,
        merged: &mut BTreeMap<EntryKey, Merged>,
    ) {
        if el.action == Action::Allow && el.unsupported.is_some() {
            return;
        }
        let peers: Vec<(PeerKey, PeerSet)> = match &el.peers {
            Peers::All => vec![(PeerKey::All, PeerSet::All)],
            Peers::List(list) => list.iter().map(|p| (PeerKey::Peer(p.clone()), self.peer_set(p))).collect(),
        };
        // (proto, start, end, l7, named-port restriction)
        let mut l4: Vec<L4Item> = Vec::new();
        match &el.l4 {
            L4Spec::Any => l4.push((ProtoMatch::Any, 0, u16::MAX, L7Spec::None, None)),
            L4Spec::Icmp(types) => {
                for t in types {
                    let p = if t.family == IcmpFamily::V4 { Proto::Icmp } else { Proto::Icmpv6 };
                    l4.push((ProtoMatch::Only(p), u16::from(t.icmp_type), u16::from(t.icmp_type), L7Spec::None, None));
                }
            }
            L4Spec::Ports(rules) => {
                for pr in rules {
                    if el.action == Action::Allow && pr.unsupported.is_some() {
                        continue;
                    }
                    for pp in &pr.ports {
                        let protos: &[Proto] = match pp.protocol {
                            Protocol::Tcp => &[Proto::Tcp],
                            Protocol::Udp => &[Proto::Udp],
                            Protocol::Sctp => &[Proto::Sctp],
                            Protocol::Any => &[Proto::Tcp, Proto::Udp, Proto::Sctp],
                        };
                        for proto in protos {
                            match &pp.port {
                                PortSel::All => l4.push((ProtoMatch::Only(*proto), 0, u16::MAX, pr.l7.clone(), None)),
                                PortSel::Range(a, b) => {
                                    l4.push((ProtoMatch::Only(*proto), *a, *b, pr.l7.clone(), None))
                                }
                                PortSel::Named(name) => {
                                    l4.push((
                                        ProtoMatch::Only(*proto),
                                        0,
                                        0,
                                        pr.l7.clone(),
                                        Some((name.clone(), pp.protocol)),
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
        for (proto, start, end, l7, named) in l4 {
            let kinds: Vec<(ActionKind, &L7Spec)> = match (el.action, l7.parser()) {
                (Action::Deny, _) => vec![(ActionKind::Deny, &l7)],
                (Action::Allow, None) => vec![(ActionKind::Allow, &l7)],
                (Action::Allow, Some(p)) if rule_default_deny => vec![(ActionKind::Redirect(p), &l7)],
                // Cilium's ensureWildcard: L7 rules of a rule without default deny only add visibility.
                (Action::Allow, Some(p)) => vec![(ActionKind::Redirect(p), &l7), (ActionKind::Allow, &L7Spec::None)],
            };
            for (pkey, pset) in &peers {
                let targets: Vec<(PeerKey, PeerSet, u16, u16)> = match (&named, dir) {
                    (None, _) => vec![(pkey.clone(), pset.clone(), start, end)],
                    // Ingress: the port is the selected endpoint's own.
                    (Some((name, _)), Direction::Ingress) => ep
                        .named_ports
                        .iter()
                        .filter(|np| &np.name == name && proto.matches(np.protocol))
                        .map(|np| (pkey.clone(), pset.clone(), np.port, np.port))
                        .collect(),
                    (Some((name, _)), Direction::Egress) => self.egress_named_ports(name, proto, pset),
                };
                for (key, set, s, e) in targets {
                    for (kind, spec) in &kinds {
                        let m = merged.entry((proto, s, e, key.clone(), *kind)).or_default();
                        m.peers.get_or_insert_with(|| set.clone());
                        if !m.origins.contains(&origin) {
                            m.origins.push(origin);
                        }
                        match spec {
                            L7Spec::None => {}
                            L7Spec::Http(rules) if rules.is_empty() => m.http.push((HttpRuleSpec::default(), origin)),
                            L7Spec::Http(rules) => m.http.extend(rules.iter().map(|r| (r.clone(), origin))),
                            L7Spec::Kafka(rules) if rules.is_empty() => m.kafka.push((KafkaRule::any(), origin)),
                            L7Spec::Kafka(rules) => m.kafka.extend(rules.iter().map(|r| (r.clone(), origin))),
                            L7Spec::Dns(rules) if rules.is_empty() => {
                                m.dns.push((NamePattern::pattern_unchecked("*"), origin))
                            }
                            L7Spec::Dns(rules) => m.dns.extend(rules.iter().map(|r| (r.clone(), origin))),
                        }
                    }
                }
            }
        }
    }

    /// Resolves a named egress port against every peer endpoint (one entry per peer identity and port).
    fn egress_named_ports(&self, name: &str, proto: ProtoMatch, peers: &PeerSet) -> Vec<(PeerKey, PeerSet, u16, u16)> {
        let mut out = Vec::new();
        for peer in &self.env.endpoints {
            let Some(id) = peer.ips.first().and_then(|ip| self.ip_identity.get(ip)).copied() else { continue };
            if !peers.contains(id) {
                continue;
            }
            for np in peer.named_ports.iter().filter(|np| np.name == name && proto.matches(np.protocol)) {
                let item = (PeerKey::Identity(id), ids(vec![id]), np.port, np.port);
                if !out.contains(&item) {
                    out.push(item);
                }
            }
        }
        out
    }

    fn finish(&mut self, merged: BTreeMap<EntryKey, Merged>) -> Vec<PolicyEntry> {
        // Different parsers for the same selector and port cannot be merged (Cilium errors out).
        let mut parsers: BTreeMap<(ProtoMatch, u16, u16, PeerKey), BTreeSet<L7Parser>> = BTreeMap::new();
        for (proto, s, e, key, kind) in merged.keys() {
            if let ActionKind::Redirect(p) = kind {
                parsers.entry((*proto, *s, *e, key.clone())).or_default().insert(*p);
            }
        }
        let mut entries = Vec::with_capacity(merged.len());
        for ((proto, start, end, key, kind), m) in merged {
            let Some(peers) = m.peers.clone() else { continue };
            let action = match kind {
                ActionKind::Deny => EntryAction::Deny,
                ActionKind::Allow => EntryAction::Allow,
                ActionKind::Redirect(parser) => {
                    if parsers.get(&(proto, start, end, key.clone())).is_some_and(|set| set.len() > 1) {
                        let origins =
                            m.origins.iter().filter_map(|o| self.origins.get(o.0 as usize).cloned()).collect();
                        self.errors.push(ResolveError {
                            message: format!("cannot merge conflicting L7 parsers on port {start}-{end}/{proto:?}: the port rule allows nothing"),
                            origins,
                        });
                        continue;
                    }
                    match self.compile(parser, &m) {
                        Some(a) => a,
                        None => continue,
                    }
                }
            };
            entries.push(PolicyEntry { peers, proto, port_start: start, port_end: end, action, origins: m.origins });
        }
        entries
    }

    fn compile(&mut self, parser: L7Parser, m: &Merged) -> Option<EntryAction> {
        let (rules, rule_origins): (L7Set, Vec<OriginId>) = match parser {
            L7Parser::Http => {
                let specs: Vec<HttpRule> = m.http.iter().map(|(s, _)| s.to_rule(self.env)).collect();
                let set = match self.http_cache.get(&specs) {
                    Some(s) => s.clone(),
                    None => {
                        let compiled = match HttpRuleSet::compile(specs.clone()) {
                            Ok(s) => Some(Arc::new(s)),
                            Err(e) => {
                                let origins =
                                    m.origins.iter().filter_map(|o| self.origins.get(o.0 as usize).cloned()).collect();
                                self.errors.push(ResolveError {
                                    message: format!("{e}: the port rule allows nothing"),
                                    origins,
                                });
                                None
                            }
                        };
                        self.http_cache.insert(specs, compiled.clone());
                        compiled
                    }
                };
                (L7Set::Http(set?), m.http.iter().map(|(_, o)| *o).collect())
            }
            L7Parser::Kafka => {
                let set = KafkaRuleSet::new(m.kafka.iter().map(|(r, _)| r.clone()).collect());
                (L7Set::Kafka(Arc::new(set)), m.kafka.iter().map(|(_, o)| *o).collect())
            }
            L7Parser::Dns => {
                let set = DnsRuleSet::new(m.dns.iter().map(|(r, _)| r.clone()).collect());
                (L7Set::Dns(Arc::new(set)), m.dns.iter().map(|(_, o)| *o).collect())
            }
        };
        Some(EntryAction::Redirect { rules, rule_origins: rule_origins.into() })
    }
}

fn ids(mut v: Vec<IdentityId>) -> PeerSet {
    v.sort_unstable();
    v.dedup();
    PeerSet::Ids(v.into())
}

#[cfg(test)]
mod tests {
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
}
