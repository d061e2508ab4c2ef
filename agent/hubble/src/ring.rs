//! The node's flow ring: the last N flow records of every emitter on the node, in the order the
//! agent took them, numbered from 1. A reader asks for what follows the number it has seen and
//! learns how many the ring let go before it asked (sent to it as a lost-events message); a
//! follower waits on [`FlowRing::subscribe`] for the newest number to move.
//!
//! Events lost before they became flows (the kernel's ring buffer overflowing, the proxy's backlog
//! letting records go before the agent read them) are noted in the ring too, at the place in the
//! flows where they were noticed ([`FlowRing::lost`]): a reader walking past that place is told,
//! as Hubble tells its clients (`LostEvent`, with its source).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use porin_flow::backlog::Backlog;
use porin_flow::flow::Flow;
use tokio::sync::watch;

/// Hubble's default ring capacity (`--hubble-event-buffer-capacity`).
pub const DEFAULT_CAPACITY: usize = 4095;

/// Losses kept for readers still behind them.
const LOSSES: usize = 1024;

/// Where events were lost before they became flows (Hubble's `LostEventSource`s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostSource {
    /// The kernel's ring buffer overflowed.
    PerfEventRingBuffer,
    /// The proxy's record backlog let records go before the agent read them (or one did not
    /// decode).
    ObserverEventsQueue,
}

impl LostSource {
    /// Hubble's name (`LostEventSource`).
    pub fn name(self) -> &'static str {
        match self {
            Self::PerfEventRingBuffer => "PERF_EVENT_RING_BUFFER",
            Self::ObserverEventsQueue => "OBSERVER_EVENTS_QUEUE",
        }
    }
}

/// Events lost before they became flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    /// This loss's number (from 1, in the order they were noted).
    pub id: u64,
    /// Noticed after the flow numbered this.
    pub after: u64,
    /// Where.
    pub source: LostSource,
    /// How many.
    pub count: u64,
}

/// The ring.
#[derive(Debug)]
pub struct FlowRing {
    flows: Mutex<Backlog<Flow>>,
    losses: Mutex<VecDeque<Loss>>,
    newest: watch::Sender<u64>,
    capacity: usize,
    started: Instant,
    /// Tells this ring's flow ids from those of the ring before a restart.
    epoch: u64,
}

/// What a read returns.
#[derive(Debug, Default)]
pub struct Read {
    /// Flows with their numbers, oldest first.
    pub flows: Vec<(u64, Flow)>,
    /// The newest number (ask after it next).
    pub last: u64,
    /// Flows after the reader's number that the ring let go before it asked.
    pub missed: u64,
}

/// The ring's fill and history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingStatus {
    /// Flows held.
    pub num_flows: u64,
    /// Capacity.
    pub max_flows: u64,
    /// Flows taken since the ring was made.
    pub seen_flows: u64,
    /// Flows let go because the ring was full.
    pub evicted: u64,
    /// Nanoseconds since the ring was made.
    pub uptime_ns: u64,
}

impl FlowRing {
    /// An empty ring of `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX) ^ u64::from(std::process::id()).rotate_left(48)
        });
        Self {
            flows: Mutex::new(Backlog::new(capacity)),
            losses: Mutex::new(VecDeque::new()),
            newest: watch::Sender::new(0),
            capacity,
            started: Instant::now(),
            epoch,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Backlog<Flow>> {
        // Flow records only: a panic elsewhere cannot leave one half-written.
        self.flows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds flows as they are (another emitter numbered them), in order; wakes the followers once.
    pub fn extend<I: IntoIterator<Item = Flow>>(&self, flows: I) {
        let last = {
            let mut ring = self.lock();
            for f in flows {
                ring.push(f);
            }
            ring.last()
        };
        self.newest.send_replace(last);
    }

    /// Adds the flow `make` builds from its number; returns the number.
    pub fn push_numbered(&self, make: impl FnOnce(u64) -> Flow) -> u64 {
        let n = self.lock().push_numbered(make);
        self.newest.send_replace(n);
        n
    }

    /// Adds the flows `make` builds from their numbers, one per item of `items`.
    pub fn push_each<T>(&self, items: impl IntoIterator<Item = T>, mut make: impl FnMut(u64, T) -> Flow) {
        let last = {
            let mut ring = self.lock();
            for item in items {
                ring.push_numbered(|n| make(n, item));
            }
            ring.last()
        };
        self.newest.send_replace(last);
    }

    /// Notes `count` events lost at `source`, after the newest flow; wakes the followers.
    pub fn lost(&self, source: LostSource, count: u64) {
        if count == 0 {
            return;
        }
        // Under the flows' lock (always taken first): a loss's place and its number agree with
        // every other loss's, whoever notes them.
        let flows = self.lock();
        let after = flows.last();
        {
            let mut losses = self.losses.lock().unwrap_or_else(PoisonError::into_inner);
            let id = losses.back().map_or(1, |l| l.id + 1);
            if losses.len() >= LOSSES {
                losses.pop_front();
            }
            losses.push_back(Loss { id, after, source, count });
        }
        drop(flows);
        self.newest.send_replace(after);
    }

    /// Losses numbered `from` or above noticed at or before flow `through`, oldest first (none
    /// to copy, the usual case, is cheap).
    pub fn losses(&self, from: u64, through: u64) -> Vec<Loss> {
        let losses = self.losses.lock().unwrap_or_else(PoisonError::into_inner);
        losses.iter().filter(|l| l.id >= from && l.after <= through).copied().collect()
    }

    /// The number the next loss will have.
    pub fn next_loss(&self) -> u64 {
        self.losses.lock().unwrap_or_else(PoisonError::into_inner).back().map_or(1, |l| l.id + 1)
    }

    /// The flows numbered above `after`, at most `limit`.
    pub fn after(&self, after: u64, limit: usize) -> Read {
        let ring = self.lock();
        let page = ring.after(after, limit);
        Read {
            flows: page.items.into_iter().map(|(n, f)| (n, f.clone())).collect(),
            last: page.last,
            missed: page.missed,
        }
    }

    /// Offers every flow held, newest first, for as long as `more` says so (under the lock: `more`
    /// must be quick). Returns the newest number (a follower goes on after it).
    pub fn newest_first(&self, mut more: impl FnMut(u64, &Flow) -> bool) -> u64 {
        let ring = self.lock();
        let page = ring.after(0, usize::MAX);
        for (n, f) in page.items.into_iter().rev() {
            if !more(n, f) {
                break;
            }
        }
        ring.last()
    }

    /// This ring's id: tells its numbers from those of a ring before a restart.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The newest number now.
    pub fn last(&self) -> u64 {
        self.lock().last()
    }

    /// A receiver that changes whenever flows are added.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// Fill and history.
    pub fn status(&self) -> RingStatus {
        let ring = self.lock();
        RingStatus {
            num_flows: ring.len() as u64,
            max_flows: self.capacity as u64,
            seen_flows: ring.last(),
            evicted: ring.evicted(),
            uptime_ns: u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// The id of flow number `n` of this ring (a UUID, unique across restarts).
    pub fn uuid(&self, n: u64) -> String {
        let [a, b, c, d, e, f, g, h] = self.epoch.to_be_bytes();
        let [i, j, k, l, m, o, p, q] = n.to_be_bytes();
        // Version 8 (custom) and the RFC 4122 variant, so parsers accept it.
        let bytes = [a, b, c, d, e, f, (g & 0x0f) | 0x80, h, (i & 0x3f) | 0x80, j, k, l, m, o, p, q];
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let (t1, rest) = hex.split_at(8);
        let (t2, rest) = rest.split_at(4);
        let (t3, rest) = rest.split_at(4);
        let (t4, t5) = rest.split_at(4);
        format!("{t1}-{t2}-{t3}-{t4}-{t5}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(summary: &str) -> Flow {
        Flow { summary: summary.into(), ..Flow::default() }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_counts_what_it_let_go() {
        let ring = FlowRing::new(3);
        let mut rx = ring.subscribe();
        ring.extend(["a", "b", "c", "d"].map(flow));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 4);
        let r = ring.after(0, 10);
        assert_eq!(
            r.flows.iter().map(|(n, f)| (*n, f.summary.as_str())).collect::<Vec<_>>(),
            [(2, "b"), (3, "c"), (4, "d")]
        );
        assert_eq!((r.last, r.missed), (4, 1));
        let s = ring.status();
        assert_eq!((s.num_flows, s.max_flows, s.seen_flows, s.evicted), (3, 3, 4, 1));
        let mut newest = vec![];
        let last = ring.newest_first(|n, _| {
            newest.push(n);
            newest.len() < 2
        });
        assert_eq!((newest, last), (vec![4, 3], 4));
        assert_eq!(ring.push_numbered(|n| flow(&n.to_string())), 5);
    }

    #[test]
    fn flow_ids_are_uuids_unique_per_number() {
        let ring = FlowRing::new(1);
        let (a, b) = (ring.uuid(1), ring.uuid(2));
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'8', "{a}");
        assert!(matches!(a.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{a}");
    }
}
