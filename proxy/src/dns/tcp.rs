//! DNS over TCP, transparently: the datapath hands the connection to the DNS listener like any
//! proxied TCP flow. Messages are length-prefixed (RFC 1035 §4.2.2) and may be pipelined; each is
//! judged on its own, in order. Allowed ones go to the server over one upstream connection from
//! the client's address (opened on the first allowed query); denied ones are answered here.
//! Answers of any size (up to the 64 KiB the framing allows) pass.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{Decision, Released};
use crate::config::ListenerConfig;
use crate::records::{Counters, Transport};
use crate::service::Shared;

/// A connection with no query for this long is closed.
const IDLE: Duration = Duration::from_secs(10);

/// Accepts DNS connections until the task is dropped.
pub async fn accept_loop(shared: Arc<Shared>, listener: Arc<ListenerConfig>, socket: TcpListener) {
    let conns = Arc::new(Semaphore::new(shared.dns.max_inflight));
    loop {
        let (stream, client) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                crate::log_limited!(warn, listener = %listener.name, error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            Counters::inc(&shared.counters.connections_refused);
            crate::log_limited!(warn, %client, "DNS connections at the limit: refused");
            continue;
        };
        Counters::inc(&shared.counters.connections);
        let (shared, listener) = (shared.clone(), listener.clone());
        tokio::spawn(async move {
            let server = match stream.local_addr() {
                Ok(a) => a,
                Err(_) => return,
            };
            serve(&shared, &listener, stream, client, server).await;
            drop(permit);
        });
    }
}

async fn read_message<R: AsyncRead + Unpin>(r: &mut R, timeout: Duration) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    tokio::time::timeout(timeout, r.read_exact(&mut len)).await.ok()?.ok()?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tokio::time::timeout(timeout, r.read_exact(&mut msg)).await.ok()?.ok()?;
    Some(msg)
}

async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    w.write_all(&framed).await
}

async fn serve(
    shared: &Shared,
    listener: &ListenerConfig,
    mut client_stream: TcpStream,
    client: SocketAddr,
    server: SocketAddr,
) {
    let mut upstream: Option<TcpStream> = None;
    let mut verdicts = super::Verdicts::default();
    let forward_timeout = Duration::from_millis(shared.dns.forward_timeout_ms);
    while let Some(raw) = read_message(&mut client_stream, IDLE).await {
        let answer = match super::judge(shared, &mut verdicts, listener, client, server, Transport::Tcp, &raw) {
            // Not a query: the stream cannot be trusted to be DNS; close it.
            Decision::Drop => return,
            Decision::Answer(a) => a,
            Decision::Forward(ex) => {
                if upstream.is_none() {
                    match crate::transparent::connect_from(client.ip(), server, shared.limits.connect_timeout()).await {
                        Ok(s) => upstream = Some(s),
                        Err(e) => {
                            ex.timed_out(shared, &format!("connect to {server}: {e}"));
                            return;
                        }
                    }
                }
                let Some(up) = upstream.as_mut() else { return };
                if let Err(e) = write_message(up, &raw).await {
                    ex.timed_out(shared, &format!("send to {server}: {e}"));
                    return;
                }
                // The answer to this query (another id or question would not be ours: the
                // connection is closed rather than guessed at).
                let Some(reply) = read_message(up, forward_timeout).await else {
                    ex.timed_out(shared, &format!("{server} did not answer within {} ms", forward_timeout.as_millis()));
                    return;
                };
                match ex.answered(shared, &reply) {
                    Released::Answer(a) => a,
                    Released::NotOurs => {
                        ex.timed_out(shared, "the server's answer is not for the question asked");
                        return;
                    }
                }
            }
        };
        if write_message(&mut client_stream, &answer).await.is_err() {
            Counters::inc(&shared.counters.downstream_errors);
            return;
        }
    }
}
