//! Connections to upstreams: pooled HTTP/1.1 keep-alive connections and one multiplexed h2c
//! connection per destination, plus fresh connections for upgrades and CONNECT tunnels.
//!
//! An HTTP/1.1 connection goes back to its pool only when the response body has been read to the
//! end (so it is free for the next request); a body dropped early takes its connection with it.
//! A request that fails on a reused connection before any of it was written (the upstream closed
//! the idle connection meanwhile) is retried once on a new connection.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::Limits;

/// Why an upstream request failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// Could not connect (refused, unreachable, timed out).
    Connect(String),
    /// The connection broke or the upstream spoke bad HTTP.
    Protocol(hyper::Error),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "upstream connect error: {e}"),
            Self::Protocol(e) => write!(f, "upstream error: {e}"),
        }
    }
}

/// Connections to one upstream address (from one source address, for transparent upstreams).
pub struct Pool {
    addr: SocketAddr,
    bind: Option<IpAddr>,
    idle: Mutex<Vec<http1::SendRequest<Incoming>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>,
    max_idle: usize,
    connect_timeout: Duration,
}

/// Upstream address, and the source address for transparent upstreams.
type PoolKey = (SocketAddr, Option<IpAddr>);

/// Pools by upstream address and source address.
#[derive(Default)]
pub struct Upstreams {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Upstreams {
    /// The pool of `addr`; with `bind`, connections leave from that (client's) address, marked as
    /// the proxy's (`IP_TRANSPARENT`, `SO_MARK` = `mark::FROM_PROXY`). Connections are never shared
    /// between source addresses: the upstream sees each client as itself.
    pub fn pool(&self, addr: SocketAddr, bind: Option<IpAddr>, limits: &Limits) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pools
            .entry((addr, bind))
            .or_insert_with(|| {
                Arc::new(Pool {
                    addr,
                    bind,
                    idle: Mutex::new(Vec::new()),
                    h2: tokio::sync::Mutex::new(None),
                    max_idle: limits.max_idle_upstream,
                    connect_timeout: limits.connect_timeout(),
                })
            })
            .clone()
    }
}

impl Pool {
    /// Where this pool connects to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn open(&self) -> std::io::Result<TcpStream> {
        let Some(src) = self.bind else { return TcpStream::connect(self.addr).await };
        let s = if self.addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        crate::transparent::upstream_socket(&s)?;
        s.bind(SocketAddr::new(src, 0))?;
        s.connect(self.addr).await
    }

    async fn connect(&self) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let s = tokio::time::timeout(self.connect_timeout, self.open())
            .await
            .map_err(|_| UpstreamError::Connect(format!("{}: timed out after {:?}", self.addr, self.connect_timeout)))?
            .map_err(|e| UpstreamError::Connect(format!("{}: {e}", self.addr)))?;
        // Latency over batching: requests and responses are small and interactive.
        let _ = s.set_nodelay(true);
        Ok(TokioIo::new(s))
    }

    async fn new_h1(&self) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        let io = self.connect().await?;
        let (sender, conn) = http1::handshake(io).await.map_err(UpstreamError::Protocol)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn checkout(&self) -> Option<http1::SendRequest<Incoming>> {
        loop {
            let mut s = self.idle.lock().ok()?.pop()?;
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

    fn checkin(&self, s: http1::SendRequest<Incoming>) {
        if s.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max_idle
        {
            idle.push(s);
        }
    }

    /// Sends an HTTP/1.1 request (origin-form URI, `Host` set) on a pooled connection.
    pub async fn send_http1(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout().await {
                Some(s) => (s, true),
                None => (self.new_h1().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let ret = Some((self.clone(), sender));
                    return Ok(resp.map(|inner| UpstreamBody { inner, ret }));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(UpstreamError::Protocol(e.into_error())),
                },
            }
        }
    }

    /// Sends an h2c request (absolute URI) on the destination's shared connection.
    pub async fn send_http2(&self, req: Request<Incoming>) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut sender = {
            let mut slot = self.h2.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let io = self.connect().await?;
                    let mut b = http2::Builder::new(TokioExecutor::new());
                    b.timer(TokioTimer::new())
                        .initial_stream_window_size(1 << 20)
                        .initial_connection_window_size(4 << 20)
                        .keep_alive_interval(Duration::from_secs(30))
                        .keep_alive_timeout(Duration::from_secs(20));
                    let (sender, conn) = b.handshake(io).await.map_err(UpstreamError::Protocol)?;
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
        sender.ready().await.map_err(UpstreamError::Protocol)?;
        let resp = sender.send_request(req).await.map_err(UpstreamError::Protocol)?;
        Ok(resp.map(|inner| UpstreamBody { inner, ret: None }))
    }

    /// Sends an upgrade or CONNECT request on a connection of its own (it becomes the tunnel).
    pub async fn send_upgrade(&self, req: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        let io = self.connect().await?;
        let (mut sender, conn) = http1::handshake(io).await.map_err(UpstreamError::Protocol)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        sender.send_request(req).await.map_err(UpstreamError::Protocol)
    }
}

/// A response body from upstream; at its end the HTTP/1.1 connection returns to the pool.
pub struct UpstreamBody {
    inner: Incoming,
    ret: Option<(Arc<Pool>, http1::SendRequest<Incoming>)>,
}

impl UpstreamBody {
    /// A body whose connection is not pooled.
    pub fn detached(inner: Incoming) -> Self {
        Self { inner, ret: None }
    }

    fn finished(&mut self) {
        if let Some((pool, sender)) = self.ret.take() {
            pool.checkin(sender);
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
