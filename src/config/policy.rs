//! `[policies.<name>]`: rules composed into policies, and their compilation
//! into [`Policy`]s that nothing past configuration can get wrong.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::{ConfigError, IDENT_RULE, NameMap, invalid, is_ident};
use crate::error::Error;
use crate::limiter::{DAY_US, FailureMode, Policy, Rule, RuleKind};

/// Largest `limit` or `capacity`, and largest rule span in µs: they keep the
/// script's arithmetic exact in Lua's doubles.
const MAX_LIMIT: u64 = 1_000_000_000_000;
const MAX_SPAN_US: u64 = 1_000_000_000_000_000;
/// Largest concurrency `limit`: every outstanding lease is a member of a
/// sorted set (or, in memory, an entry), so the bound is on memory.
const MAX_LEASES: u64 = 1_000_000;
/// Longest `lease_ms`: one day. A lease outliving its holder by more than
/// that would keep a slot from everyone else for too long.
const MAX_LEASE_MS: u64 = 86_400_000;

/// `[policies.<name>]`: a list of rules decided as one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `open` (default), `closed` or `local`: the answer when Redis is lost.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// `retry_after_ms` of a `closed` failure answer. Default 1000.
    #[serde(default = "default_closed_retry_ms")]
    pub closed_retry_after_ms: u64,
    /// Every rule of the policy is shadow (see `RuleConfig::shadow`).
    /// Default false.
    #[serde(default)]
    pub shadow: bool,
    /// Required, 1 to 16 rules.
    pub rules: Vec<RuleConfig>,
}

fn default_closed_retry_ms() -> u64 {
    1000
}

/// One rule. `kind` decides which of the other fields it takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// `token_bucket`, `sliding_window`, `fixed_window`, `daily_quota` or
    /// `concurrency`.
    pub kind: String,
    /// token_bucket: units the bucket holds.
    pub capacity: Option<u64>,
    /// token_bucket: units added per second (may be fractional).
    pub refill_per_sec: Option<f64>,
    /// sliding_window, fixed_window, daily_quota: units per window;
    /// concurrency: leases outstanding at once (1 to 1,000,000).
    pub limit: Option<u64>,
    /// sliding_window, fixed_window: window length in ms.
    pub window_ms: Option<u64>,
    /// concurrency: how long a lease lives if its holder never releases it,
    /// in ms (1 to 86,400,000).
    pub lease_ms: Option<u64>,
    /// Shadow: the rule counts what passes and what it would deny, but
    /// denies nothing (a rule being rolled out). Default false.
    #[serde(default)]
    pub shadow: bool,
}

pub(crate) fn compile_policy(name: &str, p: &PolicyConfig) -> Result<Policy, ConfigError> {
    let at = format!("policies.{name}");
    if !is_ident(name) {
        return Err(invalid(&at, format!("policy name {IDENT_RULE}")));
    }
    if p.rules.is_empty() || p.rules.len() > 16 {
        return Err(invalid(format!("{at}.rules"), "needs 1 to 16 rules"));
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        let at = format!("{at}.rules[{i}]");
        if !is_ident(&r.name) {
            return Err(invalid(format!("{at}.name"), IDENT_RULE));
        }
        if rules.iter().any(|x| *x.name == *r.name) {
            return Err(invalid(
                format!("{at}.name"),
                format!("`{}` is used twice", r.name),
            ));
        }
        rules.push(Rule {
            name: r.name.as_str().into(),
            kind: compile_rule(&at, r)?,
            shadow: p.shadow || r.shadow,
        });
    }
    Ok(Policy::new(
        name,
        rules,
        p.failure_mode,
        p.closed_retry_after_ms,
    ))
}

/// The configured kinds, by name, with the fields each one takes.
const KINDS: [(&str, &[&str]); 5] = [
    ("token_bucket", &["capacity", "refill_per_sec"]),
    ("fixed_window", &["limit", "window_ms"]),
    ("sliding_window", &["limit", "window_ms"]),
    ("daily_quota", &["limit"]),
    ("concurrency", &["limit", "lease_ms"]),
];

fn compile_rule(at: &str, r: &RuleConfig) -> Result<RuleKind, ConfigError> {
    check_fields(at, r)?;
    let limit = || limit_of(at, "limit", r.limit.unwrap_or(0));
    let window = || window_of(at, r.window_ms.unwrap_or(0));
    Ok(match r.kind.as_str() {
        "token_bucket" => token_bucket(at, r)?,
        "fixed_window" => RuleKind::FixedWindow {
            limit: limit()?,
            window_us: window()?,
        },
        "sliding_window" => RuleKind::SlidingWindow {
            limit: limit()?,
            window_us: window()?,
        },
        "concurrency" => concurrency(at, r)?,
        _ => RuleKind::FixedWindow {
            limit: limit()?,
            window_us: DAY_US,
        },
    })
}

/// Refuses an unknown kind, and a field the kind needs but lacks or does
/// not take.
fn check_fields(at: &str, r: &RuleConfig) -> Result<(), ConfigError> {
    let Some((_, needs)) = KINDS.iter().find(|(name, _)| *name == r.kind) else {
        let names: Vec<&str> = KINDS.iter().map(|(name, _)| *name).collect();
        return Err(invalid(
            format!("{at}.kind"),
            format!("unknown kind `{}` ({})", r.kind, names.join(", ")),
        ));
    };
    for (field, present) in [
        ("capacity", r.capacity.is_some()),
        ("refill_per_sec", r.refill_per_sec.is_some()),
        ("limit", r.limit.is_some()),
        ("window_ms", r.window_ms.is_some()),
        ("lease_ms", r.lease_ms.is_some()),
    ] {
        let why = match (needs.contains(&field), present) {
            (true, false) => format!("{} needs it", r.kind),
            (false, true) => format!("does not apply to {}", r.kind),
            _ => continue,
        };
        return Err(invalid(format!("{at}.{field}"), why));
    }
    Ok(())
}

fn token_bucket(at: &str, r: &RuleConfig) -> Result<RuleKind, ConfigError> {
    let capacity = limit_of(at, "capacity", r.capacity.unwrap_or(0))?;
    let rate = r.refill_per_sec.unwrap_or(0.0);
    if !(rate.is_finite() && rate > 0.0 && rate <= 1e6) {
        return Err(invalid(
            format!("{at}.refill_per_sec"),
            "must be > 0 and <= 1000000",
        ));
    }
    let interval_us = ((1e6 / rate).round() as u64).max(1);
    if capacity.saturating_mul(interval_us) > MAX_SPAN_US {
        return Err(invalid(
            format!("{at}.capacity"),
            "capacity / refill_per_sec must be under ~31 years",
        ));
    }
    Ok(RuleKind::TokenBucket {
        capacity,
        interval_us,
    })
}

fn concurrency(at: &str, r: &RuleConfig) -> Result<RuleKind, ConfigError> {
    let limit = r.limit.unwrap_or(0);
    if !(1..=MAX_LEASES).contains(&limit) {
        return Err(invalid(
            format!("{at}.limit"),
            format!("must be within 1..={MAX_LEASES}"),
        ));
    }
    let lease_ms = r.lease_ms.unwrap_or(0);
    if !(1..=MAX_LEASE_MS).contains(&lease_ms) {
        return Err(invalid(
            format!("{at}.lease_ms"),
            format!("must be within 1..={MAX_LEASE_MS} (one day)"),
        ));
    }
    Ok(RuleKind::Concurrency {
        limit,
        lease_us: lease_ms * 1000,
    })
}

fn limit_of(at: &str, field: &str, v: u64) -> Result<u64, ConfigError> {
    if (1..=MAX_LIMIT).contains(&v) {
        Ok(v)
    } else {
        Err(invalid(
            format!("{at}.{field}"),
            format!("must be within 1..={MAX_LIMIT}"),
        ))
    }
}

/// A window in ms, as µs.
fn window_of(at: &str, v: u64) -> Result<u64, ConfigError> {
    if (1..=MAX_SPAN_US / 1000).contains(&v) {
        Ok(v * 1000)
    } else {
        Err(invalid(
            format!("{at}.window_ms"),
            "must be at least 1 and at most ~31 years",
        ))
    }
}

impl RuleConfig {
    /// Sets one parameter, as a plan or a tenant overrides it.
    fn set(&mut self, field: &str, value: f64) -> Result<(), String> {
        let whole = || {
            if value.fract() == 0.0 && value >= 0.0 && value <= u64::MAX as f64 {
                Ok(value as u64)
            } else {
                Err(format!("{value} is not a whole number"))
            }
        };
        match field {
            "capacity" => self.capacity = Some(whole()?),
            "limit" => self.limit = Some(whole()?),
            "window_ms" => self.window_ms = Some(whole()?),
            "lease_ms" => self.lease_ms = Some(whole()?),
            "refill_per_sec" => self.refill_per_sec = Some(value),
            other => return Err(format!("no rule parameter `{other}`")),
        }
        Ok(())
    }
}

/// Rule parameters changed by a plan or for one tenant, by
/// `<policy>.<rule>.<field>`.
pub type Overrides = BTreeMap<String, f64>;

/// Compiles every policy of `raw` with `overrides` applied; policies the
/// overrides leave alone are shared with `base`. Errors name the override
/// under `at`.
pub(crate) fn compile_with(
    raw: &BTreeMap<String, PolicyConfig>,
    base: &NameMap<Arc<Policy>>,
    overrides: &Overrides,
    at: &str,
) -> Result<NameMap<Arc<Policy>>, ConfigError> {
    let mut changed: BTreeMap<&str, PolicyConfig> = BTreeMap::new();
    for (path, value) in overrides {
        let field_at = format!("{at}.{path}");
        let mut parts = path.splitn(3, '.');
        let (Some(policy), Some(rule), Some(field)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(field_at, "must be `<policy>.<rule>.<parameter>`"));
        };
        let Some(p) = raw.get(policy) else {
            return Err(invalid(field_at, format!("no policy `{policy}`")));
        };
        let p = changed.entry(policy).or_insert_with(|| p.clone());
        let Some(r) = p.rules.iter_mut().find(|r| r.name == rule) else {
            return Err(invalid(
                field_at,
                format!("policy `{policy}` has no rule `{rule}`"),
            ));
        };
        r.set(field, *value).map_err(|m| invalid(&field_at, m))?;
    }
    let mut out = base.clone();
    for (name, p) in changed {
        let policy = compile_policy(name, &p).map_err(|e| match e {
            ConfigError::Invalid { field, message } => invalid(format!("{at} ({field})"), message),
            other => other,
        })?;
        out.insert(name.to_owned(), Arc::new(policy));
    }
    Ok(out)
}

/// The policies in force for a tenant, by name: the configured ones,
/// changed by the tenant's plan and its own overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Policies {
    plan: Arc<str>,
    /// The policy of a request that names none.
    default_policy: String,
    map: NameMap<Arc<Policy>>,
}

impl Policies {
    pub fn new(plan: &str, default_policy: &str, map: NameMap<Arc<Policy>>) -> Self {
        Policies {
            plan: plan.into(),
            default_policy: default_policy.to_owned(),
            map,
        }
    }

    /// The named policy, or the default one when the request names none.
    pub fn get(&self, name: Option<&str>) -> Result<&Arc<Policy>, Error> {
        let name = name.unwrap_or(&self.default_policy);
        self.map
            .get(name)
            .ok_or_else(|| Error::unknown_policy(name))
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.map.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}
