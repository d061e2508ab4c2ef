//! The mTLS tunnel between node proxies (as Istio's HBONE): flows between endpoints on different
//! nodes whose destination wants them authenticated travel from the source node's proxy to the
//! destination node's proxy as streams of a pooled HTTP/2 connection over mutual TLS, one
//! `CONNECT` stream per flow ([`target`]).
//!
//! * The source side ([`relay`], [`client`]): the datapath hands such a TCP flow to the tunnel
//!   listener (`redirect_common::listener::TUNNEL`); the proxy opens a stream to the
//!   destination's node presenting the certificate of the client's identity, and relays bytes.
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
pub mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

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
    /// Counters.
    pub counters: TunnelCounters,
}

impl Tunnel {
    /// The tunnel of a configuration; `http`: the proxy's HTTP listener.
    pub fn new(config: TunnelConfig, http: Option<Arc<ListenerConfig>>, connect_timeout: std::time::Duration) -> Self {
        let tls = Arc::new(credentials::TlsState::default());
        if config.credentials.exists()
            && let Err(e) = tls.load(&config.credentials)
        {
            tracing::warn!(error = %e, "mesh credentials not loaded: no tunnel until they are");
        }
        Self { config, tls, client: client::Pool::new(connect_timeout), http, counters: TunnelCounters::default() }
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
