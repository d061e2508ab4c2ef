//! The agent's inputs in standalone mode: the endpoints file (JSON, written by `porin lab` or the
//! operator), the policy directory, and what the agent publishes for the proxy (the policy inputs
//! of every applied version, written whole: temporary file, then rename).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use policy_engine::api::Loaded;
use policy_engine::inputs::PolicyInputs;
use policy_engine::resolve::{Endpoint, Environment, NamedPort};
use policy_engine::snapshot::Proto;
use serde::{Deserialize, Serialize};

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
    /// Pod annotations: `policy.cilium.io/proxy-visibility` gives L7 visibility without
    /// enforcement.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// This endpoint's policy is in audit mode: what it drops is recorded `AUDIT` and passes.
    #[serde(default)]
    pub policy_audit_mode: bool,
    /// The node it runs on (one of [`EndpointsFile::nodes`]); absent: this node. An endpoint of
    /// another node is known by its addresses and identity (the ipcache, policy selecting it) and
    /// is not attached here: its own node enforces its policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A node of the cluster, in the cluster state every node reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Its name (the agent's `--node-name`).
    pub name: String,
    /// Its own addresses: identity `host` on that node, `remote-node` on the others.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
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
    /// Namespace annotations (`policy.cilium.io/proxy-visibility` for every pod of the namespace
    /// that has none of its own).
    #[serde(default)]
    pub namespace_annotations: BTreeMap<String, BTreeMap<String, String>>,
    /// Every endpoint's policy is in audit mode (Cilium's `policy-audit-mode`; also the agent's
    /// `--policy-audit-mode`).
    #[serde(default)]
    pub policy_audit_mode: bool,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// The node's uplink interfaces: traffic from outside the node arrives there (the datapath's
    /// uplink program hands the proxy what is its).
    #[serde(default)]
    pub uplinks: Vec<String>,
    /// The cluster's nodes (several nodes reading one file: each takes its own entry's addresses as
    /// `host`, the others' as `remote-node`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSpec>,
    /// Identities handed out by whoever writes the file for the whole cluster (`[labels, id]`, as
    /// the agent publishes them): every node takes them as given, so an endpoint's identity is the
    /// same number on every node. Label sets not listed are allocated by the agent (from 256, the
    /// lowest number free), which agrees across nodes only while they see the same history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<policy_engine::identity::LabelAssignment>,
    /// Cluster numbers taken for no label set given here (Kubernetes mode: CiliumIdentity
    /// objects passed over): numbered to no set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved_identities: Vec<policy_engine::identity::IdentityId>,
    /// Per-node uplinks: `node name → interfaces` (a file shared by several nodes; each attaches
    /// its own and `uplinks`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_uplinks: BTreeMap<String, Vec<String>>,
    /// Mesh-wide authentication (`{mode: required}`, as a policy rule's `authentication`): every
    /// flow between endpoints on different nodes must come through the mTLS tunnel, whatever
    /// the policies say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<policy_engine::api::types::Authentication>,
}

impl EndpointsFile {
    /// This node's addresses (`host`): `node_ips` and its entry in `nodes`.
    pub fn own_ips(&self, node: &str) -> Vec<IpAddr> {
        let mut ips = self.node_ips.clone();
        ips.extend(self.nodes.iter().filter(|n| n.name == node).flat_map(|n| n.ips.iter().copied()));
        ips
    }

    /// The other nodes' addresses (`remote-node`).
    pub fn remote_node_ips(&self, node: &str) -> Vec<IpAddr> {
        self.nodes.iter().filter(|n| n.name != node).flat_map(|n| n.ips.iter().copied()).collect()
    }

    /// Whether `e` runs on the node named `node`: in a file for one node, every endpoint without
    /// a `node` does; in a file that lists `nodes`, only those naming it (one naming none is
    /// nobody's: see the agent's status errors).
    pub fn is_local(&self, e: &EndpointSpec, node: &str) -> bool {
        match &e.node {
            Some(n) => n == node,
            None => self.nodes.is_empty(),
        }
    }

    /// What in a cluster state shared by several nodes would leave an endpoint with no node
    /// enforcing its policy, or node `node` not knowing its own: an endpoint naming no listed node,
    /// an endpoint naming none, `node` not listed. The agent reports them in `status` (`errors`)
    /// and applies the rest.
    pub fn cluster_errors(&self, node: &str) -> Vec<String> {
        let mut errors = Vec::new();
        match self.authentication.as_ref().and_then(|a| a.mode.as_deref()) {
            None | Some("required" | "disabled") => {}
            Some(other) => errors
                .push(format!("authentication.mode {other:?}: required or disabled (mesh-wide authentication is off)")),
        }
        if self.nodes.is_empty() {
            return errors;
        }
        let listed = |n: &str| self.nodes.iter().any(|x| x.name == n);
        if !listed(node) {
            errors.push(format!("this node ({node}) is not in the cluster state's nodes: it attaches no endpoint"));
        }
        for e in &self.endpoints {
            match &e.node {
                None => errors.push(format!(
                    "{}/{}: no node, in a cluster state that lists nodes: no node attaches it",
                    e.namespace, e.name
                )),
                Some(n) if !listed(n) => errors.push(format!(
                    "{}/{}: node {n:?} is not in the cluster state's nodes: no node enforces its policy",
                    e.namespace, e.name
                )),
                Some(_) => {}
            }
        }
        errors
    }

    /// This node's uplinks.
    pub fn own_uplinks(&self, node: &str) -> impl Iterator<Item = &String> {
        self.uplinks.iter().chain(self.node_uplinks.get(node).into_iter().flatten())
    }
}

/// Where the agent's inputs come from.
#[derive(Clone, Debug)]
pub enum InputsConfig {
    /// Standalone mode: an endpoints file and a policy directory, watched.
    Files {
        /// Policy directory (`*.yaml`, `*.yml`).
        policies: PathBuf,
        /// Endpoints file.
        endpoints: PathBuf,
    },
    /// Kubernetes mode: the API server's objects, and the CNI plugin's records of this node's pods.
    Kubernetes {
        /// A kubeconfig (none: in-cluster, then `KUBECONFIG`, then `~/.kube/config`).
        kubeconfig: Option<PathBuf>,
        /// Where `porin cni` records the pods it wired.
        cni_state: PathBuf,
        /// The node's CNI configuration directory to keep `porin-cni` chained in (none: left to
        /// `porin kubernetes install-cni`).
        cni_conf: Option<PathBuf>,
        /// Collect the identities Porin claimed once no pod has used them for this long (none:
        /// never).
        identity_gc: Option<std::time::Duration>,
    },
}

/// One policy document: where it comes from, and its text (or why it could not be read).
#[derive(Clone, Debug)]
pub(super) struct PolicyDoc {
    /// A file's path, or an object's kind, namespace and name.
    pub(super) source: String,
    /// The API object it is (Kubernetes mode): key, uid, generation.
    pub(super) object: Option<(porin_kubernetes::watch::ObjectKey, Option<String>, Option<i64>)>,
    pub(super) text: Result<String, String>,
}

/// The inputs of one reload, whatever their origin.
#[derive(Debug)]
pub(super) struct Inputs {
    pub(super) cluster: EndpointsFile,
    pub(super) documents: Vec<PolicyDoc>,
    /// What keeps some of the cluster from being enforced (reported in status `errors`).
    pub(super) errors: Vec<String>,
}

/// The agent's inputs, opened.
#[derive(Debug)]
pub(super) enum Source {
    Files { policies: PathBuf, endpoints: PathBuf },
    Kubernetes { cluster: porin_kubernetes::watch::Cluster, cni_state: PathBuf },
}

impl Source {
    /// What the cluster state is read from (for messages).
    pub(super) fn origin(&self) -> String {
        match self {
            Source::Files { endpoints, .. } => endpoints.display().to_string(),
            Source::Kubernetes { .. } => "the Kubernetes API".into(),
        }
    }

    /// Reads the inputs as they are now, for node `node`. An endpoints file that does not read
    /// is an error (the last good state keeps enforcing); a policy document that does not read is
    /// that document's error.
    pub(super) fn read(&self, node: &str) -> anyhow::Result<Inputs> {
        match self {
            Source::Files { policies, endpoints } => {
                let text = std::fs::read_to_string(endpoints)
                    .with_context(|| format!("read endpoints file {}", endpoints.display()))?;
                let cluster: EndpointsFile =
                    serde_json::from_str(&text).with_context(|| format!("parse {}", endpoints.display()))?;
                let documents = policy_files(policies)?
                    .into_iter()
                    .map(|path| PolicyDoc {
                        source: path.display().to_string(),
                        object: None,
                        text: std::fs::read_to_string(&path).map_err(|e| format!("cannot read: {e}")),
                    })
                    .collect();
                Ok(Inputs { cluster, documents, errors: vec![] })
            }
            Source::Kubernetes { cluster, cni_state } => {
                let (attachments, bad) = crate::cni::attachments(cni_state)
                    .with_context(|| format!("read the CNI records in {}", cni_state.display()))?;
                let (cluster, documents, mut errors) =
                    super::kubernetes::inputs(&cluster.objects(), &attachments, node);
                errors.extend(bad.into_iter().map(|b| format!("CNI record {b}")));
                Ok(Inputs { cluster, documents, errors })
            }
        }
    }
}

/// A policy document's state.
#[derive(Clone, Debug, Serialize)]
pub(super) struct FileState {
    pub(super) file: String,
    /// The API object it is (Kubernetes mode).
    #[serde(skip)]
    pub(super) object: Option<(porin_kubernetes::watch::ObjectKey, Option<String>, Option<i64>)>,
    pub(super) ok: bool,
    pub(super) errors: Vec<String>,
    #[serde(skip)]
    pub(super) last_good: Option<Loaded>,
    /// The text of the last good version (published to the proxy).
    #[serde(skip)]
    pub(super) last_good_text: Option<String>,
}

/// The policy files of a directory (`*.yaml`, `*.yml`), sorted.
pub(super) fn policy_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
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

/// The engine's environment for an endpoints file, as node `node` sees it.
pub fn environment(eps: &EndpointsFile, node: &str) -> Environment {
    let mut env = Environment::default();
    if let Some(c) = &eps.cluster {
        env.cluster = c.clone();
    }
    env.namespace_labels = eps.namespaces.clone();
    env.namespace_annotations = eps.namespace_annotations.clone();
    env.policy_audit_mode = eps.policy_audit_mode;
    env.remote_node_ips = eps.remote_node_ips(node);
    env.node = (!eps.nodes.is_empty()).then(|| node.to_owned());
    env.nodes = eps.nodes.iter().map(|n| (n.name.clone(), n.ips.clone())).collect();
    env.authentication_required = eps.authentication.as_ref().and_then(|a| a.mode.as_deref()) == Some("required");
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
            annotations: e.annotations.clone(),
            policy_audit_mode: e.policy_audit_mode,
            node: e.node.clone(),
        })
        .collect();
    env
}

/// The version of the inputs last published at `path` (0 when there are none).
pub(super) fn published_version(path: &Path) -> u64 {
    #[derive(Deserialize)]
    struct Version {
        version: u64,
    }
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<Version>(&b).ok()).map_or(0, |v| v.version)
}

/// The identities the last published inputs handed out (a restarted agent keeps them, so
/// conntrack, the proxy and the kernel's FQDN map go on meaning the same peers).
pub(super) fn published_identities(path: &Path) -> Option<policy_engine::identity::IdentityAllocator> {
    let inputs: PolicyInputs = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some(inputs.allocator())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str, node: Option<&str>) -> EndpointSpec {
        serde_json::from_value(serde_json::json!({
            "id": 1, "name": name, "namespace": "default", "ifname": "x", "node": node,
        }))
        .unwrap()
    }

    #[test]
    fn a_shared_cluster_state_names_every_endpoints_node() {
        let mut eps =
            EndpointsFile { endpoints: vec![endpoint("a", None), endpoint("b", Some("n2"))], ..Default::default() };
        // One node's file: an endpoint without a node is this node's.
        assert!(eps.is_local(&eps.endpoints[0], "n1"));
        assert!(!eps.is_local(&eps.endpoints[1], "n1"));
        assert!(eps.cluster_errors("n1").is_empty());
        // A file listing nodes: only endpoints naming this node are its own; the rest is reported.
        eps.nodes = vec![NodeSpec { name: "n1".into(), ips: vec![] }];
        assert!(!eps.is_local(&eps.endpoints[0], "n1"));
        let errors = eps.cluster_errors("n3");
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("this node (n3)"));
        assert!(errors[1].contains("default/a: no node"));
        assert!(errors[2].contains("default/b: node \"n2\""));
        eps.nodes.push(NodeSpec { name: "n2".into(), ips: vec!["10.0.0.2".parse().unwrap()] });
        eps.endpoints.remove(0);
        assert!(eps.cluster_errors("n1").is_empty());
        assert!(eps.is_local(&eps.endpoints[0], "n2"));
        assert_eq!(eps.remote_node_ips("n1"), vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert!(eps.own_ips("n2").contains(&"10.0.0.2".parse().unwrap()));
    }
}
