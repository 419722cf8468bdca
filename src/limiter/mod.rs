//! Rules and policies: what a limit is and how several rules make one
//! atomic decision, independent of where the state lives.
//!
//! [`algorithm`] holds the math of each rule kind (mirrored by
//! `lua/limiter.lua`); the backends in [`crate::backend`] keep the state.

pub mod algorithm;
pub mod lease;

use std::sync::Arc;

use crate::error::Error;
use crate::metrics::{Counted, PolicyMetrics};
use algorithm::{Eval, State, ceil_ms};
pub use lease::{Lease, Release};

/// Microseconds in one UTC day: a daily quota is a fixed window of one day,
/// and Unix time puts every day's window edge at 00:00 UTC.
pub const DAY_US: u64 = 86_400_000_000;

/// A rule's algorithm and its parameters, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// GCRA token bucket: `capacity` units, one more every `interval_us`.
    TokenBucket { capacity: u64, interval_us: u64 },
    /// At most `limit` units per aligned window (`daily_quota` is one with
    /// a window of [`DAY_US`]).
    FixedWindow { limit: u64, window_us: u64 },
    /// At most `limit` units in any window of `window_us`, estimated from
    /// two aligned windows (O(1) memory).
    SlidingWindow { limit: u64, window_us: u64 },
    /// At most `limit` leases outstanding at once; a lease that is never
    /// released frees its slot `lease_us` after it was taken.
    Concurrency { limit: u64, lease_us: u64 },
}

impl RuleKind {
    /// The most units this rule can ever allow at once.
    pub fn limit(&self) -> u64 {
        match *self {
            RuleKind::TokenBucket { capacity, .. } => capacity,
            RuleKind::FixedWindow { limit, .. }
            | RuleKind::SlidingWindow { limit, .. }
            | RuleKind::Concurrency { limit, .. } => limit,
        }
    }

    /// Whether a cost can be too large for this rule: a concurrency rule
    /// takes one slot per allowed check, whatever its cost.
    fn counts_cost(&self) -> bool {
        !matches!(self, RuleKind::Concurrency { .. })
    }
}

/// A named rule of a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: Arc<str>,
    pub kind: RuleKind,
}

/// What to answer when Redis cannot decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Allow, marked degraded.
    #[default]
    Open,
    /// Deny, marked degraded, with a retry hint.
    Closed,
    /// Decide with the in-process limiter, marked degraded.
    Local,
}

impl FailureMode {
    /// As configured, and as the `failure_mode` metric label.
    pub const fn name(self) -> &'static str {
        match self {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
            FailureMode::Local => "local",
        }
    }
}

/// A list of rules decided together: if any denies, none is charged.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: Arc<str>,
    pub rules: Vec<Rule>,
    pub failure_mode: FailureMode,
    /// `retry_after_ms` of a `closed` failure answer.
    pub closed_retry_after_ms: u64,
    /// Its counters, looked up once here rather than per check.
    pub metrics: PolicyMetrics,
    /// It has a token bucket, so its allowed checks take tokens (found
    /// once here rather than per check).
    takes_tokens: bool,
    /// It has a concurrency rule, so its allowed checks take a lease.
    leases: bool,
}

impl Policy {
    pub fn new(
        name: &str,
        rules: Vec<Rule>,
        failure_mode: FailureMode,
        closed_retry_after_ms: u64,
    ) -> Policy {
        Policy {
            metrics: PolicyMetrics::new(name, rules.iter().map(|r| &*r.name), failure_mode.name()),
            takes_tokens: (rules.iter()).any(|r| matches!(r.kind, RuleKind::TokenBucket { .. })),
            leases: (rules.iter()).any(|r| matches!(r.kind, RuleKind::Concurrency { .. })),
            name: name.into(),
            rules,
            failure_mode,
            closed_retry_after_ms,
        }
    }

    /// A policy `p` of one rule `r`: one unit per fixed second.
    #[cfg(test)]
    pub fn one_per_second() -> Policy {
        let rules = vec![Rule {
            name: "r".into(),
            kind: RuleKind::FixedWindow {
                limit: 1,
                window_us: 1_000_000,
            },
        }];
        Policy::new("p", rules, FailureMode::Open, 1000)
    }

    /// Whether its allowed checks take a lease (it has a concurrency rule).
    pub fn has_leases(&self) -> bool {
        self.leases
    }

    /// Counts one answer `d` to a check of `cost` in the policy's metrics.
    pub fn count(&self, d: &Decision, cost: u64) {
        self.metrics.count(self.counted(d, cost));
    }

    fn counted(&self, d: &Decision, cost: u64) -> Counted {
        if d.degraded {
            return Counted::Degraded;
        }
        if d.allowed {
            return Counted::Allowed {
                near_limit: d.remaining.saturating_mul(5) <= d.limit,
                tokens: if self.takes_tokens { cost } else { 0 },
            };
        }
        let rule = self.rules.iter().position(|r| r.name == d.rule);
        Counted::Denied {
            rule,
            // `daily_quota` compiles to a day-long fixed window.
            daily: rule.is_some_and(|i| {
                matches!(
                    self.rules[i].kind,
                    RuleKind::FixedWindow {
                        window_us: DAY_US,
                        ..
                    }
                )
            }),
        }
    }

    /// Refuses a cost that some rule could never allow.
    pub fn check_cost(&self, cost: u64) -> Result<(), Error> {
        let too_small = |r: &&Rule| r.kind.counts_cost() && cost > r.kind.limit();
        match self.rules.iter().find(too_small) {
            Some(r) => Err(Error::bad_request(format!(
                "cost {cost} exceeds rule `{}` of policy `{}`, which allows at most {}",
                r.name,
                self.name,
                r.kind.limit()
            ))),
            None => Ok(()),
        }
    }
}

/// A backend's answer for one check: which rule decided and its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Index of the deciding rule in the policy.
    pub rule: usize,
    pub remaining: u64,
    pub reset_ms: u64,
    pub retry_after_ms: u64,
}

/// The answer to a `check`, as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    pub retry_after_ms: u64,
    pub degraded: bool,
    pub rule: Arc<str>,
    /// The lease an allowed check of a policy with concurrency rules took.
    pub lease: Option<Lease>,
}

impl Decision {
    pub fn from_verdict(policy: &Policy, v: Verdict, degraded: bool) -> Self {
        let rule = &policy.rules[v.rule];
        Decision {
            allowed: v.allowed,
            limit: rule.kind.limit(),
            remaining: v.remaining,
            reset_ms: v.reset_ms,
            retry_after_ms: v.retry_after_ms,
            degraded,
            rule: rule.name.clone(),
            lease: None,
        }
    }

    /// The answer of the `open` or `closed` failure modes: no state known.
    /// An `open` allow takes no lease: nothing counted it, so there is
    /// nothing to give back.
    pub fn failed(policy: &Policy) -> Self {
        let allowed = policy.failure_mode != FailureMode::Closed;
        let rule = &policy.rules[0];
        Decision {
            allowed,
            limit: rule.kind.limit(),
            remaining: if allowed { rule.kind.limit() } else { 0 },
            reset_ms: 0,
            retry_after_ms: if allowed {
                0
            } else {
                policy.closed_retry_after_ms
            },
            degraded: true,
            rule: rule.name.clone(),
            lease: None,
        }
    }

    /// Whether a denial can end sooner than its `retry_after_ms`: one by a
    /// concurrency rule ends as soon as a holder releases its lease.
    pub fn ends_early(&self, policy: &Policy) -> bool {
        (policy.rules.iter())
            .any(|r| r.name == self.rule && matches!(r.kind, RuleKind::Concurrency { .. }))
    }
}

/// Combines the rules' evaluations into one verdict. Allowed: the rule with
/// the fewest units left decides. Denied: the rule that needs the longest
/// wait decides, so its `retry_after` is enough for every rule (time only
/// ever frees capacity). Ties go to the earlier rule.
pub fn combine(evals: &[Eval]) -> Verdict {
    let allowed = evals.iter().all(|e| e.allowed);
    let mut best = 0;
    for (i, e) in evals.iter().enumerate().skip(1) {
        let better = if allowed {
            e.remaining < evals[best].remaining
        } else {
            !e.allowed && (evals[best].allowed || e.retry_us > evals[best].retry_us)
        };
        if better {
            best = i;
        }
    }
    let e = &evals[best];
    Verdict {
        allowed,
        rule: best,
        remaining: e.remaining,
        reset_ms: ceil_ms(e.reset_us),
        retry_after_ms: ceil_ms(e.retry_us),
    }
}

/// Decides a policy over its rules' states: the verdict, and the states to
/// store (with their absolute expiry) when something must be charged.
pub fn decide(
    policy: &Policy,
    states: &[Option<State>],
    now_us: u64,
    cost: u64,
) -> (Verdict, Option<Vec<(State, u64)>>) {
    let evals: Vec<Eval> = policy
        .rules
        .iter()
        .zip(states)
        .map(|(rule, state)| algorithm::eval(rule.kind, *state, now_us, cost))
        .collect();
    let verdict = combine(&evals);
    let writes = (verdict.allowed && cost > 0).then(|| {
        evals
            .iter()
            .map(|e| (e.next, e.expires_us + algorithm::EXPIRY_MARGIN_US))
            .collect()
    });
    (verdict, writes)
}

/// One check, as a shard hands it to a backend.
#[derive(Debug, Clone)]
pub struct Check {
    pub policy: Arc<Policy>,
    pub tenant: String,
    pub key: String,
    pub cost: u64,
    /// The lease this check takes if it is allowed: minted when its policy
    /// has concurrency rules and the cost is not 0 (a peek takes none).
    pub lease: Option<Lease>,
}

impl Check {
    pub fn new(policy: Arc<Policy>, tenant: String, key: String, cost: u64) -> Check {
        let lease = (policy.has_leases() && cost > 0).then(Lease::mint);
        Check {
            policy,
            tenant,
            key,
            cost,
            lease,
        }
    }

    /// The answer for a backend's verdict on this check: an allowed one
    /// carries the check's lease.
    pub fn decision(&self, v: Verdict, degraded: bool) -> Decision {
        let mut d = Decision::from_verdict(&self.policy, v, degraded);
        d.lease = self.lease.filter(|_| v.allowed);
        d
    }

    /// The state key of each rule of the policy, in rule order.
    pub fn state_keys(&self, keys: &crate::keys::Keys) -> Vec<String> {
        let (t, p, k) = (&self.tenant, &self.policy.name, &self.key);
        (self.policy.rules.iter())
            .map(|r| match r.kind {
                RuleKind::Concurrency { .. } => keys.leases(t, p, &r.name, k),
                _ => keys.rule(t, p, &r.name, k),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_counts_as_its_outcome_rule_and_tokens() {
        let rule = |name: &str, kind| Rule {
            name: name.into(),
            kind,
        };
        let p = Policy::new(
            "counted",
            vec![
                rule(
                    "burst",
                    RuleKind::TokenBucket {
                        capacity: 10,
                        interval_us: 1000,
                    },
                ),
                rule(
                    "day",
                    RuleKind::FixedWindow {
                        limit: 10,
                        window_us: DAY_US,
                    },
                ),
            ],
            FailureMode::Closed,
            1000,
        );
        let answer = |allowed, remaining, rule: &str, degraded| Decision {
            allowed,
            limit: 10,
            remaining,
            reset_ms: 0,
            retry_after_ms: 0,
            degraded,
            rule: rule.into(),
            lease: None,
        };
        let allowed = |near_limit| Counted::Allowed {
            near_limit,
            tokens: 3,
        };
        assert_eq!(
            p.counted(&answer(true, 3, "burst", false), 3),
            allowed(false)
        );
        assert_eq!(
            p.counted(&answer(true, 2, "burst", false), 3),
            allowed(true)
        );
        assert_eq!(
            p.counted(&answer(false, 0, "burst", false), 3),
            Counted::Denied {
                rule: Some(0),
                daily: false
            }
        );
        assert_eq!(
            p.counted(&answer(false, 0, "day", false), 3),
            Counted::Denied {
                rule: Some(1),
                daily: true
            }
        );
        assert_eq!(
            p.counted(&answer(false, 0, "day", true), 3),
            Counted::Degraded
        );
        let no_bucket = Policy::one_per_second();
        assert_eq!(
            no_bucket.counted(&answer(true, 9, "r", false), 1),
            Counted::Allowed {
                near_limit: false,
                tokens: 0
            }
        );
    }
}
