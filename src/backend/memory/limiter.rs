//! The embedded backend: the same rules, decided in process.
//!
//! Used when no Redis is configured (one host), and as the `local` failure
//! mode when Redis is unreachable. Each shard actor owns one, so it needs
//! no lock. It is bounded: expired states are swept at most once a second,
//! and when it is full of live states an arbitrary one is forgotten (that
//! key is forgiven) rather than letting memory grow.

use std::collections::HashMap;

use crate::limiter::algorithm::State;
use crate::limiter::{Policy, Verdict, decide, usage};

const SWEEP_EVERY_US: u64 = 1_000_000;

#[derive(Debug)]
pub struct MemoryLimiter {
    /// State key (the same name Redis would use) -> (state, expires at µs).
    states: HashMap<String, (State, u64)>,
    max_entries: usize,
    next_sweep_us: u64,
}

impl MemoryLimiter {
    pub fn new(max_entries: usize) -> Self {
        MemoryLimiter {
            states: HashMap::new(),
            max_entries: max_entries.max(1),
            next_sweep_us: 0,
        }
    }

    /// Decides one check; `keys` holds one state key per rule of `policy`.
    pub fn check(&mut self, policy: &Policy, keys: &[String], now_us: u64, cost: u64) -> Verdict {
        let states = self.states(keys, now_us);
        let (verdict, writes) = decide(policy, &states, now_us, cost);
        for (key, (state, exp)) in keys.iter().zip(writes.into_iter().flatten()) {
            self.store(key, state, exp, now_us);
        }
        verdict
    }

    /// Every rule's `(remaining, reset_ms)`, charging nothing.
    pub fn usage(&self, policy: &Policy, keys: &[String], now_us: u64) -> Vec<(u64, u64)> {
        usage(policy, &self.states(keys, now_us), now_us)
    }

    fn states(&self, keys: &[String], now_us: u64) -> Vec<Option<State>> {
        keys.iter()
            .map(|k| match self.states.get(k) {
                Some(&(s, exp)) if exp > now_us => Some(s),
                _ => None,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    fn store(&mut self, key: &str, state: State, exp: u64, now_us: u64) {
        if let Some(slot) = self.states.get_mut(key) {
            *slot = (state, exp);
            return;
        }
        if self.states.len() >= self.max_entries {
            if now_us >= self.next_sweep_us {
                self.sweep(now_us);
            }
            if self.states.len() >= self.max_entries {
                let victim = self.states.keys().next().cloned();
                if let Some(v) = victim {
                    self.states.remove(&v);
                }
            }
        }
        self.states.insert(key.to_owned(), (state, exp));
    }

    /// Drops every expired state (rate limited to once a second).
    pub fn sweep(&mut self, now_us: u64) {
        self.states.retain(|_, (_, exp)| *exp > now_us);
        self.next_sweep_us = now_us + SWEEP_EVERY_US;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_bound_and_sweeps_expired_states() {
        let mut m = MemoryLimiter::new(100);
        let p = Policy::one_per_second();
        for i in 0..1000 {
            m.check(&p, &[format!("k{i}")], 5_000_000, 1);
        }
        assert_eq!(m.len(), 100);
        m.sweep(60_000_000);
        assert!(m.is_empty());
    }
}
