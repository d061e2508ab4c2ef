//! What a node's agent writes to the API: on the policy objects it read, its entry in
//! `status.nodes` (the kinds whose CRD Porin defines) and, for an object it refuses, a Warning
//! Event naming why; and the claims of its pods' identities ([`crate::identity`]). Each object is
//! written when what the node says of it changes; a write the API refuses or misses is tried again
//! on the next round.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter as EventReporter};

use policy_engine::identity::IdentityId;

use crate::crd::NodeStatus;
use crate::watch::{ObjectKey, has_node_status, resource};

/// What the node made of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Which object.
    pub key: ObjectKey,
    /// The `metadata.uid` read.
    pub uid: Option<String>,
    /// The `metadata.generation` read.
    pub generation: Option<i64>,
    /// Why it is refused (none: its rules are in force).
    pub error: Option<String>,
    /// Its rules (this version's, or the last good one's) are enforced.
    pub enforcing: bool,
    /// The node's policy version.
    pub revision: u64,
}

impl Verdict {
    /// Whether `other` says the same of the same version of the object (the node's policy
    /// version aside: it moves with every reload).
    fn says_the_same(&self, other: &Verdict) -> bool {
        (&self.uid, self.generation, &self.error, self.enforcing)
            == (&other.uid, other.generation, &other.error, other.enforcing)
    }
}

/// What the node has to say after a reload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// What it made of each policy object.
    pub verdicts: Vec<Verdict>,
    /// The identities its pods use that the cluster has no object for yet: number, labels.
    pub unclaimed: Vec<(IdentityId, Vec<String>)>,
    /// The numbers of the cluster's identities that no pod of the cluster uses (as this node sees
    /// it), for [`crate::identity::Collector`].
    pub unused: Vec<IdentityId>,
}

/// Writes reports to the API.
pub struct Reporter {
    client: Client,
    node: String,
    recorder: Recorder,
    /// What was last written for each object.
    written: HashMap<ObjectKey, Verdict>,
    /// Identities claimed (created, or found taken) while they are still asked for: the watch
    /// brings the object, and the agent stops asking.
    claimed: HashSet<(IdentityId, Vec<String>)>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").field("node", &self.node).field("written", &self.written.len()).finish()
    }
}

/// The longest error an Event carries (the API server refuses notes over 1 KiB).
const NOTE_MAX: usize = 1000;

impl Reporter {
    /// A reporter for node `node`.
    pub fn new(client: Client, node: &str) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            EventReporter { controller: "porin-agent".into(), instance: Some(node.to_owned()) },
        );
        Self { client, node: node.to_owned(), recorder, written: HashMap::new(), claimed: HashSet::new() }
    }

    /// Writes what changed since the last round; returns how many writes failed (tried again
    /// next round).
    pub async fn report(&mut self, report: &Report) -> usize {
        let mut failed = self.claim(&report.unclaimed).await;
        let verdicts = &report.verdicts;
        for v in verdicts {
            if self.written.get(&v.key).is_some_and(|w| w.says_the_same(v)) {
                continue;
            }
            match self.write(v).await {
                Ok(()) => {
                    self.written.insert(v.key.clone(), v.clone());
                }
                Err(e) => {
                    failed += 1;
                    tracing::debug!(object = %v.key, error = %e, "Policy status not written: tried again");
                }
            }
        }
        // Objects gone from the cluster need no more writes.
        self.written.retain(|k, _| verdicts.iter().any(|v| &v.key == k));
        failed
    }

    /// Claims the identities not claimed yet; returns how many claims failed.
    async fn claim(&mut self, unclaimed: &[(IdentityId, Vec<String>)]) -> usize {
        self.claimed.retain(|c| unclaimed.contains(c));
        let mut failed = 0;
        for c in unclaimed {
            if self.claimed.contains(c) {
                continue;
            }
            match crate::identity::claim(&self.client, c.0, &c.1).await {
                Ok(crate::identity::Claim::Created) => {
                    tracing::info!(identity = c.0, labels = %c.1.join(","), "Identity claimed");
                    self.claimed.insert(c.clone());
                }
                Ok(crate::identity::Claim::Taken) => {
                    // Settled by the watch: the object's set gets the number on the next reload
                    // and this set another, claimed then.
                    tracing::warn!(identity = c.0, labels = %c.1.join(","), "Identity number already claimed by another object");
                    self.claimed.insert(c.clone());
                }
                Err(e) => {
                    failed += 1;
                    tracing::debug!(identity = c.0, error = %e, "Identity not claimed: tried again");
                }
            }
        }
        failed
    }

    async fn write(&self, v: &Verdict) -> Result<(), kube::Error> {
        let ar = resource(v.key.kind);
        if has_node_status(v.key.kind) {
            let api: Api<DynamicObject> = match &v.key.namespace {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
                None => Api::all_with(self.client.clone(), &ar),
            };
            let status = NodeStatus {
                ok: v.error.is_none(),
                enforcing: v.enforcing,
                error: v.error.clone(),
                local_policy_revision: v.revision,
                last_updated: Some(now_rfc3339()),
            };
            let patch = serde_json::json!({ "status": { "nodes": { &self.node: status } } });
            api.patch_status(&v.key.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        if let Some(error) = &v.error {
            let mut note: String = error.chars().take(NOTE_MAX).collect();
            if note.len() < error.len() {
                note.push('…');
            }
            let reference = ObjectReference {
                api_version: Some(ar.api_version.clone()),
                kind: Some(ar.kind.clone()),
                name: Some(v.key.name.clone()),
                namespace: v.key.namespace.clone(),
                uid: v.uid.clone(),
                ..Default::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: "PolicyInvalid".into(),
                note: Some(note),
                action: "Validate".into(),
                secondary: None,
            };
            self.recorder.publish(&event, &reference).await?;
        }
        Ok(())
    }
}

/// Now, RFC 3339 (UTC), as Kubernetes writes times.
fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map_or_else(|_| String::new(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T", "{t}");
    }
}
