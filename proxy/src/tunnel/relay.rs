//! The source side: a flow the datapath handed to the tunnel listener goes to its destination's
//! node through a tunnel stream, bytes relayed both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;

use super::Hop;
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
    let fail = |why: &dyn std::fmt::Display| {
        log_limited!(warn, %client, %destination, error = %why, "flow not relayed through the tunnel");
        // The client sees its connection reset, as if the destination had refused it.
        if let Err(e) = crate::transparent::close_with_reset(&stream) {
            tracing::debug!(error = %e, "SO_LINGER not set");
        }
    };
    let hop =
        match shared.policy.current().map(|snap| Hop::of(&snap, client.ip(), destination.ip(), tunnel.config.port)) {
            Some(Ok(Some(hop))) => hop,
            unroutable => {
                tunnel.counters.streams_out_failed.fetch_add(1, Ordering::Relaxed);
                let why = match unroutable {
                    None => "no policy snapshot".to_owned(),
                    Some(Err(why)) => why,
                    Some(Ok(_)) => "the destination is no other node's endpoint that wants the tunnel".to_owned(),
                };
                return fail(&why);
            }
        };
    match tunnel.open(&hop, Target { destination, client }).await {
        Ok(up) => {
            state.touch();
            let mut up = up;
            if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut up).await {
                tracing::debug!(%client, %destination, error = %e, "tunnelled flow ended with an error");
            }
        }
        Err(e) => fail(&e),
    }
}
