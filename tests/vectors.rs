//! The golden decision tables in `tests/vectors/` hold for both backends:
//! the in-memory limiter and the `lua/` scripts in a real Redis, driven by
//! the same pinned clock. Steps at the same instant go to Redis as one
//! batch, so a table also proves a batch decides like a sequence. A step
//! is a check, or (`release = <step>`) the release of the lease that
//! step's check took.

mod common;

use std::sync::Arc;
use std::time::Duration;

use quotad::backend::memory::MemoryLimiter;
use quotad::backend::{Job, Outcome};
use quotad::clock::Clock;
use quotad::config::Config;
use quotad::keys::Keys;
use quotad::limiter::{Check, Decision, Lease, Policy, Release};
use serde::Deserialize;

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
    /// A check's answer.
    expect: Option<Expect>,
    /// Instead of a check: release the lease of this step's check (a
    /// fresh, unknown lease if it took none).
    release: Option<usize>,
    released: Option<bool>,
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
    Check::new(policy.clone(), s.tenant.clone(), s.key.clone(), s.cost)
}

/// Every step's job: checks first made, so a release can name the lease
/// of an earlier step.
fn jobs(policy: &Arc<Policy>, table: &Table) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    for s in &table.step {
        jobs.push(match s.release {
            None => Job::Check(check(policy, s)),
            Some(of) => {
                let lease = match &jobs[of] {
                    Job::Check(c) => c.lease,
                    _ => panic!("step {of} is not a check"),
                };
                Job::Release(Release {
                    policy: policy.clone(),
                    tenant: s.tenant.clone(),
                    key: s.key.clone(),
                    lease: lease.unwrap_or_else(Lease::mint),
                })
            }
        });
    }
    jobs
}

/// A step's outcome is the one its table pins: a decision (with a lease
/// exactly when an allowed check of cost > 0 of a leased policy), or
/// whether a release found its lease.
fn verify(name: &str, i: usize, table: &Table, job: &Job, outcome: Outcome) {
    let s = &table.step[i];
    let at = format!("{name} step {i} ({})", table.description);
    match (job, outcome) {
        (Job::Check(c), Outcome::Decided(v)) => {
            let d = c.decision(v, false);
            assert_eq!(Some(Expect::from(&d)), s.expect, "{at}");
            let leased = d.allowed && c.cost > 0 && c.policy.has_leases();
            assert_eq!(d.lease.is_some(), leased, "{at}: lease");
        }
        (Job::Release(_), Outcome::Released(r)) => assert_eq!(Some(r), s.released, "{at}"),
        (_, o) => panic!("{at}: {o:?}"),
    }
}

/// The memory limiter decides every step of every golden table as pinned.
#[test]
fn memory_backend_matches_every_table() {
    for (name, table, policy) in tables() {
        let mut limiter = MemoryLimiter::new(1000);
        let keys = Keys::new("qd");
        for (i, (s, job)) in table.step.iter().zip(jobs(&policy, &table)).enumerate() {
            let now = (table.start_ms + s.at_ms) * 1000;
            let outcome = match &job {
                Job::Check(c) => Outcome::Decided(limiter.check(
                    &policy,
                    &c.state_keys(&keys).collect::<Vec<_>>(),
                    now,
                    c.cost,
                    c.lease,
                )),
                Job::Release(r) => {
                    Outcome::Released(limiter.release(&r.lease_keys(&keys), r.lease, now))
                }
                _ => unreachable!(),
            };
            verify(&name, i, &table, &job, outcome);
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
    let backend = common::redis_backend(&config, clock.clone());
    for (name, table, policy) in tables() {
        redis.cli(&["FLUSHALL"]);
        let all = jobs(&policy, &table);
        let mut i = 0;
        while i < table.step.len() {
            // All steps at one instant go as one batch.
            let at = table.step[i].at_ms;
            let n = table.step[i..].iter().take_while(|s| s.at_ms == at).count();
            clock.set_us((table.start_ms + at) * 1000);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let outcomes = backend.run(&all[i..i + n], deadline).await;
            for (j, o) in outcomes.into_iter().enumerate() {
                let Some(o) = o else {
                    panic!("{name} step {}: Redis did not decide", i + j);
                };
                verify(&name, i + j, &table, &all[i + j], o);
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
