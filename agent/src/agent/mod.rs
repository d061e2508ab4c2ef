//! `porin agent`: reads endpoints and policies, resolves them, keeps the kernel maps in step, attaches
//! the datapath to endpoints, publishes the policy inputs for the proxy, and serves the control
//! protocol (status, flows, reload, counters, detach).
//!
//! Inputs (standalone mode, [`inputs`]): an endpoints file and a policy directory, watched. A policy
//! file that fails to load keeps its last good version enforcing; its error is reported in `status`,
//! the log and a flow record. The agent never detaches on exit: enforcement continues with the
//! pinned maps and links until `porin lab down` (or `detach`) removes them.
//!
//! Shape: one thread, the [`reloader`], owns the datapath and the policy state and does every
//! blocking job (resolving, bpf syscalls, publishing); the async runtime drains kernel events into
//! the flow backlog, serves the control socket and watches the inputs, reading only the shared
//! view. A reload never stalls them.

pub mod inputs;
mod kubernetes;
mod reloader;
mod routes;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use porin_datapath::events::{self, Events};
use porin_datapath::loader::{Datapath, Settings, ensure_bpffs};
use porin_flow::control::{self, Handler, Reply, Request};
use porin_flow::flow::Verdict;
use porin_flow::metrics::HubbleMetrics;
use porin_hubble::ring::{FlowRing, LostSource};
use porin_hubble::server::{HubbleServer, Listener};
use tokio::sync::oneshot;

use self::inputs::Source;
pub use self::inputs::{EndpointSpec, EndpointsFile, InputsConfig, NamedPortSpec, NodeSpec, environment, publish};
use self::reloader::{Job, Reloader, View};

/// The most flow records one `flows` query returns.
const FLOWS_PAGE: usize = 8192;
/// How long the agent waits before following a proxy that is not there (yet, or again).
const PROXY_RETRY: Duration = Duration::from_millis(100);
/// How long a catch-up waits for the stream to bring what the proxy had.
const CATCHUP_WAIT: Duration = Duration::from_secs(2);

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// bpffs directory for pins.
    pub bpffs: PathBuf,
    /// Where the endpoints and policies come from.
    pub inputs: InputsConfig,
    /// Control socket path.
    pub control: PathBuf,
    /// Where the policy inputs of every applied version are published for the L7 proxy.
    pub publish: Option<PathBuf>,
    /// Datapath settings.
    pub settings: Settings,
    /// The node's name (Hubble's `node_name`).
    pub node_name: String,
    /// How many flow records the node's ring keeps.
    pub flow_ring: usize,
    /// The proxy's control socket: its records join the node's ring (and Hubble's API).
    pub proxy_control: Option<PathBuf>,
    /// Serve Hubble's Observer API on this Unix socket.
    pub hubble: Option<PathBuf>,
    /// Every endpoint's policy in audit mode (Cilium's `policy-audit-mode`).
    pub policy_audit_mode: bool,
    /// Export the node's flows to a file.
    pub export: Option<porin_hubble::export::ExportConfig>,
    /// The cgroup (v2) whose processes' connects and sends to services are balanced (none: off).
    pub cgroup: Option<PathBuf>,
    /// Keep the node's mesh credentials (none: no mTLS tunnel).
    pub mesh: Option<crate::mesh::MeshSettings>,
}

/// Sockets the caller bound before entering the agent's network namespace (so they are reachable
/// from the machine).
#[derive(Debug, Default)]
pub struct Sockets {
    /// `GET /metrics`.
    pub metrics: Option<std::net::TcpListener>,
    /// Hubble's Observer API over TCP.
    pub hubble: Option<std::net::TcpListener>,
    /// The service map.
    pub ui: Option<std::net::TcpListener>,
}

/// The agent's side of the control protocol: reads from the view, hands kernel work to the
/// reloader and waits for its answer.
struct Control {
    view: Arc<View>,
    jobs: Sender<Job>,
    /// Where `/metrics` is served.
    metrics: Option<std::net::SocketAddr>,
    /// Where Hubble's API is served: `unix:PATH`, `HOST:PORT`.
    hubble: Vec<String>,
    /// Where the service map is served.
    ui: Option<std::net::SocketAddr>,
    /// The flow exporter's file and figures.
    export: Option<(PathBuf, Arc<porin_hubble::export::Exporter>)>,
    node_name: String,
}

impl Control {
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<anyhow::Result<T>>) -> Job) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(job(tx)).map_err(|_| anyhow!("the reloader is gone"))?;
        rx.await.map_err(|_| anyhow!("the reloader dropped the request"))?
    }
}

impl Handler for Control {
    async fn handle(&self, request: Request) -> Reply {
        let result = match request {
            Request::Status => {
                let ring = self.view.flows.status();
                let view = self.view.lock();
                let mut status = view.status.clone();
                if let Some(s) = status.as_object_mut() {
                    s.insert(
                        "records".into(),
                        serde_json::json!({
                            "kept": ring.num_flows,
                            "capacity": ring.max_flows,
                            "seen": ring.seen_flows,
                            "evicted": ring.evicted,
                            "events_undecodable": view.events_undecodable,
                        }),
                    );
                    s.insert("metrics".into(), serde_json::json!(self.metrics.map(|a| a.to_string())));
                    s.insert("hubble".into(), serde_json::json!(self.hubble));
                    s.insert("ui".into(), serde_json::json!(self.ui.map(|a| a.to_string())));
                    s.insert(
                        "export".into(),
                        serde_json::json!(self.export.as_ref().map(|(path, x)| serde_json::json!({
                            "path": path, "written": x.written(), "lost": x.lost(), "failed": x.failed(),
                        }))),
                    );
                    s.insert("node_name".into(), serde_json::json!(self.node_name));
                }
                Ok(Reply::Status(status))
            }
            Request::Flows { after, limit } => {
                let read = self.view.flows.after(after, limit.unwrap_or(FLOWS_PAGE));
                // A page the limit cut: the reader goes on from its last flow, not the newest.
                let last = read.flows.last().map_or(read.last, |(n, _)| *n);
                let flows = read.flows.into_iter().map(|(_, f)| f).collect();
                Ok(Reply::Flows { epoch: self.view.flows.epoch(), last, missed: read.missed, flows })
            }
            Request::Reload => self.ask(|tx| Job::Reload(Some(tx))).await,
            Request::Counters => self.ask(Job::Counters).await.map(|counters| Reply::Counters { counters }),
            Request::Detach { ifname } => self.ask(|tx| Job::Detach(ifname, tx)).await.map(|()| Reply::Done),
            Request::FqdnCache => Err(anyhow::anyhow!("the agent does not keep the FQDN cache: ask the proxy")),
            // Taken by the server loop before it gets here (the agent has no flow source).
            Request::FlowStream { .. } => Err(anyhow::anyhow!("follow the agent's flows with Hubble's API")),
        };
        result.unwrap_or_else(|e| Reply::error(format!("{e:#}")))
    }
}

/// Counts a kernel flow into the metrics: flows processed (L3/L4) and drops by reason.
fn count(metrics: &HubbleMetrics, f: &porin_flow::flow::Flow) {
    use porin_flow::flow::{DropReason, EventType, TrafficDirection};
    let l4 = f.l4.as_ref().map_or("", porin_flow::flow::Layer4::name);
    m_flow(metrics, l4, f.verdict.name());
    if f.verdict == Verdict::Dropped {
        metrics.drop(f.drop_reason.map_or("UNKNOWN_REASON", |d| d.name()), l4);
    }
    // Policy verdicts: the kernel's verdict events, and its policy drops and audits.
    let policy_drop = matches!(f.drop_reason, Some(DropReason::PolicyDenied | DropReason::PolicyDeny));
    if f.event_type == EventType::PolicyVerdict || policy_drop {
        let direction = match f.traffic_direction {
            TrafficDirection::Ingress => "ingress",
            TrafficDirection::Egress => "egress",
            TrafficDirection::Unknown => "unknown",
        };
        let action = match f.verdict {
            Verdict::Dropped => "dropped",
            Verdict::Audit => "audit",
            Verdict::Redirected => "redirected",
            _ => "forwarded",
        };
        metrics.policy_verdict(direction, if f.policy.is_some() { "l3-l4" } else { "none" }, action);
    }
}

fn m_flow(metrics: &HubbleMetrics, l4: &'static str, verdict: &'static str) {
    let protocol = match l4 {
        "TCP" => "tcp",
        "UDP" => "udp",
        "ICMPv4" => "icmpv4",
        "ICMPv6" => "icmpv6",
        "SCTP" => "sctp",
        _ => "other",
    };
    metrics.flow(protocol, "L3_L4", "", verdict);
}

/// Every second: what the metrics take from elsewhere — events the kernel's ring buffer lost (its
/// counter), events that did not decode, the policy version in force.
async fn follow_counters(metrics: Arc<HubbleMetrics>, view: Arc<View>, jobs: Sender<Job>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The kernel's count when the ring last heard of it (none yet: what was lost before this
    // agent started is in the metric, not in the ring).
    let mut told: Option<u64> = None;
    loop {
        tick.tick().await;
        let (tx, rx) = oneshot::channel();
        if jobs.send(Job::Counters(tx)).is_err() {
            return;
        }
        if let Ok(Ok(c)) = rx.await {
            let lost = c.get("events_lost").copied().unwrap_or(0);
            metrics.lost_events("perf_event_ring_buffer", lost);
            // Followers of Hubble's API are told too, where in the flows it was noticed.
            if let Some(before) = told {
                view.flows.lost(LostSource::PerfEventRingBuffer, lost.saturating_sub(before));
            }
            told = Some(lost);
        }
        let (undecodable, version, apply, publish_failures) = {
            let v = view.lock();
            let last = &v.status["last_apply"];
            let n = |k: &str| last[k].as_u64().and_then(|n| usize::try_from(n).ok());
            let apply = n("micros").map(|us| (us as f64 / 1e6, n("policy_entries"), n("ipcache_entries")));
            let failures = v.status["publish"]["failures"].as_u64().unwrap_or(0);
            (v.events_undecodable, v.status["version"].as_u64().unwrap_or(0), apply, failures)
        };
        metrics.lost_events("undecodable", undecodable);
        metrics.policy_version(version);
        if let Some((seconds, policy, ipcache)) = apply {
            metrics.applied(seconds, policy.unwrap_or(0), ipcache.unwrap_or(0));
        }
        metrics.publish_failures(publish_failures);
    }
}

/// Moves datapath events into the flow backlog (and counts them in the metrics).
async fn read_events(view: Arc<View>, events: Events, metrics: Arc<HubbleMetrics>) -> anyhow::Result<()> {
    // The AsyncFd owns the ring buffer, which owns the fd: it stays open for as long as it is
    // registered, which is what `register`'s safety contract asks for.
    #[expect(deprecated, reason = "`register` is the same call marked unsafe; the fd is owned by the wrapped value")]
    let mut fd = tokio::io::unix::AsyncFd::new(events).context("poll the event ring buffer")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let drained = guard.get_inner_mut().drain();
        guard.clear_ready();
        if drained.events.is_empty() && drained.undecodable == 0 {
            continue;
        }
        let snap = {
            let mut v = view.lock();
            v.events_undecodable += drained.undecodable;
            v.snapshot.clone()
        };
        view.flows.push_each(drained.events, |seq, e| {
            let f = events::from_event(seq, &e, snap.as_deref());
            count(&metrics, &f);
            if f.verdict == Verdict::Dropped {
                // Every drop is a flow record and a counter; the log only says that drops happen.
                proxy::log_limited!(info, flow = %crate::render::text(&f), "Packet dropped");
            }
            f
        });
    }
}

/// Moves the proxy's flow records into the node's ring: a thread follows the proxy's record
/// stream (`porin_flow::stream`), connecting again whenever the proxy is not there (yet, or
/// restarting). What the proxy's backlog let go before the stream reached it is counted
/// (`hubble_lost_events_total{source="observer_events_queue"}`); a restarted proxy (a new epoch) is
/// read from its first record.
/// A request on `catchup` (from Hubble's API) asks the proxy for its newest number and is
/// answered once the stream brought the ring that far (or after [`CATCHUP_WAIT`]).
async fn follow_proxy(
    ring: Arc<FlowRing>,
    socket: PathBuf,
    metrics: Arc<HubbleMetrics>,
    mut catchup: tokio::sync::mpsc::Receiver<oneshot::Sender<()>>,
) {
    let (reached, watch) = tokio::sync::watch::channel((0, 0));
    let mut follower = ProxyFollower { ring, socket: socket.clone(), metrics, reached, epoch: 0, after: 0, lost: 0 };
    let started = std::thread::Builder::new().name("proxy-records".into()).spawn(move || follower.run());
    if let Err(e) = started {
        tracing::error!(error = %e, "No thread to follow the proxy's records: L7 flows stay out of the ring");
        return;
    }
    while let Some(done) = catchup.recv().await {
        let (socket, mut watch) = (socket.clone(), watch.clone());
        tokio::spawn(async move {
            let s = socket.clone();
            // Only the newest number: no records.
            let asked = tokio::task::spawn_blocking(move || {
                control::call(&s, &Request::Flows { after: u64::MAX, limit: Some(0) })
            })
            .await;
            if let Ok(Ok(Reply::Flows { epoch, last, .. })) = asked {
                let there = watch.wait_for(|&(e, seq)| e == epoch && seq >= last);
                if tokio::time::timeout(CATCHUP_WAIT, there).await.is_err() {
                    tracing::debug!(last, "The proxy's records did not reach the ring in time");
                }
            }
            // The asker may have given up waiting: nothing is lost.
            let _ = done.send(());
        });
    }
}

/// The agent's side of the proxy's record stream: where it is in it.
struct ProxyFollower {
    ring: Arc<FlowRing>,
    socket: PathBuf,
    metrics: Arc<HubbleMetrics>,
    /// `(epoch, number)` of the newest record in the ring.
    reached: tokio::sync::watch::Sender<(u64, u64)>,
    epoch: u64,
    after: u64,
    lost: u64,
}

impl ProxyFollower {
    fn run(&mut self) {
        loop {
            match porin_flow::stream::StreamReader::connect(&self.socket, self.after, self.epoch) {
                Ok(mut stream) => loop {
                    match stream.next_batch() {
                        Ok(batch) => self.take(batch),
                        Err(e) => {
                            proxy::log_limited!(info, error = %e, "The proxy's record stream ended; following it again");
                            break;
                        }
                    }
                },
                // Not there (yet, or restarting): quietly again. Refused (every stream slot
                // taken): L7 flows are missing from the ring meanwhile, so say so.
                Err(e @ porin_flow::stream::StreamError::Refused { .. }) => {
                    proxy::log_limited!(warn, error = %e, "The proxy refuses its record stream; asking again")
                }
                Err(e) => tracing::debug!(error = %e, "The proxy's record stream is not there"),
            }
            std::thread::sleep(PROXY_RETRY);
        }
    }

    fn take(&mut self, batch: porin_flow::stream::Batch) {
        // A fresh agent reads what the proxy still holds: what it let go before is history, not
        // a loss of this ring.
        let fresh = self.epoch == 0;
        if batch.epoch != self.epoch {
            if self.epoch != 0 {
                tracing::info!("The proxy restarted: reading its records from the first");
            }
            self.epoch = batch.epoch;
        }
        let (missed, after) =
            (if fresh { 0 } else { batch.missed }, batch.records.last().map_or(batch.last, |r| r.seq));
        let (flows, errors) = batch.into_flows();
        let lost = missed + u64::try_from(errors.len()).unwrap_or(u64::MAX);
        if lost > 0 {
            self.lost += lost;
            self.metrics.lost_events("observer_events_queue", self.lost);
            self.ring.lost(LostSource::ObserverEventsQueue, lost);
            proxy::log_limited!(warn, missed, "Proxy flow records were let go before the agent read them");
            for e in errors {
                proxy::log_limited!(error, error = %e, "A proxy flow record could not be read");
            }
        }
        self.after = after;
        // A heartbeat brings nothing: followers of the ring are not woken for it.
        if !flows.is_empty() {
            self.ring.extend(flows);
        }
        self.reached.send_replace((self.epoch, self.after));
    }
}

/// Enters a named network namespace (`/run/netns/NAME`). Call before any thread exists.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter network namespace {name}"))
}

/// Where a cgroup2 hierarchy is mounted (the first in `/proc/self/mountinfo`); mounts one at
/// `/run/porin/cgroupv2` when there is none.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    // `id parent major:minor root mountpoint options [optional...] - fstype source super-options`
    let found = info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2").then(|| left.split(' ').nth(4).map(PathBuf::from))?
    });
    if let Some(p) = found {
        return Ok(p);
    }
    let dir = PathBuf::from("/run/porin/cgroupv2");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    nix::mount::mount(Some("cgroup2"), &dir, Some("cgroup2"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mount cgroup2 on {}", dir.display()))?;
    Ok(dir)
}

/// Runs the agent until SIGTERM / SIGINT, serving on `sockets` (bound by the caller before it
/// entered a network namespace) besides its own.
pub fn run(cfg: AgentConfig, sockets: Sockets) -> anyhow::Result<()> {
    ensure_bpffs(&cfg.bpffs)?;
    let mut datapath = Datapath::open(&cfg.bpffs)?;
    datapath.configure(&cfg.settings)?;
    // Proxied flows count on it (a client reusing a port the proxy's socket still holds in
    // TIME_WAIT): no agent runs without it.
    datapath.attach_time_wait_lookup().context("attach the TIME_WAIT listener lookup")?;
    // Services keep working without the socket balancer's programs only for what is already
    // connected: a failure is reported in status (errors), and policy enforces regardless.
    let lb_error = match cfg.cgroup.as_deref() {
        Some(cg) => datapath.attach_cgroup(cg).err().map(|e| {
            tracing::error!(cgroup = %cg.display(), error = %format!("{e:#}"), "Socket load balancing not attached");
            format!("socket load balancing on {}: {e:#}", cg.display())
        }),
        // Off: also what an earlier run attached.
        None => datapath.detach_cgroup().err().map(|e| format!("socket load balancing: detach: {e:#}")),
    };
    let events = datapath.take_events()?;
    let ring = Arc::new(FlowRing::new(cfg.flow_ring));
    let view = Arc::new(View::new(ring.clone()));
    // Versions keep growing across agent restarts: the proxy (and whoever waits for it) can tell a
    // newer publication from an older one.
    let version = cfg.publish.as_deref().map_or(0, inputs::published_version);
    let mut allocator = cfg.publish.as_deref().and_then(inputs::published_identities).unwrap_or_default();
    if matches!(cfg.inputs, InputsConfig::Kubernetes { .. }) {
        // Every node numbers a new label set the same before the cluster's object exists.
        allocator.set_numbering(policy_engine::identity::Numbering::FromLabels);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Without it, what the datapath hands to the proxy is dropped (fails closed, but L7 fails).
    rt.block_on(routes::ensure()).context("the proxy's policy routing")?;
    let (jobs, queue) = channel();
    // Kubernetes mode: the watches fill their stores on this runtime; a change asks for a reload.
    let changed = Arc::new(tokio::sync::Notify::new());
    let mut reporter = None;
    let source = match &cfg.inputs {
        InputsConfig::Files { policies, endpoints } => {
            Source::Files { policies: policies.clone(), endpoints: endpoints.clone() }
        }
        InputsConfig::Kubernetes { kubeconfig, cni_state, identity_gc, .. } => {
            let (cluster, client) = rt.block_on(open_cluster(kubeconfig.as_deref(), changed.clone()))?;
            let (tx, rx) = tokio::sync::watch::channel(porin_kubernetes::report::Report::default());
            let collector = identity_gc.map(|grace| {
                let c = porin_kubernetes::identity::Collector::new(client.clone(), grace);
                (c, cluster.clone(), cfg.node_name.clone())
            });
            reporter = Some((porin_kubernetes::report::Reporter::new(client, &cfg.node_name), collector, tx, rx));
            Source::Kubernetes { cluster, cni_state: cni_state.clone() }
        }
    };
    let report = reporter.as_ref().map(|(_, _, tx, _)| tx.clone());
    let mut reloader = Reloader::new(cfg.clone(), source, report, datapath, version, allocator, view.clone());
    reloader.lb_error = lb_error;
    reloader.reload().context("initial policy load")?;
    reloader.refresh_view();
    let worker = std::thread::Builder::new().name("reloader".into()).spawn(move || reloader.run(queue))?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = match &cfg.mesh {
        Some(m) => {
            let keeper = crate::mesh::Keeper::new(m.clone(), &cfg.node_name).context("mesh credentials")?;
            let (view, stop, node) = (view.clone(), stop.clone(), cfg.node_name.clone());
            Some(std::thread::Builder::new().name("mesh-credentials".into()).spawn(move || {
                keep_credentials(keeper, &view, &node, &stop);
            })?)
        }
        None => None,
    };
    let served = rt.block_on(async {
        let listener = control::bind(&cfg.control).with_context(|| format!("bind {}", cfg.control.display()))?;
        tracing::info!(control = %cfg.control.display(), "Agent ready");
        let metrics = Arc::new(HubbleMetrics::new(porin_flow::metrics::Process::Agent));
        let (metrics_at, metrics_task) = match sockets.metrics {
            Some(s) => {
                s.set_nonblocking(true)?;
                let s = tokio::net::TcpListener::from_std(s)?;
                (Some(s.local_addr()?), Some(tokio::spawn(proxy::serve_metrics(metrics.clone(), s, || {}))))
            }
            None => (None, None),
        };
        // Hubble's API: on a Unix socket and, when the caller bound one, a TCP address.
        let mut listeners = Vec::new();
        if let Some(path) = &cfg.hubble {
            let l = control::bind(path).with_context(|| format!("bind {}", path.display()))?;
            listeners.push((format!("unix:{}", path.display()), Listener::Unix(l)));
        }
        if let Some(s) = sockets.hubble {
            s.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(s)?;
            listeners.push((l.local_addr()?.to_string(), Listener::Tcp(l)));
        }
        let hubble_at: Vec<String> = listeners.iter().map(|(a, _)| a.clone()).collect();
        let mut hubble = HubbleServer::new(ring.clone(), &cfg.node_name, hubble_at.first().map_or("", String::as_str));
        let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        if let Some(p) = &cfg.proxy_control {
            let (catchup, asked) = tokio::sync::mpsc::channel(64);
            hubble = hubble.with_catchup(catchup);
            tasks.push(tokio::spawn(follow_proxy(ring.clone(), p.clone(), metrics.clone(), asked)));
        }
        for (at, l) in listeners {
            let server = hubble.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = porin_hubble::server::serve(server, l).await {
                    tracing::error!(error = %e, at, "Hubble's API stopped");
                }
            }));
        }
        tracing::info!(hubble = ?hubble_at, node = cfg.node_name, "Hubble API ready");
        let mut export = None;
        if let Some(c) = &cfg.export {
            let (figures, task) =
                porin_hubble::export::start(ring.clone(), Arc::from(cfg.node_name.as_str()), c.clone())
                    .context("flow export")?;
            tracing::info!(path = %c.path.display(), "Exporting flows");
            tasks.push(task);
            export = Some((c.path.clone(), figures));
        }
        let mut ui_at = None;
        if let Some(s) = sockets.ui {
            s.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(s)?;
            ui_at = Some(l.local_addr()?);
            tasks.push(tokio::spawn(porin_hubble::ui::serve(ring.clone(), Arc::from(cfg.node_name.as_str()), l)));
            tracing::info!(ui = ?ui_at, "Service map ready");
        }
        let handler = Arc::new(Control {
            view: view.clone(),
            jobs: jobs.clone(),
            metrics: metrics_at,
            ui: ui_at,
            export,
            hubble: hubble_at.clone(),
            node_name: cfg.node_name.clone(),
        });
        let server = tokio::spawn(control::serve(listener, handler));
        let events = tokio::spawn(read_events(view.clone(), events, metrics.clone()));
        let follow = tokio::spawn(follow_counters(metrics, view.clone(), jobs.clone()));
        let watch = match &cfg.inputs {
            InputsConfig::Files { policies, endpoints } => {
                tokio::spawn(watch_inputs(jobs.clone(), policies.clone(), endpoints.clone()))
            }
            InputsConfig::Kubernetes { cni_state, cni_conf, .. } => {
                if let Some((reporter, collector, _, rx)) = reporter.take() {
                    tasks.push(tokio::spawn(report_to_api(reporter, collector, rx)));
                }
                tasks.push(tokio::spawn(watch_cni_records(changed.clone(), cni_state.clone())));
                if let Some(conf) = cni_conf {
                    tasks.push(tokio::spawn(keep_chained(conf.clone(), cni_state.clone())));
                }
                tokio::spawn(reload_on_change(jobs.clone(), changed.clone()))
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    if jobs.send(Job::Reload(None)).is_err() {
                        break;
                    }
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        events.abort();
        follow.abort();
        for t in tasks {
            t.abort();
        }
        watch.abort();
        server.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        anyhow::Ok(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if keeper.is_some_and(|k| k.join().is_err()) {
        tracing::error!("The mesh credentials keeper panicked");
    }
    // Dropping every sender ends the reloader once it has finished what it was doing.
    drop(jobs);
    drop(rt);
    if worker.join().is_err() {
        tracing::error!("The reloader panicked");
    }
    for socket in std::iter::once(&cfg.control).chain(&cfg.hubble) {
        if let Err(e) = std::fs::remove_file(socket) {
            tracing::debug!(error = %e, socket = %socket.display(), "Socket not removed");
        }
    }
    tracing::info!("Agent stopping; the datapath keeps enforcing");
    served
}

/// Keeps the node's mesh credentials in line with the snapshot in force (its endpoints'
/// identities, the node's addresses) and renews them, every second, until `stop`.
fn keep_credentials(mut keeper: crate::mesh::Keeper, view: &View, node: &str, stop: &std::sync::atomic::AtomicBool) {
    let mut failing = false;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let snap = view.lock().snapshot.clone();
        if let Some(snap) = snap {
            let ips = snap.nodes.get(node).cloned().unwrap_or_default();
            let wanted = crate::mesh::local_identities(&snap, keeper.trust_domain());
            match keeper.refresh(&ips, &wanted) {
                Ok(true) => {
                    failing = false;
                    tracing::info!(identities = wanted.len(), "Mesh credentials written");
                }
                Ok(false) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %format!("{e:#}"), "Mesh credentials not written: retried every second");
                }
                Err(_) => {}
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What the inputs look like on disk: every policy file's and the endpoints file's identity.
fn inputs_stamp(policies: &Path, endpoints: &Path) -> Vec<(PathBuf, u64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut files = inputs::policy_files(policies).unwrap_or_default();
    files.push(endpoints.to_path_buf());
    files
        .into_iter()
        .filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m.len(), m.mtime(), m.mtime_nsec(), m.ino())))
        .collect()
}

/// Standalone mode: asks for a reload whenever a policy file or the endpoints file changes
/// (checked every 200 ms, so a change is enforced well within a second). An invalid file is reported
/// (log, an error record in the flow backlog) and its last good version keeps enforcing.
async fn watch_inputs(jobs: Sender<Job>, policies: PathBuf, endpoints: PathBuf) {
    let mut seen = inputs_stamp(&policies, &endpoints);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = inputs_stamp(&policies, &endpoints);
        if now == seen {
            continue;
        }
        seen = now;
        tracing::info!("Inputs changed on disk: reloading");
        if jobs.send(Job::Reload(None)).is_err() {
            return;
        }
    }
}

/// Kubernetes mode: connects to the API server and starts the watches; returns once every store
/// holds a complete list (the agent applies nothing before: an empty store would read as "no
/// policy"; meanwhile the pinned datapath keeps enforcing what it had).
async fn open_cluster(
    kubeconfig: Option<&Path>,
    changed: Arc<tokio::sync::Notify>,
) -> anyhow::Result<(porin_kubernetes::watch::Cluster, kube::Client)> {
    let (server, client) = kube_client(kubeconfig).await?;
    let cluster = porin_kubernetes::watch::Cluster::start(&client, Arc::new(move || changed.notify_one()));
    let mut waited = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), cluster.ready()).await {
            Ok(()) => break,
            Err(_) => {
                waited += 10;
                tracing::warn!(%server, waited_secs = waited, watches = ?cluster.health(), "Waiting for the API server's lists; the datapath keeps enforcing what it had");
            }
        }
    }
    tracing::info!(%server, "Kubernetes API: every watch listed");
    Ok((cluster, client))
}

/// A client for the API server (`kubeconfig`, else in-cluster, `KUBECONFIG`, `~/.kube/config`),
/// and the server's address.
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<(String, kube::Client)> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("find the API server (in-cluster, KUBECONFIG, ~/.kube/config)")?,
    };
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).context("a client for the API server")?;
    Ok((server, client))
}

/// Kubernetes mode: asks for a reload after changes, gathering those of the next 50 ms into one.
async fn reload_on_change(jobs: Sender<Job>, changed: Arc<tokio::sync::Notify>) {
    loop {
        changed.notified().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if jobs.send(Job::Reload(None)).is_err() {
            return;
        }
    }
}

/// Kubernetes mode: a change in the CNI plugin's records (a pod wired or unwired on this node),
/// checked every 200 ms, asks for a reload.
async fn watch_cni_records(changed: Arc<tokio::sync::Notify>, dir: PathBuf) {
    let mut seen = dir_stamp(&dir);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = dir_stamp(&dir);
        if now != seen {
            seen = now;
            changed.notify_one();
        }
    }
}

/// A directory's entries and their modification times: what changes when a file in it is
/// written, renamed or removed.
fn dir_stamp(dir: &Path) -> Vec<(PathBuf, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let m = e.metadata().ok()?;
            Some((e.path(), m.mtime(), m.mtime_nsec()))
        })
        .collect();
    v.sort();
    v
}

/// Kubernetes mode with `--cni-conf-dir`: keeps `porin-cni` chained in the node's CNI
/// configuration. A cluster plugin's installer (Calico's, Flannel's) may write its configuration
/// again without it: pods wired after that would have no record and go unenforced. Checked at
/// start and whenever the directory changes (looked at every second).
async fn keep_chained(conf_dir: PathBuf, state_dir: PathBuf) {
    let mut seen = None;
    let mut last_error = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = dir_stamp(&conf_dir);
        if seen.as_ref() == Some(&now) {
            continue;
        }
        seen = Some(now);
        match crate::cni::chain(&conf_dir, &state_dir) {
            Ok(crate::cni::Chained::Added(path)) => {
                last_error = None;
                tracing::warn!(conf = %path.display(), "porin-cni chained again: the CNI configuration was written without it");
                // Our own write changed the directory: take it as seen.
                seen = Some(dir_stamp(&conf_dir));
            }
            Ok(crate::cni::Chained::Already(_)) => last_error = None,
            Err(e) => {
                // Tried again next second, changed or not (a configuration read half-written
                // can be complete within the same modification time); said once.
                seen = None;
                let e = format!("{e:#}");
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "porin-cni not chained: pods wired now go unenforced");
                    last_error = Some(e);
                }
            }
        }
    }
}

/// Kubernetes mode: writes what the node made of each policy object (status, Events) and claims
/// its pods' identities whenever that changes; writes that failed are tried again after 5 s. With
/// a collector, and on the node that collects for the cluster ([`kubernetes::collects`]) while every watch is
/// synced, identities unused for the collector's grace period are collected.
async fn report_to_api(
    mut reporter: porin_kubernetes::report::Reporter,
    mut collector: Option<(porin_kubernetes::identity::Collector, porin_kubernetes::watch::Cluster, String)>,
    mut rx: tokio::sync::watch::Receiver<porin_kubernetes::report::Report>,
) {
    const RETRY: Duration = Duration::from_secs(5);
    let period = collector.as_ref().map_or(RETRY, |(c, ..)| c.period().min(RETRY));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut write, mut retry_at) = (true, None);
    loop {
        if write {
            let report = rx.borrow_and_update().clone();
            if let Some((c, ..)) = collector.as_mut() {
                c.observe(&report.unused, std::time::Instant::now());
            }
            let failed = reporter.report(&report).await;
            retry_at = (failed > 0).then(|| std::time::Instant::now() + RETRY);
        }
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
                write = true;
            }
            _ = tick.tick() => {
                write = retry_at.is_some_and(|t| std::time::Instant::now() >= t);
                if let Some((c, cluster, node)) = collector.as_mut() {
                    let synced = cluster.health().iter().all(|h| h.synced);
                    if synced && kubernetes::collects(&cluster.objects().nodes, node) {
                        c.collect(std::time::Instant::now()).await;
                    }
                }
            }
        }
    }
}

/// Sends one control request to a process (agent or proxy) and returns its reply; a refusal is an
/// error.
pub fn control(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    Ok(control::call(socket, request)?.ok()?)
}

/// The status a process (agent or proxy) reports on its control socket.
pub fn status_of(socket: &Path) -> anyhow::Result<serde_json::Value> {
    match control(socket, &Request::Status)? {
        Reply::Status(v) => Ok(v),
        other => Err(anyhow!("{}: unexpected reply {other:?}", socket.display())),
    }
}
