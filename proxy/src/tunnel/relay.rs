//! The source side: a flow the datapath handed to the tunnel listener goes to its destination's
//! node through a tunnel stream, bytes relayed both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::target::Target;
use crate::admission::ConnState;
use crate::config::ListenerConfig;
use crate::log_limited;
use crate::service::Shared;

/// The address of a node's tunnel listener: its first IPv4 address (the underlay), else its first.
pub fn node_addr(node_ips: &[std::net::IpAddr], port: u16) -> Option<SocketAddr> {
    node_ips.iter().find(|ip| ip.is_ipv4()).or(node_ips.first()).map(|ip| SocketAddr::new(*ip, port))
}

/// Relays one flow accepted on the tunnel listener (`client` → the socket's local address).
pub async fn serve(
    shared: Arc<Shared>,
    listener: Arc<ListenerConfig>,
    mut stream: TcpStream,
    client: SocketAddr,
    state: Arc<ConnState>,
) {
    let Ok(destination) = stream.local_addr() else { return };
    if destination.port() == listener.listen.port() {
        return;
    }
    let Some(tunnel) = shared.tunnel.clone() else {
        log_limited!(warn, %client, %destination, "a flow reached the tunnel listener but the proxy has no tunnel configured");
        return;
    };
    let _inflight = crate::service::Inflight::new(&state.inflight);
    let fail = |why: String| {
        tunnel.counters.streams_out_failed.fetch_add(1, Ordering::Relaxed);
        log_limited!(warn, %client, %destination, error = %why, "flow not relayed through the tunnel");
    };
    let Some(snap) = shared.policy.current() else { return fail("no policy snapshot".into()) };
    let Some(t) = snap.tunnel_target(destination.ip()) else {
        return fail("the destination is no other node's endpoint that wants the tunnel".into());
    };
    let Some(source) = snap.endpoint_by_ip(client.ip()).filter(|e| e.local) else {
        return fail("the client is no endpoint of this node".into());
    };
    let Some(tls) = tunnel.tls.current() else { return fail("no mesh credentials loaded".into()) };
    let Some(addr) = node_addr(t.node_ips, tunnel.config.port) else { return fail("the node has no address".into()) };
    let target = Target { destination, client };
    match tunnel.client.open(&tls, t.node, addr, source.identity, target, &tunnel.counters.connections_out).await {
        Ok(up) => {
            tunnel.counters.streams_out.fetch_add(1, Ordering::Relaxed);
            state.touch();
            let mut up = TokioIo::new(up);
            if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut up).await {
                tracing::debug!(%client, %destination, error = %e, "tunnelled flow ended with an error");
            }
        }
        Err(e) => {
            fail(e.to_string());
            // The client sees its connection reset, as if the destination had refused it.
            if let Err(e) = crate::transparent::close_with_reset(&stream) {
                tracing::debug!(error = %e, "SO_LINGER not set");
            }
        }
    }
}
