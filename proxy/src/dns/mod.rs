//! The transparent DNS proxy: the datapath hands it the UDP and TCP flows whose egress policy has
//! `rules.dns`, with the client's address and the original server as the socket's two ends.
//!
//! Each query goes through the same phases as an HTTP request:
//!
//! 1. **parse** ([`message::parse_query`]): a query that does not read one way is dropped or
//!    answered FORMERR / NOTIMP, never forwarded;
//! 2. **judge** ([`ConnPolicy::check_dns`]): both sides' L3/L4 verdicts on the flow (the pair
//!    verdict, as for every proxied flow), then the DNS rules on the query name — denied: answered
//!    `REFUSED` (or `NXDOMAIN`, `dns.reject_response_code`) with the same id and question;
//! 3. **forward** ([`udp`], [`tcp`]): to the original server over the same transport, from the
//!    client's own address; the answer must be for the question asked;
//! 4. **learn** ([`crate::fqdn::FqdnState::learn`]): the A/AAAA addresses of the question's name
//!    and its CNAME chain, with the chain's lowest TTL (at least `dns.min_ttl`), go into the
//!    kernel's FQDN map *before* the answer is released, so the connection that follows is never
//!    dropped; if the kernel cannot take them the client gets `SERVFAIL` instead.
//!
//! Every query and every answer leaves a flow record with the DNS details.

pub mod message;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::ResponseCode;
use policy_engine::snapshot::Proto;
use porin_flow::flow::{DnsInfo, DropReason, Verdict};

use crate::config::{ListenerConfig, RejectCode};
use crate::policy::{ConnPolicy, Denial, Pass, RequestVerdict};
use crate::records::{Counters, Detail, Record, Transport, now_ns};
use crate::service::Shared;

use self::message::{Answer, Query, Unjudgeable};

/// What the proxy does with one query.
pub(crate) enum Decision {
    /// Nothing (not a query).
    Drop,
    /// Answer it with these bytes.
    Answer(Vec<u8>),
    /// Forward it; the exchange records the answer.
    Forward(Box<Exchange>),
}

/// An allowed query on its way to the server.
pub(crate) struct Exchange {
    policy: Arc<ConnPolicy>,
    transport: Transport,
    start: Instant,
    query: Query,
    /// How the query passed (allowed, or audited).
    pass: Pass,
}

/// What became of the server's answer.
pub(crate) enum Released {
    /// Send it to the client.
    Answer(Vec<u8>),
    /// Not an answer to this query (another id or question): ignore it, keep waiting.
    NotOurs,
}

fn transport_proto(t: Transport) -> Proto {
    match t {
        Transport::Tcp => Proto::Tcp,
        Transport::Udp => Proto::Udp,
    }
}

fn qtype_names(q: &Query) -> Vec<String> {
    vec![q.qtype.to_string()]
}

/// Flow verdicts already taken, per (client address, server), under one snapshot: the L3/L4 side
/// of a query is the same for every datagram of a client to a server (only its port differs).
#[derive(Default)]
pub(crate) struct Verdicts {
    snapshot: Option<std::sync::Weak<policy_engine::snapshot::Snapshot>>,
    by_flow: std::collections::HashMap<(std::net::IpAddr, SocketAddr), Arc<ConnPolicy>>,
}

/// Most flows remembered (clients × servers); past it the set starts over.
const MAX_VERDICTS: usize = 65_536;

impl Verdicts {
    fn get(
        &mut self,
        shared: &Shared,
        listener: &ListenerConfig,
        client: SocketAddr,
        server: SocketAddr,
        transport: Transport,
    ) -> Arc<ConnPolicy> {
        let current = shared.policy.current();
        let same = match (&self.snapshot, &current) {
            (Some(w), Some(c)) => std::ptr::eq(w.as_ptr(), Arc::as_ptr(c)),
            (None, None) => true,
            _ => false,
        };
        if !same || self.by_flow.len() >= MAX_VERDICTS {
            self.snapshot = current.as_ref().map(Arc::downgrade);
            self.by_flow.clear();
        }
        let decided = self.by_flow.entry((client.ip(), server)).or_insert_with(|| {
            Arc::new(ConnPolicy::decide(current, shared.lookup(), listener, client, server, transport_proto(transport)))
        });
        if decided.ends.source.port == client.port() {
            decided.clone()
        } else {
            Arc::new(decided.for_client_port(client.port()))
        }
    }
}

/// Phases 1 and 2 for one message from `client` to `server`.
pub(crate) fn judge(
    shared: &Shared,
    verdicts: &mut Verdicts,
    listener: &ListenerConfig,
    client: SocketAddr,
    server: SocketAddr,
    transport: Transport,
    raw: &[u8],
) -> Decision {
    Counters::inc(&shared.counters.requests);
    let mut policy = || verdicts.get(shared, listener, client, server, transport);
    let query = match message::parse_query(raw) {
        Ok(q) => q,
        Err(e) => {
            Counters::inc(&shared.counters.rejected);
            let p = policy();
            let info = DnsInfo { observation_source: "proxy".into(), ..DnsInfo::default() };
            emit(
                shared,
                &p,
                transport,
                false,
                Verdict::Dropped,
                Some(DropReason::MalformedRequest),
                info,
                0,
                None,
                e.why(),
            );
            return match e {
                Unjudgeable::Drop(_) => Decision::Drop,
                Unjudgeable::Answer { reply, .. } => Decision::Answer(reply),
            };
        }
    };
    let policy = policy();
    let info = DnsInfo {
        query: query.name.clone(),
        qtypes: qtype_names(&query),
        observation_source: "proxy".into(),
        ..DnsInfo::default()
    };
    match policy.check_dns(&query.name) {
        RequestVerdict::Pass(pass) => {
            emit(
                shared,
                &policy,
                transport,
                false,
                pass.verdict(),
                pass.reason(),
                info,
                0,
                pass.rule(),
                pass.summary(),
            );
            Decision::Forward(Box::new(Exchange { policy, transport, start: Instant::now(), query, pass }))
        }
        RequestVerdict::Deny(Denial { reason, summary, policy: deciding }) => {
            Counters::inc(&shared.counters.denied);
            let rcode = match shared.dns.reject_response_code {
                RejectCode::Refused => ResponseCode::Refused,
                RejectCode::NameError => ResponseCode::NXDomain,
            };
            let rule = deciding.map(Arc::from);
            emit(shared, &policy, transport, false, Verdict::Dropped, Some(reason), info, 0, rule, &summary);
            Decision::Answer(message::answer(&query, rcode))
        }
    }
}

impl Exchange {
    /// The query's bytes as the client sent them are forwarded unchanged; this is the query.
    pub(crate) fn query(&self) -> &Query {
        &self.query
    }

    /// Phase 4 for the server's answer: learn, record, release (or `SERVFAIL` when learning
    /// failed: the answer would lead to connections the kernel drops).
    pub(crate) fn answered(&self, shared: &Shared, raw: &[u8]) -> Released {
        let answer = match message::read_answer(raw, &self.query) {
            Ok(a) => a,
            Err(why) => {
                crate::log_limited!(info, query = %self.query.name, %why, "DNS answer ignored");
                return Released::NotOurs;
            }
        };
        Counters::inc(&shared.counters.forwarded);
        let mut summary = String::new();
        let mut release = raw.to_vec();
        if answer.rcode == u16::from(ResponseCode::NoError)
            && !answer.ips.is_empty()
            && let Err(e) = self.learn(shared, &answer)
        {
            summary = format!("the kernel could not take what the answer teaches ({e}): SERVFAIL");
            release = message::answer(&self.query, ResponseCode::ServFail);
        }
        let failed = !summary.is_empty();
        let info = DnsInfo {
            query: self.query.name.clone(),
            ips: answer.ips.iter().map(ToString::to_string).collect(),
            ttl: answer.ttl,
            cnames: answer.cnames().to_vec(),
            observation_source: "proxy".into(),
            rcode: if failed { u32::from(u16::from(ResponseCode::ServFail)) } else { u32::from(answer.rcode) },
            qtypes: qtype_names(&self.query),
            rrtypes: answer.rrtypes.clone(),
        };
        let latency = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if failed {
            emit(
                shared,
                &self.policy,
                self.transport,
                true,
                Verdict::Error,
                None,
                info,
                latency,
                self.pass.rule(),
                &summary,
            );
        } else {
            let (verdict, reason) = (self.pass.verdict(), self.pass.reason());
            emit(
                shared,
                &self.policy,
                self.transport,
                true,
                verdict,
                reason,
                info,
                latency,
                self.pass.rule(),
                self.pass.summary(),
            );
        }
        Released::Answer(release)
    }

    fn learn(&self, shared: &Shared, answer: &Answer) -> std::io::Result<()> {
        let endpoint = {
            let src = &self.policy.ends.source.record;
            if src.pod_name.is_empty() {
                self.policy.ends.source.ip.to_string()
            } else {
                format!("{}/{}", src.namespace, src.pod_name)
            }
        };
        if let Some(snap) = shared.policy.current() {
            shared.fqdn.sync_to(&snap)?;
        }
        // The question's name, and the names of its CNAME chain that the same DNS rules would let
        // the client ask about: an answer never teaches addresses for a name the client could not
        // have looked up itself (a server allowed for `*.test` must not be able to vouch for
        // `api.example.com` through a CNAME). A name only audit mode lets through is not taught
        // either: the map is every endpoint's.
        let names: Vec<String> = answer
            .names
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                *i == 0 || matches!(self.policy.check_dns(n), RequestVerdict::Pass(p) if p.audited.is_none())
            })
            .map(|(_, n)| n.clone())
            .collect();
        let ttl = answer.ttl.max(shared.dns.min_ttl);
        shared.fqdn.learn(&names, &answer.ips, u64::from(ttl), &endpoint)
    }

    /// The server did not answer in time: recorded; the client gets nothing (as from Cilium).
    pub(crate) fn timed_out(&self, shared: &Shared, why: &str) {
        Counters::inc(&shared.counters.upstream_errors);
        let info = DnsInfo {
            query: self.query.name.clone(),
            qtypes: qtype_names(&self.query),
            observation_source: "proxy".into(),
            ..DnsInfo::default()
        };
        let latency = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        emit(shared, &self.policy, self.transport, true, Verdict::Error, None, info, latency, None, why);
    }
}

#[expect(clippy::too_many_arguments, reason = "one record's fields, named at each call")]
fn emit(
    shared: &Shared,
    policy: &ConnPolicy,
    transport: Transport,
    reply: bool,
    verdict: Verdict,
    reason: Option<DropReason>,
    info: DnsInfo,
    latency_ns: u64,
    rule: Option<Arc<str>>,
    summary: &str,
) {
    shared.records.emit(Record {
        time_ns: now_ns(),
        reply,
        verdict,
        reason,
        ends: policy.ends.clone(),
        transport,
        detail: Detail::Dns(Box::new(info)),
        latency_ns,
        policy: rule,
        summary: summary.to_owned(),
        service: None,
    });
}
