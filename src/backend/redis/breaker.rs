//! A circuit breaker in front of Redis.
//!
//! Closed: every round trip goes to Redis. After `threshold` consecutive
//! failed round trips it opens: shards answer by their policy's failure
//! mode at once instead of waiting out a deadline per batch, and one
//! background prober pings Redis every `probe_interval` until it answers,
//! which closes the breaker again. Lock-free: shards only read an atomic.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

#[derive(Debug)]
pub struct Breaker {
    open: AtomicBool,
    failures: AtomicU32,
    threshold: u32,
    stats: Arc<Stats>,
    /// While open: when it opened, and the `degraded` count then (the
    /// outage's log line at its end says how long and how many).
    outage: Mutex<Option<(Instant, u64)>>,
}

impl Breaker {
    pub fn new(threshold: u32, stats: Arc<Stats>) -> Self {
        Breaker {
            open: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            threshold,
            stats,
            outage: Mutex::new(None),
        }
    }

    /// True while Redis is considered down.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failed round trip; returns true if this one opened the
    /// breaker (the caller then starts the prober).
    pub fn record_failure(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold && !self.open.swap(true, Ordering::AcqRel) {
            self.stats
                .counters
                .breaker_trips
                .fetch_add(1, Ordering::Relaxed);
            self.stats.counters.breaker_open.store(1, Ordering::Relaxed);
            let degraded = self.stats.counters.degraded.load(Ordering::Relaxed);
            *self.outage.lock().unwrap() = Some((Instant::now(), degraded));
            return true;
        }
        false
    }

    fn close(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.open.store(false, Ordering::Release);
        self.stats.counters.breaker_open.store(0, Ordering::Relaxed);
        let (since, degraded_before) = self
            .outage
            .lock()
            .unwrap()
            .take()
            .unwrap_or((Instant::now(), 0));
        let degraded = self.stats.counters.degraded.load(Ordering::Relaxed) - degraded_before;
        let outage_ms = since.elapsed().as_millis() as u64;
        tracing::info!(
            outage_ms,
            degraded,
            "Redis answers again: circuit breaker closed after {outage_ms} ms, {degraded} answers degraded meanwhile"
        );
    }

    /// Probes with `probe` every `interval` until it succeeds (then closes
    /// the breaker) or `stop` is cancelled.
    pub async fn probe_until_closed<F, Fut>(
        self: Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
        mut probe: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if probe().await {
                self.close();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_closes_when_a_probe_succeeds() {
        let b = Arc::new(Breaker::new(3, Arc::default()));
        assert!(!b.record_failure() && !b.record_failure());
        b.record_success();
        assert!(!b.record_failure() && !b.record_failure());
        assert!(b.record_failure());
        assert!(b.is_open());
        assert!(
            !b.record_failure(),
            "only the opening failure starts a prober"
        );
        let mut tries = 0;
        b.clone()
            .probe_until_closed(Duration::from_millis(100), CancellationToken::new(), || {
                tries += 1;
                let ok = tries == 3;
                async move { ok }
            })
            .await;
        assert_eq!(tries, 3);
        assert!(!b.is_open());
    }
}
