//! The destination side: the tunnel listener. A connection is accepted only with a client
//! certificate that leads to the cluster's trust bundle and names a workload of the trust domain;
//! each of its streams is checked against what the certificate names, judged as a connection
//! from the stream's client, and handed to the destination pod.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use policy_engine::model::L7Parser;
use policy_engine::snapshot::Snapshot;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::Tunnel;
use super::identity::{self, PeerCert, Subject};
use super::stream::{CONNECTION_WINDOW, STREAM_WINDOW, TunnelStream, keepalive};
use super::target::Target;
use crate::admission::{ConnKind, ConnState};
use crate::config::ListenerConfig;
use crate::log_limited;
use crate::policy::{ConnPolicy, ConnVerdict};
use crate::records::{Counters, Detail, Record, Transport};
use crate::service::Shared;
use porin_flow::flow::{DropReason, Verdict};

/// Binds a tunnel listener (an IPv6 one takes IPv6 only: the IPv4 one has its own socket).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6V6Only, &true).map_err(std::io::Error::from)?;
    }
    s.bind(addr)?;
    s.listen(1024)
}

/// Accepts tunnel connections until the task is dropped.
pub async fn accept_loop(shared: Arc<Shared>, tunnel: Arc<Tunnel>, socket: TcpListener) {
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                log_limited!(warn, error = %e, "Tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match shared.conns.admit(peer.ip()) {
            Ok((a, _shed)) => a,
            Err(why) => {
                Counters::inc(&shared.counters.connections_refused);
                log_limited!(info, %peer, ?why, "Tunnel connection refused: every connection is busy");
                continue;
            }
        };
        let (shared, tunnel) = (shared.clone(), tunnel.clone());
        tokio::spawn(async move {
            let state = admitted.state.clone();
            state.set_kind(ConnKind::Http2);
            tokio::select! {
                () = connection(shared, tunnel, stream, peer, state.clone()) => {}
                () = state.shed() => tracing::debug!(%peer, "tunnel connection shed"),
            }
            drop(admitted);
        });
    }
}

/// What a tunnel connection's streams share.
struct Ctx {
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    peer: Arc<PeerCert>,
    peer_addr: SocketAddr,
    state: Arc<ConnState>,
    /// The HTTP listener's configuration, marked authenticated by this peer.
    http: Option<Arc<ListenerConfig>>,
    /// The Kafka listener's, likewise.
    kafka: Option<Arc<ListenerConfig>>,
}

async fn connection(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    stream: TcpStream,
    peer_addr: SocketAddr,
    state: Arc<ConnState>,
) {
    let refuse = |why: String| {
        tunnel.counters.handshakes_refused.fetch_add(1, Ordering::Relaxed);
        log_limited!(warn, peer = %peer_addr, error = %why, "Tunnel connection refused");
    };
    let Some(tls) = tunnel.tls.current() else { return refuse("no mesh credentials loaded".into()) };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    // A client that does not finish its handshake in time (slowloris) loses its connection and
    // holds nothing else up: every connection is its own task.
    let handshake = TlsAcceptor::from(tls.server.clone()).accept(stream);
    let stream = match tokio::time::timeout(shared.limits.header_read_timeout(), handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refuse(format!("TLS handshake: {e}")),
        Err(_) => return refuse("TLS handshake timed out".into()),
    };
    let peer = match identity::read_peer(stream.get_ref().1.peer_certificates().unwrap_or_default()) {
        Ok(p) if matches!(p.id.subject, Subject::Workload { .. }) && p.id.trust_domain == tls.trust_domain => p,
        Ok(p) => return refuse(format!("{} is not a workload of trust domain {}", p.id, tls.trust_domain)),
        Err(e) => return refuse(e.to_string()),
    };
    tunnel.counters.connections_in.fetch_add(1, Ordering::Relaxed);
    state.touch();
    let peer = Arc::new(peer);
    let authenticated = |l: &Option<Arc<ListenerConfig>>| {
        l.as_ref().map(|l| Arc::new(ListenerConfig { authenticated: Some(peer.clone()), ..ListenerConfig::clone(l) }))
    };
    let (http, kafka) = (authenticated(&tunnel.http), authenticated(&tunnel.kafka));
    let ctx = Arc::new(Ctx { shared: shared.clone(), tunnel: tunnel.clone(), peer, peer_addr, state, http, kafka });
    let mut h2 = h2::server::Builder::new();
    h2.max_concurrent_streams(tunnel.config.max_streams)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(16 * 1024)
        .max_pending_accept_reset_streams(50)
        .max_local_error_reset_streams(Some(256));
    let mut conn = match tokio::time::timeout(shared.limits.header_read_timeout(), h2.handshake(stream)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return tracing::debug!(peer = %peer_addr, error = %e, "tunnel connection: no HTTP/2 preface"),
        Err(_) => return tracing::debug!(peer = %peer_addr, "tunnel connection: no HTTP/2 preface in time"),
    };
    let keepalive = keepalive(conn.ping_pong());
    tokio::pin!(keepalive);
    // Accepting drives the connection: every stream's frames go through it.
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    tokio::spawn(stream_of(ctx.clone(), req, respond));
                }
                Some(Err(e)) => {
                    return tracing::debug!(peer = %peer_addr, error = %e, "tunnel connection ended with an error");
                }
                None => return,
            },
            why = &mut keepalive => return tracing::debug!(peer = %peer_addr, %why, "tunnel connection closed"),
        }
    }
}

/// What a stream becomes.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Bytes relayed to the destination (its ingress allows the client at L3/L4).
    Relay,
    /// Served as an HTTP connection (its ingress has HTTP rules).
    Http,
    /// Served as a Kafka connection (its ingress has Kafka rules).
    Kafka,
}

/// Whether the stream's client is what the certificate names, and what policy makes of the
/// flow. `Err`: the status to refuse with and why.
fn authorize(
    snap: &Snapshot,
    policy: &ConnPolicy,
    peer: &PeerCert,
    target: &Target,
    now: i64,
    kafka_served: bool,
) -> Result<Admit, (StatusCode, DropReason, String)> {
    // What the certificate does not vouch for is not authenticated.
    let forbidden = |why: String| Err((StatusCode::FORBIDDEN, DropReason::AuthRequired, why));
    // The handshake checked it was valid then; a long-lived connection outlives it.
    if now >= peer.not_after {
        return forbidden(format!("the client certificate ({}) expired at {} (Unix time)", peer.id, peer.not_after));
    }
    match snap.endpoint_by_ip(target.destination.ip()) {
        Some(e) if e.local => {}
        _ => return forbidden(format!("{} is no endpoint of this node", target.destination.ip())),
    }
    let Some(client) = snap.endpoint_by_ip(target.client.ip()).filter(|e| !e.local) else {
        return forbidden(format!("{} is no endpoint of another node", target.client.ip()));
    };
    let Subject::Workload { namespace, service_account } = &peer.id.subject else {
        return forbidden("not a workload certificate".into());
    };
    if peer.identity != Some(client.identity)
        || namespace != &client.namespace
        || service_account != client.service_account()
        || client.node.as_deref() != Some(peer.issuer_node.as_str())
    {
        return forbidden(format!(
            "the certificate ({}, identity {:?}, issued by node {}) does not name the client {}/{} (identity {}, service account {}, node {})",
            peer.id,
            peer.identity,
            peer.issuer_node,
            client.namespace,
            client.name,
            client.identity,
            client.service_account(),
            client.node.as_deref().unwrap_or("?"),
        ));
    }
    let refused = |why: String| Err((StatusCode::FORBIDDEN, DropReason::PolicyDenied, why));
    match &policy.verdict {
        ConnVerdict::Drop(d) => Err((StatusCode::FORBIDDEN, d.reason, d.summary.clone())),
        ConnVerdict::Judge { ingress: Some(l7), .. } if l7.parser == L7Parser::Http => Ok(Admit::Http),
        ConnVerdict::Judge { ingress: Some(l7), .. } if l7.parser == L7Parser::Kafka && kafka_served => {
            Ok(Admit::Kafka)
        }
        // Fail closed: rules this proxy cannot enforce on the stream (DNS's are UDP; Kafka's
        // without a Kafka listener).
        ConnVerdict::Judge { ingress: Some(l7), .. } => {
            refused(format!("{} rules on a tunnelled flow cannot be enforced here: refused", l7.parser))
        }
        ConnVerdict::Judge { egress: Some(_), .. } => {
            refused("egress L7 rules of another node's endpoint are that node's to enforce".into())
        }
        ConnVerdict::Judge { .. } => Ok(Admit::Relay),
    }
}

fn answer(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// The flow record of an L3/L4 tunnel stream.
fn record(
    shared: &Shared,
    ends: &Arc<crate::policy::Ends>,
    verdict: Verdict,
    reason: Option<DropReason>,
    summary: String,
) {
    shared.records.emit(Record {
        time_ns: crate::records::now_ns(),
        reply: false,
        verdict,
        reason,
        ends: ends.clone(),
        transport: Transport::Tcp,
        detail: Detail::Tunnel,
        latency_ns: 0,
        policy: None,
        summary,
        service: None,
    });
}

/// What an admitted stream is handed to.
enum Served {
    /// Relayed to the destination over this connection.
    Relay(TcpStream),
    /// Served by the proxy's HTTP listener (as a connection of the stream's client).
    Http(Arc<ListenerConfig>),
    /// Served by its Kafka listener.
    Kafka(Arc<ListenerConfig>),
}

/// One stream, from its head to its end: judged, answered, then served.
async fn stream_of(ctx: Arc<Ctx>, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let counters = &ctx.tunnel.counters;
    ctx.state.touch();
    let (head, body) = req.into_parts();
    let (target, served) = match admit(&ctx, &head).await {
        Ok(admitted) => admitted,
        Err((status, why)) => {
            counters.streams_in_refused.fetch_add(1, Ordering::Relaxed);
            log_limited!(info, peer = %ctx.peer_addr, spiffe = %ctx.peer.id, error = %why, "Tunnel stream refused");
            if let Err(e) = respond.send_response(answer(status), true) {
                tracing::debug!(error = %e, "tunnel stream refusal not sent");
            }
            return;
        }
    };
    counters.streams_in.fetch_add(1, Ordering::Relaxed);
    let io = match respond.send_response(answer(StatusCode::OK), false) {
        Ok(send) => TunnelStream::new(send, body),
        Err(e) => return tracing::debug!(error = %e, "tunnel stream gone before its answer"),
    };
    let (shared, state) = (ctx.shared.clone(), ctx.state.clone());
    match served {
        Served::Relay(mut upstream) => {
            let _inflight = crate::service::Inflight::new(&state.inflight);
            let mut io = io;
            if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
                tracing::debug!(error = %e, "tunnel stream ended with an error");
            }
        }
        Served::Kafka(kafka) => {
            crate::kafka::serve_io(shared, kafka, io, target.client, target.destination, state).await;
        }
        Served::Http(http) => {
            let served = crate::server::serve_io(shared, http, io, target.client, target.destination, state).await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "tunnel stream ended with an error");
            }
        }
    }
}

/// Whether a stream is let through and to what (its destination connected when relayed); the
/// flow's record says which. `Err`: the status to refuse it with and why.
async fn admit(ctx: &Ctx, head: &http::request::Parts) -> Result<(Target, Served), (StatusCode, String)> {
    let target = Target::from_head(&head.method, &head.uri, &head.headers)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let (Some(snap), Some(http)) = (ctx.shared.policy.current(), ctx.http.clone()) else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "no policy snapshot, or no HTTP listener".into()));
    };
    let policy = ConnPolicy::decide(
        Some(snap.clone()),
        ctx.shared.lookup(),
        &http,
        target.client,
        target.destination,
        policy_engine::snapshot::Proto::Tcp,
    );
    let admit = match authorize(&snap, &policy, &ctx.peer, &target, super::client::unix_now(), ctx.kafka.is_some()) {
        Ok(a) => a,
        Err((status, reason, why)) => {
            record(&ctx.shared, &policy.ends, Verdict::Dropped, Some(reason), why.clone());
            return Err((status, why));
        }
    };
    let served = match admit {
        Admit::Relay => {
            let timeout = ctx.shared.limits.connect_timeout();
            match crate::transparent::connect_from(target.client.ip(), target.destination, timeout).await {
                Ok(s) => {
                    record(&ctx.shared, &policy.ends, Verdict::Forwarded, None, String::new());
                    Served::Relay(s)
                }
                Err(e) => {
                    let why = format!("connect to {}: {e}", target.destination);
                    record(&ctx.shared, &policy.ends, Verdict::Error, None, why.clone());
                    return Err((StatusCode::BAD_GATEWAY, why));
                }
            }
        }
        Admit::Kafka => {
            Served::Kafka(ctx.kafka.clone().ok_or((StatusCode::SERVICE_UNAVAILABLE, "no Kafka listener".into()))?)
        }
        Admit::Http => Served::Http(http),
    };
    Ok((target, served))
}
