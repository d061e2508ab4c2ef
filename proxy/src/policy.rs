//! What policy says about one proxied connection and its requests.
//!
//! On accept (and again whenever a new snapshot is in force) the connection's two ends are
//! resolved to identities and endpoints, and the L3/L4 verdicts of both directions are taken:
//! the source endpoint's egress towards the destination, the destination endpoint's ingress from
//! the source. Either dropping drops every request (the datapath would not have let the flow
//! through; the proxy fails closed the same way). Otherwise each redirecting direction's L7 rules
//! must allow a request; a direction that allows at L3/L4 without L7 rules allows every request.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};

use policy_engine::http::{HeaderLog, HeaderMap, HttpRequestInfo};
use policy_engine::identity::IdentityId;
use policy_engine::model::Direction;
use policy_engine::pair::{PairVerdict, Peer};
use policy_engine::snapshot::{DropReason, EndpointPolicy, L4Verdict, L7Policy, L7Verdict, OriginId, Proto, Snapshot};
use porin_flow::flow::{DropReason as FlowDropReason, FlowEndpoint, TrafficDirection, Verdict};

use crate::config::{ListenerConfig, PeerRef};
use crate::fqdn::{FqdnState, LearnedAddr};

/// One end of the connection, resolved.
#[derive(Clone, Debug)]
pub struct End {
    /// For flow records (shared by every connection with this peer under one snapshot).
    pub record: Arc<FlowEndpoint>,
    /// Address.
    pub ip: IpAddr,
    /// Port.
    pub port: u16,
    /// Names the DNS proxy learned the address under (with their FQDN selector identities).
    pub learned: Option<Arc<LearnedAddr>>,
}

impl End {
    /// The learned names (none for unnamed addresses).
    pub fn names(&self) -> &[String] {
        self.learned.as_deref().map_or(&[], |l| &l.names[..])
    }
}

/// Why policy denies a connection or a request — or, in audit mode, would have denied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The flow record's drop reason.
    pub reason: FlowDropReason,
    /// Why, for the flow record.
    pub summary: String,
    /// The deciding rule, when one is known.
    pub policy: Option<String>,
}

/// The connection-level verdict.
#[derive(Clone, Debug)]
pub enum ConnVerdict {
    /// Every request is denied.
    Drop(Denial),
    /// Requests are judged by these (none: that direction allows everything).
    Judge {
        /// The source endpoint's egress L7 rules.
        egress: Option<Arc<L7Policy>>,
        /// The destination endpoint's ingress L7 rules.
        ingress: Option<Arc<L7Policy>>,
        /// Audit mode of either side.
        audit: Audit,
    },
}

impl ConnVerdict {
    /// Whether every request gets the same verdict under `other`: both judged, by the same rules
    /// on each side, with the same audit modes and no audited L3/L4 drop. Balancing may then move
    /// a request from one destination to the other.
    pub fn same_as(&self, other: &Self) -> bool {
        let same = |a: &Option<Arc<L7Policy>>, b: &Option<Arc<L7Policy>>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same_rules(b),
            _ => false,
        };
        match (self, other) {
            (
                Self::Judge { egress: e1, ingress: i1, audit: a1 },
                Self::Judge { egress: e2, ingress: i2, audit: a2 },
            ) => {
                same(e1, e2)
                    && same(i1, i2)
                    && a1.egress == a2.egress
                    && a1.ingress == a2.ingress
                    && a1.dropped.is_none()
                    && a2.dropped.is_none()
            }
            _ => false,
        }
    }
}

/// Which sides' policies are in audit mode (what they deny is recorded `AUDIT` and passes), and
/// the L3/L4 drop a side in audit mode let through.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    /// The source endpoint's egress policy.
    pub egress: bool,
    /// The destination endpoint's ingress policy.
    pub ingress: bool,
    /// An audited side's L3/L4 policy drops the connection: every request is audited.
    pub dropped: Option<Denial>,
}

impl Audit {
    fn of(&self, side: Direction) -> bool {
        match side {
            Direction::Egress => self.egress,
            Direction::Ingress => self.ingress,
        }
    }
}

/// Both ends of a connection, as its flow records show them (shared by every record of it).
#[derive(Clone, Debug)]
pub struct Ends {
    /// Client side.
    pub source: End,
    /// Server side.
    pub destination: End,
    /// Which side's policy judges (ingress when both do).
    pub direction: TrafficDirection,
    /// What records call these ends on the wire ([`Ends::next_id`]: none two alike in a run).
    pub id: u64,
    /// Their encoded size on the wire, once known (frames count it against their budget).
    pub wire_len: std::sync::OnceLock<usize>,
    /// The SPIFFE ID of the client's certificate: the connection came through the mTLS tunnel.
    pub spiffe_id: Option<Arc<str>>,
}

impl Ends {
    /// A fresh id for a new set of ends.
    pub fn next_id() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Names of allowing rules, formatted once: `(origin, "namespace/name path")`.
type RuleNames = Mutex<Vec<(OriginId, Arc<str>)>>;

/// Policy for one connection under one snapshot.
#[derive(Debug)]
pub struct ConnPolicy {
    /// The snapshot it was taken from.
    pub snapshot: Option<Arc<Snapshot>>,
    /// The two ends.
    pub ends: Arc<Ends>,
    /// The verdict.
    pub verdict: ConnVerdict,
    /// Names of rules that allowed requests, formatted once (shared with the policies made from
    /// this one for other client ports).
    rule_names: Arc<RuleNames>,
}

/// The verdict on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// Forwarded.
    Pass(Pass),
    /// Denied by policy.
    Deny(Denial),
}

/// A request that goes on: allowed by policy, or denied by a policy in audit mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// The allowing rule, when one is known.
    pub rule: Option<Arc<str>>,
    /// What a policy in audit mode would have denied it for.
    pub audited: Option<Denial>,
}

impl Pass {
    /// The verdict of the request's records (and its answer's): `FORWARDED`, or `AUDIT`.
    pub fn verdict(&self) -> Verdict {
        if self.audited.is_some() { Verdict::Audit } else { Verdict::Forwarded }
    }

    /// The drop reason its records carry (an audited request's: what policy would have said).
    pub fn reason(&self) -> Option<FlowDropReason> {
        self.audited.as_ref().map(|d| d.reason)
    }

    /// The summary its records carry.
    pub fn summary(&self) -> &str {
        self.audited.as_ref().map_or("", |d| d.summary.as_str())
    }

    /// The rule its records name: the allowing one, or for an audited request the denying one.
    pub fn rule(&self) -> Option<Arc<str>> {
        match &self.audited {
            Some(d) => d.policy.as_deref().map(Arc::from).or_else(|| self.rule.clone()),
            None => self.rule.clone(),
        }
    }
}

fn origin(snap: &Snapshot, id: OriginId) -> Option<String> {
    snap.origin(id).map(|o| format!("{} {}", o.policy, o.path))
}

/// Flow-record descriptions of the peers under one snapshot, made once and shared by the records
/// of every connection (a record backlog full of per-connection copies would hold megabytes).
#[derive(Debug, Default)]
pub struct Descriptions {
    cache: Mutex<DescriptionCache>,
}

/// The snapshot the descriptions belong to, and the descriptions by (identity, endpoint, FQDN
/// selector identities).
type DescriptionCache = (Weak<Snapshot>, HashMap<(IdentityId, usize, Arc<[IdentityId]>), Arc<FlowEndpoint>>);

/// Most descriptions kept per snapshot (learned addresses can make many distinct ones).
const MAX_DESCRIPTIONS: usize = 4096;

impl Descriptions {
    /// The description of `identity` (and its endpoint, when local; its FQDN selector
    /// identities, when learned) under `snap`: the selectors' `fqdn:` labels join the identity's.
    fn get(
        &self,
        snap: &Arc<Snapshot>,
        identity: IdentityId,
        ep: Option<&EndpointPolicy>,
        fqdn: &Arc<[IdentityId]>,
    ) -> Arc<FlowEndpoint> {
        let make = || {
            let labels = std::iter::once(identity)
                .chain(fqdn.iter().copied())
                .filter_map(|id| snap.identity(id))
                .flat_map(|i| i.labels.iter().map(ToString::to_string).collect::<Vec<_>>())
                .collect();
            Arc::new(FlowEndpoint {
                identity,
                namespace: ep.map(|e| e.namespace.clone()).unwrap_or_default(),
                pod_name: ep.map(|e| e.name.clone()).unwrap_or_default(),
                labels,
            })
        };
        let Ok(mut cache) = self.cache.lock() else { return make() };
        if cache.0.as_ptr() != Arc::as_ptr(snap) || cache.1.len() >= MAX_DESCRIPTIONS {
            *cache = (Arc::downgrade(snap), HashMap::new());
        }
        // Endpoints are told apart by where the (immutable) snapshot keeps them.
        let key = (identity, ep.map_or(0, |e| std::ptr::from_ref(e) as usize), fqdn.clone());
        cache.1.entry(key).or_insert_with(make).clone()
    }
}

/// How the ends of a flow are looked up: the peer descriptions and what the DNS proxy learned.
#[derive(Clone, Copy)]
pub struct Lookup<'a> {
    /// Shared peer descriptions.
    pub descriptions: &'a Descriptions,
    /// Learned addresses.
    pub fqdn: &'a FqdnState,
}

/// Resolves one end: its identity, the local endpoint (if any) and its description.
fn resolve_end<'s>(
    snap: &'s Arc<Snapshot>,
    lookup: Lookup<'_>,
    peer: &PeerRef,
    socket: SocketAddr,
    port: u16,
) -> Result<(End, Option<&'s EndpointPolicy>), String> {
    let none: Arc<[IdentityId]> = Arc::from([]);
    let by_ip = |ip: IpAddr| {
        let ep = snap.endpoint_by_ip(ip);
        let id = ep.map_or_else(|| snap.identity_of(ip), |e| e.identity);
        let learned = if ep.is_none() { lookup.fqdn.lookup(ip) } else { None };
        let fqdn = learned.as_ref().map_or_else(|| none.clone(), |l| l.selectors.clone());
        (End { record: lookup.descriptions.get(snap, id, ep, &fqdn), ip, port, learned }, ep)
    };
    Ok(match peer {
        PeerRef::Pod(p) => {
            let (ns, name) = p.split_once('/').unwrap_or(("default", p));
            let ep = snap
                .endpoint(ns, name)
                .ok_or_else(|| format!("endpoint {p} is not in policy snapshot {}", snap.version))?;
            let ip = ep.ips.first().copied().unwrap_or(socket.ip());
            (
                End { record: lookup.descriptions.get(snap, ep.identity, Some(ep), &none), ip, port, learned: None },
                Some(ep),
            )
        }
        PeerRef::Ip(ip) => by_ip(*ip),
        PeerRef::Socket => by_ip(socket.ip()),
        PeerRef::Identity(id) => (
            End { record: lookup.descriptions.get(snap, *id, None, &none), ip: socket.ip(), port, learned: None },
            None,
        ),
    })
}

fn drop_of(snap: &Snapshot, reason: &DropReason, side: Direction) -> Denial {
    let (name, ids, what): (FlowDropReason, &[OriginId], &str) = match reason {
        DropReason::Denied { by } => (FlowDropReason::PolicyDeny, by, "a deny rule matches"),
        DropReason::NoAllow { enforced_by } => (FlowDropReason::PolicyDenied, enforced_by, "no rule allows it"),
        DropReason::ConflictingParsers { by } => {
            (FlowDropReason::PolicyDenied, by, "rules with different L7 parsers cover it")
        }
    };
    Denial {
        reason: name,
        summary: format!("{side} policy drops the connection: {what}"),
        policy: ids.first().and_then(|o| origin(snap, *o)),
    }
}

fn traffic_direction(d: Direction) -> TrafficDirection {
    match d {
        Direction::Ingress => TrafficDirection::Ingress,
        Direction::Egress => TrafficDirection::Egress,
    }
}

impl ConnPolicy {
    /// Takes the verdict of a flow (`proto`: TCP, or UDP for DNS) from `client` to `local` on
    /// `listener` under `snap`.
    pub fn decide(
        snap: Option<Arc<Snapshot>>,
        lookup: Lookup<'_>,
        listener: &ListenerConfig,
        client: SocketAddr,
        local: SocketAddr,
        proto: Proto,
    ) -> Self {
        // The destination: the original one (transparent, `socket`), else the configured upstream.
        let dst_sock = match (&listener.destination, listener.upstream) {
            (PeerRef::Socket, _) | (_, None) => local,
            (_, Some(up)) => up,
        };
        let port = listener.port.unwrap_or(dst_sock.port());
        let blank = |ip: IpAddr, port: u16| End { record: Arc::default(), ip, port, learned: None };
        let Some(s) = snap.as_ref() else {
            return Self::new(
                None,
                Ends {
                    source: blank(client.ip(), client.port()),
                    destination: blank(local.ip(), port),
                    direction: TrafficDirection::Ingress,
                    id: Ends::next_id(),
                    wire_len: Default::default(),
                    spiffe_id: None,
                },
                ConnVerdict::Drop(Denial {
                    reason: FlowDropReason::PolicyDenied,
                    summary: "no policy snapshot yet: failing closed".into(),
                    policy: None,
                }),
            );
        };
        let ends = resolve_end(s, lookup, &listener.source, client, client.port()).and_then(|(src, sep)| {
            resolve_end(s, lookup, &listener.destination, dst_sock, port).map(|(dst, dep)| (src, sep, dst, dep))
        });
        let (source, src_ep, destination, dst_ep) = match ends {
            Ok(e) => e,
            Err(summary) => {
                return Self::new(
                    snap.clone(),
                    Ends {
                        source: blank(client.ip(), client.port()),
                        destination: blank(dst_sock.ip(), port),
                        direction: TrafficDirection::Ingress,
                        id: Ends::next_id(),
                        wire_len: Default::default(),
                        spiffe_id: None,
                    },
                    ConnVerdict::Drop(Denial { reason: FlowDropReason::UnknownEndpoint, summary, policy: None }),
                );
            }
        };
        let fqdn = |e: &End| e.learned.as_ref().map(|l| l.selectors.clone());
        let (src_fqdn, dst_fqdn) = (fqdn(&source), fqdn(&destination));
        let pair = PairVerdict::judge(
            Peer { identity: source.record.identity, fqdn: src_fqdn.as_deref().unwrap_or(&[]), endpoint: src_ep },
            Peer { identity: destination.record.identity, fqdn: dst_fqdn.as_deref().unwrap_or(&[]), endpoint: dst_ep },
            proto,
            port,
        );
        let verdict = Self::verdict_of(s, &pair, listener.authenticated.is_some());
        let direction = traffic_direction(pair.reported_direction());
        Self::new(
            snap.clone(),
            Ends {
                source,
                destination,
                direction,
                id: Ends::next_id(),
                wire_len: Default::default(),
                spiffe_id: listener.authenticated.as_ref().map(|p| Arc::from(p.id.to_string())),
            },
            verdict,
        )
    }

    /// The connection's verdict from both sides' L3/L4 verdicts: the first side that drops
    /// drops it — unless that side's policy is in audit mode: then its drop is remembered
    /// (every request is audited) and the other side still judges.
    ///
    /// A side whose allowing rules require authentication drops a connection that did not come
    /// authenticated (through the tunnel) from outside the node's endpoints: the datapath does
    /// not hand such flows to the proxy in plain; this holds if it ever did.
    fn verdict_of(snap: &Snapshot, pair: &PairVerdict<'_>, authenticated: bool) -> ConnVerdict {
        let audit_of = |d: Direction| {
            let side = match d {
                Direction::Egress => pair.egress.as_ref(),
                Direction::Ingress => pair.ingress.as_ref(),
            };
            side.is_some_and(|s| s.endpoint.direction(d).audit)
        };
        let mut audit =
            Audit { egress: audit_of(Direction::Egress), ingress: audit_of(Direction::Ingress), dropped: None };
        let remote_source = pair.ingress.is_some() && pair.egress.is_none();
        for side in pair.sides() {
            let denial = match &side.verdict {
                L4Verdict::Drop(why) => Some(drop_of(snap, why, side.direction)),
                _ if side.auth_required && remote_source && !authenticated => Some(Denial {
                    reason: FlowDropReason::AuthRequired,
                    summary: format!(
                        "{} policy requires authentication and the connection did not come through the mTLS tunnel",
                        side.direction
                    ),
                    policy: None,
                }),
                _ => None,
            };
            if let Some(denial) = denial {
                if !audit.of(side.direction) {
                    return ConnVerdict::Drop(denial);
                }
                audit.dropped.get_or_insert(denial);
            }
        }
        ConnVerdict::Judge {
            egress: pair.l7(Direction::Egress).cloned().map(Arc::new),
            ingress: pair.l7(Direction::Ingress).cloned().map(Arc::new),
            audit,
        }
    }

    fn new(snapshot: Option<Arc<Snapshot>>, ends: Ends, verdict: ConnVerdict) -> Self {
        Self { snapshot, ends: Arc::new(ends), verdict, rule_names: Arc::default() }
    }

    /// The same verdict for another flow between the same two addresses (another client port):
    /// what a DNS proxy judging many datagrams of one client needs, without deciding again.
    pub fn for_client_port(&self, port: u16) -> Self {
        let mut ends = Ends::clone(&self.ends);
        ends.id = Ends::next_id();
        ends.wire_len = std::sync::OnceLock::new();
        ends.source.port = port;
        Self {
            snapshot: self.snapshot.clone(),
            ends: Arc::new(ends),
            verdict: self.verdict.clone(),
            rule_names: self.rule_names.clone(),
        }
    }

    /// The name of an allowing rule, formatted once per connection policy.
    fn rule_name(&self, snap: &Snapshot, id: OriginId) -> Option<Arc<str>> {
        let mut names = self.rule_names.lock().ok()?;
        if let Some((_, n)) = names.iter().find(|(o, _)| *o == id) {
            return Some(n.clone());
        }
        let n: Arc<str> = origin(snap, id)?.into();
        names.push((id, n.clone()));
        Some(n)
    }

    /// Judges one request with each side's L7 rules (`check`), egress first: any side that denies
    /// denies (`what` names the rules in the summary); a side without L7 rules allows. A side in
    /// audit mode never denies: what it would deny passes, audited.
    fn judge(&self, what: &str, mut check: impl FnMut(&L7Policy, Direction) -> L7Verdict) -> RequestVerdict {
        let (egress, ingress, audit) = match &self.verdict {
            ConnVerdict::Drop(denial) => return RequestVerdict::Deny(denial.clone()),
            ConnVerdict::Judge { egress, ingress, audit } => (egress, ingress, audit),
        };
        let Some(snap) = self.snapshot.as_deref() else {
            return RequestVerdict::Deny(Denial {
                reason: FlowDropReason::PolicyDenied,
                summary: "no snapshot".into(),
                policy: None,
            });
        };
        let mut pass = Pass { rule: None, audited: audit.dropped.clone() };
        for (p, side) in [(egress, Direction::Egress), (ingress, Direction::Ingress)] {
            let Some(p) = p else { continue };
            match check(p, side) {
                L7Verdict::Allow(o) => {
                    if let Some(o) = o {
                        pass.rule = self.rule_name(snap, o);
                    }
                }
                L7Verdict::Deny => {
                    let denial = Denial {
                        reason: FlowDropReason::PolicyDenied,
                        summary: format!("no {side} {what}"),
                        policy: None,
                    };
                    if !audit.of(side) {
                        return RequestVerdict::Deny(denial);
                    }
                    pass.audited.get_or_insert(denial);
                }
            }
        }
        RequestVerdict::Pass(pass)
    }

    /// Judges one HTTP request; header actions of matching rules are applied to `headers`.
    pub fn check_http(&self, req: &HttpRequestInfo<'_>, headers: &mut dyn HeaderMap) -> RequestVerdict {
        self.judge("HTTP rule allows the request", |p, side| {
            let mut log = HeaderLog::default();
            let v = p.check_http(req, headers, &mut log);
            if matches!(v, L7Verdict::Allow(_)) && (!log.rejected.is_empty() || !log.missing.is_empty()) {
                crate::log_limited!(info, %side, rejected = ?log.rejected, missing = ?log.missing, "Header match actions");
            }
            v
        })
    }

    /// Judges one DNS query name (normalised, fully qualified). A side without DNS rules for the
    /// flow allows every name (Cilium: no DNS rules for the port, everything allowed).
    pub fn check_dns(&self, qname: &str) -> RequestVerdict {
        self.judge(&format!("DNS rule allows {qname}"), |p, _| p.check_dns(qname))
    }

    /// Judges one Kafka request.
    pub fn check_kafka(&self, req: &policy_engine::kafka::KafkaRequest<'_>) -> RequestVerdict {
        self.judge("Kafka rule allows the request", |p, _| p.check_kafka(req))
    }
}

/// [`HeaderMap`] over a request's `http::HeaderMap`, for header rules and their actions.
pub struct PolicyHeaders<'a>(pub &'a mut http::HeaderMap);

impl HeaderMap for PolicyHeaders<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let mut vals = self.0.get_all(name).iter();
        let first = vals.next()?;
        match vals.next() {
            None => Some(Cow::Borrowed(first.as_bytes())),
            Some(second) => {
                let mut joined = first.as_bytes().to_vec();
                for v in std::iter::once(second).chain(vals) {
                    joined.push(b',');
                    joined.extend_from_slice(v.as_bytes());
                }
                Some(Cow::Owned(joined))
            }
        }
    }

    fn append(&mut self, name: &str, value: &[u8]) {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_bytes(value)) {
            self.0.append(n, v);
        }
    }

    fn set(&mut self, name: &str, value: &[u8]) {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_bytes(value)) {
            self.0.insert(n, v);
        }
    }

    fn remove(&mut self, name: &str) {
        self.0.remove(name);
    }
}
