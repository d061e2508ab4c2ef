//! DNS over UDP, transparently.
//!
//! * The listener is an unconnected UDP socket with `IP_TRANSPARENT` and `IP_RECVORIGDSTADDR`; the
//!   datapath `bpf_sk_assign`s the client's datagrams to it (from `PORIN_PROXY_UDP`), and each
//!   arrives with its original destination (the DNS server) in a control message.
//! * An allowed query goes to the server from a socket bound to the client's address (any port),
//!   connected to the server and marked [`mark::FROM_PROXY`]: the server sees the client, and the
//!   datapath hands the server's answer to that socket (a connected, marked socket of the proxy)
//!   instead of the client. One such socket serves all of a client address's queries to a server
//!   (closed after 30 s unused); the proxy gives each query an id unique on it and puts the
//!   client's id back into the answer.
//! * Answers reach the client from a socket bound to the server's address (`IP_TRANSPARENT`),
//!   one per server, kept while used.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrStorage, bind, connect, recvmsg,
    setsockopt, socket, sockopt,
};
use redirect_common::mark;
use tokio::io::Interest;
use tokio::net::UdpSocket;

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
pub fn listen(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
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
    Ok(std::net::UdpSocket::from(fd))
}

/// DNS over UDP served on a thread of its own (a single-threaded runtime): a query, its upstream
/// socket and its answer never hop between worker threads — on a small node the wake-ups that
/// costs are most of a query's price. Dropping it stops the thread.
pub struct DnsThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsThread {
    /// Starts serving `sock` (from [`listen`]).
    pub fn start(shared: Arc<Shared>, listener: Arc<ListenerConfig>, sock: std::net::UdpSocket) -> io::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name(format!("dns-{}", listener.name)).spawn(move || {
            rt.block_on(async move {
                let sock = match UdpSocket::from_std(sock) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(listener = %listener.name, error = %e, "DNS listener not served");
                        return;
                    }
                };
                tokio::select! {
                    () = serve(shared, listener, sock) => {}
                    _ = stopped => {}
                }
            });
        })?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for DnsThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            // Gone already is fine: the thread has ended.
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            // A thread that panicked has ended too.
            let _ = t.join();
        }
    }
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

/// A query forwarded and not answered yet.
struct Pending {
    exchange: Box<super::Exchange>,
    client: SocketAddr,
    /// The id the client chose (the upstream sees one the proxy chose).
    client_id: [u8; 2],
    deadline: tokio::time::Instant,
}

/// One connected socket to a DNS server from one client address, shared by that client's queries:
/// the proxy gives each query an id unique on it and maps the answer back.
struct Upstream {
    sock: UdpSocket,
    pending: Mutex<HashMap<u16, Pending>>,
    next_id: std::sync::atomic::AtomicU16,
    last_used: std::sync::atomic::AtomicU64,
}

/// What the listener shares with the upstream readers.
struct Forwarder {
    shared: Arc<Shared>,
    replies: ReplySockets,
    upstreams: Mutex<HashMap<(IpAddr, SocketAddr), Arc<Upstream>>>,
    inflight: std::sync::atomic::AtomicUsize,
    started: std::time::Instant,
}

/// An upstream unused this long (and with nothing pending) is closed.
const UPSTREAM_IDLE: Duration = Duration::from_secs(30);

impl Forwarder {
    fn now_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The upstream of `(client, server)`, opened (with its reader) if there is none.
    fn upstream(self: &Arc<Self>, client: IpAddr, server: SocketAddr) -> io::Result<Arc<Upstream>> {
        let mut map = self.upstreams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(u) = map.get(&(client, server)) {
            return Ok(u.clone());
        }
        let u = Arc::new(Upstream {
            sock: upstream(client, server)?,
            pending: Mutex::new(HashMap::new()),
            // Ids start anywhere: an off-path attacker cannot guess the next one from the last.
            next_id: std::sync::atomic::AtomicU16::new(
                u16::try_from(
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
                        & 0xffff,
                )
                .unwrap_or(0),
            ),
            last_used: std::sync::atomic::AtomicU64::new(self.now_s()),
        });
        map.insert((client, server), u.clone());
        drop(map);
        tokio::spawn(read_answers(self.clone(), u.clone(), (client, server)));
        Ok(u)
    }

    async fn reply(&self, client: SocketAddr, server: SocketAddr, bytes: &[u8]) {
        let sent = match self.replies.get(server) {
            Ok(s) => s.send_to(bytes, client).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            Counters::inc(&self.shared.counters.downstream_errors);
            crate::log_limited!(warn, %client, %server, error = %e, "DNS answer could not be sent");
        }
    }

    /// Sends an allowed query to the server; the reader of its upstream answers the client.
    async fn forward(self: &Arc<Self>, ex: Box<super::Exchange>, client: SocketAddr, server: SocketAddr, raw: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        let servfail = |ex: &super::Exchange| super::message::answer(ex.query(), ResponseCode::ServFail);
        if self.inflight.load(Relaxed) >= self.shared.dns.max_inflight {
            crate::log_limited!(warn, "DNS queries in flight at the limit: SERVFAIL");
            ex.timed_out(&self.shared, "queries in flight at the limit");
            return self.reply(client, server, &servfail(&ex)).await;
        }
        let up = match self.upstream(client.ip(), server) {
            Ok(u) => u,
            Err(e) => {
                ex.timed_out(&self.shared, &format!("upstream socket: {e}"));
                return self.reply(client, server, &servfail(&ex)).await;
            }
        };
        up.last_used.store(self.now_s(), Relaxed);
        let mut bytes = raw.to_vec();
        let client_id = [bytes.first().copied().unwrap_or(0), bytes.get(1).copied().unwrap_or(0)];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.shared.dns.forward_timeout_ms);
        let taken: Result<u16, Box<super::Exchange>> = {
            let mut pending = up.pending.lock().unwrap_or_else(PoisonError::into_inner);
            let mut id = up.next_id.fetch_add(1, Relaxed);
            let mut tries = 0u32;
            while pending.contains_key(&id) && tries < 65_536 {
                id = up.next_id.fetch_add(1, Relaxed);
                tries += 1;
            }
            match pending.entry(id) {
                std::collections::hash_map::Entry::Occupied(_) => Err(ex),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Pending { exchange: ex, client, client_id, deadline });
                    Ok(id)
                }
            }
        };
        let id = match taken {
            Ok(id) => id,
            Err(ex) => {
                ex.timed_out(&self.shared, "every query id towards this server is in flight");
                return self.reply(client, server, &servfail(&ex)).await;
            }
        };
        self.inflight.fetch_add(1, Relaxed);
        if let Some(b) = bytes.get_mut(..2) {
            b.copy_from_slice(&id.to_be_bytes());
        }
        if let Err(e) = up.sock.send(&bytes).await {
            let p = up.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            if let Some(p) = p {
                self.inflight.fetch_sub(1, Relaxed);
                p.exchange.timed_out(&self.shared, &format!("send to {server}: {e}"));
                self.reply(client, server, &servfail(&p.exchange)).await;
            }
        }
    }
}

/// Reads one upstream's answers until it is idle and empty; answers the clients; gives up on
/// queries past their deadline (the client gets nothing, as from Cilium).
async fn read_answers(fwd: Arc<Forwarder>, up: Arc<Upstream>, key: (IpAddr, SocketAddr)) {
    use std::sync::atomic::Ordering::Relaxed;
    let server = key.1;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), up.sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let answer = buf.get_mut(..n).unwrap_or_default();
                let (Some(&hi), Some(&lo)) = (answer.first(), answer.get(1)) else { continue };
                let id = u16::from_be_bytes([hi, lo]);
                let p = up.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
                let Some(p) = p else {
                    crate::log_limited!(info, %server, id, "DNS answer for no pending query: ignored");
                    continue;
                };
                fwd.inflight.fetch_sub(1, Relaxed);
                if let Some(b) = answer.get_mut(..2) {
                    b.copy_from_slice(&p.client_id);
                }
                match p.exchange.answered(&fwd.shared, answer) {
                    Released::Answer(a) => fwd.reply(p.client, server, &a).await,
                    // The id was ours, the question was not: not released; the client asks again.
                    Released::NotOurs => p.exchange.timed_out(&fwd.shared, "the answer is not for the question asked"),
                }
            }
            Ok(Err(e)) => {
                crate::log_limited!(warn, %server, error = %e, "DNS upstream receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {}
        }
        // Expired queries; an idle upstream with nothing pending closes.
        let now = tokio::time::Instant::now();
        let expired: Vec<Pending> = {
            let mut pending = up.pending.lock().unwrap_or_else(PoisonError::into_inner);
            let ids: Vec<u16> = pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| pending.remove(&id)).collect()
        };
        for p in expired {
            fwd.inflight.fetch_sub(1, Relaxed);
            let ms = fwd.shared.dns.forward_timeout_ms;
            p.exchange.timed_out(&fwd.shared, &format!("{server} did not answer within {ms} ms"));
        }
        let idle = fwd.now_s().saturating_sub(up.last_used.load(Relaxed)) >= UPSTREAM_IDLE.as_secs();
        if idle {
            let mut map = fwd.upstreams.lock().unwrap_or_else(PoisonError::into_inner);
            if up.pending.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
                && fwd.now_s().saturating_sub(up.last_used.load(Relaxed)) >= UPSTREAM_IDLE.as_secs()
            {
                map.remove(&key);
                return;
            }
        }
    }
}

/// Serves the listener until the task is dropped: each datagram is judged as it arrives; allowed
/// ones go out on their client's upstream socket, whose reader answers.
pub async fn serve(shared: Arc<Shared>, listener: Arc<ListenerConfig>, sock: UdpSocket) {
    let fwd = Arc::new(Forwarder {
        shared: shared.clone(),
        replies: ReplySockets::default(),
        upstreams: Mutex::new(HashMap::new()),
        inflight: std::sync::atomic::AtomicUsize::new(0),
        started: std::time::Instant::now(),
    });
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut verdicts = super::Verdicts::default();
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
        let raw = buf.get(..n).unwrap_or_default();
        match super::judge(&shared, &mut verdicts, &listener, client, server, Transport::Udp, raw) {
            Decision::Drop => {}
            Decision::Answer(a) => fwd.reply(client, server, &a).await,
            Decision::Forward(ex) => fwd.forward(ex, client, server, raw).await,
        }
    }
}

/// A socket to the server from the client's address (the kernel picks the port), marked.
fn upstream(client: IpAddr, server: SocketAddr) -> io::Result<UdpSocket> {
    let fd = transparent_socket(SocketAddr::new(client, 0), true, false)?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(server)).map_err(os)?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}
