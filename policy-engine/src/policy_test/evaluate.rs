//! Judging one flow: both sides' L3/L4 verdicts (the engine's pair verdict), then the L7 request
//! at every side that redirects, with an explanation for `trace`.

use super::scenario::Party;
use super::*;

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
            // Protocols without ports.
            (None, Proto::Other(_)) => 0,
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
                // The test format names topics; an empty list is Cilium's "every topic".
                cluster_only: false,
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
        let (from_fqdn, to_fqdn) = (self.fqdn_identities(from), self.fqdn_identities(to));
        let endpoint = |p: &Party| match p {
            Party::Endpoint(i) => self.endpoint_policy(*i),
            _ => None,
        };
        let pair = PairVerdict::judge(
            Peer { identity: from_id, fqdn: &from_fqdn, endpoint: endpoint(from) },
            Peer { identity: to_id, fqdn: &to_fqdn, endpoint: endpoint(to) },
            proto,
            port,
        );
        let label = |s: &SideVerdict<'_>| format!("{} of {}/{}", s.direction, s.endpoint.namespace, s.endpoint.name);
        if explain {
            explanation.push(format!(
                "flow {} (identity {from_id}) -> {} (identity {to_id}) {proto}/{port}",
                self.party_name(from),
                self.party_name(to)
            ));
            for s in pair.sides() {
                let policy = s.endpoint.direction(s.direction);
                let (id, fqdn) = match s.direction {
                    crate::model::Direction::Egress => (to_id, &to_fqdn),
                    crate::model::Direction::Ingress => (from_id, &from_fqdn),
                };
                let peers: Vec<IdentityId> = std::iter::once(id).chain(fqdn.iter().copied()).collect();
                self.explain_direction(&mut explanation, &label(s), policy, &peers, proto, port, &s.verdict);
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
        peers: &[IdentityId],
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
            let selects = match &e.peers {
                crate::snapshot::PeerSet::All => "all peers".to_owned(),
                crate::snapshot::PeerSet::Ids(ids) => format!("identities {ids:?}"),
            };
            let origins: Vec<String> = e.origins.iter().map(|o| self.origin_name(*o).1).collect();
            let peer_ok = peers.iter().any(|p| e.peers.contains(*p));
            let port_ok = e.proto.matches(proto)
                && (e.proto == crate::snapshot::ProtoMatch::Any || (e.port_start..=e.port_end).contains(&port));
            out.push(format!(
                "  {action} {ports} from/to {selects} [{}]: peer {}, port {} -> {}",
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
