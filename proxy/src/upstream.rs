//! Connections to upstreams: pooled HTTP/1.1 keep-alive connections and one multiplexed h2c
//! connection per pool, plus connections of their own for upgrades and CONNECT tunnels.
//!
//! A pool is one (destination, source address) pair: transparent upstreams leave from the client's
//! own address, so connections are never shared between clients. Pools are sized to demand: a
//! request takes an idle connection or opens one, up to `upstream_max_connections` in flight per
//! pool; over that it waits for a connection to come free (bounded by the request timeout) instead
//! of opening more — one busy client can never exhaust the ports of its address or the proxy's
//! file descriptors. Idle connections are kept `upstream_idle_timeout` and then closed; pools that
//! nobody uses are dropped by [`Upstreams::sweep`].
//!
//! Pooled connections close abortively (`SO_LINGER` 0): the proxy only closes one when it is idle
//! or abandoned, and a reset leaves no TIME_WAIT behind to hold the client's address and port.
//! Tunnels close gracefully (their data must arrive).
//!
//! A pool reaches its upstream [`Via`] a TCP connection of its own, or — when the upstream is
//! another node's endpoint that wants its clients authenticated — streams of the mTLS tunnel to
//! that node's proxy (one per pooled connection); when it wants that and the client cannot be
//! authenticated, via nothing (fail closed).
//!
//! An HTTP/1.1 connection goes back to its pool only when the response body has been read to the
//! end; a body dropped early takes its connection with it. A request that fails on a reused
//! connection before any of it was written (the upstream closed the idle connection meanwhile) is
//! retried once on a new connection.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::either::Either as Stream2;

use crate::config::Limits;
use crate::tunnel::target::Target;
use crate::tunnel::{Hop, Tunnel};

/// A connection to an upstream: TCP, or a stream of the mTLS tunnel.
pub type Stream = Stream2<TcpStream, crate::tunnel::stream::TunnelStream>;

/// How connections reach an upstream.
#[derive(Clone, Debug)]
pub enum Via {
    /// A TCP connection of its own (from the client's address, for transparent upstreams).
    Direct,
    /// A stream of the mTLS tunnel to the upstream's node, whose proxy delivers it: the upstream
    /// wants its clients authenticated.
    Tunnel(Arc<Tunnel>, Hop),
    /// The upstream wants its clients authenticated and this client cannot be: no connection
    /// (fail closed), and why.
    Nowhere(Arc<str>),
}

impl Via {
    /// How a connection from `bind` (the client's address; none: the proxy's own) to `addr` goes
    /// under `snap`.
    pub fn of(
        snap: Option<&policy_engine::snapshot::Snapshot>,
        tunnel: Option<&Arc<Tunnel>>,
        addr: SocketAddr,
        bind: Option<IpAddr>,
    ) -> Self {
        let (Some(snap), Some(client)) = (snap, bind) else { return Self::Direct };
        let Some(tunnel) = tunnel else {
            return match snap.tunnel_target(addr.ip()) {
                Some(_) => Self::Nowhere(
                    format!("{} wants its clients authenticated and this proxy has no tunnel", addr.ip()).into(),
                ),
                None => Self::Direct,
            };
        };
        match Hop::of(snap, client, addr.ip(), tunnel.config.port) {
            Ok(None) => Self::Direct,
            Ok(Some(hop)) => Self::Tunnel(tunnel.clone(), hop),
            Err(why) => Self::Nowhere(why.into()),
        }
    }

    /// The pool key's part: connections of different ways are never shared.
    fn key(&self) -> Option<Option<Hop>> {
        match self {
            Self::Direct => Some(None),
            Self::Tunnel(_, hop) => Some(Some(hop.clone())),
            Self::Nowhere(_) => None,
        }
    }

    /// Connects to `addr` from `bind` (the client's address, `IP_TRANSPARENT` and marked as the
    /// proxy's), within `timeout`. `pooled`: a TCP connection that closes abortively.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        bind: Option<IpAddr>,
        pooled: bool,
        timeout: Duration,
    ) -> Result<Stream, UpstreamError> {
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out after {timeout:?}"));
        match self {
            Self::Direct => {
                let err = |error| UpstreamError::Connect { addr, error };
                let s = tokio::time::timeout(timeout, tcp(addr, bind, pooled))
                    .await
                    .map_err(|_| err(timed_out()))?
                    .map_err(err)?;
                // Latency over batching: requests and responses are small and interactive. A
                // socket that refuses the option still works.
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
                Ok(Stream2::Left(s))
            }
            Self::Tunnel(tunnel, hop) => {
                let err = |why: String| UpstreamError::Tunnel { addr, node: hop.node.clone(), why };
                // Pooled connections share the client's address: the port names none of them.
                let client = SocketAddr::new(bind.ok_or_else(|| err("no client address".into()))?, 0);
                let up = tokio::time::timeout(timeout, tunnel.open(hop, Target { destination: addr, client }))
                    .await
                    .map_err(|_| err(timed_out().to_string()))?
                    .map_err(|e| err(e.to_string()))?;
                Ok(Stream2::Right(up))
            }
            Self::Nowhere(why) => Err(UpstreamError::Unauthenticated { addr, why: why.clone() }),
        }
    }
}

async fn tcp(addr: SocketAddr, bind: Option<IpAddr>, pooled: bool) -> std::io::Result<TcpStream> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if pooled {
        crate::transparent::close_with_reset(&s)?;
    }
    if let Some(src) = bind {
        crate::transparent::upstream_socket(&s)?;
        s.bind(SocketAddr::new(src, 0))?;
    }
    s.connect(addr).await
}

/// A request body as it goes upstream: the client's stream, or none at all (a request without a
/// body, sent as [`Empty`] so that it can be sent again).
pub type RequestBody = Either<Incoming, Empty<Bytes>>;

/// The head of a request that may be sent again after its upstream broke off before answering:
/// an idempotent method (RFC 9110 §9.2.2) and no body.
#[derive(Clone, Debug)]
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    /// Whether a request with this method and body may be sent again.
    pub fn allowed(method: &Method, bodiless: bool) -> bool {
        bodiless && method.is_idempotent()
    }

    /// The request once more.
    pub fn request(&self) -> Request<RequestBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// The request as it goes upstream, and — when it has somewhere else to go (`replayable`) and
/// [`Replay::allowed`] — what sending it again takes (the head is copied only then).
pub fn outgoing(req: Request<Incoming>, replayable: bool) -> (Request<RequestBody>, Option<Replay>) {
    let (parts, body) = req.into_parts();
    if replayable && Replay::allowed(&parts.method, body.is_end_stream()) {
        let replay = Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        };
        (Request::from_parts(parts, Either::Right(Empty::new())), Some(replay))
    } else {
        (Request::from_parts(parts, Either::Left(body)), None)
    }
}

/// A request that failed, given back when none of it was sent (it may go to another upstream).
#[derive(Debug)]
pub struct SendError {
    /// What happened.
    pub error: UpstreamError,
    /// The request, untouched, when nothing of it reached the upstream.
    pub unsent: Option<Request<RequestBody>>,
}

impl SendError {
    fn unsent(error: UpstreamError, req: Request<RequestBody>) -> Self {
        Self { error, unsent: Some(req) }
    }

    fn sent(error: UpstreamError) -> Self {
        Self { error, unsent: None }
    }
}

/// Who is at fault for a failure (pingora's `ErrorSource`): it decides the status code, the
/// counter, and what the flow record blames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The client (its request body broke off or broke framing).
    Downstream,
    /// The upstream (refused, unreachable, reset, bad HTTP, too slow).
    Upstream,
}

/// Why an upstream request failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// Could not connect (refused, unreachable, timed out).
    Connect {
        /// Where to.
        addr: SocketAddr,
        /// What happened.
        error: std::io::Error,
    },
    /// The connection broke or the upstream spoke bad HTTP.
    Protocol(hyper::Error),
    /// The tunnel to the upstream's node did not carry the connection (no credentials, the node
    /// unreachable, its proxy refused the stream).
    Tunnel {
        /// Where to.
        addr: SocketAddr,
        /// Through which node.
        node: String,
        /// What happened.
        why: String,
    },
    /// The upstream wants its clients authenticated and this one cannot be.
    Unauthenticated {
        /// Where to.
        addr: SocketAddr,
        /// Why not.
        why: Arc<str>,
    },
}

impl UpstreamError {
    /// Whose fault it is: a request body that ended in an error is the client's.
    pub fn blame(&self) -> Blame {
        match self {
            Self::Protocol(e) if e.is_user() || e.is_body_write_aborted() => Blame::Downstream,
            _ => Blame::Upstream,
        }
    }

    /// No connection was made (nothing of the request was sent).
    pub fn is_connect(&self) -> bool {
        !matches!(self, Self::Protocol(_))
    }

    /// The source address had no free port towards the destination (`EADDRNOTAVAIL`).
    pub fn is_address_exhausted(&self) -> bool {
        matches!(self, Self::Connect { error, .. } if error.kind() == std::io::ErrorKind::AddrNotAvailable)
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { addr, error } => write!(f, "upstream connect error: {addr}: {error}"),
            Self::Protocol(e) if self.blame() == Blame::Downstream => write!(f, "client request body failed: {e}"),
            Self::Protocol(e) => write!(f, "upstream error: {e}"),
            Self::Tunnel { addr, node, why } => {
                write!(f, "upstream connect error: {addr} through node {node}'s tunnel: {why}")
            }
            Self::Unauthenticated { addr, why } => write!(f, "upstream connect error: {addr}: {why}"),
        }
    }
}

/// Upstream address, the source address for transparent upstreams, the tunnel hop.
type PoolKey = (SocketAddr, Option<IpAddr>, Option<Hop>);

/// Pools by upstream address and source address.
#[derive(Default)]
pub struct Upstreams {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Pools hold plain collections; a panic elsewhere cannot leave them half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Upstreams {
    /// The pool of `addr` reached `via`; with `bind`, connections leave from that (client's)
    /// address, marked as the proxy's (`IP_TRANSPARENT`, `SO_MARK` = `mark::FROM_PROXY`).
    pub fn pool(&self, addr: SocketAddr, bind: Option<IpAddr>, via: Via, limits: &Limits) -> Arc<Pool> {
        let new = |via| {
            Arc::new(Pool {
                addr,
                bind,
                via,
                idle: Mutex::new(Vec::new()),
                slots: Arc::new(Semaphore::new(limits.upstream_max_connections)),
                max: limits.upstream_max_connections,
                h2: tokio::sync::Mutex::new(None),
                connect_timeout: limits.connect_timeout(),
                idle_timeout: limits.upstream_idle_timeout(),
            })
        };
        // A pool that never connects holds nothing worth sharing.
        let Some(hop) = via.key() else { return new(via) };
        lock(&self.pools).entry((addr, bind, hop)).or_insert_with(|| new(via)).clone()
    }

    /// Closes idle connections past their time and drops pools nobody holds that have nothing open;
    /// returns (pools, idle connections) left.
    pub fn sweep(&self) -> (usize, usize) {
        let mut pools = lock(&self.pools);
        let now = Instant::now();
        pools.retain(|_, p| {
            p.evict_idle(now);
            // Only the map holds it, no request is in flight, nothing idle, no h2 connection.
            let h2_open = p.h2.try_lock().map_or(true, |h| h.as_ref().is_some_and(|s| !s.is_closed()));
            Arc::strong_count(p) > 1 || p.slots.available_permits() < p.max || !lock(&p.idle).is_empty() || h2_open
        });
        let idle = pools.values().map(|p| lock(&p.idle).len()).sum();
        (pools.len(), idle)
    }
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// Connections to one upstream address (from one source address, for transparent upstreams).
pub struct Pool {
    addr: SocketAddr,
    bind: Option<IpAddr>,
    via: Via,
    idle: Mutex<Vec<Idle>>,
    /// One permit per HTTP/1 request in flight: at most `max` connections are ever busy, so at
    /// most `max` are open.
    slots: Arc<Semaphore>,
    max: usize,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl Pool {
    /// Where this pool connects to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connect(&self, pooled: bool) -> Result<TokioIo<Stream>, UpstreamError> {
        self.via.connect(self.addr, self.bind, pooled, self.connect_timeout).await.map(TokioIo::new)
    }

    async fn new_h1(&self) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect(true).await?;
        let (sender, conn) = http1::handshake(io).await.map_err(UpstreamError::Protocol)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn checkout(&self) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            // The most recently used connection first: the others age out.
            let mut s = lock(&self.idle).pop()?.sender;
            if s.is_closed() {
                continue;
            }
            if s.is_ready() {
                return Some(s);
            }
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), s.ready()).await {
                return Some(s);
            }
        }
    }

    fn checkin(&self, s: http1::SendRequest<RequestBody>) {
        if !s.is_closed() {
            lock(&self.idle).push(Idle { sender: s, since: Instant::now() });
        }
    }

    /// Closes idle connections unused for longer than the idle timeout.
    fn evict_idle(&self, now: Instant) {
        // Oldest first (check-in order): dropping a sender ends its connection.
        let mut idle = lock(&self.idle);
        let stale = idle.iter().take_while(|i| now.duration_since(i.since) > self.idle_timeout).count();
        idle.drain(..stale);
        idle.retain(|i| !i.sender.is_closed());
    }

    /// Sends an HTTP/1.1 request (origin-form URI, `Host` set) on a pooled connection, waiting for
    /// one to come free when the pool is at its cap.
    pub async fn send_http1(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        // The semaphore is never closed: an error here cannot happen, but fail the request rather
        // than open an unbounded connection.
        let Ok(permit) = self.slots.clone().acquire_owned().await else {
            let error = std::io::Error::other("upstream pool closed");
            return Err(SendError::unsent(UpstreamError::Connect { addr: self.addr, error }, req));
        };
        loop {
            let (mut sender, reused) = match self.checkout().await {
                Some(s) => (s, true),
                None => match self.new_h1().await {
                    Ok(s) => (s, false),
                    Err(e) => return Err(SendError::unsent(e, req)),
                },
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let ret = Some(Return { pool: self.clone(), sender, _permit: permit });
                    return Ok(resp.map(|inner| UpstreamBody { inner, ret }));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    Some(r) => return Err(SendError::unsent(UpstreamError::Protocol(e.into_error()), r)),
                    None => return Err(SendError::sent(UpstreamError::Protocol(e.into_error()))),
                },
            }
        }
    }

    /// Sends an h2c request (absolute URI) on the pool's shared connection.
    pub async fn send_http2(&self, req: Request<RequestBody>) -> Result<Response<UpstreamBody>, SendError> {
        let mut sender = {
            let mut slot = self.h2.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let io = match self.connect(true).await {
                        Ok(io) => io,
                        Err(e) => return Err(SendError::unsent(e, req)),
                    };
                    let mut b = http2::Builder::new(TokioExecutor::new());
                    b.timer(TokioTimer::new())
                        .initial_stream_window_size(1 << 20)
                        .initial_connection_window_size(4 << 20)
                        .keep_alive_interval(Duration::from_secs(30))
                        .keep_alive_timeout(Duration::from_secs(20));
                    let (sender, conn) = match b.handshake(io).await {
                        Ok(x) => x,
                        Err(e) => return Err(SendError::unsent(UpstreamError::Protocol(e), req)),
                    };
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "upstream h2 connection ended");
                        }
                    });
                    *slot = Some(sender.clone());
                    sender
                }
            }
        };
        if let Err(e) = sender.ready().await {
            return Err(SendError::unsent(UpstreamError::Protocol(e), req));
        }
        let resp = sender.send_request(req).await.map_err(|e| SendError::sent(UpstreamError::Protocol(e)))?;
        Ok(resp.map(|inner| UpstreamBody { inner, ret: None }))
    }

    /// Sends an upgrade or CONNECT request on a connection of its own (it becomes the tunnel).
    pub async fn send_upgrade(&self, req: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        let io = self.connect(false).await?;
        let (mut sender, conn) = http1::handshake(io).await.map_err(UpstreamError::Protocol)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        sender.send_request(req).await.map_err(UpstreamError::Protocol)
    }
}

/// What a finished HTTP/1 response gives back: its connection to the pool, its slot.
struct Return {
    pool: Arc<Pool>,
    sender: http1::SendRequest<RequestBody>,
    _permit: OwnedSemaphorePermit,
}

/// A response body from upstream; at its end the HTTP/1.1 connection returns to the pool.
pub struct UpstreamBody {
    inner: Incoming,
    ret: Option<Return>,
}

impl UpstreamBody {
    /// A body whose connection is not pooled.
    pub fn detached(inner: Incoming) -> Self {
        Self { inner, ret: None }
    }

    fn finished(&mut self) {
        if let Some(r) = self.ret.take() {
            r.pool.checkin(r.sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let out = Pin::new(&mut this.inner).poll_frame(cx);
        match &out {
            Poll::Ready(None) => this.finished(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finished(),
            Poll::Ready(Some(Err(_))) => this.ret = None,
            _ => {}
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An empty body (204, 304, HEAD, Content-Length: 0) is never polled: it is complete as is.
        if self.inner.is_end_stream() {
            self.finished();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_requests_without_a_body_are_sent_again() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE, Method::TRACE] {
            assert!(Replay::allowed(&m, true), "{m}");
            assert!(!Replay::allowed(&m, false), "{m} with a body");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT, Method::from_bytes(b"PURGE").unwrap()] {
            assert!(!Replay::allowed(&m, true), "{m}");
        }
    }

    #[test]
    fn a_replay_is_the_same_head_without_a_body() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "deathstar".parse().unwrap());
        headers.append("x-trace", "a".parse().unwrap());
        headers.append("x-trace", "b".parse().unwrap());
        let replay = Replay {
            method: Method::DELETE,
            uri: "/v1/ships/7?force=1".parse().unwrap(),
            version: Version::HTTP_11,
            headers: headers.clone(),
        };
        for _ in 0..2 {
            let req = replay.request();
            assert_eq!(req.method(), Method::DELETE);
            assert_eq!(req.uri(), "/v1/ships/7?force=1");
            assert_eq!(req.version(), Version::HTTP_11);
            assert_eq!(req.headers(), &headers);
            assert!(req.body().is_end_stream());
        }
    }
}
