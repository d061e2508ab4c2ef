//! A test Kubernetes API server: in memory, one process, plain HTTP/1.1, no authentication.
//!
//! Porin's Kubernetes mode is tested against it (kube-rs watchers), and its fidelity is checked with the
//! real `kubectl` (`tests/tests/apiserver_kubectl.rs`). It answers what kubectl and kube-rs send:
//! discovery (legacy lists: kubectl's aggregated-discovery request falls back to them), a minimal
//! OpenAPI v3 index that tells kubectl to leave field validation to the server, CRUD with the real
//! `Status` errors, merge / strategic-merge / JSON / apply patches, CRD registration with structural
//! validation and pruning, and watches (history from a resourceVersion, selectors, bookmarks, `410 Gone`
//! after [`ApiServer::compact`]).
//!
//! [`ApiServer::stop`] and [`ApiServer::restart`] simulate an API server restart on the same port with
//! the same store; [`ApiServer::store`] changes objects in process (also while stopped), as the HTTP
//! path would.
//!
//! What kubectl 1.32 needs, found with `PORIN_TEST_APISERVER_LOG=1` (every request line on stderr):
//! - discovery: it asks `/api` and `/apis` for aggregated discovery (`apidiscovery.k8s.io/v2`) with an
//!   `application/json` fallback; the legacy `APIVersions`/`APIGroupList` answered as plain JSON make it
//!   fall back to one `APIResourceList` per group-version (`/api/v1`, `/apis/{group}/{version}`);
//! - OpenAPI: `apply`/`create` (default `--validate=strict`) send `fieldValidation=Strict` once
//!   `/openapi/v3` shows the parameter on the kind's PATCH operation (for a custom resource whose
//!   group-version is not in the index, on the CRD resource's). Served here: an index of the built-in
//!   group-versions whose documents hold only those PATCH operations (no schemas). `/openapi/v2` is a 404:
//!   client-side apply then builds strategic merge patches from kubectl's compiled-in types (pods) and
//!   JSON merge patches for custom resources;
//! - protobuf: typed commands (`kubectl create namespace`) POST protobuf; it is decoded for Namespace,
//!   ConfigMap, Secret and ServiceAccount (metadata and data fields), others get 415. Answers are JSON.
//!
//! Simplified against the real API server:
//! - no authentication, authorization, admission, TLS, HTTP/2, aggregated discovery, Table output
//!   (kubectl's default `get` prints NAME and AGE), `managedFields`, `selfLink`, or OpenAPI schemas;
//! - built-in objects are stored as given: no schema validation, no defaulting except `status.phase`
//!   (`Pending` for new pods, `Active` for namespaces) and `metadata.generation` (set on every kind);
//!   unknown fields in built-ins are kept even with `fieldValidation=Strict`;
//! - custom resources are checked against the CRD's `openAPIV3Schema` for `type`, `required`, `enum`,
//!   `nullable`, `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`,
//!   `x-kubernetes-embedded-resource`, `properties`, `additionalProperties` and `items` (422 `Invalid`
//!   with causes); no `pattern`, `format`, bounds, `oneOf`/`anyOf`/`allOf`/`not`, CEL rules or defaults;
//!   unknown fields are pruned silently as the real one does (`fieldValidation=Strict`: 400
//!   `strict decoding error: unknown field ...`; `Warn`: a `Warning` header);
//! - CRDs are established at once (status conditions set on create); versions are not converted (an
//!   object is served with the requested `apiVersion`); name conflicts are not checked;
//! - strategic merge patch: maps merge as in RFC 7386; a list merges by key only where the patch carries
//!   `$setElementOrder/<list>` (as kubectl writes for merge lists), else it is replaced;
//! - server-side apply is a JSON merge of the applied object onto the existing one (or a create): no
//!   field ownership, no conflicts, fields dropped from the config are not removed;
//! - deletion is immediate (no finalizers, grace periods, or garbage collection; `preconditions` on `uid`
//!   and `resourceVersion` are checked); deleting
//!   a namespace deletes the objects in it at once; writes into a namespace that does not exist are
//!   allowed; a deleted custom resource answers a `Success` Status, other kinds the object;
//! - lists are not snapshots: a continue token resumes after the last key over live data; a list's
//!   `resourceVersion`/`resourceVersionMatch` are ignored (always the latest); a watch from a future
//!   resourceVersion starts at the current one; the watch history keeps the last 100 000 events;
//! - bookmarks every second (`allowWatchBookmarks=true`); a watch without `timeoutSeconds` never times out.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};

const CRD_GROUP: &str = "apiextensions.k8s.io";
const CRD_PLURAL: &str = "customresourcedefinitions";
const ALL_VERBS: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

// ---------------------------------------------------------------------------------------------------
// The server handle.

/// A running (or stopped) test API server. Dropping it stops serving.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    serving: Option<Serving>,
}

struct Serving {
    stop: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

impl ApiServer {
    /// Starts a server on `127.0.0.1` on a free port, with the built-in resources and no objects.
    pub fn start() -> ApiServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("test apiserver: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("test apiserver: local address");
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            changed,
            log: std::env::var_os("PORIN_TEST_APISERVER_LOG").is_some_and(|v| !v.is_empty() && v != "0"),
            addr,
        });
        let serving = Some(serve_on(listener, shared.clone()));
        ApiServer { shared, addr, serving }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port served on (the same across [`ApiServer::restart`]).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Writes `dir/kubeconfig`: one cluster (this server, plain HTTP so no TLS settings), one user
    /// without credentials, one context (namespace `default`) set as current. Usable by kubectl
    /// (`--kubeconfig`, `KUBECONFIG=`) and kube-rs (`Config::from_custom_kubeconfig`).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: porin-test\n  cluster:\n    server: {}\n\
             users:\n- name: porin-test\n  user: {{}}\ncontexts:\n- name: porin-test\n  context:\n    \
             cluster: porin-test\n    user: porin-test\n    namespace: default\n\
             current-context: porin-test\npreferences: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Whether the server is serving (not [`ApiServer::stop`]ped).
    pub fn is_serving(&self) -> bool {
        self.serving.is_some()
    }

    /// Stops serving: the listener is closed (port released), open connections and watches are cut.
    /// The store and the resourceVersion counter are kept. Does nothing when already stopped.
    pub fn stop(&mut self) {
        if let Some(serving) = self.serving.take() {
            let _ = serving.stop.send(true);
            let _ = serving.thread.join();
        }
    }

    /// Serves again on the same port with the same store (after [`ApiServer::stop`]; does nothing when
    /// serving). Panics when the port cannot be bound again.
    pub fn restart(&mut self) {
        if self.serving.is_some() {
            return;
        }
        let mut tries = 0;
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("test apiserver: cannot bind {} again: {e}", self.addr),
            }
        };
        self.serving = Some(serve_on(listener, self.shared.clone()));
    }

    /// Forgets the watch history (as after etcd compaction): a watch from an older resourceVersion gets
    /// an `ERROR` event with a `410 Expired` Status.
    pub fn compact(&self) {
        self.store().compact();
    }

    /// An in-process handle on the objects (works while stopped too).
    pub fn store(&self) -> Store {
        Store { shared: self.shared.clone() }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_on(listener: std::net::TcpListener, shared: Arc<Shared>) -> Serving {
    listener.set_nonblocking(true).expect("test apiserver: nonblocking listener");
    let (stop, stop_rx) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("test-apiserver".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                accept_loop(listener, shared, stop_rx).await;
            });
        })
        .expect("test apiserver: spawn thread");
    Serving { stop, thread }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let stop = stop.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        let stop = stop.clone();
                        async move { Ok::<_, Infallible>(handle(shared, stop, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

// ---------------------------------------------------------------------------------------------------
// Errors.

/// An API error, sent as a `Status` object (`kind: Status`, `status: Failure`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status code (`Status.code`).
    pub code: u16,
    /// `Status.reason` (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, ...).
    pub reason: String,
    /// `Status.message`.
    pub message: String,
    /// `Status.details` (an empty object when there are none).
    pub details: Value,
}

impl ApiError {
    fn new(code: u16, reason: &str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason: reason.into(), message: message.into(), details: json!({}) }
    }

    fn with_details(mut self, details: Value) -> ApiError {
        self.details = details;
        self
    }

    /// The `Status` object as the real API server writes it.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "details": self.details, "code": self.code,
        });
        if self.reason.is_empty() {
            status.as_object_mut().expect("object").remove("reason");
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "BadRequest", message)
}

fn path_not_found() -> ApiError {
    ApiError::new(404, "NotFound", "the server could not find the requested resource")
}

fn method_not_allowed() -> ApiError {
    ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
}

fn name_details(def: &ResourceDef, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": def.plural});
    if !def.group.is_empty() {
        d["group"] = json!(def.group);
    }
    d
}

fn not_found(def: &ResourceDef, name: &str) -> ApiError {
    ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", def.qualified()))
        .with_details(name_details(def, name))
}

fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
    ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", def.qualified()))
        .with_details(name_details(def, name))
}

fn conflict(def: &ResourceDef, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your \
             changes to the latest version and try again",
            def.qualified()
        ),
    )
    .with_details(name_details(def, name))
}

/// One cause of an `Invalid` (422) error.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// `FieldValueTypeInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueInvalid`.
    pub reason: &'static str,
    /// The message without the field (`Invalid value: "string": ... must be of type object: "string"`).
    pub message: String,
    /// The field path (`spec.ingress[0].toPorts`).
    pub field: String,
}

fn invalid(def: &ResourceDef, name: &str, causes: &[Cause]) -> ApiError {
    let parts: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
    let joined = if parts.len() == 1 { parts[0].clone() } else { format!("[{}]", parts.join(", ")) };
    let qualified = if def.group.is_empty() { def.kind.clone() } else { format!("{}.{}", def.kind, def.group) };
    let mut details = json!({"name": name, "kind": def.kind, "causes": causes.iter().map(|c| json!({
        "reason": c.reason, "message": c.message, "field": c.field,
    })).collect::<Vec<_>>()});
    if !def.group.is_empty() {
        details["group"] = json!(def.group);
    }
    ApiError::new(422, "Invalid", format!("{qualified} \"{name}\" is invalid: {joined}")).with_details(details)
}

// ---------------------------------------------------------------------------------------------------
// Resources.

#[derive(Debug, Clone)]
struct ResourceDef {
    group: String,
    /// Served versions, the preferred one first.
    versions: Vec<String>,
    plural: String,
    singular: String,
    kind: String,
    namespaced: bool,
    short_names: Vec<String>,
    categories: Vec<String>,
    status: bool,
    /// The CRD's name for custom resources.
    crd: Option<String>,
    /// `openAPIV3Schema` per version (custom resources).
    schemas: HashMap<String, Value>,
}

impl ResourceDef {
    fn builtin(group: &str, plural: &str, kind: &str, namespaced: bool, short: &[&str], status: bool) -> Self {
        ResourceDef {
            group: group.into(),
            versions: vec!["v1".into()],
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            status,
            crd: None,
            schemas: HashMap::new(),
        }
    }

    fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() { version.to_string() } else { format!("{}/{version}", self.group) }
    }

    fn key(&self) -> (String, String) {
        (self.group.clone(), self.plural.clone())
    }

    fn is_crd(&self) -> bool {
        self.group == CRD_GROUP && self.plural == CRD_PLURAL
    }
}

fn builtin_defs() -> Vec<Arc<ResourceDef>> {
    let b = ResourceDef::builtin;
    let mut pods = b("", "pods", "Pod", true, &["po"], true);
    pods.categories = vec!["all".into()];
    let mut services = b("", "services", "Service", true, &["svc"], true);
    services.categories = vec!["all".into()];
    [
        b("", "namespaces", "Namespace", false, &["ns"], true),
        pods,
        services,
        b("", "nodes", "Node", false, &["no"], true),
        b("", "events", "Event", true, &["ev"], false),
        b("", "configmaps", "ConfigMap", true, &["cm"], false),
        b("", "secrets", "Secret", true, &[], false),
        b("", "serviceaccounts", "ServiceAccount", true, &["sa"], false),
        b("", "endpoints", "Endpoints", true, &["ep"], false),
        b("discovery.k8s.io", "endpointslices", "EndpointSlice", true, &[], false),
        b("networking.k8s.io", "networkpolicies", "NetworkPolicy", true, &["netpol"], false),
        b("events.k8s.io", "events", "Event", true, &["ev"], false),
        b("coordination.k8s.io", "leases", "Lease", true, &[], false),
        b(CRD_GROUP, CRD_PLURAL, "CustomResourceDefinition", false, &["crd", "crds"], true),
    ]
    .into_iter()
    .map(Arc::new)
    .collect()
}

/// The fields a field selector may name for a resource (beyond `metadata.name` and `metadata.namespace`).
fn selectable_fields(def: &ResourceDef) -> &'static [&'static str] {
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
        ("", "namespaces") => &["status.phase"],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "secrets") => &["type"],
        ("discovery.k8s.io", "endpointslices") => &["addressType"],
        _ => &[],
    }
}

// ---------------------------------------------------------------------------------------------------
// The store.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, Clone)]
struct HistoryEvent {
    rv: u64,
    key: (String, String),
    ty: EventType,
    obj: Value,
    prev: Option<Value>,
}

type Objects = BTreeMap<(String, String), Value>;

struct State {
    rv: u64,
    defs: Vec<Arc<ResourceDef>>,
    objects: HashMap<(String, String), Objects>,
    history: VecDeque<HistoryEvent>,
    /// Events after this resourceVersion are in `history`.
    floor: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    log: bool,
    addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a (possibly writing) operation, then wakes the watches.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, rv) = {
            let mut state = self.lock();
            let out = f(&mut state);
            (out, state.rv)
        };
        self.changed.send_replace(rv);
        out
    }
}

/// Request options of one write.
#[derive(Debug, Default)]
struct Ctx {
    /// From HTTP (status subresource rules apply), or in process (writes whatever is given).
    http: bool,
    /// `fieldValidation`: `Strict`, `Warn`, or `Ignore`/absent.
    field_validation: String,
    dry_run: bool,
    warnings: Vec<String>,
}

impl State {
    fn new() -> State {
        State { rv: 1, defs: builtin_defs(), objects: HashMap::new(), history: VecDeque::new(), floor: 1 }
    }

    fn def(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.defs
            .iter()
            .find(|d| d.group == group && d.plural == plural && d.versions.iter().any(|v| v == version))
            .cloned()
    }

    fn def_for_kind(&self, api_version: &str, kind: &str) -> Result<(Arc<ResourceDef>, String), ApiError> {
        let (group, version) = split_api_version(api_version);
        self.defs
            .iter()
            .find(|d| d.group == group && d.kind == kind && d.versions.iter().any(|v| v == version))
            .map(|d| (d.clone(), version.to_string()))
            .ok_or_else(|| bad_request(format!("no resource for apiVersion {api_version:?} kind {kind:?}")))
    }

    fn objects(&self, def: &ResourceDef) -> Option<&Objects> {
        self.objects.get(&def.key())
    }

    fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> Option<&Value> {
        self.objects(def)?.get(&(ns.to_string(), name.to_string()))
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, def: &ResourceDef, ty: EventType, obj: &Value, prev: Option<Value>) {
        self.history.push_back(HistoryEvent { rv: self.rv, key: def.key(), ty, obj: obj.clone(), prev });
        while self.history.len() > 100_000 {
            let old = self.history.pop_front().expect("non-empty");
            self.floor = old.rv;
        }
    }

    fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    /// Validates (and prunes) a custom resource against its version's schema.
    fn check_schema(&self, def: &ResourceDef, version: &str, obj: &mut Value, ctx: &mut Ctx) -> Result<(), ApiError> {
        let Some(schema) = def.schemas.get(version) else { return Ok(()) };
        let name = meta_str(obj, "name").to_string();
        let check = validate_and_prune(obj, schema);
        if !check.pruned.is_empty() {
            let unknown: Vec<String> = check.pruned.iter().map(|p| format!("unknown field \"{p}\"")).collect();
            match ctx.field_validation.as_str() {
                "Strict" => {
                    return Err(bad_request(format!(
                        "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                        unknown.join(", "),
                        kind = def.kind
                    )));
                }
                "Warn" => ctx.warnings.extend(unknown),
                _ => {}
            }
        }
        if !check.causes.is_empty() {
            return Err(invalid(def, &name, &check.causes));
        }
        Ok(())
    }

    /// Checks `apiVersion`/`kind` of a written object and sets them.
    fn set_types(def: &ResourceDef, version: &str, obj: &mut Value) -> Result<(), ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(bad_request(format!("the object provided is unrecognized (must be of type {})", def.kind)));
        };
        if let Some(kind) = map.get("kind").and_then(Value::as_str)
            && kind != def.kind
        {
            return Err(bad_request(format!(
                "the kind of the object ({kind}) does not match the resource's kind ({})",
                def.kind
            )));
        }
        if let Some(av) = map.get("apiVersion").and_then(Value::as_str)
            && split_api_version(av).0 != def.group
        {
            return Err(bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                def.api_version(version)
            )));
        }
        map.insert("apiVersion".into(), json!(def.api_version(version)));
        map.insert("kind".into(), json!(def.kind));
        if !map.get("metadata").is_some_and(Value::is_object) {
            map.insert("metadata".into(), json!({}));
        }
        Ok(())
    }

    fn create(
        &mut self,
        def: &Arc<ResourceDef>,
        version: &str,
        ns: Option<&str>,
        mut obj: Value,
        ctx: &mut Ctx,
    ) -> Result<Value, ApiError> {
        Self::set_types(def, version, &mut obj)?;
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        let ns = if def.namespaced {
            let body_ns = meta.get("namespace").and_then(Value::as_str).filter(|s| !s.is_empty()).map(String::from);
            match (ns, body_ns) {
                (Some(url), Some(body)) if url != body => {
                    return Err(bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (Some(url), _) => url.to_string(),
                (None, Some(body)) => body,
                (None, None) => "default".to_string(),
            }
        } else {
            String::new()
        };
        if def.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        let mut name = meta.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        if name.is_empty() {
            let generate = meta.get("generateName").and_then(Value::as_str).unwrap_or("").to_string();
            if generate.is_empty() {
                let cause = Cause {
                    reason: "FieldValueRequired",
                    message: "Required value: name or generateName is required".into(),
                    field: "metadata.name".into(),
                };
                return Err(invalid(def, "", &[cause]));
            }
            loop {
                name = format!("{generate}{}", random_suffix());
                if self.get(def, &ns, &name).is_none() {
                    break;
                }
            }
            meta.insert("name".into(), json!(name));
        }
        if self.get(def, &ns, &name).is_some() {
            return Err(already_exists(def, &name));
        }
        for k in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
            meta.remove(k);
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        if ctx.http && def.status && def.crd.is_some() {
            obj.as_object_mut().expect("object").remove("status");
        }
        if ctx.http {
            match (def.group.as_str(), def.plural.as_str()) {
                ("", "pods") => obj["status"] = json!({"phase": "Pending"}),
                ("", "namespaces") => obj["status"] = json!({"phase": "Active"}),
                _ => {}
            }
        }
        self.check_schema(def, version, &mut obj, ctx)?;
        let crd = if def.is_crd() { Some(prepare_crd(&mut obj, None)?) } else { None };
        if ctx.dry_run {
            return Ok(obj);
        }
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.entry(def.key()).or_default().insert((ns, name), obj.clone());
        self.record(def, EventType::Added, &obj, None);
        if let Some(crd) = crd {
            self.register(crd);
        }
        Ok(obj)
    }

    /// Replaces an object (PUT); `status_only` for the status subresource.
    #[expect(clippy::too_many_arguments, reason = "one request's parts")]
    fn update(
        &mut self,
        def: &Arc<ResourceDef>,
        version: &str,
        ns: &str,
        name: &str,
        mut obj: Value,
        ctx: &mut Ctx,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        Self::set_types(def, version, &mut obj)?;
        let body_name = meta_str(&obj, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = meta_str(&obj, "namespace");
        if def.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let Some(old) = self.get(def, ns, name).cloned() else { return Err(not_found(def, name)) };
        let rv = meta_str(&obj, "resourceVersion");
        if !rv.is_empty() && rv != meta_str(&old, "resourceVersion") {
            return Err(conflict(def, name));
        }
        let new = if status_only {
            let mut new = old.clone();
            set_or_remove(&mut new, "status", obj.get("status").cloned());
            new
        } else {
            if ctx.http && def.status {
                set_or_remove(&mut obj, "status", old.get("status").cloned());
            }
            obj
        };
        self.finish_update(def, version, ns, name, old, new, ctx)
    }

    /// Applies a patch (PATCH); an apply patch creates an absent object.
    #[expect(clippy::too_many_arguments, reason = "one request's parts")]
    fn patch(
        &mut self,
        def: &Arc<ResourceDef>,
        version: &str,
        ns: &str,
        name: &str,
        patch_type: &str,
        body: &[u8],
        ctx: &mut Ctx,
        status_only: bool,
    ) -> Result<(Value, bool), ApiError> {
        let old = self.get(def, ns, name).cloned();
        let Some(old) = old else {
            if patch_type == "application/apply-patch+yaml" && !status_only {
                let mut obj = parse_body(body, true)?;
                if !obj.is_object() {
                    return Err(bad_request("the apply patch is not an object"));
                }
                let body_name = meta_str(&obj, "name");
                if !body_name.is_empty() && body_name != name {
                    return Err(bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on the URL ({name})"
                    )));
                }
                if !obj.get("metadata").is_some_and(Value::is_object) {
                    obj["metadata"] = json!({});
                }
                obj["metadata"]["name"] = json!(name);
                let url_ns = def.namespaced.then_some(ns);
                return self.create(def, version, url_ns, obj, ctx).map(|o| (o, true));
            }
            return Err(not_found(def, name));
        };
        let mut cur = present(&old, def, version);
        match patch_type {
            "application/merge-patch+json" => merge_patch(&mut cur, &parse_body(body, false)?),
            "application/strategic-merge-patch+json" => strategic_merge_patch(&mut cur, &parse_body(body, false)?),
            "application/json-patch+json" => {
                let ops = parse_body(body, false)?;
                json_patch(&mut cur, &ops).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the server rejected our request due to an error in our request: {e}"),
                    )
                })?;
            }
            "application/apply-patch+yaml" => {
                let applied = parse_body(body, true)?;
                let body_name = meta_str(&applied, "name");
                if !body_name.is_empty() && body_name != name {
                    return Err(bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on the URL ({name})"
                    )));
                }
                merge_patch(&mut cur, &applied);
            }
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
                    ),
                ));
            }
        }
        if meta_str(&cur, "resourceVersion") != meta_str(&old, "resourceVersion") {
            return Err(conflict(def, name));
        }
        Self::set_types(def, version, &mut cur)?;
        let new = if status_only {
            let mut new = old.clone();
            set_or_remove(&mut new, "status", cur.get("status").cloned());
            new
        } else {
            if ctx.http && def.status {
                set_or_remove(&mut cur, "status", old.get("status").cloned());
            }
            cur
        };
        self.finish_update(def, version, ns, name, old, new, ctx).map(|o| (o, false))
    }

    #[expect(clippy::too_many_arguments, reason = "one request's parts")]
    fn finish_update(
        &mut self,
        def: &Arc<ResourceDef>,
        version: &str,
        ns: &str,
        name: &str,
        old: Value,
        mut new: Value,
        ctx: &mut Ctx,
    ) -> Result<Value, ApiError> {
        {
            let meta = new["metadata"].as_object_mut().expect("metadata");
            for k in ["uid", "creationTimestamp", "deletionTimestamp", "generation", "resourceVersion"] {
                set_or_remove_map(meta, k, old["metadata"].get(k).cloned());
            }
            meta.insert("name".into(), json!(name));
            if def.namespaced {
                meta.insert("namespace".into(), json!(ns));
            } else {
                meta.remove("namespace");
            }
        }
        self.check_schema(def, version, &mut new, ctx)?;
        let crd = if def.is_crd() { Some(prepare_crd(&mut new, Some(&old))?) } else { None };
        let old_presented = present(&old, def, version);
        if without_rv(&new) == without_rv(&old_presented) {
            return Ok(old_presented);
        }
        if spec_part(&new) != spec_part(&old_presented) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            new["metadata"]["generation"] = json!(generation);
        }
        if ctx.dry_run {
            return Ok(new);
        }
        let rv = self.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.entry(def.key()).or_default().insert((ns.to_string(), name.to_string()), new.clone());
        self.record(def, EventType::Modified, &new, Some(old));
        if let Some(crd) = crd {
            self.register(crd);
        }
        Ok(new)
    }

    fn delete(
        &mut self,
        def: &Arc<ResourceDef>,
        ns: &str,
        name: &str,
        preconditions: &Value,
        ctx: &Ctx,
    ) -> Result<Value, ApiError> {
        let key = (ns.to_string(), name.to_string());
        let Some(obj) = self.objects.get(&def.key()).and_then(|o| o.get(&key)).cloned() else {
            return Err(not_found(def, name));
        };
        // DeleteOptions.preconditions: the object must still be the one the client read.
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = preconditions[field].as_str()
                && meta_str(&obj, field) != want
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {what} in precondition: \
                         {want}, {what} in object meta: {}",
                        def.qualified(),
                        meta_str(&obj, field)
                    ),
                )
                .with_details(name_details(def, name)));
            }
        }
        if ctx.dry_run {
            return Ok(obj);
        }
        // Dependents first: a CRD's objects, a namespace's objects.
        if def.is_crd() {
            if let Some(dependent) = self.defs.iter().find(|d| d.crd.as_deref() == Some(name)).cloned() {
                self.delete_all(&dependent, None);
                self.defs.retain(|d| d.crd.as_deref() != Some(name));
                self.objects.remove(&dependent.key());
            }
        } else if def.group.is_empty() && def.plural == "namespaces" {
            for d in self.defs.clone().iter().filter(|d| d.namespaced) {
                self.delete_all(d, Some(name));
            }
        }
        let mut obj = self.objects.get_mut(&def.key()).and_then(|o| o.remove(&key)).expect("present");
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(def, EventType::Deleted, &obj, None);
        Ok(obj)
    }

    fn delete_all(&mut self, def: &Arc<ResourceDef>, ns: Option<&str>) {
        let keys: Vec<(String, String)> = self
            .objects(def)
            .map(|o| o.keys().filter(|(n, _)| ns.is_none_or(|ns| ns == n)).cloned().collect())
            .unwrap_or_default();
        for (n, name) in keys {
            let _ = self.delete(def, &n, &name, &Value::Null, &Ctx::default());
        }
    }

    /// Registers (or re-registers) a custom resource.
    fn register(&mut self, def: ResourceDef) {
        let name = def.crd.clone();
        self.defs.retain(|d| d.crd.is_none() || d.crd != name);
        self.defs.push(Arc::new(def));
    }
}

fn set_or_remove(obj: &mut Value, key: &str, value: Option<Value>) {
    if let Some(map) = obj.as_object_mut() {
        set_or_remove_map(map, key, value);
    }
}

fn set_or_remove_map(map: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    match value {
        Some(v) => {
            map.insert(key.into(), v);
        }
        None => {
            map.remove(key);
        }
    }
}

fn without_rv(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("generation");
        m.remove("managedFields");
    }
    o
}

/// The object without `metadata` and `status` (what bumps `metadata.generation` when it changes).
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

fn present(obj: &Value, def: &ResourceDef, version: &str) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(def.api_version(version));
    o["kind"] = json!(def.kind);
    o
}

fn meta_str<'a>(obj: &'a Value, key: &str) -> &'a str {
    obj.get("metadata").and_then(|m| m.get(key)).and_then(Value::as_str).unwrap_or("")
}

fn split_api_version(av: &str) -> (&str, &str) {
    av.rsplit_once('/').unwrap_or(("", av))
}

fn parse_body(body: &[u8], yaml: bool) -> Result<Value, ApiError> {
    if body.starts_with(PROTOBUF_MAGIC) {
        return decode_protobuf(body);
    }
    if yaml {
        serde_yaml::from_slice::<Value>(body).map_err(|e| bad_request(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| bad_request(format!("the body of the request could not be decoded as JSON: {e}")))
    }
}

/// Reads a CRD into a resource definition and sets its status (names accepted, established).
fn prepare_crd(crd: &mut Value, old: Option<&Value>) -> Result<ResourceDef, ApiError> {
    let name = meta_str(crd, "name").to_string();
    let crd_def = ResourceDef::builtin(CRD_GROUP, CRD_PLURAL, "CustomResourceDefinition", false, &[], true);
    let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let names = spec.get("names").cloned().unwrap_or(Value::Null);
    let group = s(&spec, "group");
    let plural = s(&names, "plural");
    let kind = s(&names, "kind");
    let mut causes = Vec::new();
    let required =
        |field: &str| Cause { reason: "FieldValueRequired", message: "Required value".into(), field: field.into() };
    if group.is_empty() {
        causes.push(required("spec.group"));
    }
    if plural.is_empty() {
        causes.push(required("spec.names.plural"));
    }
    if kind.is_empty() {
        causes.push(required("spec.names.kind"));
    }
    if causes.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
            field: "metadata.name".into(),
        });
    }
    let scope = s(&spec, "scope");
    if scope != "Namespaced" && scope != "Cluster" {
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            message: format!("Unsupported value: \"{scope}\": supported values: \"Cluster\", \"Namespaced\""),
            field: "spec.scope".into(),
        });
    }
    let versions = spec.get("versions").and_then(Value::as_array).cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(required("spec.versions"));
    }
    if !causes.is_empty() {
        return Err(invalid(&crd_def, &name, &causes));
    }
    let mut served = Vec::new();
    let mut storage = None;
    let mut schemas = HashMap::new();
    let mut status = false;
    for v in &versions {
        let vname = s(v, "name");
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            storage = Some(vname.clone());
        }
        if v.get("served").and_then(Value::as_bool) != Some(false) {
            served.push(vname.clone());
        }
        if let Some(schema) = v.get("schema").and_then(|s| s.get("openAPIV3Schema")) {
            schemas.insert(vname.clone(), schema.clone());
        }
        if v.get("subresources").and_then(|s| s.get("status")).is_some() {
            status = true;
        }
    }
    if let Some(storage) = &storage
        && let Some(i) = served.iter().position(|v| v == storage)
    {
        let v = served.remove(i);
        served.insert(0, v);
    }
    let singular = Some(s(&names, "singular")).filter(|s| !s.is_empty()).unwrap_or_else(|| kind.to_lowercase());
    let list_kind = Some(s(&names, "listKind")).filter(|s| !s.is_empty()).unwrap_or_else(|| format!("{kind}List"));
    let strings = |k: &str| -> Vec<String> {
        names
            .get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let short_names = strings("shortNames");
    let categories = strings("categories");
    let now = now_rfc3339();
    let since = |t: &str| -> String {
        old.and_then(|o| o.get("status")?.get("conditions")?.as_array()?.iter().find(|c| c["type"] == t).cloned())
            .and_then(|c| c.get("lastTransitionTime").and_then(Value::as_str).map(String::from))
            .unwrap_or_else(|| now.clone())
    };
    let mut accepted = json!({"plural": plural, "singular": singular, "kind": kind, "listKind": list_kind});
    if !short_names.is_empty() {
        accepted["shortNames"] = json!(short_names);
    }
    if !categories.is_empty() {
        accepted["categories"] = json!(categories);
    }
    let mut stored: Vec<String> = old
        .and_then(|o| o.get("status")?.get("storedVersions")?.as_array().cloned())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    if let Some(storage) = &storage
        && !stored.contains(storage)
    {
        stored.push(storage.clone());
    }
    crd["status"] = json!({
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "lastTransitionTime": since("NamesAccepted"),
             "reason": "NoConflicts", "message": "no conflicts found"},
            {"type": "Established", "status": "True", "lastTransitionTime": since("Established"),
             "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
        ],
        "acceptedNames": accepted,
        "storedVersions": stored,
    });
    Ok(ResourceDef {
        group,
        versions: served,
        plural,
        singular,
        kind,
        namespaced: scope == "Namespaced",
        short_names,
        categories,
        status,
        crd: Some(name),
        schemas,
    })
}

/// The in-process handle on a server's objects: writes bump the resourceVersion and are seen by
/// watches exactly like writes over HTTP. In-process writes may set `status` freely (the status
/// subresource rules apply to HTTP only); custom resources are still validated and pruned.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl Store {
    /// Creates an object (`apiVersion`, `kind`, `metadata.namespace` — `default` when absent for a
    /// namespaced resource — taken from it).
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        self.shared.write(|state| {
            let (def, version) = kind_of(state, &obj)?;
            let ns = meta_str(&obj, "namespace").to_string();
            let ns = (def.namespaced && !ns.is_empty()).then_some(ns);
            state.create(&def, &version, ns.as_deref(), obj, &mut Ctx::default())
        })
    }

    /// Replaces an object (a set `metadata.resourceVersion` must be the current one: else `409 Conflict`).
    pub fn replace(&self, obj: Value) -> Result<Value, ApiError> {
        self.shared.write(|state| {
            let (def, version) = kind_of(state, &obj)?;
            let ns = object_ns(&def, &obj);
            let name = meta_str(&obj, "name").to_string();
            state.update(&def, &version, &ns, &name, obj, &mut Ctx::default(), false)
        })
    }

    /// Creates the object, or merges it onto the existing one (a JSON merge patch, like server-side
    /// apply here).
    pub fn apply(&self, obj: Value) -> Result<Value, ApiError> {
        self.shared.write(|state| {
            let (def, version) = kind_of(state, &obj)?;
            let ns = object_ns(&def, &obj);
            let name = meta_str(&obj, "name").to_string();
            let body = serde_json::to_vec(&obj).expect("serializable");
            let ctx = &mut Ctx::default();
            state.patch(&def, &version, &ns, &name, "application/apply-patch+yaml", &body, ctx, false).map(|(o, _)| o)
        })
    }

    /// Applies a JSON merge patch (RFC 7386) to an object, `status` included.
    pub fn merge_patch(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        self.shared.write(|state| {
            let (def, version) = state.def_for_kind(api_version, kind)?;
            let ns = if def.namespaced { namespace.unwrap_or("default") } else { "" };
            let body = serde_json::to_vec(patch).expect("serializable");
            let ctx = &mut Ctx::default();
            state.patch(&def, &version, ns, name, "application/merge-patch+json", &body, ctx, false).map(|(o, _)| o)
        })
    }

    /// Deletes an object; returns it (with the deletion's resourceVersion).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.shared.write(|state| {
            let (def, _) = state.def_for_kind(api_version, kind)?;
            let ns = if def.namespaced { namespace.unwrap_or("default") } else { "" };
            state.delete(&def, ns, name, &Value::Null, &Ctx::default())
        })
    }

    /// One object, if present.
    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let state = self.shared.lock();
        let (def, version) = state.def_for_kind(api_version, kind).ok()?;
        let ns = if def.namespaced { namespace.unwrap_or("default") } else { "" };
        state.get(&def, ns, name).map(|o| present(o, &def, &version))
    }

    /// All objects of a kind (all namespaces), ordered by namespace and name.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let state = self.shared.lock();
        let Ok((def, version)) = state.def_for_kind(api_version, kind) else { return Vec::new() };
        state.objects(&def).map(|o| o.values().map(|v| present(v, &def, &version)).collect()).unwrap_or_default()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets the watch history (see [`ApiServer::compact`]).
    pub fn compact(&self) {
        self.shared.write(State::compact);
    }
}

fn kind_of(state: &State, obj: &Value) -> Result<(Arc<ResourceDef>, String), ApiError> {
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    state.def_for_kind(av, kind)
}

fn object_ns(def: &ResourceDef, obj: &Value) -> String {
    if !def.namespaced {
        return String::new();
    }
    Some(meta_str(obj, "namespace")).filter(|s| !s.is_empty()).unwrap_or("default").to_string()
}

// ---------------------------------------------------------------------------------------------------
// Selectors.

/// One label requirement's operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelOp {
    /// `key=value`, `key==value`.
    Eq(String),
    /// `key!=value` (also matches when the label is absent).
    NotEq(String),
    /// `key in (a,b)`.
    In(Vec<String>),
    /// `key notin (a,b)` (also matches when the label is absent).
    NotIn(Vec<String>),
    /// `key`.
    Exists,
    /// `!key`.
    NotExists,
}

/// A parsed label selector (requirements are and-ed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    /// `(key, operator)` pairs.
    pub requirements: Vec<(String, LabelOp)>,
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(v: &str) -> bool {
    v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl LabelSelector {
    /// Parses the `labelSelector` query syntax (`=`, `==`, `!=`, `in (...)`, `notin (...)`, `key`, `!key`,
    /// comma for and).
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector { requirements });
        }
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0i32, 0);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    terms.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&s[start..]);
        for term in terms {
            let t = term.trim();
            let err = || format!("unable to parse requirement: invalid label selector term {t:?}");
            if let Some(key) = t.strip_prefix('!') {
                let key = key.trim();
                if !valid_key(key) {
                    return Err(err());
                }
                requirements.push((key.to_string(), LabelOp::NotExists));
            } else if let Some(open) = t.find('(') {
                let inner = t[open + 1..].strip_suffix(')').ok_or_else(err)?;
                let head: Vec<&str> = t[..open].split_whitespace().collect();
                let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
                if values.iter().any(|v| !valid_value(v)) {
                    return Err(err());
                }
                match head.as_slice() {
                    [key, "in"] if valid_key(key) => requirements.push((key.to_string(), LabelOp::In(values))),
                    [key, "notin"] if valid_key(key) => requirements.push((key.to_string(), LabelOp::NotIn(values))),
                    _ => return Err(err()),
                }
            } else {
                let (key, op) = if let Some((k, v)) = t.split_once("!=") {
                    (k, LabelOp::NotEq(v.trim().to_string()))
                } else if let Some((k, v)) = t.split_once("==") {
                    (k, LabelOp::Eq(v.trim().to_string()))
                } else if let Some((k, v)) = t.split_once('=') {
                    (k, LabelOp::Eq(v.trim().to_string()))
                } else {
                    (t, LabelOp::Exists)
                };
                let key = key.trim();
                let value_ok = match &op {
                    LabelOp::Eq(v) | LabelOp::NotEq(v) => valid_value(v),
                    _ => true,
                };
                if !valid_key(key) || !value_ok {
                    return Err(err());
                }
                requirements.push((key.to_string(), op));
            }
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether labels (`metadata.labels`, absent = none) match.
    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.requirements.iter().all(|(key, op)| {
            let value = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            match op {
                LabelOp::Eq(v) => value == Some(v.as_str()),
                LabelOp::NotEq(v) => value != Some(v.as_str()),
                LabelOp::In(vs) => value.is_some_and(|x| vs.iter().any(|v| v == x)),
                LabelOp::NotIn(vs) => value.is_none_or(|x| vs.iter().all(|v| v != x)),
                LabelOp::Exists => value.is_some(),
                LabelOp::NotExists => value.is_none(),
            }
        })
    }
}

/// A parsed field selector: `(field, equal, value)` requirements, and-ed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector {
    /// `(field path, true for = / ==, false for !=, value)`.
    pub requirements: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses `field=value`, `field==value`, `field!=value`, comma-separated.
    pub fn parse(s: &str) -> Result<FieldSelector, String> {
        let mut requirements = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{s}'; can't understand '{term}'"));
            };
            requirements.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector { requirements })
    }

    /// Whether an object matches (a missing field is the empty string).
    pub fn matches(&self, obj: &Value) -> bool {
        self.requirements.iter().all(|(field, eq, value)| (field_value(obj, field) == *value) == *eq)
    }
}

/// A field's value as a field selector compares it: strings as is, booleans and numbers printed,
/// missing fields empty.
pub fn field_value(obj: &Value, field: &str) -> String {
    let mut v = obj;
    for part in field.split('.') {
        match v.get(part) {
            Some(x) => v = x,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

struct Filter {
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn from_query(def: &ResourceDef, ns: Option<&str>, q: &HashMap<String, String>) -> Result<Filter, ApiError> {
        let labels =
            LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or("")).map_err(bad_request)?;
        let fields =
            FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or("")).map_err(bad_request)?;
        for (field, _, _) in &fields.requirements {
            let ok = field == "metadata.name"
                || (field == "metadata.namespace" && def.namespaced)
                || selectable_fields(def).contains(&field.as_str());
            if !ok {
                return Err(bad_request(format!("field label not supported: {field}")));
            }
        }
        Ok(Filter { ns: ns.map(String::from), labels, fields })
    }

    fn matches(&self, obj: &Value) -> bool {
        self.ns.as_deref().is_none_or(|ns| meta_str(obj, "namespace") == ns)
            && self.labels.matches(obj.get("metadata").and_then(|m| m.get("labels")).and_then(Value::as_object))
            && self.fields.matches(obj)
    }
}

// ---------------------------------------------------------------------------------------------------
// Patches.

/// Applies a JSON merge patch (RFC 7386).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Applies a strategic merge patch without schema knowledge: maps merge as in RFC 7386 (`$patch:
/// replace|delete`, `$retainKeys`, `$deleteFromPrimitiveList/<list>` honoured); a list merges by key only
/// where the patch carries `$setElementOrder/<list>` (as kubectl writes for merge lists: the merge key is
/// the one key of those entries), else it is replaced.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut p = p.clone();
            p.remove("$patch");
            *target = Value::Object(p);
            return;
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(list) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(remove)) = (t.get_mut(list), v.as_array()) {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        if v.is_null() || v.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(k);
            continue;
        }
        let order = p.get(&format!("$setElementOrder/{k}")).and_then(Value::as_array);
        match (t.get_mut(k), v, order) {
            (Some(Value::Array(cur)), Value::Array(items), Some(order)) => merge_list(cur, items, order),
            (Some(cur), Value::Object(_), _) if cur.is_object() => strategic_merge_patch(cur, v),
            _ => {
                let mut v = v.clone();
                strip_directives(&mut v);
                t.insert(k.clone(), v);
            }
        }
    }
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        t.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(a) => {
            a.retain(|x| x.get("$patch").is_none());
            a.iter_mut().for_each(strip_directives);
        }
        _ => {}
    }
}

fn merge_list(cur: &mut Vec<Value>, items: &[Value], order: &[Value]) {
    let merge_key =
        order.iter().find_map(|o| o.as_object().filter(|m| m.len() == 1).and_then(|m| m.keys().next().cloned()));
    let Some(key) = merge_key else {
        // A primitive merge list: a set union.
        for i in items {
            if !cur.contains(i) {
                cur.push(i.clone());
            }
        }
        return;
    };
    for item in items {
        let id = item.get(&key);
        let pos = cur.iter().position(|c| c.get(&key) == id);
        match (pos, item.get("$patch").and_then(Value::as_str)) {
            (Some(i), Some("delete")) => {
                cur.remove(i);
            }
            (None, Some("delete")) => {}
            (Some(i), _) => strategic_merge_patch(&mut cur[i], item),
            (None, _) => {
                let mut v = item.clone();
                strip_directives(&mut v);
                cur.push(v);
            }
        }
    }
    // The order the patch gives; entries it does not name keep their place at the end.
    let rank = |v: &Value| order.iter().position(|o| o.get(&key) == v.get(&key)).unwrap_or(usize::MAX);
    cur.sort_by_key(rank);
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path.strip_prefix('/').ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok(rest.split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect())
}

fn pointer_get<'a>(doc: &'a Value, tokens: &[String]) -> Option<&'a Value> {
    tokens.iter().try_fold(doc, |v, t| match v {
        Value::Object(m) => m.get(t),
        Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn pointer_parent<'a>(doc: &'a mut Value, tokens: &[String], path: &str) -> Result<&'a mut Value, String> {
    let mut v = doc;
    for t in &tokens[..tokens.len() - 1] {
        v = match v {
            Value::Object(m) => m.get_mut(t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("missing path {path:?}"))?;
    }
    Ok(v)
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let tokens = pointer_tokens(path)?;
    let Some(last) = tokens.last() else {
        *doc = value;
        return Ok(());
    };
    match pointer_parent(doc, &tokens, path)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>().map_err(|_| format!("bad index in {path:?}"))?
            };
            if i > a.len() {
                return Err(format!("index out of range in {path:?}"));
            }
            a.insert(i, value);
        }
        _ => return Err(format!("cannot add at {path:?}")),
    }
    Ok(())
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let tokens = pointer_tokens(path)?;
    let Some(last) = tokens.last() else { return Err("cannot remove the document root".into()) };
    match pointer_parent(doc, &tokens, path)? {
        Value::Object(m) => m.remove(last).ok_or_else(|| format!("missing path {path:?}")),
        Value::Array(a) => {
            let i = last.parse::<usize>().map_err(|_| format!("bad index in {path:?}"))?;
            if i >= a.len() {
                return Err(format!("index out of range in {path:?}"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("missing path {path:?}")),
    }
}

/// Applies a JSON patch (RFC 6902: add, remove, replace, move, copy, test), all or nothing.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array of operations")?;
    let mut out = doc.clone();
    for op in ops {
        let s = |k: &str| op.get(k).and_then(Value::as_str);
        let path = s("path").ok_or("an operation without a path")?;
        let value = || op.get("value").cloned().ok_or_else(|| format!("operation on {path:?} without a value"));
        match s("op").unwrap_or("") {
            "add" => pointer_add(&mut out, path, value()?)?,
            "remove" => {
                pointer_remove(&mut out, path)?;
            }
            "replace" => {
                let tokens = pointer_tokens(path)?;
                if pointer_get(&out, &tokens).is_none() {
                    return Err(format!("replace operation does not apply: doc is missing key: {path}"));
                }
                if tokens.is_empty() {
                    out = value()?;
                } else {
                    pointer_remove(&mut out, path)?;
                    pointer_add(&mut out, path, value()?)?;
                }
            }
            "move" => {
                let from = s("from").ok_or("move without from")?;
                let v = pointer_remove(&mut out, from)?;
                pointer_add(&mut out, path, v)?;
            }
            "copy" => {
                let from = s("from").ok_or("copy without from")?;
                let v = pointer_get(&out, &pointer_tokens(from)?)
                    .cloned()
                    .ok_or_else(|| format!("missing path {from:?}"))?;
                pointer_add(&mut out, path, v)?;
            }
            "test" => {
                if pointer_get(&out, &pointer_tokens(path)?) != Some(&value()?) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    *doc = out;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Structural schemas.

/// What checking an object against a CRD schema found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SchemaCheck {
    /// Validation errors (`type`, `required`, `enum`).
    pub causes: Vec<Cause>,
    /// Unknown fields pruned from the object (paths).
    pub pruned: Vec<String>,
}

/// Validates a custom resource against its `openAPIV3Schema` and prunes unknown fields, as the real API
/// server does (`apiVersion`, `kind`, `metadata` at the root are never pruned nor checked; `null` in a
/// field that is not `nullable` is dropped).
pub fn validate_and_prune(obj: &mut Value, schema: &Value) -> SchemaCheck {
    let mut out = SchemaCheck::default();
    check_node(obj, schema, "", true, &mut out);
    out
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(v: &Value, t: &str) -> bool {
    match (t, v) {
        ("integer", Value::Number(n)) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0),
        ("number", Value::Number(_)) => true,
        ("string", Value::String(_)) | ("boolean", Value::Bool(_)) => true,
        ("object", Value::Object(_)) | ("array", Value::Array(_)) => true,
        _ => false,
    }
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool) == Some(true)
}

fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn short_json(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn check_node(v: &mut Value, schema: &Value, path: &str, root: bool, out: &mut SchemaCheck) {
    let shown = if path.is_empty() { "<root>" } else { path };
    if flag(schema, "x-kubernetes-int-or-string") {
        if !matches!(json_type(v), "integer" | "string") {
            out.causes.push(Cause {
                reason: "FieldValueTypeInvalid",
                message: format!(
                    "Invalid value: \"{}\": {shown} in body must be of type integer-or-string: \"{}\"",
                    json_type(v),
                    json_type(v)
                ),
                field: path.into(),
            });
        }
        return;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str)
        && !type_ok(v, t)
    {
        out.causes.push(Cause {
            reason: "FieldValueTypeInvalid",
            message: format!(
                "Invalid value: \"{}\": {shown} in body must be of type {t}: \"{}\"",
                json_type(v),
                json_type(v)
            ),
            field: path.into(),
        });
        return;
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array)
        && !values.contains(v)
    {
        let supported: Vec<String> = values.iter().map(|x| x.to_string()).collect();
        out.causes.push(Cause {
            reason: "FieldValueNotSupported",
            message: format!("Unsupported value: {}: supported values: {}", short_json(v), supported.join(", ")),
            field: path.into(),
        });
    }
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let embedded = flag(schema, "x-kubernetes-embedded-resource");
    match v {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let child = join_path(path, &k);
                if (root || embedded) && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_schema = props.and_then(|p| p.get(&k)).or(additional.filter(|a| a.is_object()));
                match child_schema {
                    Some(cs) => {
                        if m[&k].is_null() {
                            if !flag(cs, "nullable") {
                                m.remove(&k);
                            }
                            continue;
                        }
                        check_node(m.get_mut(&k).expect("key"), cs, &child, false, out);
                    }
                    None if preserve || additional == Some(&Value::Bool(true)) => {}
                    None => {
                        m.remove(&k);
                        out.pruned.push(child);
                    }
                }
            }
            for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(r) = r.as_str()
                    && !m.contains_key(r)
                {
                    out.causes.push(Cause {
                        reason: "FieldValueRequired",
                        message: "Required value".into(),
                        field: join_path(path, r),
                    });
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    let child = format!("{path}[{i}]");
                    if item.is_null() && flag(item_schema, "nullable") {
                        continue;
                    }
                    check_node(item, item_schema, &child, false, out);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------------
// HTTP.

enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

fn json_response(code: u16, v: &Value, warnings: &[String]) -> Response<Body> {
    let mut b = Response::builder().status(code).header("content-type", "application/json");
    for w in warnings {
        b = b.header("warning", format!("299 - {w:?}"));
    }
    b.body(Body::Full(Some(Bytes::from(serde_json::to_vec(v).expect("serializable"))))).expect("response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status(), &[])
}

async fn handle(shared: Arc<Shared>, stop: watch::Receiver<bool>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let response = route(&shared, stop, &method, &uri, &headers, &body);
    if shared.log {
        let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("-");
        let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or("-");
        eprintln!(
            "test-apiserver: {method} {uri} [content-type {ct}; accept {accept}] -> {}",
            response.status().as_u16()
        );
    }
    response
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn route(
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<Body> {
    let segs: Vec<String> = uri.path().split('/').filter(|s| !s.is_empty()).map(decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let q = parse_query(uri.query());
    let get = method == Method::GET;
    let discovery = |v: Option<Value>| match v {
        Some(v) if get => json_response(200, &v, &[]),
        Some(_) => error_response(&method_not_allowed()),
        None => error_response(&path_not_found()),
    };
    match segs.as_slice() {
        ["version"] => discovery(Some(version_info())),
        ["healthz" | "livez" | "readyz"] => Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .body(Body::Full(Some(Bytes::from_static(b"ok"))))
            .expect("response"),
        ["api"] => discovery(Some(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
        }))),
        ["apis"] => discovery(Some(group_list(&shared.lock()))),
        ["apis", g] => discovery(group_list(&shared.lock())["groups"].as_array().and_then(|gs| {
            gs.iter().find(|x| x["name"] == *g).map(|x| {
                let mut x = x.clone();
                x["kind"] = json!("APIGroup");
                x["apiVersion"] = json!("v1");
                x
            })
        })),
        ["api", "v1"] => discovery(resource_list(&shared.lock(), "", "v1")),
        ["apis", g, v] => discovery(resource_list(&shared.lock(), g, v)),
        ["openapi", "v3"] => discovery(Some(openapi_index(&shared.lock()))),
        ["openapi", "v3", rest @ ..] => discovery(openapi_gv(&shared.lock(), &rest.join("/"))),
        ["api", "v1", rest @ ..] => resource(shared, stop, method, headers, &q, "", "v1", rest, body),
        ["apis", g, v, rest @ ..] => resource(shared, stop, method, headers, &q, g, v, rest, body),
        _ => error_response(&path_not_found()),
    }
}

fn version_info() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-porin-test", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.0", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Groups and their versions, in registration order (built-ins first).
fn groups(state: &State) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for d in state.defs.iter().filter(|d| !d.group.is_empty()) {
        let i = match out.iter().position(|(g, _)| *g == d.group) {
            Some(i) => i,
            None => {
                out.push((d.group.clone(), Vec::new()));
                out.len() - 1
            }
        };
        for v in &d.versions {
            if !out[i].1.contains(v) {
                out[i].1.push(v.clone());
            }
        }
    }
    out
}

fn group_list(state: &State) -> Value {
    let groups: Vec<Value> = groups(state)
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> =
                vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(state: &State, group: &str, version: &str) -> Option<Value> {
    let defs: Vec<&Arc<ResourceDef>> =
        state.defs.iter().filter(|d| d.group == group && d.versions.iter().any(|v| v == version)).collect();
    if defs.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for d in defs {
        let mut r = json!({
            "name": d.plural, "singularName": d.singular, "namespaced": d.namespaced, "kind": d.kind,
            "verbs": ALL_VERBS,
        });
        if !d.short_names.is_empty() {
            r["shortNames"] = json!(d.short_names);
        }
        if !d.categories.is_empty() {
            r["categories"] = json!(d.categories);
        }
        resources.push(r);
        if d.status {
            resources.push(json!({
                "name": format!("{}/status", d.plural), "singularName": "", "namespaced": d.namespaced,
                "kind": d.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

/// The OpenAPI v3 index: the built-in group-versions only. kubectl's field-validation check finds the
/// `fieldValidation` parameter on their PATCH operations; a custom resource's group-version is absent,
/// so kubectl checks the CRD resource's PATCH instead (as it does for CRDs not yet published), and
/// leaves validation to the server.
fn openapi_index(state: &State) -> Value {
    let mut paths = Map::new();
    for d in state.defs.iter().filter(|d| d.crd.is_none()) {
        for v in &d.versions {
            let gv = if d.group.is_empty() { format!("api/{v}") } else { format!("apis/{}/{v}", d.group) };
            paths.insert(gv.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=porin-test")}));
        }
    }
    json!({"paths": paths})
}

/// One group-version's OpenAPI v3 document: a PATCH operation per resource with its
/// `x-kubernetes-group-version-kind` and the `fieldValidation` parameter, and no schemas (kubectl then
/// computes client-side apply patches from its compiled-in types, or as JSON merge patches).
fn openapi_gv(state: &State, gv: &str) -> Option<Value> {
    let (group, version) = match gv.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => (String::new(), v.to_string()),
        ["apis", g, v] => (g.to_string(), v.to_string()),
        _ => return None,
    };
    let mut paths = Map::new();
    for d in state.defs.iter().filter(|d| d.crd.is_none() && d.group == group && d.versions.contains(&version)) {
        let prefix = if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
        let path = if d.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", d.plural)
        } else {
            format!("{prefix}/{}/{{name}}", d.plural)
        };
        paths.insert(
            path,
            json!({"patch": {
                "operationId": format!("patch{}", d.kind),
                "parameters": [
                    {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                    {"name": "force", "in": "query", "schema": {"type": "boolean"}},
                ],
                "requestBody": {"content": {
                    "application/json-patch+json": {"schema": {}},
                    "application/merge-patch+json": {"schema": {}},
                    "application/apply-patch+yaml": {"schema": {}},
                }},
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": d.group, "version": version, "kind": d.kind},
            }}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0-porin-test"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[expect(clippy::too_many_arguments, reason = "one request's parts")]
fn resource(
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
    method: &Method,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    group: &str,
    version: &str,
    rest: &[&str],
    body: &Bytes,
) -> Response<Body> {
    let (ns, rest) =
        if rest.len() >= 3 && rest[0] == "namespaces" && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"))
        {
            (Some(rest[1]), &rest[2..])
        } else {
            (None, rest)
        };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return error_response(&path_not_found()),
    };
    let Some(def) = shared.lock().def(group, version, plural) else { return error_response(&path_not_found()) };
    if ns.is_some() && !def.namespaced {
        return error_response(&path_not_found());
    }
    let status_only = match sub {
        None => false,
        Some("status") if def.status => true,
        Some(_) => return error_response(&path_not_found()),
    };
    let ns_or_empty = ns.unwrap_or("");
    let item_ok = |name: Option<&str>| name.is_some() && (ns.is_some() || !def.namespaced);
    let mut ctx = Ctx {
        http: true,
        field_validation: q.get("fieldValidation").cloned().unwrap_or_default(),
        dry_run: q.get("dryRun").is_some_and(|v| !v.is_empty()),
        warnings: Vec::new(),
    };
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let content_type = content_type.split(';').next().unwrap_or("").trim().to_string();
    let yaml = content_type.contains("yaml");
    let result: Result<(u16, Value), ApiError> = match (method.clone(), name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            return start_watch(shared, stop, &def, version, ns, q);
        }
        (Method::GET, None) => list(shared, &def, version, ns, q),
        (Method::GET, Some(name)) if item_ok(Some(name)) => {
            let state = shared.lock();
            state
                .get(&def, ns_or_empty, name)
                .map(|o| (200, present(o, &def, version)))
                .ok_or_else(|| not_found(&def, name))
        }
        (Method::POST, None) if ns.is_some() || !def.namespaced => parse_body(body, yaml).and_then(|obj| {
            shared
                .write(|state| state.create(&def, version, ns, obj, &mut ctx))
                .map(|o| (201, present(&o, &def, version)))
        }),
        (Method::PUT, Some(name)) if item_ok(Some(name)) => parse_body(body, yaml).and_then(|obj| {
            shared
                .write(|state| state.update(&def, version, ns_or_empty, name, obj, &mut ctx, status_only))
                .map(|o| (200, present(&o, &def, version)))
        }),
        (Method::PATCH, Some(name)) if item_ok(Some(name)) => shared
            .write(|state| state.patch(&def, version, ns_or_empty, name, &content_type, body, &mut ctx, status_only))
            .map(|(o, created)| (if created { 201 } else { 200 }, present(&o, &def, version))),
        (Method::DELETE, Some(name)) if item_ok(Some(name)) && !status_only => {
            // DeleteOptions in JSON or YAML; a protobuf one (typed clients) is not read.
            let options = if body.iter().all(u8::is_ascii_whitespace) || body.starts_with(PROTOBUF_MAGIC) {
                Ok(Value::Null)
            } else {
                parse_body(body, yaml)
            };
            options.and_then(|o| shared.write(|state| state.delete(&def, ns_or_empty, name, &o["preconditions"], &ctx))).map(|o| {
                if def.crd.is_some() {
                    let mut details = name_details(&def, name);
                    details["uid"] = json!(meta_str(&o, "uid"));
                    (200, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}))
                } else {
                    (200, present(&o, &def, version))
                }
            })
        }
        (Method::DELETE, None) if ns.is_some() || !def.namespaced => {
            delete_collection(shared, &def, version, ns, q, &ctx)
        }
        _ => Err(method_not_allowed()),
    };
    match result {
        Ok((code, v)) => json_response(code, &v, &ctx.warnings),
        Err(e) => error_response(&e),
    }
}

fn list(
    shared: &Shared,
    def: &ResourceDef,
    version: &str,
    ns: Option<&str>,
    q: &HashMap<String, String>,
) -> Result<(u16, Value), ApiError> {
    let filter = Filter::from_query(def, ns, q)?;
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let after = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => Some(decode_continue(c).ok_or_else(|| bad_request("continue key is not valid"))?),
        None => None,
    };
    let state = shared.lock();
    let mut items = Vec::new();
    let mut more = 0usize;
    let mut last_key = None;
    for ((n, name), obj) in state.objects(def).into_iter().flatten() {
        if after.as_ref().is_some_and(|(an, aname)| (n, name) <= (an, aname)) || !filter.matches(obj) {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            more += 1;
            continue;
        }
        last_key = Some((n.clone(), name.clone()));
        items.push(present(obj, def, version));
    }
    let mut metadata = json!({"resourceVersion": state.rv.to_string()});
    if more > 0
        && let Some((n, name)) = last_key
    {
        metadata["continue"] = json!(encode_continue(&n, &name));
        metadata["remainingItemCount"] = json!(more);
    }
    Ok((
        200,
        json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(version), "metadata": metadata, "items": items}),
    ))
}

fn encode_continue(ns: &str, name: &str) -> String {
    format!("{ns}/{name}").bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(String, String)> {
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (ns, name) = text.split_once('/')?;
    Some((ns.to_string(), name.to_string()))
}

fn delete_collection(
    shared: &Shared,
    def: &Arc<ResourceDef>,
    version: &str,
    ns: Option<&str>,
    q: &HashMap<String, String>,
    ctx: &Ctx,
) -> Result<(u16, Value), ApiError> {
    let filter = Filter::from_query(def, ns, q)?;
    shared.write(|state| {
        let keys: Vec<(String, String)> = state
            .objects(def)
            .into_iter()
            .flatten()
            .filter(|(_, o)| filter.matches(o))
            .map(|(k, _)| k.clone())
            .collect();
        let mut items = Vec::new();
        for (n, name) in keys {
            if let Ok(o) = state.delete(def, &n, &name, &Value::Null, ctx) {
                items.push(present(&o, def, version));
            }
        }
        let metadata = json!({"resourceVersion": state.rv.to_string()});
        Ok((200, json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(version), "metadata": metadata, "items": items})))
    })
}

// ---------------------------------------------------------------------------------------------------
// Watches.

fn watch_line(ty: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": obj})).expect("serializable");
    line.push(b'\n');
    Bytes::from(line)
}

fn expired(requested: u64, floor: u64) -> Bytes {
    let status = ApiError::new(410, "Expired", format!("too old resource version: {requested} ({floor})")).to_status();
    watch_line("ERROR", &status)
}

/// The watch event a filtered watch sees for a stored event (an object that stops matching is
/// `DELETED`, one that starts matching is `ADDED`, as the real API server's watch cache does).
fn filtered_event(ev: &HistoryEvent, filter: &Filter) -> Option<(EventType, Value)> {
    let now = filter.matches(&ev.obj);
    match ev.ty {
        EventType::Added | EventType::Deleted => now.then(|| (ev.ty, ev.obj.clone())),
        EventType::Modified => {
            let before = ev.prev.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some((EventType::Modified, ev.obj.clone())),
                (false, true) => Some((EventType::Added, ev.obj.clone())),
                (true, false) => {
                    let mut gone = ev.prev.clone().expect("previous object");
                    gone["metadata"]["resourceVersion"] = json!(ev.rv.to_string());
                    Some((EventType::Deleted, gone))
                }
                (false, false) => None,
            }
        }
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
    def: &Arc<ResourceDef>,
    version: &str,
    ns: Option<&str>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let filter = match Filter::from_query(def, ns, q) {
        Ok(f) => f,
        Err(e) => return error_response(&e),
    };
    let requested = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let requested = match requested {
        "" | "0" => None,
        rv => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return error_response(&bad_request(format!("invalid resource version: {rv:?}"))),
        },
    };
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true" || v == "1");
    let timeout =
        q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).filter(|t| *t > 0).map(Duration::from_secs);
    let mut changed = shared.changed.subscribe();
    changed.borrow_and_update();
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut first: Vec<Bytes> = Vec::new();
    let pos;
    {
        let state = shared.lock();
        match requested {
            Some(rv) if !send_initial && rv < state.floor => {
                first.push(expired(rv, state.floor));
                pos = None;
            }
            Some(rv) if !send_initial => pos = Some(rv.min(state.rv)),
            _ => {
                for obj in state.objects(def).into_iter().flatten().map(|(_, o)| o).filter(|o| filter.matches(o)) {
                    first.push(watch_line("ADDED", &present(obj, def, version)));
                }
                if send_initial && bookmarks {
                    let mut bm = bookmark(def, version, state.rv);
                    bm["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                    first.push(watch_line("BOOKMARK", &bm));
                }
                pos = Some(state.rv);
            }
        }
    }
    let shared = shared.clone();
    let def = def.clone();
    let version = version.to_string();
    tokio::spawn(async move {
        for line in first {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let Some(pos) = pos else { return };
        watch_loop(shared, stop, def, version, filter, pos, bookmarks, timeout, tx, changed).await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::Stream(rx))
        .expect("response")
}

fn bookmark(def: &ResourceDef, version: &str, rv: u64) -> Value {
    json!({"kind": def.kind, "apiVersion": def.api_version(version), "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null}})
}

#[expect(clippy::too_many_arguments, reason = "one watch's parts")]
async fn watch_loop(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    def: Arc<ResourceDef>,
    version: String,
    filter: Filter,
    mut pos: u64,
    bookmarks: bool,
    timeout: Option<Duration>,
    tx: mpsc::Sender<Bytes>,
    mut changed: watch::Receiver<u64>,
) {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    let key = def.key();
    loop {
        let mut expired_now = false;
        let lines: Vec<Bytes> = {
            let state = shared.lock();
            if pos < state.floor {
                expired_now = true;
                vec![expired(pos, state.floor)]
            } else {
                let lines = state
                    .history
                    .iter()
                    .filter(|e| e.rv > pos && e.key == key)
                    .filter_map(|e| filtered_event(e, &filter))
                    .map(|(ty, obj)| watch_line(ty.as_str(), &present(&obj, &def, &version)))
                    .collect();
                pos = state.rv;
                lines
            }
        };
        for line in lines {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if expired_now {
            return;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = ticker.tick(), if bookmarks => {
                if tx.send(watch_line("BOOKMARK", &bookmark(&def, &version, pos))).await.is_err() {
                    return;
                }
            }
            _ = async { tokio::time::sleep_until(deadline.expect("deadline")).await }, if deadline.is_some() => return,
            _ = stop.changed() => return,
            _ = tx.closed() => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Protobuf (what kubectl's typed clients send, e.g. `kubectl create namespace`).

const PROTOBUF_MAGIC: &[u8] = b"k8s\0";

enum PbField<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn pb_varint(buf: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*i)?;
        *i += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn pb_fields(buf: &[u8]) -> Option<Vec<(u64, PbField<'_>)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let tag = pb_varint(buf, &mut i)?;
        let field = match tag & 7 {
            0 => PbField::Varint(pb_varint(buf, &mut i)?),
            1 => {
                i += 8;
                PbField::Fixed
            }
            2 => {
                let len = usize::try_from(pb_varint(buf, &mut i)?).ok()?;
                let bytes = buf.get(i..i.checked_add(len)?)?;
                i += len;
                PbField::Bytes(bytes)
            }
            5 => {
                i += 4;
                PbField::Fixed
            }
            _ => return None,
        };
        out.push((tag >> 3, field));
    }
    (i == buf.len()).then_some(out)
}

fn pb_string(b: &[u8]) -> Value {
    json!(String::from_utf8_lossy(b))
}

fn pb_base64(b: &[u8]) -> Value {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &x)| n | u32::from(x) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { T[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    json!(out)
}

/// A `map<string, V>` field's entries into a JSON object.
fn pb_map(entries: &[&[u8]], value: fn(&[u8]) -> Value) -> Option<Value> {
    let mut m = Map::new();
    for e in entries {
        let (mut k, mut v) = (String::new(), value(b""));
        for (n, f) in pb_fields(e)? {
            match (n, f) {
                (1, PbField::Bytes(b)) => k = String::from_utf8_lossy(b).into_owned(),
                (2, PbField::Bytes(b)) => v = value(b),
                _ => {}
            }
        }
        m.insert(k, v);
    }
    Some(Value::Object(m))
}

fn pb_repeated<'a>(fields: &[(u64, PbField<'a>)], n: u64) -> Vec<&'a [u8]> {
    fields
        .iter()
        .filter_map(|(f, v)| match v {
            PbField::Bytes(b) if *f == n => Some(*b),
            _ => None,
        })
        .collect()
}

fn pb_object_meta(buf: &[u8]) -> Option<Value> {
    let fields = pb_fields(buf)?;
    let mut meta = Map::new();
    for (n, key) in [(1, "name"), (2, "generateName"), (3, "namespace")] {
        if let Some(b) = pb_repeated(&fields, n).last().filter(|b| !b.is_empty()) {
            meta.insert(key.into(), pb_string(b));
        }
    }
    for (n, key) in [(11, "labels"), (12, "annotations")] {
        let entries = pb_repeated(&fields, n);
        if !entries.is_empty() {
            meta.insert(key.into(), pb_map(&entries, pb_string)?);
        }
    }
    let finalizers: Vec<Value> = pb_repeated(&fields, 14).into_iter().map(pb_string).collect();
    if !finalizers.is_empty() {
        meta.insert("finalizers".into(), json!(finalizers));
    }
    Some(Value::Object(meta))
}

/// Decodes a protobuf-encoded `Namespace`, `ConfigMap`, `Secret` or `ServiceAccount` (metadata name,
/// generateName, namespace, labels, annotations, finalizers, and the kinds' data fields); others get
/// `415 Unsupported Media Type`.
fn decode_protobuf(body: &[u8]) -> Result<Value, ApiError> {
    let unsupported = |what: &str| {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the test API server does not decode protobuf {what}; send JSON"),
        )
    };
    let envelope = pb_fields(&body[PROTOBUF_MAGIC.len()..]).ok_or_else(|| bad_request("invalid protobuf"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in &envelope {
        match (n, f) {
            (1, PbField::Bytes(tm)) => {
                for (m, g) in pb_fields(tm).ok_or_else(|| bad_request("invalid protobuf"))? {
                    match (m, g) {
                        (1, PbField::Bytes(b)) => api_version = String::from_utf8_lossy(b).into_owned(),
                        (2, PbField::Bytes(b)) => kind = String::from_utf8_lossy(b).into_owned(),
                        _ => {}
                    }
                }
            }
            (2, PbField::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    let fields = pb_fields(raw).ok_or_else(|| bad_request("invalid protobuf"))?;
    let invalid_pb = || bad_request("invalid protobuf");
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    if let Some(m) = pb_repeated(&fields, 1).last() {
        obj["metadata"] = pb_object_meta(m).ok_or_else(invalid_pb)?;
    }
    let bool_field = |n: u64| {
        fields.iter().find_map(|(f, v)| match v {
            PbField::Varint(x) if *f == n => Some(*x != 0),
            _ => None,
        })
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            let spec = pb_repeated(&fields, 2)
                .last()
                .map(|s| pb_fields(s))
                .unwrap_or(Some(Vec::new()))
                .ok_or_else(invalid_pb)?;
            let finalizers: Vec<Value> = pb_repeated(&spec, 1).into_iter().map(pb_string).collect();
            obj["spec"] = if finalizers.is_empty() { json!({}) } else { json!({"finalizers": finalizers}) };
        }
        ("v1", "ConfigMap") => {
            for (n, key, value) in [(2, "data", pb_string as fn(&[u8]) -> Value), (3, "binaryData", pb_base64)] {
                let entries = pb_repeated(&fields, n);
                if !entries.is_empty() {
                    obj[key] = pb_map(&entries, value).ok_or_else(invalid_pb)?;
                }
            }
            if let Some(b) = bool_field(4) {
                obj["immutable"] = json!(b);
            }
        }
        ("v1", "Secret") => {
            for (n, key, value) in [(2, "data", pb_base64 as fn(&[u8]) -> Value), (4, "stringData", pb_string)] {
                let entries = pb_repeated(&fields, n);
                if !entries.is_empty() {
                    obj[key] = pb_map(&entries, value).ok_or_else(invalid_pb)?;
                }
            }
            if let Some(t) = pb_repeated(&fields, 3).last() {
                obj["type"] = pb_string(t);
            }
            if let Some(b) = bool_field(5) {
                obj["immutable"] = json!(b);
            }
        }
        ("v1", "ServiceAccount") => {}
        _ => return Err(unsupported(&format!("{api_version} {kind}"))),
    }
    Ok(obj)
}

// ---------------------------------------------------------------------------------------------------
// Small helpers.

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_u64() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut z = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// Five characters from the alphabet the real API server uses for `generateName`.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut r = random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
            r /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()
    }

    #[test]
    fn label_selectors_parse_and_match() {
        let l = labels(&[("app", "x"), ("tier", "web")]);
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(Some(&l));
        assert!(m(""));
        assert!(m("app=x"));
        assert!(m("app==x"));
        assert!(!m("app=y"));
        assert!(m("app!=y"));
        assert!(m("missing!=y"));
        assert!(m("app in (x, y)"));
        assert!(!m("app in (y,z)"));
        assert!(m("app notin (y)"));
        assert!(m("missing notin (y)"));
        assert!(!m("app notin (x)"));
        assert!(m("app"));
        assert!(!m("missing"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(m("app=x,tier in (web,db),!missing"));
        assert!(!m("app=x,tier=db"));
        assert!(!LabelSelector::parse("app=x").unwrap().matches(None));
        assert!(LabelSelector::parse("app!=x").unwrap().matches(None));
        assert_eq!(
            LabelSelector::parse("a in (b,c),!d").unwrap().requirements,
            vec![("a".into(), LabelOp::In(vec!["b".into(), "c".into()])), ("d".into(), LabelOp::NotExists)]
        );
        for bad in ["a in b", "a in (b", "a b", "=x", "a=(", "a frob (b)"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_selectors_parse_and_match() {
        let pod =
            json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1", "hostNetwork": true}});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod);
        assert!(m("metadata.name=p"));
        assert!(m("metadata.name==p,metadata.namespace=ns"));
        assert!(!m("metadata.name!=p"));
        assert!(m("spec.nodeName=n1"));
        assert!(!m("spec.nodeName=n2"));
        assert!(m("spec.nodeName!=n2"));
        assert!(m("spec.hostNetwork=true"));
        assert!(m("status.phase="));
        assert!(FieldSelector::parse("nonsense").is_err());
        let def = ResourceDef::builtin("", "pods", "Pod", true, &[], true);
        let q = |s: &str| HashMap::from([("fieldSelector".to_string(), s.to_string())]);
        assert!(Filter::from_query(&def, None, &q("spec.nodeName=n1")).is_ok());
        let e = Filter::from_query(&def, None, &q("spec.foo=1")).err().unwrap();
        assert_eq!((e.code, e.message.as_str()), (400, "field label not supported: spec.foo"));
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}}));
        let mut doc = json!({"a": 1});
        merge_patch(&mut doc, &json!(["x"]));
        assert_eq!(doc, json!(["x"]));
    }

    #[test]
    fn strategic_merge_patch_merges_keyed_lists() {
        let mut pod = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["f1", "f2"]}, "spec": {"containers": [
            {"name": "a", "image": "i1", "args": ["x"]}, {"name": "b", "image": "i2"}]}});
        let patch = json!({
            "metadata": {"labels": {"b": "2"}, "$deleteFromPrimitiveList/finalizers": ["f1"]},
            "spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "c"}],
                     "containers": [{"name": "a", "$patch": "delete"}, {"name": "b", "image": "i3"}, {"name": "c", "image": "i4"}]}
        });
        strategic_merge_patch(&mut pod, &patch);
        assert_eq!(
            pod,
            json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["f2"]}, "spec": {"containers": [
                {"name": "b", "image": "i3"}, {"name": "c", "image": "i4"}]}})
        );
        // Without the order directive a list is replaced.
        strategic_merge_patch(&mut pod, &json!({"spec": {"containers": [{"name": "d"}]}}));
        assert_eq!(pod["spec"]["containers"], json!([{"name": "d"}]));
        strategic_merge_patch(&mut pod, &json!({"spec": {"$patch": "replace", "x": 1}}));
        assert_eq!(pod["spec"], json!({"x": 1}));
    }

    #[test]
    fn json_patch_follows_rfc6902() {
        let mut doc = json!({"a": {"b": [1, 2]}, "c": "d"});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/c", "value": "d"},
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "add", "path": "/a/b/0", "value": 0},
                {"op": "replace", "path": "/c", "value": "e"},
                {"op": "remove", "path": "/a/b/1"},
                {"op": "add", "path": "/x~1y", "value": true},
                {"op": "copy", "from": "/c", "path": "/f"},
                {"op": "move", "from": "/f", "path": "/g"},
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": {"b": [0, 2, 3]}, "c": "e", "x/y": true, "g": "e"}));
        let before = doc.clone();
        let e = json_patch(
            &mut doc,
            &json!([{"op": "replace", "path": "/c", "value": 1}, {"op": "test", "path": "/c", "value": 2}]),
        );
        assert!(e.unwrap_err().contains("testing value /c failed"));
        assert_eq!(doc, before, "a failed patch changes nothing");
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(&mut doc, &json!([{"op": "replace", "path": "/nope", "value": 1}])).is_err());
    }

    fn cnp_schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["endpointSelector"], "properties": {
                "endpointSelector": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "port": {"x-kubernetes-int-or-string": true},
                "count": {"type": "integer"},
                "ratio": {"type": "number", "nullable": true},
                "enabled": {"type": "boolean"},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "rules": {"type": "array", "items": {"type": "object", "properties": {"path": {"type": "string"}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "opaque": {"type": "object"},
            }},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        }})
    }

    #[test]
    fn schema_prunes_unknown_fields_and_checks_types() {
        let mut obj = json!({"apiVersion": "cilium.io/v2", "kind": "X", "metadata": {"name": "x", "anything": 1},
            "spec": {"endpointSelector": {"matchLabels": {"a": "b"}}, "port": "http", "count": 3, "ratio": null,
                     "enabled": false, "mode": "a", "rules": [{"path": "/", "extra": 1}], "labels": {"k": "v"},
                     "opaque": {"gone": true}, "unknown": 1, "count2": null},
            "status": {"free": [1]}, "top": 1});
        let check = validate_and_prune(&mut obj, &cnp_schema());
        assert!(check.causes.is_empty(), "{:?}", check.causes);
        assert_eq!(check.pruned, vec!["spec.count2", "spec.opaque.gone", "spec.rules[0].extra", "spec.unknown", "top"]);
        assert_eq!(obj["spec"]["rules"], json!([{"path": "/"}]));
        assert_eq!(obj["spec"]["ratio"], Value::Null, "nullable keeps null");
        assert_eq!(obj["metadata"]["anything"], 1, "metadata is not pruned");
        assert_eq!(obj["status"]["free"], json!([1]));

        let mut bad = json!({"spec": {"endpointSelector": "x", "port": true, "count": 1.5, "enabled": "yes",
            "mode": "c", "rules": {}, "labels": {"k": 1}}});
        let check = validate_and_prune(&mut bad, &cnp_schema());
        let fields: Vec<(&str, &str)> = check.causes.iter().map(|c| (c.field.as_str(), c.reason)).collect();
        assert_eq!(
            fields,
            vec![
                ("spec.count", "FieldValueTypeInvalid"),
                ("spec.enabled", "FieldValueTypeInvalid"),
                ("spec.endpointSelector", "FieldValueTypeInvalid"),
                ("spec.labels.k", "FieldValueTypeInvalid"),
                ("spec.mode", "FieldValueNotSupported"),
                ("spec.port", "FieldValueTypeInvalid"),
                ("spec.rules", "FieldValueTypeInvalid"),
            ]
        );
        assert_eq!(
            check.causes[2].message,
            "Invalid value: \"string\": spec.endpointSelector in body must be of type object: \"string\""
        );
        let mut missing = json!({"spec": {}});
        let check = validate_and_prune(&mut missing, &cnp_schema());
        assert_eq!(check.causes[0].field, "spec.endpointSelector");
        assert_eq!(check.causes[0].message, "Required value");
        let mut count = json!({"spec": {"endpointSelector": {}, "count": 1.5}});
        assert_eq!(validate_and_prune(&mut count, &cnp_schema()).causes[0].field, "spec.count");
    }

    fn crd(scope: &str) -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": scope,
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": cnp_schema()}}]}})
    }

    #[test]
    fn crds_register_validate_and_cascade() {
        let server = ApiServer::start();
        let store = server.store();
        let crd = store.create(crd("Namespaced")).unwrap();
        let conditions = crd["status"]["conditions"].as_array().unwrap();
        assert!(conditions.iter().any(|c| c["type"] == "Established" && c["status"] == "True"));
        assert!(conditions.iter().any(|c| c["type"] == "NamesAccepted" && c["status"] == "True"));
        {
            let state = server.shared.lock();
            let list = resource_list(&state, "example.com", "v1").unwrap();
            assert_eq!(list["resources"][0]["shortNames"], json!(["wd"]));
            assert_eq!(list["resources"][1]["name"], "widgets/status");
        }
        let w = store
            .create(json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
                "spec": {"endpointSelector": {}, "junk": 1}}))
            .unwrap();
        assert_eq!(w["metadata"]["namespace"], "default");
        assert_eq!(w["spec"], json!({"endpointSelector": {}}));
        let e = store
            .create(json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "v"},
                "spec": {"endpointSelector": "x"}}))
            .unwrap_err();
        assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
        assert_eq!(
            e.message,
            "Widget.example.com \"v\" is invalid: spec.endpointSelector: Invalid value: \"string\": spec.endpointSelector in body must be of type object: \"string\""
        );
        assert_eq!(e.details["causes"][0]["field"], "spec.endpointSelector");
        let dup = store.create(w.clone()).unwrap_err();
        assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
        assert_eq!(dup.message, "widgets.example.com \"w\" already exists");
        store.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "widgets.example.com").unwrap();
        assert!(server.shared.lock().def("example.com", "v1", "widgets").is_none());
        assert!(store.get("example.com/v1", "Widget", Some("default"), "w").is_none());
    }

    #[test]
    fn updates_bump_versions_and_detect_conflicts() {
        let server = ApiServer::start();
        let store = server.store();
        let pod = store.create(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "1"}}, "spec": {"x": 1}})).unwrap();
        assert_eq!(pod["metadata"]["generation"], 1);
        let rv1: u64 = meta_str(&pod, "resourceVersion").parse().unwrap();
        let same = store.replace(pod.clone()).unwrap();
        assert_eq!(meta_str(&same, "resourceVersion"), rv1.to_string(), "a no-op write is not a write");
        let mut labelled = pod.clone();
        labelled["metadata"]["labels"]["a"] = json!("2");
        let labelled = store.replace(labelled).unwrap();
        assert_eq!(labelled["metadata"]["generation"], 1, "metadata changes keep the generation");
        let mut stale = pod.clone();
        stale["spec"]["x"] = json!(2);
        assert_eq!(store.replace(stale.clone()).unwrap_err().reason, "Conflict");
        stale["metadata"]["resourceVersion"] = labelled["metadata"]["resourceVersion"].clone();
        let updated = store.replace(stale).unwrap();
        assert_eq!(updated["metadata"]["generation"], 2);
        assert!(meta_str(&updated, "resourceVersion").parse::<u64>().unwrap() > rv1);
        assert_eq!(updated["metadata"]["uid"], pod["metadata"]["uid"]);
        assert_eq!(store.delete("v1", "Pod", None, "p").unwrap()["metadata"]["name"], "p");
        assert_eq!(store.delete("v1", "Pod", None, "p").unwrap_err().message, "pods \"p\" not found");
    }

    #[test]
    fn deletes_check_their_preconditions() {
        let server = ApiServer::start();
        let pod = server
            .store()
            .create(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}))
            .unwrap();
        let mut state = server.shared.lock();
        let def = state.def("", "v1", "pods").unwrap();
        let ctx = Ctx::default();
        for stale in [json!({"uid": "another"}), json!({"resourceVersion": "1"})] {
            let e = state.delete(&def, "default", "p", &stale, &ctx).unwrap_err();
            assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"), "{stale}");
            assert!(e.message.contains("Precondition failed"), "{}", e.message);
        }
        let current = json!({"uid": meta_str(&pod, "uid"), "resourceVersion": meta_str(&pod, "resourceVersion")});
        assert_eq!(state.delete(&def, "default", "p", &current, &ctx).unwrap()["metadata"]["name"], "p");
    }

    #[test]
    fn watch_history_filters_and_expires() {
        let server = ApiServer::start();
        let store = server.store();
        let start = store.resource_version();
        store
            .create(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"app": "x"}}}))
            .unwrap();
        store.merge_patch("v1", "Pod", None, "a", &json!({"metadata": {"labels": {"app": "y"}}})).unwrap();
        store.merge_patch("v1", "Pod", None, "a", &json!({"metadata": {"labels": {"app": "x"}}})).unwrap();
        store.delete("v1", "Pod", None, "a").unwrap();
        let def = server.shared.lock().def("", "v1", "pods").unwrap();
        let q = HashMap::from([("labelSelector".to_string(), "app=x".to_string())]);
        let filter = Filter::from_query(&def, Some("default"), &q).unwrap();
        let state = server.shared.lock();
        let seen: Vec<&str> = state
            .history
            .iter()
            .filter(|e| e.rv > start)
            .filter_map(|e| filtered_event(e, &filter))
            .map(|(t, _)| t.as_str())
            .collect();
        assert_eq!(seen, vec!["ADDED", "DELETED", "ADDED", "DELETED"]);
        drop(state);
        server.compact();
        let state = server.shared.lock();
        assert!(state.history.is_empty());
        assert_eq!(state.floor, state.rv);
        let line = expired(start, state.floor);
        let ev: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(ev["type"], "ERROR");
        assert_eq!(ev["object"]["code"], 410);
        assert_eq!(ev["object"]["reason"], "Expired");
        assert_eq!(ev["object"]["message"], format!("too old resource version: {start} ({})", state.floor));
    }

    #[test]
    fn protobuf_namespaces_decode() {
        fn field(n: u8, b: &[u8]) -> Vec<u8> {
            let mut v = vec![n << 3 | 2, b.len() as u8];
            v.extend_from_slice(b);
            v
        }
        let meta = [field(1, b"foo"), field(11, &[field(1, b"a"), field(2, b"b")].concat())].concat();
        let ns = [field(1, &meta), field(2, &[]), field(3, &[])].concat();
        let type_meta = [field(1, b"v1"), field(2, b"Namespace")].concat();
        let body =
            [PROTOBUF_MAGIC.to_vec(), field(1, &type_meta), field(2, &ns), field(3, b""), field(4, b"")].concat();
        assert_eq!(
            parse_body(&body, false).unwrap(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "foo", "labels": {"a": "b"}}, "spec": {}})
        );
        assert_eq!(pb_base64(b"hello"), json!("aGVsbG8="));
        assert_eq!(pb_base64(b"hi!"), json!("aGkh"));
    }

    #[test]
    fn continue_tokens_and_times() {
        assert_eq!(decode_continue(&encode_continue("ns", "a/b")), Some(("ns".into(), "a/b".into())));
        assert_eq!(decode_continue("zz"), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(new_uid().len(), 36);
        assert_eq!(random_suffix().len(), 5);
    }
}
