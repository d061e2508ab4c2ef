//! Kubernetes mode's inputs: the cluster's objects (from the API server's watches) and the CNI
//! plugin's records of this node's pods, read as the same inputs a standalone agent reads from
//! its endpoints file and policy directory.
//!
//! - Pods become endpoints: labels, annotations, service account, named container ports,
//!   `status.podIPs`, the node (`spec.nodeName`). A pod of this node is attached where its CNI
//!   record says its host-side interface is (`porin cni`, joined by namespace and name); its
//!   endpoint id is that interface's index (unique on the node, and the same after an agent
//!   restart). A pod of this node without a record yet is not attached (reported), nor are
//!   host-network, unscheduled and finished pods.
//! - Namespaces give labels (and `kubernetes.io/metadata.name`) and annotations; Nodes give the
//!   cluster's nodes and their addresses (`host`, `remote-node`).
//! - Policy objects, Services and EndpointSlices are documents for the policy engine, each named
//!   by its kind, namespace and name.
//! - CiliumIdentity objects are the cluster's identities: the reload pins them before numbering
//!   anything ([`porin_kubernetes::identity`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use porin_kubernetes::watch::Objects;

use super::inputs::{EndpointSpec, EndpointsFile, NamedPortSpec, NodeSpec, PolicyDoc};
use crate::cni::Attachment;

/// The label every namespace carries with its own name (set by the API server).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The cluster state and documents `objects` and `attachments` make for node `node`, and what
/// keeps a pod of this node from being an endpoint.
pub(super) fn inputs(
    objects: &Objects,
    attachments: &[Attachment],
    node: &str,
) -> (EndpointsFile, Vec<PolicyDoc>, Vec<String>) {
    let mut errors = Vec::new();
    let mut eps = EndpointsFile {
        namespaces: objects.namespaces.iter().filter_map(|n| namespace_labels(n)).collect(),
        namespace_annotations: objects
            .namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.annotations.clone()?)))
            .collect(),
        nodes: objects.nodes.iter().filter_map(|n| node_spec(n)).collect(),
        ..Default::default()
    };
    for pod in &objects.pods {
        match endpoint(pod, attachments, node) {
            Ok(Some(e)) => eps.endpoints.push(e),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    eps.endpoints.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    // The cluster's identities (CiliumIdentity objects) win over this node's numbering.
    let (identities, passed_over) = porin_kubernetes::identity::assignments(&objects.identities);
    if passed_over > 0 {
        tracing::debug!(passed_over, "Label sets claimed under several numbers: the lowest wins");
    }
    // Numbers held by objects that give no set (unreadable, or a set claimed lower): no set gets
    // them, or its claim would find the number taken and never move on.
    let assigned: std::collections::BTreeSet<_> = identities.iter().map(|(_, id)| *id).collect();
    eps.reserved_identities = objects.identity_numbers.iter().copied().filter(|n| !assigned.contains(n)).collect();
    eps.identities = identities;
    errors.extend(objects.identity_errors.iter().map(|e| format!("passed over: {e}")));
    let documents = objects
        .documents
        .iter()
        .map(|d| PolicyDoc {
            source: d.key.to_string(),
            object: Some((d.key.clone(), d.uid.clone(), d.generation)),
            text: Ok(d.text.clone()),
        })
        .collect();
    (eps, documents, errors)
}

fn namespace_labels(n: &Namespace) -> Option<(String, BTreeMap<String, String>)> {
    let name = n.metadata.name.clone()?;
    let mut labels = n.metadata.labels.clone().unwrap_or_default();
    labels.entry(NAMESPACE_NAME_LABEL.to_owned()).or_insert_with(|| name.clone());
    Some((name, labels))
}

fn node_spec(n: &Node) -> Option<NodeSpec> {
    let name = n.metadata.name.clone()?;
    let ips = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    Some(NodeSpec { name, ips })
}

/// A pod as an endpoint: `None` for pods that are not endpoints (host network, not scheduled,
/// finished); an error for a pod of this node that cannot be attached yet.
fn endpoint(pod: &Pod, attachments: &[Attachment], node: &str) -> Result<Option<EndpointSpec>, String> {
    let (Some(name), Some(namespace)) = (pod.metadata.name.clone(), pod.metadata.namespace.clone()) else {
        return Ok(None);
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let Some(pod_node) = spec.and_then(|s| s.node_name.clone()) else { return Ok(None) };
    if spec.and_then(|s| s.host_network) == Some(true)
        || matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
    {
        return Ok(None);
    }
    let mut ips: Vec<IpAddr> =
        status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
    let named_ports = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPortSpec {
                name: p.name.clone()?,
                port: u16::try_from(p.container_port).ok()?,
                protocol: p.protocol.clone(),
            })
        })
        .collect();
    let (id, ifname) = if pod_node == node {
        let Some(a) = attachments
            .iter()
            .find(|a| a.pod_namespace.as_deref() == Some(&namespace) && a.pod_name.as_deref() == Some(&name))
        else {
            return Err(format!("{namespace}/{name}: no CNI record yet (porin-cni has not run for it): not attached"));
        };
        let ifindex = nix::net::if_::if_nametoindex(a.host_ifname.as_str())
            .map_err(|e| format!("{namespace}/{name}: interface {}: {e}", a.host_ifname))?;
        for ip in &a.ips {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        (ifindex, a.host_ifname.clone())
    } else {
        // Another node's pod: known by its addresses and identity; its id is never a map key here.
        (remote_id(&namespace, &name), String::new())
    };
    Ok(Some(EndpointSpec {
        id,
        name,
        namespace,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        ifname,
        named_ports,
        service_account: spec.and_then(|s| s.service_account_name.clone()),
        annotations: pod.metadata.annotations.clone().unwrap_or_default(),
        policy_audit_mode: false,
        node: Some(pod_node),
    }))
}

/// A non-zero number for another node's pod (FNV-1a of its namespace and name).
fn remote_id(namespace: &str, name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Whether `node` collects unused identities for the cluster: one node does (no N-fold lookups
/// and deletions), the first by name of those whose Ready condition is true (of all nodes, when
/// none reports one). A node that goes away hands the task to the next.
pub(super) fn collects(nodes: &[std::sync::Arc<k8s_openapi::api::core::v1::Node>], node: &str) -> bool {
    let ready = |n: &&std::sync::Arc<k8s_openapi::api::core::v1::Node>| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let names = |pick: &dyn Fn(&&std::sync::Arc<k8s_openapi::api::core::v1::Node>) -> bool| {
        nodes.iter().filter(|n| pick(n)).filter_map(|n| n.metadata.name.as_deref()).min().map(str::to_owned)
    };
    names(&ready).or_else(|| names(&|_| true)).is_some_and(|first| first == node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_collects_the_first_ready_one_by_name() {
        let node = |name: &str, ready: Option<&str>| {
            let status = ready.map(|r| serde_json::json!({"conditions": [{"type": "Ready", "status": r}]}));
            std::sync::Arc::new(
                serde_json::from_value::<k8s_openapi::api::core::v1::Node>(
                    serde_json::json!({"metadata": {"name": name}, "status": status}),
                )
                .unwrap(),
            )
        };
        let nodes = [node("c", Some("True")), node("a", Some("False")), node("b", Some("True"))];
        assert!(collects(&nodes, "b") && !collects(&nodes, "a") && !collects(&nodes, "c"));
        // None reports Ready (the test API server's nodes): the first by name.
        let nodes = [node("n2", None), node("n1", None)];
        assert!(collects(&nodes, "n1") && !collects(&nodes, "n2"));
        assert!(!collects(&[], "n1"), "no nodes known: nobody collects");
    }

    use porin_kubernetes::identity::ClusterIdentity;

    fn pod(v: serde_json::Value) -> std::sync::Arc<Pod> {
        std::sync::Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn pods_become_endpoints_of_their_nodes() {
        let objects = Objects {
            pods: vec![
                pod(serde_json::json!({
                    "metadata": {"name": "deathstar", "namespace": "default", "labels": {"org": "empire"}},
                    "spec": {"nodeName": "n2", "serviceAccountName": "ds", "containers": [
                        {"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
                    "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}]},
                })),
                pod(serde_json::json!({
                    "metadata": {"name": "tiefighter", "namespace": "default"},
                    "spec": {"nodeName": "n1", "containers": []},
                    "status": {"phase": "Running"},
                })),
                pod(serde_json::json!({
                    "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
                    "spec": {"nodeName": "n1", "hostNetwork": true, "containers": []},
                })),
                pod(serde_json::json!({
                    "metadata": {"name": "pending", "namespace": "default"},
                    "spec": {"containers": []},
                })),
            ],
            namespaces: vec![std::sync::Arc::new(
                serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap(),
            )],
            nodes: vec![std::sync::Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "n2"},
                    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}, {"type": "Hostname", "address": "n2"}]},
                }))
                .unwrap(),
            )],
            documents: vec![],
            identities: vec![
                ClusterIdentity { id: 900, labels: vec!["k8s:org=empire".into()] },
                ClusterIdentity { id: 400, labels: vec!["k8s:org=empire".into()] },
            ],
            identity_errors: vec!["CiliumIdentity \"x\": the name is not a number".into()],
            // 900 (a set claimed lower) and 901 (labels that do not read) hold their numbers.
            identity_numbers: vec![400, 900, 901],
        };
        // On n1, with no CNI record for the tiefighter: the deathstar is n2's, the tiefighter waits.
        let (eps, _, errors) = inputs(&objects, &[], "n1");
        assert_eq!(eps.endpoints.len(), 1, "{:?}", eps.endpoints);
        let ds = &eps.endpoints[0];
        assert_eq!((ds.name.as_str(), ds.node.as_deref()), ("deathstar", Some("n2")));
        assert_eq!(ds.ips, vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(ds.named_ports[0].port, 80);
        assert_eq!(ds.service_account.as_deref(), Some("ds"));
        assert!(!eps.is_local(ds, "n1"));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("default/tiefighter: no CNI record"), "{errors:?}");
        assert!(errors[1].contains("passed over: CiliumIdentity \"x\""), "{errors:?}");
        // The cluster's identities, a set claimed twice keeping its lowest number.
        assert_eq!(eps.identities, vec![(vec!["k8s:org=empire".to_owned()], 400)]);
        assert_eq!(eps.reserved_identities, vec![900, 901], "numbers held for no set");
        assert_eq!(eps.namespaces["default"][NAMESPACE_NAME_LABEL], "default");
        assert_eq!(eps.nodes[0].ips, vec!["192.168.0.2".parse::<IpAddr>().unwrap()]);
        // With a record naming the loopback interface (which exists everywhere) it is attached there.
        let a = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/x".into(),
            host_ifname: "lo".into(),
            ips: vec!["10.244.0.7".parse().unwrap()],
            pod_namespace: Some("default".into()),
            pod_name: Some("tiefighter".into()),
            network: "podnet".into(),
        };
        let (eps, _, errors) = inputs(&objects, &[a], "n1");
        assert_eq!(errors.len(), 1, "only the identity passed over: {errors:?}");
        let tf = eps.endpoints.iter().find(|e| e.name == "tiefighter").unwrap();
        assert_eq!((tf.ifname.as_str(), tf.id), ("lo", 1));
        assert_eq!(tf.ips, vec!["10.244.0.7".parse::<IpAddr>().unwrap()]);
    }
}
