//! The socket load balancer's record of translated TCP connections (`PORIN_LB_CONN`, written by
//! the `sock_ops` program), opened from its pin for the L7 proxy: a connection to a backend whose
//! tuple is there asked for a service; one that is not asked for the pod itself.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, MapError};
use redirect_common::{CtKey, family, lb, names};

/// The map, read-only.
pub struct Translations(HashMap<MapData, CtKey, lb::Addr>);

fn split(a: SocketAddr) -> (u8, [u8; 16]) {
    let mut addr = [0u8; 16];
    match a.ip() {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (family::V4, addr)
        }
        IpAddr::V6(v6) => (family::V6, v6.octets()),
    }
}

/// The key of a client's connection to a backend: its tuple as the client sends (`CtKey`).
pub fn key(client: SocketAddr, backend: SocketAddr) -> CtKey {
    let (fam, saddr) = split(client);
    let (_, daddr) = split(backend);
    CtKey {
        family: fam,
        proto: 6,
        sport: client.port().to_be_bytes(),
        dport: backend.port().to_be_bytes(),
        _pad: [0; 2],
        saddr,
        daddr,
    }
}

fn socket_addr(a: &lb::Addr) -> Option<SocketAddr> {
    let ip = match a.family {
        family::V4 => IpAddr::V4(Ipv4Addr::new(a.addr[0], a.addr[1], a.addr[2], a.addr[3])),
        family::V6 => IpAddr::V6(Ipv6Addr::from(a.addr)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::from_be_bytes(a.port)))
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
