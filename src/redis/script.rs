//! `lua/check.lua` as Redis commands: arguments in, verdicts out.

use redis::{Cmd, Value};

use crate::keys::Keys;
use crate::limiter::{Check, Verdict};

/// The script's source; its SHA1 is what EVALSHA names.
pub const SOURCE: &str = include_str!("../../lua/check.lua");

/// Integers the script returns per check.
const PER_CHECK: usize = 5;

/// The script's SHA1, computed once.
pub fn sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(SOURCE).get_hash().to_owned())
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
    let nkeys: usize = checks.clone().map(|c| c.policy.rules.len()).sum();
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
    for check in checks {
        cmd.arg(check.policy.rules.len()).arg(check.cost);
        for rule in &check.policy.rules {
            cmd.arg(&rule.kind.script_args()[..]);
        }
    }
    cmd
}

/// Reads the script's reply for `n` checks; `None` if it is not the
/// shape the script returns (then the caller answers by failure mode).
pub fn verdicts(reply: &Value, n: usize) -> Option<Vec<Verdict>> {
    let Value::Array(items) = reply else {
        return None;
    };
    if items.len() != n * PER_CHECK {
        return None;
    }
    let ints: Vec<u64> = items
        .iter()
        .map(|v| match v {
            Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    Some(
        ints.chunks_exact(PER_CHECK)
            .map(|c| Verdict {
                allowed: c[0] == 1,
                rule: c[1] as usize,
                remaining: c[2],
                reset_ms: c[3],
                retry_after_ms: c[4],
            })
            .collect(),
    )
}
