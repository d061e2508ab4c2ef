//! Porin's L7 proxy: per-request HTTP/1.1, HTTP/2 and gRPC policy on compiled snapshots.
//!
//! One proxy process runs per node, apart from the agent, so agent restarts never touch L7
//! traffic. It reads the policy inputs the agent publishes ([`snapshot`]), resolves them with the
//! same engine the agent uses, and keeps enforcing the last good snapshot when the agent is gone.
//!
//! A listener knows who the client is and which destination it reaches: from its configuration
//! (explicit listeners), or from the accepted socket's own addresses (transparent listeners, the
//! flows the kernel datapath hands over). On accept the connection is admitted per source
//! ([`admission`]) and its L3/L4 verdict taken for both ends (`policy_engine::pair`); per request,
//! the L7 verdict on the normalised request ([`normalize`], [`head`]). HTTP/1 framing is checked
//! strictly before hyper sees a byte ([`h1guard`]); HTTP/2 is h2c with prior knowledge.
//! Every request and response leaves a Hubble-shaped flow record (`porin_flow::flow`, through
//! [`records`]).

pub mod h1guard;
pub mod normalize;

pub mod admission;
pub mod balance;
pub mod config;
pub mod control;
pub mod dns;
pub mod forward;
pub mod fqdn;
pub mod head;
pub mod kafka;
pub mod log_limit;
pub mod metrics;
pub mod policy;
pub mod records;
pub mod reply;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod transparent;
pub mod tunnel;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::admission::{ConnTable, TableLimits};
use crate::config::{ListenerConfig, ListenerProtocol, ProxyConfig};
use crate::fqdn::{FqdnDatapath, FqdnState};
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
    /// Where `/metrics` is served.
    pub metrics: Option<SocketAddr>,
}

impl ProxyInfo {
    /// The counters, with the connection table's.
    pub fn counters(&self) -> records::CounterValues {
        let shed = self.shared.conns.shed_total.load(std::sync::atomic::Ordering::Relaxed);
        let records = &self.shared.records;
        self.shared.counters.values(shed, records.evicted(), records.log_errors())
    }
}

/// What the process that runs the proxy gives it of the datapath (`porin proxy` passes both; a
/// proxy with explicit listeners only needs neither).
#[derive(Default)]
pub struct Hooks {
    /// Announces transparent sockets to the datapath.
    pub register: Option<transparent::Register>,
    /// The kernel's FQDN map and conntrack, for the DNS proxy.
    pub fqdn: Option<Arc<dyn FqdnDatapath>>,
    /// The kernel's socket load balancer, for the L7 one: which connections asked for a service.
    pub translations: Option<Arc<dyn balance::Translations>>,
    /// The metrics socket, already bound (by `porin proxy`, before it enters its network namespace,
    /// so the metrics are reachable from where it was started); else `metrics` is bound here.
    pub metrics_socket: Option<std::net::TcpListener>,
}

/// A running proxy; dropping it stops it.
pub struct Proxy {
    /// Its state.
    pub info: Arc<ProxyInfo>,
    tasks: Vec<JoinHandle<()>>,
    dns_threads: Vec<dns::udp::DnsThread>,
    control: Option<PathBuf>,
}

impl Proxy {
    /// Loads the published snapshot (if there is one), binds every (explicit) listener and the
    /// control socket, and starts serving. Call within a Tokio runtime. A configuration with
    /// transparent listeners needs [`Proxy::start_with`].
    pub async fn start(cfg: ProxyConfig) -> std::io::Result<Self> {
        Self::start_with(cfg, Hooks::default()).await
    }

    /// As [`Proxy::start`], with the datapath's hooks: transparent listeners are announced with
    /// `hooks.register`; what the DNS proxy learns goes into the kernel through `hooks.fqdn`.
    pub async fn start_with(cfg: ProxyConfig, hooks: Hooks) -> std::io::Result<Self> {
        let register = hooks.register.clone();
        let policy = Arc::new(PolicyState::new(&cfg.snapshot));
        if cfg.snapshot.exists() {
            match snapshot::load(&cfg.snapshot) {
                Ok(s) => policy.install(s),
                Err(e) => policy.reject(e),
            }
        } else {
            tracing::warn!(path = %cfg.snapshot.display(), "no policy snapshot published yet: denying every request until one is");
        }
        let conns = ConnTable::new(TableLimits {
            max: connection_budget(cfg.limits.max_connections),
            per_source: cfg.limits.max_connections_per_source,
            min_idle: cfg.limits.min_idle_timeout(),
        });
        let shared = Arc::new(Shared {
            policy: policy.clone(),
            upstreams: Upstreams::default(),
            conns,
            descriptions: policy::Descriptions::default(),
            records: Records::start(cfg.flow_log.as_deref(), cfg.flow_records)?,
            counters: Counters::default(),
            limits: cfg.limits.clone(),
            fqdn: Arc::new(FqdnState::new(hooks.fqdn.clone(), cfg.dns.cache_file.clone())),
            dns: cfg.dns.clone(),
            kafka_topic_ids: kafka::request::TopicIds::default(),
            backends: balance::Backends::default(),
            translations: hooks.translations.clone(),
            tunnel: cfg.tunnel.clone().map(|t| {
                // Streams whose destination's rules need HTTP (Kafka) are served as the HTTP
                // (Kafka) listener serves a connection (its transparent upstreams).
                let transparent = |protocol: ListenerProtocol| {
                    cfg.listeners
                        .iter()
                        .find(|l| l.transparent.as_ref().is_some_and(|x| x.protocol == protocol))
                        .cloned()
                        .map(Arc::new)
                };
                let (http, kafka) = (transparent(ListenerProtocol::Http), transparent(ListenerProtocol::Kafka));
                Arc::new(tunnel::Tunnel::new(t, http, kafka, cfg.limits.connect_timeout()))
            }),
        });
        // What was learned before (the cache file, the pinned kernel map) made to agree with the
        // snapshot in force before the first query is served.
        if let Some(snap) = policy.current()
            && let Err(e) = shared.fqdn.sync_to(&snap)
        {
            tracing::warn!(error = %e, "FQDN map not in sync with the cache; retried with every snapshot");
        }
        let mut tasks = Vec::new();
        let mut dns_threads = Vec::new();
        let mut listeners = Vec::new();
        for l in &cfg.listeners {
            let err =
                |e: std::io::Error| std::io::Error::new(e.kind(), format!("listener {} on {}: {e}", l.name, l.listen));
            let la = Arc::new(l.clone());
            match (&l.transparent, &register) {
                (Some(t), Some(register)) if t.protocol == ListenerProtocol::Dns => {
                    // DNS: a UDP socket and a TCP listener on the same address.
                    let v6 = l.listen.is_ipv6();
                    let udp = dns::udp::listen(l.listen).map_err(err)?;
                    register(t, transparent::Announce::Udp(&udp), v6).map_err(err)?;
                    let tcp = transparent::listen(udp.local_addr()?).map_err(err)?;
                    register(t, transparent::Announce::Tcp(&tcp), v6).map_err(err)?;
                    listeners.push((la.clone(), tcp.local_addr()?));
                    tracing::info!(listener = %l.name, "listening (DNS, UDP and TCP)");
                    dns_threads.push(dns::udp::DnsThread::start(shared.clone(), la.clone(), udp).map_err(err)?);
                    tasks.push(tokio::spawn(dns::tcp::accept_loop(shared.clone(), la, tcp)));
                }
                (Some(t), Some(register)) => {
                    let sock = transparent::listen(l.listen)
                        .and_then(|sock| {
                            register(t, transparent::Announce::Tcp(&sock), l.listen.is_ipv6()).map(|()| sock)
                        })
                        .map_err(err)?;
                    listeners.push((la.clone(), sock.local_addr()?));
                    tracing::info!(listener = %l.name, "listening (transparent)");
                    tasks.push(tokio::spawn(server::accept_loop(shared.clone(), la, sock)));
                }
                (Some(_), None) => return Err(err(std::io::Error::other("a transparent listener needs the datapath"))),
                (None, _) => {
                    let sock = tokio::net::TcpListener::bind(l.listen).await.map_err(err)?;
                    listeners.push((la.clone(), sock.local_addr()?));
                    tracing::info!(listener = %l.name, upstream = ?l.upstream, "listening");
                    tasks.push(tokio::spawn(server::accept_loop(shared.clone(), la, sock)));
                }
            }
        }
        if let Some(t) = &shared.tunnel {
            for addr in &t.config.listen {
                let sock = tunnel::server::bind(*addr)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("tunnel listener on {addr}: {e}")))?;
                tracing::info!(address = %sock.local_addr()?, "tunnel listening");
                tasks.push(tokio::spawn(tunnel::server::accept_loop(shared.clone(), t.clone(), sock)));
            }
            let every = Duration::from_millis(t.config.credentials_poll_ms.max(10));
            tasks.push(tokio::spawn(tunnel::credentials::follow(t.tls.clone(), t.config.credentials.clone(), every)));
        }
        tasks.push(tokio::spawn(sweep(shared.clone())));
        tasks.push(tokio::spawn(fqdn_upkeep(shared.clone())));
        let every = Duration::from_millis(cfg.snapshot_poll_ms.max(10));
        tasks.push(tokio::spawn(snapshot::follow(policy, cfg.snapshot.clone(), every)));
        let metrics_socket = match (hooks.metrics_socket, cfg.metrics) {
            (Some(s), _) => {
                s.set_nonblocking(true)?;
                Some(tokio::net::TcpListener::from_std(s)?)
            }
            (None, Some(addr)) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| std::io::Error::new(e.kind(), format!("metrics on {addr}: {e}")))?,
            ),
            (None, None) => None,
        };
        let metrics = match metrics_socket {
            Some(sock) => {
                let bound = sock.local_addr()?;
                tracing::info!(address = %bound, "serving metrics");
                let refresh = {
                    let shared = shared.clone();
                    move || {
                        // What was handed over is counted before it is shown.
                        shared.records.flush();
                        let version = shared.policy.current().map_or(0, |s| s.version);
                        shared.records.metrics.policy_version(version);
                        let age = shared.policy.age().map_or(0.0, |a| a.as_secs_f64());
                        shared.records.metrics.proxy_state(shared.conns.len(), age);
                    }
                };
                tasks.push(tokio::spawn(serve_metrics(shared.records.metrics.clone(), sock, refresh)));
                Some(bound)
            }
            None => None,
        };
        let info = Arc::new(ProxyInfo { shared, listeners, metrics });
        if let Some(path) = &cfg.control_socket {
            let sock = porin_flow::control::bind(path)?;
            tasks.push(tokio::spawn(porin_flow::control::serve(sock, info.clone())));
        }
        Ok(Self { info, tasks, dns_threads, control: cfg.control_socket.clone() })
    }

    /// The address listener `name` is bound to.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.info.listeners.iter().find(|(l, _)| l.name == name).map(|(_, a)| *a)
    }
}

/// `GET /metrics` on `sock`: the metrics as OpenMetrics text when the scraper asks for it, else
/// Prometheus' 0.0.4 text; anything else 404. `refresh` runs before each rendering (values read
/// from elsewhere). (The agent serves its own with this too.)
pub async fn serve_metrics(
    metrics: Arc<porin_flow::metrics::HubbleMetrics>,
    sock: tokio::net::TcpListener,
    refresh: impl Fn() + Clone + Send + Sync + 'static,
) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode};
    loop {
        let Ok((stream, _)) = sock.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                refresh();
                async move {
                    let openmetrics = req
                        .headers()
                        .get_all(hyper::header::ACCEPT)
                        .iter()
                        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
                    let resp = if req.uri().path() != "/metrics" {
                        Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(bytes::Bytes::new()))
                    } else if openmetrics {
                        Response::builder()
                            .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                            .body(Full::new(bytes::Bytes::from(metrics.render())))
                    } else {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(bytes::Bytes::from(metrics.render_text())))
                    };
                    Ok::<_, std::convert::Infallible>(resp.unwrap_or_default())
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

/// Descriptors kept free of client connections: upstream connections, the control socket, files.
const FD_RESERVE: usize = 1024;

/// `max_connections`, within what the file-descriptor limit allows (every client connection is a
/// descriptor, and so is its upstream connection while a request is in flight).
fn connection_budget(configured: usize) -> usize {
    let nofile =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(soft, _)| soft);
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
    let budget = configured.min(nofile.saturating_sub(FD_RESERVE).max(64));
    if budget < configured {
        tracing::warn!(configured, budget, nofile, "max_connections lowered to fit the file-descriptor limit");
    } else if nofile / 2 < configured {
        tracing::info!(
            nofile,
            max_connections = configured,
            "The file-descriptor limit is below twice max_connections: with many busy upstreams, accepts may fail (and are retried)"
        );
    }
    budget
}

/// Every half second: connections idle past their (pressure-scaled) timeout are let go, idle
/// upstream connections past theirs closed, unused pools dropped.
async fn sweep(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let h1 = shared.limits.header_read_timeout();
    // HTTP/2 closes politely (GOAWAY) at its idle timeout; this is the backstop, and what
    // shrinks under pressure.
    let h2 = shared.limits.idle_timeout() + shared.limits.idle_timeout().min(Duration::from_secs(10));
    let kafka = shared.limits.kafka_idle_timeout();
    loop {
        tick.tick().await;
        let gone = shared.conns.sweep(|kind| match kind {
            admission::ConnKind::Http1 => h1,
            admission::ConnKind::Http2 => h2,
            admission::ConnKind::Kafka => kafka,
        });
        if gone > 0 {
            tracing::debug!(gone, "idle connections let go");
        }
        shared.upstreams.sweep();
        if let Some(tls) = shared.tunnel.as_ref().and_then(|t| t.tls.current().map(|tls| (t, tls))) {
            tls.0.client.sweep(tls.1.generation);
        }
        // Backends that left every service are forgotten (connections holding one keep it).
        if let Some(snap) = shared.policy.current() {
            shared.backends.retain_in(&snap);
        }
    }
}

/// What the DNS proxy learned, kept current: re-derived for each new snapshot (within a quarter
/// second; a query in between derives it first), expired and persisted every second.
async fn fqdn_upkeep(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let s = shared.clone();
        let work = tokio::task::spawn_blocking(move || {
            if let Some(snap) = s.policy.current()
                && let Err(e) = s.fqdn.sync_to(&snap)
            {
                crate::log_limited!(warn, error = %e, "FQDN map not in sync; retrying");
            }
            if n.is_multiple_of(4) {
                s.fqdn.expire();
                s.fqdn.persist();
            }
        });
        if let Err(e) = work.await {
            crate::log_limited!(warn, error = %e, "FQDN upkeep failed");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.dns_threads.clear();
        // Records handed over reach the flow log before the process goes.
        self.info.shared.records.flush();
        self.info.shared.fqdn.persist();
        if let Some(p) = &self.control {
            let _ = std::fs::remove_file(p);
        }
    }
}
