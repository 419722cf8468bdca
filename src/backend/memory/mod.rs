//! The embedded backend: the same rules and the same response cache,
//! decided in process, with state named by the same [`Keys`] as in Redis.
//!
//! Used when no Redis is configured (one host), and (its limiter) as the
//! `local` failure mode while Redis is unreachable. Each shard owns one, so
//! it needs no lock, and a job runs at once, inside the shard.

mod cache;
mod limiter;

pub use cache::MemoryCache;
pub use limiter::MemoryLimiter;

use super::{Job, Outcome};
use crate::clock::Clock;
use crate::keys::Keys;
use crate::limiter::{Check, Release, Verdict};

pub struct MemoryBackend {
    limiter: MemoryLimiter,
    cache: MemoryCache,
    keys: Keys,
    clock: Clock,
}

impl MemoryBackend {
    /// Bounded by `max_states` limiter states and `cache_bytes` of cache.
    pub fn new(keys: Keys, clock: Clock, max_states: usize, cache_bytes: usize) -> Self {
        MemoryBackend {
            limiter: MemoryLimiter::new(max_states),
            cache: MemoryCache::new(keys.clone(), cache_bytes),
            keys,
            clock,
        }
    }

    /// Runs one job now.
    pub fn run(&mut self, job: &Job) -> Outcome {
        let now_ms = self.clock.now_us() / 1000;
        match job {
            Job::Check(c) => Outcome::Decided(self.limit(c)),
            Job::Get { args, poll } => Outcome::Looked(self.cache.get(args, *poll, now_ms)),
            Job::Set(s) => {
                self.cache.set(s, now_ms);
                Outcome::Stored
            }
            Job::Del(d) => Outcome::Deleted(self.cache.del(d, now_ms)),
            Job::CheckGet(c, g) => {
                let v = self.limit(c);
                let l = v.allowed.then(|| self.cache.get(g, false, now_ms));
                Outcome::CheckLooked(v, l)
            }
            Job::Release(r) => Outcome::Released(self.release(r)),
            Job::Usage(c) => {
                let keys: Vec<String> = c.state_keys(&self.keys).collect();
                Outcome::Usage(self.limiter.usage(&c.policy, &keys, self.clock.now_us()))
            }
        }
    }

    /// Decides one check.
    pub fn limit(&mut self, c: &Check) -> Verdict {
        let keys: Vec<String> = c.state_keys(&self.keys).collect();
        self.limiter
            .check(&c.policy, &keys, self.clock.now_us(), c.cost, c.lease)
    }

    /// Gives a lease back: true if it was still outstanding.
    pub fn release(&mut self, r: &Release) -> bool {
        let keys = r.lease_keys(&self.keys);
        self.limiter.release(&keys, r.lease, self.clock.now_us())
    }
}
