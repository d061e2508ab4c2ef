//! Port rules: ports and protocols with Go's number parsing, ICMP types, and the L7 rules a port
//! rule carries (HTTP, Kafka, DNS), with Cilium's validation.

use super::*;

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

/// A port and protocol as written (`zero`: port 0, "every port").
pub(super) struct ParsedPort {
    pub(super) port: PortSel,
    pub(super) protocol: Protocol,
    pub(super) zero: bool,
}

pub(super) fn port_protocol(pp: &raw::PortProtocol, has_dns: bool, ctx: &mut Ctx, path: &str) -> Option<ParsedPort> {
    let port_str = pp.port.as_ref().map(|p| p.0.as_str()).unwrap_or("");
    let proto_str = pp.protocol.as_deref().unwrap_or("");
    let parsed = Protocol::parse(proto_str);
    if let Some(protocol @ Protocol::Extended(_)) = parsed {
        // No transport ports: every packet of the protocol.
        if !port_str.is_empty() && port_str != "0" {
            ctx.err(format!("{path}.port"), "port must be empty or 0");
            return None;
        }
        return Some(ParsedPort { port: PortSel::All, protocol, zero: true });
    }
    if port_str.is_empty() {
        ctx.err(format!("{path}.port"), "port must be specified");
        return None;
    }
    let Some(protocol) = parsed else {
        ctx.err(
            format!("{path}.protocol"),
            format!(
                "invalid protocol {proto_str:?}, supported protocols are [TCP, UDP, SCTP, ANY, VRRP, IGMP, GRE, IPIP, IPV6, ESP, AH]"
            ),
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

pub(super) fn fqdn_selector(s: &raw::FqdnSelector, ctx: &mut Ctx, path: &str) -> Option<NamePattern> {
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

pub(super) fn port_rule(
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

pub(super) fn deny_port_rule(pr: &raw::PortDenyRule, ctx: &mut Ctx, path: &str) -> Option<PortRule> {
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

/// The L4 part of an element: ICMP types, or its port rules (`convert`: allow or deny port rules).
pub(super) fn l4_spec<P>(
    to_ports: Option<&[P]>,
    icmps: Option<&[raw::IcmpRule]>,
    ctx: &mut Ctx,
    path: &str,
    mut convert: impl FnMut(&P, &mut Ctx, &str) -> Option<PortRule>,
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
        ports.iter().enumerate().filter_map(|(i, p)| convert(p, ctx, &format!("{path}.toPorts[{i}]"))).collect(),
    )
}
