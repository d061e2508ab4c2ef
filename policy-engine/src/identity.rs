//! Numeric security identities and the IP → identity cache.
//!
//! Owns Cilium's reserved identities (1 host, 2 world, ...), allocation of identities to label sets
//! (cluster-local, from 256) and to CIDR prefixes (node-local scope, `1 << 24`), and the longest-prefix
//! ipcache. The allocator remembers what it handed out, so a label set keeps its identity across
//! snapshots; a fresh allocator given the same inputs hands out the same identities.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::labels::{Label, LabelKey, Labels};

/// A numeric security identity.
pub type IdentityId = u32;

/// An identity handed out to a label set (labels as `source:key=value`).
pub type LabelAssignment = (Vec<String>, IdentityId);

/// An identity handed out to a prefix.
pub type PrefixAssignment = (IpNet, IdentityId);

/// Reserved identities (`pkg/identity/numericidentity.go`).
pub mod reserved {
    use super::IdentityId;
    /// Unknown.
    pub const UNKNOWN: IdentityId = 0;
    /// The local host.
    pub const HOST: IdentityId = 1;
    /// Outside the cluster.
    pub const WORLD: IdentityId = 2;
    /// Unmanaged endpoints.
    pub const UNMANAGED: IdentityId = 3;
    /// Health endpoints.
    pub const HEALTH: IdentityId = 4;
    /// Initialising endpoints.
    pub const INIT: IdentityId = 5;
    /// Other nodes.
    pub const REMOTE_NODE: IdentityId = 6;
    /// The Kubernetes API server.
    pub const KUBE_APISERVER: IdentityId = 7;
    /// The ingress proxy.
    pub const INGRESS: IdentityId = 8;
    /// Outside the cluster, IPv4.
    pub const WORLD_IPV4: IdentityId = 9;
    /// Outside the cluster, IPv6.
    pub const WORLD_IPV6: IdentityId = 10;

    /// Reserved identities with their `reserved:` label name.
    pub const ALL: &[(IdentityId, &str)] = &[
        (HOST, "host"),
        (WORLD, "world"),
        (UNMANAGED, "unmanaged"),
        (HEALTH, "health"),
        (INIT, "init"),
        (REMOTE_NODE, "remote-node"),
        (KUBE_APISERVER, "kube-apiserver"),
        (INGRESS, "ingress"),
        (WORLD_IPV4, "world-ipv4"),
        (WORLD_IPV6, "world-ipv6"),
    ];

    /// The reserved identity of an entity-like name (`host`, `world`, ...).
    pub fn by_name(name: &str) -> Option<IdentityId> {
        ALL.iter().find(|(_, n)| *n == name).map(|(id, _)| *id)
    }
}

/// First cluster-local identity.
pub const MIN_CLUSTER_IDENTITY: IdentityId = 256;
/// Scope bit of node-local (CIDR / FQDN) identities.
pub const LOCAL_SCOPE: IdentityId = 1 << 24;

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// A reserved identity.
    Reserved,
    /// A set of endpoint labels.
    Endpoint,
    /// A prefix outside the cluster (from a CIDR rule, a CIDR group, a service backend or a DNS answer).
    Cidr(IpNet),
}

/// An identity and its labels.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Number.
    pub id: IdentityId,
    /// Security-relevant labels.
    pub labels: Labels,
    /// Kind.
    pub kind: IdentityKind,
}

/// The labels of a reserved identity.
pub fn reserved_labels(name: &str) -> Labels {
    Labels::new([Label::new(LabelKey::reserved(name), "")])
}

/// The labels of a CIDR identity: its prefix, and world.
pub fn cidr_labels(prefix: &IpNet) -> Labels {
    let family = if prefix.addr().is_ipv4() { "world-ipv4" } else { "world-ipv6" };
    Labels::new([
        Label::new(LabelKey { source: crate::labels::LabelSource::Cidr, key: prefix.to_string() }, ""),
        Label::new(LabelKey::reserved("world"), ""),
        Label::new(LabelKey::reserved(family), ""),
    ])
}

/// Hands out identities and remembers them.
#[derive(Clone, Debug, Default)]
pub struct IdentityAllocator {
    by_labels: BTreeMap<Labels, IdentityId>,
    by_prefix: BTreeMap<IpNet, IdentityId>,
}

impl IdentityAllocator {
    /// An empty allocator.
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity of a label set, allocating the lowest free one from 256 if new.
    pub fn endpoint(&mut self, labels: &Labels) -> IdentityId {
        if let Some(id) = self.by_labels.get(labels) {
            return *id;
        }
        let id = lowest_free(self.by_labels.values(), MIN_CLUSTER_IDENTITY);
        self.by_labels.insert(labels.clone(), id);
        id
    }

    /// The identity of a prefix, allocating the lowest free local-scope one if new.
    pub fn cidr(&mut self, prefix: IpNet) -> IdentityId {
        if let Some(id) = self.by_prefix.get(&prefix) {
            return *id;
        }
        let id = lowest_free(self.by_prefix.values(), LOCAL_SCOPE | 1);
        self.by_prefix.insert(prefix, id);
        id
    }

    /// What has been handed out: `(labels, id)` and `(prefix, id)`, for another process to start from.
    pub fn assignments(&self) -> (Vec<LabelAssignment>, Vec<PrefixAssignment>) {
        (
            self.by_labels.iter().map(|(l, id)| (l.iter().map(ToString::to_string).collect(), *id)).collect(),
            self.by_prefix.iter().map(|(p, id)| (*p, *id)).collect(),
        )
    }

    /// An allocator that starts from another's assignments (see [`IdentityAllocator::assignments`]).
    pub fn from_assignments(labels: &[(Vec<String>, IdentityId)], prefixes: &[(IpNet, IdentityId)]) -> Self {
        let parse = |ls: &Vec<String>| {
            Labels::new(ls.iter().map(|l| crate::labels::Label::parse(l, crate::labels::LabelSource::Any)))
        };
        Self {
            by_labels: labels.iter().map(|(l, id)| (parse(l), *id)).collect(),
            by_prefix: prefixes.iter().map(|(p, id)| (p.trunc(), *id)).collect(),
        }
    }

    /// Forgets label sets and prefixes not in use, so their numbers can be reused later.
    pub fn retain(&mut self, labels_in_use: &[&Labels], prefixes_in_use: &[IpNet]) {
        self.by_labels.retain(|l, _| labels_in_use.contains(&l));
        self.by_prefix.retain(|p, _| prefixes_in_use.contains(p));
    }
}

fn lowest_free<'a>(used: impl Iterator<Item = &'a IdentityId>, start: IdentityId) -> IdentityId {
    let mut used: Vec<IdentityId> = used.copied().collect();
    used.sort_unstable();
    let mut candidate = start;
    for u in used {
        if u == candidate {
            candidate += 1;
        } else if u > candidate {
            break;
        }
    }
    candidate
}

/// IP / prefix → identity, longest prefix first; unknown addresses are world.
#[derive(Clone, Debug, Default)]
pub struct IpCache {
    entries: BTreeMap<IpNet, IdentityId>,
}

impl IpCache {
    /// Adds or replaces an entry.
    pub fn insert(&mut self, prefix: IpNet, id: IdentityId) {
        self.entries.insert(prefix.trunc(), id);
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = (&IpNet, &IdentityId)> {
        self.entries.iter()
    }

    /// The identity of an address: the longest matching prefix, else `world-ipv4` / `world-ipv6`.
    ///
    /// ```
    /// use policy_engine::identity::{IpCache, reserved};
    /// let mut c = IpCache::default();
    /// c.insert("10.0.0.0/8".parse().unwrap(), 16777217);
    /// c.insert("10.0.0.5/32".parse().unwrap(), 256);
    /// assert_eq!(c.lookup("10.0.0.5".parse().unwrap()), 256);
    /// assert_eq!(c.lookup("10.1.2.3".parse().unwrap()), 16777217);
    /// assert_eq!(c.lookup("192.0.2.1".parse().unwrap()), reserved::WORLD_IPV4);
    /// ```
    pub fn lookup(&self, ip: IpAddr) -> IdentityId {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        for len in (0..=max).rev() {
            if let Ok(net) = IpNet::new(ip, len)
                && let Some(id) = self.entries.get(&net.trunc())
            {
                return *id;
            }
        }
        if ip.is_ipv4() { reserved::WORLD_IPV4 } else { reserved::WORLD_IPV6 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::LabelSource;

    fn labels(s: &[&str]) -> Labels {
        Labels::new(s.iter().map(|l| Label::parse(l, LabelSource::K8s)))
    }

    #[test]
    fn allocation_is_stable_and_reuses_freed_numbers() {
        let mut a = IdentityAllocator::new();
        let x = a.endpoint(&labels(&["app=x"]));
        let y = a.endpoint(&labels(&["app=y"]));
        assert_eq!((x, y), (256, 257));
        assert_eq!(a.endpoint(&labels(&["app=x"])), 256);
        let keep = labels(&["app=y"]);
        a.retain(&[&keep], &[]);
        assert_eq!(a.endpoint(&labels(&["app=z"])), 256);
        assert_eq!(a.endpoint(&keep), 257);
        assert_eq!(a.cidr("10.0.0.0/8".parse().unwrap()), LOCAL_SCOPE | 1);
    }

    #[test]
    fn lpm_v6() {
        let mut c = IpCache::default();
        c.insert("fd00::/64".parse().unwrap(), 7);
        assert_eq!(c.lookup("fd00::1".parse().unwrap()), 7);
        assert_eq!(c.lookup("fd01::1".parse().unwrap()), reserved::WORLD_IPV6);
    }
}
