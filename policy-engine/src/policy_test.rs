//! `porin policy test` and `porin policy trace`: policy unit tests, evaluated offline with the same
//! resolver and matchers the agent and proxy use (there is no second implementation here).
//!
//! A test file (format version 1, see `docs/policy-test-format.md`) names policies, endpoints,
//! namespace labels, what the DNS proxy learned and secret values, then cases: a flow `from → to`
//! on a port and protocol, optionally with an HTTP, Kafka or DNS request, and the expected outcome
//! `allow`, `drop` (L3/L4) or `deny` (L7).
//!
//! This module reads the files a test names; it prints nothing (the binary formats results).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::{self, LoadOptions, Loaded};
use crate::dns::normalize_name;
use crate::http::{HeaderLog, HttpRequestInfo, SimpleHeaders};
use crate::identity::{IdentityId, reserved};
use crate::kafka::{KafkaRequest, api_key_by_name};
use crate::pair::{PairVerdict, Peer, SideVerdict};
use crate::resolve::{Endpoint, Environment, resolve};
use crate::snapshot::{DropReason, EndpointPolicy, L4Verdict, L7Policy, L7Set, L7Verdict, OriginId, Proto, Snapshot};

// === file format ===

/// A test file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// Must be 1.
    pub version: u32,
    /// Policies, evaluated together.
    #[serde(default)]
    pub policies: Vec<PolicySource>,
    /// Workloads by name.
    #[serde(default)]
    pub endpoints: BTreeMap<String, EndpointDef>,
    /// Namespace labels.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceDef>,
    /// What the DNS proxy learned: name → addresses.
    #[serde(default)]
    pub fqdn_cache: BTreeMap<String, Vec<IpAddr>>,
    /// Secret values by `namespace/name`.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// The cases.
    #[serde(default)]
    pub cases: Vec<Case>,
}

/// Where a policy comes from: a file relative to the test file, or inline YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySource {
    /// A file (multi-document YAML allowed).
    pub file: Option<String>,
    /// YAML text with one or more documents.
    pub inline: Option<String>,
}

/// An endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointDef {
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Namespace (default `default`).
    pub namespace: Option<String>,
    /// Address.
    pub ip: Option<IpAddr>,
}

/// Namespace labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceDef {
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Name.
    pub name: String,
    /// Endpoint name, `cidr:IP`, `entity:NAME`.
    pub from: String,
    /// Endpoint name, `cidr:IP`, `entity:NAME`, `fqdn:NAME`.
    pub to: String,
    /// Destination port (ICMP: type; default 8, echo request).
    pub port: Option<u16>,
    /// `TCP` (default), `UDP`, `SCTP`, `ICMP`.
    pub protocol: Option<String>,
    /// HTTP request.
    pub http: Option<HttpCase>,
    /// Kafka request.
    pub kafka: Option<KafkaCase>,
    /// DNS query.
    pub dns: Option<DnsCase>,
    /// Expected outcome.
    pub expect: Outcome,
    /// The policy expected to decide (`name` or `namespace/name`).
    pub expect_rule: Option<String>,
}

impl Case {
    /// The flow of this case.
    pub fn flow(&self) -> Flow {
        Flow {
            from: self.from.clone(),
            to: self.to.clone(),
            port: self.port,
            protocol: self.protocol.clone(),
            http: self.http.clone(),
            kafka: self.kafka.clone(),
            dns: self.dns.clone(),
        }
    }
}

/// A flow and optional L7 request.
#[derive(Debug, Clone, Default)]
pub struct Flow {
    /// Endpoint name, `cidr:IP`, `entity:NAME`.
    pub from: String,
    /// Endpoint name, `cidr:IP`, `entity:NAME`, `fqdn:NAME`.
    pub to: String,
    /// Destination port (ICMP: type; default 8, echo request).
    pub port: Option<u16>,
    /// `TCP` (default), `UDP`, `SCTP`, `ICMP`.
    pub protocol: Option<String>,
    /// HTTP request.
    pub http: Option<HttpCase>,
    /// Kafka request.
    pub kafka: Option<KafkaCase>,
    /// DNS query.
    pub dns: Option<DnsCase>,
}

/// An HTTP request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCase {
    /// Default GET.
    pub method: Option<String>,
    /// Default `/` (query included).
    pub path: Option<String>,
    /// Host / authority.
    pub host: Option<String>,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A Kafka API key: Cilium's name or a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ApiKey {
    /// Number.
    Number(i16),
    /// Name.
    Name(String),
}

/// A Kafka request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KafkaCase {
    /// API key.
    pub api_key: ApiKey,
    /// API version.
    pub api_version: Option<i16>,
    /// Client id.
    #[serde(rename = "clientID")]
    pub client_id: Option<String>,
    /// Topics.
    #[serde(default)]
    pub topics: Vec<String>,
}

/// A DNS query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsCase {
    /// Name (case-insensitive, trailing dot optional).
    pub query: String,
    /// Type (default A).
    #[serde(rename = "type")]
    pub qtype: Option<String>,
}

/// A case outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Allowed (L3/L4 and, with a request, L7).
    Allow,
    /// Dropped at L3/L4.
    Drop,
    /// Allowed at L3/L4, refused at L7.
    Deny,
}

impl Outcome {
    fn severity(self) -> u8 {
        match self {
            Self::Allow => 0,
            Self::Deny => 1,
            Self::Drop => 2,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Drop => "drop",
            Self::Deny => "deny",
        })
    }
}

/// The result of one case (`-o json` prints exactly these fields).
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Test file.
    pub file: String,
    /// Case name.
    pub name: String,
    /// Expected outcome.
    pub expected: Outcome,
    /// Actual outcome.
    pub actual: Outcome,
    /// Whether it passed.
    pub pass: bool,
    /// Why the outcome is what it is.
    pub reason: String,
    /// The deciding policy.
    pub rule: Option<String>,
}

// === scenario: policies + environment → snapshot ===

/// Policies and endpoints resolved into a snapshot, ready to evaluate flows.
#[derive(Debug)]
pub struct Scenario {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// The environment it was resolved from.
    pub env: Environment,
    names: BTreeMap<String, usize>,
    /// Warnings (features enforced fail-closed).
    pub warnings: Vec<String>,
}

/// Builds scenarios from policy files, test files and ad-hoc endpoints.
#[derive(Debug, Default)]
pub struct ScenarioBuilder {
    loaded: Loaded,
    env: Environment,
    names: BTreeMap<String, usize>,
    errors: Vec<String>,
}

impl ScenarioBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the policies of a YAML file.
    pub fn policy_file(&mut self, path: &Path) -> &mut Self {
        self.loaded.extend(api::load_file(path, &LoadOptions::default()));
        self
    }

    /// Adds the policies in YAML text (`name` is used in error messages).
    pub fn policy_text(&mut self, name: &str, text: &str) -> &mut Self {
        self.loaded.extend(api::load_str(name, text, &LoadOptions::default()));
        self
    }

    /// Sets a secret value (`namespace/name`).
    pub fn secret(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.secrets.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Records what the DNS proxy learned for a name.
    pub fn fqdn(&mut self, name: &str, ips: Vec<IpAddr>) -> &mut Self {
        self.env.fqdn_cache.insert(normalize_name(name), ips);
        self
    }

    /// Adds the policies and the environment of a parsed test file; `base` is its directory.
    pub fn test_file(&mut self, file_name: &str, tf: &TestFile, base: &Path) -> &mut Self {
        if tf.version != 1 {
            self.errors.push(format!("{file_name}: version: unsupported version {} (expected 1)", tf.version));
        }
        for (i, src) in tf.policies.iter().enumerate() {
            match (&src.file, &src.inline) {
                (Some(f), None) => {
                    self.loaded.extend(api::load_file(&base.join(f), &LoadOptions::default()));
                }
                (None, Some(text)) => {
                    let name = format!("{file_name}: policies[{i}].inline");
                    self.loaded.extend(api::load_str(&name, text, &LoadOptions::default()));
                }
                _ => self.errors.push(format!("{file_name}: policies[{i}]: exactly one of file or inline is required")),
            }
        }
        for (name, def) in &tf.endpoints {
            self.endpoint(
                name,
                Endpoint {
                    name: name.clone(),
                    namespace: def.namespace.clone().unwrap_or_else(|| "default".into()),
                    labels: def.labels.clone(),
                    ips: def.ip.into_iter().collect(),
                    ..Default::default()
                },
            );
        }
        for (ns, def) in &tf.namespaces {
            self.env.namespace_labels.insert(ns.clone(), def.labels.clone());
        }
        for (name, ips) in &tf.fqdn_cache {
            self.env.fqdn_cache.insert(normalize_name(name), ips.clone());
        }
        self.env.secrets.extend(tf.secrets.clone());
        self
    }

    /// Adds an endpoint known by `name` in cases.
    pub fn endpoint(&mut self, name: &str, ep: Endpoint) -> &mut Self {
        match self.names.get(name) {
            Some(_) => self.errors.push(format!("endpoint {name:?} is defined twice")),
            None => {
                self.names.insert(name.to_owned(), self.env.endpoints.len());
                self.env.endpoints.push(ep);
            }
        }
        self
    }

    /// Resolves. Fails with every error (invalid policies, conflicting L7 parsers, bad definitions).
    pub fn build(self) -> Result<Scenario, Vec<String>> {
        let mut errors = self.errors;
        errors.extend(self.loaded.errors.iter().map(ToString::to_string));
        let snapshot = resolve(&self.loaded.policies, &self.loaded.cidr_groups, &self.env, &mut Default::default(), 1);
        errors.extend(snapshot.errors.iter().map(ToString::to_string));
        if !errors.is_empty() {
            return Err(errors);
        }
        let warnings = snapshot.warnings.clone();
        Ok(Scenario { snapshot, env: self.env, names: self.names, warnings })
    }
}

/// One side of a flow.
#[derive(Debug, Clone)]
enum Party {
    Endpoint(usize),
    Ip(IpAddr),
    Identity(IdentityId, String),
}

/// An evaluated flow.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Outcome.
    pub outcome: Outcome,
    /// Why.
    pub reason: String,
    /// Policies that decided (most specific first).
    pub deciding: Vec<String>,
    /// Every rule considered and whether it matched (for `trace`).
    pub explanation: Vec<String>,
}

/// The L7 request of a flow, parsed.
enum Request<'a> {
    None,
    Http { method: &'a str, path: &'a str, host: Option<&'a str>, headers: SimpleHeaders },
    Kafka(KafkaRequest<'a>),
    Dns(String),
}

impl Scenario {
    fn party(&self, s: &str) -> Result<Vec<Party>, String> {
        if let Some(ip) = s.strip_prefix("cidr:") {
            let ip: IpAddr =
                ip.split('/').next().unwrap_or("").parse().map_err(|e| format!("{s:?}: not an address: {e}"))?;
            return Ok(vec![Party::Ip(ip)]);
        }
        if let Some(name) = s.strip_prefix("entity:") {
            let id = reserved::by_name(name).ok_or_else(|| {
                format!("{s:?}: unknown entity (host, world, world-ipv4, world-ipv6, remote-node, kube-apiserver, health, init, unmanaged, ingress)")
            })?;
            return Ok(vec![Party::Identity(id, format!("entity:{name}"))]);
        }
        if let Some(name) = s.strip_prefix("fqdn:") {
            let ips = self
                .env
                .fqdn_cache
                .get(&normalize_name(name))
                .ok_or_else(|| format!("{s:?}: the name is not in fqdn_cache"))?;
            if ips.is_empty() {
                return Err(format!("{s:?}: fqdn_cache has no address for it"));
            }
            return Ok(ips.iter().map(|ip| Party::Ip(*ip)).collect());
        }
        match self.names.get(s) {
            Some(i) => Ok(vec![Party::Endpoint(*i)]),
            None => Err(format!("{s:?}: no such endpoint (use an endpoint name, cidr:IP, entity:NAME or fqdn:NAME)")),
        }
    }

    fn endpoint_policy(&self, i: usize) -> Option<&EndpointPolicy> {
        let ep = self.env.endpoints.get(i)?;
        self.snapshot.endpoint(&ep.namespace, &ep.name)
    }

    fn identity(&self, p: &Party) -> IdentityId {
        match p {
            Party::Endpoint(i) => self.endpoint_policy(*i).map_or(reserved::UNKNOWN, |e| e.identity),
            Party::Ip(ip) => self.snapshot.identity_of(*ip),
            Party::Identity(id, _) => *id,
        }
    }

    fn party_name(&self, p: &Party) -> String {
        match p {
            Party::Endpoint(i) => {
                self.env.endpoints.get(*i).map_or_else(String::new, |e| format!("{}/{}", e.namespace, e.name))
            }
            Party::Ip(ip) => format!("{ip} (identity {})", self.snapshot.identity_of(*ip)),
            Party::Identity(id, n) => format!("{n} (identity {id})"),
        }
    }

    fn origin_name(&self, o: OriginId) -> (String, String) {
        match self.snapshot.origin(o) {
            Some(origin) => (origin.policy.to_string(), format!("{} {}", origin.policy, origin.path)),
            None => (String::new(), String::new()),
        }
    }

    /// Evaluates a flow (every address of an `fqdn:` destination; the most restrictive result wins).
    pub fn evaluate(&self, flow: &Flow, explain: bool) -> Result<Evaluation, String> {
        let froms = self.party(&flow.from)?;
        let tos = self.party(&flow.to)?;
        let proto = match flow.protocol.as_deref() {
            None => Proto::Tcp,
            Some(p) => Proto::parse(p).ok_or_else(|| format!("protocol {p:?}: expected TCP, UDP, SCTP or ICMP"))?,
        };
        let port = match (flow.port, proto) {
            (Some(p), _) => p,
            (None, Proto::Icmp) => 8,
            (None, Proto::Icmpv6) => 128,
            (None, _) => return Err("port: required".into()),
        };
        let kinds =
            usize::from(flow.http.is_some()) + usize::from(flow.kafka.is_some()) + usize::from(flow.dns.is_some());
        if kinds > 1 {
            return Err("give at most one of http, kafka, dns".into());
        }
        let mut headers = SimpleHeaders::default();
        if let Some(h) = &flow.http {
            headers = SimpleHeaders::from_pairs(h.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        let request = if let Some(h) = &flow.http {
            Request::Http {
                method: h.method.as_deref().unwrap_or("GET"),
                path: h.path.as_deref().unwrap_or("/"),
                host: h.host.as_deref(),
                headers,
            }
        } else if let Some(k) = &flow.kafka {
            let api_key = match &k.api_key {
                ApiKey::Number(n) => *n,
                ApiKey::Name(name) => {
                    api_key_by_name(name).ok_or_else(|| format!("kafka.apiKey: unknown API key {name:?}"))?
                }
            };
            Request::Kafka(KafkaRequest {
                api_key,
                api_version: k.api_version,
                client_id: k.client_id.as_deref(),
                topics: k.topics.iter().map(String::as_str).collect(),
            })
        } else if let Some(d) = &flow.dns {
            if d.query.trim().is_empty() {
                return Err("dns.query: must not be empty".into());
            }
            Request::Dns(d.query.clone())
        } else {
            Request::None
        };
        let mut worst: Option<Evaluation> = None;
        for from in &froms {
            for to in &tos {
                let mut ev = self.evaluate_pair(from, to, proto, port, &request, explain);
                if tos.len() > 1 {
                    ev.reason = format!("to {}: {}", self.party_name(to), ev.reason);
                }
                if worst.as_ref().is_none_or(|w| ev.outcome.severity() > w.outcome.severity()) {
                    worst = Some(ev);
                }
            }
        }
        worst.ok_or_else(|| "nothing to evaluate".into())
    }

    fn evaluate_pair(
        &self,
        from: &Party,
        to: &Party,
        proto: Proto,
        port: u16,
        request: &Request<'_>,
        explain: bool,
    ) -> Evaluation {
        let from_id = self.identity(from);
        let to_id = self.identity(to);
        let mut explanation = Vec::new();
        let peer = |p: &Party, identity: IdentityId| Peer {
            identity,
            endpoint: match p {
                Party::Endpoint(i) => self.endpoint_policy(*i),
                _ => None,
            },
        };
        let pair = PairVerdict::judge(peer(from, from_id), peer(to, to_id), proto, port);
        let label = |s: &SideVerdict<'_>| format!("{} of {}/{}", s.direction, s.endpoint.namespace, s.endpoint.name);
        if explain {
            explanation.push(format!(
                "flow {} (identity {from_id}) -> {} (identity {to_id}) {proto}/{port}",
                self.party_name(from),
                self.party_name(to)
            ));
            for s in pair.sides() {
                let policy = s.endpoint.direction(s.direction);
                self.explain_direction(&mut explanation, &label(s), policy, s.peer, proto, port, &s.verdict);
            }
        }
        // L3/L4 first: a drop on either side is final.
        if let Some((side, reason)) = pair.drop() {
            let (reason, deciding) = self.drop_reason(&label(side), reason, proto, port);
            return Evaluation { outcome: Outcome::Drop, reason, deciding, explanation };
        }
        let verdicts: Vec<(String, &L4Verdict)> = pair.sides().map(|s| (label(s), &s.verdict)).collect();
        let mut allow_rules: Vec<String> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        // Ingress decides last, so list its rules first.
        for (label, v) in verdicts.iter().rev() {
            match v {
                L4Verdict::Drop(_) => {}
                L4Verdict::Allow { by } if by.is_empty() => {
                    notes.push(format!("{label}: not enforced (no rule puts it into default deny)"))
                }
                L4Verdict::Allow { by } => {
                    let (name, full) = self.origin_name(by.first().copied().unwrap_or(OriginId(0)));
                    allow_rules.push(name);
                    notes.push(format!("{label}: allowed by {full}"));
                }
                L4Verdict::Redirect(l7) => {
                    let (outcome, note, rule) = self.judge_l7(l7, request, explain.then_some(&mut explanation), label);
                    if let Some(r) = rule {
                        allow_rules.push(r);
                    }
                    if outcome == Outcome::Deny {
                        let deciding = l7
                            .sets
                            .iter()
                            .flat_map(|(_, o)| o.iter().map(|x| self.origin_name(*x).0))
                            .collect::<Vec<_>>();
                        let mut d = deciding;
                        d.dedup();
                        return Evaluation {
                            outcome: Outcome::Deny,
                            reason: format!("{label}: {note}"),
                            deciding: d,
                            explanation,
                        };
                    }
                    notes.push(format!("{label}: {note}"));
                }
            }
        }
        if verdicts.is_empty() {
            notes.push("neither side is an endpoint: nothing enforces this flow".into());
        }
        Evaluation { outcome: Outcome::Allow, reason: notes.join("; "), deciding: allow_rules, explanation }
    }

    fn drop_reason(&self, label: &str, reason: &DropReason, proto: Proto, port: u16) -> (String, Vec<String>) {
        match reason {
            DropReason::Denied { by } => {
                let names: Vec<(String, String)> = by.iter().map(|o| self.origin_name(*o)).collect();
                let full: Vec<&str> = names.iter().map(|(_, f)| f.as_str()).collect();
                (
                    format!("{label}: {proto}/{port} denied by {}", full.join(", ")),
                    names.into_iter().map(|(n, _)| n).collect(),
                )
            }
            DropReason::NoAllow { enforced_by } => {
                let names: Vec<(String, String)> = enforced_by.iter().map(|o| self.origin_name(*o)).collect();
                let full: Vec<&str> = names.iter().map(|(_, f)| f.as_str()).collect();
                (
                    format!("{label}: no rule allows {proto}/{port} (default deny from {})", full.join(", ")),
                    names.into_iter().map(|(n, _)| n).collect(),
                )
            }
            DropReason::ConflictingParsers { by } => {
                let names: Vec<(String, String)> = by.iter().map(|o| self.origin_name(*o)).collect();
                let full: Vec<&str> = names.iter().map(|(_, f)| f.as_str()).collect();
                (
                    format!(
                        "{label}: rules with different L7 parsers cover {proto}/{port} ({}): refused",
                        full.join(", ")
                    ),
                    names.into_iter().map(|(n, _)| n).collect(),
                )
            }
        }
    }

    /// Judges the request at one proxy. Returns the outcome, a note and the allowing policy.
    fn judge_l7(
        &self,
        l7: &L7Policy,
        request: &Request<'_>,
        mut explanation: Option<&mut Vec<String>>,
        label: &str,
    ) -> (Outcome, String, Option<String>) {
        let verdict = match request {
            Request::None => {
                return (Outcome::Allow, format!("redirected to the {} proxy (no request given)", l7.parser), None);
            }
            Request::Http { method, path, host, headers } => {
                let req = HttpRequestInfo {
                    method: method.as_bytes(),
                    path: path.as_bytes(),
                    authority: host.map(str::as_bytes),
                };
                if let Some(exp) = explanation.as_deref_mut() {
                    for (set, origins) in &l7.sets {
                        if let L7Set::Http(h) = set {
                            for (i, matched) in h.explain(&req, headers) {
                                let (_, full) = self.origin_name(origins.get(i).copied().unwrap_or(OriginId(0)));
                                let rule = h.rules().get(i).map(ToString::to_string).unwrap_or_default();
                                exp.push(format!(
                                    "  {label}: http rule {rule} ({full}): {}",
                                    if matched { "matches" } else { "no match" }
                                ));
                            }
                        }
                    }
                }
                let mut scratch = headers.clone();
                (l7.check_http(&req, &mut scratch, &mut HeaderLog::default()), format!("{method} {path}"))
            }
            Request::Kafka(k) => {
                if let Some(exp) = explanation.as_deref_mut() {
                    for (set, origins) in &l7.sets {
                        if let L7Set::Kafka(ks) = set {
                            for (i, rule) in ks.rules().iter().enumerate() {
                                let (_, full) = self.origin_name(origins.get(i).copied().unwrap_or(OriginId(0)));
                                exp.push(format!("  {label}: kafka rule {rule} ({full})"));
                            }
                        }
                    }
                }
                (l7.check_kafka(k), format!("kafka apiKey {} topics [{}]", k.api_key, k.topics.join(",")))
            }
            Request::Dns(q) => {
                if let Some(exp) = explanation {
                    for (set, origins) in &l7.sets {
                        if let L7Set::Dns(d) = set {
                            let (_, full) = self.origin_name(origins.first().copied().unwrap_or(OriginId(0)));
                            let pats: Vec<String> = d.patterns().iter().map(ToString::to_string).collect();
                            exp.push(format!(
                                "  {label}: dns rules [{}] ({full}): {}",
                                pats.join("; "),
                                if d.allows(q) { "match" } else { "no match" }
                            ));
                        }
                    }
                }
                (l7.check_dns(q), format!("DNS query {q}"))
            }
        };
        let (verdict, what) = verdict;
        let mismatch = match (request, l7.parser) {
            (Request::Http { .. }, crate::model::L7Parser::Http)
            | (Request::Kafka(_), crate::model::L7Parser::Kafka)
            | (Request::Dns(_), crate::model::L7Parser::Dns)
            | (Request::None, _) => None,
            _ => Some(l7.parser),
        };
        if let Some(parser) = mismatch {
            return (Outcome::Deny, format!("{what}: the {parser} proxy cannot parse it (fail closed)"), None);
        }
        match verdict {
            L7Verdict::Allow(by) => {
                let (name, full) = by.map(|o| self.origin_name(o)).unwrap_or_default();
                let note = if l7.wildcard.is_empty() {
                    format!("{what} allowed by {full}")
                } else {
                    format!("{what} allowed by {full} (an L4-only allow on this port allows every request)")
                };
                (Outcome::Allow, note, Some(name).filter(|n| !n.is_empty()))
            }
            L7Verdict::Deny => (Outcome::Deny, format!("{what} matches no {} rule", l7.parser), None),
        }
    }

    #[expect(clippy::too_many_arguments, reason = "an explanation needs the whole flow")]
    fn explain_direction(
        &self,
        out: &mut Vec<String>,
        label: &str,
        policy: &crate::snapshot::DirectionPolicy,
        peer: IdentityId,
        proto: Proto,
        port: u16,
        verdict: &L4Verdict,
    ) {
        let selected: Vec<String> = policy.selected_by.iter().map(|o| self.origin_name(*o).1).collect();
        out.push(format!(
            "{label}: {} (selected by: {})",
            if policy.enforced { "default deny" } else { "not enforced" },
            if selected.is_empty() { "no rule".to_owned() } else { selected.join(", ") }
        ));
        for e in &policy.entries {
            let action = match &e.action {
                crate::snapshot::EntryAction::Deny => "deny".to_owned(),
                crate::snapshot::EntryAction::Allow => "allow".to_owned(),
                crate::snapshot::EntryAction::Redirect { rules, .. } => format!("redirect to {} proxy", rules.parser()),
            };
            let ports = match e.proto {
                crate::snapshot::ProtoMatch::Any => "any protocol".to_owned(),
                crate::snapshot::ProtoMatch::Only(p) if e.port_start == e.port_end => format!("{p}/{}", e.port_start),
                crate::snapshot::ProtoMatch::Only(p) if e.port_start == 0 && e.port_end == u16::MAX => format!("{p}/*"),
                crate::snapshot::ProtoMatch::Only(p) => format!("{p}/{}-{}", e.port_start, e.port_end),
            };
            let peers = match &e.peers {
                crate::snapshot::PeerSet::All => "all peers".to_owned(),
                crate::snapshot::PeerSet::Ids(ids) => format!("identities {ids:?}"),
            };
            let origins: Vec<String> = e.origins.iter().map(|o| self.origin_name(*o).1).collect();
            let peer_ok = e.peers.contains(peer);
            let port_ok = e.proto.matches(proto)
                && (e.proto == crate::snapshot::ProtoMatch::Any || (e.port_start..=e.port_end).contains(&port));
            out.push(format!(
                "  {action} {ports} from/to {peers} [{}]: peer {}, port {} -> {}",
                origins.join(", "),
                if peer_ok { "matches" } else { "no match" },
                if port_ok { "matches" } else { "no match" },
                if peer_ok && port_ok { "applies" } else { "does not apply" }
            ));
        }
        let v = match verdict {
            L4Verdict::Allow { .. } => "allow".to_owned(),
            L4Verdict::Redirect(l7) => format!("redirect to the {} proxy", l7.parser),
            L4Verdict::Drop(_) => "drop".to_owned(),
        };
        out.push(format!("{label}: L3/L4 verdict: {v}"));
    }
}

// === running test files ===

/// A loaded test file, ready to run.
#[derive(Debug)]
pub struct TestSuite {
    /// File name as given.
    pub file: String,
    /// The resolved scenario.
    pub scenario: Scenario,
    /// The cases.
    pub cases: Vec<Case>,
}

/// Reads and parses a test file (without loading its policies).
pub fn read_test_file(path: &Path) -> Result<TestFile, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read file: {e}"))?;
    parse_test_file(&name, &text)
}

/// Parses test-file text.
pub fn parse_test_file(name: &str, text: &str) -> Result<TestFile, String> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| format!("{name}: invalid YAML: {e}"))?;
    crate::api::typed(&value, "").map_err(|e| format!("{name}: {e}"))
}

/// Loads a test file: parses it, loads its policies and resolves. Errors make the file invalid.
pub fn load_suite(path: &Path) -> Result<TestSuite, Vec<String>> {
    let name = path.display().to_string();
    let tf = read_test_file(path).map_err(|e| vec![e])?;
    let base: PathBuf = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut b = ScenarioBuilder::new();
    b.test_file(&name, &tf, &base);
    let scenario = b.build()?;
    // Every case must be evaluable; a case naming an unknown endpoint makes the file invalid.
    let errors: Vec<String> = tf
        .cases
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            scenario.evaluate(&c.flow(), false).err().map(|e| format!("{name}: cases[{i}] ({}): {e}", c.name))
        })
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(TestSuite { file: name, scenario, cases: tf.cases })
}

impl TestSuite {
    /// Runs every case.
    pub fn run(&self) -> Vec<CaseResult> {
        self.cases
            .iter()
            .map(|c| {
                let (actual, reason, deciding) = match self.scenario.evaluate(&c.flow(), false) {
                    Ok(ev) => (ev.outcome, ev.reason, ev.deciding),
                    Err(e) => (Outcome::Drop, format!("cannot evaluate: {e}"), vec![]),
                };
                let rule_ok = c
                    .expect_rule
                    .as_deref()
                    .is_none_or(|want| deciding.iter().any(|d| d == want || d.rsplit('/').next() == Some(want)));
                let mut reason = reason;
                if !rule_ok {
                    reason = format!(
                        "expected rule {:?}, decided by [{}]; {reason}",
                        c.expect_rule.as_deref().unwrap_or(""),
                        deciding.join(", ")
                    );
                }
                CaseResult {
                    file: self.file.clone(),
                    name: c.name.clone(),
                    expected: c.expect,
                    actual,
                    pass: actual == c.expect && rule_ok,
                    reason,
                    rule: deciding.into_iter().find(|d| !d.is_empty()),
                }
            })
            .collect()
    }
}
