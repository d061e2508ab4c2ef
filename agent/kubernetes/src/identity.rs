//! The cluster's identities, hosted by the API server as CiliumIdentity objects (Cilium's CRD
//! identity mode): the object's name is the number, its `security-labels` the label set.
//!
//! Why the API hosts them: a number a node picks alone (even one derived from the labels, as the
//! agent's allocator does in Kubernetes mode) can collide with another set's; only one place can
//! say which set a number belongs to. Creating the object named by the number is that decision: the
//! API server creates a name once. The agent numbers a new label set from its labels first
//! ([`policy_engine::identity::Numbering::FromLabels`]), so every node already uses the same number
//! before any object exists (no round-trip on the path of a new pod); the node that runs the pod
//! then claims the number. A claim that finds the number taken by another set (a collision) makes
//! every node move that set to the next free number on its next reload, and claim again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams, Preconditions};
use kube::core::ObjectMeta;
use policy_engine::identity::{IdentityId, LOCAL_SCOPE, LabelAssignment, MIN_CLUSTER_IDENTITY};

use crate::crd::{CiliumIdentity, CiliumIdentityBody};

/// One CiliumIdentity as the agent reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterIdentity {
    /// The number.
    pub id: IdentityId,
    /// The labels, as `source:key=value` (`source:key` when the value is empty), sorted.
    pub labels: Vec<String>,
}

/// The cluster number an object's name holds (whatever its labels): the name in canonical form,
/// in the cluster range. No other object can be created for that number.
pub fn number(o: &DynamicObject) -> Result<IdentityId, String> {
    let name = o.metadata.name.clone().unwrap_or_default();
    // One number, one name: `0300` is not identity 300 (the API server keeps names, not numbers,
    // unique).
    let id: IdentityId = name
        .parse()
        .ok()
        .filter(|id: &IdentityId| id.to_string() == name)
        .ok_or_else(|| format!("CiliumIdentity {name:?}: the name is not a number in canonical form"))?;
    if !(MIN_CLUSTER_IDENTITY..LOCAL_SCOPE).contains(&id) {
        return Err(format!("CiliumIdentity {id}: outside the cluster range 256..16777216"));
    }
    Ok(id)
}

/// Reads an object; an object that is not an identity of the cluster range is refused with why.
pub fn parse(o: &DynamicObject) -> Result<ClusterIdentity, String> {
    let id = number(o)?;
    let labels = match o.data.get("security-labels") {
        None => BTreeMap::new(),
        Some(v) => serde_json::from_value::<BTreeMap<String, String>>(v.clone())
            .map_err(|e| format!("CiliumIdentity {id}: security-labels: {e}"))?,
    };
    if labels.is_empty() {
        return Err(format!("CiliumIdentity {id}: no security-labels"));
    }
    Ok(ClusterIdentity { id, labels: labels_text(&labels) })
}

/// `source:key` → value, as label texts.
fn labels_text(map: &BTreeMap<String, String>) -> Vec<String> {
    map.iter().map(|(k, v)| if v.is_empty() { k.clone() } else { format!("{k}={v}") }).collect()
}

/// Label texts as `source:key` → value.
fn labels_map(labels: &[String]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (l.clone(), String::new()),
        })
        .collect()
}

/// The assignments the cluster's identities make, for the allocator to pin: a label set claimed
/// under two numbers (two nodes raced with different numbers, or two spellings of one set, such as
/// `app=web` and `any:app=web`) keeps the lowest, on every node. Labels are compared as the policy
/// engine reads them and given in its canonical text, so the set pins whole. Returns the
/// assignments and how many objects were passed over.
pub fn assignments(identities: &[ClusterIdentity]) -> (Vec<LabelAssignment>, usize) {
    use policy_engine::labels::{Label, LabelSource, Labels};
    let mut by_labels: BTreeMap<Labels, IdentityId> = BTreeMap::new();
    for i in identities {
        let labels = Labels::new(i.labels.iter().map(|l| Label::parse(l, LabelSource::Any)));
        by_labels.entry(labels).and_modify(|id| *id = (*id).min(i.id)).or_insert(i.id);
    }
    let passed_over = identities.len() - by_labels.len();
    let text = |l: &Labels| l.iter().map(ToString::to_string).collect();
    (by_labels.iter().map(|(l, id)| (text(l), *id)).collect(), passed_over)
}

/// The label on the identities Porin claims, and its value: only those are ever collected.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const PORIN: &str = "porin";
/// Why an object is not collected: another owner's.
const NOT_PORINS: &str = "not claimed by Porin";

/// What claiming a number came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The object was created: the number is the set's.
    Created,
    /// The number already has an object (the same set, claimed by another node, or another set:
    /// the watch brings it, and the next reload moves this set).
    Taken,
}

/// Claims `id` for `labels` (creates CiliumIdentity `id`).
///
/// # Errors
/// The API server's, other than the number being taken.
pub async fn claim(client: &Client, id: IdentityId, labels: &[String]) -> Result<Claim, kube::Error> {
    let api: Api<CiliumIdentity> = Api::all(client.clone());
    let object = CiliumIdentity {
        metadata: ObjectMeta {
            name: Some(id.to_string()),
            labels: Some(BTreeMap::from([(MANAGED_BY.to_owned(), PORIN.to_owned())])),
            ..ObjectMeta::default()
        },
        spec: CiliumIdentityBody { security_labels: labels_map(labels) },
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(Claim::Created),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Claim::Taken),
        Err(e) => Err(e),
    }
}

/// Collects the identities Porin claimed that no pod uses any more, once they have been unused
/// for a grace period (Cilium's operator does this; Porin has no operator, so every agent does).
/// The API decides between agents: a deletion names the object's `uid` and `resourceVersion`, so
/// an object claimed again or changed meanwhile is left alone, and the first node's deletion is
/// the only one. A pod of the set that appears just after is not harmed: every node keeps its
/// number for the set, and the pod's node claims it again.
pub struct Collector {
    client: Client,
    unused: UnusedSince,
    /// Unused numbers whose object Porin did not claim: not looked up again while unused.
    foreign: std::collections::BTreeSet<IdentityId>,
}

/// Since when each number has been unused (as this node sees the cluster), and which have been
/// for the grace period.
#[derive(Clone, Debug)]
pub struct UnusedSince {
    grace: Duration,
    since: BTreeMap<IdentityId, Instant>,
}

impl UnusedSince {
    /// Nothing unused yet.
    pub fn new(grace: Duration) -> Self {
        Self { grace, since: BTreeMap::new() }
    }

    /// Takes the numbers that no pod uses now; a number in use again starts over.
    pub fn observe(&mut self, unused: &[IdentityId], now: Instant) {
        let set: std::collections::BTreeSet<IdentityId> = unused.iter().copied().collect();
        self.since.retain(|id, _| set.contains(id));
        for id in unused {
            self.since.entry(*id).or_insert(now);
        }
    }

    /// The numbers unused for the whole grace period.
    pub fn due(&self, now: Instant) -> Vec<IdentityId> {
        self.since.iter().filter(|(_, t)| now.duration_since(**t) >= self.grace).map(|(id, _)| *id).collect()
    }
}

/// What collecting one number came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collected {
    /// The object was deleted.
    Deleted,
    /// Left alone: not claimed by Porin, gone already, or changed since it was read.
    Kept(&'static str),
}

impl Collector {
    /// A collector deleting what has been unused for `grace`.
    pub fn new(client: Client, grace: Duration) -> Self {
        Self { client, unused: UnusedSince::new(grace), foreign: std::collections::BTreeSet::new() }
    }

    /// How often to look: a quarter of the grace period, from 200 ms to 30 s.
    pub fn period(&self) -> Duration {
        (self.unused.grace / 4).clamp(Duration::from_millis(200), Duration::from_secs(30))
    }

    /// Takes the numbers of the cluster's identities that no pod uses now.
    pub fn observe(&mut self, unused: &[IdentityId], now: Instant) {
        self.unused.observe(unused, now);
        self.foreign.retain(|id| self.unused.since.contains_key(id));
    }

    /// Collects every due number; returns how many objects were deleted and how many deletions
    /// failed (tried again next time).
    pub async fn collect(&mut self, now: Instant) -> (usize, usize) {
        let (mut deleted, mut failed) = (0, 0);
        let due: Vec<IdentityId> = self.unused.due(now).into_iter().filter(|id| !self.foreign.contains(id)).collect();
        for id in due {
            match self.collect_one(id).await {
                Ok(Collected::Deleted) => {
                    tracing::info!(identity = id, "Identity no pod uses collected");
                    deleted += 1;
                    self.unused.since.remove(&id);
                }
                Ok(Collected::Kept(why)) => {
                    tracing::debug!(identity = id, why, "Unused identity left alone");
                    if why == NOT_PORINS {
                        self.foreign.insert(id);
                    } else {
                        // Looked at again after another grace period, if still unused.
                        self.unused.since.insert(id, now);
                    }
                }
                Err(e) => {
                    tracing::warn!(identity = id, error = %e, "Could not collect an unused identity; trying again");
                    failed += 1;
                }
            }
        }
        (deleted, failed)
    }

    async fn collect_one(&self, id: IdentityId) -> Result<Collected, kube::Error> {
        let api: Api<CiliumIdentity> = Api::all(self.client.clone());
        let name = id.to_string();
        let Some(object) = api.get_opt(&name).await? else { return Ok(Collected::Kept("gone already")) };
        if object.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY)).map(String::as_str) != Some(PORIN) {
            return Ok(Collected::Kept(NOT_PORINS));
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: object.metadata.uid.clone(),
                resource_version: object.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => Ok(Collected::Deleted),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Collected::Kept("gone already")),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Collected::Kept("changed since it was read")),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, labels: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
            "metadata": {"name": name}, "security-labels": labels,
        }))
        .unwrap()
    }

    #[test]
    fn objects_read_as_numbered_label_sets_and_bad_ones_say_why() {
        let o = object(
            "300",
            serde_json::json!({"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "default", "reserved:init": ""}),
        );
        assert_eq!(
            parse(&o),
            Ok(ClusterIdentity {
                id: 300,
                labels: vec![
                    "k8s:app=web".into(),
                    "k8s:io.kubernetes.pod.namespace=default".into(),
                    "reserved:init".into()
                ]
            })
        );
        // Back to the object's shape, unchanged.
        assert_eq!(
            labels_map(&parse(&o).unwrap().labels),
            serde_json::from_value(o.data["security-labels"].clone()).unwrap()
        );
        for (name, labels, why) in [
            ("web", serde_json::json!({"k8s:app": "web"}), "not a number"),
            ("0300", serde_json::json!({"k8s:app": "web"}), "canonical form"),
            ("+300", serde_json::json!({"k8s:app": "web"}), "canonical form"),
            ("2", serde_json::json!({"k8s:app": "web"}), "outside the cluster range"),
            ("16777216", serde_json::json!({"k8s:app": "web"}), "outside the cluster range"),
            ("300", serde_json::json!({}), "no security-labels"),
            ("300", serde_json::json!({"k8s:app": 7}), "security-labels"),
        ] {
            let e = parse(&object(name, labels)).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_number_is_due_once_unused_for_the_whole_grace_period() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut u = UnusedSince::new(Duration::from_secs(10));
        u.observe(&[300, 400], s(0));
        assert!(u.due(s(9)).is_empty());
        // 400 in use again at 5 s, unused again at 8 s: its clock starts over.
        u.observe(&[300], s(5));
        u.observe(&[300, 400], s(8));
        assert_eq!(u.due(s(10)), vec![300]);
        assert_eq!(u.due(s(18)), vec![300, 400]);
        u.observe(&[], s(19));
        assert!(u.due(s(100)).is_empty(), "everything in use again");
    }

    #[test]
    fn a_set_claimed_twice_keeps_its_lowest_number() {
        let set = |id, l: &[&str]| ClusterIdentity { id, labels: l.iter().map(|s| (*s).to_owned()).collect() };
        let (a, passed) = assignments(&[
            set(900, &["k8s:app=web", "k8s:tier=x"]),
            set(400, &["k8s:tier=x", "k8s:app=web"]),
            set(500, &["k8s:app=db"]),
            // One set spelled two ways: a label without a source reads as `any:`.
            set(460, &["app=db"]),
            set(450, &["any:app=db"]),
        ]);
        assert_eq!(passed, 2);
        let mut a = a;
        a.sort();
        assert_eq!(
            a,
            vec![
                (vec!["any:app=db".into()], 450),
                (vec!["k8s:app=db".into()], 500),
                (vec!["k8s:app=web".into(), "k8s:tier=x".into()], 400)
            ]
        );
    }
}
