//! `porin_tw_lookup` (`sk_lookup`, attached to the node's network namespace): when the kernel's
//! TIME_WAIT path looks for a listener for a SYN the tc program handed to a TIME_WAIT socket of
//! the proxy (`Tc::hand_over_time_wait`), the listener is the proxy's from `PORIN_TW_SYN`; the
//! kernel then retires the TIME_WAIT socket and the listener takes the SYN. Every other lookup is
//! left to the kernel. A recorded SYN whose listener is gone selects nothing and is refused
//! (`SK_DROP`): it must not reach another listener on the port, whatever the namespace runs.

use aya_ebpf::bindings::{bpf_sk_lookup, bpf_sock_tuple};
use aya_ebpf::macros::sk_lookup;
use aya_ebpf::programs::SkLookupContext;
use redirect_common::counter;

use crate::{PORIN_COUNTERS, PORIN_PROXY, PORIN_TW_SYN};

/// `sk_lookup` verdicts.
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn porin_tw_lookup(ctx: SkLookupContext) -> u32 {
    let Some(key) = key(&ctx) else {
        return SK_PASS;
    };
    // SAFETY: copied out at once.
    let Some(index) = (unsafe { PORIN_TW_SYN.get(&key) }).copied() else {
        return SK_PASS;
    };
    // One SYN, one hand-over. A failed removal leaves an entry only that tuple's next SYN from a
    // TIME_WAIT socket can meet, and it names the same listener.
    let _ = PORIN_TW_SYN.remove(&key);
    match PORIN_PROXY.redirect_sk_lookup(&ctx, index, 0) {
        Ok(()) => SK_PASS,
        Err(_) => {
            if let Some(p) = PORIN_COUNTERS.get_ptr_mut(counter::TIME_WAIT_FAILED) {
                // SAFETY: a per-CPU slot of this CPU, valid for the program's run.
                unsafe { *p += 1 };
            }
            SK_DROP
        }
    }
}

/// The lookup's tuple as the tc program looked the SYN up (client → original destination): the
/// `PORIN_TW_SYN` key, built the same way (zeroed, then the family's member).
#[inline(always)]
fn key(ctx: &SkLookupContext) -> Option<bpf_sock_tuple> {
    let l: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: an all-zero tuple is a valid value of this plain-data union.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: the context is valid for the program's run; every field is read with a load of its
    // own size (the verifier refuses wider context loads).
    unsafe {
        if core::ptr::read_volatile(&raw const (*l).protocol) != IPPROTO_TCP {
            return None;
        }
        let fam = core::ptr::read_volatile(&raw const (*l).family);
        // Both network byte order, as the tc program's tuple has them.
        let sport = core::ptr::read_volatile(&raw const (*l).remote_port);
        #[expect(clippy::cast_possible_truncation, reason = "a port, in host byte order")]
        let dport = (core::ptr::read_volatile(&raw const (*l).local_port) as u16).to_be();
        if fam == AF_INET {
            t.__bindgen_anon_1.ipv4.saddr = core::ptr::read_volatile(&raw const (*l).remote_ip4);
            t.__bindgen_anon_1.ipv4.daddr = core::ptr::read_volatile(&raw const (*l).local_ip4);
            t.__bindgen_anon_1.ipv4.sport = sport;
            t.__bindgen_anon_1.ipv4.dport = dport;
        } else if fam == AF_INET6 {
            for i in 0..4 {
                t.__bindgen_anon_1.ipv6.saddr[i] = core::ptr::read_volatile(&raw const (*l).remote_ip6[i]);
                t.__bindgen_anon_1.ipv6.daddr[i] = core::ptr::read_volatile(&raw const (*l).local_ip6[i]);
            }
            t.__bindgen_anon_1.ipv6.sport = sport;
            t.__bindgen_anon_1.ipv6.dport = dport;
        } else {
            return None;
        }
    }
    Some(t)
}
