//! The batch script (`lua/limiter.lua`, `lua/cache.lua` and `lua/batch.lua`,
//! sent as one) as Redis commands: jobs in, outcomes out.
//!
//! Numbers travel as packed little-endian doubles (exact below 2^53), which
//! the script reads with `struct.unpack`: cheaper for Redis than parsing
//! decimal strings, and Redis CPU is what batching is meant to save.

use std::sync::Arc;

use bytes::Bytes;
use redis::{Cmd, Value};

use crate::backend::job::{Job, Outcome};
use crate::keys::{self, Keys};
use crate::limiter::{Policy, Verdict};
use crate::protocol::Lookup;

/// The script's source; its SHA1 is what EVALSHA names.
pub const SOURCE: &str = concat!(
    include_str!("../../../lua/limiter.lua"),
    "\n",
    include_str!("../../../lua/cache.lua"),
    "\n",
    include_str!("../../../lua/batch.lua"),
);

/// The script's SHA1, computed once.
pub fn sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(SOURCE).get_hash().to_owned())
}

/// The index of `p` in `policies`, adding it if new.
fn index_of<'a>(policies: &mut Vec<&'a Arc<Policy>>, p: &'a Arc<Policy>) -> u64 {
    match policies.iter().position(|q| Arc::ptr_eq(q, p)) {
        Some(i) => i as u64,
        None => {
            policies.push(p);
            (policies.len() - 1) as u64
        }
    }
}

fn packed(values: impl IntoIterator<Item = u64>) -> Vec<u8> {
    values
        .into_iter()
        .flat_map(|v| (v as f64).to_le_bytes())
        .collect()
}

/// One script call running `jobs` in order. `by_source` sends the source
/// (EVAL, which also caches it in Redis) instead of its SHA (EVALSHA).
pub fn command<'a>(
    jobs: impl Iterator<Item = &'a Job>,
    keys: &Keys,
    now_us: Option<u64>,
    by_source: bool,
) -> Cmd {
    // Each distinct policy goes once; checks refer to it by index.
    let mut policies: Vec<&Arc<Policy>> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut args: Vec<Vec<u8>> = Vec::new();
    let entry_keys = |names: &mut Vec<String>, tenant: &str, key: &str| {
        names.push(keys.entry(tenant, key));
        names.push(keys.fill_lock(tenant, key));
        names.push(keys.refresh_lock(tenant, key));
    };
    for job in jobs {
        match job {
            Job::Check(c) => {
                names.extend(c.state_keys(keys));
                args.push(packed([1, index_of(&mut policies, &c.policy), c.cost]));
            }
            Job::Get { args: g, .. } => {
                entry_keys(&mut names, &g.tenant, &g.key);
                args.push(packed([2, g.fill_ms]));
            }
            Job::Set(s) => {
                entry_keys(&mut names, &s.tenant, &s.key);
                names.extend(s.tags.iter().map(|t| keys.tag(&s.tenant, t)));
                args.push(packed([3, s.ttl_ms, s.stale_ms, s.tags.len() as u64]));
                args.push(s.value.to_vec());
                args.extend(s.tags.iter().map(|t| keys::encode(t).into_bytes()));
            }
            Job::Del(d) => {
                for k in &d.keys {
                    entry_keys(&mut names, &d.tenant, k);
                }
                names.extend(d.tags.iter().map(|t| keys.tag(&d.tenant, t)));
                args.push(packed([
                    4,
                    d.keys.len() as u64,
                    d.tags.len() as u64,
                    u64::from(d.fill_only),
                ]));
                args.extend(d.tags.iter().map(|t| keys::encode(t).into_bytes()));
            }
            Job::CheckGet(c, g) => {
                names.extend(c.state_keys(keys));
                entry_keys(&mut names, &g.tenant, &g.key);
                args.push(packed([
                    5,
                    index_of(&mut policies, &c.policy),
                    c.cost,
                    g.fill_ms,
                ]));
            }
        }
    }
    let mut cmd = if by_source {
        let mut c = redis::cmd("EVAL");
        c.arg(SOURCE);
        c
    } else {
        let mut c = redis::cmd("EVALSHA");
        c.arg(sha());
        c
    };
    cmd.arg(names.len()).arg(names);
    match now_us {
        Some(t) => cmd.arg(t),
        None => cmd.arg(""),
    };
    cmd.arg(policies.len());
    for p in &policies {
        let rules = p.rules.iter().flat_map(|r| r.kind.script_args());
        cmd.arg(packed(std::iter::once(p.rules.len() as u64).chain(rules)));
    }
    cmd.arg(args);
    cmd
}

/// Reads the script's reply for `jobs`; `None` if it is not the shape the
/// script returns (then the caller answers by failure mode).
pub fn outcomes<'a>(reply: Value, jobs: impl Iterator<Item = &'a Job>) -> Option<Vec<Outcome>> {
    let Value::Array(items) = reply else {
        return None;
    };
    let mut items = items.into_iter();
    let Some(Value::BulkString(header)) = items.next() else {
        return None;
    };
    let mut nums = header
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as u64);
    let mut values = items.map(|v| match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        _ => None,
    });
    let mut take = |n: usize| -> Option<Vec<u64>> { (0..n).map(|_| nums.next()).collect() };
    let mut out = Vec::new();
    for job in jobs {
        let o = match job {
            Job::Check(c) => Outcome::Decided(verdict(&take(5)?, c.policy.rules.len())?),
            Job::Get { .. } => Outcome::Looked(lookup(&take(5)?, &mut values)?),
            Job::Set(_) => {
                take(1)?;
                Outcome::Stored
            }
            Job::Del(_) => Outcome::Deleted(take(1)?[0]),
            Job::CheckGet(c, _) => {
                let v = verdict(&take(5)?, c.policy.rules.len())?;
                let l = take(5)?;
                let l = if v.allowed {
                    Some(lookup(&l, &mut values)?)
                } else {
                    None
                };
                Outcome::CheckLooked(v, l)
            }
        };
        out.push(o);
    }
    Some(out)
}

fn verdict(n: &[u64], rules: usize) -> Option<Verdict> {
    let rule = n[1] as usize;
    (rule < rules).then_some(Verdict {
        allowed: n[0] == 1,
        rule,
        remaining: n[2],
        reset_ms: n[3],
        retry_after_ms: n[4],
    })
}

fn lookup(n: &[u64], values: &mut impl Iterator<Item = Option<Bytes>>) -> Option<Lookup> {
    let value = if n[0] == 1 {
        Some(values.next()??)
    } else {
        None
    };
    Some(Lookup {
        value,
        ttl_ms: n[1],
        stale: n[2] == 1,
        refresh: n[3] == 1,
        fill: n[4] == 1,
        degraded: false,
    })
}
