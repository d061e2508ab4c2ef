//! The cluster as the agent sees it: one watch per kind it reads (list, then watch from the list's
//! version, bookmarks on; a watch that expires (410) is listed again; a lost connection is retried
//! with backoff), each into a store. The stores keep the last state the API gave while the API is
//! unreachable, so the agent keeps enforcing it; a change in any of them calls `changed`.
//!
//! Policy kinds (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy,
//! CiliumCIDRGroup, Service, EndpointSlice) are watched untyped: an object the policy engine
//! refuses must still reach it, so its error is reported on the object and the rest enforces.
//! Pods, Namespaces and Nodes are watched typed. CiliumIdentities are watched untyped too: one
//! object that does not read is passed over (and reported), not the whole list.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource};
pub use policy_engine::api::DocKind;

use crate::crd::CiliumIdentity;
use crate::identity::ClusterIdentity;

/// The API resource (group, version, plural) of a kind the policy engine reads.
pub fn resource(kind: DocKind) -> ApiResource {
    let (group, version) = kind.current().rsplit_once('/').unwrap_or(("", kind.current()));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind.name()), kind.plural())
}

/// Whether the agent reports on the object's `status.nodes` (the kinds whose CRD declares it).
pub fn has_node_status(kind: DocKind) -> bool {
    matches!(kind, DocKind::CiliumNetworkPolicy | DocKind::CiliumClusterwideNetworkPolicy)
}

/// Which object: kind, namespace (none: cluster-scoped), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Kind.
    pub kind: DocKind,
    /// Namespace.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind.name(), self.name),
            None => write!(f, "{} {}", self.kind.name(), self.name),
        }
    }
}

/// One object for the policy engine: its key, and its text (JSON, which the engine reads as
/// YAML), as the API gave it without `managedFields`.
#[derive(Clone, Debug)]
pub struct Document {
    /// Which object.
    pub key: ObjectKey,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.generation` (what a status entry refers to).
    pub generation: Option<i64>,
    /// The object.
    pub text: String,
}

/// What the stores hold now.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Every pod.
    pub pods: Vec<Arc<Pod>>,
    /// Every namespace.
    pub namespaces: Vec<Arc<Namespace>>,
    /// Every node.
    pub nodes: Vec<Arc<Node>>,
    /// Every object of the policy kinds, ordered by key.
    pub documents: Vec<Document>,
    /// Every CiliumIdentity that reads, by number.
    pub identities: Vec<ClusterIdentity>,
    /// Why the others do not.
    pub identity_errors: Vec<String>,
    /// The cluster number of every CiliumIdentity that has one (those that read and those whose
    /// labels do not), sorted: numbers no node can claim.
    pub identity_numbers: Vec<policy_engine::identity::IdentityId>,
}

/// A watch's health, for the agent's status.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WatchHealth {
    /// What is watched.
    pub resource: String,
    /// The store holds a complete list.
    pub synced: bool,
    /// Errors so far (lost connections, expired versions, undecodable objects).
    pub errors: u64,
    /// The last one.
    pub last_error: Option<String>,
}

/// The watched cluster.
#[derive(Clone)]
pub struct Cluster {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    documents: Vec<(DocKind, Store<DynamicObject>)>,
    identities: Store<DynamicObject>,
    health: Arc<Mutex<Vec<WatchHealth>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("health", &self.health()).finish_non_exhaustive()
    }
}

/// Retries a lost watch after 200 ms, doubling up to 5 s; back to 200 ms after a success. An API
/// server that comes back is followed again within seconds.
struct Retry(Duration);

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        Some(now)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.0 = Duration::from_millis(200);
    }
}

impl Cluster {
    /// Starts every watch on the current tokio runtime; `changed` is called after each change a
    /// store takes (a relist counts once).
    pub fn start(client: &Client, changed: Arc<dyn Fn() + Send + Sync>) -> Self {
        let health = Arc::new(Mutex::new(Vec::new()));
        let pods = watch_typed::<Pod>(Api::all(client.clone()), "pods", &health, changed.clone());
        let namespaces = watch_typed::<Namespace>(Api::all(client.clone()), "namespaces", &health, changed.clone());
        let nodes = watch_typed::<Node>(Api::all(client.clone()), "nodes", &health, changed.clone());
        let documents = DocKind::ALL
            .into_iter()
            .map(|kind| (kind, watch_untyped(client, resource(kind), &health, changed.clone())))
            .collect();
        let identities = watch_untyped(client, ApiResource::erase::<CiliumIdentity>(&()), &health, changed);
        Self { pods, namespaces, nodes, documents, identities, health }
    }

    /// Waits until every store holds a complete list (the agent applies nothing before: an
    /// empty store would read as "no policy").
    pub async fn ready(&self) {
        // Each only fails when its writer is gone (the runtime is stopping).
        if self.pods.wait_until_ready().await.is_err()
            || self.namespaces.wait_until_ready().await.is_err()
            || self.nodes.wait_until_ready().await.is_err()
        {
            return;
        }
        for s in self.documents.iter().map(|(_, s)| s).chain([&self.identities]) {
            if s.wait_until_ready().await.is_err() {
                return;
            }
        }
    }

    /// What the stores hold now.
    pub fn objects(&self) -> Objects {
        let mut documents: Vec<Document> = self
            .documents
            .iter()
            .flat_map(|(kind, store)| store.state().into_iter().map(move |o| document(*kind, &o)))
            .collect();
        documents.sort_by(|a, b| a.key.cmp(&b.key));
        let (mut identities, mut identity_errors, mut identity_numbers) = (Vec::new(), Vec::new(), Vec::new());
        for o in self.identities.state() {
            identity_numbers.extend(crate::identity::number(&o).ok());
            match crate::identity::parse(&o) {
                Ok(i) => identities.push(i),
                Err(e) => identity_errors.push(e),
            }
        }
        identities.sort_by_key(|i| i.id);
        identity_errors.sort();
        identity_numbers.sort_unstable();
        Objects {
            pods: self.pods.state(),
            namespaces: self.namespaces.state(),
            nodes: self.nodes.state(),
            documents,
            identities,
            identity_errors,
            identity_numbers,
        }
    }

    /// Every watch's health.
    pub fn health(&self) -> Vec<WatchHealth> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

fn register(health: &Mutex<Vec<WatchHealth>>, resource: &str) -> usize {
    let mut h = health.lock().unwrap_or_else(PoisonError::into_inner);
    h.push(WatchHealth { resource: resource.to_owned(), ..Default::default() });
    h.len() - 1
}

fn watch_untyped(
    client: &Client,
    ar: ApiResource,
    health: &Arc<Mutex<Vec<WatchHealth>>>,
    changed: Arc<dyn Fn() + Send + Sync>,
) -> Store<DynamicObject> {
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let index = register(health, &ar.plural);
    let stream = watcher(api, watcher::Config::default()).backoff(Retry(Duration::from_millis(200)));
    tokio::spawn(drive(stream.reflect(writer), index, health.clone(), changed));
    store
}

fn watch_typed<K>(
    api: Api<K>,
    resource: &str,
    health: &Arc<Mutex<Vec<WatchHealth>>>,
    changed: Arc<dyn Fn() + Send + Sync>,
) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let index = register(health, resource);
    let stream = watcher(api, watcher::Config::default()).backoff(Retry(Duration::from_millis(200)));
    tokio::spawn(drive(stream.reflect(writer), index, health.clone(), changed));
    store
}

/// Follows one watch: records its health, calls `changed` after every change the store took.
async fn drive<K, S>(
    stream: S,
    index: usize,
    health: Arc<Mutex<Vec<WatchHealth>>>,
    changed: Arc<dyn Fn() + Send + Sync>,
) where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let touched = match &item {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => true,
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => false,
            Err(_) => false,
        };
        {
            let mut h = health.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(h) = h.get_mut(index) {
                match &item {
                    Ok(watcher::Event::InitDone) => h.synced = true,
                    Ok(_) => {}
                    Err(e) => {
                        h.errors += 1;
                        let error = e.to_string();
                        if h.last_error.as_deref() != Some(error.as_str()) {
                            tracing::warn!(resource = %h.resource, %error, "Watch interrupted: retrying; the last state keeps enforcing");
                        }
                        h.last_error = Some(error);
                    }
                }
            }
        }
        if touched {
            changed();
        }
    }
}

/// An untyped object as a document for the policy engine.
fn document(kind: DocKind, o: &DynamicObject) -> Document {
    let key =
        ObjectKey { kind, namespace: o.metadata.namespace.clone(), name: o.metadata.name.clone().unwrap_or_default() };
    let mut o = o.clone();
    o.metadata.managed_fields = None;
    o.types = Some(kube::api::TypeMeta { api_version: kind.current().to_owned(), kind: kind.name().to_owned() });
    let (uid, generation) = (o.metadata.uid.clone(), o.metadata.generation);
    // A DynamicObject always serializes (a map of JSON values).
    let text = serde_json::to_string(&o).unwrap_or_default();
    Document { key, uid, generation, text }
}
