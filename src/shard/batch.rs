//! Adaptive batching, as pure bookkeeping (no I/O, no clock).
//!
//! Items queue; a batch goes out at a *flush*, which the shard schedules
//! (as a message to itself, behind those already in its mailbox) whenever
//! fewer than `max_in_flight` batches are out and something is queued.
//! So the requests that arrive together (one socket read brings many) go
//! out together, even when Redis is idle, and an idle shard still sends a
//! lone request after one mailbox hop. While the batches in flight are
//! out, items keep queueing and go out together (up to `cap`) once one
//! completes: under load, one round trip serves many. Two batches in
//! flight (the default) keep Redis busy while the shard turns the other
//! one around. A batch is bounded by its item count and by its items'
//! total weight (bytes, for cache values). The queue is bounded; a full
//! one refuses the item.

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
    /// A flush is scheduled and has not run yet.
    flush_due: bool,
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
            flush_due: false,
        }
    }

    /// Adds an item. `Ok(true)`: schedule a flush. `Ok(false)`: queued (a
    /// flush is due, or every batch slot is taken). `Err(item)`: the queue
    /// is full.
    pub fn push(&mut self, item: T) -> Result<bool, T> {
        if self.queue.len() >= self.max_queued {
            return Err(item);
        }
        self.queue.push_back(item);
        metrics().shard_queued.inc();
        Ok(self.flush_wanted())
    }

    /// A batch in flight is done; true: schedule a flush.
    pub fn complete(&mut self) -> bool {
        self.in_flight -= 1;
        self.flush_wanted()
    }

    /// The scheduled flush runs: the next batch to send, if a slot is
    /// free; call again until `None` (several slots may be free).
    pub fn flush(&mut self) -> Option<Vec<T>> {
        self.flush_due = false;
        self.next()
    }

    fn flush_wanted(&mut self) -> bool {
        let wanted =
            !self.flush_due && self.in_flight < self.max_in_flight && !self.queue.is_empty();
        self.flush_due |= wanted;
        wanted
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

    /// Pushes, then runs the flush if one was asked for: what the shard
    /// does when nothing else is in its mailbox.
    fn push_now(b: &mut Batcher<u32>, i: u32) -> Vec<Vec<u32>> {
        let mut sent = Vec::new();
        if b.push(i).unwrap() {
            while let Some(batch) = b.flush() {
                sent.push(batch);
            }
        }
        sent
    }

    #[test]
    fn idle_sends_after_one_flush_busy_accumulates_up_to_the_cap() {
        let mut b = Batcher::new(3, 100, 1, 10);
        assert_eq!(push_now(&mut b, 1), vec![vec![1]]);
        for i in 2..=6 {
            assert_eq!(b.push(i), Ok(false));
        }
        assert!(b.complete());
        assert_eq!(b.flush(), Some(vec![2, 3, 4]));
        assert_eq!(b.flush(), None);
        assert_eq!(b.push(7), Ok(false));
        assert!(b.complete());
        assert_eq!(b.flush(), Some(vec![5, 6, 7]));
        assert!(!b.complete());
        assert_eq!(push_now(&mut b, 8), vec![vec![8]]);
    }

    #[test]
    fn items_that_arrive_before_the_flush_go_together() {
        let mut b = Batcher::new(10, 100, 2, 100);
        assert_eq!(b.push(1), Ok(true));
        for i in 2..=5 {
            assert_eq!(b.push(i), Ok(false)); // one flush is due already
        }
        assert_eq!(b.flush(), Some(vec![1, 2, 3, 4, 5]));
        assert_eq!(b.flush(), None);
    }

    #[test]
    fn a_second_batch_goes_out_while_the_first_is_in_flight() {
        let mut b = Batcher::new(10, 100, 2, 100);
        assert_eq!(push_now(&mut b, 1), vec![vec![1]]);
        assert_eq!(push_now(&mut b, 2), vec![vec![2]]);
        assert_eq!(b.push(3), Ok(false));
        assert_eq!(b.push(4), Ok(false));
        assert!(b.complete());
        assert_eq!(b.flush(), Some(vec![3, 4]));
        assert!(!b.complete());
        assert!(!b.complete());
        assert_eq!(push_now(&mut b, 5), vec![vec![5]]);
    }

    #[test]
    fn one_flush_fills_every_free_slot() {
        let mut b = Batcher::new(2, 100, 2, 100);
        assert_eq!(b.push(1), Ok(true));
        for i in 2..=5 {
            assert_eq!(b.push(i), Ok(false));
        }
        assert_eq!(b.flush(), Some(vec![1, 2]));
        assert_eq!(b.flush(), Some(vec![3, 4]));
        assert_eq!(b.flush(), None); // both slots taken; 5 waits
        assert!(b.complete());
        assert_eq!(b.flush(), Some(vec![5]));
    }

    #[test]
    fn heavy_items_split_batches_but_always_go() {
        let mut b = Batcher::new(10, 10, 1, 100);
        assert_eq!(push_now(&mut b, 50), vec![vec![50]]);
        for i in [4, 5, 3, 7] {
            assert_eq!(b.push(i), Ok(false));
        }
        assert!(b.complete());
        assert_eq!(b.flush(), Some(vec![4, 5]));
        assert!(b.complete());
        assert_eq!(b.flush(), Some(vec![3, 7]));
    }

    #[test]
    fn a_full_queue_refuses_instead_of_growing() {
        let mut b = Batcher::new(2, 100, 1, 2);
        assert_eq!(b.push(1), Ok(true));
        assert_eq!(b.push(2), Ok(false));
        assert_eq!(b.push(3), Err(3));
        assert_eq!(b.drain().count(), 2);
    }
}
