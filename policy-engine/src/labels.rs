//! Labels as Cilium models them: `source:key=value`.
//!
//! Owns label parsing, the label sources (`k8s`, `reserved`, `any`, ...), the label keys Kubernetes
//! endpoints carry (namespace, namespace labels, service account, cluster), and the filter that decides
//! which labels are security relevant (Cilium's default `labelsfilter`). It does not know about
//! selectors or identities.

use std::collections::BTreeMap;
use std::fmt;

/// Pod namespace label key (`k8s:io.kubernetes.pod.namespace`).
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Prefix of namespace labels projected onto pods (`io.cilium.k8s.namespace.labels.<k>`).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Service account label key.
pub const SERVICE_ACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";
/// Cluster name label key.
pub const CLUSTER: &str = "io.cilium.k8s.policy.cluster";
/// The cluster name used when none is configured (Cilium's default).
pub const DEFAULT_CLUSTER: &str = "default";

/// Where a label comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LabelSource {
    /// `any:` — in a selector, matches a label of any source.
    Any,
    /// `k8s:` — Kubernetes pod, namespace and service-account labels.
    K8s,
    /// `reserved:` — reserved identities (host, world, ...).
    Reserved,
    /// `cidr:` — CIDR identities.
    Cidr,
    /// `fqdn:` — identities of IPs learned from DNS.
    Fqdn,
    /// `unspec:`.
    Unspec,
    /// `container:`.
    Container,
    /// Any other source name.
    Other(String),
}

impl LabelSource {
    /// Parses a source name (case-sensitive, as Cilium).
    pub fn parse(s: &str) -> Self {
        match s {
            "any" => Self::Any,
            "k8s" => Self::K8s,
            "reserved" => Self::Reserved,
            "cidr" => Self::Cidr,
            "fqdn" => Self::Fqdn,
            "unspec" => Self::Unspec,
            "container" => Self::Container,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The source name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Any => "any",
            Self::K8s => "k8s",
            Self::Reserved => "reserved",
            Self::Cidr => "cidr",
            Self::Fqdn => "fqdn",
            Self::Unspec => "unspec",
            Self::Container => "container",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for LabelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label key with its source, e.g. `k8s:app`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelKey {
    /// The source (`any` in selectors matches every source).
    pub source: LabelSource,
    /// The key without its source.
    pub key: String,
}

impl LabelKey {
    /// Parses `source:key`, `$key` (reserved) or `key` (source `default_source`).
    ///
    /// ```
    /// use policy_engine::labels::{LabelKey, LabelSource};
    /// let k = LabelKey::parse("k8s:io.kubernetes.pod.namespace", LabelSource::Any);
    /// assert_eq!(k.source, LabelSource::K8s);
    /// assert_eq!(LabelKey::parse("app", LabelSource::Any).source, LabelSource::Any);
    /// assert_eq!(LabelKey::parse("$host", LabelSource::Any).source, LabelSource::Reserved);
    /// ```
    pub fn parse(s: &str, default_source: LabelSource) -> Self {
        if let Some(rest) = s.strip_prefix('$') {
            return Self { source: LabelSource::Reserved, key: rest.to_owned() };
        }
        match s.split_once(':') {
            Some((src, key)) => Self { source: LabelSource::parse(src), key: key.to_owned() },
            None => Self { source: default_source, key: s.to_owned() },
        }
    }

    /// A `k8s:` key.
    pub fn k8s(key: impl Into<String>) -> Self {
        Self { source: LabelSource::K8s, key: key.into() }
    }

    /// A `reserved:` key.
    pub fn reserved(key: impl Into<String>) -> Self {
        Self { source: LabelSource::Reserved, key: key.into() }
    }

    /// Whether a selector key (this) applies to a label carrying `key`: same key, and same source or `any`.
    pub fn selects(&self, key: &LabelKey) -> bool {
        self.key == key.key && (self.source == LabelSource::Any || self.source == key.source)
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)
    }
}

/// One label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    /// Source and key.
    pub key: LabelKey,
    /// Value (reserved labels have an empty value).
    pub value: String,
}

impl Label {
    /// Builds a label.
    pub fn new(key: LabelKey, value: impl Into<String>) -> Self {
        Self { key, value: value.into() }
    }

    /// Parses `source:key=value` (`key=value` gets `default_source`).
    pub fn parse(s: &str, default_source: LabelSource) -> Self {
        let (k, v) = s.split_once('=').unwrap_or((s, ""));
        Self { key: LabelKey::parse(k, default_source), value: v.to_owned() }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() { write!(f, "{}", self.key) } else { write!(f, "{}={}", self.key, self.value) }
    }
}

/// A sorted, de-duplicated set of labels (one value per source:key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Vec<Label>);

impl Labels {
    /// Builds a set; a later label with the same source:key replaces an earlier one.
    pub fn new(labels: impl IntoIterator<Item = Label>) -> Self {
        let mut map: BTreeMap<LabelKey, String> = BTreeMap::new();
        for l in labels {
            map.insert(l.key, l.value);
        }
        Self(map.into_iter().map(|(key, value)| Label { key, value }).collect())
    }

    /// The labels, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Values of every label that a selector key applies to (an `any:` key can hit several sources).
    pub fn values_for<'a>(&'a self, key: &'a LabelKey) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |l| key.selects(&l.key)).map(|l| l.value.as_str())
    }

    /// The value of an exact source:key.
    pub fn get(&self, key: &LabelKey) -> Option<&str> {
        self.0.iter().find(|l| &l.key == key).map(|l| l.value.as_str())
    }

    /// Only the security-relevant labels, as Cilium's default label filter keeps them.
    pub fn identity_relevant(&self) -> Self {
        Self(self.0.iter().filter(|l| is_identity_relevant(l)).cloned().collect())
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for l in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

/// Cilium's default label-prefix filter for `k8s:` labels (`pkg/labelsfilter`): the longest matching
/// prefix decides; a label no prefix matches is kept. Prefixes match at the start of the key; `.*` in
/// an entry stands for any characters.
const LABEL_FILTER: &[(&str, bool)] = &[
    (POD_NAMESPACE, true),
    ("io.cilium.k8s.namespace.labels", true),
    ("app.kubernetes.io", true),
    ("io.kubernetes", false),
    ("kubernetes.io", false),
    ("statefulset.kubernetes.io/pod-name", false),
    ("apps.kubernetes.io/pod-index", false),
    ("batch.kubernetes.io/job-completion-index", false),
    ("batch.kubernetes.io/controller-uid", false),
    (".*beta.kubernetes.io", false),
    ("k8s.io", false),
    ("pod-template-generation", false),
    ("pod-template-hash", false),
    ("controller-revision-hash", false),
    ("annotation", false),
    ("etcd_node", false),
];

fn prefix_matches(pattern: &str, key: &str) -> bool {
    match pattern.strip_prefix(".*") {
        Some(rest) => key.contains(rest),
        None => key.starts_with(pattern),
    }
}

/// Whether a label takes part in the security identity.
pub fn is_identity_relevant(label: &Label) -> bool {
    if label.key.source != LabelSource::K8s {
        return true;
    }
    let mut best: Option<(usize, bool)> = None;
    for (pattern, include) in LABEL_FILTER {
        if prefix_matches(pattern, &label.key.key) && best.is_none_or(|(len, _)| pattern.len() > len) {
            best = Some((pattern.len(), *include));
        }
    }
    best.is_none_or(|(_, include)| include)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(LabelKey::parse("k8s:app", LabelSource::Any), LabelKey::k8s("app"));
        assert_eq!(LabelKey::parse("reserved:host", LabelSource::Any), LabelKey::reserved("host"));
        let l = Label::parse("k8s:io.kubernetes.pod.namespace=default", LabelSource::Any);
        assert_eq!(l.value, "default");
        assert_eq!(l.key.key, POD_NAMESPACE);
    }

    #[test]
    fn filter_keeps_app_labels_and_drops_pod_specific_ones() {
        let keep = |k: &str| is_identity_relevant(&Label::new(LabelKey::k8s(k), "x"));
        assert!(keep("app"));
        assert!(keep(POD_NAMESPACE));
        assert!(keep("io.cilium.k8s.namespace.labels.team"));
        assert!(keep("io.cilium.k8s.policy.serviceaccount"));
        assert!(keep("app.kubernetes.io/name"));
        assert!(!keep("pod-template-hash"));
        assert!(!keep("controller-revision-hash"));
        assert!(!keep("io.kubernetes.container.name"));
        assert!(!keep("kubernetes.io/hostname"));
        assert!(!keep("failure-domain.beta.kubernetes.io/zone"));
        assert!(!keep("statefulset.kubernetes.io/pod-name"));
    }

    #[test]
    fn any_key_selects_every_source() {
        let labels = Labels::new([Label::new(LabelKey::k8s("app"), "a"), Label::new(LabelKey::reserved("host"), "")]);
        let any = LabelKey::parse("app", LabelSource::Any);
        assert_eq!(labels.values_for(&any).collect::<Vec<_>>(), vec!["a"]);
        let wrong = LabelKey::parse("reserved:app", LabelSource::Any);
        assert_eq!(labels.values_for(&wrong).count(), 0);
    }
}
