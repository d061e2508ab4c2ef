//! Hubble's flow filters. A [`FlowFilter`](pb::FlowFilter) matches when every field it sets
//! matches; a field matches when any of its values does. A request's whitelist admits a flow when
//! any of its filters matches (or there is none); its blacklist removes it when any matches.
//!
//! Filters are compiled once per request ([`Filters::new`]) with a clear error naming the field and
//! value that do not parse. Fields this node has no data for (services, workloads, TCP flags,
//! trace ids, source names) are refused with `Unsupported`: ignoring one would send flows the caller excluded.

use std::net::IpAddr;

use ipnet::IpNet;
use porin_flow::flow::{Flow, FlowEndpoint, IpVersion};
use regex::Regex;

use crate::convert;
use crate::pb::flow as pb;

/// Why a filter was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// A value does not parse.
    #[error("flow filter field {field}: {value:?} {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// The node cannot judge this field.
    #[error("flow filter field {0} is not supported by this node (its flows carry no such data)")]
    Unsupported(&'static str),
}

fn invalid(field: &'static str, value: &str, why: impl std::fmt::Display) -> FilterError {
    FilterError::Invalid { field, value: value.to_owned(), why: why.to_string() }
}

/// An IP filter value: one address or a prefix.
#[derive(Debug)]
enum IpMatch {
    Addr(IpAddr),
    Net(IpNet),
}

/// `namespace/pod-prefix`, `namespace/` or `pod-prefix`.
#[derive(Debug)]
struct PodMatch {
    namespace: Option<String>,
    prefix: String,
}

/// One requirement of a label selector.
#[derive(Debug)]
enum LabelReq {
    Exists(LabelKey),
    Absent(LabelKey),
    In(LabelKey, Vec<String>),
    NotIn(LabelKey, Vec<String>),
}

/// A label key, with the source it must come from (`k8s:app`) or from any source (`app`).
#[derive(Debug)]
struct LabelKey {
    source: Option<String>,
    key: String,
}

/// A compiled `FlowFilter`.
#[derive(Debug, Default)]
pub struct Compiled {
    uuid: Vec<String>,
    source_ip: Vec<IpMatch>,
    destination_ip: Vec<IpMatch>,
    source_pod: Vec<PodMatch>,
    destination_pod: Vec<PodMatch>,
    destination_fqdn: Vec<Regex>,
    source_label: Vec<Vec<LabelReq>>,
    destination_label: Vec<Vec<LabelReq>>,
    traffic_direction: Vec<i32>,
    verdict: Vec<i32>,
    event_type: Vec<pb::EventTypeFilter>,
    http_status_code: Vec<(u16, u16)>,
    protocol: Vec<String>,
    source_port: Vec<u16>,
    destination_port: Vec<u16>,
    reply: Vec<bool>,
    dns_query: Vec<Regex>,
    source_identity: Vec<u32>,
    destination_identity: Vec<u32>,
    http_method: Vec<String>,
    http_path: Vec<Regex>,
    node_name: Vec<Regex>,
    ip_version: Vec<i32>,
}

/// A request's filters.
#[derive(Debug, Default)]
pub struct Filters {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

/// The largest compiled regular expression a filter may ask for.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn regex(field: &'static str, value: &str) -> Result<Regex, FilterError> {
    regex::RegexBuilder::new(value).size_limit(REGEX_SIZE_LIMIT).build().map_err(|e| invalid(field, value, e))
}

/// Hubble's name patterns: `*` stands for any run of name characters; the rest is literal;
/// case and a trailing dot do not matter.
fn name_pattern(field: &'static str, value: &str) -> Result<Regex, FilterError> {
    let v = value.trim_end_matches('.').to_ascii_lowercase();
    if v.is_empty() {
        return Err(invalid(field, value, "is empty"));
    }
    let body: Vec<String> = v.split('*').map(regex::escape).collect();
    regex(field, &format!("^{}\\.?$", body.join("[-.0-9a-z_]*")))
}

fn ip(field: &'static str, value: &str) -> Result<IpMatch, FilterError> {
    if value.contains('/') {
        value.parse().map(IpMatch::Net).map_err(|e| invalid(field, value, e))
    } else {
        value.parse().map(IpMatch::Addr).map_err(|e| invalid(field, value, e))
    }
}

fn pod(value: &str) -> PodMatch {
    match value.split_once('/') {
        Some((ns, prefix)) => PodMatch { namespace: Some(ns.to_owned()), prefix: prefix.to_owned() },
        None => PodMatch { namespace: None, prefix: value.to_owned() },
    }
}

fn label_key(field: &'static str, selector: &str, key: &str) -> Result<LabelKey, FilterError> {
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(invalid(field, selector, format!("has a bad label key {key:?}")));
    }
    Ok(match key.split_once(':') {
        Some((source, k)) => LabelKey { source: Some(source.to_owned()), key: k.to_owned() },
        None => LabelKey { source: None, key: key.to_owned() },
    })
}

/// Splits a selector at the commas outside parentheses.
fn requirements(selector: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(selector.get(start..i).unwrap_or(""));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(selector.get(start..).unwrap_or(""));
    out
}

/// Kubernetes' label selector syntax: `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
/// `k notin (a,b)`, joined by commas. Keys may carry Cilium's source prefix (`k8s:app`).
fn label_selector(field: &'static str, selector: &str) -> Result<Vec<LabelReq>, FilterError> {
    let mut reqs = Vec::new();
    for r in requirements(selector) {
        let r = r.trim();
        if r.is_empty() {
            return Err(invalid(field, selector, "has an empty requirement"));
        }
        let set = |rest: &str| -> Result<Vec<String>, FilterError> {
            let inner = rest.trim().strip_prefix('(').and_then(|s| s.strip_suffix(')'));
            let inner = inner.ok_or_else(|| invalid(field, selector, "needs a (value, ...) list"))?;
            Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        let req = if let Some(k) = r.strip_prefix('!') {
            LabelReq::Absent(label_key(field, selector, k)?)
        } else if let Some((k, v)) = r.split_once("!=") {
            LabelReq::NotIn(label_key(field, selector, k)?, vec![v.trim().to_owned()])
        } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
            LabelReq::In(label_key(field, selector, k)?, vec![v.trim().to_owned()])
        } else if let Some((k, rest)) = r.split_once(" notin ") {
            LabelReq::NotIn(label_key(field, selector, k)?, set(rest)?)
        } else if let Some((k, rest)) = r.split_once(" in ") {
            LabelReq::In(label_key(field, selector, k)?, set(rest)?)
        } else {
            LabelReq::Exists(label_key(field, selector, r)?)
        };
        reqs.push(req);
    }
    Ok(reqs)
}

/// `404`, or `4+` / `40+` (every code starting so).
fn status(value: &str) -> Result<(u16, u16), FilterError> {
    let bad = || invalid("http_status_code", value, "is not a status code or a prefix like 5+");
    if let Some(prefix) = value.strip_suffix('+') {
        let digits = u32::try_from(prefix.len()).map_err(|_| bad())?;
        if !(1..=2).contains(&digits) {
            return Err(bad());
        }
        let p: u16 = prefix.parse().map_err(|_| bad())?;
        let scale = 10_u16.pow(3 - digits);
        Ok((p * scale, p * scale + scale - 1))
    } else {
        let c: u16 = value.parse().map_err(|_| bad())?;
        if !(100..=999).contains(&c) {
            return Err(bad());
        }
        Ok((c, c))
    }
}

fn ports(field: &'static str, values: &[String]) -> Result<Vec<u16>, FilterError> {
    values.iter().map(|v| v.parse().map_err(|e| invalid(field, v, e))).collect()
}

fn refuse_if<T>(field: &'static str, values: &[T]) -> Result<(), FilterError> {
    if values.is_empty() { Ok(()) } else { Err(FilterError::Unsupported(field)) }
}

impl Compiled {
    /// Compiles one filter.
    pub fn new(f: &pb::FlowFilter) -> Result<Self, FilterError> {
        refuse_if("source_service", &f.source_service)?;
        refuse_if("destination_service", &f.destination_service)?;
        refuse_if("source_workload", &f.source_workload)?;
        refuse_if("destination_workload", &f.destination_workload)?;
        refuse_if("tcp_flags", &f.tcp_flags)?;
        refuse_if("trace_id", &f.trace_id)?;
        // Records carry the names of the destination only (what the DNS proxy learned).
        refuse_if("source_fqdn", &f.source_fqdn)?;
        let each = |field: &'static str, vs: &[String], make: fn(&'static str, &str) -> Result<Regex, FilterError>| {
            vs.iter().map(|v| make(field, v)).collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            uuid: f.uuid.clone(),
            source_ip: f.source_ip.iter().map(|v| ip("source_ip", v)).collect::<Result<_, _>>()?,
            destination_ip: f.destination_ip.iter().map(|v| ip("destination_ip", v)).collect::<Result<_, _>>()?,
            source_pod: f.source_pod.iter().map(|v| pod(v)).collect(),
            destination_pod: f.destination_pod.iter().map(|v| pod(v)).collect(),
            destination_fqdn: each("destination_fqdn", &f.destination_fqdn, name_pattern)?,
            source_label: f.source_label.iter().map(|v| label_selector("source_label", v)).collect::<Result<_, _>>()?,
            destination_label: f
                .destination_label
                .iter()
                .map(|v| label_selector("destination_label", v))
                .collect::<Result<_, _>>()?,
            traffic_direction: f.traffic_direction.clone(),
            verdict: f.verdict.clone(),
            event_type: f.event_type.clone(),
            http_status_code: f.http_status_code.iter().map(|v| status(v)).collect::<Result<_, _>>()?,
            protocol: f.protocol.iter().map(|p| p.to_ascii_lowercase()).collect(),
            source_port: ports("source_port", &f.source_port)?,
            destination_port: ports("destination_port", &f.destination_port)?,
            reply: f.reply.clone(),
            dns_query: each("dns_query", &f.dns_query, regex)?,
            source_identity: f.source_identity.clone(),
            destination_identity: f.destination_identity.clone(),
            http_method: f.http_method.iter().map(|m| m.to_ascii_uppercase()).collect(),
            http_path: each("http_path", &f.http_path, regex)?,
            node_name: each("node_name", &f.node_name, name_pattern)?,
            ip_version: f.ip_version.clone(),
        })
    }

    /// Whether flow `f` (with id `uuid`, seen on node `node`) matches.
    pub fn matches(&self, f: &Flow, uuid: &str, node: &str) -> bool {
        fn any<T>(set: &[T], ok: impl Fn(&T) -> bool) -> bool {
            set.is_empty() || set.iter().any(ok)
        }
        let http = f.l7.as_ref().and_then(|l| l.http.as_ref());
        let dns = f.l7.as_ref().and_then(|l| l.dns.as_ref());
        // Addresses are parsed only for the address filters that need them (a follower judges
        // every record).
        let src_ip = || f.ip.as_ref().and_then(|ip| ip.source.parse::<IpAddr>().ok());
        let dst_ip = || f.ip.as_ref().and_then(|ip| ip.destination.parse::<IpAddr>().ok());
        let l4_ports = f.l4.as_ref().and_then(|l| match l {
            porin_flow::flow::Layer4::Tcp(p) | porin_flow::flow::Layer4::Udp(p) | porin_flow::flow::Layer4::Sctp(p) => {
                Some(*p)
            }
            _ => None,
        });
        let event = i32::try_from(f.event_type.cilium_type()).unwrap_or(0);
        any(&self.uuid, |u| u == uuid)
            && (self.source_ip.is_empty() || {
                let ip = src_ip();
                self.source_ip.iter().any(|m| ip_matches(m, ip))
            })
            && (self.destination_ip.is_empty() || {
                let ip = dst_ip();
                self.destination_ip.iter().any(|m| ip_matches(m, ip))
            })
            && any(&self.source_pod, |m| pod_matches(m, &f.source))
            && any(&self.destination_pod, |m| pod_matches(m, &f.destination))
            && any(&self.destination_fqdn, |re| {
                f.destination_names.iter().any(|n| re.is_match(&n.to_ascii_lowercase()))
            })
            && any(&self.source_label, |sel| selects(sel, &f.source.labels))
            && any(&self.destination_label, |sel| selects(sel, &f.destination.labels))
            && any(&self.traffic_direction, |d| *d == convert::direction(f.traffic_direction) as i32)
            && any(&self.verdict, |v| *v == convert::verdict(f.verdict) as i32)
            && any(&self.event_type, |e| e.r#type == event && (!e.match_sub_type || e.sub_type == 0))
            && any(&self.http_status_code, |(lo, hi)| {
                http.is_some_and(|h| h.code != 0 && (*lo..=*hi).contains(&h.code))
            })
            && any(&self.protocol, |p| f.has_protocol(p))
            && any(&self.source_port, |p| l4_ports.is_some_and(|l| l.source_port == *p))
            && any(&self.destination_port, |p| l4_ports.is_some_and(|l| l.destination_port == *p))
            && any(&self.reply, |r| *r == f.is_reply)
            && any(&self.dns_query, |re| dns.is_some_and(|d| re.is_match(&d.query)))
            && any(&self.source_identity, |i| *i == f.source.identity)
            && any(&self.destination_identity, |i| *i == f.destination.identity)
            && any(&self.http_method, |m| http.is_some_and(|h| h.method.eq_ignore_ascii_case(m)))
            && any(&self.http_path, |re| http.is_some_and(|h| re.is_match(url_path(&h.url))))
            && any(&self.node_name, |re| re.is_match(&node.to_ascii_lowercase()))
            && any(&self.ip_version, |v| {
                f.ip.as_ref().is_some_and(|ip| {
                    *v == match ip.ip_version {
                        IpVersion::IPv4 => pb::IpVersion::IPv4,
                        IpVersion::IPv6 => pb::IpVersion::IPv6,
                    } as i32
                })
            })
    }
}

/// The path of `http://authority/path?query` (what Hubble's `http_path` filter looks at).
fn url_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/");
    path.split_once('?').map_or(path, |(p, _)| p)
}

fn ip_matches(m: &IpMatch, ip: Option<IpAddr>) -> bool {
    match (m, ip) {
        (IpMatch::Addr(a), Some(ip)) => *a == ip,
        (IpMatch::Net(n), Some(ip)) => n.contains(&ip),
        (_, None) => false,
    }
}

fn pod_matches(m: &PodMatch, e: &FlowEndpoint) -> bool {
    if e.pod_name.is_empty() && m.namespace.is_none() {
        return false;
    }
    m.namespace.as_ref().is_none_or(|ns| *ns == e.namespace) && e.pod_name.starts_with(&m.prefix)
}

/// The value of label `key` on an endpoint (`source:key=value` labels), if it has it.
fn label_value<'a>(labels: &'a [String], key: &LabelKey) -> Option<&'a str> {
    labels.iter().find_map(|l| {
        let (source, kv) = l.split_once(':').unwrap_or(("", l));
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key.key && key.source.as_ref().is_none_or(|s| s == source)).then_some(v)
    })
}

fn selects(sel: &[LabelReq], labels: &[String]) -> bool {
    sel.iter().all(|r| match r {
        LabelReq::Exists(k) => label_value(labels, k).is_some(),
        LabelReq::Absent(k) => label_value(labels, k).is_none(),
        LabelReq::In(k, vs) => label_value(labels, k).is_some_and(|v| vs.iter().any(|x| x == v)),
        LabelReq::NotIn(k, vs) => label_value(labels, k).is_none_or(|v| vs.iter().all(|x| x != v)),
    })
}

impl Filters {
    /// Compiles a request's whitelist and blacklist.
    pub fn new(whitelist: &[pb::FlowFilter], blacklist: &[pb::FlowFilter]) -> Result<Self, FilterError> {
        Ok(Self {
            whitelist: whitelist.iter().map(Compiled::new).collect::<Result<_, _>>()?,
            blacklist: blacklist.iter().map(Compiled::new).collect::<Result<_, _>>()?,
        })
    }

    /// Whether the flow is to be sent.
    pub fn admit(&self, f: &Flow, uuid: &str, node: &str) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|c| c.matches(f, uuid, node)))
            && !self.blacklist.iter().any(|c| c.matches(f, uuid, node))
    }

    /// Whether a flow with verdict `v` may be admitted at all: false only when no allow filter
    /// takes it. A reader of many records lets those go before it builds their flows.
    pub fn may_admit_verdict(&self, v: porin_flow::flow::Verdict) -> bool {
        let v = convert::verdict(v) as i32;
        self.whitelist.is_empty() || self.whitelist.iter().any(|c| c.verdict.is_empty() || c.verdict.contains(&v))
    }
}

#[cfg(test)]
mod tests {
    use porin_flow::flow::{
        DnsInfo, EventType, FlowIp, FlowType, HttpInfo, L7Type, Layer4, Layer7, Ports, TrafficDirection, Verdict,
    };

    use super::*;

    fn http(method: &str, path: &str, code: u16) -> Flow {
        Flow {
            verdict: if code == 403 { Verdict::Dropped } else { Verdict::Forwarded },
            flow_type: FlowType::L7,
            event_type: EventType::AccessLog,
            traffic_direction: TrafficDirection::Ingress,
            is_reply: code != 0,
            ip: Some(FlowIp {
                source: "10.244.0.11".into(),
                destination: "10.244.0.12".into(),
                ip_version: IpVersion::IPv4,
            }),
            l4: Some(Layer4::Tcp(Ports { source_port: 40000, destination_port: 80 })),
            source: FlowEndpoint {
                identity: 1001,
                namespace: "default".into(),
                pod_name: "tiefighter".into(),
                labels: vec!["k8s:org=empire".into(), "k8s:class=tiefighter".into()],
            }
            .into(),
            destination: FlowEndpoint {
                identity: 1002,
                namespace: "default".into(),
                pod_name: "deathstar-1".into(),
                labels: vec!["k8s:org=empire".into(), "k8s:class=deathstar".into()],
            }
            .into(),
            l7: Some(Layer7 {
                kind: if code == 0 { L7Type::Request } else { L7Type::Response },
                http: Some(HttpInfo {
                    code,
                    method: method.into(),
                    url: format!("http://deathstar{path}?x=1"),
                    ..HttpInfo::default()
                }),
                ..Layer7::default()
            }),
            ..Flow::default()
        }
    }

    fn filter(f: pb::FlowFilter) -> Compiled {
        Compiled::new(&f).unwrap()
    }

    #[test]
    fn every_set_field_must_match_and_any_value_of_one() {
        let f = http("POST", "/v1/request-landing", 200);
        let ok = |c: pb::FlowFilter| filter(c).matches(&f, "u1", "kind-worker");
        assert!(ok(pb::FlowFilter::default()));
        assert!(ok(pb::FlowFilter { source_pod: vec!["default/tie".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter { source_pod: vec!["default/".into()], ..Default::default() }));
        assert!(!ok(pb::FlowFilter { source_pod: vec!["kube-system/".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter { destination_pod: vec!["xwing".into(), "death".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter { source_ip: vec!["10.244.0.0/24".into()], ..Default::default() }));
        assert!(!ok(pb::FlowFilter { source_ip: vec!["10.244.0.12".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter {
            source_label: vec!["org=empire,class in (tiefighter, x)".into()],
            ..Default::default()
        }));
        assert!(ok(pb::FlowFilter { source_label: vec!["k8s:org=empire,!team".into()], ..Default::default() }));
        assert!(!ok(pb::FlowFilter { source_label: vec!["reserved:org=empire".into()], ..Default::default() }));
        assert!(!ok(pb::FlowFilter { destination_label: vec!["class!=deathstar".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter { http_status_code: vec!["2+".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter { http_status_code: vec!["200".into()], ..Default::default() }));
        assert!(!ok(pb::FlowFilter { http_status_code: vec!["4+".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter {
            http_method: vec!["post".into()],
            http_path: vec!["^/v1/".into()],
            ..Default::default()
        }));
        assert!(
            !ok(pb::FlowFilter { http_path: vec!["x=1".into()], ..Default::default() }),
            "the query is not the path"
        );
        assert!(ok(pb::FlowFilter {
            protocol: vec!["HTTP".into()],
            destination_port: vec!["80".into()],
            ..Default::default()
        }));
        assert!(!ok(pb::FlowFilter { protocol: vec!["udp".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter {
            verdict: vec![pb::Verdict::Forwarded as i32],
            reply: vec![true],
            ..Default::default()
        }));
        assert!(!ok(pb::FlowFilter { verdict: vec![pb::Verdict::Dropped as i32], ..Default::default() }));
        assert!(ok(pb::FlowFilter {
            source_identity: vec![1001],
            destination_identity: vec![1002],
            ..Default::default()
        }));
        assert!(ok(pb::FlowFilter {
            event_type: vec![pb::EventTypeFilter { r#type: 129, ..Default::default() }],
            ..Default::default()
        }));
        assert!(ok(pb::FlowFilter { node_name: vec!["kind-*".into()], uuid: vec!["u1".into()], ..Default::default() }));
        assert!(!ok(pb::FlowFilter { node_name: vec!["other".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter {
            traffic_direction: vec![pb::TrafficDirection::Ingress as i32],
            ..Default::default()
        }));
        assert!(ok(pb::FlowFilter { ip_version: vec![pb::IpVersion::IPv4 as i32], ..Default::default() }));
        // All fields must match.
        assert!(!ok(pb::FlowFilter {
            source_pod: vec!["tie".into()],
            http_method: vec!["GET".into()],
            ..Default::default()
        }));
    }

    #[test]
    fn dns_names_and_queries() {
        let f = Flow {
            destination_names: vec!["api.github.com.".into()],
            l7: Some(Layer7 {
                dns: Some(DnsInfo { query: "api.github.com.".into(), ..DnsInfo::default() }),
                ..Layer7::default()
            }),
            ..Flow::default()
        };
        let ok = |c: pb::FlowFilter| filter(c).matches(&f, "", "");
        assert!(ok(pb::FlowFilter { destination_fqdn: vec!["*.github.com".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter { destination_fqdn: vec!["API.github.com.".into()], ..Default::default() }));
        assert!(!ok(pb::FlowFilter { destination_fqdn: vec!["github.com".into()], ..Default::default() }));
        assert!(ok(pb::FlowFilter { dns_query: vec!["git.*com".into()], ..Default::default() }));
        assert!(!ok(pb::FlowFilter { dns_query: vec!["^example".into()], ..Default::default() }));
    }

    #[test]
    fn whitelist_and_blacklist() {
        let get = http("GET", "/", 0);
        let put = http("PUT", "/", 0);
        let f = Filters::new(
            &[pb::FlowFilter { source_pod: vec!["tiefighter".into()], ..Default::default() }],
            &[pb::FlowFilter { http_method: vec!["PUT".into()], ..Default::default() }],
        )
        .unwrap();
        assert!(f.admit(&get, "", ""));
        assert!(!f.admit(&put, "", ""));
        assert!(Filters::default().admit(&put, "", ""));
    }

    #[test]
    fn a_verdict_no_allow_filter_takes_is_never_admitted() {
        use porin_flow::flow::Verdict as V;
        let verdicts =
            |v: &[pb::Verdict]| pb::FlowFilter { verdict: v.iter().map(|v| *v as i32).collect(), ..Default::default() };
        let any = Filters::new(&[], &[verdicts(&[pb::Verdict::Dropped])]).unwrap();
        assert!(any.may_admit_verdict(V::Dropped), "a deny list says nothing of what may be admitted");
        let drops = Filters::new(&[verdicts(&[pb::Verdict::Dropped])], &[]).unwrap();
        assert!(drops.may_admit_verdict(V::Dropped) && !drops.may_admit_verdict(V::Forwarded));
        let either = Filters::new(
            &[
                verdicts(&[pb::Verdict::Dropped]),
                pb::FlowFilter { http_method: vec!["GET".into()], ..Default::default() },
            ],
            &[],
        )
        .unwrap();
        assert!(either.may_admit_verdict(V::Forwarded), "the second filter takes any verdict");
        // The bound never admits what `admit` refuses, nor refuses what it admits.
        let get = http("GET", "/", 0);
        let denied = http("GET", "/", 403);
        for f in [&drops, &either, &any] {
            for flow in [&get, &denied] {
                if f.admit(flow, "", "") {
                    assert!(f.may_admit_verdict(flow.verdict));
                }
            }
        }
    }

    #[test]
    fn bad_and_unsupported_filters_are_refused_by_name() {
        let err = |f: pb::FlowFilter| Compiled::new(&f).unwrap_err().to_string();
        assert!(
            err(pb::FlowFilter { source_ip: vec!["10.0.0.300".into()], ..Default::default() }).contains("source_ip")
        );
        assert!(err(pb::FlowFilter { http_path: vec!["(".into()], ..Default::default() }).contains("http_path"));
        assert!(
            err(pb::FlowFilter { http_status_code: vec!["6++".into()], ..Default::default() })
                .contains("http_status_code")
        );
        assert!(
            err(pb::FlowFilter { destination_port: vec!["http".into()], ..Default::default() })
                .contains("destination_port")
        );
        assert!(
            err(pb::FlowFilter { source_label: vec!["a in b".into()], ..Default::default() }).contains("source_label")
        );
        assert!(
            err(pb::FlowFilter { source_service: vec!["x".into()], ..Default::default() }).contains("not supported")
        );
        assert!(err(pb::FlowFilter { source_fqdn: vec!["*.x".into()], ..Default::default() }).contains("source_fqdn"));
        assert!(
            err(pb::FlowFilter { dns_query: vec!["a{1000}{1000}".into()], ..Default::default() }).contains("dns_query")
        );
    }
}
