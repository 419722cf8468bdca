//! Adaptive batching, as pure bookkeeping (no I/O, no clock).
//!
//! While fewer than `max_in_flight` batches are out, an item goes out at
//! once: lowest latency when idle. Otherwise items queue and go out
//! together when a batch completes (up to `cap`): under load, one round
//! trip serves many. Two batches in flight (the default) keep Redis busy
//! while the shard turns the other one around. A batch is bounded by its
//! item count and by its items' total weight (bytes, for cache values). The
//! queue is bounded; a full one refuses the item.

use std::collections::VecDeque;

use crate::metrics::metrics;

/// What an item adds to a batch's weight.
pub trait Weighted {
    fn weight(&self) -> usize;
}

#[derive(Debug)]
pub struct Batcher<T> {
    queue: VecDeque<T>,
    in_flight: usize,
    max_in_flight: usize,
    cap: usize,
    max_weight: usize,
    max_queued: usize,
}

impl<T: Weighted> Batcher<T> {
    pub fn new(cap: usize, max_weight: usize, max_in_flight: usize, max_queued: usize) -> Self {
        Batcher {
            queue: VecDeque::new(),
            in_flight: 0,
            max_in_flight: max_in_flight.max(1),
            cap: cap.max(1),
            max_weight,
            max_queued,
        }
    }

    /// Adds an item. `Ok(Some(batch))`: send it now. `Ok(None)`: queued
    /// behind the batch in flight. `Err(item)`: the queue is full.
    pub fn push(&mut self, item: T) -> Result<Option<Vec<T>>, T> {
        if self.queue.len() >= self.max_queued {
            return Err(item);
        }
        self.queue.push_back(item);
        metrics().shard_queued.inc();
        Ok(self.next())
    }

    /// A batch in flight is done; returns the next one to send, if any.
    pub fn complete(&mut self) -> Option<Vec<T>> {
        self.in_flight -= 1;
        self.next()
    }

    /// Removes everything queued (at shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        metrics().shard_queued.dec_by(self.queue.len() as i64);
        self.queue.drain(..)
    }

    fn next(&mut self) -> Option<Vec<T>> {
        if self.in_flight >= self.max_in_flight || self.queue.is_empty() {
            return None;
        }
        self.in_flight += 1;
        // At least one item, however heavy; then while under both bounds.
        let mut n = 1;
        let mut weight = self.queue[0].weight();
        while n < self.cap.min(self.queue.len()) {
            weight += self.queue[n].weight();
            if weight > self.max_weight {
                break;
            }
            n += 1;
        }
        metrics().shard_queued.dec_by(n as i64);
        Some(self.queue.drain(..n).collect())
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
    fn idle_sends_at_once_busy_accumulates_up_to_the_cap() {
        let mut b = Batcher::new(3, 100, 1, 10);
        assert_eq!(b.push(1), Ok(Some(vec![1])));
        for i in 2..=6 {
            assert_eq!(b.push(i), Ok(None));
        }
        assert_eq!(b.complete(), Some(vec![2, 3, 4]));
        assert_eq!(b.push(7), Ok(None));
        assert_eq!(b.complete(), Some(vec![5, 6, 7]));
        assert_eq!(b.complete(), None);
        assert_eq!(b.push(8), Ok(Some(vec![8])));
    }

    #[test]
    fn a_second_batch_goes_out_while_the_first_is_in_flight() {
        let mut b = Batcher::new(10, 100, 2, 100);
        assert_eq!(b.push(1), Ok(Some(vec![1])));
        assert_eq!(b.push(2), Ok(Some(vec![2])));
        assert_eq!(b.push(3), Ok(None));
        assert_eq!(b.push(4), Ok(None));
        assert_eq!(b.complete(), Some(vec![3, 4]));
        assert_eq!(b.complete(), None);
        assert_eq!(b.complete(), None);
        assert_eq!(b.push(5), Ok(Some(vec![5])));
    }

    #[test]
    fn heavy_items_split_batches_but_always_go() {
        let mut b = Batcher::new(10, 10, 1, 100);
        assert_eq!(b.push(50), Ok(Some(vec![50])));
        for i in [4, 5, 3, 7] {
            assert_eq!(b.push(i), Ok(None));
        }
        assert_eq!(b.complete(), Some(vec![4, 5]));
        assert_eq!(b.complete(), Some(vec![3, 7]));
    }

    #[test]
    fn a_full_queue_refuses_instead_of_growing() {
        let mut b = Batcher::new(2, 100, 1, 2);
        assert_eq!(b.push(1), Ok(Some(vec![1])));
        assert_eq!(b.push(2), Ok(None));
        assert_eq!(b.push(3), Ok(None));
        assert_eq!(b.push(4), Err(4));
        assert_eq!(b.drain().count(), 2);
    }
}
