//! A bounded, numbered backlog: records wait here until someone asks for them. When it is full the
//! oldest go; a reader that comes back after them learns how many it missed. Not synchronised:
//! the owner puts it behind its own lock.

use std::collections::VecDeque;

/// The last `capacity` items, numbered from 1.
#[derive(Debug)]
pub struct Backlog<T> {
    items: VecDeque<(u64, T)>,
    capacity: usize,
    last: u64,
    evicted: u64,
}

/// What a reader gets: the items after the number it gave, and what it missed.
#[derive(Debug, PartialEq, Eq)]
pub struct Page<'a, T> {
    /// Items, oldest first, with their numbers.
    pub items: Vec<(u64, &'a T)>,
    /// The newest number so far (ask with it next time).
    pub last: u64,
    /// Items after the reader's number that were let go before it asked.
    pub missed: u64,
}

impl<T> Backlog<T> {
    /// An empty backlog holding at most `capacity` items (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self { items: VecDeque::with_capacity(capacity.min(1024)), capacity, last: 0, evicted: 0 }
    }

    /// Adds an item; returns its number.
    pub fn push(&mut self, item: T) -> u64 {
        self.push_numbered(|_| item)
    }

    /// Adds the item `make` builds from its number; returns the number.
    pub fn push_numbered(&mut self, make: impl FnOnce(u64) -> T) -> u64 {
        if self.items.len() >= self.capacity {
            self.evict_oldest();
        }
        self.last += 1;
        self.items.push_back((self.last, make(self.last)));
        self.last
    }

    /// Lets the oldest item go (counted as evicted), and returns it.
    pub fn evict_oldest(&mut self) -> Option<T> {
        let (_, item) = self.items.pop_front()?;
        self.evicted += 1;
        Some(item)
    }

    /// Whether it holds as many items as it may.
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.capacity
    }

    /// The items numbered above `after`, at most `limit`.
    pub fn after(&self, after: u64, limit: usize) -> Page<'_, T> {
        let first = self.items.front().map_or(self.last + 1, |(n, _)| *n);
        let missed = first.saturating_sub(after.saturating_add(1));
        let skip = usize::try_from(after.saturating_sub(first.saturating_sub(1))).unwrap_or(usize::MAX);
        let items = self.items.iter().skip(skip).take(limit).map(|(n, t)| (*n, t)).collect();
        Page { items, last: self.last, missed }
    }

    /// The newest number so far.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Items let go because the backlog was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Items held now.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// A numbered backlog of byte records (with a little side data each) whose bytes lie back to back
/// in one ring: keeping a record writes the next bytes of one buffer, which caches and prefetchers
/// handle far better than a buffer per record scattered over the heap, and letting one go frees
/// nothing. A record over [`OUT_OF_LINE`] bytes (a long URL's) is kept in a buffer of its own,
/// within a budget of its own. Bounded by count and by both budgets: what it holds never takes more
/// memory than they say, whatever clients send.
#[derive(Debug)]
pub struct ByteBacklog<T> {
    index: Backlog<Slot<T>>,
    ring: Box<[u8]>,
    /// Where the next record's bytes go.
    head: usize,
    /// Bytes of the ring the kept records take (they end at `head`).
    used: usize,
    /// Bytes kept out of the ring, and the most they may take.
    own: usize,
    own_max: usize,
}

/// Records over this many bytes are kept out of the ring.
pub const OUT_OF_LINE: usize = 4 * 1024;

#[derive(Debug)]
struct Slot<T> {
    at: usize,
    len: usize,
    own: Option<Box<[u8]>>,
    side: T,
}

/// What a reader of a [`ByteBacklog`] gets.
#[derive(Debug)]
pub struct BytePage<'a, T> {
    /// Records, oldest first: number, side data, bytes (in at most two pieces: the ring wraps).
    pub items: Vec<(u64, &'a T, [&'a [u8]; 2])>,
    /// The newest number so far.
    pub last: u64,
    /// Records after the reader's number let go before it asked.
    pub missed: u64,
}

impl<T> ByteBacklog<T> {
    /// At most `capacity` records, `ring` bytes of them in the ring (allocated now) and `large`
    /// bytes of records over [`OUT_OF_LINE`] (allocated as they come).
    pub fn new(capacity: usize, ring: usize, large: usize) -> Self {
        let ring = vec![0; ring.max(1)].into_boxed_slice();
        Self { index: Backlog::new(capacity), ring, head: 0, used: 0, own: 0, own_max: large }
    }

    /// Keeps `record` with `side`, letting the oldest go as needed; returns its number. (A record
    /// larger than its whole budget is kept alone.)
    pub fn push(&mut self, record: &[u8], side: T) -> u64 {
        let len = record.len();
        if len > OUT_OF_LINE.min(self.ring.len()) {
            while self.index.is_full() || self.own + len > self.own_max {
                if !self.evict_oldest() {
                    break;
                }
            }
            self.own += len;
            return self.index.push(Slot { at: 0, len, own: Some(record.into()), side });
        }
        while self.index.is_full() || self.used + len > self.ring.len() {
            if !self.evict_oldest() {
                break;
            }
        }
        let at = self.head;
        let first = len.min(self.ring.len() - at);
        self.ring[at..at + first].copy_from_slice(&record[..first]);
        self.ring[..len - first].copy_from_slice(&record[first..]);
        self.head = (at + len) % self.ring.len();
        self.used += len;
        self.index.push(Slot { at, len, own: None, side })
    }

    fn evict_oldest(&mut self) -> bool {
        match self.index.evict_oldest() {
            Some(slot) => {
                match slot.own {
                    Some(_) => self.own -= slot.len,
                    None => self.used -= slot.len,
                }
                true
            }
            None => false,
        }
    }

    /// The records numbered above `after`, at most `limit`.
    pub fn after(&self, after: u64, limit: usize) -> BytePage<'_, T> {
        let page = self.index.after(after, limit);
        let items = page.items.into_iter().map(|(n, slot)| (n, &slot.side, self.bytes(slot))).collect();
        BytePage { items, last: page.last, missed: page.missed }
    }

    fn bytes<'a>(&'a self, slot: &'a Slot<T>) -> [&'a [u8]; 2] {
        if let Some(own) = &slot.own {
            return [own, &[]];
        }
        let first = slot.len.min(self.ring.len() - slot.at);
        [&self.ring[slot.at..slot.at + first], &self.ring[..slot.len - first]]
    }

    /// The newest number so far.
    pub fn last(&self) -> u64 {
        self.index.last()
    }

    /// Records let go to make room.
    pub fn evicted(&self) -> u64 {
        self.index.evicted()
    }

    /// Records held now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The ring's size in bytes.
    pub fn ring_bytes(&self) -> usize {
        self.ring.len()
    }

    /// Bytes the kept records take, in the ring and out of it.
    pub fn kept_bytes(&self) -> usize {
        self.used + self.own
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_get_what_is_new_and_learn_what_they_missed() {
        let mut b = Backlog::new(3);
        for i in 1..=5 {
            assert_eq!(b.push(i * 10), i);
        }
        assert_eq!((b.len(), b.evicted(), b.last()), (3, 2, 5));
        let p = b.after(0, 100);
        assert_eq!(p.items, vec![(3, &30), (4, &40), (5, &50)]);
        assert_eq!((p.last, p.missed), (5, 2));
        let p = b.after(3, 100);
        assert_eq!((p.items, p.missed), (vec![(4, &40), (5, &50)], 0));
        let p = b.after(2, 1);
        assert_eq!((p.items, p.missed), (vec![(3, &30)], 0));
        let p = b.after(5, 100);
        assert!(p.items.is_empty() && p.missed == 0);
        let p = b.after(9, 100);
        assert!(p.items.is_empty() && p.missed == 0);
        assert_eq!((b.evict_oldest(), b.evicted(), b.after(0, 100).missed), (Some(30), 3, 3));
        let empty: Backlog<u8> = Backlog::new(0);
        assert_eq!(empty.after(0, 10).items, vec![]);
    }

    fn whole<T>(p: &BytePage<'_, T>) -> Vec<(u64, Vec<u8>)> {
        p.items.iter().map(|(n, _, [a, b])| (*n, [*a, *b].concat())).collect()
    }

    #[test]
    fn byte_records_wrap_around_the_ring_and_the_oldest_make_room() {
        let mut b = ByteBacklog::new(100, 10, 0);
        assert_eq!(b.push(b"abcd", 'a'), 1);
        assert_eq!(b.push(b"efgh", 'b'), 2);
        // 4 + 4 + 4 > 10: the first goes; the third wraps (2 bytes at the end, 2 at the start).
        assert_eq!(b.push(b"ijkl", 'c'), 3);
        let p = b.after(0, 100);
        assert_eq!(whole(&p), vec![(2, b"efgh".to_vec()), (3, b"ijkl".to_vec())]);
        assert_eq!((p.missed, p.items[1].1, p.items[1].2[1]), (1, &'c', &b"kl"[..]));
        // An empty record takes no room; one as large as the ring takes all of it.
        b.push(b"", 'd');
        b.push(b"0123456789", 'e');
        assert_eq!(whole(&b.after(0, 100)), vec![(4, Vec::new()), (5, b"0123456789".to_vec())]);
        assert_eq!((b.len(), b.evicted(), b.kept_bytes()), (2, 3, 10));
    }

    #[test]
    fn byte_records_are_bounded_by_count_and_large_ones_by_their_own_budget() {
        let big = |n: u8| vec![n; OUT_OF_LINE + 1];
        let mut b = ByteBacklog::new(3, 1 << 20, 2 * (OUT_OF_LINE + 1));
        b.push(b"x", ());
        b.push(&big(1), ());
        b.push(b"y", ());
        assert_eq!(whole(&b.after(0, 100)), vec![(1, b"x".to_vec()), (2, big(1)), (3, b"y".to_vec())]);
        // The count: the oldest goes.
        b.push(b"z", ());
        assert_eq!(b.after(0, 100).items.len(), 3);
        // The large budget holds two: a third large one lets the oldest records go until it fits.
        let seqs = |b: &ByteBacklog<()>| b.after(0, 100).items.iter().map(|(n, _, _)| *n).collect::<Vec<_>>();
        let mut b = ByteBacklog::new(10, 1 << 20, 2 * (OUT_OF_LINE + 1));
        for r in [&big(1)[..], b"x", &big(2), b"y"] {
            b.push(r, ());
        }
        b.push(&big(3), ());
        assert_eq!(seqs(&b), vec![2, 3, 4, 5]);
        assert_eq!(whole(&b.after(4, 100)), vec![(5, big(3))]);
        assert_eq!(b.kept_bytes(), 2 * (OUT_OF_LINE + 1) + 2);
        // Larger than its budget: kept alone, never lost unsaid.
        let mut small = ByteBacklog::new(4, 8, 4);
        small.push(b"0123456789", ());
        assert_eq!(whole(&small.after(0, 100)), vec![(1, b"0123456789".to_vec())]);
        small.push(b"ab", ());
        assert_eq!(small.after(0, 100).items.len(), 2);
    }
}
