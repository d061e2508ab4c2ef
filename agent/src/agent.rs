//! `porin agent`: reads endpoints and policies, resolves them, keeps the kernel maps in step, attaches
//! the datapath to endpoints, and serves a control socket (status, reload, events, counters).
//!
//! Inputs (standalone mode): an endpoints file (JSON, written by `porin lab` or the operator) and a
//! policy directory. A policy file that fails to load keeps its last good version enforcing; its error
//! is reported in `status` and the log. The agent never detaches on exit: enforcement continues with
//! the pinned maps and links until `porin lab down` (or `detach`) removes them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use policy_engine::api::{LoadOptions, Loaded, load_file, load_str};
use policy_engine::identity::IdentityAllocator;
use policy_engine::inputs::{PolicyInputs, PolicyText};
use policy_engine::resolve::{Endpoint, Environment, NamedPort, resolve};
use policy_engine::snapshot::{Proto, Snapshot};
use porin_flow::backlog::Backlog;
use porin_flow::control::{self, Handler, Reply, Request};
use porin_flow::flow::{Flow, Verdict};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use porin_datapath::events::{self, Events};
use porin_datapath::loader::{ApplyStats, Datapath, Settings, ensure_bpffs};
use porin_datapath::mapstate::{self, Binding};

/// How many flow records the agent keeps for `events` queries.
const EVENT_BACKLOG: usize = 8192;

/// One endpoint in the endpoints file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Endpoint id (policy map key), non-zero, unique on the node.
    pub id: u32,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Host-side interface (in the agent's network namespace).
    pub ifname: String,
    /// Named container ports.
    #[serde(default)]
    pub named_ports: Vec<NamedPortSpec>,
    /// Service account.
    #[serde(default)]
    pub service_account: Option<String>,
}

/// A named port.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedPortSpec {
    /// Name.
    pub name: String,
    /// Number.
    pub port: u16,
    /// `TCP` (default), `UDP`, `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// The endpoints file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsFile {
    /// Cluster name.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Addresses of this node (identity `host`).
    #[serde(default)]
    pub node_ips: Vec<IpAddr>,
    /// Namespace labels.
    #[serde(default)]
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// bpffs directory for pins.
    pub bpffs: PathBuf,
    /// Policy directory (`*.yaml`, `*.yml`).
    pub policies: PathBuf,
    /// Endpoints file.
    pub endpoints: PathBuf,
    /// Control socket path.
    pub control: PathBuf,
    /// Where the policy inputs of every applied version are published for the L7 proxy.
    pub publish: Option<PathBuf>,
    /// Datapath settings.
    pub settings: Settings,
}

/// A policy file's state.
#[derive(Clone, Debug, Serialize)]
struct FileState {
    file: String,
    ok: bool,
    errors: Vec<String>,
    #[serde(skip)]
    last_good: Option<Loaded>,
    /// The text of the last good version (published to the proxy).
    #[serde(skip)]
    last_good_text: Option<String>,
}

struct State {
    cfg: AgentConfig,
    datapath: Datapath,
    allocator: IdentityAllocator,
    snapshot: Option<Arc<Snapshot>>,
    version: u64,
    files: BTreeMap<PathBuf, FileState>,
    endpoints: EndpointsFile,
    bindings: Vec<Binding>,
    attach_errors: Vec<String>,
    last_apply: Option<ApplyStats>,
    flows: Backlog<Flow>,
    /// Ring-buffer items that did not decode as events (counted, never silently lost).
    events_undecodable: u64,
}

fn policy_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The engine's environment for an endpoints file.
pub fn environment(eps: &EndpointsFile) -> Environment {
    let mut env = Environment::default();
    if let Some(c) = &eps.cluster {
        env.cluster = c.clone();
    }
    env.namespace_labels = eps.namespaces.clone();
    env.endpoints = eps
        .endpoints
        .iter()
        .map(|e| Endpoint {
            name: e.name.clone(),
            namespace: e.namespace.clone(),
            labels: e.labels.clone(),
            ips: e.ips.clone(),
            named_ports: e
                .named_ports
                .iter()
                .map(|n| NamedPort {
                    name: n.name.to_ascii_lowercase(),
                    port: n.port,
                    protocol: n.protocol.as_deref().and_then(Proto::parse).unwrap_or(Proto::Tcp),
                })
                .collect(),
            service_account: e.service_account.clone(),
        })
        .collect();
    env
}

impl State {
    /// Re-reads inputs, resolves, attaches new endpoints and writes the maps.
    fn reload(&mut self) -> anyhow::Result<ApplyStats> {
        let text = std::fs::read_to_string(&self.cfg.endpoints)
            .with_context(|| format!("read endpoints file {}", self.cfg.endpoints.display()))?;
        let eps: EndpointsFile =
            serde_json::from_str(&text).with_context(|| format!("parse {}", self.cfg.endpoints.display()))?;
        let mut seen = Vec::new();
        for path in policy_files(&self.cfg.policies)? {
            // Read once: what is loaded is exactly what is published.
            let (loaded, text) = match std::fs::read_to_string(&path) {
                Ok(text) => (load_str(&path.display().to_string(), &text, &LoadOptions::default()), Some(text)),
                Err(_) => (load_file(&path, &LoadOptions::default()), None),
            };
            let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
            let entry = self.files.entry(path.clone()).or_insert_with(|| FileState {
                file: path.display().to_string(),
                ok: true,
                errors: vec![],
                last_good: None,
                last_good_text: None,
            });
            if errors.is_empty() {
                entry.ok = true;
                entry.errors.clear();
                entry.last_good = Some(loaded);
                entry.last_good_text = text;
            } else {
                for e in &errors {
                    tracing::warn!(error = %e, "Invalid policy file: the last good version keeps enforcing");
                }
                if entry.errors != errors {
                    for e in &errors {
                        self.flows.push_numbered(|seq| Flow { seq, ..Flow::policy_error(e) });
                    }
                }
                entry.ok = false;
                entry.errors = errors;
            }
            seen.push(path);
        }
        self.files.retain(|p, _| seen.contains(p));
        let mut all = Loaded::default();
        for f in self.files.values() {
            if let Some(l) = &f.last_good {
                all.extend(l.clone());
            }
        }
        let env = environment(&eps);
        self.version += 1;
        let snap = resolve(&all.policies, &all.cidr_groups, &env, &mut self.allocator, self.version);
        for e in &snap.errors {
            tracing::warn!(error = %e, "Policy resolution problem (the affected rules allow nothing)");
        }
        // Bind and attach endpoints (interfaces in this network namespace).
        let mut bindings = Vec::new();
        self.attach_errors.clear();
        for e in &eps.endpoints {
            match nix::net::if_::if_nametoindex(e.ifname.as_str()) {
                Ok(ifindex) => bindings.push(Binding {
                    endpoint: e.id,
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                    ifindex,
                }),
                Err(err) => {
                    self.attach_errors.push(format!("{}/{}: interface {}: {err}", e.namespace, e.name, e.ifname))
                }
            }
        }
        let want = mapstate::desired(&snap, &bindings, &eps.node_ips);
        // Maps first, then programs: a freshly attached interface must find its policy.
        let stats = self.datapath.apply(&want)?;
        for e in &eps.endpoints {
            if bindings.iter().any(|b| b.endpoint == e.id)
                && let Err(err) = self.datapath.attach(&e.ifname)
            {
                self.attach_errors.push(format!("{}/{}: attach {}: {err:#}", e.namespace, e.name, e.ifname));
            }
        }
        for err in &self.attach_errors {
            tracing::error!(error = %err, "Endpoint not enforced");
        }
        tracing::info!(
            version = self.version,
            generation = stats.generation,
            policy_entries = stats.policy_entries,
            written = stats.written,
            removed = stats.removed,
            micros = stats.micros as u64,
            "Policy applied"
        );
        if let Some(path) = &self.cfg.publish {
            let (identities, prefixes) = self.allocator.assignments();
            let inputs = PolicyInputs {
                version: self.version,
                policies: self
                    .files
                    .values()
                    .filter_map(|f| f.last_good_text.clone().map(|text| PolicyText { name: f.file.clone(), text }))
                    .collect(),
                environment: env,
                node_ips: eps.node_ips.clone(),
                identities,
                prefixes,
            };
            publish(path, &inputs).with_context(|| format!("publish the policy inputs to {}", path.display()))?;
        }
        self.snapshot = Some(Arc::new(snap));
        self.endpoints = eps;
        self.bindings = bindings;
        self.last_apply = Some(stats.clone());
        Ok(stats)
    }

    fn status(&self) -> serde_json::Value {
        let snap = self.snapshot.as_deref();
        let attached = self.datapath.attached();
        let endpoints: Vec<serde_json::Value> = self
            .endpoints
            .endpoints
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id,
                    "name": e.name,
                    "namespace": e.namespace,
                    "ifname": e.ifname,
                    "ips": e.ips,
                    "identity": snap.and_then(|s| s.endpoint(&e.namespace, &e.name)).map(|p| p.identity),
                    "attached": attached.contains(&e.ifname),
                })
            })
            .collect();
        serde_json::json!({
            "pid": std::process::id(),
            "version": self.version,
            "generation": self.datapath.generation().ok(),
            "endpoints": endpoints,
            "policy_files": self.files.values().collect::<Vec<_>>(),
            "errors": snap.map(|s| s.errors.iter().map(ToString::to_string).collect::<Vec<_>>()).unwrap_or_default()
                .into_iter().chain(self.attach_errors.iter().cloned()).collect::<Vec<_>>(),
            "warnings": snap.map(|s| s.warnings.clone()).unwrap_or_default(),
            "last_apply": self.last_apply,
            "records": {
                "kept": self.flows.len(),
                "evicted": self.flows.evicted(),
                "events_undecodable": self.events_undecodable,
            },
        })
    }

    fn counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        use redirect_common::counter as c;
        let v = self.datapath.counters()?;
        let get = |i: u32| v.get(i as usize).copied().unwrap_or(0);
        Ok(c::NAMES
            .into_iter()
            .map(|(i, name)| {
                let n = if i == c::FORWARDED {
                    get(c::CT_NEW) + get(c::CT_ESTABLISHED) + get(c::CT_REPLY) + get(c::UNTRACKED_PASS)
                } else {
                    get(i)
                };
                (name.to_owned(), n)
            })
            .collect())
    }
}

/// The agent's side of the control protocol (`porin_flow::control`).
struct Control(Arc<Mutex<State>>);

impl Handler for Control {
    async fn handle(&self, request: Request) -> Reply {
        let mut st = self.0.lock().await;
        let result: anyhow::Result<Reply> = match request {
            Request::Status => Ok(Reply::Status(st.status())),
            Request::Reload => st.reload().and_then(|stats| {
                let policy_errors = st.files.values().flat_map(|f| f.errors.clone()).collect();
                Ok(Reply::Reloaded { version: st.version, stats: serde_json::to_value(stats)?, policy_errors })
            }),
            Request::Counters => st.counters().map(|counters| Reply::Counters { counters }),
            Request::Flows { after, limit } => {
                let page = st.flows.after(after, limit.unwrap_or(EVENT_BACKLOG));
                let flows = page.items.into_iter().map(|(_, f)| f.clone()).collect();
                Ok(Reply::Flows { last: page.last, missed: page.missed, flows })
            }
            Request::Detach { ifname } => st.datapath.detach(&ifname).map(|()| Reply::Done),
        };
        result.unwrap_or_else(|e| Reply::error(format!("{e:#}")))
    }
}

/// Moves datapath events into the flow backlog.
async fn read_events(state: Arc<Mutex<State>>, events: Events) -> anyhow::Result<()> {
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
        let mut st = state.lock().await;
        st.events_undecodable += drained.undecodable;
        let snap = st.snapshot.clone();
        for e in drained.events {
            st.flows.push_numbered(|seq| {
                let f = events::from_event(seq, &e, snap.as_deref());
                if f.verdict == Verdict::Dropped {
                    // Every drop is a flow record and a counter; the log only says that drops happen.
                    proxy::log_limited!(info, flow = %crate::render::text(&f), "Packet dropped");
                }
                f
            });
        }
    }
}

/// The version of the inputs last published at `path` (0 when there are none).
fn published_version(path: &Path) -> u64 {
    #[derive(Deserialize)]
    struct Version {
        version: u64,
    }
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<Version>(&b).ok()).map_or(0, |v| v.version)
}

/// Writes policy inputs where the proxy reads them: to a temporary file, then renamed over the
/// published path, so a reader always sees one whole version.
pub fn publish(path: &Path, inputs: &PolicyInputs) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let json = serde_json::to_vec(inputs)?;
    std::fs::write(&tmp, json).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Enters a named network namespace (`/run/netns/NAME`). Call before any thread exists.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter network namespace {name}"))
}

/// Runs the agent until SIGTERM / SIGINT.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    ensure_bpffs(&cfg.bpffs)?;
    let mut datapath = Datapath::open(&cfg.bpffs)?;
    datapath.configure(&cfg.settings)?;
    let ring = datapath.take_events()?;
    let mut state = State {
        cfg: cfg.clone(),
        datapath,
        allocator: IdentityAllocator::new(),
        snapshot: None,
        // Versions keep growing across agent restarts: the proxy (and whoever waits for it) can
        // tell a newer publication from an older one.
        version: cfg.publish.as_deref().map_or(0, published_version),
        files: BTreeMap::new(),
        endpoints: EndpointsFile::default(),
        bindings: vec![],
        attach_errors: vec![],
        last_apply: None,
        flows: Backlog::new(EVENT_BACKLOG),
        events_undecodable: 0,
    };
    state.reload().context("initial policy load")?;
    let state = Arc::new(Mutex::new(state));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = control::bind(&cfg.control).with_context(|| format!("bind {}", cfg.control.display()))?;
        tracing::info!(control = %cfg.control.display(), "Agent ready");
        let server = tokio::spawn(control::serve(listener, Arc::new(Control(state.clone()))));
        let events = tokio::spawn(read_events(state.clone(), ring));
        let watch = tokio::spawn(watch_inputs(state.clone(), cfg.policies.clone(), cfg.endpoints.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    if let Err(e) = state.lock().await.reload() {
                        tracing::error!(error = %format!("{e:#}"), "Reload failed: the last good policy keeps enforcing");
                    }
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        events.abort();
        watch.abort();
        server.abort();
        if let Err(e) = std::fs::remove_file(&cfg.control) {
            tracing::debug!(error = %e, "Control socket not removed");
        }
        tracing::info!("Agent stopping; the datapath keeps enforcing");
        Ok::<(), anyhow::Error>(())
    })
}

/// What the inputs look like on disk: every policy file's and the endpoints file's identity.
fn inputs_stamp(policies: &Path, endpoints: &Path) -> Vec<(PathBuf, u64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut files = policy_files(policies).unwrap_or_default();
    files.push(endpoints.to_path_buf());
    files
        .into_iter()
        .filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m.len(), m.mtime(), m.mtime_nsec(), m.ino())))
        .collect()
}

/// Standalone mode: re-applies the inputs whenever a policy file or the endpoints file changes
/// (checked every 200 ms, so a change is enforced well within a second). An invalid file is reported
/// (log, an error record in the event backlog) and its last good version keeps enforcing.
async fn watch_inputs(state: Arc<Mutex<State>>, policies: PathBuf, endpoints: PathBuf) {
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
        if let Err(e) = state.lock().await.reload() {
            tracing::error!(error = %format!("{e:#}"), "Reload failed: the last good policy keeps enforcing");
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
