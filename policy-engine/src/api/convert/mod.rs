//! Raw CRD types → validated model, with Cilium's validation rules (`rule_validation.go` and friends)
//! and namespace defaulting (`ParseToCiliumRule`). Every problem is reported with its field path.
//!
//! [`rule`] converts a Cilium rule: its subject, then each element of its four lists through one
//! path ([`element`], over the [`element::RawElement`] view of a list item); [`ports`] converts
//! port rules and their L7 rules; [`knp`] converts a Kubernetes NetworkPolicy.

use std::collections::BTreeMap;

use super::types as raw;
use crate::dns::NamePattern;
use crate::http::{HeaderMatcher, HeaderMatcherKind, MismatchAction};
use crate::kafka::KafkaRule;
use crate::labels::{self, LabelKey, LabelSource};
use crate::model::{
    Action, CidrGroupRef, Element, Entity, HeaderMatchSpec, HttpRuleSpec, IcmpFamily, IcmpType, L4Spec, L7Spec, Peer,
    Peers, PolicyKind, PortProto, PortRule, PortSel, Protocol, Rule, ServiceRef, Subject,
};
use crate::selector::{Requirement, Selector};

const MAX_PORTS: usize = 40;
const MAX_ICMP_FIELDS: usize = 40;

/// A problem found while converting, with its field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Field path.
    pub path: String,
    /// What is wrong (Cilium's wording where Cilium has one).
    pub message: String,
}

/// Collects errors and warnings while converting one document.
#[derive(Default)]
pub(crate) struct Ctx {
    pub(crate) errors: Vec<Problem>,
    pub(crate) warnings: Vec<String>,
}

impl Ctx {
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Problem { path: path.into(), message: message.into() });
    }
    pub(super) fn warn(&mut self, path: &str, message: impl std::fmt::Display) {
        self.warnings.push(format!("{path}: {message}"));
    }
}

/// What a rule's namespace defaulting depends on.
#[derive(Clone, Debug)]
pub(crate) struct Scope<'a> {
    pub(crate) kind: PolicyKind,
    /// Policy namespace (`None` for clusterwide).
    pub(crate) namespace: Option<&'a str>,
    pub(crate) cluster: &'a str,
}

mod element;
mod knp;
mod ports;
mod rule;

pub(crate) use knp::network_policy;
pub(crate) use rule::rule;

// === selectors ===

pub(crate) fn selector(raw: &raw::LabelSelector, ctx: &mut Ctx, path: &str) -> Option<Selector> {
    let empty = BTreeMap::new();
    let labels = raw.match_labels.as_ref().unwrap_or(&empty);
    let exprs = raw.match_expressions.as_deref().unwrap_or(&[]);
    let result = Selector::from_k8s(
        labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        exprs.iter().map(|e| (e.key.as_str(), e.operator.as_str(), e.values.clone().unwrap_or_default())),
    );
    match result {
        Ok(s) => Some(s),
        Err(e) => {
            ctx.err(path, e.to_string());
            None
        }
    }
}
