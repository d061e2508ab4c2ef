//! Label selectors (Kubernetes `LabelSelector` with Cilium's `source:key` keys).
//!
//! Owns the validated selector type and its matching against a label set. Namespace defaulting and
//! entity expansion happen in `api::convert`; identity sets are computed in `resolve`.

use std::fmt;

use crate::labels::{Label, LabelKey, LabelSource, Labels};

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    /// The key has one of the values.
    In(LabelKey, Vec<String>),
    /// The key is absent or has none of the values.
    NotIn(LabelKey, Vec<String>),
    /// The key is present.
    Exists(LabelKey),
    /// The key is absent.
    DoesNotExist(LabelKey),
}

impl Requirement {
    /// The key this requirement is about.
    pub fn key(&self) -> &LabelKey {
        match self {
            Self::In(k, _) | Self::NotIn(k, _) | Self::Exists(k) | Self::DoesNotExist(k) => k,
        }
    }

    /// Whether the labels satisfy the requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In(k, vals) => labels.values_for(k).any(|v| vals.iter().any(|x| x == v)),
            Self::NotIn(k, vals) => !labels.values_for(k).any(|v| vals.iter().any(|x| x == v)),
            Self::Exists(k) => labels.values_for(k).next().is_some(),
            Self::DoesNotExist(k) => labels.values_for(k).next().is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::In(k, v) if v.len() == 1 => write!(f, "{k}={}", v.join("")),
            Self::In(k, v) => write!(f, "{k} in ({})", v.join(",")),
            Self::NotIn(k, v) => write!(f, "{k} notin ({})", v.join(",")),
            Self::Exists(k) => write!(f, "{k}"),
            Self::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// A validated label selector: all requirements must hold. No requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

/// A selector that cannot be built, with the Kubernetes-style reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector: {0}")]
pub struct SelectorError(pub String);

impl Selector {
    /// The selector that selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// A selector from requirements (sorted for a canonical form).
    pub fn new(mut reqs: Vec<Requirement>) -> Self {
        reqs.sort();
        reqs.dedup();
        Self { reqs }
    }

    /// Builds a selector from `matchLabels` and `matchExpressions` (unprefixed keys get `any:`).
    ///
    /// ```
    /// use policy_engine::selector::Selector;
    /// use policy_engine::labels::{Label, LabelSource, Labels};
    /// let s = Selector::from_k8s([("org", "empire")], [("class", "In", vec!["deathstar"])]).unwrap();
    /// let pod = Labels::new(["k8s:org=empire", "k8s:class=deathstar"].map(|l| Label::parse(l, LabelSource::K8s)));
    /// assert!(s.matches(&pod));
    /// ```
    pub fn from_k8s<'a, V>(
        match_labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        match_expressions: impl IntoIterator<Item = (&'a str, &'a str, V)>,
    ) -> Result<Self, SelectorError>
    where
        V: IntoIterator,
        V::Item: AsRef<str>,
    {
        let mut reqs = Vec::new();
        for (k, v) in match_labels {
            if k.is_empty() {
                return Err(SelectorError("matchLabels: Invalid value: \"\": key must not be empty".into()));
            }
            reqs.push(Requirement::In(LabelKey::parse(k, LabelSource::Any), vec![v.to_owned()]));
        }
        for (i, (k, op, values)) in match_expressions.into_iter().enumerate() {
            let key = LabelKey::parse(k, LabelSource::Any);
            let values: Vec<String> = values.into_iter().map(|v| v.as_ref().to_owned()).collect();
            if k.is_empty() {
                return Err(SelectorError(format!(
                    "matchExpressions[{i}].key: Invalid value: \"\": key must not be empty"
                )));
            }
            let req = match op {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        return Err(SelectorError(format!(
                            "matchExpressions[{i}].values: Required value: must be specified when `operator` is 'In' or 'NotIn'"
                        )));
                    }
                    if op == "In" { Requirement::In(key, values) } else { Requirement::NotIn(key, values) }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        return Err(SelectorError(format!(
                            "matchExpressions[{i}].values: Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
                        )));
                    }
                    if op == "Exists" { Requirement::Exists(key) } else { Requirement::DoesNotExist(key) }
                }
                other => {
                    return Err(SelectorError(format!(
                        "matchExpressions[{i}].operator: Invalid value: \"{other}\": not a valid selector operator"
                    )));
                }
            };
            reqs.push(req);
        }
        Ok(Self::new(reqs))
    }

    /// The requirements (sorted).
    pub fn requirements(&self) -> &[Requirement] {
        &self.reqs
    }

    /// True for the selector that selects everything.
    pub fn is_everything(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether the labels satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.reqs.iter().all(|r| r.matches(labels))
    }

    /// Whether any requirement is about this key (ignoring the source when `any_source`).
    pub fn mentions(&self, key: &str, sources: &[LabelSource]) -> bool {
        self.reqs.iter().any(|r| r.key().key == key && sources.contains(&r.key().source))
    }

    /// Whether any requirement's key (with one of `sources`) starts with `prefix`.
    pub fn mentions_prefix(&self, prefix: &str, sources: &[LabelSource]) -> bool {
        self.reqs.iter().any(|r| r.key().key.starts_with(prefix) && sources.contains(&r.key().source))
    }

    /// Whether any requirement uses a `reserved:` key.
    pub fn has_reserved_key(&self) -> bool {
        self.reqs.iter().any(|r| r.key().source == LabelSource::Reserved)
    }

    /// Adds a requirement (keeps the canonical order).
    pub fn with(mut self, req: Requirement) -> Self {
        self.reqs.push(req);
        Self::new(self.reqs)
    }

    /// Replaces every requirement on `key` (exact source) with `key=value`.
    pub fn with_exact(mut self, key: LabelKey, value: &str) -> Self {
        self.reqs.retain(|r| r.key() != &key);
        self.with(Requirement::In(key, vec![value.to_owned()]))
    }

    /// A selector matching one reserved label (`reserved:<name>`).
    pub fn reserved(name: &str) -> Self {
        Self::new(vec![Requirement::In(LabelKey::reserved(name), vec![String::new()])])
    }

    /// A selector matching exactly these labels (each `key=value`).
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = &'a Label>) -> Self {
        Self::new(labels.into_iter().map(|l| Requirement::In(l.key.clone(), vec![l.value.clone()])).collect())
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("{}");
        }
        f.write_str("{")?;
        for (i, r) in self.reqs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(ls: &[&str]) -> Labels {
        Labels::new(ls.iter().map(|l| Label::parse(l, LabelSource::K8s)))
    }

    #[test]
    fn operators() {
        let pod = labels(&["app=web", "tier=front"]);
        let sel = |e: Vec<(&str, &str, Vec<&str>)>| Selector::from_k8s([], e).unwrap();
        assert!(sel(vec![("app", "In", vec!["web", "db"])]).matches(&pod));
        assert!(!sel(vec![("app", "NotIn", vec!["web"])]).matches(&pod));
        assert!(sel(vec![("missing", "NotIn", vec!["web"])]).matches(&pod));
        assert!(sel(vec![("tier", "Exists", vec![])]).matches(&pod));
        assert!(!sel(vec![("tier", "DoesNotExist", vec![])]).matches(&pod));
        assert!(sel(vec![("k8s:app", "In", vec!["web"])]).matches(&pod));
        assert!(!sel(vec![("reserved:app", "In", vec!["web"])]).matches(&pod));
    }

    #[test]
    fn rejects_bad_operator_with_k8s_message() {
        let err = Selector::from_k8s([], [("any.foo", "asdfasdfasdf", vec!["default"])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid label selector: matchExpressions[0].operator: Invalid value: \"asdfasdfasdf\": not a valid selector operator"
        );
        assert!(Selector::from_k8s([], [("a", "In", Vec::<&str>::new())]).is_err());
        assert!(Selector::from_k8s([], [("a", "Exists", vec!["x"])]).is_err());
    }

    proptest! {
        // matchLabels {k: v} is equivalent to matchExpressions {k In [v]}, and NotIn is its negation.
        #[test]
        fn in_and_notin_are_complements(
            pod in proptest::collection::btree_map("[a-c]", "[x-z]", 0..4),
            key in "[a-c]", val in "[x-z]",
        ) {
            let ls = Labels::new(pod.iter().map(|(k, v)| Label::new(LabelKey::k8s(k.clone()), v.clone())));
            let by_labels = Selector::from_k8s([(key.as_str(), val.as_str())], Vec::<(&str, &str, Vec<&str>)>::new()).unwrap();
            let by_in = Selector::from_k8s([], [(key.as_str(), "In", vec![val.as_str()])]).unwrap();
            let by_notin = Selector::from_k8s([], [(key.as_str(), "NotIn", vec![val.as_str()])]).unwrap();
            prop_assert_eq!(by_labels.matches(&ls), by_in.matches(&ls));
            prop_assert_eq!(by_in.matches(&ls), !by_notin.matches(&ls));
            prop_assert_eq!(by_in.matches(&ls), pod.get(&key) == Some(&val));
        }

        // Adding a requirement never selects more.
        #[test]
        fn more_requirements_select_less(
            pod in proptest::collection::btree_map("[a-c]", "[x-z]", 0..4),
            k1 in "[a-c]", v1 in "[x-z]", k2 in "[a-c]",
        ) {
            let ls = Labels::new(pod.iter().map(|(k, v)| Label::new(LabelKey::k8s(k.clone()), v.clone())));
            let s1 = Selector::from_k8s([(k1.as_str(), v1.as_str())], Vec::<(&str, &str, Vec<&str>)>::new()).unwrap();
            let s2 = s1.clone().with(Requirement::Exists(LabelKey::parse(&k2, LabelSource::Any)));
            prop_assert!(!s2.matches(&ls) || s1.matches(&ls));
        }
    }
}
