//! Rules and policies: what a limit is and how several rules make one
//! atomic decision, independent of where the state lives.
//!
//! [`algorithm`] holds the math of each rule kind (mirrored by
//! `lua/limiter.lua`); the backends in [`crate::backend`] keep the state.

pub mod algorithm;

use std::sync::Arc;

use crate::error::Error;
use crate::metrics::{Counted, PolicyMetrics};
use algorithm::{Eval, State, ceil_ms};

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
}

impl RuleKind {
    /// The most units this rule can ever allow at once.
    pub fn limit(&self) -> u64 {
        match *self {
            RuleKind::TokenBucket { capacity, .. } => capacity,
            RuleKind::FixedWindow { limit, .. } | RuleKind::SlidingWindow { limit, .. } => limit,
        }
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
        match self.rules.iter().find(|r| cost > r.kind.limit()) {
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
        }
    }

    /// The answer of the `open` or `closed` failure modes: no state known.
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
        }
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
}

impl Check {
    /// The state key of each rule of the policy, in rule order.
    pub fn state_keys(&self, keys: &crate::keys::Keys) -> Vec<String> {
        self.policy
            .rules
            .iter()
            .map(|r| keys.rule(&self.tenant, &self.policy.name, &r.name, &self.key))
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
