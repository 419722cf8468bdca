//! Both backends against a model of leases, over a long pseudo-random run:
//! checks (some peeks), releases of held, released and unknown leases, and
//! time moving on, so leases also expire. The model is the definition: at
//! most `limit` live leases, a check allowed exactly when fewer are live, a
//! release true exactly for a live lease, `retry_after_ms` the soonest
//! expiry and `reset_ms` the latest. Redis runs each instant's steps as one
//! batch, as the shards do.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use quotad::backend::memory::MemoryLimiter;
use quotad::backend::{Job, Outcome};
use quotad::clock::Clock;
use quotad::config::Config;
use quotad::keys::Keys;
use quotad::limiter::{Check, Lease, Policy, Release};

const LIMIT: u64 = 4;
const LEASE_MS: u64 = 300;
const T0_MS: u64 = 1_700_000_000_000;

fn policy() -> Arc<Policy> {
    let config = Config::from_toml(&format!(
        "[policies.m]\nrules = [{{ name = \"c\", kind = \"concurrency\", limit = {LIMIT}, lease_ms = {LEASE_MS} }}]\n"
    ))
    .unwrap();
    config.plans.default_plan().get(Some("m")).unwrap().clone()
}

/// What the model says a step's outcome is.
#[derive(Debug, PartialEq)]
enum Expect {
    Decided {
        allowed: bool,
        remaining: u64,
        reset_ms: u64,
        retry_after_ms: u64,
    },
    Released(bool),
}

/// The run: per instant (ms after T0), its jobs and their expected outcomes.
fn run() -> Vec<(u64, Vec<(Job, Expect)>)> {
    let policy = policy();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut live: BTreeMap<Lease, u64> = BTreeMap::new(); // lease -> expiry (ms)
    let mut known: Vec<Lease> = Vec::new(); // every lease handed out, live or not
    let mut now = 0;
    let mut out = Vec::new();
    for _ in 0..400 {
        now += rand(120);
        live.retain(|_, exp| *exp > now);
        let mut steps = Vec::new();
        for _ in 0..1 + rand(4) {
            if rand(3) == 0 && !known.is_empty() {
                let lease = if rand(5) == 0 {
                    Lease::mint() // unknown
                } else {
                    known[rand(known.len() as u64) as usize]
                };
                let released = live.remove(&lease).is_some();
                let job = Job::Release(Release {
                    policy: policy.clone(),
                    tenant: "t".into(),
                    key: "k".into(),
                    lease,
                });
                steps.push((job, Expect::Released(released)));
                continue;
            }
            let cost = if rand(4) == 0 { 0 } else { 1 + rand(3) };
            let c = Check::new(policy.clone(), "t".into(), "k".into(), cost);
            let n = live.len() as u64;
            let allowed = n < LIMIT;
            let taking = allowed && cost > 0;
            if taking {
                let lease = c.lease.unwrap();
                live.insert(lease, now + LEASE_MS);
                known.push(lease);
            }
            let latest = live.values().max().map_or(0, |e| e - now);
            let soonest = live.values().min().map_or(0, |e| e - now);
            let expect = Expect::Decided {
                allowed,
                remaining: if allowed {
                    LIMIT - n - u64::from(taking)
                } else {
                    0
                },
                reset_ms: latest,
                retry_after_ms: if allowed { 0 } else { soonest },
            };
            steps.push((Job::Check(c), expect));
        }
        out.push((now, steps));
    }
    out
}

fn seen(job: &Job, o: Outcome) -> Expect {
    match (job, o) {
        (Job::Check(c), Outcome::Decided(v)) => {
            let d = c.decision(v, false);
            assert_eq!(d.lease.is_some(), d.allowed && c.cost > 0, "{d:?}");
            Expect::Decided {
                allowed: d.allowed,
                remaining: d.remaining,
                reset_ms: d.reset_ms,
                retry_after_ms: d.retry_after_ms,
            }
        }
        (Job::Release(_), Outcome::Released(r)) => Expect::Released(r),
        (_, o) => panic!("{o:?}"),
    }
}

/// The run covers every case: denials, peeks, releases found and not.
#[test]
fn the_run_covers_every_case() {
    let mut count = BTreeMap::new();
    for (_, steps) in run() {
        for (job, expect) in steps {
            let case = match (&job, expect) {
                (Job::Check(c), Expect::Decided { allowed: false, .. }) if c.cost > 0 => "denied",
                (Job::Check(c), Expect::Decided { allowed: true, .. }) if c.cost > 0 => "allowed",
                (Job::Check(_), Expect::Decided { allowed, .. }) => {
                    if allowed {
                        "peek, room"
                    } else {
                        "peek, full"
                    }
                }
                (_, Expect::Released(true)) => "released",
                (_, Expect::Released(false)) => "not held",
                _ => unreachable!(),
            };
            *count.entry(case).or_insert(0) += 1;
        }
    }
    assert_eq!(count.len(), 6, "{count:?}");
    assert!(count.values().all(|&n| n >= 10), "{count:?}");
}

#[test]
fn the_memory_backend_keeps_to_the_model() {
    let mut limiter = MemoryLimiter::new(1000);
    let keys = Keys::new("qd");
    for (at, steps) in run() {
        let now = (T0_MS + at) * 1000;
        for (i, (job, expect)) in steps.iter().enumerate() {
            let o = match job {
                Job::Check(c) => {
                    let v = limiter.check(
                        &c.policy,
                        &c.state_keys(&keys).collect::<Vec<_>>(),
                        now,
                        c.cost,
                        c.lease,
                    );
                    Outcome::Decided(v)
                }
                Job::Release(r) => {
                    Outcome::Released(limiter.release(&r.lease_keys(&keys), r.lease, now))
                }
                _ => unreachable!(),
            };
            assert_eq!(&seen(job, o), expect, "at {at} ms, step {i}");
        }
    }
}

#[tokio::test]
async fn the_redis_backend_keeps_to_the_model_in_batches() {
    let redis = common::Redis::start();
    let config = Config::from_toml(&common::redis_table(&redis)).unwrap();
    let clock = Clock::manual(0);
    let backend = common::redis_backend(&config, clock.clone());
    for (at, steps) in run() {
        clock.set_us((T0_MS + at) * 1000);
        let (jobs, expects): (Vec<Job>, Vec<Expect>) = steps.into_iter().unzip();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let outcomes = backend.run(&jobs, deadline).await;
        for (i, ((job, o), expect)) in jobs.iter().zip(outcomes).zip(&expects).enumerate() {
            let o = o.unwrap_or_else(|| panic!("at {at} ms, step {i}: Redis did not answer"));
            assert_eq!(&seen(job, o), expect, "at {at} ms, step {i}");
        }
    }
}
