//! The Redis backend: one pipelined round trip decides a whole batch.
//!
//! A batch becomes one `lua/check.lua` call per Redis Cluster slot group
//! (on a single Redis, where slots do not matter, the whole batch is one
//! call), all sent together. Every round trip has a deadline. A call that
//! Redis refused with NOSCRIPT (it restarted, failed over, or was flushed)
//! did not run, so it is sent once more as EVAL, which also reloads the
//! script; any other failure leaves the outcome unknown and is never
//! retried: those checks are answered by their policy's failure mode.

mod breaker;
mod conn;
pub mod script;

use std::sync::Arc;
use std::time::Duration;

use redis::{ErrorKind, RedisResult, ServerErrorKind, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use breaker::Breaker;
use conn::Conn;

use crate::clock::Clock;
use crate::config::RedisConfig;
use crate::job::{Job, Outcome};
use crate::keys::{self, Keys};
use crate::stats::Stats;

/// A handle on the Redis backend; clones share one connection and breaker.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    keys: Keys,
    breaker: Arc<Breaker>,
    timeout: Duration,
    probe_interval: Duration,
    clock: Clock,
    stats: Arc<Stats>,
    /// Stops the breaker's prober at shutdown.
    stop: CancellationToken,
}

impl RedisBackend {
    /// Prepares the connection without waiting for Redis to be up.
    pub fn new(
        cfg: &RedisConfig,
        clock: Clock,
        stats: Arc<Stats>,
        stop: CancellationToken,
    ) -> RedisResult<Self> {
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn: Conn::new(cfg)?,
                keys: Keys::new(&cfg.prefix),
                breaker: Arc::new(Breaker::new(cfg.breaker_failures, stats.clone())),
                timeout: Duration::from_millis(cfg.timeout_ms),
                probe_interval: Duration::from_millis(cfg.probe_interval_ms),
                clock,
                stats,
                stop,
            }),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The deadline of a round trip that starts now.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// True while the breaker is open: answer by failure mode, do not call.
    pub fn is_down(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Runs `jobs` in one round trip that ends by `deadline`. `None` for a
    /// job Redis could not run (answer it by failure mode).
    pub async fn run(&self, jobs: &[Job], deadline: Instant) -> Vec<Option<Outcome>> {
        let inner = &*self.inner;
        let mut out = vec![None; jobs.len()];
        if inner.breaker.is_open() {
            return out;
        }
        Stats::add(&inner.stats.counters.batches, 1);
        Stats::add(&inner.stats.counters.batched_checks, jobs.len() as u64);
        let groups = self.groups(jobs);
        let now = inner.clock.fixed_us();
        let started = std::time::Instant::now();
        let results =
            match tokio::time::timeout_at(deadline, self.round_trip(jobs, &groups, now)).await {
                Ok(results) => results,
                Err(_) => {
                    Stats::add(&inner.stats.counters.redis_timeouts, 1);
                    self.failed();
                    return out;
                }
            };
        Stats::add(
            &inner.stats.counters.round_trip_us,
            started.elapsed().as_micros() as u64,
        );
        let mut failed = false;
        for (group, result) in groups.iter().zip(results) {
            let parsed = result
                .ok()
                .and_then(|v| script::outcomes(v, group.iter().map(|&i| &jobs[i])));
            match parsed {
                Some(outcomes) => {
                    for (&i, o) in group.iter().zip(outcomes) {
                        out[i] = Some(o);
                    }
                }
                None => failed = true,
            }
        }
        if failed {
            self.failed();
        } else {
            inner.breaker.record_success();
        }
        out
    }

    /// Indices of `jobs` per script call: one per slot on a Cluster.
    fn groups(&self, jobs: &[Job]) -> Vec<Vec<usize>> {
        if !self.inner.conn.is_cluster() {
            return vec![(0..jobs.len()).collect()];
        }
        // Sorted by (slot, index): grouped by slot, in arrival order within one.
        let mut order: Vec<(u16, usize)> = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (keys::slot(j.tenant()), i))
            .collect();
        order.sort_unstable();
        order
            .chunk_by(|a, b| a.0 == b.0)
            .map(|g| g.iter().map(|&(_, i)| i).collect())
            .collect()
    }

    /// Sends one script call per group; calls refused with NOSCRIPT go
    /// once more as EVAL. One result per group.
    async fn round_trip(
        &self,
        jobs: &[Job],
        groups: &[Vec<usize>],
        now: Option<u64>,
    ) -> Vec<RedisResult<Value>> {
        let inner = &*self.inner;
        let call = |group: &Vec<usize>, by_source| {
            script::command(group.iter().map(|&i| &jobs[i]), &inner.keys, now, by_source)
        };
        Stats::add(&inner.stats.counters.script_calls, groups.len() as u64);
        let mut results = inner
            .conn
            .run(groups.iter().map(|g| call(g, false)).collect())
            .await;
        let noscript: Vec<usize> = (0..results.len())
            .filter(|&i| {
                matches!(&results[i], Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
            })
            .collect();
        if !noscript.is_empty() {
            Stats::add(&inner.stats.counters.script_reloads, 1);
            tracing::info!(
                calls = noscript.len(),
                "script not in Redis yet (first use, restart, failover or flush): loading"
            );
            let again = inner
                .conn
                .run(noscript.iter().map(|&i| call(&groups[i], true)).collect())
                .await;
            for (i, r) in noscript.into_iter().zip(again) {
                results[i] = r;
            }
        }
        for r in &results {
            if let Err(e) = r {
                tracing::debug!(error = %e, "Redis call failed");
            }
        }
        results
    }

    /// Counts a failed round trip; the one that opens the breaker starts
    /// the prober that will close it.
    fn failed(&self) {
        let inner = &*self.inner;
        Stats::add(&inner.stats.counters.redis_errors, 1);
        if inner.breaker.record_failure() {
            let this = self.clone();
            let breaker = inner.breaker.clone();
            tokio::spawn(breaker.probe_until_closed(
                inner.probe_interval,
                inner.stop.clone(),
                move || {
                    let this = this.clone();
                    async move { this.ping().await }
                },
            ));
        }
    }

    /// True if Redis answers a PING within the deadline.
    pub async fn ping(&self) -> bool {
        let ping = self.inner.conn.run(vec![redis::cmd("PING")]);
        matches!(
            tokio::time::timeout(self.inner.timeout, ping)
                .await
                .as_deref(),
            Ok([Ok(_)])
        )
    }
}
