//! One tunnel stream as a byte stream, on both ends: reads take the stream's DATA frames and give
//! their flow-control window back as they are consumed; writes go straight into the HTTP/2
//! connection's send queue, waiting for window when the peer has none to give. There is no task
//! between the stream's user and the connection (hyper's upgrade hands every write to a task of
//! its own): one wake-up fewer per write, which a request/response over the tunnel pays twice.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Each stream's receive window: a flow can have this much in flight before its reader takes it.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// The connection's, shared by its streams.
pub const CONNECTION_WINDOW: u32 = 4 << 20;
/// A connection's peer is asked for a PING answer this often...
const KEEPALIVE_EVERY: Duration = Duration::from_secs(30);
/// ...and is given up on when none comes back within this.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Returns only when the connection's peer stopped answering PINGs (why, to log): a node that
/// went away without closing its connections (powered off, partitioned) is noticed and its
/// connection let go. Never returns without a `PingPong` (it was taken already).
pub async fn keepalive(ping: Option<h2::PingPong>) -> String {
    let Some(mut ping) = ping else { return std::future::pending().await };
    loop {
        tokio::time::sleep(KEEPALIVE_EVERY).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keep-alive PING failed: {e}"),
            Err(_) => return format!("no answer to a keep-alive PING in {KEEPALIVE_TIMEOUT:?}"),
        }
    }
}

/// The most one write hands to the connection: larger writes are taken in parts, so a single
/// write cannot hold more of the connection's window than a frame's worth of others' share.
const MAX_WRITE: usize = 64 * 1024;

/// A tunnel stream (an accepted or opened `CONNECT`) read and written as bytes.
#[derive(Debug)]
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    buf: Bytes,
    /// END_STREAM sent (our half is closed).
    shut: bool,
}

impl TunnelStream {
    /// The stream of a `CONNECT` answered 200: our half and the peer's.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, buf: Bytes::new(), shut: false }
    }
}

/// An HTTP/2 error as an I/O error: a reset is the peer (or the connection) going away.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::CANCEL | Reason::STREAM_CLOSED | Reason::NO_ERROR) => io::ErrorKind::BrokenPipe,
        Some(Reason::REFUSED_STREAM) => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for TunnelStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                // The peer's half closed: end of file.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.buf = data,
                // The peer ended the stream without an error code that means one.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = self.buf.len().min(out.remaining());
        let chunk = self.buf.split_to(n);
        out.put_slice(&chunk);
        // The window this frees lets the peer send on; a stream already gone has none to free
        // (its next read says so).
        if let Err(e) = self.recv.flow_control().release_capacity(n) {
            tracing::debug!(error = %e, "tunnel stream window not released");
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = buf.len().min(MAX_WRITE);
        // Window is asked for only when there is something to send: a reservation held while
        // idle would pin the connection's window.
        if self.send.capacity() == 0 {
            self.send.reserve_capacity(want);
            loop {
                match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => break,
                    Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                    // The stream is no longer open for sending (reset, or closed).
                    None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                }
            }
        }
        let n = want.min(self.send.capacity());
        self.send.send_data(Bytes::copy_from_slice(buf.get(..n).unwrap_or(buf)), false).map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what is queued as soon as it runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A client connection to a server (over an in-memory pipe) that echoes every stream back
    /// and closes its half when the client closes its own.
    async fn echo_server() -> h2::client::SendRequest<Bytes> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .handshake::<_, Bytes>(server)
                .await
                .unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let send = respond.send_response(http::Response::new(()), false).unwrap();
                    let (mut r, mut w) = tokio::io::split(TunnelStream::new(send, req.into_body()));
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
        });
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(client)
            .await
            .unwrap();
        tokio::spawn(async move { conn.await.unwrap() });
        sender
    }

    async fn open(sender: &h2::client::SendRequest<Bytes>) -> TunnelStream {
        let mut sender = sender.clone().ready().await.unwrap();
        let req = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (response, send) = sender.send_request(req, false).unwrap();
        TunnelStream::new(send, response.await.unwrap().into_body())
    }

    /// More than both windows, written while the echo is read: the writer waits for window
    /// and the reader gives it back, on both ends, and every byte arrives in order.
    #[tokio::test]
    async fn streams_carry_more_than_their_windows_both_ways() {
        let sender = echo_server().await;
        let size = CONNECTION_WINDOW as usize + STREAM_WINDOW as usize * 2 + 12_345;
        let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut streams = Vec::new();
        for _ in 0..3 {
            let (mut r, mut w) = tokio::io::split(open(&sender).await);
            let data = sent.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            });
            streams.push((writer, reader));
        }
        for (writer, reader) in streams {
            writer.await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap();
            assert_eq!(got.len(), sent.len());
            assert!(got == sent, "the echo differs from what was sent");
        }
    }

    /// A stream the peer resets is an error to its writer, not a write that vanishes.
    #[tokio::test]
    async fn a_reset_stream_fails_its_writes() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let mut send = respond.send_response(http::Response::new(()), false).unwrap();
                // Once the first bytes arrive: reset.
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    body.data().await.unwrap().unwrap();
                    send.send_reset(Reason::INTERNAL_ERROR);
                });
            }
        });
        let (sender, conn) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(async move { conn.await.unwrap() });
        let mut io = open(&sender).await;
        let mut failed = None;
        for _ in 0..100 {
            if let Err(e) = io.write_all(&[7; 1024]).await {
                failed = Some(e);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(failed.is_some(), "writes to a reset stream kept succeeding");
        let mut buf = [0; 16];
        assert!(io.read(&mut buf).await.is_err(), "a reset (INTERNAL_ERROR) read as a clean end");
    }
}
