//! Per-request load balancing of proxied flows to a service, as linkerd balances: each HTTP/1.1
//! request and each HTTP/2 (gRPC) stream picks a backend by the power of two choices over a
//! peak-EWMA of latency weighted by requests in flight, so one long-lived connection spreads over
//! every backend and a slow backend gets less.
//!
//! Which flows: services that opt in with Cilium's annotation `service.cilium.io/lb-l7: enabled`
//! (and have no ClientIP affinity, which the kernel's choice honours). The kernel balanced the
//! connection to one backend (at the socket); when the client is an endpoint of this node whose own
//! egress L7 rules bring the flow through the proxy (the client side's proxy; a flow here only for
//! the destination's ingress rules keeps the kernel's choice), the proxy balances its requests over
//! that service port's ready backends on the same port whose connection policy is the same as the
//! destination's — the same L3/L4 verdict and the same L7 rules on both sides, the same audit
//! modes ([`crate::policy::ConnVerdict::same_as`]) — so every request gets the verdict it was
//! judged with wherever it goes. (A proxy on the backends' side never balances: answers to an
//! upstream connection it opened to another node would not come back through it.)
//!
//! Known gap: the proxy cannot tell a connection the kernel translated from one the client made to
//! a backend's own address; a client connecting to a pod of an opted-in service directly has its
//! requests balanced too.
//!
//! Failures: a connect failure ejects the backend at once and the request (none of it sent) goes
//! to another; [`EJECT_AFTER`] failures in a row (errors, 5xx) eject it too. An ejection lasts
//! [`EJECTION`], doubling while the backend keeps failing when it is back (up to
//! [`MAX_EJECTION`]); a success ends the streak. When every backend is ejected they are all
//! candidates again: trying beats failing every request.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use policy_engine::snapshot::{Proto, Snapshot};

use crate::policy::Ends;

/// How fast the latency estimate forgets a measurement (linkerd's default decay).
const DECAY: Duration = Duration::from_secs(10);
/// Failures in a row that eject a backend.
pub const EJECT_AFTER: u32 = 5;
/// The first ejection.
pub const EJECTION: Duration = Duration::from_secs(5);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain numbers: a panic elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A uniformly random number (the standard library's per-process random keys, advanced on every
/// call): enough for choosing two of a few backends.
fn random() -> u64 {
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

#[derive(Debug)]
struct Health {
    /// Peak-EWMA of latency, nanoseconds, as of `stamp`.
    ewma_ns: f64,
    /// Whether anything was measured yet: until then its cost is nothing, so every backend is
    /// tried, and its first measurement is taken as it is.
    measured: bool,
    stamp: Instant,
    /// Failures since the last success.
    streak: u32,
    ejected_until: Option<Instant>,
    /// The next ejection's length.
    next_ejection: Duration,
}

/// What the process knows of one backend (shared by every connection balancing over it).
#[derive(Debug)]
pub struct Backend {
    /// Its address.
    pub addr: SocketAddr,
    health: Mutex<Health>,
    inflight: AtomicUsize,
    /// Requests sent to it.
    pub requests: AtomicU64,
    /// Requests that failed there (connect failures, errors, 5xx).
    pub failures: AtomicU64,
    /// Times it was ejected.
    pub ejections: AtomicU64,
}

/// How a request to a backend ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Answered (not 5xx): its latency counts.
    Ok,
    /// Could not connect: ejected at once.
    ConnectFailed,
    /// Failed after connecting, or answered 5xx.
    Failed,
}

impl Backend {
    fn new(addr: SocketAddr, now: Instant) -> Self {
        Self {
            addr,
            health: Mutex::new(Health {
                ewma_ns: 0.0,
                measured: false,
                stamp: now,
                streak: 0,
                ejected_until: None,
                next_ejection: EJECTION,
            }),
            inflight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
        }
    }

    /// The cost of sending it one more request now: latency estimate × (requests in flight + 1).
    fn cost(&self, now: Instant) -> f64 {
        let h = lock(&self.health);
        // The estimate decays towards nothing while unmeasured (a recovered backend gets tried).
        let idle = now.saturating_duration_since(h.stamp).as_secs_f64();
        let ewma = h.ewma_ns * (-idle / DECAY.as_secs_f64()).exp();
        ewma * (self.inflight.load(Ordering::Relaxed) + 1) as f64
    }

    fn ejected(&self, now: Instant) -> bool {
        lock(&self.health).ejected_until.is_some_and(|t| now < t)
    }

    /// The latency estimate, milliseconds.
    pub fn ewma_ms(&self) -> f64 {
        lock(&self.health).ewma_ns / 1e6
    }

    /// Whether it is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.ejected(Instant::now())
    }

    /// A request starts: counted in flight until the guard is finished or dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight { backend: self.clone(), start: Instant::now(), done: false }
    }

    fn end(&self, how: Ended, rtt: Duration, now: Instant) {
        let mut h = lock(&self.health);
        match how {
            Ended::Ok => {
                // Peak-EWMA: a slower answer counts at once, a faster one is averaged in.
                let rtt_ns = rtt.as_nanos() as f64;
                let elapsed = now.saturating_duration_since(h.stamp).as_secs_f64();
                let w = (-elapsed / DECAY.as_secs_f64()).exp();
                h.ewma_ns = if rtt_ns > h.ewma_ns || !h.measured { rtt_ns } else { h.ewma_ns * w + rtt_ns * (1.0 - w) };
                h.measured = true;
                h.stamp = now;
                h.streak = 0;
                h.next_ejection = EJECTION;
            }
            Ended::ConnectFailed | Ended::Failed => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                h.streak += 1;
                if how == Ended::ConnectFailed || h.streak >= EJECT_AFTER {
                    h.ejected_until = Some(now + h.next_ejection);
                    h.next_ejection = (h.next_ejection * 2).min(MAX_EJECTION);
                    h.streak = 0;
                    self.ejections.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A request in flight to a backend.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
    start: Instant,
    done: bool,
}

impl InFlight {
    /// The backend.
    pub fn addr(&self) -> SocketAddr {
        self.backend.addr
    }

    /// Records how the request ended.
    pub fn finish(mut self, how: Ended) {
        let now = Instant::now();
        self.backend.end(how, now.saturating_duration_since(self.start), now);
        self.done = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters of one service's balanced requests.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Requests balanced.
    pub requests: AtomicU64,
    /// Requests sent to a second backend (none of them reached the first).
    pub retries: AtomicU64,
    /// Requests that failed at the last backend tried.
    pub failed: AtomicU64,
}

/// Every backend the process balances over, by address, and every service's counters.
#[derive(Debug, Default)]
pub struct Backends {
    all: Mutex<HashMap<SocketAddr, Arc<Backend>>>,
    services: Mutex<HashMap<Arc<str>, Arc<ServiceStats>>>,
}

impl Backends {
    /// A service's counters (made on first use).
    pub fn service(&self, name: &Arc<str>) -> Arc<ServiceStats> {
        lock(&self.services).entry(name.clone()).or_default().clone()
    }

    /// What status reports: every service's counters and every backend's state.
    pub fn status(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut services: Vec<(Arc<str>, Arc<ServiceStats>)> =
            lock(&self.services).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        services.sort_by(|a, b| a.0.cmp(&b.0));
        serde_json::json!({
            "services": services.iter().map(|(name, s)| serde_json::json!({
                "service": name.as_ref(), "requests": g(&s.requests), "retries": g(&s.retries), "failed": g(&s.failed),
            })).collect::<Vec<_>>(),
            "backends": self.list().iter().map(|b| serde_json::json!({
                "address": b.addr.to_string(), "requests": g(&b.requests), "failures": g(&b.failures),
                "ejections": g(&b.ejections), "ejected": b.is_ejected(), "ewma_ms": b.ewma_ms(),
                "in_flight": b.inflight.load(Ordering::Relaxed),
            })).collect::<Vec<_>>(),
        })
    }

    /// The backend at `addr` (made on first use).
    pub fn get(&self, addr: SocketAddr) -> Arc<Backend> {
        lock(&self.all).entry(addr).or_insert_with(|| Arc::new(Backend::new(addr, Instant::now()))).clone()
    }

    /// Backends no service of `snap` has any more are forgotten.
    pub fn retain_in(&self, snap: &Snapshot) {
        let live: std::collections::HashSet<SocketAddr> = snap
            .services
            .iter()
            .flat_map(|s| {
                s.ports.iter().flat_map(move |p| s.backends_of(p).map(|(ip, port)| SocketAddr::new(ip, port)))
            })
            .collect();
        lock(&self.all).retain(|a, _| live.contains(a));
    }

    /// Every backend, sorted by address.
    pub fn list(&self) -> Vec<Arc<Backend>> {
        let mut v: Vec<Arc<Backend>> = lock(&self.all).values().cloned().collect();
        v.sort_by_key(|b| b.addr);
        v
    }
}

/// What the kernel's socket load balancer knows of a client's connection: whether the client
/// asked for a service (its connect was translated to the backend) or for the backend itself.
pub trait Translations: Send + Sync {
    /// The service frontend `client`'s connection to `backend` was translated from; `None`: the
    /// client connected to `backend` itself.
    fn frontend(&self, client: SocketAddr, backend: SocketAddr) -> std::io::Result<Option<SocketAddr>>;
}

/// A connection's requests balanced over one service port's backends.
#[derive(Debug)]
pub struct Balanced {
    /// `namespace/name` of the service.
    pub service: Arc<str>,
    /// The candidates (same family and identity as the connection's destination).
    pub backends: Vec<Arc<Backend>>,
    /// What records of a request to each candidate name as its two ends (`backends`' order).
    pub ends: Vec<Arc<Ends>>,
    /// The service's counters.
    pub stats: Arc<ServiceStats>,
}

impl Balanced {
    /// The balancing of a connection from `client` to `dst` under `snap`, when there is one: the
    /// client is an endpoint of this node, `dst` a ready backend of an opted-in service's TCP port
    /// (without affinity), and the port has another ready backend of `dst`'s family and port for
    /// which `same_policy` gives the ends (it judges the client's flow to that backend as it
    /// judged the connection; `own`: the connection's ends, `dst`'s). `frontend` says what the
    /// client asked for, asked only once `dst` is such a backend: `Some(None)` the backend itself
    /// (never balanced), `Some(Some(f))` service frontend `f` (the service that has it), `None`
    /// unknown (any opted-in service of `dst`).
    pub fn of(
        snap: &Snapshot,
        registry: &Backends,
        client: IpAddr,
        (dst, own): (SocketAddr, &Arc<Ends>),
        mut frontend: impl FnMut() -> Option<Option<SocketAddr>>,
        same_policy: impl Fn(SocketAddr) -> Option<Arc<Ends>>,
    ) -> Option<Self> {
        if !snap.services.iter().any(|s| s.l7_balancing) || !snap.endpoint_by_ip(client).is_some_and(|e| e.local) {
            return None;
        }
        let mut asked = None;
        for s in snap.services.iter().filter(|s| s.l7_balancing && s.affinity_secs.is_none()) {
            for port in s.ports.iter().filter(|p| p.protocol == Proto::Tcp) {
                if !s.backends_of(port).any(|(ip, p)| ip == dst.ip() && p == dst.port()) {
                    continue;
                }
                match *asked.get_or_insert_with(&mut frontend) {
                    Some(None) => return None,
                    Some(Some(f)) if f.port() != port.port || !s.cluster_ips.contains(&f.ip()) => continue,
                    _ => {}
                }
                let mut addrs: Vec<SocketAddr> = s
                    .backends_of(port)
                    .filter(|(ip, p)| ip.is_ipv4() == dst.is_ipv4() && *p == dst.port())
                    .map(|(ip, p)| SocketAddr::new(ip, p))
                    .collect();
                addrs.sort();
                addrs.dedup();
                let same: Vec<(SocketAddr, Arc<Ends>)> = addrs
                    .into_iter()
                    .filter_map(|a| if a == dst { Some((a, own.clone())) } else { same_policy(a).map(|e| (a, e)) })
                    .collect();
                if same.len() < 2 {
                    return None;
                }
                let service: Arc<str> = Arc::from(format!("{}/{}", s.namespace, s.name));
                let (backends, ends) = same.into_iter().map(|(a, e)| (registry.get(a), e)).unzip();
                return Some(Self { stats: registry.service(&service), service, backends, ends });
            }
        }
        None
    }

    /// The ends records name for a request to `backend` (one of the candidates).
    pub fn ends_of(&self, backend: &Backend) -> Option<&Arc<Ends>> {
        let i = self.backends.iter().position(|b| b.addr == backend.addr)?;
        self.ends.get(i)
    }

    /// Power of two choices among the backends not in `tried` and not ejected (all of them not
    /// tried, when every one is ejected): the cheaper of two picked at random.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let now = Instant::now();
        let untried: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| !tried.contains(&b.addr)).collect();
        let live: Vec<&Arc<Backend>> = untried.iter().copied().filter(|b| !b.ejected(now)).collect();
        let from = if live.is_empty() { untried } else { live };
        match from.len() {
            0 => None,
            1 => from.first().map(|b| (*b).clone()),
            n => {
                let r = random();
                let i = (r % n as u64) as usize;
                // A second index, different from the first.
                let j = (i + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                let (a, b) = (from.get(i)?, from.get(j)?);
                Some(if a.cost(now) <= b.cost(now) { (*a).clone() } else { (*b).clone() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balanced(n: u8) -> Balanced {
        let registry = Backends::default();
        Balanced {
            service: Arc::from("default/s"),
            backends: (1..=n).map(|i| registry.get(SocketAddr::from(([10, 0, 0, i], 80)))).collect(),
            ends: Vec::new(),
            stats: Arc::default(),
        }
    }

    #[test]
    fn every_backend_is_picked_and_a_slow_one_less() {
        let b = balanced(3);
        let mut count: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..3000 {
            let pick = b.pick(&[]).unwrap();
            let rtt = if pick.addr.ip() == IpAddr::from([10, 0, 0, 3]) { 50 } else { 1 };
            let f = pick.start();
            // The slow backend answers slowly.
            let now = Instant::now();
            pick.end(Ended::Ok, Duration::from_millis(rtt), now);
            drop(f);
            *count.entry(pick.addr).or_default() += 1;
        }
        let slow = count[&SocketAddr::from(([10, 0, 0, 3], 80))];
        assert!(slow < 400, "the slow backend got {slow} of 3000: {count:?}");
        assert!(count.len() == 3, "{count:?}");
    }

    #[test]
    fn a_backend_that_refuses_is_ejected_and_a_tried_one_is_skipped() {
        let b = balanced(3);
        let dead = b.backends[0].clone();
        dead.start().finish(Ended::ConnectFailed);
        assert!(dead.is_ejected());
        for _ in 0..200 {
            assert_ne!(b.pick(&[]).unwrap().addr, dead.addr);
        }
        let second = b.backends[1].addr;
        for _ in 0..50 {
            assert_eq!(b.pick(&[second]).unwrap().addr, b.backends[2].addr, "the only one neither ejected nor tried");
        }
        // Everyone ejected: all are candidates again.
        for x in &b.backends {
            x.start().finish(Ended::ConnectFailed);
        }
        assert!(b.pick(&[]).is_some());
        assert!(b.pick(&b.backends.iter().map(|x| x.addr).collect::<Vec<_>>()).is_none());
    }

    #[test]
    fn failures_in_a_row_eject_and_a_success_ends_the_streak() {
        let b = balanced(2);
        let x = b.backends[0].clone();
        for _ in 0..EJECT_AFTER - 1 {
            x.start().finish(Ended::Failed);
        }
        x.start().finish(Ended::Ok);
        x.start().finish(Ended::Failed);
        assert!(!x.is_ejected());
        for _ in 0..EJECT_AFTER {
            x.start().finish(Ended::Failed);
        }
        assert!(x.is_ejected());
        assert_eq!(x.ejections.load(Ordering::Relaxed), 1);
    }
}
