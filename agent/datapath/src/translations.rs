//! The socket load balancer's record of translated TCP connections (`PORIN_LB_CONN`, written by
//! the `sock_ops` program), opened from its pin for the L7 proxy: a connection to a backend whose
//! tuple is there asked for a service; one that is not asked for the pod itself.

use std::io;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, MapError};
use redirect_common::{CtKey, lb, names};

use crate::fqdn::ip_of;
use crate::mapstate::lb_addr;

/// The map, read-only.
pub struct Translations(HashMap<MapData, CtKey, lb::Addr>);

/// The key of a client's connection to a backend: its tuple as the client sends (`CtKey`).
pub fn key(client: SocketAddr, backend: SocketAddr) -> CtKey {
    let (c, b) = (lb_addr(client.ip(), client.port()), lb_addr(backend.ip(), backend.port()));
    CtKey { family: c.family, proto: 6, sport: c.port, dport: b.port, _pad: [0; 2], saddr: c.addr, daddr: b.addr }
}

fn socket_addr(a: &lb::Addr) -> Option<SocketAddr> {
    ip_of(a.family, &a.addr).map(|ip| SocketAddr::new(ip, u16::from_be_bytes(a.port)))
}

impl Translations {
    /// Opens the map pinned in `maps_dir` (`<bpffs>/maps`).
    pub fn open(maps_dir: &Path) -> anyhow::Result<Self> {
        let p = maps_dir.join(names::LB_CONN);
        let data = MapData::from_pin(&p).with_context(|| format!("open {}", p.display()))?;
        let map =
            HashMap::try_from(aya::maps::Map::LruHashMap(data)).with_context(|| format!("map {}", p.display()))?;
        Ok(Self(map))
    }

    /// The service frontend `client`'s connection to `backend` was translated from.
    pub fn frontend(&self, client: SocketAddr, backend: SocketAddr) -> io::Result<Option<SocketAddr>> {
        match self.0.get(&key(client, backend), 0) {
            Ok(front) => socket_addr(&front)
                .map(Some)
                .ok_or_else(|| io::Error::other(format!("{}: an entry of unknown family", names::LB_CONN))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use redirect_common::family;

    use super::*;

    #[test]
    fn keys_are_the_tuple_as_sent() {
        let k = key("10.244.1.5:40000".parse().unwrap(), "10.244.2.7:80".parse().unwrap());
        assert_eq!((k.family, k.proto, k.sport, k.dport), (family::V4, 6, [0x9c, 0x40], [0, 80]));
        assert_eq!(&k.saddr[..4], &[10, 244, 1, 5]);
        assert_eq!(&k.daddr[..5], &[10, 244, 2, 7, 0]);
        let front = lb::Addr { family: family::V6, _pad: 0, port: [0, 80], addr: Ipv6Addr::LOCALHOST.octets() };
        assert_eq!(socket_addr(&front), Some("[::1]:80".parse().unwrap()));
    }
}
