//! The validated policy model: what a CiliumNetworkPolicy / CCNP / NetworkPolicy means after Cilium's
//! validation and namespace defaulting, before it is resolved against endpoints.
//!
//! Invalid states are unrepresentable here: a port rule has at most one L7 parser, a peer list has one
//! kind of peer, CIDRs are parsed prefixes, Kafka roles are API-key sets. Features Cilium accepts but
//! Porin cannot enforce are carried as `unsupported` reasons so resolution can fail closed.

use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;

use crate::dns::NamePattern;
use crate::http::{HeaderMatch, HeaderMatcher, HeaderMatcherKind, HttpRule, MatchAction, MismatchAction, StrMatch};
use crate::kafka::KafkaRule;
use crate::selector::Selector;

/// The kind of a policy object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    /// `cilium.io/v2` CiliumNetworkPolicy (namespaced).
    CiliumNetworkPolicy,
    /// `cilium.io/v2` CiliumClusterwideNetworkPolicy.
    CiliumClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Self::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            Self::NetworkPolicy => "NetworkPolicy",
        })
    }
}

/// Names a policy object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    /// Kind.
    pub kind: PolicyKind,
    /// Namespace (none for clusterwide policies).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl PolicyRef {
    /// Whether a user's reference (`name` or `namespace/name`) names this policy.
    pub fn is_named(&self, reference: &str) -> bool {
        reference == self.name || reference == self.to_string()
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Where a policy came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Source {
    /// File name as given.
    pub file: Arc<str>,
    /// 1-based document index in the file.
    pub document: usize,
}

/// A validated policy object.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Name.
    pub id: PolicyRef,
    /// Origin.
    pub source: Source,
    /// Its rules (`spec` and every `specs[i]`).
    pub rules: Vec<Rule>,
    /// Features Porin accepts but cannot enforce (enforced fail-closed), with their field paths.
    pub warnings: Vec<String>,
}

/// Traffic direction, from the point of view of the selected endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic into the endpoint.
    Ingress,
    /// Traffic out of the endpoint.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// What a rule selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Endpoints (pods).
    Endpoints(Selector),
    /// Nodes (host policy).
    Nodes(Selector),
}

/// One validated rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Field path of the rule (`spec`, `specs[2]`).
    pub path: String,
    /// Policy namespace (secrets and services without a namespace live here).
    pub namespace: Option<String>,
    /// What it applies to (namespace already applied).
    pub subject: Subject,
    /// Ingress allow and deny elements.
    pub ingress: Vec<Element>,
    /// Egress allow and deny elements.
    pub egress: Vec<Element>,
    /// Whether the rule puts selected endpoints into default deny for ingress.
    pub default_deny_ingress: bool,
    /// Whether the rule puts selected endpoints into default deny for egress.
    pub default_deny_egress: bool,
}

impl Rule {
    /// Elements of one direction.
    pub fn elements(&self, dir: Direction) -> &[Element] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The default-deny switch of one direction.
    pub fn default_deny(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.default_deny_ingress,
            Direction::Egress => self.default_deny_egress,
        }
    }
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// An `ingress` / `egress` element.
    Allow,
    /// An `ingressDeny` / `egressDeny` element.
    Deny,
}

/// One `ingress` / `ingressDeny` / `egress` / `egressDeny` element.
#[derive(Clone, Debug)]
pub struct Element {
    /// Field path (`spec.ingress[0]`).
    pub path: String,
    /// Allow or deny.
    pub action: Action,
    /// Peers.
    pub peers: Peers,
    /// Ports or ICMP types.
    pub l4: L4Spec,
    /// Set when the element uses a feature Porin cannot enforce: it then allows nothing.
    pub unsupported: Option<String>,
    /// `authentication: {mode: required}`: what it allows must come authenticated (from another
    /// node: through the mTLS tunnel between node proxies; anything else is dropped with
    /// `AUTH_REQUIRED`).
    pub auth_required: bool,
}

/// The peers of an element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// No peer field was given (with `toPorts` / `icmps`): every peer.
    All,
    /// These peers (an explicitly empty list selects none).
    List(Vec<Peer>),
}

/// One peer selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Endpoints by labels (namespace defaulting applied).
    Endpoints(Selector),
    /// A reserved entity.
    Entity(Entity),
    /// A CIDR with exceptions.
    Cidr {
        /// The prefix.
        prefix: IpNet,
        /// Prefixes left out.
        except: Vec<IpNet>,
    },
    /// CiliumCIDRGroups.
    CidrGroup {
        /// Which groups.
        group: CidrGroupRef,
        /// Prefixes left out.
        except: Vec<IpNet>,
    },
    /// DNS names (IPs learned by the DNS proxy).
    Fqdn(NamePattern),
    /// Kubernetes services (their backends).
    Service(ServiceRef),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Endpoints(s) => write!(f, "endpoints {s}"),
            Self::Entity(e) => write!(f, "entity {e}"),
            Self::Cidr { prefix, except } if except.is_empty() => write!(f, "cidr {prefix}"),
            Self::Cidr { prefix, except } => {
                let ex: Vec<String> = except.iter().map(ToString::to_string).collect();
                write!(f, "cidr {prefix} except {}", ex.join(","))
            }
            Self::CidrGroup { group, .. } => write!(f, "cidr group {group}"),
            Self::Fqdn(p) => write!(f, "fqdn {p}"),
            Self::Service(s) => write!(f, "service {s}"),
        }
    }
}

/// Which CIDR groups.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CidrGroupRef {
    /// By name.
    Name(String),
    /// By labels.
    Selector(Selector),
}

impl fmt::Display for CidrGroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Selector(s) => write!(f, "{s}"),
        }
    }
}

/// Which services.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceRef {
    /// By name.
    Name {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// By labels.
    Selector {
        /// Namespace (none: every namespace).
        namespace: Option<String>,
        /// Labels of the service.
        selector: Selector,
    },
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Selector { namespace: Some(ns), selector } => write!(f, "{ns}/{selector}"),
            Self::Selector { namespace: None, selector } => write!(f, "{selector}"),
        }
    }
}

/// Cilium's entities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    /// Everything.
    All,
    /// Outside the cluster.
    World,
    /// Outside the cluster, IPv4.
    WorldIpv4,
    /// Outside the cluster, IPv6.
    WorldIpv6,
    /// The local cluster (endpoints and cluster infrastructure).
    Cluster,
    /// The local host.
    Host,
    /// Other nodes.
    RemoteNode,
    /// The Kubernetes API server.
    KubeApiserver,
    /// Health endpoints.
    Health,
    /// Endpoints still being initialised.
    Init,
    /// Endpoints Cilium does not manage.
    Unmanaged,
    /// The ingress proxy.
    Ingress,
    /// Every cluster of the mesh.
    ClusterMesh,
    /// Nothing.
    None,
}

impl Entity {
    /// Every entity and its CRD name.
    pub const ALL: &'static [(&'static str, Entity)] = &[
        ("all", Entity::All),
        ("world", Entity::World),
        ("world-ipv4", Entity::WorldIpv4),
        ("world-ipv6", Entity::WorldIpv6),
        ("cluster", Entity::Cluster),
        ("host", Entity::Host),
        ("remote-node", Entity::RemoteNode),
        ("kube-apiserver", Entity::KubeApiserver),
        ("health", Entity::Health),
        ("init", Entity::Init),
        ("unmanaged", Entity::Unmanaged),
        ("ingress", Entity::Ingress),
        ("cluster-mesh", Entity::ClusterMesh),
        ("none", Entity::None),
    ];

    /// Parses a CRD entity name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, e)| *e)
    }

    /// The CRD name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, e)| *e == self).map_or("?", |(n, _)| n)
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Layer-4 part of an element.
#[derive(Clone, Debug)]
pub enum L4Spec {
    /// No `toPorts` and no `icmps`: every protocol and port (ICMP included).
    Any,
    /// `toPorts`.
    Ports(Vec<PortRule>),
    /// `icmps`.
    Icmp(Vec<IcmpType>),
}

/// A transport protocol in a port rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// TCP, UDP and SCTP.
    Any,
    /// An IP protocol without ports (Cilium's extended IP protocols).
    Extended(ExtendedProto),
}

/// IP protocols without transport ports that policy can name (Cilium's
/// `--enable-extended-ip-protocols` list). A port, when given, must be `0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExtendedProto {
    /// Virtual Router Redundancy Protocol (112).
    Vrrp,
    /// Internet Group Management Protocol (2).
    Igmp,
    /// Generic Routing Encapsulation (47).
    Gre,
    /// IP in IP (4).
    Ipip,
    /// IPv6 encapsulated in IPv4 (41).
    Ipv6,
    /// Encapsulating Security Payload (50).
    Esp,
    /// Authentication Header (51).
    Ah,
}

impl ExtendedProto {
    /// Every extended protocol.
    pub const ALL: [Self; 7] = [Self::Vrrp, Self::Igmp, Self::Gre, Self::Ipip, Self::Ipv6, Self::Esp, Self::Ah];

    /// The name policies use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vrrp => "VRRP",
            Self::Igmp => "IGMP",
            Self::Gre => "GRE",
            Self::Ipip => "IPIP",
            Self::Ipv6 => "IPV6",
            Self::Esp => "ESP",
            Self::Ah => "AH",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Vrrp => 112,
            Self::Igmp => 2,
            Self::Gre => 47,
            Self::Ipip => 4,
            Self::Ipv6 => 41,
            Self::Esp => 50,
            Self::Ah => 51,
        }
    }
}

impl Protocol {
    /// Parses Cilium's protocol names (case-insensitive; empty = ANY).
    pub fn parse(s: &str) -> Option<Self> {
        let upper = s.to_ascii_uppercase();
        Some(match upper.as_str() {
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            "SCTP" => Self::Sctp,
            "ANY" | "" => Self::Any,
            other => Self::Extended(ExtendedProto::ALL.into_iter().find(|e| e.name() == other)?),
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Any => "ANY",
            Self::Extended(e) => e.name(),
        })
    }
}

/// Which ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSel {
    /// Every port (`0` or none).
    All,
    /// `start..=end`.
    Range(u16, u16),
    /// A named container port, resolved per endpoint.
    Named(String),
}

impl fmt::Display for PortSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Range(a, b) if a == b => write!(f, "{a}"),
            Self::Range(a, b) => write!(f, "{a}-{b}"),
            Self::Named(n) => f.write_str(n),
        }
    }
}

/// A port and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortProto {
    /// Port(s).
    pub port: PortSel,
    /// Protocol.
    pub protocol: Protocol,
}

/// One `toPorts` entry.
#[derive(Clone, Debug)]
pub struct PortRule {
    /// Field path.
    pub path: String,
    /// Ports (never empty: no ports means every port, any protocol).
    pub ports: Vec<PortProto>,
    /// L7 rules.
    pub l7: L7Spec,
    /// Set when the port rule needs a feature Porin cannot enforce (TLS interception, SNI, listeners):
    /// it then allows nothing.
    pub unsupported: Option<String>,
}

/// The L7 rules of a port rule: at most one parser.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum L7Spec {
    /// L4 only.
    None,
    /// HTTP (an empty list allows every request but still goes through the proxy).
    Http(Vec<HttpRuleSpec>),
    /// Kafka.
    Kafka(Vec<KafkaRule>),
    /// DNS.
    Dns(Vec<NamePattern>),
}

/// Which L7 parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L7Parser {
    /// HTTP/1.1, HTTP/2, gRPC.
    Http,
    /// Kafka.
    Kafka,
    /// DNS.
    Dns,
}

impl fmt::Display for L7Parser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http => "http",
            Self::Kafka => "kafka",
            Self::Dns => "dns",
        })
    }
}

impl L7Spec {
    /// The parser, if any.
    pub fn parser(&self) -> Option<L7Parser> {
        match self {
            Self::None => None,
            Self::Http(_) => Some(L7Parser::Http),
            Self::Kafka(_) => Some(L7Parser::Kafka),
            Self::Dns(_) => Some(L7Parser::Dns),
        }
    }
}

/// ICMP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IcmpFamily {
    /// ICMP.
    V4,
    /// ICMPv6.
    V6,
}

/// One allowed ICMP type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IcmpType {
    /// Family.
    pub family: IcmpFamily,
    /// Type number.
    pub icmp_type: u8,
}

/// A validated HTTP rule as written in a CNP, before secrets are read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HttpRuleSpec {
    /// Method regex.
    pub method: Option<String>,
    /// Path regex.
    pub path: Option<String>,
    /// Host regex.
    pub host: Option<String>,
    /// `headers`.
    pub headers: Vec<HeaderMatcher>,
    /// `headerMatches`.
    pub header_matches: Vec<HeaderMatchSpec>,
}

/// A validated `headerMatches` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeaderMatchSpec {
    /// Lower-case header name.
    pub name: String,
    /// Inline value (also the fallback when the secret is missing).
    pub value: Option<String>,
    /// Secret `(namespace, name)`.
    pub secret: Option<(String, String)>,
    /// Mismatch action.
    pub mismatch: MismatchAction,
}

/// Where secret values come from.
pub trait SecretSource {
    /// The value of secret `namespace/name`, if known.
    fn secret(&self, namespace: &str, name: &str) -> Option<String>;
}

impl HttpRuleSpec {
    /// The rule the proxy evaluates, with secret values filled in (Cilium's `getHTTPRule`): a missing
    /// secret without an inline fallback makes the rule never match.
    pub fn to_rule(&self, secrets: &dyn SecretSource) -> HttpRule {
        let mut headers = self.headers.clone();
        let mut header_matches = Vec::new();
        for hm in &self.header_matches {
            let (value, from_secret) = match &hm.secret {
                Some((ns, name)) => match secrets.secret(ns, name) {
                    Some(v) => (Some(v), true),
                    None => (hm.value.clone(), false),
                },
                None => (hm.value.clone(), false),
            };
            let Some(value) = value.or_else(|| hm.secret.is_none().then(String::new)) else {
                headers.push(HeaderMatcher { name: hm.name.clone(), kind: HeaderMatcherKind::Never });
                continue;
            };
            match (hm.mismatch, from_secret) {
                (MismatchAction::Fail, false) => headers.push(HeaderMatcher {
                    name: hm.name.clone(),
                    kind: if value.is_empty() { HeaderMatcherKind::Present } else { HeaderMatcherKind::Exact(value) },
                }),
                (mismatch, secret) => header_matches.push(HeaderMatch {
                    name: hm.name.clone(),
                    value,
                    secret,
                    match_action: MatchAction::Continue,
                    mismatch_action: mismatch,
                }),
            }
        }
        HttpRule {
            method: self.method.clone().map(StrMatch::Regex),
            path: self.path.clone().map(StrMatch::Regex),
            host: self.host.clone().map(StrMatch::Regex),
            headers,
            header_matches,
        }
    }
}

/// A CiliumCIDRGroup.
#[derive(Clone, Debug)]
pub struct CidrGroup {
    /// Name.
    pub name: String,
    /// Labels (for `cidrGroupSelector`).
    pub labels: crate::labels::Labels,
    /// Prefixes.
    pub cidrs: Vec<IpNet>,
}
