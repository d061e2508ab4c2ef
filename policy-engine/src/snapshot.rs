//! The resolved form of policy: an immutable, versioned snapshot of every endpoint's ingress and egress
//! policy, with compiled L7 rule sets. Cheap to share (`Arc<Snapshot>`); the proxy and the kernel map
//! writer both read it.
//!
//! Evaluation follows Cilium: a matching deny wins; a direction no rule puts into default deny allows
//! what is not denied; otherwise a flow needs a matching allow. A flow with any matching L7 entry is
//! redirected to the proxy; there, the request is allowed if any matching entry allows it, and an
//! L4-only allow on the same flow allows every request (Cilium's empty L7 wildcard).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::dns::DnsRuleSet;
use crate::fqdn::FqdnSelectors;
use crate::http::{HeaderLog, HeaderMap, HttpRequestInfo, HttpRuleSet};
use crate::identity::{Identity, IdentityId, IpCache};
use crate::kafka::{KafkaRequest, KafkaRuleSet};
use crate::labels::Labels;
use crate::model::{Direction, L7Parser, PolicyRef, Source};
use crate::visibility::Visibility;

/// Index of an [`Origin`] in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OriginId(pub u32);

/// Which policy element an entry came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The policy.
    pub policy: PolicyRef,
    /// Field path of the element (`spec.ingress[0]`).
    pub path: String,
    /// File and document.
    pub source: Source,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.policy.kind, self.policy, self.path)
    }
}

/// The transport of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// ICMP (the port is the type).
    Icmp,
    /// ICMPv6 (the port is the type).
    Icmpv6,
    /// Any other IP protocol (only rules without ports match it).
    Other(u8),
}

impl Proto {
    /// The protocol of an IP protocol number.
    pub fn from_number(n: u8) -> Self {
        match n {
            6 => Self::Tcp,
            17 => Self::Udp,
            132 => Self::Sctp,
            1 => Self::Icmp,
            58 => Self::Icmpv6,
            other => Self::Other(other),
        }
    }

    /// Parses `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6` and the extended protocols (`VRRP`, `IGMP`, ...;
    /// case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        let upper = s.to_ascii_uppercase();
        Some(match upper.as_str() {
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            "SCTP" => Self::Sctp,
            "ICMP" => Self::Icmp,
            "ICMPV6" => Self::Icmpv6,
            other => Self::Other(crate::model::ExtendedProto::ALL.into_iter().find(|e| e.name() == other)?.number()),
        })
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
            Self::Icmp => 1,
            Self::Icmpv6 => 58,
            Self::Other(n) => n,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Icmp => "ICMP",
            Self::Icmpv6 => "ICMPv6",
            Self::Other(n) => {
                return match crate::model::ExtendedProto::ALL.into_iter().find(|e| e.number() == *n) {
                    Some(e) => f.write_str(e.name()),
                    None => write!(f, "proto-{n}"),
                };
            }
        })
    }
}

/// Which protocols an entry covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtoMatch {
    /// Every protocol and port (an L3-only rule).
    Any,
    /// One protocol.
    Only(Proto),
}

impl ProtoMatch {
    /// Whether a flow's protocol is covered.
    pub fn matches(self, p: Proto) -> bool {
        match self {
            Self::Any => true,
            Self::Only(x) => x == p,
        }
    }
}

/// The peers an entry covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerSet {
    /// Every identity, known or future (kernel key: identity 0).
    All,
    /// These identities (sorted).
    Ids(Arc<[IdentityId]>),
}

impl PeerSet {
    /// Whether the identity is covered.
    pub fn contains(&self, id: IdentityId) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => ids.binary_search(&id).is_ok(),
        }
    }
}

/// A compiled L7 rule set.
#[derive(Clone, Debug)]
pub enum L7Set {
    /// HTTP / gRPC.
    Http(Arc<HttpRuleSet>),
    /// Kafka.
    Kafka(Arc<KafkaRuleSet>),
    /// DNS.
    Dns(Arc<DnsRuleSet>),
}

impl L7Set {
    /// Whether both are the same compiled rule set (rule sets are shared by every flow they
    /// apply to).
    pub fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Http(a), Self::Http(b)) => Arc::ptr_eq(a, b),
            (Self::Kafka(a), Self::Kafka(b)) => Arc::ptr_eq(a, b),
            (Self::Dns(a), Self::Dns(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The parser.
    pub fn parser(&self) -> L7Parser {
        match self {
            Self::Http(_) => L7Parser::Http,
            Self::Kafka(_) => L7Parser::Kafka,
            Self::Dns(_) => L7Parser::Dns,
        }
    }
}

/// What an entry does.
#[derive(Clone, Debug)]
pub enum EntryAction {
    /// Drop.
    Deny,
    /// Allow at L4.
    Allow,
    /// Allow at L4 and hand to the proxy, which applies these rules.
    Redirect {
        /// The rules.
        rules: L7Set,
        /// Origin of each rule of `rules` (same order).
        rule_origins: Arc<[OriginId]>,
    },
}

/// One resolved policy entry: `(peers, protocol, ports) → action`.
#[derive(Clone, Debug)]
pub struct PolicyEntry {
    /// Peers.
    pub peers: PeerSet,
    /// Protocol.
    pub proto: ProtoMatch,
    /// First port (ICMP: type).
    pub port_start: u16,
    /// Last port.
    pub port_end: u16,
    /// Action.
    pub action: EntryAction,
    /// Elements this entry merges.
    pub origins: Vec<OriginId>,
    /// Some element it merges requires authentication (`authentication: {mode: required}`).
    pub auth: bool,
}

impl PolicyEntry {
    /// Whether the entry covers a flow.
    pub fn matches(&self, peer: IdentityId, proto: Proto, port: u16) -> bool {
        self.matches_any(&[peer], proto, port)
    }

    /// Whether the entry covers a flow with a peer that is any of `peers` (an identity and the
    /// FQDN selector identities of its address).
    pub fn matches_any(&self, peers: &[IdentityId], proto: Proto, port: u16) -> bool {
        self.proto.matches(proto)
            && (self.proto == ProtoMatch::Any || (self.port_start..=self.port_end).contains(&port))
            && peers.iter().any(|p| self.peers.contains(*p))
    }

    /// True for deny entries.
    pub fn is_deny(&self) -> bool {
        matches!(self.action, EntryAction::Deny)
    }
}

/// The policy of one endpoint in one direction.
#[derive(Clone, Debug, Default)]
pub struct DirectionPolicy {
    /// Default deny: some selecting rule enables it for this direction.
    pub enforced: bool,
    /// Rules that selected the endpoint for this direction (default deny or not).
    pub selected_by: Vec<OriginId>,
    /// Rules that put the direction into default deny.
    pub enforced_by: Vec<OriginId>,
    /// Entries.
    pub entries: Vec<PolicyEntry>,
    /// Audit mode (Cilium's `policy-audit-mode`): what this policy drops is reported with verdict
    /// `AUDIT` and let through, by the datapath and by the proxy.
    pub audit: bool,
    /// Ports whose flows the proxy parses and records although no L7 rule asks for it
    /// ([`crate::visibility`]).
    pub visibility: Vec<Visibility>,
    /// Peers (the cluster's endpoint identities, sorted) whose allowed flows must come
    /// authenticated whatever the rules say: the mesh requires authentication between nodes
    /// ([`crate::resolve::Environment::authentication_required`]; ingress only).
    pub authenticated_peers: Arc<[IdentityId]>,
}

/// Why a flow is dropped at L3/L4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A deny rule matched (Cilium `POLICY_DENY`).
    Denied {
        /// The deny rules.
        by: Vec<OriginId>,
    },
    /// Default deny and no allow matched (Cilium `POLICY_DENIED`).
    NoAllow {
        /// The rules that enabled default deny.
        enforced_by: Vec<OriginId>,
    },
    /// Entries with different L7 parsers cover the same flow; fail closed.
    ConflictingParsers {
        /// The conflicting entries' origins.
        by: Vec<OriginId>,
    },
}

/// The L3/L4 verdict of one direction.
#[derive(Clone, Debug)]
pub enum L4Verdict {
    /// Allowed without the proxy.
    Allow {
        /// Allowing rules; empty when the direction is not enforced.
        by: Vec<OriginId>,
    },
    /// Allowed and redirected to the proxy.
    Redirect(L7Policy),
    /// Dropped.
    Drop(DropReason),
}

/// The L7 rules that apply to one redirected flow.
#[derive(Clone, Debug)]
pub struct L7Policy {
    /// The parser.
    pub parser: L7Parser,
    /// Rule sets that apply (any may allow a request).
    pub sets: Vec<(L7Set, Arc<[OriginId]>)>,
    /// L4-only allows that also cover the flow: they allow every request.
    pub wildcard: Vec<OriginId>,
    /// Redirected for visibility only ([`crate::visibility`]): every request is allowed.
    pub visibility: bool,
}

impl L7Policy {
    /// Whether `other` holds the same rules from the same policies: a request one allows, the other
    /// allows, by the same rule.
    pub fn same_rules(&self, other: &Self) -> bool {
        self.parser == other.parser
            && self.visibility == other.visibility
            && self.wildcard == other.wildcard
            && self.sets.len() == other.sets.len()
            && self.sets.iter().zip(&other.sets).all(|((a, ao), (b, bo))| a.same(b) && ao == bo)
    }
}

/// An L7 verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L7Verdict {
    /// Allowed; by which rule (none when allowed by an L4-only wildcard of unknown origin).
    Allow(Option<OriginId>),
    /// Denied: no rule allows it (or the request is not of this parser's protocol).
    Deny,
}

impl L7Policy {
    /// Judges an HTTP request; header actions of matching rules are applied to `headers`.
    pub fn check_http(&self, req: &HttpRequestInfo<'_>, headers: &mut dyn HeaderMap, log: &mut HeaderLog) -> L7Verdict {
        if self.parser != L7Parser::Http {
            return L7Verdict::Deny;
        }
        if self.visibility {
            return L7Verdict::Allow(self.wildcard.first().copied());
        }
        let any_actions = self.sets.iter().any(|(s, _)| matches!(s, L7Set::Http(h) if h.has_header_matches()));
        if !self.wildcard.is_empty() && !any_actions {
            return L7Verdict::Allow(self.wildcard.first().copied());
        }
        let mut verdict = self.wildcard.first().map(|o| L7Verdict::Allow(Some(*o)));
        for (set, origins) in &self.sets {
            let L7Set::Http(h) = set else { continue };
            if let Some(i) = h.evaluate(req, headers, log) {
                if verdict.is_none() {
                    verdict = Some(L7Verdict::Allow(origins.get(i).copied()));
                }
                if !any_actions {
                    break;
                }
            }
        }
        verdict.unwrap_or(L7Verdict::Deny)
    }

    /// Judges a Kafka request.
    pub fn check_kafka(&self, req: &KafkaRequest<'_>) -> L7Verdict {
        if self.parser != L7Parser::Kafka {
            return L7Verdict::Deny;
        }
        if self.visibility || !self.wildcard.is_empty() {
            return L7Verdict::Allow(self.wildcard.first().copied());
        }
        for (set, origins) in &self.sets {
            if let L7Set::Kafka(k) = set
                && let Some(i) = k.allows(req)
            {
                return L7Verdict::Allow(origins.get(i).or(origins.first()).copied());
            }
        }
        L7Verdict::Deny
    }

    /// Judges a DNS query name.
    pub fn check_dns(&self, qname: &str) -> L7Verdict {
        if self.parser != L7Parser::Dns {
            return L7Verdict::Deny;
        }
        if self.visibility || !self.wildcard.is_empty() {
            return L7Verdict::Allow(self.wildcard.first().copied());
        }
        for (set, origins) in &self.sets {
            if let L7Set::Dns(d) = set
                && d.allows(qname)
            {
                return L7Verdict::Allow(origins.first().copied());
            }
        }
        L7Verdict::Deny
    }
}

impl DirectionPolicy {
    /// Whether what this direction allows for a flow with `peers` must come authenticated: an
    /// allowing entry that covers it was written with `authentication: {mode: required}`
    /// (Cilium: the policy entry's `auth_type`; any covering rule asking for it asks for the flow).
    pub fn auth_required_for(&self, peers: &[IdentityId], proto: Proto, port: u16) -> bool {
        peers.iter().any(|p| self.authenticated_peers.binary_search(p).is_ok())
            || self.entries.iter().any(|e| e.auth && !e.is_deny() && e.matches_any(peers, proto, port))
    }

    /// Whether anything this direction allows must come authenticated.
    pub fn requires_authentication(&self) -> bool {
        !self.authenticated_peers.is_empty() || self.entries.iter().any(|e| e.auth && !e.is_deny())
    }

    /// The L3/L4 verdict for a flow from/to `peer`.
    ///
    /// Deny entries win over everything; an unenforced direction allows the rest; otherwise a flow needs
    /// an allow entry. Any matching redirect entry sends the flow to the proxy.
    pub fn l4_verdict(&self, peer: IdentityId, proto: Proto, port: u16) -> L4Verdict {
        self.l4_verdict_for(&[peer], proto, port)
    }

    /// The L3/L4 verdict for a flow to a peer that is several identities at once: an address's own
    /// identity and the FQDN selector identities of the names the DNS proxy learned it under
    /// ([`crate::fqdn`]). The entries matching any of them are merged as entries of one identity.
    pub fn l4_verdict_for(&self, peers: &[IdentityId], proto: Proto, port: u16) -> L4Verdict {
        let matching: Vec<&PolicyEntry> = self.entries.iter().filter(|e| e.matches_any(peers, proto, port)).collect();
        let denies: Vec<OriginId> =
            matching.iter().filter(|e| e.is_deny()).flat_map(|e| e.origins.iter().copied()).collect();
        if !denies.is_empty() {
            return L4Verdict::Drop(DropReason::Denied { by: denies });
        }
        let mut sets = Vec::new();
        let mut wildcard = Vec::new();
        let mut parser: Option<L7Parser> = None;
        let mut conflict = false;
        for e in &matching {
            match &e.action {
                EntryAction::Deny => {}
                EntryAction::Allow => wildcard.extend(e.origins.iter().copied()),
                EntryAction::Redirect { rules, rule_origins } => {
                    conflict |= parser.is_some_and(|p| p != rules.parser());
                    parser = Some(rules.parser());
                    sets.push((rules.clone(), rule_origins.clone()));
                }
            }
        }
        if conflict {
            let by = matching.iter().flat_map(|e| e.origins.iter().copied()).collect();
            return L4Verdict::Drop(DropReason::ConflictingParsers { by });
        }
        if let Some(parser) = parser {
            return L4Verdict::Redirect(L7Policy { parser, sets, wildcard, visibility: false });
        }
        if !wildcard.is_empty() || !self.enforced {
            // Visibility turns an allow into a redirect that allows every request; it never
            // allows what would drop, nor replaces L7 rules.
            if let Some(v) = self.visibility.iter().find(|v| v.proto == proto && v.port == port) {
                return L4Verdict::Redirect(L7Policy { parser: v.parser, sets: vec![], wildcard, visibility: true });
            }
            return L4Verdict::Allow { by: wildcard };
        }
        L4Verdict::Drop(DropReason::NoAllow { enforced_by: self.enforced_by.clone() })
    }
}

/// One endpoint's resolved policy.
#[derive(Clone, Debug)]
pub struct EndpointPolicy {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Security identity.
    pub identity: IdentityId,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Every label (security-relevant or not).
    pub labels: Labels,
    /// Ingress policy.
    pub ingress: DirectionPolicy,
    /// Egress policy.
    pub egress: DirectionPolicy,
    /// It runs on this node.
    pub local: bool,
    /// The node it runs on, where the cluster state names one.
    pub node: Option<String>,
}

impl EndpointPolicy {
    /// Its service account (`default` when it names none).
    pub fn service_account(&self) -> &str {
        self.labels.get(&crate::labels::LabelKey::k8s(crate::labels::SERVICE_ACCOUNT)).unwrap_or("default")
    }

    /// The policy of one direction.
    pub fn direction(&self, dir: Direction) -> &DirectionPolicy {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// A problem found while resolving (the affected entries are left out: fail closed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveError {
    /// What went wrong.
    pub message: String,
    /// Policies involved.
    pub origins: Vec<Origin>,
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        for o in &self.origins {
            write!(f, " [{} {}: {}]", o.source.file, o.source.document, o)?;
        }
        Ok(())
    }
}

/// An immutable, versioned snapshot of resolved policy.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Monotonic version.
    pub version: u64,
    pub(crate) identities: HashMap<IdentityId, Identity>,
    pub(crate) ipcache: IpCache,
    pub(crate) endpoints: Vec<EndpointPolicy>,
    pub(crate) origins: Vec<Origin>,
    pub(crate) fqdn: FqdnSelectors,
    /// Features that are not enforced (fail closed), per policy.
    pub warnings: Vec<String>,
    /// Resolution problems (the affected entries were left out).
    pub errors: Vec<ResolveError>,
    /// The services (with their backends) of the environment.
    pub services: Vec<crate::services::Service>,
    /// Every node's own addresses, by name.
    pub nodes: std::collections::BTreeMap<String, Vec<IpAddr>>,
    /// The mesh requires authentication between endpoints on different nodes.
    pub authentication_required: bool,
}

/// Where a connection to another node's endpoint goes when it must come authenticated: through
/// the mTLS tunnel to that node's proxy.
#[derive(Clone, Copy, Debug)]
pub struct TunnelTarget<'s> {
    /// The destination endpoint.
    pub endpoint: &'s EndpointPolicy,
    /// Its node's name.
    pub node: &'s str,
    /// Its node's own addresses.
    pub node_ips: &'s [IpAddr],
}

impl Snapshot {
    /// Every endpoint.
    pub fn endpoints(&self) -> &[EndpointPolicy] {
        &self.endpoints
    }

    /// An endpoint by namespace and name.
    pub fn endpoint(&self, namespace: &str, name: &str) -> Option<&EndpointPolicy> {
        self.endpoints.iter().find(|e| e.name == name && e.namespace == namespace)
    }

    /// The endpoint that owns an address.
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<&EndpointPolicy> {
        self.endpoints.iter().find(|e| e.ips.contains(&ip))
    }

    /// The identity of an address (ipcache lookup).
    pub fn identity_of(&self, ip: IpAddr) -> IdentityId {
        self.ipcache.lookup(ip)
    }

    /// An identity's details.
    pub fn identity(&self, id: IdentityId) -> Option<&Identity> {
        self.identities.get(&id)
    }

    /// Every identity.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.identities.values()
    }

    /// The ipcache.
    pub fn ipcache(&self) -> &IpCache {
        &self.ipcache
    }

    /// The `toFQDNs` selectors and their identities.
    pub fn fqdn(&self) -> &FqdnSelectors {
        &self.fqdn
    }

    /// An origin.
    pub fn origin(&self, id: OriginId) -> Option<&Origin> {
        self.origins.get(id.0 as usize)
    }

    /// Whether connections from other nodes to `endpoint` must come authenticated (through the
    /// tunnel): the mesh requires it, or some ingress rule of its does. The datapath marks such a
    /// destination's addresses in the other nodes' ipcache; the source node's proxy tunnels what
    /// goes there. (A flow whose own rule does not ask for it is still tunnelled: a node cannot
    /// tell in advance which of the destination's rules will allow it, and tunnelling never
    /// loosens a verdict — the destination judges it as before, on an authenticated identity.)
    pub fn wants_tunnel(&self, endpoint: &EndpointPolicy) -> bool {
        self.authentication_required || endpoint.ingress.requires_authentication()
    }

    /// Where a connection to `ip` goes through the tunnel: `ip` is an endpoint's on another node
    /// (one the cluster state places, with that node's addresses known) that [`Self::wants_tunnel`].
    pub fn tunnel_target(&self, ip: IpAddr) -> Option<TunnelTarget<'_>> {
        let endpoint = self.endpoint_by_ip(ip).filter(|e| !e.local)?;
        let (node, node_ips) = self.nodes.get_key_value(endpoint.node.as_deref()?)?;
        (self.wants_tunnel(endpoint) && !node_ips.is_empty()).then_some(TunnelTarget { endpoint, node, node_ips })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::HttpRuleSet;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Act {
        Deny,
        Allow,
        Redirect,
    }

    fn entry(peers: Option<Vec<u32>>, proto: Option<Proto>, start: u16, len: u16, act: Act) -> PolicyEntry {
        let action = match act {
            Act::Deny => EntryAction::Deny,
            Act::Allow => EntryAction::Allow,
            Act::Redirect => EntryAction::Redirect {
                rules: L7Set::Http(Arc::new(HttpRuleSet::compile(vec![]).unwrap())),
                rule_origins: Arc::from([OriginId(0)]),
            },
        };
        let peers = match peers {
            None => PeerSet::All,
            Some(mut v) => {
                v.sort_unstable();
                v.dedup();
                PeerSet::Ids(v.into())
            }
        };
        PolicyEntry {
            peers,
            proto: proto.map_or(ProtoMatch::Any, ProtoMatch::Only),
            port_start: start,
            port_end: start.saturating_add(len),
            action,
            origins: vec![OriginId(1)],
            auth: false,
        }
    }

    fn arb_entry() -> impl Strategy<Value = PolicyEntry> {
        (
            proptest::option::of(proptest::collection::vec(1u32..6, 0..4)),
            proptest::option::of(prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)]),
            0u16..8,
            0u16..4,
            prop_oneof![Just(Act::Deny), Just(Act::Allow), Just(Act::Redirect)],
        )
            .prop_map(|(p, pr, s, l, a)| entry(p, pr, s, l, a))
    }

    fn arb_flow() -> impl Strategy<Value = (u32, Proto, u16)> {
        (1u32..6, prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)], 0u16..12)
    }

    fn dropped(v: &L4Verdict) -> bool {
        matches!(v, L4Verdict::Drop(_))
    }

    proptest! {
        // Any matching deny drops the flow, whatever else matches and whatever the default.
        #[test]
        fn deny_wins(entries in proptest::collection::vec(arb_entry(), 0..8), enforced: bool, (peer, proto, port) in arb_flow()) {
            let d = DirectionPolicy { enforced, entries: entries.clone(), ..Default::default() };
            let v = d.l4_verdict(peer, proto, port);
            let deny_matches = entries.iter().any(|e| e.is_deny() && e.matches(peer, proto, port));
            prop_assert_eq!(deny_matches, matches!(v, L4Verdict::Drop(DropReason::Denied { .. })));
        }

        // Default deny: without a matching allow, an enforced direction drops; an unenforced one does not
        // (unless denied).
        #[test]
        fn default_deny(entries in proptest::collection::vec(arb_entry(), 0..8), enforced: bool, (peer, proto, port) in arb_flow()) {
            let d = DirectionPolicy { enforced, entries: entries.clone(), ..Default::default() };
            let v = d.l4_verdict(peer, proto, port);
            let any_deny = entries.iter().any(|e| e.is_deny() && e.matches(peer, proto, port));
            let any_allow = entries.iter().any(|e| !e.is_deny() && e.matches(peer, proto, port));
            prop_assert_eq!(dropped(&v), any_deny || (enforced && !any_allow));
        }

        // Adding an allow never takes access away; adding a deny never grants it.
        #[test]
        fn monotonic(entries in proptest::collection::vec(arb_entry(), 0..8), extra in arb_entry(), enforced: bool, (peer, proto, port) in arb_flow()) {
            let before = DirectionPolicy { enforced, entries: entries.clone(), ..Default::default() }.l4_verdict(peer, proto, port);
            let mut more = entries.clone();
            more.push(extra.clone());
            let after = DirectionPolicy { enforced, entries: more, ..Default::default() }.l4_verdict(peer, proto, port);
            if extra.is_deny() {
                prop_assert!(!dropped(&before) || dropped(&after));
            } else {
                prop_assert!(dropped(&before) || !dropped(&after));
            }
        }
    }
}
