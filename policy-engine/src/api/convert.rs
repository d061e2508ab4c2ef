//! Raw CRD types → validated model, with Cilium's validation rules (`rule_validation.go` and friends)
//! and namespace defaulting (`ParseToCiliumRule`). Every problem is reported with its field path.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::types as raw;
use crate::dns::NamePattern;
use crate::http::{HeaderMatcher, HeaderMatcherKind, MismatchAction};
use crate::kafka::KafkaRule;
use crate::labels::{self, LabelKey, LabelSource};
use crate::model::{
    Action, CidrGroupRef, Element, Entity, HeaderMatchSpec, HttpRuleSpec, IcmpFamily, IcmpType, L4Spec, L7Spec, Peer,
    Peers, PolicyKind, PortProto, PortRule, PortSel, Protocol, Rule, ServiceRef, Subject,
};
use crate::selector::{Requirement, Selector};

const MAX_PORTS: usize = 40;
const MAX_ICMP_FIELDS: usize = 40;

/// A problem found while converting, with its field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Field path.
    pub path: String,
    /// What is wrong (Cilium's wording where Cilium has one).
    pub message: String,
}

/// Collects errors and warnings while converting one document.
#[derive(Default)]
pub(crate) struct Ctx {
    pub(crate) errors: Vec<Problem>,
    pub(crate) warnings: Vec<String>,
}

impl Ctx {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Problem { path: path.into(), message: message.into() });
    }
    fn warn(&mut self, path: &str, message: impl std::fmt::Display) {
        self.warnings.push(format!("{path}: {message}"));
    }
}

/// What a rule's namespace defaulting depends on.
#[derive(Clone, Debug)]
pub(crate) struct Scope<'a> {
    pub(crate) kind: PolicyKind,
    /// Policy namespace (`None` for clusterwide).
    pub(crate) namespace: Option<&'a str>,
    pub(crate) cluster: &'a str,
}

// === selectors ===

pub(crate) fn selector(raw: &raw::LabelSelector, ctx: &mut Ctx, path: &str) -> Option<Selector> {
    let empty = BTreeMap::new();
    let labels = raw.match_labels.as_ref().unwrap_or(&empty);
    let exprs = raw.match_expressions.as_deref().unwrap_or(&[]);
    let result = Selector::from_k8s(
        labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        exprs.iter().map(|e| (e.key.as_str(), e.operator.as_str(), e.values.clone().unwrap_or_default())),
    );
    match result {
        Ok(s) => Some(s),
        Err(e) => {
            ctx.err(path, e.to_string());
            None
        }
    }
}

/// Cilium's `getEndpointSelector`: peers are confined to the policy namespace (or, for clusterwide
/// policies, to pods) unless they say otherwise; reserved selectors are left alone.
fn peer_endpoints(sel: Selector, scope: &Scope<'_>, subject_matches_init: bool) -> Selector {
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

fn cidr_rule(r: &raw::CidrRule, ctx: &mut Ctx, path: &str) -> Option<Peer> {
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

// === ports ===

/// IANA service name (`iana.IsSvcName`): 1–15 of `[a-z0-9-]`, at least one letter, no leading,
/// trailing or doubled hyphen.
fn is_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && s.chars().any(|c| c.is_ascii_alphabetic())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Go's `strconv.ParseUint(s, 0, 16)`: `0x` hex, `0o`/leading `0` octal, `0b` binary.
fn parse_go_u16(s: &str) -> Result<u16, String> {
    let digits = s.replace('_', "");
    let (radix, body) = if let Some(r) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        (16, r.to_owned())
    } else if let Some(r) = digits.strip_prefix("0o").or_else(|| digits.strip_prefix("0O")) {
        (8, r.to_owned())
    } else if let Some(r) = digits.strip_prefix("0b").or_else(|| digits.strip_prefix("0B")) {
        (2, r.to_owned())
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, digits[1..].to_owned())
    } else {
        (10, digits.clone())
    };
    u16::from_str_radix(&body, radix).map_err(|e| format!("strconv.ParseUint: parsing {s:?}: {e}"))
}

struct ParsedPort {
    port: PortSel,
    protocol: Protocol,
    zero: bool,
}

fn port_protocol(pp: &raw::PortProtocol, has_dns: bool, ctx: &mut Ctx, path: &str) -> Option<ParsedPort> {
    let port_str = pp.port.as_ref().map(|p| p.0.as_str()).unwrap_or("");
    if port_str.is_empty() {
        ctx.err(format!("{path}.port"), "port must be specified");
        return None;
    }
    let proto_str = pp.protocol.as_deref().unwrap_or("");
    let Some(protocol) = Protocol::parse(proto_str) else {
        ctx.err(
            format!("{path}.protocol"),
            format!("invalid protocol {proto_str:?}, supported protocols are [TCP, UDP, SCTP, ANY]"),
        );
        return None;
    };
    if is_svc_name(port_str) {
        return Some(ParsedPort { port: PortSel::Named(port_str.to_ascii_lowercase()), protocol, zero: false });
    }
    let start = match parse_go_u16(port_str) {
        Ok(p) => p,
        Err(e) => {
            ctx.err(format!("{path}.port"), format!("Unable to parse port: {e}"));
            return None;
        }
    };
    let end_port = pp.end_port.unwrap_or(0);
    if has_dns && end_port > i64::from(start) {
        ctx.err(format!("{path}.endPort"), "DNS rules do not support port ranges");
        return None;
    }
    if start == 0 {
        return Some(ParsedPort { port: PortSel::All, protocol, zero: true });
    }
    let end = if end_port > i64::from(start) {
        match u16::try_from(end_port) {
            Ok(e) => e,
            Err(_) => {
                ctx.err(format!("{path}.endPort"), format!("endPort {end_port} is out of range"));
                return None;
            }
        }
    } else {
        start
    };
    Some(ParsedPort { port: PortSel::Range(start, end), protocol, zero: false })
}

fn headers_rule(s: &str, ctx: &mut Ctx, path: &str) -> Option<HeaderMatcher> {
    // Cilium: split at the first space, trim a trailing ':' from the name; the rest is the value.
    let (name, value) = match s.split_once(' ') {
        Some((n, v)) => (n.trim_end_matches(':'), Some(v)),
        None => (s.trim_end_matches(':'), None),
    };
    if name.is_empty() {
        ctx.err(path, "header name missing");
        return None;
    }
    let kind = match value {
        Some(v) => HeaderMatcherKind::Exact(v.to_owned()),
        None => HeaderMatcherKind::Present,
    };
    Some(HeaderMatcher { name: name.to_ascii_lowercase(), kind })
}

fn http_rule(r: &raw::HttpRule, ctx: &mut Ctx, path: &str, namespace: Option<&str>) -> Option<HttpRuleSpec> {
    let before = ctx.errors.len();
    let regex_field = |v: &Option<String>, field: &str, ctx: &mut Ctx| -> Option<String> {
        let v = v.as_deref().filter(|s| !s.is_empty())?;
        if let Err(e) = crate::http::compile_full_match(v) {
            ctx.err(format!("{path}.{field}"), format!("invalid regex {v:?}: {e}"));
        }
        Some(v.to_owned())
    };
    let method = regex_field(&r.method, "method", ctx);
    let rpath = regex_field(&r.path, "path", ctx);
    let host = regex_field(&r.host, "host", ctx);
    let mut headers = Vec::new();
    for (i, h) in r.headers.iter().flatten().enumerate() {
        headers.extend(headers_rule(h, ctx, &format!("{path}.headers[{i}]")));
    }
    let mut header_matches = Vec::new();
    for (i, hm) in r.header_matches.iter().flatten().enumerate() {
        let hpath = format!("{path}.headerMatches[{i}]");
        let name = hm.name.as_deref().unwrap_or("");
        if name.is_empty() {
            ctx.err(&hpath, "Header name missing");
            continue;
        }
        let mismatch_str = hm.mismatch.as_deref().unwrap_or("");
        let Some(mismatch) = MismatchAction::from_crd(mismatch_str) else {
            ctx.err(format!("{hpath}.mismatch"), format!("Invalid header action: {mismatch_str}"));
            continue;
        };
        let secret = match &hm.secret {
            None => None,
            Some(s) => {
                let sname = s.name.as_deref().unwrap_or("");
                if sname.is_empty() {
                    ctx.err(format!("{hpath}.secret"), "Secret name missing");
                    continue;
                }
                let ns = s.namespace.as_deref().filter(|n| !n.is_empty()).or(namespace).unwrap_or("default");
                Some((ns.to_owned(), sname.to_owned()))
            }
        };
        header_matches.push(HeaderMatchSpec {
            name: name.to_ascii_lowercase(),
            value: hm.value.clone().filter(|v| !v.is_empty()),
            secret,
            mismatch,
        });
    }
    (ctx.errors.len() == before).then_some(HttpRuleSpec { method, path: rpath, host, headers, header_matches })
}

fn fqdn_selector(s: &raw::FqdnSelector, ctx: &mut Ctx, path: &str) -> Option<NamePattern> {
    match NamePattern::new(s.match_name.as_deref(), s.match_pattern.as_deref()) {
        Ok(p) => Some(p),
        Err(e) => {
            ctx.err(path, e.to_string());
            None
        }
    }
}

fn l7_rules(
    r: &raw::L7Rules,
    ports_given: bool,
    ctx: &mut Ctx,
    path: &str,
    namespace: Option<&str>,
) -> (L7Spec, Option<String>) {
    let mut types = 0;
    let mut spec = L7Spec::None;
    let mut unsupported = None;
    if let Some(http) = &r.http {
        types += 1;
        let rules: Vec<HttpRuleSpec> = http
            .iter()
            .enumerate()
            .filter_map(|(i, h)| http_rule(h, ctx, &format!("{path}.http[{i}]"), namespace))
            .collect();
        spec = L7Spec::Http(rules);
    }
    if let Some(kafka) = &r.kafka {
        types += 1;
        let mut rules = Vec::new();
        for (i, k) in kafka.iter().enumerate() {
            let s = |o: &Option<String>| o.clone().unwrap_or_default();
            let version = k.api_version.as_ref().map(|v| v.0.clone()).unwrap_or_default();
            match KafkaRule::from_crd(&s(&k.role), &s(&k.api_key), &version, &s(&k.client_id), &s(&k.topic)) {
                Ok(rule) => rules.push(rule),
                Err(e) => ctx.err(format!("{path}.kafka[{i}]"), e.to_string()),
            }
        }
        spec = L7Spec::Kafka(rules);
    }
    if let Some(dns) = &r.dns {
        if !ports_given {
            ctx.err(format!("{path}.dns"), "port 53 must be specified for DNS rules");
        }
        types += 1;
        let pats =
            dns.iter().enumerate().filter_map(|(i, d)| fqdn_selector(d, ctx, &format!("{path}.dns[{i}]"))).collect();
        spec = L7Spec::Dns(pats);
    }
    if r.l7.is_some() && r.l7proto.as_deref().unwrap_or("").is_empty() {
        ctx.err(format!("{path}.l7"), "'l7' may only be specified when a 'l7proto' is also specified");
    }
    if let Some(proto) = r.l7proto.as_deref().filter(|p| !p.is_empty()) {
        types += 1;
        for (i, rule) in r.l7.iter().flatten().enumerate() {
            if rule.contains_key("") {
                ctx.err(format!("{path}.l7[{i}]"), "Empty key not allowed");
            }
        }
        unsupported =
            Some(format!("l7proto {proto:?}: generic proxylib parsers are not supported (removed in Cilium 1.20)"));
    }
    if types > 1 {
        ctx.err(path, "multiple L7 protocol rule types specified in single rule");
    }
    (spec, unsupported)
}

fn l7_present(r: &Option<raw::L7Rules>) -> bool {
    r.as_ref().is_some_and(|r| {
        r.http.is_some()
            || r.kafka.is_some()
            || r.dns.is_some()
            || r.l7.is_some()
            || r.l7proto.as_deref().is_some_and(|p| !p.is_empty())
    })
}

fn port_rule(
    pr: &raw::PortRule,
    ingress: bool,
    ctx: &mut Ctx,
    path: &str,
    namespace: Option<&str>,
) -> Option<PortRule> {
    let before = ctx.errors.len();
    let has_l7 = l7_present(&pr.rules);
    let has_dns = pr.rules.as_ref().is_some_and(|r| r.dns.as_ref().is_some_and(|d| !d.is_empty()));
    if ingress && has_dns {
        ctx.err(format!("{path}.rules.dns"), "DNS rules are not allowed on ingress");
    }
    let server_names = pr.server_names.as_deref().unwrap_or(&[]);
    if !server_names.is_empty() && has_l7 && pr.terminating_tls.is_none() {
        ctx.err(format!("{path}.serverNames"), "ServerNames are not allowed with L7 rules without TLS termination");
    }
    if server_names.iter().any(String::is_empty) {
        ctx.err(format!("{path}.serverNames"), "empty server name is not allowed");
    }
    let raw_ports = pr.ports.as_deref().unwrap_or(&[]);
    if raw_ports.len() > MAX_PORTS {
        ctx.err(format!("{path}.ports"), format!("too many ports, the max is {MAX_PORTS}"));
    }
    let mut ports = Vec::new();
    let mut have_zero = false;
    for (i, pp) in raw_ports.iter().enumerate() {
        let ppath = format!("{path}.ports[{i}]");
        if let Some(p) = port_protocol(pp, has_dns, ctx, &ppath) {
            have_zero |= p.zero;
            if has_l7 && !has_dns && p.protocol != Protocol::Tcp {
                let mut msg = format!("L7 rules can only apply to TCP (not {}) except for DNS rules", p.protocol);
                if pp.protocol.as_deref().is_none_or(str::is_empty) {
                    // The example every blog post shows: Cilium's message alone does not say the fix.
                    msg.push_str(" (an omitted protocol means ANY: add `protocol: TCP` to the port)");
                }
                ctx.err(&ppath, msg);
            }
            ports.push(PortProto { port: p.port, protocol: p.protocol });
        }
    }
    let mut unsupported = None;
    if let Some(l) = &pr.listener {
        let name = l.name.as_deref().unwrap_or("");
        if ingress {
            ctx.err(format!("{path}.listener"), format!("Listener is not allowed on ingress ({name})"));
        }
        if has_l7 {
            ctx.err(format!("{path}.listener"), format!("Listener is not allowed with L7 rules ({name})"));
        }
        unsupported = Some(format!("listener {name:?}: custom Envoy listeners are not supported by Porin"));
    }
    let mut l7 = L7Spec::None;
    if let Some(rules) = pr.rules.as_ref().filter(|_| has_l7) {
        if have_zero || (raw_ports.is_empty() && !has_dns) {
            ctx.err(path, "L7 rules can not be used when a port is 0");
        }
        let (spec, unsup) = l7_rules(rules, !raw_ports.is_empty(), ctx, &format!("{path}.rules"), namespace);
        l7 = spec;
        unsupported = unsupported.or(unsup);
    }
    if pr.terminating_tls.is_some() || pr.originating_tls.is_some() {
        unsupported = unsupported
            .or_else(|| Some("terminatingTLS/originatingTLS: TLS interception is not supported by Porin yet".into()));
    }
    if !server_names.is_empty() {
        unsupported = unsupported.or_else(|| Some("serverNames: SNI filtering is not supported by Porin yet".into()));
    }
    if ports.is_empty() {
        ports.push(PortProto { port: PortSel::All, protocol: Protocol::Any });
    }
    (ctx.errors.len() == before).then_some(PortRule { path: path.to_owned(), ports, l7, unsupported })
}

fn deny_port_rule(pr: &raw::PortDenyRule, ctx: &mut Ctx, path: &str) -> Option<PortRule> {
    let before = ctx.errors.len();
    let raw_ports = pr.ports.as_deref().unwrap_or(&[]);
    if raw_ports.len() > MAX_PORTS {
        ctx.err(format!("{path}.ports"), format!("too many ports, the max is {MAX_PORTS}"));
    }
    let mut ports: Vec<PortProto> = raw_ports
        .iter()
        .enumerate()
        .filter_map(|(i, pp)| port_protocol(pp, false, ctx, &format!("{path}.ports[{i}]")))
        .map(|p| PortProto { port: p.port, protocol: p.protocol })
        .collect();
    if ports.is_empty() {
        ports.push(PortProto { port: PortSel::All, protocol: Protocol::Any });
    }
    (ctx.errors.len() == before).then_some(PortRule {
        path: path.to_owned(),
        ports,
        l7: L7Spec::None,
        unsupported: None,
    })
}

const ICMPV4_NAMES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

const ICMPV6_NAMES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

fn icmp_rules(rules: &[raw::IcmpRule], ctx: &mut Ctx, path: &str) -> Vec<IcmpType> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let rpath = format!("{path}[{i}]");
        let fields = r.fields.as_deref().unwrap_or(&[]);
        if fields.len() > MAX_ICMP_FIELDS {
            ctx.err(format!("{rpath}.fields"), format!("too many types, the max is {MAX_ICMP_FIELDS}"));
            continue;
        }
        for (j, f) in fields.iter().enumerate() {
            let fpath = format!("{rpath}.fields[{j}]");
            let family = match f.family.as_deref().unwrap_or("") {
                "" | "IPv4" => IcmpFamily::V4,
                "IPv6" => IcmpFamily::V6,
                other => {
                    ctx.err(format!("{fpath}.family"), format!("wrong family: {other}"));
                    continue;
                }
            };
            let t = f.icmp_type.as_ref().map(|t| t.0.as_str()).unwrap_or("");
            let names = if family == IcmpFamily::V4 { ICMPV4_NAMES } else { ICMPV6_NAMES };
            let parsed = t.parse::<u8>().ok().or_else(|| names.iter().find(|(n, _)| *n == t).map(|(_, v)| *v));
            match parsed {
                Some(icmp_type) => out.push(IcmpType { family, icmp_type }),
                None => ctx.err(format!("{fpath}.type"), format!("invalid ICMP type {t:?}")),
            }
        }
    }
    out
}

// === elements ===

/// The peer fields of one element, in Cilium's order (for "combining X and Y" messages).
struct PeerFields<'a> {
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

#[expect(
    clippy::too_many_arguments,
    reason = "an element's checks need its direction, peers, ports and the policy scope"
)]
fn element(
    dir_from: bool,
    action: Action,
    fields: &PeerFields<'_>,
    l4: L4Spec,
    has_ports: bool,
    auth: Option<&raw::Authentication>,
    scope: &Scope<'_>,
    subject_matches_init: bool,
    ctx: &mut Ctx,
    path: &str,
) -> Option<Element> {
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
    if !dir_from && action == Action::Allow && fields.services.is_some_and(|s| !s.is_empty()) && has_ports {
        ctx.err(path, "combining ToServices and ToPorts is not supported yet");
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
            match (&s.k8s_service, &s.k8s_service_selector) {
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
                (None, Some(k)) => {
                    if let Some(sel) = selector(&k.selector, ctx, &format!("{spath}.k8sServiceSelector.selector")) {
                        let namespace =
                            k.namespace.clone().filter(|n| !n.is_empty()).or(scope.namespace.map(str::to_owned));
                        v.push(Peer::Service(ServiceRef::Selector { namespace, selector: sel }));
                    }
                }
                _ => ctx.err(&spath, "exactly one of k8sService or k8sServiceSelector must be set"),
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
    match auth.and_then(|a| a.mode.as_deref()) {
        None | Some("disabled") => {}
        Some(mode @ ("required" | "test-always-fail")) => {
            unsupported =
                Some(format!("authentication mode {mode:?}: mutual authentication is not supported by Porin"));
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
    Some(Element { path: path.to_owned(), action, peers, l4, unsupported })
}

fn l4_for_allow(
    to_ports: Option<&[raw::PortRule]>,
    icmps: Option<&[raw::IcmpRule]>,
    ingress: bool,
    ctx: &mut Ctx,
    path: &str,
    namespace: Option<&str>,
) -> L4Spec {
    let ports = to_ports.unwrap_or(&[]);
    let icmps = icmps.unwrap_or(&[]);
    if !icmps.is_empty() && !ports.is_empty() {
        ctx.err(path, "The ICMPs block may only be present without ToPorts. Define a separate rule to use ToPorts.");
    }
    if !icmps.is_empty() {
        return L4Spec::Icmp(icmp_rules(icmps, ctx, &format!("{path}.icmps")));
    }
    if ports.is_empty() {
        return L4Spec::Any;
    }
    L4Spec::Ports(
        ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| port_rule(p, ingress, ctx, &format!("{path}.toPorts[{i}]"), namespace))
            .collect(),
    )
}

fn l4_for_deny(
    to_ports: Option<&[raw::PortDenyRule]>,
    icmps: Option<&[raw::IcmpRule]>,
    ctx: &mut Ctx,
    path: &str,
) -> L4Spec {
    let ports = to_ports.unwrap_or(&[]);
    let icmps = icmps.unwrap_or(&[]);
    if !icmps.is_empty() && !ports.is_empty() {
        ctx.err(path, "The ICMPs block may only be present without ToPorts. Define a separate rule to use ToPorts.");
    }
    if !icmps.is_empty() {
        return L4Spec::Icmp(icmp_rules(icmps, ctx, &format!("{path}.icmps")));
    }
    if ports.is_empty() {
        return L4Spec::Any;
    }
    L4Spec::Ports(
        ports.iter().enumerate().filter_map(|(i, p)| deny_port_rule(p, ctx, &format!("{path}.toPorts[{i}]"))).collect(),
    )
}

fn has_l7(l4: &L4Spec) -> Option<Vec<crate::model::L7Parser>> {
    match l4 {
        L4Spec::Ports(prs) => Some(prs.iter().filter_map(|p| p.l7.parser()).collect()),
        _ => None,
    }
}

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
    let ns = scope.namespace;
    let mut ingress = Vec::new();
    for (i, e) in r.ingress.iter().flatten().enumerate() {
        let epath = format!("{path}.ingress[{i}]");
        let l4 = l4_for_allow(e.to_ports.as_deref(), e.icmps.as_deref(), true, ctx, &epath, ns);
        if let Some(parsers) = has_l7(&l4) {
            if host_policy && !parsers.is_empty() {
                ctx.err(&epath, "L7 policy is not supported on host ingress yet");
            }
            if parsers.contains(&crate::model::L7Parser::Dns) {
                ctx.err(&epath, "L7 protocol DNS is not supported on ingress yet");
            }
        }
        let fields = PeerFields {
            endpoints: e.from_endpoints.as_deref(),
            requires: e.from_requires.as_deref(),
            cidr: e.from_cidr.as_deref(),
            cidr_set: e.from_cidr_set.as_deref(),
            entities: e.from_entities.as_deref(),
            services: None,
            fqdns: None,
            groups: e.from_groups.as_deref(),
            nodes: e.from_nodes.as_deref(),
        };
        let has_ports = e.to_ports.as_ref().is_some_and(|p| !p.is_empty());
        ingress.extend(element(
            true,
            Action::Allow,
            &fields,
            l4,
            has_ports,
            e.authentication.as_ref(),
            scope,
            matches_init,
            ctx,
            &epath,
        ));
    }
    for (i, e) in r.ingress_deny.iter().flatten().enumerate() {
        let epath = format!("{path}.ingressDeny[{i}]");
        let l4 = l4_for_deny(e.to_ports.as_deref(), e.icmps.as_deref(), ctx, &epath);
        let fields = PeerFields {
            endpoints: e.from_endpoints.as_deref(),
            requires: e.from_requires.as_deref(),
            cidr: e.from_cidr.as_deref(),
            cidr_set: e.from_cidr_set.as_deref(),
            entities: e.from_entities.as_deref(),
            services: None,
            fqdns: None,
            groups: e.from_groups.as_deref(),
            nodes: e.from_nodes.as_deref(),
        };
        let has_ports = e.to_ports.as_ref().is_some_and(|p| !p.is_empty());
        ingress.extend(element(true, Action::Deny, &fields, l4, has_ports, None, scope, matches_init, ctx, &epath));
    }
    let mut egress = Vec::new();
    for (i, e) in r.egress.iter().flatten().enumerate() {
        let epath = format!("{path}.egress[{i}]");
        let l4 = l4_for_allow(e.to_ports.as_deref(), e.icmps.as_deref(), false, ctx, &epath, ns);
        if let Some(parsers) = has_l7(&l4)
            && host_policy
            && parsers.iter().any(|p| *p != crate::model::L7Parser::Dns)
        {
            ctx.err(&epath, "host policies only support DNS L7 rules on egress");
        }
        let fields = PeerFields {
            endpoints: e.to_endpoints.as_deref(),
            requires: e.to_requires.as_deref(),
            cidr: e.to_cidr.as_deref(),
            cidr_set: e.to_cidr_set.as_deref(),
            entities: e.to_entities.as_deref(),
            services: e.to_services.as_deref(),
            fqdns: e.to_fqdns.as_deref(),
            groups: e.to_groups.as_deref(),
            nodes: e.to_nodes.as_deref(),
        };
        let has_ports = e.to_ports.as_ref().is_some_and(|p| !p.is_empty());
        egress.extend(element(
            false,
            Action::Allow,
            &fields,
            l4,
            has_ports,
            e.authentication.as_ref(),
            scope,
            matches_init,
            ctx,
            &epath,
        ));
    }
    for (i, e) in r.egress_deny.iter().flatten().enumerate() {
        let epath = format!("{path}.egressDeny[{i}]");
        let l4 = l4_for_deny(e.to_ports.as_deref(), e.icmps.as_deref(), ctx, &epath);
        let fields = PeerFields {
            endpoints: e.to_endpoints.as_deref(),
            requires: e.to_requires.as_deref(),
            cidr: e.to_cidr.as_deref(),
            cidr_set: e.to_cidr_set.as_deref(),
            entities: e.to_entities.as_deref(),
            services: e.to_services.as_deref(),
            fqdns: None,
            groups: e.to_groups.as_deref(),
            nodes: e.to_nodes.as_deref(),
        };
        let has_ports = e.to_ports.as_ref().is_some_and(|p| !p.is_empty());
        egress.extend(element(false, Action::Deny, &fields, l4, has_ports, None, scope, matches_init, ctx, &epath));
    }
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
        ingress.push(Element { path, action: Action::Allow, peers, l4, unsupported: None });
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        let peers = knp_peers(r.to.as_deref(), scope, ctx, &format!("{path}.to"));
        let l4 = knp_ports(r.ports.as_deref(), ctx, &format!("{path}.ports"));
        egress.push(Element { path, action: Action::Allow, peers, l4, unsupported: None });
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
