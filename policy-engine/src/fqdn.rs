//! DNS-based egress (`toFQDNs`): the selectors of a snapshot, and what the DNS proxy learned.
//!
//! Each `toFQDNs` selector (a normalised name or pattern) has an identity of its own
//! ([`crate::identity::IdentityKind::Fqdn`]); policy entries name it like any peer identity. An
//! address the DNS proxy learned for a name keeps its own identity (world, or a CIDR identity) and
//! is *also* every selector identity whose selector matches one of its names. A flow to it is
//! judged on the union: an entry matches when it names the address's identity or any of those
//! selector identities ([`crate::snapshot::DirectionPolicy::l4_verdict_for`]). The kernel does the
//! same with its FQDN map (address → selector identities), which the DNS proxy writes before it
//! releases an answer, so learning a name never needs a new snapshot.
//!
//! [`FqdnCache`] is what was learned: names → addresses with their expiry, the endpoints that
//! asked, and addresses kept past expiry while connections to them live (Cilium's zombies).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::dns::{NamePattern, normalize_name};
use crate::identity::IdentityId;

/// The key of a selector: its normalised name or pattern (a name and a pattern without `*` that
/// read the same select the same names, and share an identity).
pub fn selector_key(p: &NamePattern) -> String {
    match p {
        NamePattern::Name(n) | NamePattern::Pattern(n) => n.clone(),
    }
}

/// One `toFQDNs` selector of a snapshot.
#[derive(Clone, Debug)]
pub struct FqdnSelector {
    /// Its normalised name or pattern.
    pub key: String,
    /// Its identity.
    pub identity: IdentityId,
    regex: Regex,
}

/// The `toFQDNs` selectors of a snapshot.
#[derive(Clone, Debug, Default)]
pub struct FqdnSelectors {
    list: Vec<FqdnSelector>,
}

impl FqdnSelectors {
    /// Selectors from `(pattern, identity)` pairs (duplicates of a key kept once).
    pub fn new(selectors: impl IntoIterator<Item = (NamePattern, IdentityId)>) -> Self {
        let mut list: Vec<FqdnSelector> = Vec::new();
        for (p, identity) in selectors {
            let key = selector_key(&p);
            if !list.iter().any(|s| s.key == key) {
                list.push(FqdnSelector { key, identity, regex: p.to_regex() });
            }
        }
        list.sort_by(|a, b| a.key.cmp(&b.key));
        Self { list }
    }

    /// Every selector.
    pub fn iter(&self) -> impl Iterator<Item = &FqdnSelector> {
        self.list.iter()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The selectors that match a (normalised) name.
    pub fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a FqdnSelector> + 'a {
        self.list.iter().filter(move |s| s.regex.is_match(name))
    }

    /// The selector identities of an address, from the names it was learned under: sorted, once
    /// each.
    pub fn identities_of<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<IdentityId> {
        let mut ids: Vec<IdentityId> =
            names.into_iter().flat_map(|n| self.matching(n).map(|s| s.identity).collect::<Vec<_>>()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Most addresses kept per name (Cilium's `--tofqdns-endpoint-max-ip-per-hostname`); the ones
/// that expire first make room.
pub const MAX_IPS_PER_NAME: usize = 1000;

/// One learned name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    /// Addresses and when each expires (Unix seconds).
    pub ips: BTreeMap<IpAddr, u64>,
    /// Endpoints (`namespace/name`) whose lookups taught it.
    pub endpoints: BTreeSet<String>,
    /// When it was last learned (Unix seconds).
    pub learned_at: u64,
}

/// What the DNS proxy learned: names → addresses, and addresses kept past expiry while a
/// connection to them lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnCache {
    /// By name (normalised).
    names: BTreeMap<String, NameEntry>,
    /// Addresses whose names all expired while connections to them lived: their names, kept until
    /// the connections end.
    zombies: BTreeMap<IpAddr, BTreeSet<String>>,
}

/// Who learned what, as `porin fqdn cache list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRow {
    /// The name.
    pub name: String,
    /// An address.
    pub ip: IpAddr,
    /// Seconds left (0 for a zombie).
    pub ttl_left: u64,
    /// Endpoints that looked it up.
    pub endpoints: Vec<String>,
    /// Kept past expiry while a connection lives.
    pub zombie: bool,
}

impl FqdnCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache of names that never expire (`policy test`'s `fqdn_cache`).
    pub fn fixed(entries: &BTreeMap<String, Vec<IpAddr>>) -> Self {
        let mut c = Self::new();
        for (name, ips) in entries {
            c.learn(std::slice::from_ref(name), ips, u64::MAX / 2, 0, "");
        }
        c
    }

    /// Records an answer: each of `names` (the question and the CNAME chain to the addresses) has
    /// `ips` until `now + ttl`. Returns the addresses whose set of names changed.
    pub fn learn(&mut self, names: &[String], ips: &[IpAddr], ttl: u64, now: u64, endpoint: &str) -> Vec<IpAddr> {
        let expires = now.saturating_add(ttl);
        let mut changed = BTreeSet::new();
        for name in names {
            let name = normalize_name(name);
            let entry = self.names.entry(name.clone()).or_default();
            entry.learned_at = now;
            if !endpoint.is_empty() {
                entry.endpoints.insert(endpoint.to_owned());
            }
            for ip in ips {
                match entry.ips.get_mut(ip) {
                    Some(e) => *e = (*e).max(expires),
                    None => {
                        entry.ips.insert(*ip, expires);
                        changed.insert(*ip);
                    }
                }
            }
            // Over the limit: the addresses that expire first go.
            while entry.ips.len() > MAX_IPS_PER_NAME {
                let Some((&ip, _)) = entry.ips.iter().min_by_key(|(_, e)| **e) else { break };
                entry.ips.remove(&ip);
                changed.insert(ip);
            }
        }
        for ip in ips {
            if self.zombies.remove(ip).is_some() {
                changed.insert(*ip);
            }
        }
        changed.into_iter().collect()
    }

    /// The names an address is known under (zombies included).
    pub fn names_of(&self, ip: IpAddr) -> Vec<&str> {
        let mut out: Vec<&str> =
            self.names.iter().filter(|(_, e)| e.ips.contains_key(&ip)).map(|(n, _)| n.as_str()).collect();
        if let Some(z) = self.zombies.get(&ip) {
            out.extend(z.iter().map(String::as_str));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The addresses of a name (not expired as of the last [`FqdnCache::expire`]).
    pub fn ips_of(&self, name: &str) -> Vec<IpAddr> {
        self.names.get(&normalize_name(name)).map(|e| e.ips.keys().copied().collect()).unwrap_or_default()
    }

    /// Every address known (zombies included).
    pub fn ips(&self) -> BTreeSet<IpAddr> {
        let mut out: BTreeSet<IpAddr> = self.names.values().flat_map(|e| e.ips.keys().copied()).collect();
        out.extend(self.zombies.keys().copied());
        out
    }

    /// Drops what expired by `now`. An address left without names stays (a zombie, with the names
    /// it had) while `alive` says a connection to it lives. Returns the addresses whose names
    /// changed (to update or remove in the kernel).
    pub fn expire(&mut self, now: u64, alive: impl Fn(IpAddr) -> bool) -> Vec<IpAddr> {
        let mut lost: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for (name, e) in &mut self.names {
            e.ips.retain(|ip, exp| {
                let keep = *exp > now;
                if !keep {
                    lost.entry(*ip).or_default().insert(name.clone());
                }
                keep
            });
        }
        self.names.retain(|_, e| !e.ips.is_empty());
        let mut changed: BTreeSet<IpAddr> = lost.keys().copied().collect();
        for (ip, names) in lost {
            let still_named = self.names.values().any(|e| e.ips.contains_key(&ip));
            if !still_named && alive(ip) {
                self.zombies.entry(ip).or_default().extend(names);
            }
        }
        self.zombies.retain(|ip, _| {
            let keep = alive(*ip);
            if !keep {
                changed.insert(*ip);
            }
            keep
        });
        changed.into_iter().collect()
    }

    /// Whether addresses are kept past expiry for live connections.
    pub fn has_zombies(&self) -> bool {
        !self.zombies.is_empty()
    }

    /// The earliest expiry (Unix seconds), if anything expires.
    pub fn next_expiry(&self) -> Option<u64> {
        self.names.values().flat_map(|e| e.ips.values().copied()).min()
    }

    /// Rows for `porin fqdn cache list`, by name then address.
    pub fn rows(&self, now: u64) -> Vec<CacheRow> {
        let mut rows: Vec<CacheRow> = self
            .names
            .iter()
            .flat_map(|(name, e)| {
                e.ips.iter().map(move |(ip, exp)| CacheRow {
                    name: name.clone(),
                    ip: *ip,
                    ttl_left: exp.saturating_sub(now),
                    endpoints: e.endpoints.iter().cloned().collect(),
                    zombie: false,
                })
            })
            .collect();
        for (ip, names) in &self.zombies {
            for name in names {
                rows.push(CacheRow { name: name.clone(), ip: *ip, ttl_left: 0, endpoints: vec![], zombie: true });
            }
        }
        rows.sort_by(|a, b| (&a.name, a.ip).cmp(&(&b.name, b.ip)));
        rows
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.zombies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn selectors_of_an_address_come_from_all_its_names() {
        let sels = FqdnSelectors::new([
            (NamePattern::Name("api.example.com.".into()), 100),
            (NamePattern::Pattern("*.example.com.".into()), 101),
            (NamePattern::Name("other.test.".into()), 102),
        ]);
        let mut c = FqdnCache::new();
        c.learn(&["alias.example.com".into(), "api.example.com.".into()], &[ip("192.0.2.1")], 30, 1000, "default/a");
        assert_eq!(c.names_of(ip("192.0.2.1")), ["alias.example.com.", "api.example.com."]);
        assert_eq!(sels.identities_of(c.names_of(ip("192.0.2.1"))), [100, 101]);
        assert!(sels.identities_of(c.names_of(ip("192.0.2.2"))).is_empty());
    }

    #[test]
    fn expiry_keeps_addresses_with_live_connections_as_zombies() {
        let mut c = FqdnCache::new();
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        assert_eq!(c.learn(&["x.test".into()], &[a, b], 10, 100, "ns/p"), [a, b]);
        // Learning again extends the expiry; nothing changes.
        assert!(c.learn(&["x.test".into()], &[a], 20, 105, "ns/p").is_empty());
        assert_eq!(c.next_expiry(), Some(110));
        // At 111: b expired and has no connection; a still has time.
        assert_eq!(c.expire(111, |_| false), [b]);
        assert_eq!(c.ips(), [a].into());
        // At 130: a expired but a connection lives: kept, with its name.
        assert_eq!(c.expire(130, |i| i == a), [a]);
        assert_eq!(c.names_of(a), ["x.test."]);
        assert!(c.rows(130)[0].zombie);
        // The connection ends: gone.
        assert_eq!(c.expire(131, |_| false), [a]);
        assert!(c.is_empty());
    }

    #[test]
    fn a_name_keeps_at_most_the_limit_of_addresses() {
        let mut c = FqdnCache::new();
        let many: Vec<IpAddr> =
            (0..MAX_IPS_PER_NAME as u32 + 5).map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes())).collect();
        for (i, a) in many.iter().enumerate() {
            c.learn(&["big.test".into()], &[*a], 100 + i as u64, 0, "");
        }
        let kept = c.ips_of("big.test");
        assert_eq!(kept.len(), MAX_IPS_PER_NAME);
        assert!(!kept.contains(&many[0]), "the first to expire made room");
        assert!(kept.contains(many.last().unwrap()));
    }

    #[test]
    fn round_trips_through_json() {
        let mut c = FqdnCache::new();
        c.learn(&["x.test".into()], &[ip("2001:db8::1")], 10, 100, "ns/p");
        let back: FqdnCache = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
