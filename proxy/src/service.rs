//! The per-request work: normalise, judge, answer or forward, record.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use policy_engine::http::HttpRequestInfo;

use crate::admission::{ConnState, ConnTable};
use crate::config::{Limits, ListenerConfig, UpstreamProtocol};
use crate::h1guard::GuardShared;
use crate::normalize::normalize;
use crate::policy::{ConnPolicy, Descriptions, PolicyHeaders, RequestVerdict};
use crate::records::{Counters, Record, Records};
use crate::snapshot::PolicyState;
use crate::upstream::{Blame, Pool, UpstreamBody, UpstreamError, Upstreams};
use porin_flow::flow::{DropReason, HttpProtocol, Verdict};

/// The body of the denial (Cilium's, byte for byte).
pub const ACCESS_DENIED: &str = "Access denied\r\n";
/// `grpc-message` of a gRPC denial: the same text, percent-encoded as gRPC requires.
pub const GRPC_ACCESS_DENIED: &str = "Access%20denied%0D%0A";

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
    pub records: Records,
    /// Counters.
    pub counters: Counters,
    /// Limits.
    pub limits: Limits,
}

/// A response body: from upstream, or made here.
pub enum ProxyBody {
    /// Streamed from the upstream.
    Upstream(UpstreamBody),
    /// Local (denials, errors); `None` is empty.
    Local(Option<Bytes>),
}

impl ProxyBody {
    fn text(s: &str) -> Self {
        Self::Local(Some(Bytes::copy_from_slice(s.as_bytes())))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Upstream(b) => Pin::new(b).poll_frame(cx),
            Self::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(b) => b.is_end_stream(),
            Self::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(b) => b.size_hint(),
            Self::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Tells the HTTP/1 guard what became of an upgrade / CONNECT request: refused unless
/// [`UpgradeDecision::accept`] was called, also when the request ends early.
struct UpgradeDecision(Option<Arc<GuardShared>>);

impl UpgradeDecision {
    fn accept(mut self) {
        if let Some(g) = self.0.take() {
            g.decide_upgrade(true);
        }
    }
}

impl Drop for UpgradeDecision {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.decide_upgrade(false);
        }
    }
}

/// hyper's handle on the connection of a request that carries `Upgrade` (or is a CONNECT). When
/// the request is not tunnelled and the connection ends right after it, hyper hands the connection
/// over through this handle instead of shutting it down; shutting it down here lets the framing
/// guard send its pending refusal. Dropping the holder without [`PendingUpgrade::take`] arranges that.
struct PendingUpgrade(Option<hyper::upgrade::OnUpgrade>);

impl PendingUpgrade {
    fn take(&mut self) -> Option<hyper::upgrade::OnUpgrade> {
        self.0.take()
    }
}

impl Drop for PendingUpgrade {
    fn drop(&mut self) {
        if let Some(on) = self.0.take() {
            tokio::spawn(async move {
                if let Ok(upgraded) = on.await {
                    use tokio::io::AsyncWriteExt as _;
                    let _ = TokioIo::new(upgraded).shutdown().await;
                }
            });
        }
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
    policy: Mutex<Arc<ConnPolicy>>,
    pool: Arc<Pool>,
    /// The connection's entry in the connection table: requests in progress (idle connections
    /// are the ones shed under pressure).
    state: Arc<ConnState>,
}

struct Inflight<'a>(&'a AtomicUsize);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and are never forwarded, plus `Expect`
/// (this proxy answers `100 Continue` itself, when the request is allowed and its body is read).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "trailer", "expect"];

/// Removes hop-by-hop headers, and those the `Connection` header names. `keep_upgrade` keeps
/// `Connection: upgrade` + `Upgrade` for a tunnel request; `keep_te_trailers` keeps `TE: trailers`
/// (gRPC needs it end to end).
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool, keep_te_trailers: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    let te_trailers = keep_te_trailers
        && h.get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers")));
    let upgrade = keep_upgrade.then(|| h.get(header::UPGRADE).cloned()).flatten();
    for n in named {
        h.remove(n);
    }
    // Most messages carry none of them: look once, remove only what is there.
    let present: Vec<HeaderName> = h.keys().filter(|k| HOP_BY_HOP.contains(&k.as_str())).cloned().collect();
    for n in present {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(u) = upgrade {
        h.insert(header::UPGRADE, u);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn local(status: StatusCode, body: &str, close: bool) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::text(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// A gRPC trailers-only reply (`:status 200` + `grpc-status` in one HEADERS frame).
fn grpc_local(code: u8, message: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Local(None));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    h.insert("grpc-message", HeaderValue::from_static(message));
    r
}

/// What the request looked like, for its records.
struct Seen {
    start: Instant,
    method: Method,
    url: Arc<str>,
    protocol: HttpProtocol,
    policy: Arc<ConnPolicy>,
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
        let http2 = state.h2.load(Ordering::Relaxed);
        let policy =
            Arc::new(ConnPolicy::decide(shared.policy.current(), &shared.descriptions, &listener, client, local));
        // Transparent: to the original destination, from the client's own address.
        let (dst, bind) = match listener.upstream {
            Some(up) => (up, None),
            None => (local, Some(client.ip())),
        };
        let pool = shared.upstreams.pool(dst, bind, &shared.limits);
        Self { shared, listener, client, local, http2, guard, policy: Mutex::new(policy), pool, state }
    }

    /// The connection's policy under the snapshot in force (taken again after a swap).
    fn policy(&self) -> Arc<ConnPolicy> {
        let current = self.shared.policy.current();
        let Ok(mut p) = self.policy.lock() else {
            return Arc::new(ConnPolicy::decide(
                current,
                &self.shared.descriptions,
                &self.listener,
                self.client,
                self.local,
            ));
        };
        let same = match (&p.snapshot, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            *p = Arc::new(ConnPolicy::decide(
                current,
                &self.shared.descriptions,
                &self.listener,
                self.client,
                self.local,
            ));
        }
        p.clone()
    }

    fn record(
        &self,
        seen: &Seen,
        response: Option<StatusCode>,
        verdict: Verdict,
        reason: Option<DropReason>,
        summary: String,
        rule: Option<Arc<str>>,
    ) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.shared.records.emit(
            Record {
                time_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
                reply: response.is_some(),
                verdict,
                reason,
                ends: seen.policy.ends.clone(),
                method: seen.method.clone(),
                url: seen.url.clone(),
                protocol: seen.protocol,
                code: response.map_or(0, |s| s.as_u16()),
                latency_ns: response.map_or(0, |_| u64::try_from(seen.start.elapsed().as_nanos()).unwrap_or(u64::MAX)),
                policy: rule,
                summary,
            },
            &self.shared.counters,
        );
    }

    /// Handles one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        self.state.inflight.fetch_add(1, Ordering::Relaxed);
        let _inflight = Inflight(&self.state.inflight);
        Counters::inc(&self.shared.counters.requests);
        Ok(self.handle_inner(req).await)
    }

    async fn handle_inner(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let mut pending_upgrade = PendingUpgrade(
            (!self.http2 && (req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE)))
                .then(|| hyper::upgrade::on(&mut req)),
        );
        let policy = self.policy();
        let is_connect = req.method() == Method::CONNECT;
        // `Upgrade: h2c` is never honoured: a tunnel to an upstream that speaks HTTP/2 after the
        // upgrade would carry requests this proxy never sees. The request goes on as HTTP/1.1.
        let h2c = req.headers().get_all(header::UPGRADE).iter().any(|v| {
            v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().to_ascii_lowercase().starts_with(b"h2c"))
        });
        let wants_upgrade = !self.http2
            && (is_connect
                || (!h2c
                    && req.headers().contains_key(header::UPGRADE)
                    && req.headers().get_all(header::CONNECTION).iter().any(|v| {
                        v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
                    })));
        // Every request the guard holds bytes back for (the same test as the guard's: CONNECT or an
        // `Upgrade` header) gets a decision, whatever path it takes; no other request sends one, so
        // a late answer for one request can never settle a pipelined upgrade behind it.
        let held = is_connect || req.headers().contains_key(header::UPGRADE);
        let decision = UpgradeDecision(if self.http2 || !held { None } else { self.guard.clone() });
        let protocol = match (self.http2, req.version()) {
            (true, _) => HttpProtocol::Http2,
            (false, Version::HTTP_10) => HttpProtocol::Http10,
            _ => HttpProtocol::Http11,
        };
        let (mut parts, body) = req.into_parts();
        let grpc = is_grpc(&parts.headers);
        let mut seen = Seen { start, method: parts.method.clone(), url: Arc::from(""), protocol, policy };

        // Authority: the URI's (HTTP/2 `:authority`, HTTP/1 absolute-form) wins over `Host`, as
        // RFC 9112 §3.2.2 and RFC 9113 §8.3.1 say; an HTTP/2 request whose `Host` disagrees with
        // its `:authority` is refused (the upstream could believe either).
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let host_hdr = match (hosts.next(), hosts.next()) {
            (None, _) => None,
            (Some(h), None) => match h.to_str() {
                Ok(h) => Some(h.to_owned()),
                Err(_) => return self.reject(&seen, grpc, "Host header is not visible ASCII"),
            },
            _ => return self.reject(&seen, grpc, "more than one Host header"),
        };
        let uri_authority = parts.uri.authority().map(|a| a.as_str().to_owned());
        if self.http2
            && let (Some(a), Some(h)) = (&uri_authority, &host_hdr)
            && !a.eq_ignore_ascii_case(h)
        {
            return self.reject(&seen, grpc, "Host header differs from :authority");
        }
        let authority = uri_authority.or(host_hdr);
        // Checked before judging, so that an allowed request is never refused afterwards for a
        // value that could not be forwarded.
        if let Some(a) = &authority
            && (a.is_empty() || a.contains('@') || a.parse::<http::uri::Authority>().is_err())
        {
            return self.reject(&seen, grpc, "invalid authority");
        }

        // Target: normalised once; judged and forwarded in that one form.
        let target = if is_connect {
            String::new()
        } else {
            let raw = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            match normalize(raw) {
                Ok(t) => t.path_and_query,
                Err(e) => {
                    seen.url = Arc::from(raw);
                    return self.reject(&seen, grpc, &format!("request target refused: {e}"));
                }
            }
        };
        seen.url = Arc::from(format!("http://{}{}", authority.as_deref().unwrap_or(""), target));
        if self.http2 && is_connect {
            return self.reject(&seen, grpc, "CONNECT over HTTP/2 is not supported");
        }

        let expect_continue =
            parts.headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        strip_hop_by_hop(&mut parts.headers, wants_upgrade, true);
        parts.headers.remove("http2-settings");
        let verdict = {
            let info = HttpRequestInfo {
                method: parts.method.as_str().as_bytes(),
                path: target.as_bytes(),
                authority: authority.as_deref().map(str::as_bytes),
            };
            seen.policy.check_http(&info, &mut PolicyHeaders(&mut parts.headers))
        };
        let rule = match verdict {
            RequestVerdict::Deny { reason, summary, policy } => {
                Counters::inc(&self.shared.counters.denied);
                self.record(&seen, None, Verdict::Dropped, Some(reason), summary, policy.map(Arc::from));
                drop(decision);
                return self.deny(body, grpc, expect_continue).await;
            }
            RequestVerdict::Allow(rule) => rule,
        };
        Counters::inc(&self.shared.counters.forwarded);
        self.record(&seen, None, Verdict::Forwarded, None, String::new(), rule.clone());

        let up_h2 = match self.listener.upstream_protocol {
            UpstreamProtocol::Auto => self.http2,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
        };
        let authority = authority.unwrap_or_else(|| self.pool.addr().to_string());
        let uri = if is_connect {
            parts.uri.clone()
        } else if up_h2 {
            parts.headers.remove(header::HOST);
            match Uri::builder().scheme("http").authority(authority.as_str()).path_and_query(target.as_str()).build() {
                Ok(u) => u,
                Err(e) => return self.reject(&seen, grpc, &format!("invalid authority: {e}")),
            }
        } else {
            match HeaderValue::from_str(&authority) {
                Ok(v) => drop(parts.headers.insert(header::HOST, v)),
                Err(e) => return self.reject(&seen, grpc, &format!("invalid authority: {e}")),
            }
            match Uri::try_from(target.as_str()) {
                Ok(u) => u,
                Err(e) => return self.reject(&seen, grpc, &format!("request target refused: {e}")),
            }
        };
        parts.uri = uri;
        parts.version = if up_h2 { Version::HTTP_2 } else { Version::HTTP_11 };
        if !up_h2 {
            parts.headers.remove(header::TE);
        }
        let mut req = Request::from_parts(parts, body);

        if wants_upgrade && let Some(client_side) = pending_upgrade.take() {
            return self.tunnel(req, client_side, decision, &seen, rule).await;
        }
        drop(decision);
        let timeout = self.shared.limits.request_timeout();
        let sent = if up_h2 {
            tokio::time::timeout(timeout, self.pool.send_http2(req)).await
        } else {
            *req.version_mut() = Version::HTTP_11;
            tokio::time::timeout(timeout, self.pool.send_http1(req)).await
        };
        match sent {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut(), false, false);
                self.record(&seen, Some(resp.status()), Verdict::Forwarded, None, String::new(), rule);
                *resp.version_mut() = Version::default();
                resp.map(ProxyBody::Upstream)
            }
            Ok(Err(e)) => self.upstream_failed(&seen, grpc, &e),
            Err(_) => {
                Counters::inc(&self.shared.counters.upstream_errors);
                let summary = format!("upstream did not answer within {timeout:?}");
                self.record(&seen, Some(StatusCode::GATEWAY_TIMEOUT), Verdict::Error, None, summary, None);
                if grpc {
                    grpc_local(4, "upstream%20timeout")
                } else {
                    local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\r\n", false)
                }
            }
        }
    }

    fn upstream_failed(&self, seen: &Seen, grpc: bool, e: &UpstreamError) -> Response<ProxyBody> {
        // The request body broke HTTP/1 framing while it was being forwarded: that is the client's
        // fault, and the answer is the guard's refusal, not an upstream error.
        if let Some(v) = self.guard.as_ref().and_then(|g| g.answer_violation()) {
            Counters::inc(&self.shared.counters.rejected);
            self.record(seen, None, Verdict::Dropped, Some(DropReason::MalformedRequest), v.reason.clone(), None);
            let status = StatusCode::from_u16(v.status).unwrap_or(StatusCode::BAD_REQUEST);
            return local(status, &format!("Bad Request: {}\r\n", v.reason), true);
        }
        let status = match (e.blame(), e) {
            // The client broke off its own request: nobody is left to read the answer.
            (Blame::Downstream, _) => {
                Counters::inc(&self.shared.counters.downstream_errors);
                StatusCode::BAD_REQUEST
            }
            (Blame::Upstream, UpstreamError::Connect { .. }) => {
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
        self.record(seen, Some(status), Verdict::Error, None, e.to_string(), None);
        if grpc { grpc_local(14, "upstream%20unavailable") } else { local(status, &format!("{e}\r\n"), false) }
    }

    /// A request refused before policy: malformed or ambiguous. Fails closed.
    fn reject(&self, seen: &Seen, grpc: bool, why: &str) -> Response<ProxyBody> {
        Counters::inc(&self.shared.counters.rejected);
        crate::log_limited!(info, url = %seen.url, why, "Request refused");
        self.record(seen, None, Verdict::Dropped, Some(DropReason::MalformedRequest), why.to_owned(), None);
        if grpc {
            return grpc_local(13, "malformed%20request");
        }
        // The connection may hold bytes of an unread body: close it rather than guess.
        local(StatusCode::BAD_REQUEST, &format!("Bad Request: {why}\r\n"), !self.http2)
    }

    /// The denial. An HTTP/1 request body is read and dropped (up to a limit) first, so the
    /// connection stays usable; with `Expect: 100-continue` nothing is read (the client is told
    /// no before it sends) and the connection is closed.
    async fn deny(&self, mut body: Incoming, grpc: bool, expect_continue: bool) -> Response<ProxyBody> {
        let mut close = false;
        if !self.http2 && !body.is_end_stream() {
            if expect_continue {
                close = true;
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
                close = !tokio::time::timeout(self.shared.limits.header_read_timeout(), drain).await.unwrap_or(false);
            }
        }
        if grpc && self.http2 {
            return grpc_local(7, GRPC_ACCESS_DENIED);
        }
        local(StatusCode::FORBIDDEN, ACCESS_DENIED, close)
    }

    /// An allowed Upgrade / CONNECT: the request goes upstream on a connection of its own; if the
    /// upstream switches protocols (101, or 2xx to CONNECT) both sides are spliced.
    async fn tunnel(
        &self,
        req: Request<Incoming>,
        client_side: hyper::upgrade::OnUpgrade,
        decision: UpgradeDecision,
        seen: &Seen,
        rule: Option<Arc<str>>,
    ) -> Response<ProxyBody> {
        let is_connect = req.method() == Method::CONNECT;
        let sent = tokio::time::timeout(self.shared.limits.request_timeout(), self.pool.send_upgrade(req)).await;
        let mut resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return self.upstream_failed(seen, false, &e),
            Err(_) => {
                Counters::inc(&self.shared.counters.upstream_errors);
                return local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\r\n", false);
            }
        };
        let switched =
            if is_connect { resp.status().is_success() } else { resp.status() == StatusCode::SWITCHING_PROTOCOLS };
        self.record(seen, Some(resp.status()), Verdict::Forwarded, None, String::new(), rule);
        if !switched {
            drop(decision);
            strip_hop_by_hop(resp.headers_mut(), false, false);
            return resp.map(|b| ProxyBody::Upstream(UpstreamBody::detached(b)));
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        decision.accept();
        tokio::spawn(async move {
            match tokio::try_join!(client_side, upstream_side) {
                Ok((c, u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        tracing::debug!(error = %e, "tunnel ended");
                    }
                }
                Err(e) => crate::log_limited!(info, error = %e, "Upgrade failed"),
            }
        });
        resp.map(|_| ProxyBody::Local(None))
    }
}
