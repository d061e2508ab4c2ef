//! DNS over UDP, transparently.
//!
//! * The listener is an unconnected UDP socket with `IP_TRANSPARENT` and `IP_RECVORIGDSTADDR`; the
//!   datapath `bpf_sk_assign`s the client's datagrams to it (from `PORIN_PROXY_UDP`), and each
//!   arrives with its original destination (the DNS server) in a control message.
//! * An allowed query goes to the server from a fresh socket bound to the client's address (any
//!   port), connected to the server and marked [`mark::FROM_PROXY`]: the server sees the client,
//!   and the datapath hands the server's answer to that socket (a connected, marked socket of the
//!   proxy) instead of the client.
//! * Answers reach the client from a socket bound to the server's address (`IP_TRANSPARENT`),
//!   one per server, kept while used.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrStorage, bind, connect, recvmsg,
    setsockopt, socket, sockopt,
};
use redirect_common::mark;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::{Decision, Released};
use crate::config::ListenerConfig;
use crate::records::{Counters, Transport};
use crate::service::Shared;

/// The largest datagram read (DNS over UDP with EDNS stays far below).
const MAX_DATAGRAM: usize = 65_535;
/// Reply sockets kept (one per DNS server address); past it the set starts over.
const MAX_REPLY_SOCKETS: usize = 1024;

fn os(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

fn family(addr: &SocketAddr) -> AddressFamily {
    if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

/// A non-blocking UDP socket with `IP_TRANSPARENT` (and `SO_MARK` for the proxy's own traffic),
/// bound to `addr`.
fn transparent_socket(addr: SocketAddr, marked: bool, reuse: bool) -> io::Result<OwnedFd> {
    let fd = socket(family(&addr), SockType::Datagram, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
        .map_err(os)?;
    // IP_TRANSPARENT also applies to IPv6 sockets (the kernel takes SOL_IP options on them).
    setsockopt(&fd, sockopt::IpTransparent, &true).map_err(os)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(os)?;
    }
    if marked {
        setsockopt(&fd, sockopt::Mark, &mark::FROM_PROXY).map_err(os)?;
    }
    if reuse {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(os)?;
        setsockopt(&fd, sockopt::ReusePort, &true).map_err(os)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(os)?;
    Ok(fd)
}

/// Binds the transparent listener on `addr`: datagrams arrive with their original destination.
pub fn listen(addr: SocketAddr) -> io::Result<UdpSocket> {
    let fd = socket(family(&addr), SockType::Datagram, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
        .map_err(os)?;
    setsockopt(&fd, sockopt::IpTransparent, &true).map_err(os)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(os)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(os)?;
        setsockopt(&fd, sockopt::Ipv6OrigDstAddr, &true).map_err(os)?;
    } else {
        setsockopt(&fd, sockopt::Ipv4OrigDstAddr, &true).map_err(os)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(os)?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

/// One datagram: who sent it, where it was going, how long it is.
fn receive(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(SocketAddr, Option<SocketAddr>, usize)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).map_err(os)?;
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4(SocketAddrV4::from(*v4)))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6))))
        })
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    let mut dst = None;
    for c in msg.cmsgs().map_err(os)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                dst = Some(SocketAddr::from((ip, u16::from_be(a.sin_port))));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                dst = Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))));
            }
            _ => {}
        }
    }
    Ok((from, dst, msg.bytes))
}

/// Sockets that answer clients from a DNS server's address.
#[derive(Default)]
struct ReplySockets(Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>);

impl ReplySockets {
    fn get(&self, server: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get(&server) {
            return Ok(s.clone());
        }
        if map.len() >= MAX_REPLY_SOCKETS {
            map.clear();
        }
        let fd = transparent_socket(server, true, true)?;
        let s = Arc::new(UdpSocket::from_std(std::net::UdpSocket::from(fd))?);
        map.insert(server, s.clone());
        Ok(s)
    }
}

/// Serves the listener until the task is dropped.
pub async fn serve(shared: Arc<Shared>, listener: Arc<ListenerConfig>, sock: UdpSocket) {
    let replies = Arc::new(ReplySockets::default());
    let inflight = Arc::new(Semaphore::new(shared.dns.max_inflight));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let got = sock.async_io(Interest::READABLE, || receive(&sock, &mut buf)).await;
        let (client, server, n) = match got {
            Ok((c, Some(s), n)) => (c, s, n),
            Ok((c, None, _)) => {
                crate::log_limited!(warn, client = %c, "DNS datagram without its original destination: dropped");
                Counters::inc(&shared.counters.rejected);
                continue;
            }
            Err(e) => {
                crate::log_limited!(warn, error = %e, "DNS receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let raw = buf.get(..n).unwrap_or_default().to_vec();
        let (shared, listener, replies) = (shared.clone(), listener.clone(), replies.clone());
        let permit = inflight.clone().try_acquire_owned();
        tokio::spawn(async move {
            let decision = if permit.is_ok() {
                None
            } else {
                crate::log_limited!(warn, "DNS queries in flight at the limit: SERVFAIL");
                Some(over_limit(&raw))
            };
            let answer = match decision {
                Some(a) => a,
                None => exchange(&shared, &listener, client, server, &raw).await,
            };
            if let Some(bytes) = answer {
                let sent = match replies.get(server) {
                    Ok(s) => s.send_to(&bytes, client).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                if let Err(e) = sent {
                    Counters::inc(&shared.counters.downstream_errors);
                    crate::log_limited!(warn, %client, %server, error = %e, "DNS answer could not be sent");
                }
            }
            drop(permit);
        });
    }
}

/// `SERVFAIL` for a query over the in-flight limit (nothing for bytes that are no query).
fn over_limit(raw: &[u8]) -> Option<Vec<u8>> {
    super::message::parse_query(raw).ok().map(|q| super::message::answer(&q, hickory_proto::op::ResponseCode::ServFail))
}

/// One query from parse to answer; `None`: nothing goes back to the client.
async fn exchange(
    shared: &Shared,
    listener: &ListenerConfig,
    client: SocketAddr,
    server: SocketAddr,
    raw: &[u8],
) -> Option<Vec<u8>> {
    let ex = match super::judge(shared, listener, client, server, Transport::Udp, raw) {
        Decision::Drop => return None,
        Decision::Answer(a) => return Some(a),
        Decision::Forward(ex) => ex,
    };
    let timeout = Duration::from_millis(shared.dns.forward_timeout_ms);
    let upstream = match upstream(client.ip(), server) {
        Ok(s) => s,
        Err(e) => {
            ex.timed_out(shared, &format!("upstream socket: {e}"));
            return Some(super::message::answer(ex.query(), hickory_proto::op::ResponseCode::ServFail));
        }
    };
    if let Err(e) = upstream.send(raw).await {
        ex.timed_out(shared, &format!("send to {server}: {e}"));
        return Some(super::message::answer(ex.query(), hickory_proto::op::ResponseCode::ServFail));
    }
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, upstream.recv(&mut buf)).await {
            Ok(Ok(n)) => match ex.answered(shared, buf.get(..n).unwrap_or_default()) {
                Released::Answer(a) => return Some(a),
                Released::NotOurs => continue,
            },
            Ok(Err(e)) => {
                ex.timed_out(shared, &format!("receive from {server}: {e}"));
                return None;
            }
            Err(_) => {
                ex.timed_out(shared, &format!("{server} did not answer within {} ms", timeout.as_millis()));
                return None;
            }
        }
    }
}

/// A socket to the server from the client's address (the kernel picks the port), marked.
fn upstream(client: IpAddr, server: SocketAddr) -> io::Result<UdpSocket> {
    let fd = transparent_socket(SocketAddr::new(client, 0), true, false)?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(server)).map_err(os)?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}
