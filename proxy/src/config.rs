//! The proxy's configuration file (YAML). See `docs/config.md` (proxy section).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `porin proxy --config FILE`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The policy inputs file the agent publishes (JSON, replaced atomically). A missing file
    /// means no policy yet: every request is denied until one appears.
    pub snapshot: PathBuf,
    /// How often the snapshot file is checked for a new version (milliseconds).
    #[serde(default = "default_poll_ms")]
    pub snapshot_poll_ms: u64,
    /// Control socket: `status`, `flows` (see [`crate::control`]).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Also append every flow record to this file (JSON lines).
    #[serde(default)]
    pub flow_log: Option<PathBuf>,
    /// Keep flow records (the backlog the agent and `porin observe` read, the metrics, the flow
    /// log). `false` turns all three off: the proxy still enforces and counts (`status`).
    #[serde(default = "default_true")]
    pub flow_records: bool,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// The DNS proxy (listeners with `protocol: dns`).
    #[serde(default)]
    pub dns: DnsSettings,
    /// The mTLS tunnel between node proxies ([`crate::tunnel::TunnelConfig`]).
    #[serde(default)]
    pub tunnel: Option<crate::tunnel::TunnelConfig>,
}

/// How a denied DNS query is answered (Cilium's `--tofqdns-dns-reject-response-code`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RejectCode {
    /// `REFUSED` (Cilium's default).
    #[default]
    Refused,
    /// `NXDOMAIN`.
    NameError,
}

/// The DNS proxy's settings. Every field has a default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSettings {
    /// The answer to a denied query.
    pub reject_response_code: RejectCode,
    /// Learned names are kept at least this long, seconds (Cilium's `--tofqdns-min-ttl`).
    pub min_ttl: u32,
    /// The DNS server must answer an allowed query within this time (milliseconds); the client
    /// gets no answer otherwise, as from Cilium.
    pub forward_timeout_ms: u64,
    /// Queries in flight at once; more are answered `SERVFAIL` (Cilium's
    /// `--dnsproxy-concurrency-limit`).
    pub max_inflight: usize,
    /// Where the learned names are kept across restarts (none: not kept).
    pub cache_file: Option<PathBuf>,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            reject_response_code: RejectCode::Refused,
            min_ttl: 0,
            forward_timeout_ms: 10_000,
            max_inflight: 10_000,
            cache_file: None,
        }
    }
}

fn default_poll_ms() -> u64 {
    100
}

/// Who is at one end of the proxied connections. In YAML: `{pod: ns/name}`, `{ip: addr}`,
/// `{identity: n}` or `socket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PeerRepr", into = "PeerRepr")]
pub enum PeerRef {
    /// A local endpoint, `namespace/name`: its identity, addresses and (for the source) egress
    /// policy, or (for the destination) ingress policy apply.
    Pod(String),
    /// An address: the endpoint that owns it, or its identity from the ipcache.
    Ip(IpAddr),
    /// A bare identity (no endpoint policy on this end).
    Identity(u32),
    /// The address the connection really came from / went to (the accepted socket's peer or local
    /// address): what the transparent datapath gives.
    Socket,
}

/// How a [`PeerRef`] is written.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum PeerRepr {
    Word(String),
    Map(PeerMap),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerMap {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<u32>,
}

impl TryFrom<PeerRepr> for PeerRef {
    type Error = String;

    fn try_from(r: PeerRepr) -> Result<Self, String> {
        match r {
            PeerRepr::Word(w) if w == "socket" => Ok(Self::Socket),
            PeerRepr::Word(w) => {
                Err(format!("unknown peer {w:?}: expected socket, {{pod: ns/name}}, {{ip: addr}} or {{identity: n}}"))
            }
            PeerRepr::Map(m) => match (m.pod, m.ip, m.identity) {
                (Some(p), None, None) => Ok(Self::Pod(p)),
                (None, Some(ip), None) => Ok(Self::Ip(ip)),
                (None, None, Some(id)) => Ok(Self::Identity(id)),
                _ => Err("a peer is exactly one of pod, ip, identity".into()),
            },
        }
    }
}

impl From<PeerRef> for PeerRepr {
    fn from(p: PeerRef) -> Self {
        match p {
            PeerRef::Pod(pod) => Self::Map(PeerMap { pod: Some(pod), ..Default::default() }),
            PeerRef::Ip(ip) => Self::Map(PeerMap { ip: Some(ip), ..Default::default() }),
            PeerRef::Identity(id) => Self::Map(PeerMap { identity: Some(id), ..Default::default() }),
            PeerRef::Socket => Self::Word("socket".into()),
        }
    }
}

/// Protocol towards the upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// Same as the client's (HTTP/1.1 ↔ HTTP/1.1, h2c ↔ h2c).
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always h2c (prior knowledge).
    Http2,
}

/// One listener.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name (in logs and status).
    pub name: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where allowed requests go. Transparent listeners send them to the original destination.
    #[serde(default)]
    pub upstream: Option<SocketAddr>,
    /// The datapath hands flows to this listener (`bpf_sk_assign`); see [`Transparent`].
    #[serde(default)]
    pub transparent: Option<Transparent>,
    /// The client side.
    pub source: PeerRef,
    /// The server side.
    pub destination: PeerRef,
    /// Destination port policy is evaluated for (default: the destination's port).
    #[serde(default)]
    pub port: Option<u16>,
    /// Protocol towards the upstream.
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// Set by the tunnel on the listener it serves a stream as (never from configuration): the
    /// client's certificate, verified; its flows came authenticated.
    #[serde(skip)]
    pub authenticated: Option<std::sync::Arc<crate::tunnel::identity::PeerCert>>,
}

/// A listener the kernel datapath hands flows to. It listens with `IP_TRANSPARENT` and puts its
/// socket into the datapath's pinned SOCKMAP at `redirect_common::proxy_index(id, v6)`, where `id`
/// is its protocol's listener id; the accepted socket's local address is the original destination,
/// its peer the original client. Upstream connections keep the client's address
/// (`IP_TRANSPARENT` + bind) and carry `mark::FROM_PROXY`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transparent {
    /// The pinned SOCKMAP (`<bpffs>/maps/PORIN_PROXY`). The datapath's other maps the proxy uses
    /// (the UDP SOCKMAP, the FQDN map, conntrack) are pinned beside it.
    pub sockmap: PathBuf,
    /// Which flows the datapath hands to it.
    pub protocol: ListenerProtocol,
}

impl Transparent {
    /// A map pinned beside the SOCKMAP.
    pub fn map(&self, name: &str) -> PathBuf {
        self.sockmap.parent().unwrap_or(Path::new(".")).join(name)
    }
}

/// The protocol of a transparent listener: the datapath hands it the flows whose policy has rules
/// of that kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1, h2c, gRPC.
    Http,
    /// DNS over UDP and TCP (one UDP socket and one TCP listener on the same address).
    Dns,
    /// Kafka.
    Kafka,
    /// The mTLS tunnel's source side: flows to other nodes' endpoints that want them
    /// authenticated, relayed through the tunnel (needs the `tunnel` section).
    Tunnel,
}

impl ListenerProtocol {
    /// The listener id policy entries carry for it (`redirect_common::listener`).
    pub fn id(self) -> u8 {
        match self {
            Self::Http => redirect_common::listener::HTTP,
            Self::Dns => redirect_common::listener::DNS,
            Self::Kafka => redirect_common::listener::KAFKA,
            Self::Tunnel => redirect_common::listener::TUNNEL,
        }
    }
}

/// Limits and timeouts. Every field has a default; times are in milliseconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line + headers; HTTP/2 header list), bytes. Over it: 431.
    pub max_header_bytes: usize,
    /// A request head must arrive within this time; it is also how long an idle HTTP/1
    /// keep-alive connection is kept.
    pub header_read_timeout_ms: u64,
    /// An HTTP/2 connection with no open stream and no traffic is closed after this time.
    pub idle_timeout_ms: u64,
    /// The upstream must answer (response head) within this time: 504 otherwise.
    pub request_timeout_ms: u64,
    /// Connecting to the upstream.
    pub connect_timeout_ms: u64,
    /// Client connections the process holds. At the limit the oldest idle connection of the
    /// heaviest source is closed to make room; only when every connection is busy is a new one
    /// refused. Also capped by the file-descriptor limit (see `docs/config.md`).
    pub max_connections: usize,
    /// Client connections one source address (one pod) holds; at the cap its own oldest idle
    /// connection makes room, or the new one is refused.
    pub max_connections_per_source: usize,
    /// Idle timeouts (keep-alive, HTTP/2 idle) shrink towards this as the process nears
    /// `max_connections` (from 80 % of it).
    pub min_idle_timeout_ms: u64,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// The body of a denied HTTP/1 request is read and discarded up to this size so that the
    /// connection stays usable; larger bodies close it.
    pub max_denied_body_drain: usize,
    /// HTTP/1 requests in flight per upstream pool (one destination, one client address), each
    /// on its own connection; more wait for one to come free (within `request_timeout_ms`).
    pub upstream_max_connections: usize,
    /// Idle pooled upstream connections are closed after this time.
    pub upstream_idle_timeout_ms: u64,
    /// A Kafka connection with no request owed an answer and no traffic is closed after this time
    /// (Kafka brokers' own `connections.max.idle.ms` default); shrinks under pressure like the others.
    pub kafka_idle_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            header_read_timeout_ms: 30_000,
            idle_timeout_ms: 300_000,
            request_timeout_ms: 60_000,
            connect_timeout_ms: 5_000,
            max_connections: 20_000,
            max_connections_per_source: 10_000,
            min_idle_timeout_ms: 1_000,
            max_concurrent_streams: 256,
            max_denied_body_drain: 64 * 1024,
            upstream_max_connections: 1024,
            upstream_idle_timeout_ms: 15_000,
            kafka_idle_timeout_ms: 540_000,
        }
    }
}

impl Limits {
    /// As a duration.
    pub fn kafka_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.kafka_idle_timeout_ms)
    }
    /// As a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    /// As a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    /// As a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    /// As a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// As a duration.
    pub fn upstream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_idle_timeout_ms)
    }
    /// As a duration.
    pub fn min_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.min_idle_timeout_ms)
    }
}

/// A configuration error, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ProxyConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    /// Parses and checks a configuration text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Self = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        if self.listeners.is_empty() {
            return Err("listeners: at least one listener is needed".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if let PeerRef::Pod(p) = &l.source
                && !p.contains('/')
            {
                return Err(format!("listeners[{i}].source.pod: {p:?} must be namespace/name"));
            }
            if let PeerRef::Pod(p) = &l.destination
                && !p.contains('/')
            {
                return Err(format!("listeners[{i}].destination.pod: {p:?} must be namespace/name"));
            }
            if self.listeners.iter().take(i).any(|o| o.name == l.name) {
                return Err(format!("listeners[{i}].name: {:?} is used twice", l.name));
            }
            match (&l.upstream, &l.transparent) {
                (None, None) => return Err(format!("listeners[{i}]: an upstream is needed (or transparent)")),
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "listeners[{i}]: a transparent listener forwards to the original destination, not to an upstream"
                    ));
                }
                (None, Some(_)) if l.source != PeerRef::Socket || l.destination != PeerRef::Socket => {
                    return Err(format!(
                        "listeners[{i}]: a transparent listener takes source and destination from the socket (source: socket, destination: socket)"
                    ));
                }
                _ => {}
            }
        }
        let lim = &self.limits;
        if lim.max_header_bytes < 1024 {
            return Err("limits.max_header_bytes: at least 1024".into());
        }
        if lim.max_connections == 0
            || lim.max_connections_per_source == 0
            || lim.max_concurrent_streams == 0
            || lim.upstream_max_connections == 0
        {
            return Err("limits: max_connections, max_connections_per_source, max_concurrent_streams and upstream_max_connections must be positive".into());
        }
        if lim.header_read_timeout_ms == 0 || lim.request_timeout_ms == 0 || lim.connect_timeout_ms == 0 {
            return Err("limits: timeouts must be positive".into());
        }
        if self.dns.forward_timeout_ms == 0 || self.dns.max_inflight == 0 {
            return Err("dns: forward_timeout_ms and max_inflight must be positive".into());
        }
        Ok(())
    }
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let cfg = ProxyConfig::parse(
            "snapshot: /run/porin/snapshot.json\nlisteners:\n- name: deathstar\n  listen: 127.0.0.1:0\n  upstream: 127.0.0.1:8080\n  source: {pod: default/xwing}\n  destination: {pod: default/deathstar}\n  port: 80\n- name: world\n  listen: 127.0.0.1:0\n  upstream: 127.0.0.1:8080\n  source: {identity: 2}\n  destination: {ip: 10.0.0.2}\nlimits: {max_header_bytes: 8192}\n",
        )
        .unwrap();
        assert_eq!(cfg.listeners[0].source, PeerRef::Pod("default/xwing".into()));
        assert_eq!(cfg.listeners[0].port, Some(80));
        assert_eq!(cfg.listeners[1].upstream, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(cfg.limits.max_header_bytes, 8192);
        assert_eq!(cfg.limits.request_timeout_ms, 60_000);
    }

    #[test]
    fn errors_name_the_field() {
        let e = ProxyConfig::parse("snapshot: x\nlisteners:\n- name: a\n  listen: 127.0.0.1:0\n  upstream: 127.0.0.1:1\n  source: {pod: xwing}\n  destination: socket\n").unwrap_err();
        assert!(e.contains("listeners[0].source.pod"), "{e}");
        let e = ProxyConfig::parse("snapshot: x\nlisteners: []\nbogus: 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = ProxyConfig::parse("snapshot: x\nlisteners:\n- {name: t, listen: \"0.0.0.0:1\", transparent: {sockmap: /x, protocol: http}, source: {identity: 2}, destination: socket}\n").unwrap_err();
        assert!(e.contains("source: socket"), "{e}");
        let ok = ProxyConfig::parse("snapshot: x\nlisteners:\n- {name: t, listen: \"0.0.0.0:1\", transparent: {sockmap: /x, protocol: http}, source: socket, destination: socket}\n").unwrap();
        assert_eq!(
            ok.listeners[0].transparent.as_ref().map(|t| t.protocol.id()),
            Some(redirect_common::listener::HTTP)
        );
    }
}
