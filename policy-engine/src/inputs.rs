//! Everything a snapshot is resolved from, as one serialisable value: policy texts, the environment
//! and the identities already handed out. The agent publishes it; the proxy (another process)
//! resolves it with this same engine and gets the same snapshot, identities included.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::api::{LoadOptions, Loaded, load_str};
use crate::identity::{FqdnAssignments, IdentityAllocator, IdentityId};
use crate::resolve::{Environment, resolve};
use crate::snapshot::Snapshot;

/// One policy file's text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyText {
    /// Name used in messages (the file it came from).
    pub name: String,
    /// Multi-document YAML.
    pub text: String,
}

/// The inputs of one snapshot version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyInputs {
    /// Snapshot version.
    pub version: u64,
    /// Policy texts (each already known to load without errors).
    pub policies: Vec<PolicyText>,
    /// Endpoints, namespaces, FQDN cache, services, secrets.
    pub environment: Environment,
    /// Addresses of this node.
    #[serde(default)]
    pub node_ips: Vec<IpAddr>,
    /// Identities of label sets (labels as `source:key=value`).
    #[serde(default)]
    pub identities: Vec<(Vec<String>, IdentityId)>,
    /// Identities of prefixes.
    #[serde(default)]
    pub prefixes: Vec<(IpNet, IdentityId)>,
    /// Identities of FQDN selectors (numbers never handed out twice).
    #[serde(default)]
    pub fqdn: FqdnAssignments,
}

impl PolicyInputs {
    /// Loads the policies and resolves the snapshot. Policy load errors are returned (the publisher
    /// only publishes texts that load, so this indicates a version mismatch or corruption).
    ///
    /// ```
    /// use policy_engine::inputs::{PolicyInputs, PolicyText};
    /// let inputs = PolicyInputs {
    ///     version: 7,
    ///     policies: vec![PolicyText { name: "p.yaml".into(), text: "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n".into() }],
    ///     environment: Default::default(),
    ///     node_ips: vec![],
    ///     identities: vec![],
    ///     prefixes: vec![],
    ///     fqdn: Default::default(),
    /// };
    /// let snap = inputs.resolve().unwrap();
    /// assert_eq!(snap.version, 7);
    /// ```
    pub fn resolve(&self) -> Result<Snapshot, Vec<String>> {
        let mut loaded = Loaded::default();
        for p in &self.policies {
            loaded.extend(load_str(&p.name, &p.text, &LoadOptions::default()));
        }
        if !loaded.errors.is_empty() {
            return Err(loaded.errors.iter().map(ToString::to_string).collect());
        }
        let mut alloc = self.allocator();
        Ok(resolve(&loaded.policies, &loaded.cidr_groups, &self.environment, &mut alloc, self.version))
    }

    /// An allocator that hands out what these inputs record.
    pub fn allocator(&self) -> IdentityAllocator {
        let mut alloc = IdentityAllocator::from_assignments(&self.identities, &self.prefixes);
        alloc.restore_fqdn(&self.fqdn);
        alloc
    }
}
