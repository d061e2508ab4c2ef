//! Resolution: validated policies + the cluster's endpoints → a [`Snapshot`].
//!
//! Steps: label every endpoint the way Cilium does (pod labels, namespace, namespace labels, service
//! account, cluster), keep the security-relevant ones and allocate identities; give every prefix the
//! policies can select (CIDRs, CIDR groups, service backends) a CIDR identity and build the ipcache;
//! give every `toFQDNs` selector an identity of its own (what the DNS proxy learns is matched to
//! it at run time, [`crate::fqdn`]); turn each selector into the set of identities it selects
//! (once per distinct selector); then, per endpoint and direction, expand the selecting rules into entries, merge entries
//! with the same selector and port, and compile their L7 rules (once per distinct rule list).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::dns::{DnsRuleSet, NamePattern};
use crate::fqdn::FqdnSelectors;
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
    /// Pod annotations (Porin reads [`crate::visibility::ANNOTATION`]).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// This endpoint's policy is in audit mode (also when [`Environment::policy_audit_mode`]).
    #[serde(default)]
    pub policy_audit_mode: bool,
    /// The node it runs on (none: this node).
    #[serde(default)]
    pub node: Option<String>,
}

pub use crate::services::Service;

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
    /// Namespace annotations (a pod without [`crate::visibility::ANNOTATION`] takes its
    /// namespace's).
    pub namespace_annotations: BTreeMap<String, BTreeMap<String, String>>,
    /// Every endpoint's policy is in audit mode (Cilium's `policy-audit-mode`).
    pub policy_audit_mode: bool,
    /// The other nodes' own addresses (identity `remote-node`).
    pub remote_node_ips: Vec<IpAddr>,
    /// This node's name, where endpoints name theirs (none: every endpoint is this node's).
    pub node: Option<String>,
    /// Every node's own addresses, by name (this node's too): where a connection to another node's
    /// endpoint is tunnelled to.
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// The mesh requires authentication for all traffic between endpoints on different nodes
    /// (besides what policies require with `authentication: {mode: required}`).
    pub authentication_required: bool,
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
            namespace_annotations: BTreeMap::new(),
            policy_audit_mode: false,
            remote_node_ips: vec![],
            node: None,
            nodes: BTreeMap::new(),
            authentication_required: false,
        }
    }
}

impl SecretSource for Environment {
    fn secret(&self, namespace: &str, name: &str) -> Option<String> {
        self.secrets.get(&format!("{namespace}/{name}")).cloned()
    }
}

impl Environment {
    /// The endpoints' distinct identity label sets, in the order identities are allocated for them
    /// (sorted: a fresh allocator numbers them the same on every node).
    pub fn identity_label_sets(&self) -> Vec<Labels> {
        let mut sets: Vec<Labels> =
            self.endpoints.iter().map(|e| self.endpoint_labels(e).identity_relevant()).collect();
        sets.sort();
        sets.dedup();
        sets
    }

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
    /// Some merged element requires authentication.
    auth: bool,
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
    fqdn_ids: BTreeMap<NamePattern, IdentityId>,
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
        fqdn_ids: BTreeMap::new(),
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
    for l in env.identity_label_sets() {
        let id = alloc.endpoint(&l);
        r.identities.insert(id, Identity { id, labels: l.clone(), kind: IdentityKind::Endpoint });
    }
    let ep_ids: Vec<IdentityId> = id_labels.iter().map(|l| alloc.endpoint(l)).collect();
    for (ep, id) in env.endpoints.iter().zip(&ep_ids) {
        for ip in &ep.ips {
            r.ip_identity.insert(*ip, *id);
        }
    }

    // FQDN selector identities (see `crate::fqdn`).
    let fqdn_patterns = collect_fqdn(policies);
    for pat in &fqdn_patterns {
        let key = crate::fqdn::selector_key(pat);
        let id = alloc.fqdn(&key);
        r.identities.insert(id, Identity { id, labels: identity::fqdn_labels(&key), kind: IdentityKind::Fqdn(key) });
        r.fqdn_ids.insert(pat.clone(), id);
    }

    // CIDR identities for every prefix a selector could name.
    let prefixes = r.collect_prefixes(policies);
    for p in &prefixes {
        let id = alloc.cidr(*p);
        r.identities.insert(id, Identity { id, labels: identity::cidr_labels(p), kind: IdentityKind::Cidr(*p) });
        ipcache.insert(*p, id);
    }
    // Other nodes are `remote-node`; endpoint addresses win over any prefix of the same length.
    for ip in &env.remote_node_ips {
        ipcache.insert(host_prefix(*ip), identity::reserved::REMOTE_NODE);
    }
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

    // The mesh requires authentication between nodes: every endpoint identity, as a peer of
    // ingress.
    let authenticated_peers: Arc<[IdentityId]> = if env.authentication_required {
        let mut ids = ep_ids.clone();
        ids.sort_unstable();
        ids.dedup();
        ids.into()
    } else {
        Arc::from([])
    };
    let mut endpoints = Vec::with_capacity(env.endpoints.len());
    for ((ep, labels), (idl, id)) in env.endpoints.iter().zip(all_labels).zip(id_labels.iter().zip(&ep_ids)) {
        let mut ingress = r.direction(policies, ep, idl, Direction::Ingress);
        let mut egress = r.direction(policies, ep, idl, Direction::Egress);
        let audit = env.policy_audit_mode || ep.policy_audit_mode;
        let visibility = r.visibility(ep);
        for (dp, dir) in [(&mut ingress, Direction::Ingress), (&mut egress, Direction::Egress)] {
            dp.audit = audit;
            dp.visibility = visibility.iter().filter(|v| v.direction == dir).copied().collect();
        }
        ingress.authenticated_peers = authenticated_peers.clone();
        endpoints.push(EndpointPolicy {
            name: ep.name.clone(),
            namespace: ep.namespace.clone(),
            identity: *id,
            ips: ep.ips.clone(),
            labels,
            ingress,
            egress,
            local: ep.node.is_none() || ep.node == env.node,
            node: ep.node.clone(),
        });
    }
    let fqdn = FqdnSelectors::new(r.fqdn_ids.iter().map(|(p, id)| (p.clone(), *id)));
    Snapshot {
        version,
        identities: r.identities.into_iter().collect(),
        ipcache,
        endpoints,
        origins: r.origins,
        fqdn,
        warnings: r.warnings.into_iter().collect(),
        errors: r.errors,
        services: env.services.clone(),
        nodes: env.nodes.clone(),
        authentication_required: env.authentication_required,
    }
}

impl Resolver<'_> {
    /// The endpoint's visibility annotation (its own, else its namespace's), parsed. A value that
    /// does not parse is a resolution error naming the pod; the pod gets no visibility (its
    /// policy is enforced as written).
    fn visibility(&mut self, ep: &Endpoint) -> Vec<crate::visibility::Visibility> {
        let env = self.env;
        let own = ep.annotations.get(crate::visibility::ANNOTATION).map(|v| (v, "pod"));
        let inherited = || {
            env.namespace_annotations
                .get(&ep.namespace)
                .and_then(|a| a.get(crate::visibility::ANNOTATION))
                .map(|v| (v, "namespace"))
        };
        let Some((value, on)) = own.or_else(inherited) else { return vec![] };
        match crate::visibility::parse(value) {
            Ok(v) => v,
            Err(why) => {
                self.errors.push(ResolveError {
                    message: format!(
                        "pod {}/{}: {on} annotation {}: {why} (no L7 visibility for it)",
                        ep.namespace,
                        ep.name,
                        crate::visibility::ANNOTATION
                    ),
                    origins: vec![],
                });
                vec![]
            }
        }
    }
}

/// Every `toFQDNs` selector of the policies, once each, in a stable order.
fn collect_fqdn(policies: &[Policy]) -> BTreeSet<NamePattern> {
    let mut out = BTreeSet::new();
    for p in policies {
        for rule in &p.rules {
            for el in rule.ingress.iter().chain(&rule.egress) {
                let Peers::List(peers) = &el.peers else { continue };
                out.extend(peers.iter().filter_map(|peer| match peer {
                    Peer::Fqdn(pat) => Some(pat.clone()),
                    _ => None,
                }));
            }
        }
    }
    out
}

fn ids(mut v: Vec<IdentityId>) -> PeerSet {
    v.sort_unstable();
    v.dedup();
    PeerSet::Ids(v.into())
}

mod entries;
mod peers;
#[cfg(test)]
mod tests;
