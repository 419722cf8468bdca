//! Rules and policies: what a limit is and how several rules make one
//! atomic decision, independent of where the state lives.
//!
//! [`algorithm`] holds the math of each rule kind (mirrored by
//! `lua/limiter.lua`); the backends in [`crate::backend`] keep the state.

pub mod algorithm;
pub mod lease;
pub mod usage;

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
    /// The kind's name, as configured and as replies carry it (`kind`). A
    /// fixed window of exactly one day is a daily quota: the same rule.
    pub fn name(&self) -> &'static str {
        match *self {
            RuleKind::TokenBucket { .. } => "token_bucket",
            RuleKind::FixedWindow {
                window_us: DAY_US, ..
            } => "daily_quota",
            RuleKind::FixedWindow { .. } => "fixed_window",
            RuleKind::SlidingWindow { .. } => "sliding_window",
            RuleKind::Concurrency { .. } => "concurrency",
        }
    }

    /// The rule's quota window in ms, as replies carry it (`window_ms`, the
    /// IETF `w`): a window's length, or a token bucket's time to refill
    /// from empty (capacity times its refill interval, rounded up); a
    /// concurrency rule has none (0): it limits leases at once, not a rate.
    pub fn window_ms(&self) -> u64 {
        match *self {
            RuleKind::TokenBucket {
                capacity,
                interval_us,
            } => ceil_ms(capacity * interval_us),
            RuleKind::FixedWindow { window_us, .. } | RuleKind::SlidingWindow { window_us, .. } => {
                window_us / 1000
            }
            RuleKind::Concurrency { .. } => 0,
        }
    }

    /// Every [`RuleKind::name`], for readers of replies.
    pub const NAMES: [&'static str; 5] = [
        "token_bucket",
        "fixed_window",
        "sliding_window",
        "daily_quota",
        "concurrency",
    ];

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
    /// Shadow: counts what it would deny, denies nothing (see [`decide`]).
    pub shadow: bool,
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
    /// Some rule is shadow (found once, so other policies decide as before).
    pub shadow: bool,
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
            shadow: rules.iter().any(|r| r.shadow),
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
            shadow: false,
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
        // A shadow rule's denial counts however the check was decided (the
        // `local` failure mode decides shadow rules too), as `stats` does.
        let shadow = (d.shadow_rule.as_ref()).and_then(|s| self.rule_index(s));
        if d.degraded {
            return Counted::Degraded { shadow };
        }
        if d.allowed {
            return Counted::Allowed {
                near_limit: d.remaining.saturating_mul(5) <= d.limit,
                tokens: if self.takes_tokens { cost } else { 0 },
                shadow,
            };
        }
        let rule = self.rule_index(&d.rule);
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

    fn rule_index(&self, name: &str) -> Option<usize> {
        self.rules.iter().position(|r| *r.name == *name)
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
    /// Allowed, but this shadow rule (index) would have denied.
    pub shadow: Option<usize>,
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
    /// The deciding rule's kind ([`RuleKind::name`]) and quota window
    /// ([`RuleKind::window_ms`]).
    pub kind: &'static str,
    pub window_ms: u64,
    /// The lease an allowed check of a policy with concurrency rules took.
    pub lease: Option<Lease>,
    /// Allowed, but this shadow rule would have denied (`shadow_denied`).
    pub shadow_rule: Option<Arc<str>>,
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
            kind: rule.kind.name(),
            window_ms: rule.kind.window_ms(),
            lease: None,
            shadow_rule: v.shadow.map(|s| policy.rules[s].name.clone()),
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
            kind: rule.kind.name(),
            window_ms: rule.kind.window_ms(),
            lease: None,
            shadow_rule: None,
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
    let best = pick(evals, 0..evals.len(), allowed).unwrap_or(0);
    verdict(&evals[best], allowed, best, None)
}

/// The deciding rule among `among` (indices into `evals`), as [`combine`]
/// chooses it; `None` if `among` is empty.
fn pick(evals: &[Eval], among: impl Iterator<Item = usize>, allowed: bool) -> Option<usize> {
    let mut best: Option<usize> = None;
    for i in among {
        let e = &evals[i];
        let better = best.is_none_or(|b| {
            let b = &evals[b];
            if allowed {
                e.remaining < b.remaining
            } else {
                !e.allowed && (b.allowed || e.retry_us > b.retry_us)
            }
        });
        if better {
            best = Some(i);
        }
    }
    best
}

fn verdict(e: &Eval, allowed: bool, rule: usize, shadow: Option<usize>) -> Verdict {
    Verdict {
        allowed,
        rule,
        remaining: e.remaining,
        reset_ms: ceil_ms(e.reset_us),
        retry_after_ms: if allowed { 0 } else { ceil_ms(e.retry_us) },
        shadow,
    }
}

/// A rule's state to store and its absolute expiry (µs).
pub type Write = (State, u64);

/// Decides a policy over its rules' states: the verdict, and when something
/// must be charged, per rule the state to store (with its absolute expiry),
/// or `None` for a rule that is not charged (a shadow rule that would deny;
/// for a concurrency rule, `Some` means: take the lease).
pub fn decide(
    policy: &Policy,
    states: &[Option<State>],
    now_us: u64,
    cost: u64,
) -> (Verdict, Option<Vec<Option<Write>>>) {
    let evals: Vec<Eval> = policy
        .rules
        .iter()
        .zip(states)
        .map(|(rule, state)| algorithm::eval(rule.kind, *state, now_us, cost))
        .collect();
    let verdict = if policy.shadow {
        shadow_verdict(policy, &evals)
    } else {
        combine(&evals)
    };
    // Allowed, only a shadow rule can have denied: it is not charged.
    let writes = (verdict.allowed && cost > 0).then(|| {
        (evals.iter())
            .map(|e| (e.allowed).then_some((e.next, e.expires_us + algorithm::EXPIRY_MARGIN_US)))
            .collect()
    });
    (verdict, writes)
}

/// A policy with shadow rules: only its enforcing rules can deny. When they
/// allow, the shadow rule that would have denied (the longest wait, as in
/// [`combine`]) is named, and the enforcing rules decide the numbers as if
/// the shadow ones were absent; when every rule is shadow, the one that
/// would have denied describes the answer.
fn shadow_verdict(policy: &Policy, evals: &[Eval]) -> Verdict {
    let rules = &policy.rules;
    let enforcing = || (0..evals.len()).filter(|&i| !rules[i].shadow);
    if !enforcing().all(|i| evals[i].allowed) {
        let best = pick(evals, enforcing(), false).unwrap_or(0);
        return verdict(&evals[best], false, best, None);
    }
    let denying = (0..evals.len()).filter(|&i| rules[i].shadow && !evals[i].allowed);
    let shadow = pick(evals, denying, false);
    let best = pick(evals, enforcing(), true)
        .or(shadow)
        .or_else(|| pick(evals, 0..evals.len(), true))
        .unwrap_or(0);
    verdict(&evals[best], true, best, shadow)
}

/// Every rule's `(remaining, reset_ms)` for a `usage` of `policy`, from
/// its rules' states: charges nothing.
pub fn usage(policy: &Policy, states: &[Option<State>], now_us: u64) -> Vec<(u64, u64)> {
    (policy.rules.iter().zip(states))
        .map(|(rule, state)| {
            let (remaining, reset_us) = algorithm::usage(rule.kind, *state, now_us);
            (remaining, ceil_ms(reset_us))
        })
        .collect()
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
    pub fn state_keys<'a>(
        &'a self,
        keys: &'a crate::keys::Keys,
    ) -> impl ExactSizeIterator<Item = String> + 'a {
        (self.policy.rules.iter()).map(move |r| {
            let mut name = String::with_capacity(64);
            self.write_state_key(keys, r, &mut name);
            name
        })
    }

    /// [`Check::state_keys`] appended to `out`, one after another, and
    /// where each ends to `ends`: for a caller that packs them in one buffer.
    pub fn write_state_keys(
        &self,
        keys: &crate::keys::Keys,
        out: &mut String,
        ends: &mut Vec<usize>,
    ) {
        for r in &self.policy.rules {
            self.write_state_key(keys, r, out);
            ends.push(out.len());
        }
    }

    /// A concurrency rule keeps its leases (a sorted set), others a string.
    fn write_state_key(&self, keys: &crate::keys::Keys, r: &Rule, out: &mut String) {
        let (t, p, k) = (&self.tenant, &self.policy.name, &self.key);
        match r.kind {
            RuleKind::Concurrency { .. } => keys.write_leases(out, t, p, &r.name, k),
            _ => keys.write_rule(out, t, p, &r.name, k),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_names_itself_and_its_quota_window() {
        let tb = |capacity, interval_us| RuleKind::TokenBucket {
            capacity,
            interval_us,
        };
        // 10 at 5/s refills in 2 s; 10 at 3/s (333333 µs each) in 3.33333 s.
        assert_eq!(
            (tb(10, 200_000).name(), tb(10, 200_000).window_ms()),
            ("token_bucket", 2000)
        );
        assert_eq!(tb(10, 333_333).window_ms(), 3334);
        let fw = RuleKind::FixedWindow {
            limit: 5,
            window_us: 60_000_000,
        };
        assert_eq!((fw.name(), fw.window_ms()), ("fixed_window", 60_000));
        let day = RuleKind::FixedWindow {
            limit: 5,
            window_us: DAY_US,
        };
        assert_eq!((day.name(), day.window_ms()), ("daily_quota", 86_400_000));
        let sw = RuleKind::SlidingWindow {
            limit: 5,
            window_us: 1_500_000,
        };
        assert_eq!((sw.name(), sw.window_ms()), ("sliding_window", 1500));
        let cc = RuleKind::Concurrency {
            limit: 5,
            lease_us: 30_000_000,
        };
        assert_eq!((cc.name(), cc.window_ms()), ("concurrency", 0));
        for k in [tb(1, 1), fw, day, sw, cc] {
            assert!(RuleKind::NAMES.contains(&k.name()));
        }
    }

    #[test]
    fn an_answer_counts_as_its_outcome_rule_and_tokens() {
        let rule = |name: &str, kind| Rule {
            name: name.into(),
            kind,
            shadow: false,
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
            kind: "token_bucket",
            window_ms: 0,
            lease: None,
            shadow_rule: None,
        };
        let allowed = |near_limit| Counted::Allowed {
            near_limit,
            tokens: 3,
            shadow: None,
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
            Counted::Degraded { shadow: None }
        );
        // A `local` decision of a shadow rule's denial counts it too.
        let shadowed = Decision {
            shadow_rule: Some("day".into()),
            ..answer(true, 5, "burst", true)
        };
        assert_eq!(
            p.counted(&shadowed, 3),
            Counted::Degraded { shadow: Some(1) }
        );
        let no_bucket = Policy::one_per_second();
        assert_eq!(
            no_bucket.counted(&answer(true, 9, "r", false), 1),
            Counted::Allowed {
                near_limit: false,
                tokens: 0,
                shadow: None,
            }
        );
    }
}
