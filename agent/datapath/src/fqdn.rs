//! The FQDN map (address → FQDN selector identities) and the conntrack map, opened from their
//! pins for the DNS proxy (`porin proxy`): it writes what it learned before releasing an answer,
//! and asks conntrack which learned addresses still have connections.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData};
use redirect_common::{CtKey, CtValue, FQDN_MAX_SELECTORS, FqdnKey, FqdnValue, family, names};

/// The two maps.
pub struct FqdnMaps {
    fqdn: Mutex<HashMap<MapData, FqdnKey, FqdnValue>>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    config: Array<MapData, u32>,
}

fn key(ip: IpAddr) -> FqdnKey {
    let mut addr = [0u8; 16];
    let fam = match ip {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            family::V4
        }
        IpAddr::V6(a) => {
            addr = a.octets();
            family::V6
        }
    };
    FqdnKey { family: fam, _pad: [0; 3], addr }
}

/// An address in the maps' form (family, network-order bytes) as an `IpAddr`.
pub(crate) fn ip_of(fam: u8, addr: &[u8; 16]) -> Option<IpAddr> {
    match fam {
        family::V4 => Some(IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))),
        family::V6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

impl FqdnMaps {
    /// Opens the maps pinned in `maps_dir` (`<bpffs>/maps`).
    pub fn open(maps_dir: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| {
            let p = maps_dir.join(name);
            MapData::from_pin(&p).with_context(|| format!("open {}", p.display()))
        };
        let fqdn = HashMap::try_from(Map::HashMap(open(names::FQDN)?)).context(names::FQDN)?;
        let conntrack = HashMap::try_from(Map::LruHashMap(open(names::CONNTRACK)?)).context(names::CONNTRACK)?;
        let config = Array::try_from(Map::Array(open(names::CONFIG)?)).context(names::CONFIG)?;
        Ok(Self { fqdn: Mutex::new(fqdn), conntrack, config })
    }

    /// Sets an address's selector identities (at most [`FQDN_MAX_SELECTORS`]; none removes it).
    pub fn set(&self, ip: IpAddr, selectors: &[u32]) -> std::io::Result<()> {
        let mut map = self.fqdn.lock().unwrap_or_else(PoisonError::into_inner);
        let k = key(ip);
        if selectors.is_empty() {
            return match map.remove(&k) {
                Ok(()) => Ok(()),
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                    Ok(())
                }
                Err(e) => Err(std::io::Error::other(e)),
            };
        }
        let n = selectors.len().min(FQDN_MAX_SELECTORS);
        let mut v = FqdnValue { count: u32::try_from(n).unwrap_or(0), selectors: [0; FQDN_MAX_SELECTORS] };
        if let (Some(dst), Some(src)) = (v.selectors.get_mut(..n), selectors.get(..n)) {
            dst.copy_from_slice(src);
        }
        map.insert(k, v, 0).map_err(std::io::Error::other)
    }

    /// Every entry.
    pub fn entries(&self) -> std::io::Result<Vec<(IpAddr, Vec<u32>)>> {
        let map = self.fqdn.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, v) = item.map_err(std::io::Error::other)?;
            if let Some(ip) = ip_of(k.family, &k.addr) {
                let n = usize::try_from(v.count).unwrap_or(0).min(FQDN_MAX_SELECTORS);
                out.push((ip, v.selectors.get(..n).unwrap_or_default().to_vec()));
            }
        }
        Ok(out)
    }

    /// Destinations of the flows conntrack tracks and has not expired (the original direction's
    /// destination): the programs' own expiry rule, with their timeouts.
    pub fn live_destinations(&self) -> std::io::Result<BTreeSet<IpAddr>> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(std::io::Error::from)?;
        let now = u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec()).unwrap_or(0);
        let config = |i: u32, d: u32| self.config.get(&i, 0).unwrap_or(d);
        let mut out = BTreeSet::new();
        for item in self.conntrack.iter() {
            // An entry that vanished between listing and reading is simply gone.
            let Ok((k, v)) = item else { continue };
            if redirect_common::datapath::ct_entry_expired(k.proto, &v, now, config) {
                continue;
            }
            if let Some(ip) = ip_of(k.family, &k.daddr) {
                out.insert(ip);
            }
        }
        Ok(out)
    }
}
