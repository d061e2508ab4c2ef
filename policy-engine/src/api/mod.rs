//! The API form of policy: multi-document YAML files as users `kubectl apply` them, parsed into the
//! validated model.
//!
//! A file may hold any number of CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy and
//! CiliumCIDRGroup documents. Each document is validated on its own: a bad document is reported with
//! its file, document number, object name and field path, and never takes the other documents with it.

mod convert;
mod de;
mod envelope;
#[cfg(feature = "schema")]
mod schema;
pub mod types;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_yaml::Value;

pub use convert::Problem;
use convert::{Ctx, Scope};
pub use envelope::DocKind;
use envelope::NotPolicy;
pub use envelope::OtherObject;

use crate::labels::{self, Label, LabelKey, Labels};
use crate::model::{CidrGroup, Policy, PolicyKind, PolicyRef, Rule, Source};
use crate::services::{self, Service, ServiceDef, SliceDef};

/// A policy document that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// File name as given.
    pub file: String,
    /// 1-based document number, when the problem is inside one.
    pub document: Option<usize>,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    /// Field path, when known.
    pub path: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        match &self.path {
            Some(p) if !p.is_empty() => write!(f, ": {p}: {}", self.message),
            _ => write!(f, ": {}", self.message),
        }
    }
}

/// Settings that affect how documents are read.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Namespace of namespaced objects without `metadata.namespace` (kubectl's default: `default`).
    pub default_namespace: String,
    /// The local cluster name (peers are confined to it, as `policy-default-local-cluster`).
    pub cluster: String,
    /// Documents of other kinds (Deployments, ConfigMaps, anything Porin does not read) are listed
    /// in [`Loaded::other_objects`] and not errors. Near misses of a policy kind (wrong case, an
    /// obsolete version) stay errors.
    pub skip_other_kinds: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { default_namespace: "default".into(), cluster: labels::DEFAULT_CLUSTER.into(), skip_other_kinds: false }
    }
}

/// Everything read from one or more files.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Valid policies.
    pub policies: Vec<Policy>,
    /// CIDR groups.
    pub cidr_groups: Vec<CidrGroup>,
    /// Documents that were rejected.
    pub errors: Vec<PolicyError>,
    /// Documents of other kinds: errors too, unless [`LoadOptions::skip_other_kinds`].
    pub other_objects: Vec<OtherObject>,
    /// Services (`v1 Service`).
    pub services: Vec<ServiceDef>,
    /// Their backends (`discovery.k8s.io/v1 EndpointSlice`).
    pub endpoint_slices: Vec<SliceDef>,
}

impl Loaded {
    /// Adds another load result.
    pub fn extend(&mut self, other: Loaded) {
        self.policies.extend(other.policies);
        self.cidr_groups.extend(other.cidr_groups);
        self.errors.extend(other.errors);
        self.other_objects.extend(other.other_objects);
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
    }

    /// The services with their backends, and a warning per slice of no service.
    pub fn services(&self) -> (Vec<Service>, Vec<String>) {
        services::join(&self.services, &self.endpoint_slices)
    }

    /// Warnings of every loaded policy, prefixed with where they are.
    pub fn warnings(&self) -> Vec<String> {
        self.policies
            .iter()
            .flat_map(|p| {
                p.warnings.iter().map(move |w| {
                    format!("{}: document {} ({} {}): {w}", p.source.file, p.source.document, p.id.kind, p.id)
                })
            })
            .collect()
    }
}

/// Reads a file. An unreadable file is one error.
pub fn load_file(path: &Path, opts: &LoadOptions) -> Loaded {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&name, &text, opts),
        Err(e) => Loaded {
            errors: vec![PolicyError {
                file: name,
                document: None,
                object: None,
                path: None,
                message: format!("cannot read file: {e}"),
            }],
            ..Default::default()
        },
    }
}

/// Parses multi-document YAML text.
///
/// ```
/// use policy_engine::api::{load_str, LoadOptions};
/// let text = r#"
/// apiVersion: cilium.io/v2
/// kind: CiliumNetworkPolicy
/// metadata: {name: rule1}
/// spec:
///   endpointSelector: {matchLabels: {org: empire, class: deathstar}}
///   ingress:
///   - fromEndpoints: [{matchLabels: {org: empire}}]
///     toPorts: [{ports: [{port: "80", protocol: TCP}]}]
/// ---
/// apiVersion: cilium.io/v2
/// kind: CiliumNetworkPolicy
/// metadata: {name: broken}
/// spec:
///   endpointSelector: {}
///   ingress: [{fromEntities: [galaxy]}]
/// "#;
/// let loaded = load_str("sw.yaml", text, &LoadOptions::default());
/// assert_eq!(loaded.policies.len(), 1);
/// assert_eq!(
///     loaded.errors[0].to_string(),
///     "sw.yaml: document 2 (CiliumNetworkPolicy default/broken): spec.ingress[0].fromEntities[0]: unsupported entity: galaxy"
/// );
/// ```
pub fn load_str(file: &str, text: &str, opts: &LoadOptions) -> Loaded {
    let mut out = Loaded::default();
    let file_arc: Arc<str> = Arc::from(file);
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(PolicyError {
                    file: file.into(),
                    document: Some(document),
                    object: None,
                    path: None,
                    message: format!("invalid YAML: {e}"),
                });
                break;
            }
        };
        let source = Source { file: file_arc.clone(), document };
        load_document(&value, source, opts, &mut out);
    }
    out
}

fn load_document(value: &Value, source: Source, opts: &LoadOptions, out: &mut Loaded) {
    let error = |object: Option<String>, path: Option<String>, message: String| PolicyError {
        file: source.file.to_string(),
        document: Some(source.document),
        object,
        path,
        message,
    };
    let map = match value {
        Value::Null => return,
        Value::Mapping(m) => m,
        _ => {
            out.errors.push(error(None, None, "a document must be a mapping (an object)".into()));
            return;
        }
    };
    let doc_kind = match envelope::classify(map) {
        Ok(k) => k,
        Err(NotPolicy::Mistake { path, message }) => {
            out.errors.push(error(None, path, message));
            return;
        }
        Err(NotPolicy::Other) => {
            let other = OtherObject::new(&source.file, source.document, map);
            if !opts.skip_other_kinds {
                out.errors.push(error(None, None, other.error()));
            }
            out.other_objects.push(other);
            return;
        }
    };
    let kind = doc_kind.name();
    let meta_name = map.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("");
    match doc_kind {
        DocKind::CiliumNetworkPolicy | DocKind::CiliumClusterwideNetworkPolicy => {
            let pkind = if doc_kind == DocKind::CiliumNetworkPolicy {
                PolicyKind::CiliumNetworkPolicy
            } else {
                PolicyKind::CiliumClusterwideNetworkPolicy
            };
            let namespace = (pkind == PolicyKind::CiliumNetworkPolicy).then(|| {
                map.get("metadata")
                    .and_then(|m| m.get("namespace"))
                    .and_then(Value::as_str)
                    .unwrap_or(&opts.default_namespace)
                    .to_owned()
            });
            let id = PolicyRef { kind: pkind, namespace: namespace.clone(), name: meta_name.to_owned() };
            let object = Some(format!("{kind} {id}"));
            let doc: types::CiliumPolicyDoc = match de::from_value(value, "") {
                Ok(d) => d,
                Err(e) => {
                    out.errors.push(error(object, e.path, e.message));
                    return;
                }
            };
            if meta_name.is_empty() {
                out.errors.push(error(object, Some("metadata.name".into()), "required".into()));
                return;
            }
            let mut ctx = Ctx::default();
            if pkind == PolicyKind::CiliumClusterwideNetworkPolicy && doc.metadata.namespace.is_some() {
                ctx.warnings
                    .push("metadata.namespace: ignored, a CiliumClusterwideNetworkPolicy is cluster-scoped".into());
            }
            let scope = Scope { kind: pkind, namespace: namespace.as_deref(), cluster: &opts.cluster };
            let mut rules: Vec<Rule> = Vec::new();
            if doc.spec.is_none() && doc.specs.as_ref().is_none_or(Vec::is_empty) {
                ctx.errors.push(Problem {
                    path: String::new(),
                    message: "empty policy: one of spec or specs is required".into(),
                });
            }
            if let Some(spec) = &doc.spec {
                rules.extend(convert::rule(spec, &scope, &mut ctx, "spec"));
            }
            for (i, spec) in doc.specs.iter().flatten().enumerate() {
                rules.extend(convert::rule(spec, &scope, &mut ctx, &format!("specs[{i}]")));
            }
            finish(out, ctx, id, source, rules, object);
        }
        DocKind::NetworkPolicy => {
            let ns = map
                .get("metadata")
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                .unwrap_or(&opts.default_namespace)
                .to_owned();
            let id =
                PolicyRef { kind: PolicyKind::NetworkPolicy, namespace: Some(ns.clone()), name: meta_name.to_owned() };
            let object = Some(format!("{kind} {id}"));
            let doc: types::NetworkPolicyDoc = match de::from_value(value, "") {
                Ok(d) => d,
                Err(e) => {
                    out.errors.push(error(object, e.path, e.message));
                    return;
                }
            };
            if meta_name.is_empty() {
                out.errors.push(error(object, Some("metadata.name".into()), "required".into()));
                return;
            }
            let mut ctx = Ctx::default();
            let scope = Scope { kind: PolicyKind::NetworkPolicy, namespace: Some(&ns), cluster: &opts.cluster };
            let spec = doc.spec.unwrap_or_default();
            let rules: Vec<Rule> = convert::network_policy(&spec, &scope, &mut ctx).into_iter().collect();
            finish(out, ctx, id, source, rules, object);
        }
        DocKind::CiliumCidrGroup => {
            let object = Some(format!("{kind} {meta_name}"));
            let doc: types::CidrGroupDoc = match de::from_value(value, "") {
                Ok(d) => d,
                Err(e) => {
                    out.errors.push(error(object, e.path, e.message));
                    return;
                }
            };
            let mut cidrs = Vec::new();
            for (i, c) in doc.spec.external_cidrs.iter().enumerate() {
                match c.parse::<ipnet::IpNet>() {
                    Ok(n) => cidrs.push(n.trunc()),
                    Err(e) => {
                        out.errors.push(error(
                            object.clone(),
                            Some(format!("spec.externalCIDRs[{i}]")),
                            format!("unable to parse CIDR {c:?}: {e}"),
                        ));
                        return;
                    }
                }
            }
            let labels = Labels::new(
                doc.metadata.labels.unwrap_or_default().into_iter().map(|(k, v)| Label::new(LabelKey::k8s(k), v)),
            );
            out.cidr_groups.push(CidrGroup { name: meta_name.to_owned(), labels, cidrs });
        }
        DocKind::Service | DocKind::EndpointSlice => {
            let namespace = map
                .get("metadata")
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                .unwrap_or(&opts.default_namespace);
            let object = Some(format!("{kind} {namespace}/{meta_name}"));
            let read = if doc_kind == DocKind::Service {
                de::from_value(value, "")
                    .map_err(|e| (e.path, e.message))
                    .and_then(|svc| services::service_def(&svc, namespace).map_err(|e| (Some(e.path), e.message)))
                    .map(|s| out.services.push(s))
            } else {
                de::from_value(value, "")
                    .map_err(|e| (e.path, e.message))
                    .and_then(|s| services::slice_def(&s, namespace).map_err(|e| (Some(e.path), e.message)))
                    .map(|s| out.endpoint_slices.extend(s))
            };
            if let Err((path, message)) = read {
                out.errors.push(error(object, path, message));
            }
        }
    }
}

fn finish(out: &mut Loaded, ctx: Ctx, id: PolicyRef, source: Source, rules: Vec<Rule>, object: Option<String>) {
    if ctx.errors.is_empty() {
        out.policies.push(Policy { id, source, rules, warnings: ctx.warnings });
    } else {
        for p in ctx.errors {
            out.errors.push(PolicyError {
                file: source.file.to_string(),
                document: Some(source.document),
                object: object.clone(),
                path: (!p.path.is_empty()).then_some(p.path),
                message: p.message,
            });
        }
    }
}

/// Validates one rule given in CRD form (a `spec`), as a rule of a policy of `kind` in `namespace`.
/// Returns the rule and its warnings, or every problem found. Used by `policy validate` on snippets and
/// by the conformance tests.
pub fn rule_from_value(
    value: &Value,
    kind: PolicyKind,
    namespace: Option<&str>,
    opts: &LoadOptions,
) -> Result<(Rule, Vec<String>), Vec<Problem>> {
    let raw: types::Rule = de::from_value(value, "spec")
        .map_err(|e| vec![Problem { path: e.path.unwrap_or_default(), message: e.message }])?;
    let mut ctx = Ctx::default();
    let scope = Scope { kind, namespace, cluster: &opts.cluster };
    match convert::rule(&raw, &scope, &mut ctx, "spec") {
        Some(rule) if ctx.errors.is_empty() => Ok((rule, ctx.warnings)),
        _ => Err(ctx.errors),
    }
}

/// Deserialises any of our own formats with the same path-reporting decoder.
pub(crate) fn typed<T: serde::de::DeserializeOwned>(value: &Value, root: &str) -> Result<T, String> {
    de::from_value(value, root).map_err(|e| e.to_string())
}
