//! The source side's connections to other nodes' tunnel listeners: one HTTP/2 connection over
//! mutual TLS per (node, client identity, credentials generation), each carrying many streams.
//! A new generation of credentials (a rotation) opens new connections; the old ones finish their
//! streams and close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::credentials::Tls;
use super::identity::{self, Subject};
use super::stream::{CONNECTION_WINDOW, STREAM_WINDOW, TunnelStream, keepalive};
use super::target::Target;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No credentials are loaded.
    #[error("no mesh credentials loaded")]
    NoCredentials,
    /// None for the client's identity.
    #[error("no certificate for identity {0} on this node")]
    NoIdentity(u32),
    /// TCP.
    #[error("connect to {addr}: {error}")]
    Connect {
        /// The tunnel listener.
        addr: SocketAddr,
        /// What failed.
        error: std::io::Error,
    },
    /// TLS.
    #[error("TLS with {addr}: {error}")]
    Tls {
        /// The tunnel listener.
        addr: SocketAddr,
        /// What failed.
        error: std::io::Error,
    },
    /// The server's certificate is not the destination node's.
    #[error("{addr} is not node {node}'s tunnel: {why}")]
    Peer {
        /// The tunnel listener.
        addr: SocketAddr,
        /// The node expected.
        node: String,
        /// What it presented.
        why: String,
    },
    /// HTTP/2.
    #[error("HTTP/2 with {addr}: {error}")]
    Http {
        /// The tunnel listener.
        addr: SocketAddr,
        /// What failed.
        error: h2::Error,
    },
    /// The destination's proxy refused the stream.
    #[error("{addr} refused the stream: {status}")]
    Refused {
        /// The tunnel listener.
        addr: SocketAddr,
        /// Its answer.
        status: StatusCode,
    },
}

type Key = (SocketAddr, u32, u64);

/// A connection: how to open streams on it, and when the server's certificate expires (no new
/// stream goes over it after: a new handshake checks the node's current certificate).
struct Conn {
    sender: h2::client::SendRequest<Bytes>,
    /// Set when the connection's task ends (the connection is gone).
    closed: Arc<AtomicBool>,
    not_after: i64,
}

impl Conn {
    fn usable(&self, now: i64) -> bool {
        !self.closed.load(Ordering::Acquire) && now < self.not_after
    }
}

#[derive(Default)]
struct Slot {
    conn: tokio::sync::Mutex<Option<Conn>>,
}

/// Tunnel connections by (listener address, client identity, credentials generation).
pub struct Pool {
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("connections", &self.len()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A map of handles: a panic elsewhere cannot leave it half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// An empty pool.
    pub fn new(connect_timeout: Duration) -> Self {
        Self { slots: Mutex::new(HashMap::new()), connect_timeout }
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lets go of connections of older credentials (they close once their streams end) and of
    /// closed ones.
    pub fn sweep(&self, generation: u64) {
        let now = unix_now();
        lock(&self.slots).retain(|k, slot| {
            k.2 == generation && slot.conn.try_lock().map_or(true, |c| c.as_ref().is_some_and(|c| c.usable(now)))
        });
    }

    /// Opens a stream to `target` through node `node`'s tunnel listener at `addr`, as identity
    /// `identity`. Counts new connections in `opened`.
    pub async fn open(
        &self,
        tls: &Tls,
        node: &str,
        addr: SocketAddr,
        identity: u32,
        target: Target,
        opened: &std::sync::atomic::AtomicU64,
    ) -> Result<TunnelStream, OpenError> {
        let slot = lock(&self.slots).entry((addr, identity, tls.generation)).or_default().clone();
        for attempt in 0..2 {
            let sender = {
                let mut held = slot.conn.lock().await;
                match held.as_ref() {
                    Some(c) if c.usable(unix_now()) => c.sender.clone(),
                    _ => {
                        let c = self.connect(tls, node, addr, identity).await?;
                        opened.fetch_add(1, Ordering::Relaxed);
                        let sender = c.sender.clone();
                        *held = Some(c);
                        sender
                    }
                }
            };
            match Self::request(sender, &target).await {
                Ok((resp, send)) if resp.status() == StatusCode::OK => {
                    return Ok(TunnelStream::new(send, resp.into_body()));
                }
                Ok((resp, _)) => return Err(OpenError::Refused { addr, status: resp.status() }),
                // Nothing of the flow has been sent: the pooled connection went away under us
                // (the peer restarted, went idle, sent GOAWAY): once more on a new one.
                Err(_) if attempt == 0 => *slot.conn.lock().await = None,
                Err(error) => return Err(OpenError::Http { addr, error }),
            }
        }
        Err(OpenError::Refused { addr, status: StatusCode::SERVICE_UNAVAILABLE })
    }

    /// The `CONNECT` of a stream and its answer.
    async fn request(
        sender: h2::client::SendRequest<Bytes>,
        target: &Target,
    ) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), h2::Error> {
        let mut sender = sender.ready().await?;
        let (response, send) = sender.send_request(target.request(), false)?;
        Ok((response.await?, send))
    }

    async fn connect(&self, tls: &Tls, node: &str, addr: SocketAddr, identity: u32) -> Result<Conn, OpenError> {
        let config = tls.clients.get(&identity).ok_or(OpenError::NoIdentity(identity))?.clone();
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| OpenError::Connect { addr, error: timed_out() })?
            .map_err(|error| OpenError::Connect { addr, error })?;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        // The node's certificate names its addresses: the one connected to must be among them.
        let name = ServerName::IpAddress(addr.ip().into());
        let stream = tokio::time::timeout(self.connect_timeout, TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| OpenError::Tls { addr, error: timed_out() })?
            .map_err(|error| OpenError::Tls { addr, error })?;
        let peer = identity::read_peer(stream.get_ref().1.peer_certificates().unwrap_or_default());
        let peer_err = |why: String| OpenError::Peer { addr, node: node.to_owned(), why };
        let not_after = match peer {
            Ok(p)
                if p.id.subject == Subject::Node(node.to_owned())
                    && p.id.trust_domain == tls.trust_domain
                    && p.issuer_node == node =>
            {
                p.not_after
            }
            Ok(p) => return Err(peer_err(format!("{} issued by node {:?}", p.id, p.issuer_node))),
            Err(e) => return Err(peer_err(e.to_string())),
        };
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|error| OpenError::Http { addr, error })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            let keepalive = keepalive(conn.ping_pong());
            tokio::select! {
                done = &mut conn => if let Err(e) = done {
                    tracing::debug!(%addr, error = %e, "tunnel connection ended with an error");
                },
                why = keepalive => tracing::debug!(%addr, %why, "tunnel connection closed"),
            }
            ended.store(true, Ordering::Release);
        });
        Ok(Conn { sender, closed, not_after })
    }
}

/// Seconds since the Unix epoch, as certificates count them.
pub(crate) fn unix_now() -> i64 {
    i64::try_from(crate::fqdn::unix_now()).unwrap_or(i64::MAX)
}
