//! The custom resources Porin reads, and their CRDs.
//!
//! Each resource's body is the policy engine's wire type ([`policy_engine::api::types`]): the CRD's
//! schema is derived from it, field for field, by schemars with kube's structural rewriters, so a
//! field the engine reads is a field the API server keeps (the API server prunes fields the schema
//! does not declare). CiliumNetworkPolicy carries `spec` and `specs` at the top level, as Cilium's
//! does (`no_spec`). Cilium's CRDs declare ports as strings; these accept integers too, as the
//! policy files do.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::core::CustomResourceExt as _;
use policy_engine::api::types::{CidrGroupSpec, Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A CiliumNetworkPolicy's body: one rule (`spec`), or several (`specs`).
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumNetworkPolicy",
    plural = "ciliumnetworkpolicies",
    shortname = "cnp",
    shortname = "ciliumnp",
    category = "cilium",
    category = "ciliumpolicy",
    namespaced,
    no_spec,
    doc = "CiliumNetworkPolicy: L3-L7 rules for the endpoints of one namespace (`cilium.io/v2`, read by Porin).",
    status = "PolicyStatus"
)]
pub struct CiliumNetworkPolicyBody {
    /// One rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Rule>,
    /// Several rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specs: Option<Vec<Rule>>,
}

/// A CiliumClusterwideNetworkPolicy's body (as a CiliumNetworkPolicy's, not namespaced).
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumClusterwideNetworkPolicy",
    plural = "ciliumclusterwidenetworkpolicies",
    shortname = "ccnp",
    category = "cilium",
    category = "ciliumpolicy",
    no_spec,
    doc = "CiliumClusterwideNetworkPolicy: L3-L7 rules for endpoints of every namespace and for nodes.",
    status = "PolicyStatus"
)]
pub struct CiliumClusterwideNetworkPolicyBody {
    /// One rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Rule>,
    /// Several rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specs: Option<Vec<Rule>>,
}

/// A CiliumCIDRGroup's spec (prefixes policies name with `cidrGroupRef` / `cidrGroupSelector`).
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumCIDRGroup",
    plural = "ciliumcidrgroups",
    shortname = "ccg",
    category = "cilium",
    doc = "CiliumCIDRGroup: a named set of prefixes that policies select by name or labels."
)]
pub struct CiliumCidrGroupBody {
    /// The prefixes.
    #[serde(flatten)]
    pub spec: CidrGroupSpec,
}

/// A CiliumIdentity's body: the security labels a cluster-wide identity stands for. The object's
/// name is the number (Cilium's shape: `security-labels` at the top level, cluster-scoped).
#[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumIdentity",
    plural = "ciliumidentities",
    shortname = "ciliumid",
    category = "cilium",
    no_spec,
    doc = "CiliumIdentity: a numeric security identity (the object's name) and the labels it stands for, the same on every node."
)]
pub struct CiliumIdentityBody {
    /// The security labels (`source:key` to value), e.g. `k8s:app: web`.
    #[serde(rename = "security-labels", default)]
    pub security_labels: BTreeMap<String, String>,
}

/// What the nodes report on a policy object (Cilium's `status.nodes`): each node's agent writes
/// its own entry, so nodes never overwrite each other.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyStatus {
    /// Per node: whether the node enforces this object's rules.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, NodeStatus>,
}

/// One node's view of a policy object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The object was read and its rules are in force on this node.
    pub ok: bool,
    /// The rules are enforced (false: the object is invalid and its last good version, or
    /// nothing, enforces).
    pub enforcing: bool,
    /// Why the object is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The node's policy version that took this object in.
    #[serde(default)]
    pub local_policy_revision: u64,
    /// When the node wrote this entry (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
}

/// Every CRD Porin reads, as one multi-document YAML stream (what `config/kubernetes/crds.yaml`
/// holds: `porin kubernetes crds` prints it).
pub fn crds_yaml() -> anyhow::Result<String> {
    let mut out = String::from("# Generated by `porin kubernetes crds` from the policy engine's types: do not edit.\n");
    for crd in [
        CiliumNetworkPolicy::crd(),
        CiliumClusterwideNetworkPolicy::crd(),
        CiliumCIDRGroup::crd(),
        CiliumIdentity::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn the_committed_crds_are_the_generated_ones() {
        let path = repo().join("config/kubernetes/crds.yaml");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == crds_yaml().unwrap(),
            "{} is not what the types generate: run `cargo run -p porin -- kubernetes crds > config/kubernetes/crds.yaml`",
            path.display()
        );
    }

    #[test]
    fn a_policy_example_reads_as_the_custom_resource() {
        // The star wars policy, as users write it, is a CiliumNetworkPolicy of these types.
        let text = std::fs::read_to_string(repo().join("config/examples/starwars/l3-l4-l7.yaml")).unwrap();
        let doc = text.split("\n---").find(|d| d.contains("CiliumNetworkPolicy")).unwrap();
        let cnp: CiliumNetworkPolicy = serde_yaml::from_str(doc).unwrap();
        let rule = cnp.spec.spec.as_ref().unwrap();
        assert!(rule.endpoint_selector.is_some());
        assert!(rule.ingress.as_ref().is_some_and(|i| !i.is_empty()));
    }

    #[test]
    fn the_schema_is_structural() {
        let crd = CiliumNetworkPolicy::crd();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let root = &schema["openAPIV3Schema"];
        assert_eq!(root["type"], "object");
        // spec and specs at the top level, status beside them.
        for p in ["spec", "specs", "status"] {
            assert!(root["properties"][p].is_object(), "{p}: {root}");
        }
        let text = schema.to_string();
        // Kubernetes refuses these in a structural schema.
        for bad in ["\"$ref\"", "\"additionalProperties\":false", "\"definitions\"", "\"$schema\"", "\"anyOf\""] {
            assert!(!text.contains(bad), "{bad} in {text}");
        }
        let port = &root["properties"]["spec"]["properties"]["ingress"]["items"]["properties"]["toPorts"]["items"]["properties"]
            ["ports"]["items"]["properties"]["port"];
        assert_eq!(port["x-kubernetes-int-or-string"], true, "{port}");
    }
}
