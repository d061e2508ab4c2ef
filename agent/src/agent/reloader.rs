//! The reloader: the one thread that owns the datapath and the policy state. It applies the inputs
//! (read → resolve → kernel maps → publish for the proxy), answers the requests that touch the
//! kernel (counters, detach), and retries a publication that failed until it lands. It runs apart
//! from the async runtime, so event draining and the control socket never wait behind a reload;
//! after every job it puts what the rest of the agent reads (the snapshot, the status) into the
//! shared [`View`].
//!
//! Order of a reload: the kernel maps first (they enforce), then the agent's own state (so status
//! and records describe what the kernel does), then the publication. A publication that fails is
//! kept and retried every second; status says which version the proxy can read.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use policy_engine::api::{LoadOptions, Loaded, PolicyError, load_str};
use policy_engine::identity::{IdentityAllocator, IdentityId};
use policy_engine::inputs::{PolicyInputs, PolicyText};
use policy_engine::resolve::resolve;
use policy_engine::snapshot::Snapshot;
use porin_datapath::interfaces;
use porin_datapath::loader::{ApplyStats, Datapath};
use porin_datapath::mapstate::{self, Binding};
use porin_flow::control::Reply;
use porin_flow::flow::Flow;
use porin_hubble::ring::FlowRing;
use tokio::sync::oneshot;

use super::AgentConfig;
use super::inputs::{EndpointsFile, FileState, Inputs, Source, environment, publish};

/// What the reloader is asked to do.
pub(super) enum Job {
    /// Apply the inputs again; answer the control request that asked, if one did.
    Reload(Option<oneshot::Sender<anyhow::Result<Reply>>>),
    /// Read the datapath's counters.
    Counters(oneshot::Sender<anyhow::Result<BTreeMap<String, u64>>>),
    /// Take the datapath off an interface.
    Detach(String, oneshot::Sender<anyhow::Result<()>>),
}

/// What the rest of the agent reads: the snapshot in force (to describe events), the status of
/// the last job, and the flow records.
#[derive(Debug)]
pub(super) struct ViewState {
    /// The snapshot the kernel enforces.
    pub(super) snapshot: Option<Arc<Snapshot>>,
    /// The status after the last job.
    pub(super) status: serde_json::Value,
    /// Ring-buffer items that did not decode as events (counted, never silently lost).
    pub(super) events_undecodable: u64,
}

/// The shared view (held for short moments only), and the node's flow ring (its own lock).
#[derive(Debug)]
pub(super) struct View {
    state: Mutex<ViewState>,
    /// Every flow record of the node: kernel events, the proxy's records, refused policy files.
    pub(super) flows: Arc<FlowRing>,
}

impl View {
    pub(super) fn new(flows: Arc<FlowRing>) -> Self {
        Self {
            state: Mutex::new(ViewState { snapshot: None, status: serde_json::Value::Null, events_undecodable: 0 }),
            flows,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, ViewState> {
        // Plain values: a panic elsewhere cannot leave them half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The owner of the datapath and the policy state.
pub(super) struct Reloader {
    cfg: AgentConfig,
    datapath: Datapath,
    allocator: IdentityAllocator,
    snapshot: Option<Arc<Snapshot>>,
    version: u64,
    /// Every policy document read, by source (a file's path, an object's kind and name).
    files: BTreeMap<String, FileState>,
    source: Source,
    /// Where what the node made of each API object goes (Kubernetes mode: the reporter).
    report: Option<tokio::sync::watch::Sender<porin_kubernetes::report::Report>>,
    endpoints: EndpointsFile,
    bindings: Vec<Binding>,
    attach_errors: Vec<String>,
    /// Why the socket load balancer is not attached.
    pub(super) lb_error: Option<String>,
    /// Services in force and what joining them warned of.
    services: Vec<policy_engine::services::Service>,
    service_warnings: Vec<String>,
    last_apply: Option<ApplyStats>,
    /// A publication not written yet.
    pending: Option<PolicyInputs>,
    /// The last version written for the proxy.
    published: Option<u64>,
    publish_error: Option<String>,
    /// Failed publication attempts so far.
    publish_failures: u64,
    view: Arc<View>,
}

impl Reloader {
    /// A reloader over an opened datapath; versions continue from `version`, identities from
    /// `allocator`.
    pub(super) fn new(
        cfg: AgentConfig,
        source: Source,
        report: Option<tokio::sync::watch::Sender<porin_kubernetes::report::Report>>,
        datapath: Datapath,
        version: u64,
        allocator: IdentityAllocator,
        view: Arc<View>,
    ) -> Self {
        Self {
            cfg,
            datapath,
            allocator,
            snapshot: None,
            version,
            files: BTreeMap::new(),
            source,
            report,
            endpoints: EndpointsFile::default(),
            bindings: vec![],
            attach_errors: vec![],
            lb_error: None,
            services: vec![],
            service_warnings: vec![],
            last_apply: None,
            pending: None,
            published: None,
            publish_error: None,
            publish_failures: 0,
            view,
        }
    }

    /// Serves jobs until every sender is gone; retries a pending publication every second.
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
        // A pending publication is retried every second whatever else arrives (jobs such as the
        // metrics' counters come every second too: a retry that waited for a quiet second would
        // never come).
        let mut next_retry = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            let job = if self.pending.is_some() {
                let wait = next_retry.saturating_duration_since(std::time::Instant::now());
                match jobs.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match jobs.recv() {
                    Ok(job) => Some(job),
                    Err(_) => return,
                }
            };
            match job {
                Some(Job::Reload(reply)) => {
                    let result = self.reload().and_then(|stats| {
                        let policy_errors = self.files.values().flat_map(|f| f.errors.clone()).collect();
                        Ok(Reply::Reloaded {
                            version: self.version,
                            stats: serde_json::to_value(stats)?,
                            policy_errors,
                        })
                    });
                    match reply {
                        // The asker may have gone: the reload happened all the same.
                        Some(tx) => drop(tx.send(result)),
                        None => {
                            if let Err(e) = result {
                                tracing::error!(error = %format!("{e:#}"), "Reload failed: the last good policy keeps enforcing");
                            }
                        }
                    }
                }
                Some(Job::Counters(tx)) => drop(tx.send(self.counters())),
                Some(Job::Detach(ifname, tx)) => drop(tx.send(self.datapath.detach(&ifname))),
                None => {}
            }
            if self.pending.is_some() && std::time::Instant::now() >= next_retry {
                self.try_publish();
                next_retry = std::time::Instant::now() + Duration::from_secs(1);
            }
            self.refresh_view();
        }
    }

    /// Writes the pending publication; keeps it (and the error) when that fails.
    fn try_publish(&mut self) {
        let (Some(path), Some(inputs)) = (&self.cfg.publish, &self.pending) else { return };
        match publish(path, inputs).with_context(|| format!("publish the policy inputs to {}", path.display())) {
            Ok(()) => {
                self.published = Some(inputs.version);
                self.pending = None;
                self.publish_error = None;
            }
            Err(e) => {
                self.publish_failures += 1;
                let error = format!("{e:#}");
                if self.publish_error.as_deref() != Some(error.as_str()) {
                    tracing::error!(%error, version = inputs.version, "Publication failed: retrying every second; the proxy keeps its last good version");
                }
                self.publish_error = Some(error);
            }
        }
    }

    /// Puts the snapshot and the status where the rest of the agent reads them.
    pub(super) fn refresh_view(&self) {
        let status = self.status();
        let mut view = self.view.lock();
        view.snapshot = self.snapshot.clone();
        view.status = status;
    }

    /// Re-reads inputs, resolves, attaches new endpoints and writes the maps.
    pub(super) fn reload(&mut self) -> anyhow::Result<ApplyStats> {
        let node = self.cfg.node_name.clone();
        let Inputs { cluster: eps, documents, errors: input_errors } = self.source.read(&node)?;
        let mut seen = Vec::new();
        for doc in documents {
            // Read once: what is loaded is exactly what is published.
            let (loaded, text) = match doc.text {
                Ok(text) => (load_str(&doc.source, &text, &LoadOptions::default()), Some(text)),
                Err(message) => {
                    let error =
                        PolicyError { file: doc.source.clone(), document: None, object: None, path: None, message };
                    (Loaded { errors: vec![error], ..Default::default() }, None)
                }
            };
            let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
            let entry = self.files.entry(doc.source.clone()).or_insert_with(|| FileState {
                file: doc.source.clone(),
                object: None,
                ok: true,
                errors: vec![],
                last_good: None,
                last_good_text: None,
            });
            entry.object = doc.object;
            if errors.is_empty() {
                entry.ok = true;
                entry.errors.clear();
                entry.last_good = Some(loaded);
                entry.last_good_text = text;
            } else {
                for e in &errors {
                    tracing::warn!(error = %e, "Invalid policy document: its last good version keeps enforcing");
                }
                if entry.errors != errors {
                    self.view.flows.push_each(&errors, |seq, e| Flow { seq, ..Flow::policy_error(e) });
                }
                entry.ok = false;
                entry.errors = errors;
            }
            seen.push(doc.source);
        }
        self.files.retain(|p, _| seen.contains(p));
        let mut all = Loaded::default();
        for f in self.files.values() {
            if let Some(l) = &f.last_good {
                all.extend(l.clone());
            }
        }
        let node = node.as_str();
        let mut env = environment(&eps, node);
        env.policy_audit_mode |= self.cfg.policy_audit_mode;
        let (services, service_warnings) = all.services();
        env.services = services;
        // The cluster's identities first: every node numbers an endpoint the same. A set that could
        // hand one identity's rights to another refuses the file: the last good state keeps enforcing.
        let moved = self
            .allocator
            .pin(&eps.identities)
            .map_err(|e| anyhow::anyhow!("{}: identities: {e}", self.source.origin()))?
            + self.allocator.reserve(&unpinned(&eps));
        if moved > 0 {
            tracing::warn!(moved, "Identities the cluster state gives differ from this node's: the cluster's win");
        }
        let cluster_errors = eps.cluster_errors(node);
        self.version += 1;
        let snap = resolve(&all.policies, &all.cidr_groups, &env, &mut self.allocator, self.version);
        for e in &snap.errors {
            tracing::warn!(error = %e, "Policy resolution problem (the affected rules allow nothing)");
        }
        // Bind and attach endpoints (interfaces in this network namespace).
        let mut bindings = Vec::new();
        self.attach_errors.clear();
        self.attach_errors.extend(cluster_errors);
        self.attach_errors.extend(input_errors);
        // Endpoints of other nodes are known by address and identity only: their nodes enforce.
        let interfaces = interfaces::by_name().unwrap_or_else(|e| {
            // Never fatal to a reload: each endpoint's interface is then found by name alone,
            // without its MAC and bridge (a proxied flow from a bridge port then fails closed).
            tracing::warn!(error = %format!("{e:#}"), "The node's interfaces could not be listed: by name only");
            BTreeMap::new()
        });
        for e in eps.endpoints.iter().filter(|e| eps.is_local(e, node)) {
            let found = match interfaces.get(&e.ifname) {
                Some(i) => Ok(*i),
                // Not in the dump (or no dump): asked by name, as the kernel has it now.
                None => nix::net::if_::if_nametoindex(e.ifname.as_str()).map(|index| interfaces::Interface {
                    index,
                    mac: None,
                    bridge: None,
                }),
            };
            match found {
                Ok(interface) => bindings.push(Binding {
                    endpoint: e.id,
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                    interface,
                }),
                Err(err) => {
                    self.attach_errors.push(format!("{}/{}: interface {}: {err}", e.namespace, e.name, e.ifname))
                }
            }
        }
        let own_ips = eps.own_ips(node);
        let mut want = mapstate::desired(&snap, &bindings, &own_ips);
        want.lb = mapstate::lb_entries(&env.services);
        // Maps first, then programs: a freshly attached interface must find its policy.
        let stats = self.datapath.apply(&want)?;
        for e in eps.endpoints.iter().filter(|e| eps.is_local(e, node)) {
            if bindings.iter().any(|b| b.endpoint == e.id)
                && let Err(err) = self.datapath.attach(&e.ifname)
            {
                self.attach_errors.push(format!("{}/{}: attach {}: {err:#}", e.namespace, e.name, e.ifname));
            }
        }
        for u in eps.own_uplinks(node) {
            if let Err(err) = self.datapath.attach_uplink(u) {
                self.attach_errors.push(format!("uplink {u}: attach: {err:#}"));
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
        // The state first: the kernel enforces this version now, whatever becomes of the publication.
        self.snapshot = Some(Arc::new(snap));
        self.endpoints = eps;
        self.bindings = bindings;
        self.last_apply = Some(stats.clone());
        self.services = env.services.clone();
        self.service_warnings = service_warnings;
        self.tell_api();
        if self.cfg.publish.is_some() {
            let (identities, prefixes) = self.allocator.assignments();
            let fqdn = self.allocator.fqdn_assignments();
            self.pending = Some(PolicyInputs {
                version: self.version,
                policies: self
                    .files
                    .values()
                    .filter_map(|f| f.last_good_text.clone().map(|text| PolicyText { name: f.file.clone(), text }))
                    .collect(),
                environment: env,
                node_ips: own_ips,
                identities,
                prefixes,
                fqdn,
            });
            self.try_publish();
        }
        Ok(stats)
    }
    /// Hands the reporter (Kubernetes mode) what the node made of each API object, and the
    /// identities of its pods the cluster has no object for yet.
    fn tell_api(&self) {
        let Some(tx) = &self.report else { return };
        let verdicts = self
            .files
            .values()
            .filter_map(|f| {
                let (key, uid, generation) = f.object.clone()?;
                Some(porin_kubernetes::report::Verdict {
                    key,
                    uid,
                    generation,
                    error: (!f.ok).then(|| f.errors.join("; ")),
                    enforcing: f.last_good.is_some(),
                    revision: self.version,
                })
            })
            .collect();
        let unclaimed = self
            .snapshot
            .as_deref()
            .map_or_else(Vec::new, |snap| unclaimed(snap, &self.endpoints, &self.cfg.node_name));
        let unused = self.snapshot.as_deref().map_or_else(Vec::new, |snap| unused(snap, &self.endpoints));
        // The reporter may be gone (the agent is stopping): nothing left to tell.
        tx.send_replace(porin_kubernetes::report::Report { verdicts, unclaimed, unused });
    }

    fn status(&self) -> serde_json::Value {
        let snap = self.snapshot.as_deref();
        let attached = self.datapath.attached();
        let endpoints: Vec<serde_json::Value> = self
            .endpoints
            .endpoints
            .iter()
            .filter(|e| self.endpoints.is_local(e, &self.cfg.node_name))
            .map(|e| {
                let policy = snap.and_then(|s| s.endpoint(&e.namespace, &e.name));
                serde_json::json!({
                    "id": e.id,
                    "name": e.name,
                    "namespace": e.namespace,
                    "ifname": e.ifname,
                    "ips": e.ips,
                    "identity": policy.map(|p| p.identity),
                    "attached": attached.contains(&e.ifname),
                    // What visibility and audit mode this endpoint has in force.
                    "policy_audit_mode": policy.is_some_and(|p| p.ingress.audit),
                    "visibility": policy.map(|p| {
                        p.ingress.visibility.iter().chain(&p.egress.visibility).map(ToString::to_string).collect::<Vec<_>>()
                    }).unwrap_or_default(),
                })
            })
            .collect();
        serde_json::json!({
            "pid": std::process::id(),
            "policy_audit_mode": self.cfg.policy_audit_mode || self.endpoints.policy_audit_mode,
            "version": self.version,
            "generation": self.datapath.generation().ok(),
            "endpoints": endpoints,
            "policy_files": self.files.values().collect::<Vec<_>>(),
            "errors": snap.map(|s| s.errors.iter().map(ToString::to_string).collect::<Vec<_>>()).unwrap_or_default()
                .into_iter().chain(self.attach_errors.iter().cloned()).chain(self.lb_error.clone()).collect::<Vec<_>>(),
            "warnings": snap.map(|s| s.warnings.clone()).unwrap_or_default()
                .into_iter().chain(self.service_warnings.iter().cloned()).collect::<Vec<_>>(),
            "services": self.services.iter().map(|s| serde_json::json!({
                "name": s.name,
                "namespace": s.namespace,
                "cluster_ips": s.cluster_ips,
                "ports": s.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect::<Vec<_>>(),
                "affinity_secs": s.affinity_secs,
                "backends": s.backends.iter().map(|b| serde_json::json!({
                    "ip": b.ip, "ready": b.ready, "node": b.node,
                    "ports": b.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "socket_lb": { "cgroup": self.cfg.cgroup, "error": self.lb_error },
            "kubernetes": match &self.source {
                Source::Kubernetes { cluster, cni_state } => serde_json::json!({
                    "watches": cluster.health(),
                    "cni_state": cni_state,
                }),
                Source::Files { .. } => serde_json::Value::Null,
            },
            "last_apply": self.last_apply,
            "publish": {
                "path": self.cfg.publish,
                "published_version": self.published,
                "pending": self.pending.as_ref().map(|p| p.version),
                "last_error": self.publish_error,
                "failures": self.publish_failures,
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

/// The reserved numbers the cluster state gives no set (a number both pinned and reserved is
/// pinned).
fn unpinned(eps: &EndpointsFile) -> Vec<IdentityId> {
    let pinned: std::collections::BTreeSet<IdentityId> = eps.identities.iter().map(|(_, id)| *id).collect();
    eps.reserved_identities.iter().copied().filter(|n| !pinned.contains(n)).collect()
}

/// The numbers of the cluster's identities (the objects this node reads as a label set's) that
/// no endpoint of the cluster uses: every node's pods count, not only this node's. An object this
/// node cannot read is never counted: another node (another version, say) may read it and use it.
fn unused(snap: &Snapshot, eps: &EndpointsFile) -> Vec<IdentityId> {
    let in_use: std::collections::BTreeSet<IdentityId> =
        eps.endpoints.iter().filter_map(|e| snap.endpoint(&e.namespace, &e.name)).map(|e| e.identity).collect();
    let mut out: Vec<IdentityId> = eps.identities.iter().map(|(_, id)| *id).filter(|id| !in_use.contains(id)).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The identities of `node`'s endpoints that the cluster state names no label set for: number,
/// labels (sorted, as `source:key=value`).
fn unclaimed(snap: &Snapshot, eps: &EndpointsFile, node: &str) -> Vec<(IdentityId, Vec<String>)> {
    let mut out: Vec<(IdentityId, Vec<String>)> = eps
        .endpoints
        .iter()
        .filter(|e| eps.is_local(e, node))
        .filter_map(|e| snap.endpoint(&e.namespace, &e.name))
        .filter_map(|e| snap.identity(e.identity))
        .filter(|i| !eps.identities.iter().any(|(_, id)| *id == i.id))
        .map(|i| (i.id, i.labels.iter().map(ToString::to_string).collect()))
        .collect();
    out.sort();
    out.dedup();
    out
}
