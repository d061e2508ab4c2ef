//! Sockets for the transparent path: listeners the kernel datapath hands flows to, and upstream
//! connections that keep the client's address.
//!
//! * A transparent listener sets `IP_TRANSPARENT` (needs `CAP_NET_ADMIN`), binds and listens; the
//!   process that started the proxy puts it into the datapath's SOCKMAP ([`Register`]: `porin
//!   proxy` does it with `porin_datapath::sockmap`, so this crate never links the eBPF loader). The
//!   tc program `bpf_sk_assign`s new L7 flows to it; the accepted socket's local address is the
//!   original destination and its peer the original client.
//! * An upstream connection sets `IP_TRANSPARENT`, `IP_BIND_ADDRESS_NO_PORT` and `SO_MARK` =
//!   `mark::FROM_PROXY`, binds to the client's address and connects to the original destination:
//!   the server sees the client, and the datapath lets the marked packets through unjudged (the
//!   proxy judged them); the server's replies reach this socket through `bpf_skc_lookup_tcp`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use nix::sys::socket::{setsockopt, sockopt};
use redirect_common::mark;
use tokio::net::{TcpListener, TcpSocket};

use crate::config::Transparent;

/// A bound transparent socket to announce to the datapath.
#[derive(Clone, Copy, Debug)]
pub enum Announce<'a> {
    /// A TCP listener (into `PORIN_PROXY`).
    Tcp(&'a TcpListener),
    /// A UDP socket (into `PORIN_PROXY_UDP`).
    Udp(&'a std::net::UdpSocket),
}

/// Announces a bound transparent socket to the datapath (`true`: the IPv6 one).
pub type Register = Arc<dyn Fn(&Transparent, Announce<'_>, bool) -> io::Result<()> + Send + Sync>;

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
pub fn close_with_reset(s: &impl std::os::fd::AsFd) -> io::Result<()> {
    setsockopt(s, sockopt::Linger, &nix::libc::linger { l_onoff: 1, l_linger: 0 }).map_err(os)
}

/// A connection to `server` from the client's address `client` (the kernel picks the port), set up
/// as [`upstream_socket`]: what the proxy opens for each proxied TCP flow it forwards.
pub async fn connect_from(
    client: std::net::IpAddr,
    server: SocketAddr,
    timeout: std::time::Duration,
) -> io::Result<tokio::net::TcpStream> {
    let s = if server.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    upstream_socket(&s)?;
    s.bind(SocketAddr::new(client, 0))?;
    tokio::time::timeout(timeout, s.connect(server))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Binds a transparent listener on `addr`.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    // IP_TRANSPARENT also applies to IPv6 sockets (the kernel takes SOL_IP options on them).
    setsockopt(&s, sockopt::IpTransparent, &true).map_err(os)?;
    if addr.is_ipv6() {
        setsockopt(&s, sockopt::Ipv6V6Only, &true).map_err(os)?;
    }
    s.bind(addr)?;
    // Bursts of thousands of connections (the kernel caps it at net.core.somaxconn).
    s.listen(4096)
}
