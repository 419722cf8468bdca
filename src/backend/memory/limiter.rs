//! The embedded backend: the same rules, decided in process.
//!
//! Used when no Redis is configured (one host), and as the `local` failure
//! mode when Redis is unreachable. Each shard actor owns one, so it needs
//! no lock. It is bounded: expired states are swept at most once a second,
//! and when it is full of live states an arbitrary one is forgotten (that
//! key is forgiven) rather than letting memory grow.
//!
//! A concurrency rule's leases live beside the states, by the same key
//! name: each lease with its expiry, dropped when it expires or is released.
//! A key holds at most its rule's `limit` of them (config bounds it).

use std::collections::HashMap;

use crate::limiter::algorithm::State;
use crate::limiter::{Lease, Policy, RuleKind, Verdict, decide, usage};

const SWEEP_EVERY_US: u64 = 1_000_000;

#[derive(Debug)]
pub struct MemoryLimiter {
    /// State key (the same name Redis would use) -> (state, expires at µs).
    states: HashMap<String, (State, u64)>,
    /// State key of a concurrency rule -> its leases and their expiry (µs).
    leases: HashMap<String, Vec<(Lease, u64)>>,
    max_entries: usize,
    next_sweep_us: u64,
}

impl MemoryLimiter {
    pub fn new(max_entries: usize) -> Self {
        MemoryLimiter {
            states: HashMap::new(),
            leases: HashMap::new(),
            max_entries: max_entries.max(1),
            next_sweep_us: 0,
        }
    }

    /// Decides one check; `keys` holds one state key per rule of `policy`.
    /// Allowed, it takes `lease` (if any) in every concurrency rule that
    /// allows (a shadow one that would deny takes nothing).
    pub fn check(
        &mut self,
        policy: &Policy,
        keys: &[String],
        now_us: u64,
        cost: u64,
        lease: Option<Lease>,
    ) -> Verdict {
        let states = self.states(policy, keys, now_us);
        let (verdict, writes) = decide(policy, &states, now_us, cost);
        let rules = policy.rules.iter().zip(keys);
        for ((rule, key), write) in rules.zip(writes.into_iter().flatten()) {
            let Some((state, exp)) = write else { continue };
            match (rule.kind, lease) {
                (RuleKind::Concurrency { lease_us, .. }, Some(lease)) => {
                    self.take(key, lease, now_us + lease_us, now_us)
                }
                (RuleKind::Concurrency { .. }, None) => {}
                _ => self.store(key, state, exp, now_us),
            }
        }
        verdict
    }

    /// Gives `lease` back in each of `keys` (a policy's concurrency rules):
    /// true if it was still outstanding in one of them.
    pub fn release(&mut self, keys: &[String], lease: Lease, now_us: u64) -> bool {
        let mut released = false;
        for key in keys {
            if let Some(held) = self.leases.get_mut(key) {
                if let Some(i) = held.iter().position(|(l, _)| *l == lease) {
                    released |= held.swap_remove(i).1 > now_us;
                }
                if held.is_empty() {
                    self.leases.remove(key);
                }
            }
        }
        released
    }

    /// A concurrency rule's state: its live leases, dropping expired ones.
    fn outstanding(&mut self, key: &str, now_us: u64) -> Option<State> {
        let held = self.leases.get_mut(key)?;
        held.retain(|&(_, exp)| exp > now_us);
        if held.is_empty() {
            self.leases.remove(key);
            return None;
        }
        let soonest = held.iter().map(|&(_, e)| e).min().unwrap_or(0);
        let latest = held.iter().map(|&(_, e)| e).max().unwrap_or(0);
        Some([held.len() as u64, soonest, latest])
    }

    fn take(&mut self, key: &str, lease: Lease, exp: u64, now_us: u64) {
        if let Some(held) = self.leases.get_mut(key) {
            held.push((lease, exp));
            return;
        }
        self.make_room(now_us);
        self.leases.insert(key.to_owned(), vec![(lease, exp)]);
    }

    /// Every rule's `(remaining, reset_ms)`, charging nothing (expired
    /// leases are dropped, as a check drops them).
    pub fn usage(&mut self, policy: &Policy, keys: &[String], now_us: u64) -> Vec<(u64, u64)> {
        let states = self.states(policy, keys, now_us);
        usage(policy, &states, now_us)
    }

    /// Each rule's state: a concurrency rule's from its live leases.
    fn states(&mut self, policy: &Policy, keys: &[String], now_us: u64) -> Vec<Option<State>> {
        (policy.rules.iter().zip(keys))
            .map(|(rule, k)| match rule.kind {
                RuleKind::Concurrency { .. } => self.outstanding(k, now_us),
                _ => match self.states.get(k) {
                    Some(&(s, exp)) if exp > now_us => Some(s),
                    _ => None,
                },
            })
            .collect()
    }

    /// Keys held: rule states and lease sets.
    pub fn len(&self) -> usize {
        self.states.len() + self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn store(&mut self, key: &str, state: State, exp: u64, now_us: u64) {
        if let Some(slot) = self.states.get_mut(key) {
            *slot = (state, exp);
            return;
        }
        self.make_room(now_us);
        self.states.insert(key.to_owned(), (state, exp));
    }

    /// Before a new key: sweeps when full, and if it is still full of live
    /// keys, forgets an arbitrary one (that key is forgiven).
    fn make_room(&mut self, now_us: u64) {
        if self.len() < self.max_entries {
            return;
        }
        if now_us >= self.next_sweep_us {
            self.sweep(now_us);
        }
        if self.len() >= self.max_entries {
            if let Some(v) = self.states.keys().next().cloned() {
                self.states.remove(&v);
            } else if let Some(v) = self.leases.keys().next().cloned() {
                self.leases.remove(&v);
            }
        }
    }

    /// Drops every expired state (rate limited to once a second).
    pub fn sweep(&mut self, now_us: u64) {
        self.states.retain(|_, (_, exp)| *exp > now_us);
        self.leases.retain(|_, held| {
            held.retain(|&(_, exp)| exp > now_us);
            !held.is_empty()
        });
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
            m.check(&p, &[format!("k{i}")], 5_000_000, 1, None);
        }
        assert_eq!(m.len(), 100);
        m.sweep(60_000_000);
        assert!(m.is_empty());
    }
}
