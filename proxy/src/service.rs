//! One client connection and its requests, in three phases a reader can follow:
//!
//! 1. **head** ([`crate::head`]): what the request is and where it goes — a head that reads two
//!    ways is refused (400, or gRPC `INTERNAL`);
//! 2. **judge** ([`ConnPolicy::check_http`]): the source's egress and the destination's ingress L7
//!    rules on the normalised request — denied: 403 `Access denied` (gRPC `PERMISSION_DENIED`);
//! 3. **forward** ([`crate::forward`]): to the upstream pool, or into a tunnel for an allowed
//!    upgrade / CONNECT — failures answered with the blame where it belongs.
//!
//! Every request leaves a flow record (and every response from upstream another): `Outcome`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use policy_engine::http::HttpRequestInfo;
use policy_engine::snapshot::Proto;
use porin_flow::flow::{DropReason, HttpProtocol, Verdict};

use crate::admission::{ConnState, ConnTable};
use crate::balance::{Backend, Backends, Balanced, Ended, Translations};
use crate::config::{Limits, ListenerConfig, UpstreamProtocol};
use crate::forward::{Hop, PendingUpgrade, UpgradeDecision, splice, strip_hop_by_hop, upstream_request};
use crate::h1guard::GuardShared;
use crate::head::{self, Kind};
use crate::policy::{ConnPolicy, ConnVerdict, Denial, Descriptions, Ends, Pass, PolicyHeaders, RequestVerdict};
use crate::records::{Counters, Record, Records};
use crate::reply::{self, ACCESS_DENIED, Connection, GRPC_ACCESS_DENIED, GrpcCode, ProxyBody};
use crate::snapshot::PolicyState;
use crate::upstream::{self, Blame, Pool, SendError, UpstreamBody, UpstreamError, Upstreams};

/// State shared by every connection of the process.
pub struct Shared {
    /// The snapshot in force.
    pub policy: Arc<PolicyState>,
    /// Upstream pools.
    pub upstreams: Upstreams,
    /// Client connections held, admitted and shed under pressure.
    pub conns: Arc<ConnTable>,
    /// Peer descriptions for flow records, shared across connections.
    pub descriptions: Descriptions,
    /// Flow records.
    pub records: Arc<Records>,
    /// Counters.
    pub counters: Counters,
    /// Limits.
    pub limits: Limits,
    /// What the DNS proxy learned.
    pub fqdn: Arc<crate::fqdn::FqdnState>,
    /// The DNS proxy's settings.
    pub dns: crate::config::DnsSettings,
    /// Kafka topic ids the brokers' Metadata answers named.
    pub kafka_topic_ids: crate::kafka::request::TopicIds,
    /// The backends requests are balanced over.
    pub backends: Backends,
    /// The kernel's translations of clients' connects (which connections asked for a service).
    pub translations: Option<Arc<dyn Translations>>,
    /// The mTLS tunnel between node proxies, when configured.
    pub tunnel: Option<Arc<crate::tunnel::Tunnel>>,
}

impl Shared {
    /// How the ends of flows are looked up.
    pub fn lookup(&self) -> crate::policy::Lookup<'_> {
        crate::policy::Lookup { descriptions: &self.descriptions, fqdn: &self.fqdn }
    }

    /// The pool of upstream `addr` (from `bind`, the client's address, for transparent
    /// upstreams), reached as `snap` says ([`upstream::Via::of`]: through the mTLS tunnel to
    /// another node's endpoint that wants its clients authenticated).
    pub fn pool(
        &self,
        snap: Option<&policy_engine::snapshot::Snapshot>,
        addr: SocketAddr,
        bind: Option<std::net::IpAddr>,
    ) -> Arc<Pool> {
        let via = upstream::Via::of(snap, self.tunnel.as_ref(), addr, bind);
        self.upstreams.pool(addr, bind, via, &self.limits)
    }
}

/// One client connection.
pub struct Conn {
    shared: Arc<Shared>,
    listener: Arc<ListenerConfig>,
    client: SocketAddr,
    local: SocketAddr,
    http2: bool,
    guard: Option<Arc<GuardShared>>,
    /// The connection's policy under the snapshot it was taken from (taken again after a swap).
    policy: ArcSwap<ConnPolicy>,
    pool: Arc<Pool>,
    /// The connection's entry in the connection table: requests in progress (idle connections
    /// are the ones shed under pressure).
    state: Arc<ConnState>,
    /// How its requests are balanced under the snapshot in force (taken again after a swap).
    route: ArcSwap<Route>,
}

/// A connection's requests balanced over a service's backends, or not, under one snapshot.
struct Route {
    snapshot: Option<Arc<policy_engine::snapshot::Snapshot>>,
    balanced: Option<Balanced>,
}

/// One request (or relayed flow) in progress on a connection, until dropped.
pub(crate) struct Inflight<'a>(&'a AtomicUsize);

impl<'a> Inflight<'a> {
    /// Counts one in `count` until dropped.
    pub(crate) fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request looked like, for its records.
struct Seen {
    start: Instant,
    method: Method,
    url: Arc<str>,
    protocol: HttpProtocol,
    policy: Arc<ConnPolicy>,
    /// `namespace/name` of the service the request is balanced within.
    service: Option<Arc<str>>,
    /// The ends its records name: the connection's, or those of the backend a balanced request
    /// went to.
    ends: Arc<Ends>,
}

impl Seen {
    /// The request goes to `backend` of `balanced`: its records name that backend.
    fn aim(&mut self, balanced: Option<&Balanced>, backend: Option<&Arc<Backend>>) {
        if let Some(ends) = balanced.zip(backend).and_then(|(b, x)| b.ends_of(x)) {
            self.ends = ends.clone();
        }
    }
}

/// What became of a request (or its response), as its flow record says.
enum Outcome {
    /// Allowed by policy (or audited); on its way upstream.
    Allowed(Pass),
    /// Denied by policy.
    Denied(Denial),
    /// Refused before policy: malformed or ambiguous.
    Refused(String),
    /// The upstream answered a request that passed.
    Answered(StatusCode, Pass),
    /// The upstream failed (or the client broke off); answered with this status.
    Failed(StatusCode, String),
}

impl Conn {
    /// A connection from `client` to `local` on `listener`.
    pub fn new(
        shared: Arc<Shared>,
        listener: Arc<ListenerConfig>,
        client: SocketAddr,
        local: SocketAddr,
        state: Arc<ConnState>,
        guard: Option<Arc<GuardShared>>,
    ) -> Self {
        let http2 = state.kind() == crate::admission::ConnKind::Http2;
        let policy = ConnPolicy::decide(shared.policy.current(), shared.lookup(), &listener, client, local, Proto::Tcp);
        // Transparent: to the original destination, from the client's own address.
        let (dst, bind) = match listener.upstream {
            Some(up) => (up, None),
            None => (local, Some(client.ip())),
        };
        let pool = shared.pool(policy.snapshot.as_deref(), dst, bind);
        let route = ArcSwap::from_pointee(Route { snapshot: None, balanced: None });
        let conn = Self {
            shared,
            listener,
            client,
            local,
            http2,
            guard,
            policy: ArcSwap::from_pointee(policy),
            pool,
            state,
            route,
        };
        let policy = conn.policy.load_full();
        conn.route(&policy);
        conn
    }

    /// How the connection's requests are balanced under the snapshot `policy` was decided in (the
    /// one its requests are judged under): transparent flows of this node's clients to a service
    /// backend (see [`crate::balance`]).
    fn route(&self, policy: &Arc<ConnPolicy>) -> Arc<Route> {
        let r = self.route.load_full();
        let same = match (&r.snapshot, &policy.snapshot) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if same {
            return r;
        }
        // Only a flow the client's own egress rules brought here is the client side's to balance;
        // one here for the destination's ingress rules alone keeps the backend the kernel chose.
        let egress_l7 = matches!(policy.verdict, ConnVerdict::Judge { egress: Some(_), .. });
        let balanced = match (&policy.snapshot, self.listener.upstream) {
            (Some(snap), None) if egress_l7 => {
                let same_policy = |candidate: SocketAddr| {
                    let c = ConnPolicy::decide(
                        Some(snap.clone()),
                        self.shared.lookup(),
                        &self.listener,
                        self.client,
                        candidate,
                        Proto::Tcp,
                    );
                    c.verdict.same_as(&policy.verdict).then_some(c.ends)
                };
                // What the client asked for, as the kernel's balancer knows it (one map read, for
                // connections to an opted-in service's backend only); when it cannot tell, the
                // connection keeps the backend it has.
                let frontend = || {
                    self.shared.translations.as_ref().map(|t| {
                        t.frontend(self.client, self.local).unwrap_or_else(|e| {
                            crate::log_limited!(warn, error = %e, "Could not read the socket balancer's translation");
                            None
                        })
                    })
                };
                let dst = (self.local, &policy.ends);
                Balanced::of(snap, &self.shared.backends, self.client.ip(), dst, frontend, same_policy)
            }
            _ => None,
        };
        let fresh = Arc::new(Route { snapshot: policy.snapshot.clone(), balanced });
        self.route.store(fresh.clone());
        fresh
    }

    /// The pool of a balanced request's backend (from the client's address, as every transparent
    /// upstream), or the connection's own.
    fn pool_for(&self, backend: Option<&Arc<Backend>>) -> Arc<Pool> {
        match backend {
            Some(b) => self.shared.pool(self.route.load().snapshot.as_deref(), b.addr, Some(self.client.ip())),
            None => self.pool.clone(),
        }
    }

    /// The connection's policy under the snapshot in force.
    fn policy(&self) -> Arc<ConnPolicy> {
        let current = self.shared.policy.current();
        let p = self.policy.load_full();
        let same = match (&p.snapshot, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return p;
        }
        let fresh = Arc::new(ConnPolicy::decide(
            current,
            self.shared.lookup(),
            &self.listener,
            self.client,
            self.local,
            Proto::Tcp,
        ));
        self.policy.store(fresh.clone());
        fresh
    }

    fn record(&self, seen: &Seen, outcome: Outcome) {
        let (reply, verdict, reason, code, rule, summary) = match outcome {
            Outcome::Allowed(pass) => (false, pass.verdict(), pass.reason(), 0, pass.rule(), pass.summary().to_owned()),
            Outcome::Denied(d) => (false, Verdict::Dropped, Some(d.reason), 0, d.policy.map(Arc::from), d.summary),
            Outcome::Refused(why) => (false, Verdict::Dropped, Some(DropReason::MalformedRequest), 0, None, why),
            Outcome::Answered(status, pass) => {
                (true, pass.verdict(), pass.reason(), status.as_u16(), pass.rule(), pass.summary().to_owned())
            }
            Outcome::Failed(status, why) => (true, Verdict::Error, None, status.as_u16(), None, why),
        };
        self.shared.records.emit(Record {
            time_ns: crate::records::now_ns(),
            reply,
            verdict,
            reason,
            ends: seen.ends.clone(),
            transport: crate::records::Transport::Tcp,
            detail: crate::records::Detail::Http {
                method: seen.method.clone(),
                url: seen.url.clone(),
                protocol: seen.protocol,
                code,
            },
            latency_ns: if reply { u64::try_from(seen.start.elapsed().as_nanos()).unwrap_or(u64::MAX) } else { 0 },
            policy: rule,
            summary,
            service: seen.service.clone(),
        });
    }

    /// Handles one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let _inflight = Inflight::new(&self.state.inflight);
        Counters::inc(&self.shared.counters.requests);
        Ok(self.handle_inner(req).await)
    }

    async fn handle_inner(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let kind = Kind::of(req.method(), req.version(), req.headers(), self.http2);
        let mut pending = PendingUpgrade::of(&mut req, kind);
        // Every request the guard holds bytes back for gets a decision, whatever path it takes; no
        // other request sends one, so a late answer for one request can never settle a pipelined
        // upgrade behind it.
        let decision = UpgradeDecision::for_request(kind, self.guard.as_ref());
        let (mut parts, body) = req.into_parts();
        let policy = self.policy();
        let mut seen = Seen {
            start: Instant::now(),
            method: parts.method.clone(),
            url: Arc::from(""),
            protocol: kind.protocol,
            policy: policy.clone(),
            service: None,
            ends: policy.ends.clone(),
        };

        // 1. The head.
        let target = match head::target(&parts, kind) {
            Ok(t) => t,
            Err(refused) => {
                seen.url = Arc::from(refused.url);
                return self.refuse(&seen, kind, &refused.why);
            }
        };
        seen.url = Arc::from(target.url());

        // Requests of a balanced connection each pick a backend (tunnels stay with the
        // connection's own destination): its records name the service.
        let route = self.route(&seen.policy);
        seen.service = route.balanced.as_ref().map(|b| b.service.clone());

        // 2. Judge, on the headers as they would be forwarded (header rules may rewrite them).
        strip_hop_by_hop(&mut parts.headers, Hop::Request { tunnel: kind.tunnel });
        parts.headers.remove("http2-settings");
        let info = HttpRequestInfo {
            method: parts.method.as_str().as_bytes(),
            path: target.path_and_query.as_bytes(),
            authority: target.authority.as_deref().map(str::as_bytes),
        };
        let pass = match seen.policy.check_http(&info, &mut PolicyHeaders(&mut parts.headers)) {
            RequestVerdict::Deny(denial) => {
                Counters::inc(&self.shared.counters.denied);
                self.record(&seen, Outcome::Denied(denial));
                drop(decision);
                return self.deny(body, kind).await;
            }
            RequestVerdict::Pass(pass) => pass,
        };
        // 3. Forward (a balanced request to the backend it picks: its records name that one),
        // or tunnel.
        let backend = match &route.balanced {
            Some(b) if !kind.tunnel => b.pick(&[]),
            _ => None,
        };
        seen.aim(route.balanced.as_ref(), backend.as_ref());
        Counters::inc(&self.shared.counters.forwarded);
        self.record(&seen, Outcome::Allowed(pass.clone()));
        let h2 = match self.listener.upstream_protocol {
            UpstreamProtocol::Auto => self.http2,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
        };
        let fallback = backend.as_ref().map_or_else(|| self.pool.addr(), |b| b.addr).to_string();
        let req = match upstream_request(parts, body, kind, &target, h2, &fallback) {
            Ok(r) => r,
            Err(why) => return self.refuse(&seen, kind, &why),
        };
        if kind.tunnel
            && let Some(client_side) = pending.take()
        {
            return self.tunnel(req, client_side, decision, kind, &seen, pass).await;
        }
        drop(decision);
        self.forward(req, h2, kind, &mut seen, pass, route.balanced.as_ref(), backend).await
    }

    /// Phase 3: the request to the upstream pool, its response back. A balanced request goes to
    /// `backend`, and once more to another backend when none of it could be sent, or when the
    /// upstream broke off before answering a request that may be sent again (idempotent, no body).
    #[expect(clippy::too_many_arguments, reason = "the request's phase-3 inputs, each used once")]
    async fn forward(
        &self,
        req: Request<Incoming>,
        h2: bool,
        kind: Kind,
        seen: &mut Seen,
        pass: Pass,
        balanced: Option<&Balanced>,
        mut backend: Option<Arc<Backend>>,
    ) -> Response<ProxyBody> {
        let timeout = self.shared.limits.request_timeout();
        let (mut req, replay) = upstream::outgoing(req, balanced.is_some());
        let mut tried = Vec::new();
        if let Some(b) = balanced {
            Counters::inc(&b.stats.requests);
        }
        loop {
            let pool = self.pool_for(backend.as_ref());
            let flight = backend.as_ref().map(Backend::start);
            let sent = if h2 {
                tokio::time::timeout(timeout, pool.send_http2(req)).await
            } else {
                tokio::time::timeout(timeout, pool.send_http1(req)).await
            };
            match sent {
                Ok(Ok(mut resp)) => {
                    if let Some(f) = flight {
                        f.finish(if resp.status().is_server_error() { Ended::Failed } else { Ended::Ok });
                    }
                    strip_hop_by_hop(resp.headers_mut(), Hop::Response);
                    self.record(seen, Outcome::Answered(resp.status(), pass));
                    *resp.version_mut() = http::Version::default();
                    return resp.map(ProxyBody::Upstream);
                }
                Ok(Err(SendError { error, unsent })) => {
                    if let Some(f) = flight {
                        // Out of local ports for the client's address is not the backend's fault.
                        let connect = error.is_connect() && !error.is_address_exhausted();
                        tried.push(f.addr());
                        f.finish(if connect { Ended::ConnectFailed } else { Ended::Failed });
                    }
                    // Once more, to another backend: what was not sent, or what may be sent again
                    // after the upstream broke off (never what the client itself broke off).
                    let again = unsent.or_else(|| {
                        replay.as_ref().filter(|_| error.blame() == Blame::Upstream).map(upstream::Replay::request)
                    });
                    if let (Some(b), Some(r), 1) = (balanced, again, tried.len())
                        && let Some(next) = b.pick(&tried)
                    {
                        Counters::inc(&self.shared.counters.retries);
                        Counters::inc(&b.stats.retries);
                        req = r;
                        seen.aim(balanced, Some(&next));
                        backend = Some(next);
                        continue;
                    }
                    if let Some(b) = balanced {
                        Counters::inc(&b.stats.failed);
                    }
                    return self.upstream_failed(seen, kind, &error);
                }
                Err(_) => {
                    if let Some(f) = flight {
                        f.finish(Ended::Failed);
                    }
                    if let Some(b) = balanced {
                        Counters::inc(&b.stats.failed);
                    }
                    return self.upstream_timed_out(seen, kind);
                }
            }
        }
    }

    fn upstream_timed_out(&self, seen: &Seen, kind: Kind) -> Response<ProxyBody> {
        Counters::inc(&self.shared.counters.upstream_errors);
        let timeout = self.shared.limits.request_timeout();
        self.record(
            seen,
            Outcome::Failed(StatusCode::GATEWAY_TIMEOUT, format!("upstream did not answer within {timeout:?}")),
        );
        if kind.grpc {
            reply::grpc(GrpcCode::DeadlineExceeded, "upstream%20timeout")
        } else {
            reply::text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\r\n", Connection::KeepAlive)
        }
    }

    fn upstream_failed(&self, seen: &Seen, kind: Kind, e: &UpstreamError) -> Response<ProxyBody> {
        // The request body broke HTTP/1 framing while it was being forwarded: that is the client's
        // fault, and the answer is the guard's refusal, not an upstream error.
        if let Some(v) = self.guard.as_ref().and_then(|g| g.answer_violation()) {
            Counters::inc(&self.shared.counters.rejected);
            self.record(seen, Outcome::Refused(v.reason.clone()));
            let status = StatusCode::from_u16(v.status).unwrap_or(StatusCode::BAD_REQUEST);
            return reply::text(status, &format!("Bad Request: {}\r\n", v.reason), Connection::Close);
        }
        let status = match (e.blame(), e) {
            // The client broke off its own request: nobody is left to read the answer.
            (Blame::Downstream, _) => {
                Counters::inc(&self.shared.counters.downstream_errors);
                StatusCode::BAD_REQUEST
            }
            (
                Blame::Upstream,
                UpstreamError::Connect { .. } | UpstreamError::Tunnel { .. } | UpstreamError::Unauthenticated { .. },
            ) => {
                Counters::inc(&self.shared.counters.upstream_errors);
                if e.is_address_exhausted() {
                    Counters::inc(&self.shared.counters.upstream_address_exhausted);
                }
                StatusCode::SERVICE_UNAVAILABLE
            }
            (Blame::Upstream, UpstreamError::Protocol(_)) => {
                Counters::inc(&self.shared.counters.upstream_errors);
                StatusCode::BAD_GATEWAY
            }
        };
        crate::log_limited!(info, error = %e, url = %seen.url, "Upstream request failed");
        self.record(seen, Outcome::Failed(status, e.to_string()));
        if kind.grpc {
            reply::grpc(GrpcCode::Unavailable, "upstream%20unavailable")
        } else {
            reply::text(status, &format!("{e}\r\n"), Connection::KeepAlive)
        }
    }

    /// A request refused before policy: malformed or ambiguous. Fails closed.
    fn refuse(&self, seen: &Seen, kind: Kind, why: &str) -> Response<ProxyBody> {
        Counters::inc(&self.shared.counters.rejected);
        crate::log_limited!(info, url = %seen.url, why, "Request refused");
        self.record(seen, Outcome::Refused(why.to_owned()));
        if kind.grpc {
            return reply::grpc(GrpcCode::Internal, "malformed%20request");
        }
        // The connection may hold bytes of an unread body: close it rather than guess.
        let connection = if self.http2 { Connection::KeepAlive } else { Connection::Close };
        reply::text(StatusCode::BAD_REQUEST, &format!("Bad Request: {why}\r\n"), connection)
    }

    /// The denial. An HTTP/1 request body is read and dropped (up to a limit) first, so the
    /// connection stays usable; with `Expect: 100-continue` nothing is read (the client is told
    /// no before it sends) and the connection is closed.
    async fn deny(&self, mut body: Incoming, kind: Kind) -> Response<ProxyBody> {
        let mut connection = Connection::KeepAlive;
        if !self.http2 && !body.is_end_stream() {
            if kind.expect_continue {
                connection = Connection::Close;
            } else {
                let limit = self.shared.limits.max_denied_body_drain;
                let drain = async {
                    let mut seen = 0usize;
                    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                        match frame {
                            Ok(f) => seen += f.data_ref().map_or(0, Bytes::len),
                            Err(_) => return false,
                        }
                        if seen > limit {
                            return false;
                        }
                    }
                    true
                };
                if !tokio::time::timeout(self.shared.limits.header_read_timeout(), drain).await.unwrap_or(false) {
                    connection = Connection::Close;
                }
            }
        }
        if kind.grpc && self.http2 {
            return reply::grpc(GrpcCode::PermissionDenied, GRPC_ACCESS_DENIED);
        }
        reply::text(StatusCode::FORBIDDEN, ACCESS_DENIED, connection)
    }

    /// An allowed Upgrade / CONNECT: the request goes upstream on a connection of its own; if the
    /// upstream switches protocols (101, or 2xx to CONNECT) both sides are spliced.
    async fn tunnel(
        &self,
        req: Request<Incoming>,
        client_side: hyper::upgrade::OnUpgrade,
        decision: UpgradeDecision,
        kind: Kind,
        seen: &Seen,
        pass: Pass,
    ) -> Response<ProxyBody> {
        // A tunnel's failures are answered in plain HTTP.
        let kind = Kind { grpc: false, ..kind };
        let sent = tokio::time::timeout(self.shared.limits.request_timeout(), self.pool.send_upgrade(req)).await;
        let mut resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return self.upstream_failed(seen, kind, &e),
            Err(_) => return self.upstream_timed_out(seen, kind),
        };
        let switched =
            if kind.connect { resp.status().is_success() } else { resp.status() == StatusCode::SWITCHING_PROTOCOLS };
        self.record(seen, Outcome::Answered(resp.status(), pass));
        if !switched {
            drop(decision);
            strip_hop_by_hop(resp.headers_mut(), Hop::Response);
            return resp.map(|b| ProxyBody::Upstream(UpstreamBody::detached(b)));
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        decision.accept();
        splice(client_side, upstream_side);
        resp.map(|_| ProxyBody::Local(None))
    }
}
