//! A shard's memory of keys that Redis just denied.
//!
//! When Redis denies a check and says "retry after T", nothing another
//! sidecar does can make that key pass sooner (others only consume), so
//! until T any check of at least the same cost is denied here, without a
//! round trip. A flood from one abusive key then costs Redis nothing.
//! Bounded: expired entries are dropped when it fills, then everything.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::limiter::{Check, Decision};

#[derive(Debug)]
pub struct OverLimit {
    denials: HashMap<String, Denial>,
    max_entries: usize,
}

#[derive(Debug)]
struct Denial {
    decided_at: Instant,
    until: Instant,
    cost: u64,
    decision: Decision,
}

fn key_of(check: &Check) -> String {
    let mut k =
        String::with_capacity(check.policy.name.len() + check.tenant.len() + check.key.len() + 2);
    k.push_str(&check.policy.name);
    k.push('\0');
    k.push_str(&check.tenant);
    k.push('\0');
    k.push_str(&check.key);
    k
}

impl OverLimit {
    pub fn new(max_entries: usize) -> Self {
        OverLimit {
            denials: HashMap::new(),
            max_entries,
        }
    }

    /// Remembers a denial from Redis.
    pub fn insert(&mut self, check: &Check, decision: &Decision, now: Instant) {
        if decision.allowed || decision.degraded || decision.retry_after_ms == 0 {
            return;
        }
        if self.denials.len() >= self.max_entries {
            self.denials.retain(|_, d| d.until > now);
            if self.denials.len() >= self.max_entries {
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
}
