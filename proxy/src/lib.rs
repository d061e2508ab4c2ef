//! Porin's L7 proxy: per-request HTTP/1.1, HTTP/2 and gRPC policy on compiled snapshots.
//!
//! One proxy process runs per node, apart from the agent, so agent restarts never touch L7
//! traffic. It reads the policy inputs the agent publishes ([`snapshot`]), resolves them with the
//! same engine the agent uses, and keeps enforcing the last good snapshot when the agent is gone.
//!
//! Each listener knows (from its configuration now, from the socket's original addresses once the
//! transparent datapath hands flows over) who the client is and which destination it reaches. On
//! accept, the proxy computes the L3/L4 verdict of both ends (source egress, destination ingress)
//! and, per request, the L7 verdict on the normalised request ([`normalize`]). HTTP/1 framing is
//! checked strictly before hyper sees a byte ([`h1guard`]); HTTP/2 is h2c with prior knowledge.
//! Every request and response leaves a Hubble-shaped [`flow`] record.

pub mod h1guard;
pub mod normalize;

pub mod config;
pub mod control;
pub mod flow;
pub mod policy;
pub mod records;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod transparent;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::{ListenerConfig, ProxyConfig};
use crate::records::{Counters, Records};
use crate::service::Shared;
use crate::snapshot::PolicyState;
use crate::upstream::Upstreams;

/// What a running proxy is: for the control socket and tests.
pub struct ProxyInfo {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Listeners and the addresses they are bound to.
    pub listeners: Vec<(Arc<ListenerConfig>, SocketAddr)>,
}

/// A running proxy; dropping it stops it.
pub struct Proxy {
    /// Its state.
    pub info: Arc<ProxyInfo>,
    tasks: Vec<JoinHandle<()>>,
    control: Option<PathBuf>,
}

impl Proxy {
    /// Loads the published snapshot (if there is one), binds every listener and the control
    /// socket, and starts serving. Call within a Tokio runtime.
    pub async fn start(cfg: ProxyConfig) -> std::io::Result<Self> {
        let policy = Arc::new(PolicyState::new(&cfg.snapshot));
        if cfg.snapshot.exists() {
            match snapshot::load(&cfg.snapshot) {
                Ok(s) => policy.install(s),
                Err(e) => policy.reject(e),
            }
        } else {
            tracing::warn!(path = %cfg.snapshot.display(), "no policy snapshot published yet: denying every request until one is");
        }
        let shared = Arc::new(Shared {
            policy: policy.clone(),
            upstreams: Upstreams::default(),
            records: Records::new(cfg.flow_log.as_deref())?,
            counters: Counters::default(),
            limits: cfg.limits.clone(),
        });
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        let mut sockets = Vec::new();
        for l in &cfg.listeners {
            let bound = match &l.transparent {
                Some(t) => transparent::listen(l.listen, t),
                None => tokio::net::TcpListener::bind(l.listen).await,
            };
            let sock = bound
                .map_err(|e| std::io::Error::new(e.kind(), format!("listener {} on {}: {e}", l.name, l.listen)))?;
            let addr = sock.local_addr()?;
            let l = Arc::new(l.clone());
            listeners.push((l.clone(), addr));
            sockets.push((l, sock));
        }
        for (l, sock) in sockets {
            tracing::info!(listener = %l.name, upstream = ?l.upstream, transparent = l.transparent.is_some(), "listening");
            tasks.push(tokio::spawn(server::accept_loop(shared.clone(), l, sock)));
        }
        let every = Duration::from_millis(cfg.snapshot_poll_ms.max(10));
        tasks.push(tokio::spawn(snapshot::follow(policy, cfg.snapshot.clone(), every)));
        let info = Arc::new(ProxyInfo { shared, listeners });
        if let Some(path) = &cfg.control_socket {
            let sock = control::bind(path)?;
            tasks.push(tokio::spawn(control::serve(info.clone(), sock)));
        }
        Ok(Self { info, tasks, control: cfg.control_socket.clone() })
    }

    /// The address listener `name` is bound to.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.info.listeners.iter().find(|(l, _)| l.name == name).map(|(_, a)| *a)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(p) = &self.control {
            let _ = std::fs::remove_file(p);
        }
    }
}
