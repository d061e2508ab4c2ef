//! The mTLS tunnel between node proxies (as Istio's HBONE): flows between endpoints on different
//! nodes whose destination wants them authenticated travel from the source node's proxy to the
//! destination node's proxy as streams of a pooled HTTP/2 connection over mutual TLS, one
//! `CONNECT` stream per flow ([`target`]).
//!
//! * The source side ([`relay`], [`client`]): the datapath hands such a TCP flow to the tunnel
//!   listener (`redirect_common::listener::TUNNEL`); the proxy opens a stream to the
//!   destination's node presenting the certificate of the client's identity, and relays bytes.
//!   A flow the source's own egress L7 rules brought to the proxy reaches such a destination the
//!   same way: its upstream connections are tunnel streams ([`crate::upstream::Via`]).
//! * The destination side ([`server`]): the tunnel listener accepts TLS only from a client
//!   certificate of the cluster's trust bundle; each stream's client must be an endpoint of the
//!   identity the certificate names, on the node whose CA issued it. The stream is then judged as
//!   a connection from that client (ingress L3/L4, and L7 when the destination's rules have
//!   any) and handed to the destination pod from the client's address (`IP_TRANSPARENT`, marked:
//!   the datapath lets the proxy's connection in; anything else that a rule requiring
//!   authentication allows is dropped with `AUTH_REQUIRED`).
//! * [`credentials`]: the certificates the agent issues and rotates; [`identity`]: what they name.

pub mod client;
pub mod credentials;
pub mod identity;
pub mod relay;
pub mod server;
pub mod stream;
pub mod target;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use policy_engine::snapshot::Snapshot;
use serde::{Deserialize, Serialize};

use crate::config::ListenerConfig;

/// The port node proxies' tunnel listeners use by default (HBONE's).
pub const DEFAULT_PORT: u16 = 15008;

/// The `tunnel` section of the proxy's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// The credentials file the agent writes ([`credentials::CredentialsFile`]).
    pub credentials: PathBuf,
    /// Where this node's tunnel listener listens (default `0.0.0.0:15008` and `[::]:15008`).
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// The port other nodes' tunnel listeners listen on.
    #[serde(default = "default_port")]
    pub port: u16,
    /// How often the credentials file is checked for a new version, in milliseconds.
    #[serde(default = "default_poll")]
    pub credentials_poll_ms: u64,
    /// Streams one tunnel connection may carry at once.
    #[serde(default = "default_streams")]
    pub max_streams: u32,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_PORT)),
    ]
}

fn default_port() -> u16 {
    DEFAULT_PORT
}

fn default_poll() -> u64 {
    500
}

fn default_streams() -> u32 {
    1024
}

/// Counters of the tunnel (`status` → `tunnel`).
#[derive(Debug, Default, Serialize)]
pub struct TunnelCounters {
    /// Streams opened to other nodes (flows relayed).
    pub streams_out: AtomicU64,
    /// Flows that could not be relayed (no credentials, the peer unreachable or refusing).
    pub streams_out_failed: AtomicU64,
    /// Tunnel connections opened to other nodes.
    pub connections_out: AtomicU64,
    /// Tunnel connections accepted.
    pub connections_in: AtomicU64,
    /// Tunnel connections refused: the TLS handshake failed (no or a bad client certificate,
    /// not TLS, too slow) or the certificate is not a workload's of this trust domain.
    pub handshakes_refused: AtomicU64,
    /// Streams accepted and handed to their destination.
    pub streams_in: AtomicU64,
    /// Streams refused (a bad head, a client the certificate does not name, policy).
    pub streams_in_refused: AtomicU64,
}

/// The tunnel's part of the proxy.
#[derive(Debug)]
pub struct Tunnel {
    /// The configuration.
    pub config: TunnelConfig,
    /// The credentials in force.
    pub tls: Arc<credentials::TlsState>,
    /// Connections to other nodes' tunnel listeners.
    pub client: client::Pool,
    /// How the destination side serves a stream whose destination's rules need HTTP: as this
    /// (HTTP, transparent) listener would serve a connection.
    pub http: Option<Arc<ListenerConfig>>,
    /// And one whose destination's rules are Kafka's: as this (Kafka, transparent) listener would.
    pub kafka: Option<Arc<ListenerConfig>>,
    /// Counters.
    pub counters: TunnelCounters,
}

/// How one flow goes through the tunnel: to which node's listener, as which identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    /// The destination's node.
    pub node: String,
    /// Its tunnel listener.
    pub addr: SocketAddr,
    /// The client's identity (whose certificate the connection presents).
    pub identity: u32,
}

impl Hop {
    /// The hop of a flow from `client` to `destination` under `snap`, to tunnel listeners on
    /// `port`: `Ok(None)` when the destination is no other node's endpoint that wants its clients
    /// authenticated; `Err` (why) when it is and this flow cannot be.
    pub fn of(snap: &Snapshot, client: IpAddr, destination: IpAddr, port: u16) -> Result<Option<Self>, String> {
        let Some(t) = snap.tunnel_target(destination) else { return Ok(None) };
        let source = snap.endpoint_by_ip(client).filter(|e| e.local).ok_or_else(|| {
            format!("{destination} wants its clients authenticated; {client} is no endpoint of this node")
        })?;
        let addr = relay::node_addr(t.node_ips, port).ok_or_else(|| format!("node {} has no address", t.node))?;
        Ok(Some(Self { node: t.node.to_owned(), addr, identity: source.identity }))
    }
}

impl Tunnel {
    /// Opens a stream to `target` over `hop` (counted in `streams_out` or `streams_out_failed`).
    pub async fn open(&self, hop: &Hop, target: target::Target) -> Result<stream::TunnelStream, client::OpenError> {
        let opened = match self.tls.current() {
            None => Err(client::OpenError::NoCredentials),
            Some(tls) => {
                let conns = &self.counters.connections_out;
                self.client.open(&tls, &hop.node, hop.addr, hop.identity, target, conns).await
            }
        };
        let counter = if opened.is_ok() { &self.counters.streams_out } else { &self.counters.streams_out_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        opened
    }

    /// The tunnel of a configuration; `http`: the proxy's HTTP listener.
    pub fn new(
        config: TunnelConfig,
        http: Option<Arc<ListenerConfig>>,
        kafka: Option<Arc<ListenerConfig>>,
        connect_timeout: std::time::Duration,
    ) -> Self {
        let tls = Arc::new(credentials::TlsState::default());
        if config.credentials.exists()
            && let Err(e) = tls.load(&config.credentials)
        {
            tracing::warn!(error = %e, "mesh credentials not loaded: no tunnel until they are");
        }
        Self {
            config,
            tls,
            client: client::Pool::new(connect_timeout),
            http,
            kafka,
            counters: TunnelCounters::default(),
        }
    }

    /// `status` → `tunnel`.
    pub fn status(&self) -> serde_json::Value {
        let tls = self.tls.current();
        serde_json::json!({
            "credentials": tls.as_ref().map(|t| serde_json::json!({
                "generation": t.generation,
                "identities": t.clients.keys().collect::<Vec<_>>(),
                "not_after": t.not_after,
                "node": t.node,
                "trust_domain": t.trust_domain,
            })),
            "credentials_error": self.tls.last_error(),
            "connections_pooled": self.client.len(),
            "counters": &self.counters,
        })
    }
}
