//! The golden decision tables in `tests/vectors/` hold for both backends:
//! the in-memory limiter and the `lua/` scripts in a real Redis, driven by
//! the same pinned clock. Steps at the same instant go to Redis as one
//! batch, so a table also proves a batch decides like a sequence.

mod common;

use std::sync::Arc;
use std::time::Duration;

use quotad::backend::memory::MemoryLimiter;
use quotad::backend::redis::RedisBackend;
use quotad::backend::{Job, Outcome};
use quotad::clock::Clock;
use quotad::config::Config;
use quotad::keys::Keys;
use quotad::limiter::{Check, Decision, Policy};
use quotad::stats::Stats;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

#[derive(Deserialize)]
struct Table {
    description: String,
    start_ms: u64,
    config: String,
    step: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    at_ms: u64,
    #[serde(default = "one")]
    cost: u64,
    #[serde(default = "k")]
    key: String,
    #[serde(default = "t")]
    tenant: String,
    expect: Expect,
}

fn one() -> u64 {
    1
}
fn k() -> String {
    "k".into()
}
fn t() -> String {
    "t".into()
}

#[derive(Deserialize, Debug, PartialEq)]
struct Expect {
    allowed: bool,
    remaining: u64,
    reset_ms: u64,
    retry_after_ms: u64,
    rule: String,
    /// Allowed, but this shadow rule would have denied.
    #[serde(default)]
    shadow_rule: Option<String>,
}

impl From<&Decision> for Expect {
    fn from(d: &Decision) -> Self {
        Expect {
            allowed: d.allowed,
            remaining: d.remaining,
            reset_ms: d.reset_ms,
            retry_after_ms: d.retry_after_ms,
            rule: d.rule.to_string(),
            shadow_rule: d.shadow_rule.as_deref().map(str::to_owned),
        }
    }
}

fn tables() -> Vec<(String, Table, Arc<Policy>)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let table: Table = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let config = Config::from_toml(&table.config).unwrap();
            let policy = config.plans.default_plan().get(Some("v")).unwrap().clone();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                table,
                policy,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 8, "the vector tables are missing");
    out
}

fn check(policy: &Arc<Policy>, s: &Step) -> Check {
    Check {
        policy: policy.clone(),
        tenant: s.tenant.clone(),
        key: s.key.clone(),
        cost: s.cost,
    }
}

/// The memory limiter decides every step of every golden table as pinned.
#[test]
fn memory_backend_matches_every_table() {
    for (name, table, policy) in tables() {
        let mut limiter = MemoryLimiter::new(1000);
        let keys = Keys::new("qd");
        for (i, s) in table.step.iter().enumerate() {
            let c = check(&policy, s);
            let now = (table.start_ms + s.at_ms) * 1000;
            let v = limiter.check(&policy, &c.state_keys(&keys), now, s.cost);
            let got = Expect::from(&Decision::from_verdict(&policy, v, false));
            assert_eq!(got, s.expect, "{name} step {i} ({})", table.description);
        }
    }
}

/// The Lua scripts in a real Redis decide every golden table as pinned,
/// steps at one instant as one batch, and every key they write expires.
#[tokio::test]
async fn redis_backend_matches_every_table_in_batches() {
    let redis = common::Redis::start();
    let config = Config::from_toml(&common::redis_table(&redis)).unwrap();
    let clock = Clock::manual(0);
    let backend = RedisBackend::new(
        config.redis.as_ref().unwrap(),
        clock.clone(),
        Arc::new(Stats::default()),
        CancellationToken::new(),
    )
    .unwrap();
    for (name, table, policy) in tables() {
        redis.cli(&["FLUSHALL"]);
        let mut i = 0;
        while i < table.step.len() {
            // All steps at one instant go as one batch.
            let at = table.step[i].at_ms;
            let n = table.step[i..].iter().take_while(|s| s.at_ms == at).count();
            let steps = &table.step[i..i + n];
            clock.set_us((table.start_ms + at) * 1000);
            let checks: Vec<Check> = steps.iter().map(|s| check(&policy, s)).collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let jobs: Vec<Job> = checks.into_iter().map(Job::Check).collect();
            let outcomes = backend.run(&jobs, deadline).await;
            for (j, (s, o)) in steps.iter().zip(outcomes).enumerate() {
                let Some(Outcome::Decided(v)) = o else {
                    panic!("{name} step {}: Redis did not decide: {o:?}", i + j);
                };
                let got = Expect::from(&Decision::from_verdict(&policy, v, false));
                assert_eq!(
                    got,
                    s.expect,
                    "{name} step {} ({})",
                    i + j,
                    table.description
                );
            }
            i += n;
        }
    }
    // Every key the script wrote carries an expiry: idle state vanishes.
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(!keys.is_empty());
    for key in keys.lines() {
        let ttl: i64 = redis.cli(&["PTTL", key]).parse().unwrap();
        assert!(ttl > 0, "{key} has no expiry");
    }
}
