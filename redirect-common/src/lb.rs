//! Service load balancing at the socket: map layouts and the choice of a backend, shared by the
//! cgroup programs (`redirect-ebpf`) and the agent, and unit tested here against a model of the
//! maps.
//!
//! A process in the node's cgroup that connects (TCP, connected UDP) or sends (unconnected UDP) to
//! a service's cluster IP and port has the address rewritten, before the kernel routes anything, to
//! one backend's: its socket talks to the backend directly, every packet carries the backend's
//! address (so policy judges the backend's identity), and nothing is translated per packet. What the
//! socket reads back (`getpeername`, `recvmsg`'s source) is translated back to the cluster IP.
//!
//! Services and their backend slots are generational like policy ([`super::config::GENERATION`]):
//! the agent writes a new set into the inactive generation and flips, so a connect sees the old
//! backends or the new ones. A connection keeps the backend it got; removing a backend only stops
//! new connections from choosing it. `ClientIP` affinity is per client network namespace (a pod) and
//! service: the backend chosen last is chosen again while it is still a member and the affinity has
//! not expired.

use core::mem::size_of;

/// An address and port: a service's frontend, or a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    /// [`super::family::V4`] or [`super::family::V6`].
    pub family: u8,
    /// Zero.
    pub _pad: u8,
    /// Port, network byte order.
    pub port: [u8; 2],
    /// Address, network byte order (IPv4 in the first 4 bytes, the rest zero).
    pub addr: [u8; 16],
}

/// A service frontend in a generation: cluster IP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Generation (0 or 1); 0 in affinity keys.
    pub generation: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// Cluster IP and port.
    pub frontend: Addr,
}

/// A service frontend's value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Backend slots `0..count` in [`BackendKey`]; 0: the service has no backend (connects are
    /// refused).
    pub count: u32,
    /// `ClientIP` affinity timeout in seconds; 0: no affinity.
    pub affinity_secs: u32,
}

/// A backend slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// The service (with the generation).
    pub service: ServiceKey,
    /// Slot, `0..count`, host byte order.
    pub slot: u32,
}

/// Whether a backend is one of a service's in a generation (affinity checks it): value `1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    /// The service (with the generation).
    pub service: ServiceKey,
    /// The backend.
    pub backend: Addr,
}

/// `ClientIP` affinity: a client network namespace and a service (generation 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// `bpf_get_netns_cookie` of the client's socket.
    pub netns: u64,
    /// The service, generation 0.
    pub service: ServiceKey,
    /// Zero (explicit: implicit padding would be whatever the stack held, and keys would differ).
    pub _pad: [u32; 2],
}

/// The backend an affinity holds and when it was last used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// The backend.
    pub backend: Addr,
    /// Zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last use.
    pub last_ns: u64,
}

/// A socket's translation, for reading the frontend back: socket cookie and backend → frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// The backend the socket talks to.
    pub backend: Addr,
    /// Zero.
    pub _pad: u32,
}

const _: () = assert!(size_of::<Addr>() == 20);
const _: () = assert!(size_of::<ServiceKey>() == 24);
const _: () = assert!(size_of::<ServiceValue>() == 8);
const _: () = assert!(size_of::<BackendKey>() == 28);
const _: () = assert!(size_of::<MemberKey>() == 44);
const _: () = assert!(size_of::<AffinityKey>() == 40);
const _: () = assert!(size_of::<AffinityValue>() == 32);
const _: () = assert!(size_of::<RevKey>() == 32);

/// What the choice reads and writes: the LB maps, a random number and the clock.
pub trait Maps {
    /// A frontend.
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue>;
    /// A backend slot.
    fn backend(&self, key: &BackendKey) -> Option<Addr>;
    /// Whether a backend is a member of a service.
    fn is_member(&self, key: &MemberKey) -> bool;
    /// An affinity.
    fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue>;
    /// Writes an affinity.
    fn set_affinity(&mut self, key: &AffinityKey, value: &AffinityValue);
    /// A uniformly random number.
    fn random(&mut self) -> u32;
    /// `bpf_ktime_get_ns`.
    fn now_ns(&self) -> u64;
}

/// The outcome for a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Not a service frontend: leave the address alone.
    NotService,
    /// A service with no backend (or a slot missing mid-update): refuse.
    NoBackend,
    /// Connect to this backend.
    Backend(Addr),
    /// Connect to this backend, the one the client's affinity holds.
    Affine(Addr),
}

/// Chooses a backend for a connect (or send) from the client network namespace `netns` to `dest`
/// over `proto`, in `generation`.
pub fn pick<M: Maps>(m: &mut M, generation: u8, proto: u8, dest: &Addr, netns: u64) -> Pick {
    let key = ServiceKey { generation, proto, _pad: [0; 2], frontend: *dest };
    let Some(svc) = m.service(&key) else { return Pick::NotService };
    if svc.count == 0 {
        return Pick::NoBackend;
    }
    let affinity_key = (svc.affinity_secs != 0).then_some(AffinityKey {
        netns,
        service: ServiceKey { generation: 0, ..key },
        _pad: [0; 2],
    });
    let now = m.now_ns();
    if let Some(akey) = &affinity_key
        && let Some(a) = m.affinity(akey)
        && now.saturating_sub(a.last_ns) < u64::from(svc.affinity_secs) * 1_000_000_000
        && m.is_member(&MemberKey { service: key, backend: a.backend })
    {
        m.set_affinity(akey, &AffinityValue { last_ns: now, ..a });
        return Pick::Affine(a.backend);
    }
    let slot = m.random() % svc.count;
    let Some(backend) = m.backend(&BackendKey { service: key, slot }) else { return Pick::NoBackend };
    if let Some(akey) = &affinity_key {
        m.set_affinity(akey, &AffinityValue { backend, _pad: 0, last_ns: now });
    }
    Pick::Backend(backend)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    use super::*;
    use crate::family;

    #[derive(Default)]
    struct Model {
        services: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<BackendKey, Addr>,
        members: Vec<MemberKey>,
        affinity: Vec<(AffinityKey, AffinityValue)>,
        rng: u32,
        now: u64,
    }

    impl Maps for Model {
        fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
            self.services.get(key).copied()
        }
        fn backend(&self, key: &BackendKey) -> Option<Addr> {
            self.backends.get(key).copied()
        }
        fn is_member(&self, key: &MemberKey) -> bool {
            self.members.contains(key)
        }
        fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
            self.affinity.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
        }
        fn set_affinity(&mut self, key: &AffinityKey, value: &AffinityValue) {
            self.affinity.retain(|(k, _)| k != key);
            self.affinity.push((*key, *value));
        }
        fn random(&mut self) -> u32 {
            self.rng = self.rng.wrapping_add(1);
            self.rng
        }
        fn now_ns(&self) -> u64 {
            self.now
        }
    }

    fn addr(last: u8, port: u16) -> Addr {
        let mut a = [0; 16];
        a[..4].copy_from_slice(&[10, 0, 0, last]);
        Addr { family: family::V4, _pad: 0, port: port.to_be_bytes(), addr: a }
    }

    fn with_service(m: &mut Model, generation: u8, vip: Addr, backends: &[Addr], affinity_secs: u32) {
        let key = ServiceKey { generation, proto: 6, _pad: [0; 2], frontend: vip };
        m.services.insert(key, ServiceValue { count: backends.len() as u32, affinity_secs });
        for (i, b) in backends.iter().enumerate() {
            m.backends.insert(BackendKey { service: key, slot: i as u32 }, *b);
            m.members.push(MemberKey { service: key, backend: *b });
        }
    }

    #[test]
    fn every_backend_is_chosen_and_other_destinations_are_left_alone() {
        let mut m = Model::default();
        let (vip, b) = (addr(100, 80), [addr(1, 8080), addr(2, 8080), addr(3, 8080)]);
        with_service(&mut m, 0, vip, &b, 0);
        let mut seen = Vec::new();
        for _ in 0..3 {
            match pick(&mut m, 0, 6, &vip, 1) {
                Pick::Backend(x) => seen.push(x),
                other => panic!("{other:?}"),
            }
        }
        seen.sort();
        assert_eq!(seen, b);
        assert_eq!(pick(&mut m, 0, 17, &vip, 1), Pick::NotService, "another protocol");
        assert_eq!(pick(&mut m, 0, 6, &addr(100, 81), 1), Pick::NotService, "another port");
        assert_eq!(pick(&mut m, 1, 6, &vip, 1), Pick::NotService, "the other generation");
        with_service(&mut m, 0, addr(101, 80), &[], 0);
        assert_eq!(pick(&mut m, 0, 6, &addr(101, 80), 1), Pick::NoBackend);
    }

    #[test]
    fn affinity_holds_per_namespace_until_it_expires_or_the_backend_leaves() {
        let mut m = Model::default();
        let (vip, b) = (addr(100, 80), [addr(1, 8080), addr(2, 8080), addr(3, 8080)]);
        with_service(&mut m, 0, vip, &b, 10);
        let Pick::Backend(first) = pick(&mut m, 0, 6, &vip, 7) else { panic!() };
        for _ in 0..5 {
            m.now += 9_000_000_000;
            assert_eq!(pick(&mut m, 0, 6, &vip, 7), Pick::Affine(first), "refreshed by each use");
        }
        let Pick::Backend(_) = pick(&mut m, 0, 6, &vip, 8) else { panic!("another namespace chooses anew") };
        m.now += 11_000_000_000;
        assert!(matches!(pick(&mut m, 0, 6, &vip, 7), Pick::Backend(_)), "expired");
        // The backend it holds leaves in the next generation: chosen anew there.
        let Pick::Affine(held) = pick(&mut m, 0, 6, &vip, 7) else { panic!() };
        let rest: Vec<Addr> = b.iter().copied().filter(|x| *x != held).collect();
        with_service(&mut m, 1, vip, &rest, 10);
        for _ in 0..4 {
            match pick(&mut m, 1, 6, &vip, 7) {
                Pick::Backend(x) | Pick::Affine(x) => assert_ne!(x, held),
                other => panic!("{other:?}"),
            }
        }
    }
}
