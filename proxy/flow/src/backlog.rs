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
            self.items.pop_front();
            self.evicted += 1;
        }
        self.last += 1;
        self.items.push_back((self.last, make(self.last)));
        self.last
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
        let empty: Backlog<u8> = Backlog::new(0);
        assert_eq!(empty.after(0, 10).items, vec![]);
    }
}
