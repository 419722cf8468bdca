//! A shard's memory of keys that Redis just denied.
//!
//! When Redis denies a check and says "retry after T", nothing another
//! sidecar does can make that key pass sooner (others only consume), so
//! until T any check of at least the same cost is denied here, without a
//! round trip. A flood from one abusive key then costs Redis nothing.
//! Bounded: expired entries are dropped when it fills, then everything.
//! Only beside Redis: the memory backend decides in process anyway.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::limiter::{Check, Decision};

#[derive(Debug)]
pub struct OverLimit {
    /// By (tenant, policy, key).
    denials: HashMap<(String, Arc<str>, String), Denial>,
    max_entries: usize,
}

#[derive(Debug)]
struct Denial {
    decided_at: Instant,
    until: Instant,
    cost: u64,
    decision: Decision,
}

fn key_of(check: &Check) -> (String, Arc<str>, String) {
    (
        check.tenant.clone(),
        check.policy.name.clone(),
        check.key.clone(),
    )
}

impl OverLimit {
    pub fn new(max_entries: usize) -> Self {
        OverLimit {
            denials: HashMap::new(),
            max_entries,
        }
    }

    /// Remembers a denial from Redis; not one by a concurrency rule, which
    /// a release can end before its retry time.
    pub fn insert(&mut self, check: &Check, decision: &Decision, now: Instant) {
        if self.max_entries == 0
            || decision.allowed
            || decision.degraded
            || decision.retry_after_ms == 0
            || decision.ends_early(&check.policy)
        {
            return;
        }
        if self.denials.len() >= self.max_entries {
            self.denials.retain(|_, d| d.until > now);
            // A scan must free a quarter of the room, or the next insert
            // would scan again.
            if self.denials.len() > self.max_entries * 3 / 4 {
                self.denials.clear();
            }
        }
        self.denials.insert(
            key_of(check),
            Denial {
                decided_at: now,
                until: now + Duration::from_millis(decision.retry_after_ms),
                cost: check.cost.max(1),
                decision: decision.clone(),
            },
        );
    }

    /// The denial still standing for this check, with its times brought
    /// up to `now`.
    pub fn get(&mut self, check: &Check, now: Instant) -> Option<Decision> {
        if self.denials.is_empty() {
            return None;
        }
        let key = key_of(check);
        let d = self.denials.get(&key)?;
        if d.until <= now {
            self.denials.remove(&key);
            return None;
        }
        if check.cost.max(1) < d.cost {
            return None;
        }
        let elapsed = (now - d.decided_at).as_millis() as u64;
        let retry = (d.until - now).as_micros().div_ceil(1000) as u64;
        Some(Decision {
            retry_after_ms: retry,
            reset_ms: d.decision.reset_ms.saturating_sub(elapsed).max(retry),
            ..d.decision.clone()
        })
    }

    /// Forgets everything (the policies changed).
    pub fn clear(&mut self) {
        self.denials.clear();
    }

    /// Forgets a tenant's denials (its plan changed).
    pub fn forget(&mut self, tenant: &str) {
        self.denials.retain(|(t, _, _), _| t != tenant);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::limiter::Policy;

    fn check(tenant: &str, key: &str) -> Check {
        Check::new(
            Arc::new(Policy::one_per_second()),
            tenant.into(),
            key.into(),
            1,
        )
    }

    fn denied() -> Decision {
        Decision {
            allowed: false,
            limit: 1,
            remaining: 0,
            reset_ms: 500,
            retry_after_ms: 500,
            degraded: false,
            rule: "r".into(),
            kind: "fixed_window",
            window_ms: 1000,
            shadow_rule: None,
            lease: None,
        }
    }

    #[test]
    fn a_denial_stands_for_its_own_tenant_and_key_only() {
        let now = Instant::now();
        let mut o = OverLimit::new(10);
        o.insert(&check("a", "b:c"), &denied(), now);
        o.insert(&check("x", "k"), &denied(), now);
        assert!(o.get(&check("a", "b:c"), now).is_some());
        assert!(o.get(&check("a:b", "c"), now).is_none());
        o.forget("a");
        assert!(o.get(&check("a", "b:c"), now).is_none());
        assert!(o.get(&check("x", "k"), now).is_some(), "other tenants stay");
    }

    #[test]
    fn stays_bounded_without_rescanning_on_every_insert() {
        let now = Instant::now();
        let mut o = OverLimit::new(8);
        for i in 0..100 {
            o.insert(&check("t", &i.to_string()), &denied(), now);
            assert!(o.denials.len() <= 8);
        }
        let mut off = OverLimit::new(0); // the memory backend's
        off.insert(&check("t", "k"), &denied(), now);
        assert!(off.get(&check("t", "k"), now).is_none());
    }
}
