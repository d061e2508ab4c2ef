//! Which client connections the proxy holds, and which it lets go under pressure.
//!
//! Every accepted connection is admitted here first, by its source: the pod it comes from (its
//! endpoint's first address, so IPv4 and IPv6 count together), or its address when it is no local
//! endpoint. A source never holds more than `max_connections_per_source`; the process never more
//! than `max_connections`. At either limit the proxy does not refuse everyone: it sheds the oldest
//! *idle* connection (no request in flight) of the source at its cap, or of the heaviest source
//! when the process is full, and admits the newcomer. A connection that is shed is closed at once
//! (a keep-alive client reconnects; a silent one has lost nothing). Only when every connection of
//! every candidate is busy is the newcomer refused.
//!
//! Idle timeouts shrink as the table fills (Envoy's overload manager does the same): above
//! [`PRESSURE_START`] of `max_connections` they fall linearly towards `min_idle_timeout`, and
//! [`ConnTable::sweep`] closes connections idle for longer than the scaled timeout.
//!
//! This module counts and chooses; it never touches sockets. The connection's task watches
//! [`ConnState::shed`] and closes its own socket.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Occupancy (of `max_connections`) above which idle timeouts start to shrink.
pub const PRESSURE_START: f64 = 0.8;

/// One admitted connection, shared by the table and the connection's task.
#[derive(Debug)]
pub struct ConnState {
    epoch: Instant,
    /// Milliseconds since `epoch` when a byte last moved.
    last_ms: AtomicU64,
    /// Requests in progress (HTTP/2 streams, the one HTTP/1 request, Kafka requests owed an answer).
    pub inflight: AtomicUsize,
    /// What the connection speaks ([`ConnKind`] as a number; set once known).
    kind: AtomicU8,
    shed: AtomicBool,
    notify: Notify,
}

impl ConnState {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            kind: AtomicU8::new(ConnKind::Http1 as u8),
            shed: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    /// What the connection speaks.
    pub fn kind(&self) -> ConnKind {
        match self.kind.load(Ordering::Relaxed) {
            1 => ConnKind::Http2,
            2 => ConnKind::Kafka,
            _ => ConnKind::Http1,
        }
    }

    /// Says what the connection speaks.
    pub fn set_kind(&self, kind: ConnKind) {
        self.kind.store(kind as u8, Ordering::Relaxed);
    }

    /// Notes that the connection moved a byte.
    pub fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the connection last moved a byte.
    pub fn idle_for(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// No request in progress.
    pub fn is_idle(&self) -> bool {
        self.inflight.load(Ordering::Relaxed) == 0
    }

    /// Resolves once the table has let this connection go (shed, or idle past the scaled timeout).
    pub async fn shed(&self) {
        loop {
            let notified = self.notify.notified();
            if self.shed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn let_go(&self) {
        self.shed.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// What an admitted connection speaks: each has its own idle timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnKind {
    /// HTTP/1 (and connections not yet identified).
    Http1 = 0,
    /// HTTP/2 (h2c).
    Http2 = 1,
    /// Kafka.
    Kafka = 2,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its source holds `max_connections_per_source`, all busy.
    SourceLimit,
    /// The process holds `max_connections`, all of every source busy.
    Full,
}

/// What admission did besides admitting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shed(pub usize);

/// Connection limits.
#[derive(Clone, Copy, Debug)]
pub struct TableLimits {
    /// Connections of the whole process.
    pub max: usize,
    /// Connections of one source address.
    pub per_source: usize,
    /// Idle timeout floor under full pressure.
    pub min_idle: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    total: usize,
    /// Per source, its connections in admission order (oldest first).
    sources: HashMap<IpAddr, BTreeMap<u64, Arc<ConnState>>>,
}

/// The process's client connections.
#[derive(Debug)]
pub struct ConnTable {
    limits: TableLimits,
    inner: Mutex<Inner>,
    /// Connections shed to make room or for idling under pressure.
    pub shed_total: AtomicU64,
}

/// An admitted connection; leaves the table when dropped.
#[derive(Debug)]
pub struct Admitted {
    table: Arc<ConnTable>,
    source: IpAddr,
    id: u64,
    /// The connection's shared state.
    pub state: Arc<ConnState>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.table.remove(self.source, self.id);
    }
}

impl ConnTable {
    /// An empty table.
    pub fn new(limits: TableLimits) -> Arc<Self> {
        Arc::new(Self { limits, inner: Mutex::new(Inner::default()), shed_total: AtomicU64::new(0) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The table holds counts and handles only; a panic elsewhere cannot leave it half-updated.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits a connection from `source`, shedding an idle one to make room when a limit is
    /// reached.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<(Admitted, Shed), Refused> {
        let mut inner = self.lock();
        let mut shed = 0;
        if inner.sources.get(&source).map_or(0, BTreeMap::len) >= self.limits.per_source {
            if !self.shed_oldest_idle(&mut inner, source) {
                return Err(Refused::SourceLimit);
            }
            shed += 1;
        }
        if inner.total >= self.limits.max {
            // The heaviest sources give way first.
            let mut by_weight: Vec<(usize, IpAddr)> = inner.sources.iter().map(|(ip, c)| (c.len(), *ip)).collect();
            by_weight.sort_unstable_by(|a, b| b.cmp(a));
            if !by_weight.into_iter().any(|(_, ip)| self.shed_oldest_idle(&mut inner, ip)) {
                return Err(Refused::Full);
            }
            shed += 1;
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let state = Arc::new(ConnState::new());
        state.touch();
        inner.sources.entry(source).or_default().insert(id, state.clone());
        inner.total += 1;
        Ok((Admitted { table: self.clone(), source, id, state }, Shed(shed)))
    }

    /// Lets go of `source`'s oldest idle connection; false when it has none.
    fn shed_oldest_idle(&self, inner: &mut Inner, source: IpAddr) -> bool {
        let Some(conns) = inner.sources.get_mut(&source) else { return false };
        let Some(id) = conns.iter().find(|(_, c)| c.is_idle()).map(|(id, _)| *id) else { return false };
        if let Some(c) = conns.remove(&id) {
            c.let_go();
        }
        if conns.is_empty() {
            inner.sources.remove(&source);
        }
        inner.total -= 1;
        self.shed_total.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn remove(&self, source: IpAddr, id: u64) {
        let mut inner = self.lock();
        let Some(conns) = inner.sources.get_mut(&source) else { return };
        // A shed connection was removed already.
        if conns.remove(&id).is_some() {
            if conns.is_empty() {
                inner.sources.remove(&source);
            }
            inner.total -= 1;
        }
    }

    /// `timeout` scaled to the table's occupancy: whole up to [`PRESSURE_START`], then falling
    /// linearly to `min_idle_timeout` (never below it, never above `timeout`) when full.
    pub fn scaled(&self, timeout: Duration) -> Duration {
        let occupancy = self.lock().total as f64 / self.limits.max.max(1) as f64;
        scale(timeout, self.limits.min_idle, occupancy)
    }

    /// Lets go of every idle connection that has been silent for longer than the timeout of its
    /// kind (`timeout`), scaled for pressure; returns how many.
    pub fn sweep(&self, timeout: impl Fn(ConnKind) -> Duration) -> usize {
        let mut inner = self.lock();
        let occupancy = inner.total as f64 / self.limits.max.max(1) as f64;
        let [h1, h2, kafka] = [ConnKind::Http1, ConnKind::Http2, ConnKind::Kafka]
            .map(|k| scale(timeout(k), self.limits.min_idle, occupancy));
        let mut gone = 0;
        for conns in inner.sources.values_mut() {
            conns.retain(|_, c| {
                let limit = match c.kind() {
                    ConnKind::Http1 => h1,
                    ConnKind::Http2 => h2,
                    ConnKind::Kafka => kafka,
                };
                let expired = c.is_idle() && c.idle_for() > limit;
                if expired {
                    c.let_go();
                    gone += 1;
                }
                !expired
            });
        }
        inner.sources.retain(|_, c| !c.is_empty());
        inner.total -= gone;
        self.shed_total.fetch_add(gone as u64, Ordering::Relaxed);
        gone
    }
}

fn scale(timeout: Duration, floor: Duration, occupancy: f64) -> Duration {
    let floor = floor.min(timeout);
    if occupancy <= PRESSURE_START {
        return timeout;
    }
    let left = ((1.0 - occupancy) / (1.0 - PRESSURE_START)).clamp(0.0, 1.0);
    floor + (timeout - floor).mul_f64(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize, per_source: usize) -> Arc<ConnTable> {
        ConnTable::new(TableLimits { max, per_source, min_idle: Duration::from_secs(1) })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_source_at_its_cap_gives_up_its_own_oldest_idle_connection() {
        let t = table(100, 2);
        let (a, _) = t.admit(ip(1)).unwrap();
        let (b, _) = t.admit(ip(1)).unwrap();
        b.state.inflight.fetch_add(1, Ordering::Relaxed);
        let (_c, shed) = t.admit(ip(1)).unwrap();
        assert_eq!(shed, Shed(1));
        assert!(a.state.shed.load(Ordering::Relaxed), "the oldest idle one went");
        assert!(!b.state.shed.load(Ordering::Relaxed), "the busy one stays");
        assert_eq!(t.len(), 2);
        // Both busy: refused.
        _c.state.inflight.fetch_add(1, Ordering::Relaxed);
        assert_eq!(t.admit(ip(1)).unwrap_err(), Refused::SourceLimit);
        drop(a);
        assert_eq!(t.len(), 2, "dropping a shed connection does not count it twice");
    }

    #[test]
    fn a_full_table_sheds_the_heaviest_source_not_the_newcomer() {
        let t = table(4, 4);
        let heavy: Vec<_> = (0..3).map(|_| t.admit(ip(1)).unwrap().0).collect();
        let (light, _) = t.admit(ip(2)).unwrap();
        let (newcomer, shed) = t.admit(ip(3)).unwrap();
        assert_eq!(shed, Shed(1));
        assert!(heavy[0].state.shed.load(Ordering::Relaxed));
        assert!(!light.state.shed.load(Ordering::Relaxed));
        assert_eq!(t.len(), 4);
        // Everyone busy: refused.
        for c in heavy.iter().skip(1).chain([&light, &newcomer]) {
            c.state.inflight.fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(t.admit(ip(4)).unwrap_err(), Refused::Full);
    }

    #[test]
    fn timeouts_shrink_with_pressure() {
        let t = table(10, 10);
        let full = Duration::from_secs(30);
        let held: Vec<_> = (0..8).map(|i| t.admit(ip(i)).unwrap().0).collect();
        assert_eq!(t.scaled(full), full, "80 % full: whole");
        let more: Vec<_> = (8..10).map(|i| t.admit(ip(i)).unwrap().0).collect();
        assert_eq!(t.scaled(full), Duration::from_secs(1), "full: the floor");
        drop(more);
        assert_eq!(scale(full, Duration::from_secs(1), 0.9), Duration::from_millis(15_500));
        assert_eq!(scale(Duration::from_millis(500), Duration::from_secs(1), 1.0), Duration::from_millis(500));
        drop(held);
        assert!(t.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sweep_lets_idle_connections_go_and_wakes_their_tasks() {
        let t = table(10, 10);
        let (idle, _) = t.admit(ip(1)).unwrap();
        let (busy, _) = t.admit(ip(2)).unwrap();
        busy.state.inflight.fetch_add(1, Ordering::Relaxed);
        let waiter = tokio::spawn({
            let s = idle.state.clone();
            async move { s.shed().await }
        });
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(t.sweep(|_| Duration::from_millis(10)), 1);
        waiter.await.unwrap();
        assert_eq!(t.len(), 1);
    }
}
