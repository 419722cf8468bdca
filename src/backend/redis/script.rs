//! The batch code (`lua/limiter.lua`, `lua/cache.lua` and `lua/batch.lua`,
//! which define one Lua function, `batch`) as Redis commands: jobs in,
//! outcomes out.
//!
//! Redis 7 keeps it as a function library (FUNCTION LOAD, then FCALL): the
//! library's functions and tables are made once when it loads, where a
//! script (EVALSHA) makes them again at every call, which costs Redis more
//! than a small batch's own work. Older Redis runs it as a script.
//!
//! Numbers travel as packed little-endian doubles (exact below 2^53), which
//! the script reads with `struct.unpack`: cheaper for Redis than parsing
//! decimal strings, and Redis CPU is what batching is meant to save.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use redis::{Cmd, Value};

use crate::backend::job::{Job, Outcome};
use crate::keys::{self, Keys};
use crate::limiter::{Check, Policy, RuleKind, Verdict};
use crate::protocol::Lookup;

/// The three files in order: they define `batch` and call nothing.
const BODY: &str = concat!(
    include_str!("../../../lua/limiter.lua"),
    "\n",
    include_str!("../../../lua/cache.lua"),
    "\n",
    include_str!("../../../lua/batch.lua"),
);

/// The batch code in both of the forms Redis can keep it in. Names carry
/// the code's hash, so quotads of different versions sharing one Redis
/// each call their own.
pub struct Lua {
    /// The function library, for FUNCTION LOAD REPLACE.
    pub library: String,
    /// The name FCALL calls.
    pub function: String,
    /// The script, for EVAL; its SHA1 is what EVALSHA names.
    pub script: String,
    pub sha: String,
}

/// Built once.
pub fn lua() -> &'static Lua {
    static LUA: OnceLock<Lua> = OnceLock::new();
    LUA.get_or_init(|| {
        let hash = redis::Script::new(BODY).get_hash().to_owned();
        let id = &hash[..16];
        let function = format!("quotad_batch_{id}");
        let script = format!("{BODY}\nreturn batch(KEYS, ARGV)\n");
        Lua {
            library: format!(
                "#!lua name=quotad_{id}\n{BODY}\nredis.register_function('{function}', batch)\n"
            ),
            sha: redis::Script::new(&script).get_hash().to_owned(),
            function,
            script,
        }
    })
}

/// How a call names the batch code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// FCALL of the loaded library's function.
    Function,
    /// EVALSHA of the cached script.
    Sha,
    /// EVAL of the script's source, which also caches it.
    Source,
}

/// Operation codes, `lua/batch.lua`'s `OP_*` (plain checks have none:
/// they travel together, ahead of the other operations).
pub mod op {
    pub const CACHE_GET: u64 = 2;
    pub const CACHE_SET: u64 = 3;
    pub const CACHE_DEL: u64 = 4;
    pub const CHECK_GET: u64 = 5;
    pub const USAGE: u64 = 6;
    /// A check of a policy with concurrency rules (it takes a lease).
    pub const CHECK_LEASE: u64 = 10;
    pub const RELEASE: u64 = 11;
}

/// Rule kind codes, `lua/limiter.lua`'s `KIND_*`.
pub mod kind {
    pub const TOKEN_BUCKET: u64 = 1;
    pub const FIXED_WINDOW: u64 = 2;
    pub const SLIDING_WINDOW: u64 = 3;
    pub const CONCURRENCY: u64 = 4;
}

/// A rule as the script reads it: `[kind code, a, b]`.
fn rule_args(rule: &RuleKind) -> [u64; 3] {
    match *rule {
        RuleKind::TokenBucket {
            capacity,
            interval_us,
        } => [kind::TOKEN_BUCKET, capacity, interval_us],
        RuleKind::FixedWindow { limit, window_us } => [kind::FIXED_WINDOW, limit, window_us],
        RuleKind::SlidingWindow { limit, window_us } => [kind::SLIDING_WINDOW, limit, window_us],
        RuleKind::Concurrency { limit, lease_us } => [kind::CONCURRENCY, limit, lease_us],
    }
}

/// A policy as the script reads it: the rule count, each rule's
/// [`rule_args`], then, only for a policy with shadow rules, a bit mask of
/// them (bit i: rule i), so other policies' arguments stay as they were.
fn policy_args(p: &Policy) -> Vec<u8> {
    let mask = (p.rules.iter().enumerate())
        .filter(|(_, r)| r.shadow)
        .fold(0, |m, (i, _)| m | 1 << i);
    let shadow = p.shadow.then_some(mask);
    let mut out = Vec::with_capacity(policy_args_len(p));
    let rules = p.rules.iter().flat_map(|r| rule_args(&r.kind));
    for v in std::iter::once(p.rules.len() as u64)
        .chain(rules)
        .chain(shadow)
    {
        out.extend((v as f64).to_le_bytes());
    }
    out
}

/// At most the length of [`policy_args`] (with or without its mask).
fn policy_args_len(p: &Policy) -> usize {
    8 * (2 + 3 * p.rules.len())
}

fn packed<const N: usize>(values: [u64; N]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| (v as f64).to_le_bytes())
        .collect()
}

/// One call running `jobs` in order.
pub fn command<'a>(
    jobs: impl Iterator<Item = &'a Job>,
    keys: &Keys,
    now_us: Option<u64>,
    via: Via,
) -> Cmd {
    // Sized for one state key and one plain check per job: no regrowth
    // (and rehashing) while the call is built.
    let n = jobs.size_hint().0;
    let mut call = Call {
        keys,
        policies: Vec::new(),
        state_names: String::with_capacity(64 * n),
        state_ends: Vec::with_capacity(n),
        state_index: HashMap::with_capacity_and_hasher(n, Default::default()),
        names: Vec::new(),
        checks: 0,
        check_args: Vec::with_capacity(24 * n),
        args: Vec::new(),
    };
    for job in jobs {
        call.add(job);
    }
    let lua = lua();
    let (name, code) = match via {
        Via::Function => ("FCALL", &lua.function),
        Via::Sha => ("EVALSHA", &lua.sha),
        Via::Source => ("EVAL", &lua.script),
    };
    // Sized up front: grown arg by arg, its two buffers were reallocated
    // several times per call (~3k instructions of a lone check's 57k).
    let lengths = |v: &[String]| v.iter().map(String::len).sum::<usize>();
    let nstates = call.state_ends.len();
    let args = 8 + nstates + call.names.len() + call.policies.len() + call.args.len();
    let data = 128
        + code.len()
        + call.state_names.len()
        + lengths(&call.names)
        + call
            .policies
            .iter()
            .map(|p| policy_args_len(p))
            .sum::<usize>()
        + call.check_args.len()
        + call.args.iter().map(Vec::len).sum::<usize>();
    let mut cmd = redis::Cmd::with_capacity(args, data);
    cmd.arg(name).arg(code);
    cmd.arg(nstates + call.names.len());
    let mut start = 0;
    for &end in &call.state_ends {
        cmd.arg(&call.state_names[start..end]);
        start = end;
    }
    cmd.arg(call.names);
    match now_us {
        Some(t) => cmd.arg(t),
        None => cmd.arg(""),
    };
    cmd.arg(nstates).arg(call.policies.len());
    for p in &call.policies {
        cmd.arg(policy_args(p));
    }
    cmd.arg(call.checks).arg(call.check_args).arg(call.args);
    cmd
}

/// A script call being built: its KEYS and operation ARGV.
struct Call<'a> {
    keys: &'a Keys,
    /// Each distinct policy goes once; checks refer to it by index.
    policies: Vec<&'a Arc<Policy>>,
    /// The distinct rule state keys (the first KEYS), each once: checks
    /// of the same tenant, policy and key refer to the same ones. Their
    /// names one after another, and where each ends: no `String` apiece.
    state_names: String,
    state_ends: Vec<usize>,
    /// A check's tenant, policy name and key -> the 1-based KEYS index of
    /// its first state key (borrowed: no key name is built twice). foldhash:
    /// at most `batch_max` entries, so chosen keys could not cost much.
    state_index: HashMap<(&'a str, &'a str, &'a str), usize, foldhash::fast::RandomState>,
    /// The cache operations' keys, after the state keys.
    names: Vec<String>,
    /// The plain checks: how many, and their arguments in one string.
    checks: usize,
    check_args: Vec<u8>,
    /// The other operations' arguments.
    args: Vec<Vec<u8>>,
}

impl<'a> Call<'a> {
    /// Appends one job's keys and arguments (see `lua/batch.lua`).
    fn add(&mut self, job: &'a Job) {
        let keys = self.keys;
        match job {
            Job::Check(c) if c.policy.has_leases() => {
                let first = self.state_keys(c);
                let policy = self.policy(&c.policy);
                self.args
                    .push(packed([op::CHECK_LEASE, policy, c.cost, first]));
                self.lease(c);
            }
            Job::Check(c) => {
                let first = self.state_keys(c);
                let policy = self.policy(&c.policy);
                for v in [policy, c.cost, first] {
                    self.check_args.extend((v as f64).to_le_bytes());
                }
                self.checks += 1;
            }
            Job::Get { args: g, .. } => {
                self.entry(&g.tenant, &g.key);
                self.args.push(packed([op::CACHE_GET, g.fill_ms]));
            }
            Job::Set(s) => {
                self.entry(&s.tenant, &s.key);
                self.names
                    .extend(s.tags.iter().map(|t| keys.tag(&s.tenant, t)));
                let header = [op::CACHE_SET, s.ttl_ms, s.stale_ms, s.tags.len() as u64];
                self.args.push(packed(header));
                self.args.push(s.value.to_vec());
                self.tag_names(&s.tags);
            }
            Job::Del(d) => {
                for k in &d.keys {
                    self.entry(&d.tenant, k);
                }
                self.names
                    .extend(d.tags.iter().map(|t| keys.tag(&d.tenant, t)));
                let (entries, tags) = (d.keys.len() as u64, d.tags.len() as u64);
                let header = [op::CACHE_DEL, entries, tags, u64::from(d.fill_only)];
                self.args.push(packed(header));
                self.tag_names(&d.tags);
                if !d.tags.is_empty() {
                    let m = Keys::lock_markers();
                    let markers = [m.entry, m.fill, m.refresh];
                    self.args.extend(markers.map(|m| m.as_bytes().to_vec()));
                }
            }
            Job::CheckGet(c, g) => {
                let first = self.state_keys(c);
                self.entry(&g.tenant, &g.key);
                let policy = self.policy(&c.policy);
                let mut header = packed([op::CHECK_GET, policy, c.cost, g.fill_ms, first]);
                if c.policy.has_leases() {
                    header.extend(1f64.to_le_bytes()); // its lease follows
                    self.args.push(header);
                    self.lease(c);
                } else {
                    self.args.push(header);
                }
            }
            Job::Release(r) => {
                let names = r.lease_keys(keys);
                self.args.push(packed([op::RELEASE, names.len() as u64]));
                self.names.extend(names);
                self.args.push(r.lease.to_string().into_bytes());
            }
            Job::Usage(c) => {
                let first = self.state_keys(c);
                let policy = self.policy(&c.policy);
                self.args.push(packed([op::USAGE, policy, first]));
            }
        }
    }

    /// A leased check's lease ARGV: "" for a peek, which takes none.
    fn lease(&mut self, c: &Check) {
        let lease = c.lease.map(|l| l.to_string()).unwrap_or_default();
        self.args.push(lease.into_bytes());
    }

    /// The KEYS index of the check's first state key, adding its keys if
    /// no earlier check of the call has them. The same policy name means
    /// the same rules, hence the same keys, whatever a plan changed.
    fn state_keys(&mut self, c: &'a Check) -> u64 {
        let next = self.state_ends.len() + 1;
        let id = (c.tenant.as_str(), &*c.policy.name, c.key.as_str());
        let first = *self.state_index.entry(id).or_insert(next);
        if first == next {
            c.write_state_keys(self.keys, &mut self.state_names, &mut self.state_ends);
        }
        first as u64
    }

    /// The index of `p` among the call's policies, adding it if new.
    fn policy(&mut self, p: &'a Arc<Policy>) -> u64 {
        match self.policies.iter().position(|q| Arc::ptr_eq(q, p)) {
            Some(i) => i as u64,
            None => {
                self.policies.push(p);
                (self.policies.len() - 1) as u64
            }
        }
    }

    /// A cache entry's keys: the entry, its fill lock, its refresh lock.
    fn entry(&mut self, tenant: &str, key: &str) {
        let keys = self.keys;
        self.names.extend([
            keys.entry(tenant, key),
            keys.fill_lock(tenant, key),
            keys.refresh_lock(tenant, key),
        ]);
    }

    fn tag_names(&mut self, tags: &[String]) {
        self.args
            .extend(tags.iter().map(|t| keys::encode(t).into_bytes()));
    }
}

/// Reads the script's reply for `jobs`; `None` if it is not the shape the
/// script returns (then the caller answers by failure mode).
pub fn outcomes<'a>(reply: Value, jobs: impl Iterator<Item = &'a Job>) -> Option<Vec<Outcome>> {
    let Value::Array(items) = reply else {
        return None;
    };
    let jobs: Vec<&Job> = jobs.collect();
    let mut items = items.into_iter();
    let Value::BulkString(numbers) = items.next()? else {
        return None;
    };
    let mut n = Numbers::new(&numbers)?;
    // Plain checks travel ahead of the other operations (see `Call::add`),
    // and so do their results: 2 or 5 numbers each (see lua/batch.lua).
    let plain = |job: &Job| matches!(job, Job::Check(c) if !c.policy.has_leases());
    let mut verdicts = Vec::with_capacity(jobs.len());
    for c in jobs.iter().filter_map(|j| match j {
        Job::Check(c) if plain(j) => Some(c),
        _ => None,
    }) {
        let head = n.int()?;
        let v = if let Ok(remaining) = u64::try_from(head) {
            [1, 0, remaining, n.uint()?, 0]
        } else {
            let code = u64::try_from(-1 - head).ok()?;
            [code, n.uint()?, n.uint()?, n.uint()?, n.uint()?]
        };
        verdicts.push(verdict(&v, c.policy.rules.len())?);
    }
    let mut verdicts = verdicts.into_iter();
    let mut values = items.map(|v| match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        _ => None,
    });
    // Then the other operations' numbers, in order.
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let o = match job {
            _ if plain(job) => Outcome::Decided(verdicts.next()?),
            Job::Check(c) => Outcome::Decided(verdict(&n.take::<5>()?, c.policy.rules.len())?),
            Job::Get { .. } => Outcome::Looked(lookup(&n.take::<5>()?, &mut values)?),
            Job::Set(_) => {
                n.uint()?;
                Outcome::Stored
            }
            Job::Del(_) => Outcome::Deleted(n.uint()?),
            Job::Release(_) => Outcome::Released(n.uint()? == 1),
            Job::CheckGet(c, _) => {
                let check = n.take::<5>()?;
                let look = n.take::<5>()?;
                let v = verdict(&check, c.policy.rules.len())?;
                let l = if v.allowed {
                    Some(lookup(&look, &mut values)?)
                } else {
                    None
                };
                Outcome::CheckLooked(v, l)
            }
            Job::Usage(c) => Outcome::Usage(
                (0..c.policy.rules.len())
                    .map(|_| Some((n.uint()?, n.uint()?)))
                    .collect::<Option<_>>()?,
            ),
        };
        out.push(o);
    }
    Some(out)
}

/// The reply's numbers: one string of little-endian doubles.
struct Numbers<'a>(std::slice::ChunksExact<'a, u8>);

impl<'a> Numbers<'a> {
    fn new(packed: &'a [u8]) -> Option<Self> {
        packed
            .len()
            .is_multiple_of(8)
            .then(|| Numbers(packed.chunks_exact(8)))
    }

    /// The next number, truncated towards zero as Redis truncates a Lua
    /// number it turns into an integer.
    fn int(&mut self) -> Option<i64> {
        let b = self.0.next()?;
        Some(f64::from_le_bytes(b.try_into().expect("8 bytes")) as i64)
    }

    fn uint(&mut self) -> Option<u64> {
        u64::try_from(self.int()?).ok()
    }

    fn take<const N: usize>(&mut self) -> Option<[u64; N]> {
        let mut n = [0; N];
        for v in &mut n {
            *v = self.uint()?;
        }
        Some(n)
    }
}

/// A check's five integers. The first is 0 (denied), 1 (allowed) or 2 + i:
/// allowed, but shadow rule i would have denied.
fn verdict(n: &[u64], rules: usize) -> Option<Verdict> {
    let rule = n[1] as usize;
    let shadow = n[0].checked_sub(2).map(|i| i as usize);
    (rule < rules && shadow.is_none_or(|s| s < rules)).then_some(Verdict {
        allowed: n[0] >= 1,
        rule,
        remaining: n[2],
        reset_ms: n[3],
        retry_after_ms: n[4],
        shadow,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `local <PREFIX><NAME> = <n>` line of the script.
    fn lua_codes(prefix: &str) -> Vec<(String, u64)> {
        BODY.lines()
            .filter_map(|l| l.strip_prefix("local ")?.strip_prefix(prefix))
            .filter_map(|l| {
                let (name, n) = l.split_once(" = ")?;
                Some((name.to_owned(), n.trim().parse().ok()?))
            })
            .collect()
    }

    fn named(codes: &[(&str, u64)]) -> Vec<(String, u64)> {
        codes.iter().map(|&(n, c)| (n.to_owned(), c)).collect()
    }

    #[test]
    fn lua_and_rust_agree_on_every_code() {
        assert_eq!(
            lua_codes("OP_"),
            named(&[
                ("CACHE_GET", op::CACHE_GET),
                ("CACHE_SET", op::CACHE_SET),
                ("CACHE_DEL", op::CACHE_DEL),
                ("CHECK_GET", op::CHECK_GET),
                ("USAGE", op::USAGE),
                ("CHECK_LEASE", op::CHECK_LEASE),
                ("RELEASE", op::RELEASE),
            ])
        );
        assert_eq!(
            lua_codes("KIND_"),
            named(&[
                ("TOKEN_BUCKET", kind::TOKEN_BUCKET),
                ("FIXED_WINDOW", kind::FIXED_WINDOW),
                ("SLIDING_WINDOW", kind::SLIDING_WINDOW),
                ("CONCURRENCY", kind::CONCURRENCY),
            ])
        );
        // Two names for one code would send one of them down the other's path.
        for prefix in ["OP_", "KIND_"] {
            let mut codes: Vec<u64> = lua_codes(prefix).into_iter().map(|(_, c)| c).collect();
            codes.sort_unstable();
            let n = codes.len();
            codes.dedup();
            assert_eq!(codes.len(), n, "two {prefix} names share a code");
        }
    }
}
