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
/// First FQDN selector identity (node-local; CIDR identities stay below it).
pub const FQDN_BASE: IdentityId = LOCAL_SCOPE | (1 << 22);

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// A reserved identity.
    Reserved,
    /// A set of endpoint labels.
    Endpoint,
    /// A prefix outside the cluster (from a CIDR rule, a CIDR group or a service backend).
    Cidr(IpNet),
    /// A `toFQDNs` selector (its normalised name or pattern): the addresses the DNS proxy learned
    /// for names it matches carry it besides their own identity (see [`crate::fqdn`]).
    Fqdn(String),
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

/// The labels of an FQDN selector identity.
pub fn fqdn_labels(selector: &str) -> Labels {
    Labels::new([Label::new(LabelKey { source: crate::labels::LabelSource::Fqdn, key: selector.to_owned() }, "")])
}

/// FQDN selector identities handed out: `(selector, id)` and the next number. Numbers are never
/// handed out twice: the kernel's FQDN map, written by another process, may still name a retired
/// selector's number for a moment, and must never grant it another selector's rights.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FqdnAssignments {
    /// Selectors and their identities.
    pub selectors: Vec<(String, IdentityId)>,
    /// The next number to hand out.
    pub next: IdentityId,
}

impl Default for FqdnAssignments {
    fn default() -> Self {
        Self { selectors: Vec::new(), next: FQDN_BASE }
    }
}

/// How an allocator numbers a label set it has not seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numbering {
    /// The lowest free number from 256: one node, or a cluster whose numbers come from one place.
    #[default]
    Lowest,
    /// The number the labels give ([`derived_identity`]), or the next free one after it: nodes
    /// that never talk to each other agree on every label set whose number no other set took.
    FromLabels,
}

/// The number a label set's text gives (FNV-1a 64 of its labels, one per line, into the cluster
/// range `256..2^24`): the same on every node, every build, every machine.
pub fn derived_identity(labels: &Labels) -> IdentityId {
    use std::hash::Hasher as _;
    let mut h = fnv::FnvHasher::default();
    for l in labels.iter() {
        h.write(l.to_string().as_bytes());
        h.write(b"\n");
    }
    let span = u64::from(LOCAL_SCOPE - MIN_CLUSTER_IDENTITY);
    // Below 2^24: the cast keeps every bit.
    MIN_CLUSTER_IDENTITY + (h.finish() % span) as IdentityId
}

/// Hands out identities and remembers them.
#[derive(Clone, Debug)]
pub struct IdentityAllocator {
    numbering: Numbering,
    by_labels: BTreeMap<Labels, IdentityId>,
    by_prefix: BTreeMap<IpNet, IdentityId>,
    by_fqdn: BTreeMap<String, IdentityId>,
    fqdn_next: IdentityId,
    /// Cluster numbers held elsewhere for no label set known here ([`IdentityAllocator::reserve`]).
    reserved: std::collections::BTreeSet<IdentityId>,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self {
            numbering: Numbering::Lowest,
            reserved: std::collections::BTreeSet::new(),
            by_labels: BTreeMap::new(),
            by_prefix: BTreeMap::new(),
            by_fqdn: BTreeMap::new(),
            fqdn_next: FQDN_BASE,
        }
    }
}

impl IdentityAllocator {
    /// An empty allocator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Numbers label sets not seen yet this way from now on.
    pub fn set_numbering(&mut self, numbering: Numbering) {
        self.numbering = numbering;
    }

    /// The identity of a label set, allocating one if new (see [`Numbering`]).
    pub fn endpoint(&mut self, labels: &Labels) -> IdentityId {
        if let Some(id) = self.by_labels.get(labels) {
            return *id;
        }
        let id = match self.numbering {
            Numbering::Lowest => lowest_free(self.by_labels.values().chain(&self.reserved), MIN_CLUSTER_IDENTITY),
            Numbering::FromLabels => {
                let mut used: std::collections::BTreeSet<IdentityId> = self.by_labels.values().copied().collect();
                used.extend(&self.reserved);
                free_from(&used, derived_identity(labels))
            }
        };
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

    /// The identity of an FQDN selector (its normalised name or pattern), allocating a number
    /// never handed out before if new.
    pub fn fqdn(&mut self, selector: &str) -> IdentityId {
        if let Some(id) = self.by_fqdn.get(selector) {
            return *id;
        }
        let id = self.fqdn_next;
        self.fqdn_next += 1;
        self.by_fqdn.insert(selector.to_owned(), id);
        id
    }

    /// The FQDN selector identities handed out.
    pub fn fqdn_assignments(&self) -> FqdnAssignments {
        FqdnAssignments {
            selectors: self.by_fqdn.iter().map(|(s, id)| (s.clone(), *id)).collect(),
            next: self.fqdn_next,
        }
    }

    /// Continues from another allocator's FQDN selector identities.
    pub fn restore_fqdn(&mut self, a: &FqdnAssignments) {
        self.by_fqdn = a.selectors.iter().cloned().collect();
        let past = a.selectors.iter().map(|(_, id)| id + 1).max().unwrap_or(FQDN_BASE);
        self.fqdn_next = a.next.max(past).max(FQDN_BASE);
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
            ..Self::default()
        }
    }

    /// Takes identities handed out elsewhere (the cluster's allocator) as given: each label set gets
    /// its number, and a label set that held one of these numbers here gives it up (it gets a free
    /// one when next asked). Returns how many label sets known here changed number or gave one up.
    ///
    /// # Errors
    /// A set that could hand one identity's rights to another is refused whole (nothing changes): a
    /// number outside the cluster range (`256..2^24`: below are the reserved identities, above the
    /// node-local CIDR and FQDN ones), a number given to two label sets, a label set given twice.
    pub fn pin(&mut self, given: &[LabelAssignment]) -> Result<usize, String> {
        let parse = |ls: &Vec<String>| {
            Labels::new(ls.iter().map(|l| crate::labels::Label::parse(l, crate::labels::LabelSource::Any)))
        };
        let mut by_labels: BTreeMap<Labels, IdentityId> = BTreeMap::new();
        let mut numbers: BTreeMap<IdentityId, &Vec<String>> = BTreeMap::new();
        for (l, id) in given {
            if !(MIN_CLUSTER_IDENTITY..LOCAL_SCOPE).contains(id) {
                return Err(format!("identity {id} for [{}]: outside the cluster range 256..16777216", l.join(", ")));
            }
            if let Some(other) = numbers.insert(*id, l) {
                return Err(format!("identity {id} is given to both [{}] and [{}]", other.join(", "), l.join(", ")));
            }
            if by_labels.insert(parse(l), *id).is_some() {
                return Err(format!("labels [{}] are given two identities", l.join(", ")));
            }
        }
        let mut changed = 0;
        self.by_labels.retain(|l, id| {
            let keep = match by_labels.get(l) {
                Some(want) => *want == *id,
                None => !numbers.contains_key(id),
            };
            changed += usize::from(!keep);
            keep
        });
        self.by_labels.extend(by_labels);
        Ok(changed)
    }

    /// Holds cluster numbers that are taken elsewhere but give no label set here (in Kubernetes
    /// mode: a CiliumIdentity object that is passed over, unreadable or naming a set claimed under
    /// a lower number): no set is numbered with them, and a set that holds one here gives it up
    /// (it gets a free number when next asked). Replaces the previous reservation; returns how
    /// many label sets gave a number up.
    pub fn reserve(&mut self, numbers: &[IdentityId]) -> usize {
        self.reserved = numbers.iter().copied().collect();
        let before = self.by_labels.len();
        let reserved = &self.reserved;
        self.by_labels.retain(|_, id| !reserved.contains(id));
        before - self.by_labels.len()
    }

    /// Forgets label sets, prefixes and FQDN selectors not in use; label and prefix numbers can be
    /// reused later, FQDN selector numbers never are.
    pub fn retain(&mut self, labels_in_use: &[&Labels], prefixes_in_use: &[IpNet], fqdn_in_use: &[&str]) {
        self.by_labels.retain(|l, _| labels_in_use.contains(&l));
        self.by_prefix.retain(|p, _| prefixes_in_use.contains(p));
        self.by_fqdn.retain(|s, _| fqdn_in_use.contains(&s.as_str()));
    }
}

/// The first cluster number from `start` not in `used`, going on from 256 past the top (the range
/// holds 2^24 - 256 numbers: one is free long before).
fn free_from(used: &std::collections::BTreeSet<IdentityId>, start: IdentityId) -> IdentityId {
    let mut id = start;
    while used.contains(&id) {
        id = if id + 1 >= LOCAL_SCOPE { MIN_CLUSTER_IDENTITY } else { id + 1 };
    }
    id
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
        a.retain(&[&keep], &[], &[]);
        assert_eq!(a.endpoint(&labels(&["app=z"])), 256);
        assert_eq!(a.endpoint(&keep), 257);
    }

    #[test]
    fn numbers_derived_from_labels_agree_whatever_the_history() {
        let sets: Vec<Labels> = (0..200).map(|k| labels(&[&format!("app=a{k}"), "tier=web"])).collect();
        let mut one = IdentityAllocator::new();
        one.set_numbering(Numbering::FromLabels);
        let mut other = one.clone();
        // Two nodes see the sets in opposite orders, one of them with others in between.
        let first: Vec<IdentityId> = sets.iter().map(|l| one.endpoint(l)).collect();
        for (k, l) in sets.iter().enumerate().rev() {
            other.endpoint(&labels(&[&format!("noise={k}")]));
            other.endpoint(l);
        }
        for (l, id) in sets.iter().zip(&first) {
            assert_eq!(other.endpoint(l), *id, "{l}");
            assert_eq!(*id, derived_identity(l));
            assert!((MIN_CLUSTER_IDENTITY..LOCAL_SCOPE).contains(id));
        }
        // Stable across builds and machines (every node must compute the same): a known value.
        assert_eq!(derived_identity(&labels(&["app=x"])), 5_464_775, "FNV-1a 64 of \"k8s:app=x\\n\"");
        assert_ne!(derived_identity(&labels(&["app=x"])), derived_identity(&labels(&["app=y"])));
    }

    #[test]
    fn a_derived_number_already_taken_moves_to_the_next_free_one() {
        let mut a = IdentityAllocator::new();
        a.set_numbering(Numbering::FromLabels);
        let x = labels(&["app=x"]);
        let want = derived_identity(&x);
        let text = |l: &Labels| l.iter().map(ToString::to_string).collect::<Vec<_>>();
        // The cluster gave x's number, and the next, to other sets.
        let (s1, s2) = (labels(&["app=squatter1"]), labels(&["app=squatter2"]));
        a.pin(&[(text(&s1), want), (text(&s2), want + 1)]).unwrap();
        assert_eq!(a.endpoint(&x), want + 2);
        // At the top of the range, the search goes on from 256.
        let used = [LOCAL_SCOPE - 2, LOCAL_SCOPE - 1, MIN_CLUSTER_IDENTITY].into_iter().collect();
        assert_eq!(free_from(&used, LOCAL_SCOPE - 2), MIN_CLUSTER_IDENTITY + 1);
    }

    #[test]
    fn a_reserved_number_is_given_to_no_set() {
        let mut a = IdentityAllocator::new();
        a.set_numbering(Numbering::FromLabels);
        let x = labels(&["app=x"]);
        let want = derived_identity(&x);
        assert_eq!(a.endpoint(&x), want);
        // The cluster holds x's number for no set known here (an object passed over): x gives it
        // up and moves on, and so does every set asked for later.
        assert_eq!(a.reserve(&[want, want + 1]), 1);
        assert_eq!(a.endpoint(&x), want + 2);
        let mut lowest = IdentityAllocator::new();
        lowest.reserve(&[MIN_CLUSTER_IDENTITY]);
        assert_eq!(lowest.endpoint(&x), MIN_CLUSTER_IDENTITY + 1);
        // Released again: a set keeps the number it has.
        assert_eq!(a.reserve(&[]), 0);
        assert_eq!(a.endpoint(&x), want + 2);
    }

    #[test]
    fn pinned_identities_win_and_whoever_held_their_number_gets_another() {
        let mut a = IdentityAllocator::new();
        let x = labels(&["app=x"]);
        let y = labels(&["app=y"]);
        assert_eq!(a.endpoint(&x), 256);
        assert_eq!(a.endpoint(&y), 257);
        // The cluster says y is 256 and z is 300: x gives 256 up, y moves.
        let text = |l: &Labels| l.iter().map(ToString::to_string).collect::<Vec<_>>();
        let z = labels(&["app=z"]);
        assert_eq!(a.pin(&[(text(&y), 256), (text(&z), 300)]), Ok(2));
        assert_eq!(a.endpoint(&y), 256);
        assert_eq!(a.endpoint(&z), 300);
        assert_eq!(a.endpoint(&x), 257);
        // Pinning what is already so changes nothing.
        assert_eq!(a.pin(&[(text(&y), 256), (text(&z), 300)]), Ok(0));
        // Sets that would share or fake an identity are refused whole, and change nothing.
        for bad in [
            vec![(text(&x), 1)],
            vec![(text(&x), LOCAL_SCOPE | 1)],
            vec![(text(&x), 400), (text(&z), 400)],
            vec![(text(&x), 400), (text(&x), 401)],
        ] {
            assert!(a.pin(&bad).is_err(), "{bad:?}");
        }
        assert_eq!((a.endpoint(&x), a.endpoint(&y), a.endpoint(&z)), (257, 256, 300));
        assert_eq!(a.cidr("10.0.0.0/8".parse().unwrap()), LOCAL_SCOPE | 1);
    }

    #[test]
    fn fqdn_selector_numbers_are_never_reused() {
        let mut a = IdentityAllocator::new();
        let api = a.fqdn("api.example.com.");
        let any = a.fqdn("*.example.com.");
        assert_eq!((api, any), (FQDN_BASE, FQDN_BASE + 1));
        assert_eq!(a.fqdn("api.example.com."), api);
        a.retain(&[], &[], &["*.example.com."]);
        // The retired selector's number is not handed to the next one, nor after a restart.
        let next = a.fqdn("evil.example.com.");
        assert_eq!(next, FQDN_BASE + 2);
        let mut b = IdentityAllocator::new();
        b.restore_fqdn(&a.fqdn_assignments());
        assert_eq!(b.fqdn("*.example.com."), any);
        assert_eq!(b.fqdn("other.example.com."), FQDN_BASE + 3);
    }

    #[test]
    fn lpm_v6() {
        let mut c = IpCache::default();
        c.insert("fd00::/64".parse().unwrap(), 7);
        assert_eq!(c.lookup("fd00::1".parse().unwrap()), 7);
        assert_eq!(c.lookup("fd01::1".parse().unwrap()), reserved::WORLD_IPV6);
    }
}
