//! Serde types for the policy CRDs, field for field as users write them (`cilium.io/v2`
//! CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy, `networking.k8s.io/v1` NetworkPolicy,
//! `cilium.io/v2` CiliumCIDRGroup).
//!
//! These are the unvalidated wire form: every field is optional, lists keep "absent" apart from
//! "empty" (Cilium gives them different meanings), unknown fields are errors. `api::convert` turns them
//! into the validated model.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `metadata`: what policy needs, and the other fields of Kubernetes' `ObjectMeta` (accepted as
/// `kubectl get -o yaml` prints them, not used). Anything else is an error, as everywhere in a
/// policy: a misspelt `namespace` must not silently put a policy into `default`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    pub name: Option<String>,
    /// Namespace (namespaced kinds).
    pub namespace: Option<String>,
    /// Object labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations (not used).
    pub annotations: Option<serde_yaml::Value>,
    /// Not used.
    pub generate_name: Option<serde_yaml::Value>,
    /// Not used.
    pub uid: Option<serde_yaml::Value>,
    /// Not used.
    pub resource_version: Option<serde_yaml::Value>,
    /// Not used.
    pub generation: Option<serde_yaml::Value>,
    /// Not used.
    pub creation_timestamp: Option<serde_yaml::Value>,
    /// Not used.
    pub deletion_timestamp: Option<serde_yaml::Value>,
    /// Not used.
    pub deletion_grace_period_seconds: Option<serde_yaml::Value>,
    /// Not used.
    pub self_link: Option<serde_yaml::Value>,
    /// Not used.
    pub owner_references: Option<serde_yaml::Value>,
    /// Not used.
    pub finalizers: Option<serde_yaml::Value>,
    /// Not used.
    pub managed_fields: Option<serde_yaml::Value>,
}

/// A CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CiliumPolicyDoc {
    /// `cilium.io/v2`.
    pub api_version: String,
    /// Kind.
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// One rule.
    pub spec: Option<Rule>,
    /// Several rules.
    pub specs: Option<Vec<Rule>>,
    /// Accepted at top level for compatibility with Cilium's examples; ignored.
    pub description: Option<String>,
    /// Status written by the cluster; ignored.
    pub status: Option<serde::de::IgnoredAny>,
}

/// A label selector.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    /// `key: value` requirements.
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Expression requirements.
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// Key (`source:key` or `key`).
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub operator: String,
    /// Values for `In` / `NotIn`.
    pub values: Option<Vec<String>>,
}

/// A Cilium rule (`spec` / `specs[i]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// Endpoints the rule applies to.
    pub endpoint_selector: Option<LabelSelector>,
    /// Nodes the rule applies to (host policy).
    pub node_selector: Option<LabelSelector>,
    /// Ingress allows.
    pub ingress: Option<Vec<IngressRule>>,
    /// Ingress denies.
    pub ingress_deny: Option<Vec<IngressDenyRule>>,
    /// Egress allows.
    pub egress: Option<Vec<EgressRule>>,
    /// Egress denies.
    pub egress_deny: Option<Vec<EgressDenyRule>>,
    /// Rule labels.
    pub labels: Option<Vec<RuleLabel>>,
    /// Free text.
    pub description: Option<String>,
    /// Per-direction default-deny switch.
    pub enable_default_deny: Option<DefaultDeny>,
    /// Policy-verdict logging.
    pub log: Option<LogConfig>,
}

/// A rule label (`{key, value, source}`).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct RuleLabel {
    /// Key.
    pub key: String,
    /// Value.
    pub value: Option<String>,
    /// Source.
    pub source: Option<String>,
}

/// `enableDefaultDeny`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct DefaultDeny {
    /// Ingress switch.
    pub ingress: Option<bool>,
    /// Egress switch.
    pub egress: Option<bool>,
}

/// `log`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Log value attached to verdicts.
    pub value: Option<String>,
}

/// An `ingress` element.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressRule {
    /// Peer endpoints.
    pub from_endpoints: Option<Vec<LabelSelector>>,
    /// Deprecated; rejected.
    pub from_requires: Option<Vec<LabelSelector>>,
    /// Peer CIDRs.
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    /// Peer CIDRs with exceptions.
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    /// Peer entities.
    pub from_entities: Option<Vec<String>>,
    /// Cloud provider groups.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::api::schema::any_list"))]
    pub from_groups: Option<Vec<serde_yaml::Value>>,
    /// Peer nodes.
    pub from_nodes: Option<Vec<LabelSelector>>,
    /// Ports (and L7 rules).
    pub to_ports: Option<Vec<PortRule>>,
    /// ICMP types.
    pub icmps: Option<Vec<IcmpRule>>,
    /// Mutual authentication.
    pub authentication: Option<Authentication>,
}

/// An `ingressDeny` element.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressDenyRule {
    /// Peer endpoints.
    pub from_endpoints: Option<Vec<LabelSelector>>,
    /// Deprecated; rejected.
    pub from_requires: Option<Vec<LabelSelector>>,
    /// Peer CIDRs.
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    /// Peer CIDRs with exceptions.
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    /// Peer entities.
    pub from_entities: Option<Vec<String>>,
    /// Cloud provider groups.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::api::schema::any_list"))]
    pub from_groups: Option<Vec<serde_yaml::Value>>,
    /// Peer nodes.
    pub from_nodes: Option<Vec<LabelSelector>>,
    /// Ports (no L7).
    pub to_ports: Option<Vec<PortDenyRule>>,
    /// ICMP types.
    pub icmps: Option<Vec<IcmpRule>>,
}

/// An `egress` element.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    /// Peer endpoints.
    pub to_endpoints: Option<Vec<LabelSelector>>,
    /// Deprecated; rejected.
    pub to_requires: Option<Vec<LabelSelector>>,
    /// Peer CIDRs.
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    /// Peer CIDRs with exceptions.
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    /// Peer entities.
    pub to_entities: Option<Vec<String>>,
    /// Kubernetes services.
    pub to_services: Option<Vec<ServiceSelector>>,
    /// DNS names.
    #[serde(rename = "toFQDNs")]
    pub to_fqdns: Option<Vec<FqdnSelector>>,
    /// Cloud provider groups.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::api::schema::any_list"))]
    pub to_groups: Option<Vec<serde_yaml::Value>>,
    /// Peer nodes.
    pub to_nodes: Option<Vec<LabelSelector>>,
    /// Ports (and L7 rules).
    pub to_ports: Option<Vec<PortRule>>,
    /// ICMP types.
    pub icmps: Option<Vec<IcmpRule>>,
    /// Mutual authentication.
    pub authentication: Option<Authentication>,
}

/// An `egressDeny` element.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressDenyRule {
    /// Peer endpoints.
    pub to_endpoints: Option<Vec<LabelSelector>>,
    /// Deprecated; rejected.
    pub to_requires: Option<Vec<LabelSelector>>,
    /// Peer CIDRs.
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    /// Peer CIDRs with exceptions.
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    /// Peer entities.
    pub to_entities: Option<Vec<String>>,
    /// Kubernetes services.
    pub to_services: Option<Vec<ServiceSelector>>,
    /// Cloud provider groups.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::api::schema::any_list"))]
    pub to_groups: Option<Vec<serde_yaml::Value>>,
    /// Peer nodes.
    pub to_nodes: Option<Vec<LabelSelector>>,
    /// Ports (no L7).
    pub to_ports: Option<Vec<PortDenyRule>>,
    /// ICMP types.
    pub icmps: Option<Vec<IcmpRule>>,
}

/// A `CIDRSet` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CidrRule {
    /// The prefix.
    pub cidr: Option<String>,
    /// A CiliumCIDRGroup by name.
    pub cidr_group_ref: Option<String>,
    /// CiliumCIDRGroups by labels.
    pub cidr_group_selector: Option<LabelSelector>,
    /// Prefixes inside `cidr` to leave out.
    pub except: Option<Vec<String>>,
}

/// `toServices` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSelector {
    /// A service by name.
    pub k8s_service: Option<K8sServiceName>,
    /// Services by labels.
    pub k8s_service_selector: Option<K8sServiceSelector>,
}

/// `k8sService`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct K8sServiceName {
    /// Service name.
    pub service_name: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
}

/// `k8sServiceSelector`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct K8sServiceSelector {
    /// Label selector over services.
    pub selector: LabelSelector,
    /// Namespace.
    pub namespace: Option<String>,
}

/// `toFQDNs` entry, and a DNS L7 rule.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FqdnSelector {
    /// Exact name.
    pub match_name: Option<String>,
    /// Pattern with `*`.
    pub match_pattern: Option<String>,
}

/// A port: a number or a name (named ports), written as a string in the CRD; YAML integers are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[cfg_attr(feature = "schema", schemars(schema_with = "crate::api::schema::int_or_string"))]
#[cfg_attr(feature = "schema", serde(transparent))]
pub struct PortString(pub String);

impl<'de> Deserialize<'de> for PortString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortString;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number or name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortString, E> {
                Ok(PortString(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortString, E> {
                Ok(PortString(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortString, E> {
                Ok(PortString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A `ports` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortProtocol {
    /// Port number or name; empty or `0` means all ports.
    pub port: Option<PortString>,
    /// Last port of a range.
    pub end_port: Option<i64>,
    /// `TCP`, `UDP`, `SCTP`, `ANY` (empty = `ANY`).
    pub protocol: Option<String>,
}

/// A `toPorts` entry of an allow rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortRule {
    /// Ports.
    pub ports: Option<Vec<PortProtocol>>,
    /// TLS termination towards the client.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::api::schema::any"))]
    #[serde(rename = "terminatingTLS")]
    pub terminating_tls: Option<serde_yaml::Value>,
    /// TLS origination towards the server.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::api::schema::any"))]
    #[serde(rename = "originatingTLS")]
    pub originating_tls: Option<serde_yaml::Value>,
    /// SNI allow-list.
    pub server_names: Option<Vec<String>>,
    /// Custom Envoy listener.
    pub listener: Option<Listener>,
    /// L7 rules.
    pub rules: Option<L7Rules>,
}

/// A `toPorts` entry of a deny rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct PortDenyRule {
    /// Ports.
    pub ports: Option<Vec<PortProtocol>>,
}

/// `listener`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Listener {
    /// The CiliumEnvoyConfig holding the listener.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::api::schema::any"))]
    pub envoy_config: Option<serde_yaml::Value>,
    /// Listener name.
    pub name: Option<String>,
    /// Priority.
    pub priority: Option<i64>,
}

/// `rules`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L7Rules {
    /// HTTP rules.
    pub http: Option<Vec<HttpRule>>,
    /// Kafka rules.
    pub kafka: Option<Vec<KafkaRule>>,
    /// DNS rules.
    pub dns: Option<Vec<FqdnSelector>>,
    /// Generic proxylib parser name (removed in Cilium 1.20).
    pub l7proto: Option<String>,
    /// Generic proxylib rules.
    pub l7: Option<Vec<BTreeMap<String, String>>>,
}

/// An HTTP rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRule {
    /// Method regex.
    pub method: Option<String>,
    /// Path regex.
    pub path: Option<String>,
    /// Host regex.
    pub host: Option<String>,
    /// `"Name: value"` or `"Name"`.
    pub headers: Option<Vec<String>>,
    /// Header matches with actions.
    pub header_matches: Option<Vec<HeaderMatch>>,
}

/// `headerMatches` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name.
    pub name: Option<String>,
    /// Expected value.
    pub value: Option<String>,
    /// Secret holding the expected value.
    pub secret: Option<SecretRef>,
    /// `""`, `LOG`, `ADD`, `DELETE`, `REPLACE`.
    pub mismatch: Option<String>,
}

/// A secret reference.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// Namespace (defaults to the policy's).
    pub namespace: Option<String>,
    /// Name.
    pub name: Option<String>,
}

/// A Kafka rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KafkaRule {
    /// `produce` / `consume`.
    pub role: Option<String>,
    /// API key name.
    pub api_key: Option<String>,
    /// API version (string in the CRD; integers accepted).
    pub api_version: Option<PortString>,
    /// Client id.
    #[serde(rename = "clientID")]
    pub client_id: Option<String>,
    /// Topic.
    pub topic: Option<String>,
}

/// An `icmps` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct IcmpRule {
    /// Types.
    pub fields: Option<Vec<IcmpField>>,
}

/// One ICMP type.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct IcmpField {
    /// `IPv4` (default) or `IPv6`.
    pub family: Option<String>,
    /// Type number or name (`EchoRequest`).
    #[serde(rename = "type")]
    pub icmp_type: Option<PortString>,
}

/// `authentication`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Authentication {
    /// `disabled`, `required`, `test-always-fail`.
    pub mode: Option<String>,
}

// === Kubernetes NetworkPolicy ===

/// A `networking.k8s.io/v1` NetworkPolicy document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyDoc {
    /// `networking.k8s.io/v1`.
    pub api_version: String,
    /// `NetworkPolicy`.
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: Option<NetworkPolicySpec>,
    /// Status; ignored.
    pub status: Option<serde::de::IgnoredAny>,
}

/// NetworkPolicy `spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Selected pods.
    pub pod_selector: Option<LabelSelector>,
    /// Ingress rules.
    pub ingress: Option<Vec<NetworkPolicyIngressRule>>,
    /// Egress rules.
    pub egress: Option<Vec<NetworkPolicyEgressRule>>,
    /// `Ingress` / `Egress`.
    pub policy_types: Option<Vec<String>>,
}

/// NetworkPolicy ingress rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyIngressRule {
    /// Ports.
    pub ports: Option<Vec<NetworkPolicyPort>>,
    /// Peers.
    pub from: Option<Vec<NetworkPolicyPeer>>,
}

/// NetworkPolicy egress rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyEgressRule {
    /// Ports.
    pub ports: Option<Vec<NetworkPolicyPort>>,
    /// Peers.
    pub to: Option<Vec<NetworkPolicyPeer>>,
}

/// NetworkPolicy peer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyPeer {
    /// Pods.
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces.
    pub namespace_selector: Option<LabelSelector>,
    /// CIDR block.
    pub ip_block: Option<IpBlock>,
}

/// `ipBlock`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    /// Prefix.
    pub cidr: String,
    /// Exceptions.
    pub except: Option<Vec<String>>,
}

/// NetworkPolicy port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyPort {
    /// `TCP` (default), `UDP`, `SCTP`.
    pub protocol: Option<String>,
    /// Number or name.
    pub port: Option<PortString>,
    /// Range end.
    pub end_port: Option<i64>,
}

// === CiliumCIDRGroup ===

/// A `CiliumCIDRGroup` document (referenced by `cidrGroupRef` / `cidrGroupSelector`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CidrGroupDoc {
    /// `cilium.io/v2` or `cilium.io/v2alpha1`.
    pub api_version: String,
    /// `CiliumCIDRGroup`.
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: CidrGroupSpec,
}

/// `CiliumCIDRGroup.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CidrGroupSpec {
    /// The prefixes.
    #[serde(rename = "externalCIDRs")]
    pub external_cidrs: Vec<String>,
}
