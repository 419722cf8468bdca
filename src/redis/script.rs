//! `lua/check.lua` as Redis commands: arguments in, verdicts out.
//!
//! Numbers travel as packed little-endian doubles (exact below 2^53), which
//! the script reads with `struct.unpack`: cheaper for Redis than parsing
//! decimal strings, and Redis CPU is what batching is meant to save.

use std::sync::Arc;

use redis::{Cmd, Value};

use crate::keys::Keys;
use crate::limiter::{Check, Policy, Verdict};

/// The script's source; its SHA1 is what EVALSHA names.
pub const SOURCE: &str = include_str!("../../lua/check.lua");

/// Doubles the script returns per check.
const PER_CHECK: usize = 5;

/// The script's SHA1, computed once.
pub fn sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(SOURCE).get_hash().to_owned())
}

fn packed(values: impl IntoIterator<Item = u64>) -> Vec<u8> {
    values
        .into_iter()
        .flat_map(|v| (v as f64).to_le_bytes())
        .collect()
}

/// One script call deciding `checks` in order. `by_source` sends the source
/// (EVAL, which also caches it in Redis) instead of its SHA (EVALSHA).
pub fn command<'a>(
    checks: impl Iterator<Item = &'a Check> + Clone,
    keys: &Keys,
    now_us: Option<u64>,
    by_source: bool,
) -> Cmd {
    let mut cmd = if by_source {
        let mut c = redis::cmd("EVAL");
        c.arg(SOURCE);
        c
    } else {
        let mut c = redis::cmd("EVALSHA");
        c.arg(sha());
        c
    };
    // Each distinct policy goes once; checks refer to it by index.
    let mut policies: Vec<&Arc<Policy>> = Vec::new();
    let mut index = Vec::new();
    let mut nkeys = 0;
    for check in checks.clone() {
        nkeys += check.policy.rules.len();
        let i = match policies.iter().position(|p| Arc::ptr_eq(p, &check.policy)) {
            Some(i) => i,
            None => {
                policies.push(&check.policy);
                policies.len() - 1
            }
        };
        index.push(i as u64);
    }
    cmd.arg(nkeys);
    for check in checks.clone() {
        for key in check.state_keys(keys) {
            cmd.arg(key);
        }
    }
    match now_us {
        Some(t) => cmd.arg(t),
        None => cmd.arg(""),
    };
    cmd.arg(policies.len());
    for p in &policies {
        let rules = p.rules.iter().flat_map(|r| r.kind.script_args());
        cmd.arg(packed(std::iter::once(p.rules.len() as u64).chain(rules)));
    }
    for (check, i) in checks.zip(index) {
        cmd.arg(packed([i, check.cost]));
    }
    cmd
}

/// Reads the script's reply for `n` checks; `None` if it is not the
/// shape the script returns (then the caller answers by failure mode).
pub fn verdicts(reply: &Value, n: usize) -> Option<Vec<Verdict>> {
    let Value::BulkString(bytes) = reply else {
        return None;
    };
    if bytes.len() != n * PER_CHECK * 8 {
        return None;
    }
    let num =
        |c: &[u8], i: usize| f64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().unwrap()) as u64;
    Some(
        bytes
            .chunks_exact(PER_CHECK * 8)
            .map(|c| Verdict {
                allowed: num(c, 0) == 1,
                rule: num(c, 1) as usize,
                remaining: num(c, 2),
                reset_ms: num(c, 3),
                retry_after_ms: num(c, 4),
            })
            .collect(),
    )
}
