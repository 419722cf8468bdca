//! `usage` reports what checks report, rule by rule, for every kind (leases
//! outstanding for a concurrency rule) and on
//! both backends (the in-memory limiter and the Lua in a real Redis),
//! driven by one pinned clock across a UTC midnight; it charges nothing;
//! through the daemon it is one Redis round trip.

mod common;

use std::sync::Arc;
use std::time::Duration;

use quotad::backend::redis::RedisBackend;
use quotad::backend::{Job, MemoryBackend, Outcome};
use quotad::clock::Clock;
use quotad::config::Config;
use quotad::keys::Keys;
use quotad::limiter::usage::{RuleUsage, lines};
use quotad::limiter::{Check, DAY_US, Decision, Policy};

use common::{Daemon, Redis, counters, redis_table};

const POLICIES: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 5, refill_per_sec = 2 }]

[policies.tb]
rules = [{ name = "tb", kind = "token_bucket", capacity = 5, refill_per_sec = 2 }]

[policies.fw]
rules = [{ name = "fw", kind = "fixed_window", limit = 4, window_ms = 10000 }]

[policies.sw]
rules = [{ name = "sw", kind = "sliding_window", limit = 6, window_ms = 10000 }]

[policies.day]
rules = [{ name = "day", kind = "daily_quota", limit = 3 }]

[policies.cc]
rules = [{ name = "cc", kind = "concurrency", limit = 3, lease_ms = 4000 }]

[policies.all]
rules = [
  { name = "a_tb", kind = "token_bucket", capacity = 5, refill_per_sec = 2 },
  { name = "a_fw", kind = "fixed_window", limit = 4, window_ms = 10000 },
  { name = "a_sw", kind = "sliding_window", limit = 6, window_ms = 10000 },
  { name = "a_day", kind = "daily_quota", limit = 3 },
]
"#;

/// 5 s before a UTC midnight (2023-11-15 00:00:00 UTC).
const MIDNIGHT_US: u64 = 19_676 * DAY_US;
const START_US: u64 = MIDNIGHT_US - 5_000_000;
/// Step times, in ms from the start: bursts at one instant, refills, the
/// last steps before and after midnight, a new 10 s window.
const STEPS_MS: [u64; 12] = [
    0, 0, 0, 300, 1000, 2000, 4500, 4500, 5500, 5500, 9000, 15_000,
];

enum Backend {
    Memory(Box<MemoryBackend>),
    Redis(RedisBackend),
}

impl Backend {
    /// Runs `jobs` in order, one round trip each on Redis (in one batch, a
    /// script runs the plain checks ahead of the other operations).
    async fn run(&mut self, jobs: Vec<Job>) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(match self {
                Backend::Memory(m) => m.run(&job),
                Backend::Redis(r) => {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    let mut o = r.run(std::slice::from_ref(&job), deadline).await;
                    o.pop().flatten().expect("Redis answered")
                }
            });
        }
        out
    }
}

fn policy(config: &Config, name: &str) -> Arc<Policy> {
    config.plans.default_plan().get(Some(name)).unwrap().clone()
}

/// A check as a shard makes it (with a fresh lease when it takes one).
fn check(policy: &Arc<Policy>, cost: u64) -> Check {
    Check::new(policy.clone(), "t".into(), "k".into(), cost)
}

fn decision(check: &Check, o: &Outcome) -> Decision {
    match o {
        Outcome::Decided(v) => check.decision(*v, false),
        other => panic!("not a decision: {other:?}"),
    }
}

fn usage(policy: &Policy, o: &Outcome) -> Vec<RuleUsage> {
    match o {
        Outcome::Usage(u) => lines(policy, u).expect("one line per rule"),
        other => panic!("not a usage: {other:?}"),
    }
}

/// Every step: a usage, a peek, a check and a usage in one batch, for
/// every policy. The usage after a check reports the check's numbers for
/// its deciding rule; the usage before it the peek's (a fixed window's
/// reset aside: usage names its window's end even when nothing is used);
/// two usages around nothing are equal; the daily quota turns over at
/// midnight.
async fn usage_matches_checks(mut backend: Backend, clock: &Clock, name: &str) {
    let config = Config::from_toml(POLICIES).unwrap();
    let (mut today, mut day_used) = (START_US / DAY_US, 0);
    // The expiry of each lease the `cc` checks took (none is released).
    let mut leases: Vec<u64> = Vec::new();
    for (step, at) in STEPS_MS.iter().enumerate() {
        let now_us = START_US + at * 1000;
        clock.set_us(now_us);
        for p in ["tb", "fw", "sw", "day", "cc", "all"] {
            let policy = policy(&config, p);
            let (peeked, charged) = (check(&policy, 0), check(&policy, 1));
            let jobs = vec![
                Job::Usage(check(&policy, 0)),
                Job::Check(peeked.clone()),
                Job::Usage(check(&policy, 0)),
                Job::Check(charged.clone()),
                Job::Usage(check(&policy, 0)),
            ];
            let out = backend.run(jobs).await;
            let at = format!("{name} step {step} (+{at} ms) {p}");
            let (before, peek, again) = (
                usage(&policy, &out[0]),
                decision(&peeked, &out[1]),
                usage(&policy, &out[2]),
            );
            let (d, after) = (decision(&charged, &out[3]), usage(&policy, &out[4]));
            assert_eq!(before, again, "{at}: a usage or a peek charged something");
            for (u, r) in before.iter().zip(&policy.rules) {
                assert_eq!(
                    (u.limit, u.used + u.remaining),
                    (r.kind.limit(), r.kind.limit()),
                    "{at}"
                );
                assert_eq!(
                    (&*u.rule, u.kind, u.window_ms),
                    (&*r.name, r.kind.name(), r.kind.window_ms()),
                    "{at}"
                );
            }
            let decided = |lines: &[RuleUsage], rule: &str| {
                lines.iter().find(|u| *u.rule == *rule).cloned().unwrap()
            };
            let u = decided(&before, &peek.rule);
            assert_eq!(u.remaining, peek.remaining, "{at}: usage before vs peek");
            if !matches!(u.kind, "fixed_window" | "daily_quota") {
                assert_eq!(u.reset_ms, peek.reset_ms, "{at}: usage before vs peek");
            }
            let u = decided(&after, &d.rule);
            assert_eq!(
                (u.remaining, u.reset_ms),
                (d.remaining, d.reset_ms),
                "{at}: usage after vs check {d:?}"
            );
            assert_eq!(u.kind, d.kind, "{at}");
            assert_eq!(u.window_ms, d.window_ms, "{at}");
            if p == "day" {
                // 3 a day: a new day starts at midnight, used or not.
                if now_us / DAY_US != today {
                    (today, day_used) = (now_us / DAY_US, 0);
                }
                assert_eq!(d.allowed, day_used < 3, "{at}");
                day_used += u64::from(d.allowed);
                assert_eq!(after[0].used, day_used, "{at}");
                let next_midnight = (today + 1) * DAY_US;
                assert_eq!(
                    after[0].reset_ms,
                    (next_midnight - now_us) / 1000,
                    "{at}: ms to the next 00:00 UTC"
                );
            }
            if p == "cc" {
                // 3 at once, each for 4 s: used = leases outstanding, reset
                // = until the latest expires.
                leases.retain(|&exp| exp > now_us);
                assert_eq!(d.allowed, leases.len() < 3, "{at}");
                assert_eq!(d.lease.is_some(), d.allowed, "{at}");
                if d.allowed {
                    leases.push(now_us + 4_000_000);
                }
                let latest = leases
                    .iter()
                    .max()
                    .map_or(0, |&e| (e - now_us).div_ceil(1000));
                assert_eq!(
                    (after[0].used, after[0].remaining, after[0].reset_ms),
                    (leases.len() as u64, 3 - leases.len() as u64, latest),
                    "{at}"
                );
                assert_eq!((after[0].kind, after[0].window_ms), ("concurrency", 0));
            }
        }
    }
}

#[tokio::test]
async fn memory_usage_matches_checks_across_midnight() {
    let clock = Clock::manual(START_US);
    let memory = MemoryBackend::new(Keys::new("qd"), clock.clone(), 1000, 1 << 20);
    usage_matches_checks(Backend::Memory(Box::new(memory)), &clock, "memory").await;
}

/// In one batch, a usage sees the charges of the batch's checks (the
/// script runs plain checks first), and the key's state is read once.
#[tokio::test]
async fn a_usage_in_a_batch_sees_its_checks() {
    let redis = Redis::start();
    let config = Config::from_toml(&format!("{}{POLICIES}", redis_table(&redis))).unwrap();
    let backend = common::redis_backend(&config, Clock::manual(START_US));
    let all = policy(&config, "all");
    let jobs = vec![
        Job::Usage(check(&all, 0)),
        Job::Check(check(&all, 1)),
        Job::Check(check(&all, 1)),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let out = backend.run(&jobs, deadline).await;
    let u = usage(&all, out[0].as_ref().unwrap());
    let used: Vec<u64> = u.iter().map(|u| u.used).collect();
    assert_eq!(used, [2, 2, 2, 2]);
    assert_eq!(redis.calls("mget"), 1);
}

#[tokio::test]
async fn redis_usage_matches_checks_across_midnight() {
    let redis = Redis::start();
    let config = Config::from_toml(&common::redis_table(&redis)).unwrap();
    let clock = Clock::manual(START_US);
    let backend = common::redis_backend(&config, clock.clone());
    usage_matches_checks(Backend::Redis(backend), &clock, "redis").await;
}

/// Through the daemon on Redis: a `usage` is one script call in one round
/// trip, charges nothing, names every rule in order; an unknown policy is
/// `unknown_policy`; the CLI prints one line per rule.
#[tokio::test]
async fn the_daemon_reports_usage_in_one_round_trip() {
    let redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICIES}", redis_table(&redis)));
    let c = d.client().await;
    c.check("acme", "u", Some("all"), 2).await.unwrap();
    let before = counters(&c).await;
    let fcalls = redis.calls("fcall");
    let rules = c.usage("acme", "u", Some("all")).await.unwrap();
    assert_eq!(redis.calls("fcall") - fcalls, 1, "one script call");
    let after = counters(&c).await;
    assert_eq!(after["batches"] - before["batches"], 1, "one round trip");
    assert_eq!(after["requests_usage"] - before["requests_usage"], 1);
    let names: Vec<&str> = rules.iter().map(|u| &*u.rule).collect();
    assert_eq!(names, ["a_tb", "a_fw", "a_sw", "a_day"]);
    let kinds: Vec<&str> = rules.iter().map(|u| u.kind).collect();
    assert_eq!(
        kinds,
        [
            "token_bucket",
            "fixed_window",
            "sliding_window",
            "daily_quota"
        ]
    );
    let windows: Vec<u64> = rules.iter().map(|u| u.window_ms).collect();
    assert_eq!(windows, [2500, 10_000, 10_000, 86_400_000]);
    // The fixed windows and the daily quota count exactly 2; the bucket
    // may have refilled a little.
    let used: Vec<u64> = rules.iter().map(|u| u.used).collect();
    assert_eq!(&used[1..], [2, 2, 2]);
    assert!(used[0] <= 2);
    assert_eq!(
        c.usage("acme", "u", Some("all")).await.unwrap()[3].used,
        2,
        "usage charged"
    );
    let default = c.usage("acme", "u", None).await.unwrap();
    assert_eq!(
        (default.len(), &*default[0].rule, default[0].used),
        (1, "burst", 0)
    );
    let err = c.usage("acme", "u", Some("nope")).await.unwrap_err();
    assert!(err.to_string().contains("unknown_policy"), "{err}");

    let out = std::process::Command::new(common::QUOTAD)
        .args([
            "usage", "--tenant", "acme", "--key", "u", "--policy", "all", "--socket",
        ])
        .arg(d.socket())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[3].starts_with("rule=a_day kind=daily_quota limit=3 used=2 remaining=1 reset_ms="),
        "{text}"
    );
    assert!(lines[3].ends_with(" window_ms=86400000"), "{text}");
}

/// Without Redis there is nothing to report: `unavailable`, whatever the
/// policy's failure mode (an `open` answer would claim nothing is used).
#[tokio::test]
async fn usage_without_redis_is_unavailable() {
    let mut redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICIES}", redis_table(&redis)));
    let c = d.client().await;
    redis.kill();
    let err = c.usage("acme", "u", Some("day")).await.unwrap_err();
    assert!(err.to_string().contains("unavailable"), "{err}");
}

/// Through the daemon, on Redis and in memory: a concurrency rule's usage
/// counts the leases outstanding, a release gives one back, and neither
/// a usage nor a peek takes one.
#[tokio::test]
async fn usage_counts_the_leases_the_daemon_holds() {
    let redis = Redis::start();
    for config in [
        format!("{}{POLICIES}", redis_table(&redis)),
        POLICIES.into(),
    ] {
        let d = Daemon::start(&config);
        let c = d.client().await;
        let used = async || c.usage("acme", "u", Some("cc")).await.unwrap()[0].used;
        assert_eq!(used().await, 0);
        let a = c.check("acme", "u", Some("cc"), 1).await.unwrap();
        c.check("acme", "u", Some("cc"), 1).await.unwrap();
        c.check("acme", "u", Some("cc"), 0).await.unwrap();
        assert_eq!(used().await, 2);
        assert!(
            c.release("acme", "u", Some("cc"), a.lease.unwrap())
                .await
                .unwrap()
        );
        let rules = c.usage("acme", "u", Some("cc")).await.unwrap();
        assert_eq!(
            (rules[0].used, rules[0].remaining, rules[0].kind),
            (1, 2, "concurrency")
        );
        assert!(
            rules[0].reset_ms > 3000 && rules[0].reset_ms <= 4000,
            "{rules:?}"
        );
    }
}
