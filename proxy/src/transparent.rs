//! Sockets for the transparent path: listeners the kernel datapath hands flows to, and upstream
//! connections that keep the client's address.
//!
//! * A transparent listener sets `IP_TRANSPARENT` (needs `CAP_NET_ADMIN`), binds, listens and puts
//!   its socket into the datapath's pinned SOCKMAP at `proxy_index(listener_id, v6)`. The tc program
//!   `bpf_sk_assign`s new L7 flows to it; the accepted socket's local address is the original
//!   destination and its peer the original client. The kernel drops a closed listener from the map
//!   by itself, so with the proxy gone the datapath finds no listener and fails closed.
//! * An upstream connection sets `IP_TRANSPARENT`, `IP_BIND_ADDRESS_NO_PORT` and `SO_MARK` =
//!   `mark::FROM_PROXY`, binds to the client's address and connects to the original destination:
//!   the server sees the client, and the datapath lets the marked packets through unjudged (the
//!   proxy judged them); the server's replies reach this socket through `bpf_skc_lookup_tcp`.

use std::io;
use std::net::SocketAddr;

use aya::maps::{Map, MapData, SockMap};
use nix::sys::socket::{setsockopt, sockopt};
use redirect_common::{mark, proxy_index};
use tokio::net::{TcpListener, TcpSocket};

use crate::config::Transparent;

fn os(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// Options of an upstream socket for the transparent path.
pub fn upstream_socket(s: &TcpSocket) -> io::Result<()> {
    setsockopt(s, sockopt::IpTransparent, &true).map_err(os)?;
    setsockopt(s, sockopt::IpBindAddressNoPort, &true).map_err(os)?;
    setsockopt(s, sockopt::Mark, &mark::FROM_PROXY).map_err(os)?;
    Ok(())
}

/// `SO_LINGER` 0: closing the socket resets the connection instead of leaving it in TIME_WAIT
/// (tokio's `set_linger` is deprecated for the blocking a non-zero linger causes; zero never blocks).
pub fn close_with_reset(s: &TcpSocket) -> io::Result<()> {
    setsockopt(s, sockopt::Linger, &nix::libc::linger { l_onoff: 1, l_linger: 0 }).map_err(os)
}

/// Binds a transparent listener on `addr` and registers it with the datapath.
pub fn listen(addr: SocketAddr, t: &Transparent) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    // IP_TRANSPARENT also applies to IPv6 sockets (the kernel takes SOL_IP options on them).
    setsockopt(&s, sockopt::IpTransparent, &true).map_err(os)?;
    if addr.is_ipv6() {
        setsockopt(&s, sockopt::Ipv6V6Only, &true).map_err(os)?;
    }
    s.bind(addr)?;
    // Bursts of thousands of connections (the kernel caps it at net.core.somaxconn).
    let listener = s.listen(4096)?;
    register(&listener, addr.is_ipv6(), t)?;
    Ok(listener)
}

/// Puts the listener into the datapath's SOCKMAP (pinned: agent restarts keep the entry).
pub fn register(listener: &TcpListener, v6: bool, t: &Transparent) -> io::Result<()> {
    let err = |e: &dyn std::fmt::Display| io::Error::other(format!("proxy SOCKMAP {}: {e}", t.sockmap.display()));
    let data = MapData::from_pin(&t.sockmap).map_err(|e| err(&e))?;
    let mut map: SockMap<MapData> = SockMap::try_from(Map::SockMap(data)).map_err(|e| err(&e))?;
    map.set(proxy_index(t.listener_id, v6), listener, 0).map_err(|e| err(&e))?;
    tracing::info!(sockmap = %t.sockmap.display(), index = proxy_index(t.listener_id, v6), "transparent listener registered with the datapath");
    Ok(())
}
