//! What a document is, from its envelope (`apiVersion`, `kind`): a policy kind Porin reads, a near
//! miss of one (wrong case, obsolete version) that gets an error saying how to fix it, or another
//! Kubernetes object.

use std::fmt;

use serde_yaml::{Mapping, Value};

use super::de::wrong_case;

/// The document kinds Porin reads (from files, or watched in the Kubernetes API).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DocKind {
    /// `cilium.io/v2` CiliumNetworkPolicy.
    CiliumNetworkPolicy,
    /// `cilium.io/v2` CiliumClusterwideNetworkPolicy.
    CiliumClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
    /// `cilium.io/v2` CiliumCIDRGroup.
    CiliumCidrGroup,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
}

impl DocKind {
    /// Every kind.
    pub const ALL: [DocKind; 6] = [
        DocKind::CiliumNetworkPolicy,
        DocKind::CiliumClusterwideNetworkPolicy,
        DocKind::NetworkPolicy,
        DocKind::CiliumCidrGroup,
        DocKind::Service,
        DocKind::EndpointSlice,
    ];

    /// The `kind` field.
    pub fn name(self) -> &'static str {
        match self {
            DocKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            DocKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            DocKind::NetworkPolicy => "NetworkPolicy",
            DocKind::CiliumCidrGroup => "CiliumCIDRGroup",
            DocKind::Service => "Service",
            DocKind::EndpointSlice => "EndpointSlice",
        }
    }

    /// The API version to write (and to watch).
    pub fn current(self) -> &'static str {
        match self {
            DocKind::CiliumNetworkPolicy | DocKind::CiliumClusterwideNetworkPolicy | DocKind::CiliumCidrGroup => {
                "cilium.io/v2"
            }
            DocKind::NetworkPolicy => "networking.k8s.io/v1",
            DocKind::Service => "v1",
            DocKind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The resource's plural name in the API.
    pub fn plural(self) -> &'static str {
        match self {
            DocKind::CiliumNetworkPolicy => "ciliumnetworkpolicies",
            DocKind::CiliumClusterwideNetworkPolicy => "ciliumclusterwidenetworkpolicies",
            DocKind::NetworkPolicy => "networkpolicies",
            DocKind::CiliumCidrGroup => "ciliumcidrgroups",
            DocKind::Service => "services",
            DocKind::EndpointSlice => "endpointslices",
        }
    }

    /// Whether `api_version` serves it.
    fn served_by(self, api_version: &str) -> bool {
        api_version == self.current() || (self == DocKind::CiliumCidrGroup && api_version == "cilium.io/v2alpha1")
    }
}

/// The top-level keys Kubernetes matches exactly.
const ENVELOPE: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// A document that is not one of [`DocKind`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NotPolicy {
    /// Looks like a policy but is written wrongly: always an error, never skipped.
    Mistake { path: Option<String>, message: String },
    /// Another Kubernetes object (or no object at all): skippable.
    Other,
}

/// Reads the envelope of a mapping document.
pub(crate) fn classify(map: &Mapping) -> Result<DocKind, NotPolicy> {
    let mistake = |path: &str, message: String| NotPolicy::Mistake { path: Some(path.to_owned()), message };
    for key in map.keys().filter_map(Value::as_str) {
        if let Some(right) = ENVELOPE.iter().find(|e| **e != key && e.eq_ignore_ascii_case(key)) {
            return Err(NotPolicy::Mistake { path: None, message: wrong_case(key, right) });
        }
    }
    let field = |k: &str| map.get(k).and_then(Value::as_str).unwrap_or("");
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if let Some(k) = DocKind::ALL.iter().copied().find(|k| k.name() == kind) {
        if k.served_by(api_version) {
            return Ok(k);
        }
        let current = k.current();
        return Err(if api_version.is_empty() {
            mistake("apiVersion", format!("required: `apiVersion: {current}` for {kind}"))
        } else {
            mistake(
                "apiVersion",
                format!(
                    "`{api_version}` is not a version of {kind}: use `apiVersion: {current}`{}",
                    obsolete_note(k, api_version)
                ),
            )
        });
    }
    if let Some(k) = DocKind::ALL.iter().copied().find(|k| k.name().eq_ignore_ascii_case(kind)) {
        return Err(mistake("kind", format!("found `{kind}`; kinds are case-sensitive: `{}`", k.name())));
    }
    Err(NotPolicy::Other)
}

/// Why an old version is gone, for the versions users still meet in old manifests.
fn obsolete_note(kind: DocKind, api_version: &str) -> &'static str {
    match (kind, api_version) {
        (DocKind::NetworkPolicy, "extensions/v1beta1" | "networking.k8s.io/v1beta1") => {
            " (the old version was removed in Kubernetes 1.16; the spec is unchanged)"
        }
        (DocKind::CiliumNetworkPolicy | DocKind::CiliumClusterwideNetworkPolicy, "cilium.io/v1") => {
            " (cilium.io/v1 is obsolete and no longer served)"
        }
        (DocKind::EndpointSlice, "discovery.k8s.io/v1beta1") => " (the old version was removed in Kubernetes 1.25)",
        _ => "",
    }
}

/// A document that is not a policy, skipped on request (`--skip-other-kinds`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherObject {
    /// File name as given.
    pub file: String,
    /// 1-based document number.
    pub document: usize,
    /// `apiVersion` (empty when missing).
    pub api_version: String,
    /// `kind` (empty when missing).
    pub kind: String,
    /// `metadata.name` (empty when missing).
    pub name: String,
}

impl OtherObject {
    pub(crate) fn new(file: &str, document: usize, map: &Mapping) -> Self {
        let field = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_owned();
        Self {
            file: file.to_owned(),
            document,
            api_version: field(map.get("apiVersion")),
            kind: field(map.get("kind")),
            name: field(map.get("metadata").and_then(|m| m.get("name"))),
        }
    }
}

impl OtherObject {
    /// The error when other kinds are not skipped.
    pub(crate) fn error(&self) -> String {
        const EXPECTED: &str = "expected cilium.io/v2 CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or \
                                CiliumCIDRGroup, networking.k8s.io/v1 NetworkPolicy, v1 Service or \
                                discovery.k8s.io/v1 EndpointSlice";
        if self.api_version.is_empty() && self.kind.is_empty() {
            format!("not a Kubernetes object (no apiVersion and kind): {EXPECTED}")
        } else {
            format!("unsupported kind {:?} (apiVersion {:?}): {EXPECTED}", self.kind, self.api_version)
        }
    }

    /// What to tell a user whose files hold `n` documents of other kinds, where the CLI can skip them.
    pub fn hint(n: usize) -> String {
        if n == 1 {
            "1 document is not a policy; with `--skip-other-kinds` it is skipped instead".into()
        } else {
            format!("{n} documents are not policies; with `--skip-other-kinds` they are skipped instead")
        }
    }
}

impl fmt::Display for OtherObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {} (", self.file, self.document)?;
        match (self.api_version.as_str(), self.kind.as_str()) {
            ("", "") => f.write_str("not a Kubernetes object")?,
            (v, k) => {
                write!(f, "{v} {k}")?;
                if !self.name.is_empty() {
                    write!(f, " {}", self.name)?;
                }
            }
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_yaml(y: &str) -> Result<DocKind, NotPolicy> {
        let v: Value = serde_yaml::from_str(y).unwrap();
        classify(v.as_mapping().unwrap())
    }

    fn mistake(y: &str) -> String {
        match classify_yaml(y) {
            Err(NotPolicy::Mistake { path, message }) => match path {
                Some(p) => format!("{p}: {message}"),
                None => message,
            },
            other => panic!("{y}: {other:?}"),
        }
    }

    #[test]
    fn policy_kinds_and_their_versions() {
        assert_eq!(
            classify_yaml("{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy}"),
            Ok(DocKind::CiliumNetworkPolicy)
        );
        assert_eq!(
            classify_yaml("{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy}"),
            Ok(DocKind::NetworkPolicy)
        );
        assert_eq!(
            classify_yaml("{apiVersion: cilium.io/v2alpha1, kind: CiliumCIDRGroup}"),
            Ok(DocKind::CiliumCidrGroup)
        );
        assert_eq!(classify_yaml("{apiVersion: apps/v1, kind: Deployment}"), Err(NotPolicy::Other));
        assert_eq!(classify_yaml("{replicas: 3}"), Err(NotPolicy::Other));
        assert_eq!(classify_yaml("{apiVersion: cilium.io/v2, kind: CiliumEndpoint}"), Err(NotPolicy::Other));
    }

    #[test]
    fn near_misses_say_how_to_fix() {
        assert_eq!(
            mistake("{apiversion: cilium.io/v2, kind: CiliumNetworkPolicy}"),
            "found `apiversion`; keys are case-sensitive: `apiVersion`"
        );
        assert_eq!(mistake("{apiVersion: apps/v1, Kind: Deployment}"), "found `Kind`; keys are case-sensitive: `kind`");
        assert_eq!(
            mistake("{apiVersion: cilium.io/v2, kind: ciliumNetworkPolicy}"),
            "kind: found `ciliumNetworkPolicy`; kinds are case-sensitive: `CiliumNetworkPolicy`"
        );
        assert_eq!(
            mistake("{apiVersion: extensions/v1beta1, kind: NetworkPolicy}"),
            "apiVersion: `extensions/v1beta1` is not a version of NetworkPolicy: use `apiVersion: networking.k8s.io/v1` \
             (the old version was removed in Kubernetes 1.16; the spec is unchanged)"
        );
        assert_eq!(
            mistake("{apiVersion: cilium.io/v1, kind: CiliumClusterwideNetworkPolicy}"),
            "apiVersion: `cilium.io/v1` is not a version of CiliumClusterwideNetworkPolicy: use `apiVersion: cilium.io/v2` \
             (cilium.io/v1 is obsolete and no longer served)"
        );
        assert_eq!(
            mistake("{kind: CiliumNetworkPolicy}"),
            "apiVersion: required: `apiVersion: cilium.io/v2` for CiliumNetworkPolicy"
        );
    }
}
