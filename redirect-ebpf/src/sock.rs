//! Socket load balancing: cgroup `sock_addr` programs on the node's cgroup (the choice itself is
//! `redirect_common::lb::pick`, tested there).
//!
//! * `connect4/6` (TCP, connected UDP) and `sendmsg4/6` (unconnected UDP): a service frontend
//!   becomes a backend; the socket's translation is recorded by socket cookie. A service without a
//!   backend refuses the connect (`EPERM`) at once, counted.
//! * `getpeername4/6` and `recvmsg4/6`: a backend address the socket got from a translation reads
//!   back as the frontend, so a client sees the address it asked for.
//! * `sock_ops`: when a translated TCP socket sends its SYN, its tuple is recorded with the
//!   frontend (`PORIN_LB_CONN`: the L7 proxy balances the requests of such a connection, never of
//!   one to a pod itself); when it closes, that record and its translation go.

use aya_ebpf::bindings::{
    BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_ops,
};
use aya_ebpf::cty::c_void;
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns};
use aya_ebpf::macros::{cgroup_sock_addr, sock_ops};
use aya_ebpf::programs::{SockAddrContext, SockOpsContext};
use redirect_common::lb::{self, Addr, Pick};
use redirect_common::{CtKey, config, counter, family};

use crate::{
    PORIN_CONFIG, PORIN_COUNTERS, PORIN_LB_AFF, PORIN_LB_BE, PORIN_LB_CONN, PORIN_LB_MEMBER, PORIN_LB_REV, PORIN_LB_SVC,
};

/// `sock_addr` programs: 1 lets the call proceed, 0 refuses it (`EPERM`).
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

struct Maps;

impl lb::Maps for Maps {
    fn service(&self, key: &lb::ServiceKey) -> Option<lb::ServiceValue> {
        // SAFETY: copied out at once.
        unsafe { PORIN_LB_SVC.get(key) }.copied()
    }

    fn backend(&self, key: &lb::BackendKey) -> Option<Addr> {
        // SAFETY: copied out at once.
        unsafe { PORIN_LB_BE.get(key) }.copied()
    }

    fn is_member(&self, key: &lb::MemberKey) -> bool {
        // SAFETY: only tested for presence.
        unsafe { PORIN_LB_MEMBER.get(key) }.is_some()
    }

    fn affinity(&self, key: &lb::AffinityKey) -> Option<lb::AffinityValue> {
        // SAFETY: copied out at once.
        unsafe { PORIN_LB_AFF.get(key) }.copied()
    }

    fn set_affinity(&mut self, key: &lb::AffinityKey, value: &lb::AffinityValue) {
        // An LRU map makes room; a failed write only loses stickiness for the next connect.
        if PORIN_LB_AFF.insert(key, value, 0).is_err() {
            count(counter::LB_RECORD_FAILED);
        }
    }

    fn random(&mut self) -> u32 {
        // SAFETY: helper without preconditions.
        unsafe { bpf_get_prandom_u32() }
    }

    fn now_ns(&self) -> u64 {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = PORIN_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot of this CPU, valid for the program's run.
        unsafe { *p += 1 };
    }
}

/// The address in the context (the destination of a connect or send, the peer of `getpeername`,
/// the source of a received datagram).
#[inline(always)]
fn user_addr(ctx: &SockAddrContext, v6: bool) -> Addr {
    // SAFETY: the context pointer is valid for the program's run; fields are read with full
    // 4-byte loads, as the verifier requires.
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    if v6 {
        for (i, w) in sa.user_ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    } else {
        addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    }
    // `user_port` holds the port in network byte order in its low 16 bits.
    let port = (sa.user_port as u16).to_ne_bytes();
    Addr { family: if v6 { family::V6 } else { family::V4 }, _pad: 0, port, addr }
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, v6: bool, a: &Addr) {
    // SAFETY: as `user_addr`; these fields are writable in every attach point used here.
    let sa = unsafe { &mut *ctx.sock_addr };
    if v6 {
        for i in 0..4 {
            sa.user_ip6[i] =
                u32::from_ne_bytes([a.addr[i * 4], a.addr[i * 4 + 1], a.addr[i * 4 + 2], a.addr[i * 4 + 3]]);
        }
    } else {
        sa.user_ip4 = u32::from_ne_bytes([a.addr[0], a.addr[1], a.addr[2], a.addr[3]]);
    }
    sa.user_port = u32::from(u16::from_ne_bytes(a.port));
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: as `user_addr`.
    let proto = unsafe { (*ctx.sock_addr).protocol };
    if proto != 6 && proto != 17 {
        return PROCEED;
    }
    let dest = user_addr(ctx, v6);
    let generation = PORIN_CONFIG.get(config::GENERATION).copied().unwrap_or(0) as u8;
    // SAFETY: the context pointer is what these helpers take.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    match lb::pick(&mut Maps, generation, proto as u8, &dest, netns) {
        Pick::NotService => PROCEED,
        Pick::NoBackend => {
            count(counter::LB_NO_BACKEND);
            REFUSE
        }
        Pick::Backend(backend) | Pick::Affine(backend) => {
            set_user_addr(ctx, v6, &backend);
            // SAFETY: as above.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
            if PORIN_LB_REV.insert(&lb::RevKey { cookie, backend, _pad: 0 }, &dest, 0).is_err() {
                count(counter::LB_RECORD_FAILED);
            }
            count(counter::LB_TRANSLATED);
            PROCEED
        }
    }
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let backend = user_addr(ctx, v6);
    // SAFETY: the context pointer is what the helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    // SAFETY: copied out at once.
    if let Some(front) = unsafe { PORIN_LB_REV.get(&lb::RevKey { cookie, backend, _pad: 0 }) }.copied() {
        set_user_addr(ctx, v6, &front);
    }
    PROCEED
}

#[cgroup_sock_addr(connect4)]
pub fn porin_sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn porin_sock_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn porin_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn porin_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn porin_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn porin_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn porin_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn porin_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The socket's tuple as its packets carry it (client → backend) and its peer, the backend.
#[inline(always)]
fn sock_ops_tuple(ctx: &SockOpsContext) -> Option<(CtKey, Addr)> {
    let o: *const bpf_sock_ops = ctx.ops;
    // SAFETY: the context is valid for the program's run; each field is read with a load of its
    // own, at its own offset (the verifier refuses loads through a computed context pointer).
    let read = |f: *const u32| unsafe { core::ptr::read_volatile(f) };
    // SAFETY: field addresses within the context (not dereferenced here).
    let fam = match read(unsafe { &raw const (*o).family }) {
        AF_INET => family::V4,
        AF_INET6 => family::V6,
        _ => return None,
    };
    // `local_port` is in host byte order; `remote_port` in network byte order, shifted into the
    // high half on little-endian machines.
    // SAFETY: as above.
    let (local_port, remote_port) = unsafe { (read(&raw const (*o).local_port), read(&raw const (*o).remote_port)) };
    #[expect(clippy::cast_possible_truncation, reason = "ports")]
    let (sport, dport) = ((local_port as u16).to_be_bytes(), (u32::from_be(remote_port) as u16).to_be_bytes());
    let mut key = CtKey { family: fam, proto: 6, sport, dport, _pad: [0; 2], saddr: [0; 16], daddr: [0; 16] };
    if fam == family::V4 {
        // SAFETY: as above.
        let (l, r) = unsafe { (read(&raw const (*o).local_ip4), read(&raw const (*o).remote_ip4)) };
        key.saddr[..4].copy_from_slice(&l.to_ne_bytes());
        key.daddr[..4].copy_from_slice(&r.to_ne_bytes());
    } else {
        for i in 0..4 {
            // SAFETY: as above.
            let (l, r) = unsafe { (read(&raw const (*o).local_ip6[i]), read(&raw const (*o).remote_ip6[i])) };
            key.saddr[i * 4..i * 4 + 4].copy_from_slice(&l.to_ne_bytes());
            key.daddr[i * 4..i * 4 + 4].copy_from_slice(&r.to_ne_bytes());
        }
    }
    let backend = Addr { family: fam, _pad: 0, port: key.dport, addr: key.daddr };
    Some((key, backend))
}

#[sock_ops]
pub fn porin_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    let Some((key, backend)) = sock_ops_tuple(&ctx) else {
        return 1;
    };
    // SAFETY: the context pointer is what the helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let rev = lb::RevKey { cookie, backend, _pad: 0 };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: copied out at once.
        if let Some(front) = unsafe { PORIN_LB_REV.get(&rev) }.copied() {
            if PORIN_LB_CONN.insert(&key, &front, 0).is_err() {
                count(counter::LB_RECORD_FAILED);
            }
            // Told when the socket changes state, to forget it when it closes (failure: an LRU
            // entry left to age out).
            if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
                count(counter::LB_RECORD_FAILED);
            }
        }
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        // Absent is fine: gone either way.
        let _ = PORIN_LB_CONN.remove(&key);
        let _ = PORIN_LB_REV.remove(&rev);
    }
    1
}
