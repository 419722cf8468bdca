//! Plans: which limits a tenant gets.
//!
//! A plan changes rule parameters of the configured policies (`pro`:
//! `api.burst.capacity = 1000`) and may name the policy a request without
//! `policy` uses. A tenant is on one plan (the `default` plan when its
//! source of truth does not know it), possibly with overrides of its own.
//! Everything compiles to [`Policies`] here, once per plan and once per
//! tenant with overrides, never on the hot path.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::NameMap;
use super::policy::{compile_policy, compile_with};
use super::{ConfigError, IDENT_RULE, Overrides, Policies, PolicyConfig, invalid, is_ident};
use crate::limiter::Policy;

/// The plan of tenants nobody configured.
pub const DEFAULT_PLAN: &str = "default";

/// `[plans.<name>]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// The policy of a request that names none. Default: `default`.
    pub default_policy: Option<String>,
    /// `<policy>.<rule>.<parameter> = value`, as dotted keys or nested tables.
    #[serde(default)]
    pub limits: Option<serde_json::Value>,
}

/// A tenant as its source of truth describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub plan: String,
    /// The tenant's own overrides, by `<policy>.<rule>.<parameter>`.
    #[serde(default)]
    pub limits: Overrides,
}

/// A `[tenants]` entry: `acme = "pro"` or `acme = { plan = "pro", limits = {...} }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TenantConfig {
    Plan(String),
    Full {
        plan: String,
        #[serde(default)]
        limits: Option<serde_json::Value>,
    },
}

/// Flattens nested tables of numbers into `a.b.c = n` pairs.
pub fn flatten(value: &serde_json::Value, at: &str) -> Result<Overrides, ConfigError> {
    fn walk(
        v: &serde_json::Value,
        path: String,
        at: &str,
        out: &mut Overrides,
    ) -> Result<(), ConfigError> {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(v, p, at, out)?;
                }
                Ok(())
            }
            serde_json::Value::Number(n) => {
                let n = n
                    .as_f64()
                    .ok_or_else(|| invalid(format!("{at}.{path}"), "not a number"))?;
                out.insert(path, n);
                Ok(())
            }
            other => Err(invalid(
                format!("{at}.{path}"),
                format!("must be a number, not {other}"),
            )),
        }
    }
    let mut out = Overrides::new();
    walk(value, String::new(), at, &mut out)?;
    Ok(out)
}

impl TenantConfig {
    pub fn record(&self, at: &str) -> Result<TenantRecord, ConfigError> {
        Ok(match self {
            TenantConfig::Plan(plan) => TenantRecord {
                plan: plan.clone(),
                limits: Overrides::new(),
            },
            TenantConfig::Full { plan, limits } => TenantRecord {
                plan: plan.clone(),
                limits: match limits {
                    Some(l) => flatten(l, &format!("{at}.limits"))?,
                    None => Overrides::new(),
                },
            },
        })
    }
}

/// Every plan, compiled.
#[derive(Debug, Clone)]
pub struct Plans {
    raw: BTreeMap<String, PolicyConfig>,
    base: NameMap<Arc<Policy>>,
    plans: NameMap<(Arc<Policies>, Overrides)>,
}

impl Plans {
    pub fn compile(
        policies: &BTreeMap<String, PolicyConfig>,
        plans: &BTreeMap<String, PlanConfig>,
    ) -> Result<Plans, ConfigError> {
        let mut base = NameMap::default();
        for (name, p) in policies {
            base.insert(name.clone(), Arc::new(compile_policy(name, p)?));
        }
        let mut out = Plans {
            raw: policies.clone(),
            base,
            plans: NameMap::default(),
        };
        let implicit = (
            DEFAULT_PLAN.to_owned(),
            PlanConfig {
                default_policy: None,
                limits: None,
            },
        );
        let missing = (!plans.contains_key(DEFAULT_PLAN)).then_some((&implicit.0, &implicit.1));
        let all = plans.iter().chain(missing);
        for (name, plan) in all {
            let at = format!("plans.{name}");
            if !is_ident(name) {
                return Err(invalid(&at, format!("plan name {IDENT_RULE}")));
            }
            let default_policy = plan.default_policy.as_deref().unwrap_or("default");
            if plan.default_policy.is_some() && !out.base.contains_key(default_policy) {
                return Err(invalid(
                    format!("{at}.default_policy"),
                    format!("no policy `{default_policy}`"),
                ));
            }
            let overrides = match &plan.limits {
                Some(l) => flatten(l, &format!("{at}.limits"))?,
                None => Overrides::new(),
            };
            let map = compile_with(&out.raw, &out.base, &overrides, &format!("{at}.limits"))?;
            let policies = Arc::new(Policies::new(name, default_policy, map));
            out.plans.insert(name.clone(), (policies, overrides));
        }
        Ok(out)
    }

    /// The plan of tenants nobody configured.
    pub fn default_plan(&self) -> &Arc<Policies> {
        &self.plans[DEFAULT_PLAN].0
    }

    /// A tenant's policies: its plan, with its own overrides on top.
    /// Errors (an unknown plan, a bad override) say what is wrong.
    pub fn for_record(&self, record: &TenantRecord) -> Result<Arc<Policies>, ConfigError> {
        let Some((plan, plan_overrides)) = self.plans.get(&record.plan) else {
            return Err(invalid("plan", format!("no plan `{}`", record.plan)));
        };
        if record.limits.is_empty() {
            return Ok(plan.clone());
        }
        let mut all = plan_overrides.clone();
        all.extend(record.limits.iter().map(|(k, v)| (k.clone(), *v)));
        let map = compile_with(&self.raw, &self.base, &all, "limits")?;
        let default = plan
            .get(None)
            .map(|p| p.name.to_string())
            .unwrap_or_else(|_| "default".into());
        Ok(Arc::new(Policies::new(&record.plan, &default, map)))
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.plans.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// Validates the `file` source's tenants: each on a known plan, with
/// overrides that compile.
pub(super) fn tenant_records(
    tenants: &BTreeMap<String, TenantConfig>,
    plans: &Plans,
) -> Result<HashMap<String, TenantRecord>, ConfigError> {
    let mut out = HashMap::new();
    for (name, t) in tenants {
        let at = format!("tenants.{name}");
        let record = t.record(&at)?;
        plans.for_record(&record).map_err(|e| match e {
            ConfigError::Invalid { field, message } => invalid(format!("{at}.{field}"), message),
            other => other,
        })?;
        out.insert(name.clone(), record);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::RuleKind;

    fn plans(text: &str) -> Result<Plans, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            policies: BTreeMap<String, PolicyConfig>,
            #[serde(default)]
            plans: BTreeMap<String, PlanConfig>,
        }
        let f: F = toml::from_str(text).unwrap();
        Plans::compile(&f.policies, &f.plans)
    }

    const POLICIES: &str = r#"
        [policies.api]
        rules = [
          { name = "burst", kind = "token_bucket", capacity = 10, refill_per_sec = 5 },
          { name = "daily", kind = "daily_quota", limit = 1000 },
        ]
        [policies.default]
        rules = [{ name = "r", kind = "fixed_window", limit = 5, window_ms = 1000 }]
    "#;

    fn capacity(p: &Policies, policy: &str) -> u64 {
        p.get(Some(policy)).unwrap().rules[0].kind.limit()
    }

    #[test]
    fn a_plan_changes_rules_and_the_default_policy() {
        let p = plans(&format!(
            "{POLICIES}\n[plans.pro]\ndefault_policy = \"api\"\n[plans.pro.limits]\napi.burst.capacity = 1000\n\"api.daily.limit\" = 1000000\n"
        ))
        .unwrap();
        let pro = p
            .for_record(&TenantRecord {
                plan: "pro".into(),
                limits: Default::default(),
            })
            .unwrap();
        assert_eq!(capacity(&pro, "api"), 1000);
        assert_eq!(
            pro.get(Some("api")).unwrap().rules[1].kind.limit(),
            1_000_000
        );
        assert_eq!(&*pro.get(None).unwrap().name, "api");
        assert_eq!(capacity(p.default_plan(), "api"), 10);
        // Untouched policies are shared, not copied.
        assert!(Arc::ptr_eq(
            pro.get(Some("default")).unwrap(),
            p.default_plan().get(Some("default")).unwrap()
        ));
    }

    #[test]
    fn a_tenant_overrides_its_plan() {
        let p = plans(&format!(
            "{POLICIES}\n[plans.pro.limits]\napi.burst.capacity = 1000\n"
        ))
        .unwrap();
        let record = TenantRecord {
            plan: "pro".into(),
            limits: [("api.burst.refill_per_sec".to_owned(), 100.0)].into(),
        };
        let t = p.for_record(&record).unwrap();
        assert_eq!(
            t.get(Some("api")).unwrap().rules[0].kind,
            RuleKind::TokenBucket {
                capacity: 1000,
                interval_us: 10_000
            }
        );
    }

    #[test]
    fn a_plan_and_a_tenant_override_a_concurrency_rule() {
        let p = plans(
            "[policies.default]\nrules = [{ name = \"c\", kind = \"concurrency\", limit = 5, lease_ms = 1000 }]\n[plans.pro.limits]\ndefault.c.limit = 50\n",
        )
        .unwrap();
        let record = TenantRecord {
            plan: "pro".into(),
            limits: [("default.c.lease_ms".to_owned(), 30_000.0)].into(),
        };
        let t = p.for_record(&record).unwrap();
        assert_eq!(
            t.get(None).unwrap().rules[0].kind,
            RuleKind::Concurrency {
                limit: 50,
                lease_us: 30_000_000
            }
        );
        let bad = TenantRecord {
            plan: "pro".into(),
            limits: [("default.c.lease_ms".to_owned(), 0.0)].into(),
        };
        assert!(
            p.for_record(&bad)
                .unwrap_err()
                .to_string()
                .contains("lease_ms")
        );
    }

    #[test]
    fn bad_plans_and_records_say_what_is_wrong() {
        let e = |extra: &str| {
            plans(&format!("{POLICIES}\n{extra}"))
                .unwrap_err()
                .to_string()
        };
        assert!(e("[plans.p.limits]\nnope.burst.capacity = 1").contains("no policy `nope`"));
        assert!(e("[plans.p.limits]\napi.nope.capacity = 1").contains("has no rule `nope`"));
        assert!(e("[plans.p.limits]\napi.burst.colour = 1").contains("no rule parameter `colour`"));
        assert!(e("[plans.p.limits]\napi.burst.capacity = 1.5").contains("not a whole number"));
        assert!(e("[plans.p.limits]\napi.burst.capacity = 0").contains("plans.p.limits"));
        assert!(e("[plans.p.limits]\napi.burst.capacity = \"lots\"").contains("must be a number"));
        assert!(e("[plans.p]\ndefault_policy = \"nope\"").contains("plans.p.default_policy"));
        let p = plans(POLICIES).unwrap();
        let unknown = TenantRecord {
            plan: "gold".into(),
            limits: Overrides::new(),
        };
        assert!(
            p.for_record(&unknown)
                .unwrap_err()
                .to_string()
                .contains("no plan `gold`")
        );
    }
}
