//! Counters for `stats`: plain atomics, bumped where things happen.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crate::error::Error;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Every counter `stats` reports, under the same names.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Connections open now.
    connections_open,
    /// Connections accepted since start.
    connections_total,
    /// Connections refused at `max_connections`.
    connections_refused,
    requests_hello,
    requests_check,
    requests_check_get,
    requests_cache_get,
    requests_cache_set,
    requests_cache_del,
    requests_release,
    requests_usage,
    requests_stats,
    /// Admin ops (`tenant_*`), allowed or not.
    requests_admin,
    /// `forbidden` answers by reason: a peer no `[[access]]` rule admits
    /// (at connect, or at its next request after a reload), a tenant its
    /// rules do not grant, an admin op it may not use.
    forbidden_connect,
    forbidden_tenant,
    forbidden_admin,
    /// `check` answers that allowed / denied.
    allowed,
    denied,
    /// `check` answers allowed although a shadow rule would have denied.
    shadow_denied,
    /// Answers given by failure mode because Redis could not decide.
    degraded,
    /// Denials answered from a shard's over-limit cache, without Redis.
    denied_locally,
    /// Cache reads: fresh hits, stale hits, misses.
    cache_hits,
    cache_stale_hits,
    cache_misses,
    /// Misses told to fill (`fill: true`), and callers that waited for a
    /// fill / gave up waiting at their deadline / were let go because
    /// nobody fills the entry any more.
    cache_fills,
    cache_fill_waits,
    cache_fill_timeouts,
    cache_fill_abandoned,
    /// The near cache (`[cache] near_max_bytes`): `cache_get`s answered
    /// from it / not; entries Redis said changed (key names heard on the
    /// tracking connection); times it was emptied whole (tracking lost,
    /// Redis flushed, a sync with tracking failed). Gauges: bytes and
    /// entries held now.
    near_hits,
    near_misses,
    near_invalidations,
    near_flushes,
    near_bytes,
    near_entries,
    /// Entries stored, and entries deleted by `cache_del`.
    cache_sets,
    cache_deleted,
    /// Tenant quotas: found in a shard's local level (fresh / past its TTL
    /// because the source is down), in the Redis level, or not there.
    quota_local_hits,
    quota_local_stale,
    quota_local_misses,
    quota_redis_hits,
    quota_redis_misses,
    /// Lookups at the source of truth, and those that failed.
    quota_source_lookups,
    quota_source_errors,
    /// Tenants put on the `default` plan: unknown to the source, or with a
    /// record that does not compile (an unknown plan, a bad override).
    quota_default_plan,
    quota_bad_records,
    /// Redis round trips, and the checks they carried.
    batches,
    batched_checks,
    /// Microseconds spent in Redis round trips, summed (÷ batches = mean).
    round_trip_us,
    /// Script calls (one per Redis Cluster slot group of a batch).
    script_calls,
    /// Round trips that failed or passed their deadline.
    redis_errors,
    redis_timeouts,
    /// Script reloads after NOSCRIPT (Redis restarted or flushed).
    script_reloads,
    breaker_trips,
    /// 1 while the circuit breaker is open.
    breaker_open,
    errors_bad_request,
    errors_unknown_op,
    errors_unknown_policy,
    errors_too_large,
    errors_overloaded,
    errors_forbidden,
    errors_shutting_down,
    errors_unavailable,
    errors_internal,
}

#[derive(Debug)]
pub struct Stats {
    started: Instant,
    pub counters: Counters,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            counters: Counters::default(),
        }
    }
}

impl Stats {
    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Counts an error reply under its wire code.
    pub fn error(&self, e: &Error) {
        let c = &self.counters;
        let counter = match e {
            Error::BadRequest(_) => &c.errors_bad_request,
            Error::UnknownOp(_) => &c.errors_unknown_op,
            Error::UnknownPolicy(_) => &c.errors_unknown_policy,
            Error::TooLarge(_) => &c.errors_too_large,
            Error::Overloaded(_) => &c.errors_overloaded,
            Error::Forbidden(_) => &c.errors_forbidden,
            Error::ShuttingDown => &c.errors_shutting_down,
            Error::Unavailable(_) => &c.errors_unavailable,
            Error::Internal(_) => &c.errors_internal,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// The counters `stats` reports, with the gauges read at the moment:
    /// `tasks`, the tokio tasks alive in the runtime (connections, shards,
    /// timers), so a task leak shows as a count that keeps rising.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut counters = self.counters.snapshot();
        counters.push(("tasks", alive_tasks()));
        counters
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Tokio tasks alive in the runtime this runs on; 0 outside one (a unit
/// test), where there are none to count.
pub fn alive_tasks() -> u64 {
    tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_alive_tasks() as u64)
        .unwrap_or(0)
}
