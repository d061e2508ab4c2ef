//! Listeners and connections: accept, tell HTTP/2 from HTTP/1, serve with hyper under limits.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::admission::{ConnKind, ConnState};
use crate::config::{ListenerConfig, ListenerProtocol};
use crate::h1guard::H1Guard;
use crate::log_limited;
use crate::records::Counters;
use crate::service::{Conn, Shared};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream with bytes already read in front of it, that notes when it last moved data.
pub struct Prefixed<I> {
    prefix: Vec<u8>,
    pos: usize,
    inner: I,
    activity: Arc<ConnState>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.pos..)
            && !rest.is_empty()
        {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.pos += n;
            if this.pos == this.prefix.len() {
                // Handed over whole: the connection keeps no copy.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts connections on one listener until the task is dropped: each is admitted by the
/// connection table, then served as HTTP (h2c or HTTP/1) or, on a Kafka listener, by
/// [`crate::kafka::serve`].
pub async fn accept_loop(shared: Arc<Shared>, listener: Arc<ListenerConfig>, socket: TcpListener) {
    loop {
        let (stream, client) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                log_limited!(warn, listener = %listener.name, error = %e, "Accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // One pod is one source, over IPv4 and IPv6 alike: its endpoint's first address.
        let source = shared
            .policy
            .current()
            .and_then(|s| s.endpoint_by_ip(client.ip()).and_then(|e| e.ips.first().copied()))
            .unwrap_or(client.ip());
        let admitted = match shared.conns.admit(source) {
            Ok((a, _shed)) => a,
            Err(why) => {
                Counters::inc(&shared.counters.connections_refused);
                log_limited!(info, %client, ?why, "Connection refused: every connection is busy");
                drop(stream);
                continue;
            }
        };
        let (shared, listener) = (shared.clone(), listener.clone());
        tokio::spawn(async move {
            Counters::inc(&shared.counters.connections);
            let state = admitted.state.clone();
            let protocol = listener.transparent.as_ref().map(|t| t.protocol);
            let work = {
                let (shared, state) = (shared.clone(), state.clone());
                async move {
                    match protocol {
                        Some(ListenerProtocol::Kafka) => {
                            crate::kafka::serve(shared, listener, stream, client, state).await;
                            Ok(())
                        }
                        Some(ListenerProtocol::Tunnel) => {
                            crate::tunnel::relay::serve(shared, listener, stream, client, state).await;
                            Ok(())
                        }
                        _ => serve(shared, listener, stream, client, state).await,
                    }
                }
            };
            tokio::select! {
                r = work => {
                    if let Err(e) = r {
                        tracing::debug!(%client, error = %e, "connection ended with an error");
                    }
                }
                () = state.shed() => tracing::debug!(%client, "connection shed"),
            }
            drop(admitted);
        });
    }
}

/// Reads until the bytes cannot be the HTTP/2 preface any more, or are all of it.
async fn sniff<I: AsyncRead + Unpin>(stream: &mut I) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    Ok(buf)
}

/// Serves one client connection (`state`: its entry in the connection table).
pub async fn serve(
    shared: Arc<Shared>,
    listener: Arc<ListenerConfig>,
    stream: TcpStream,
    client: SocketAddr,
    activity: Arc<ConnState>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr()?;
    // A transparent listener serves flows the datapath handed over; a connection made to the
    // listener's own port was not handed over (its "original destination" would be the proxy).
    if listener.transparent.is_some() && local.port() == listener.listen.port() {
        tracing::debug!(%client, %local, "connection to the transparent listener itself refused");
        return Ok(());
    }
    serve_io(shared, listener, stream, client, local, activity).await
}

/// Serves one client connection over any byte stream (a TCP connection; a tunnel stream, whose
/// `listener` says it came authenticated) from `client` to the original destination `local`.
pub async fn serve_io<I>(
    shared: Arc<Shared>,
    listener: Arc<ListenerConfig>,
    mut stream: I,
    client: SocketAddr,
    local: SocketAddr,
    activity: Arc<ConnState>,
) -> io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits.clone();
    let prefix = match tokio::time::timeout(limits.header_read_timeout(), sniff(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    if prefix.is_empty() {
        return Ok(());
    }
    activity.touch();
    let is_h2 = prefix.starts_with(H2_PREFACE);
    activity.set_kind(if is_h2 { ConnKind::Http2 } else { ConnKind::Http1 });
    let io = Prefixed { prefix, pos: 0, inner: stream, activity: activity.clone() };
    if is_h2 {
        let conn = Arc::new(Conn::new(shared, listener, client, local, activity.clone(), None));
        let svc = {
            let conn = conn.clone();
            service_fn(move |req| conn.clone().handle(req))
        };
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_pending_accept_reset_streams(Some(50))
            .max_local_error_reset_streams(Some(256));
        let served = b.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(served);
        let idle = limits.idle_timeout();
        let mut check = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
        // Closing politely (GOAWAY) needs the peer's help; a peer that does not answer gets
        // dropped after a grace period as long as the idle timeout (at most 10 s).
        let grace = idle.min(Duration::from_secs(10));
        let mut closing: Option<Instant> = None;
        loop {
            tokio::select! {
                r = &mut served => return r.map_err(io::Error::other),
                _ = check.tick() => match closing {
                    None if activity.is_idle() && activity.idle_for() >= idle => {
                        served.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    Some(since) if since.elapsed() >= grace && activity.is_idle() => return Ok(()),
                    _ => {}
                }
            }
        }
    } else {
        let guard = H1Guard::new(io, limits.max_header_bytes);
        let conn = Arc::new(Conn::new(shared, listener, client, local, activity, Some(guard.shared())));
        let svc = service_fn(move |req| conn.clone().handle(req));
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout())
            // A client that stops sending (or whose next request the guard refused) still gets
            // the answers to the requests it already sent.
            .half_close(true)
            .max_buf_size(limits.max_header_bytes.max(8192) * 2)
            .serve_connection(TokioIo::new(guard), svc)
            .with_upgrades()
            .await
            .map_err(io::Error::other)
    }
}
