//! Batching, as pure bookkeeping (no I/O, no clock): a shard's queue of
//! jobs waiting for Redis, taken out in batches bounded by count and by
//! weight (bytes, for cache values). The queue is bounded; a full one
//! refuses the item.
//!
//! When a batch goes is the shard's business: at once while fewer than
//! `[redis] max_in_flight` round trips are out (across all shards), else
//! as soon as one comes back, taking everything queued meanwhile. Under
//! load, one round trip serves many requests.

use std::collections::VecDeque;

/// What an item adds to a batch's weight.
pub trait Weighted {
    fn weight(&self) -> usize;
}

#[derive(Debug)]
pub struct Batcher<T> {
    queue: VecDeque<T>,
    cap: usize,
    max_weight: usize,
    max_queued: usize,
}

impl<T: Weighted> Batcher<T> {
    pub fn new(cap: usize, max_weight: usize, max_queued: usize) -> Self {
        Batcher {
            queue: VecDeque::new(),
            cap: cap.max(1),
            max_weight,
            max_queued,
        }
    }

    /// Queues an item, or gives it back if the queue is full.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.queue.len() >= self.max_queued {
            return Err(item);
        }
        self.queue.push_back(item);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The next batch, oldest first: at least one item, however heavy,
    /// then more while under both bounds.
    pub fn take(&mut self) -> Option<Vec<T>> {
        let first = self.queue.front()?;
        let mut n = 1;
        let mut weight = first.weight();
        while n < self.cap.min(self.queue.len()) {
            weight += self.queue[n].weight();
            if weight > self.max_weight {
                break;
            }
            n += 1;
        }
        Some(self.queue.drain(..n).collect())
    }

    /// Removes everything queued (at shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.queue.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weighted for u32 {
        fn weight(&self) -> usize {
            *self as usize
        }
    }

    #[test]
    fn batches_take_the_oldest_up_to_the_cap() {
        let mut b = Batcher::new(3, 100, 10);
        assert_eq!(b.take(), None);
        for i in 1..=5 {
            b.push(i).unwrap();
        }
        assert_eq!(b.take(), Some(vec![1, 2, 3]));
        assert_eq!(b.take(), Some(vec![4, 5]));
        assert!(b.is_empty());
    }

    #[test]
    fn heavy_items_split_batches_but_always_go() {
        let mut b = Batcher::new(10, 10, 100);
        for i in [50, 4, 5, 3, 7] {
            b.push(i).unwrap();
        }
        assert_eq!(b.take(), Some(vec![50]));
        assert_eq!(b.take(), Some(vec![4, 5]));
        assert_eq!(b.take(), Some(vec![3, 7]));
    }

    #[test]
    fn a_full_queue_refuses_instead_of_growing() {
        let mut b = Batcher::new(2, 100, 2);
        b.push(1).unwrap();
        b.push(2).unwrap();
        assert_eq!(b.push(3), Err(3));
        assert_eq!(b.drain().count(), 2);
    }
}
