//! The `usage` op's answer: every rule of a policy, as it stands for one
//! key, without charging anything.
//!
//! A backend reports each rule's `(remaining, reset_ms)` (computed by
//! [`super::algorithm::usage`], or its Lua mirror); the rest of a line
//! follows from the rule itself. A new rule kind needs its arm in
//! `algorithm::usage` (and `lua/limiter.lua`'s `usage`), nothing here.

use std::sync::Arc;

use super::Policy;

/// One rule's line of a `usage` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleUsage {
    pub rule: Arc<str>,
    pub kind: &'static str,
    pub limit: u64,
    /// `limit - remaining`.
    pub used: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    pub window_ms: u64,
}

/// The lines of `policy`'s rules from a backend's `(remaining, reset_ms)`
/// per rule, in rule order; `None` if the count does not match.
pub fn lines(policy: &Policy, reported: &[(u64, u64)]) -> Option<Vec<RuleUsage>> {
    if reported.len() != policy.rules.len() {
        return None;
    }
    let lines = policy
        .rules
        .iter()
        .zip(reported)
        .map(|(r, &(remaining, reset_ms))| {
            let limit = r.kind.limit();
            let remaining = remaining.min(limit);
            RuleUsage {
                rule: r.name.clone(),
                kind: r.kind.name(),
                limit,
                used: limit - remaining,
                remaining,
                reset_ms,
                window_ms: r.kind.window_ms(),
            }
        });
    Some(lines.collect())
}
