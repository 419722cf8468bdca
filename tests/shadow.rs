//! Shadow mode through the real daemon, on both backends: a shadow rule
//! that would deny lets the check through, says so (`shadow_denied`,
//! `shadow_rule`) and is counted in `stats` and in Prometheus by policy
//! and rule; switched to enforcing by a SIGHUP, it denies at exactly the
//! check where it had started to shadow-deny. Whether the rule, its
//! policy or `[server]` makes it shadow, the reload is the same.

mod common;

use bytes::Bytes;
use common::{
    Daemon, Redis, SOON, counters, free_port, http_get, redis_table, wait_until_blocking,
};
use quotad::client::Client;
use quotad::protocol::{CacheSetArgs, CheckArgs};

const LIMIT: usize = 5;

/// A generous enforcing burst and a daily quota of [`LIMIT`], shadow when
/// `shadow` says where: `rule`, `policy`, `server`, or `none`.
fn config(shadow: &str, backend: &str, metrics_port: u16) -> String {
    let server = if shadow == "server" {
        "shadow = true\n"
    } else {
        ""
    };
    let policy = if shadow == "policy" {
        "shadow = true\n"
    } else {
        ""
    };
    let rule = if shadow == "rule" {
        ", shadow = true"
    } else {
        ""
    };
    format!(
        r#"{server}{backend}[metrics]
listen = "127.0.0.1:{metrics_port}"

[policies.api]
{policy}rules = [
  {{ name = "burst", kind = "token_bucket", capacity = 1000, refill_per_sec = 1 }},
  {{ name = "daily", kind = "daily_quota", limit = {LIMIT}{rule} }},
]
"#
    )
}

/// Checks `key` `n` times: per check, (allowed, the shadow rule named).
async fn checks(c: &Client, key: &str, n: usize) -> Vec<(bool, Option<String>)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let d = c.check("acme", key, Some("api"), 1).await.unwrap();
        assert!(d.allowed || d.shadow_rule.is_none(), "{d:?}");
        out.push((d.allowed, d.shadow_rule.as_deref().map(str::to_owned)));
    }
    out
}

fn metric(port: u16, series: &str) -> f64 {
    let text = http_get(&format!("127.0.0.1:{port}"), "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn shadow_then_enforce(shadow: &str, backend: &str) {
    let port = free_port();
    let d = Daemon::start(&config(shadow, backend, port));
    let c = d.client().await;
    let before = counters(&c).await;

    let shadowed = checks(&c, "k1", LIMIT + 3).await;
    let first_shadow = shadowed.iter().position(|(_, s)| s.is_some());
    assert_eq!(first_shadow, Some(LIMIT), "{shadow}: {shadowed:?}");
    assert!(
        shadowed.iter().all(|(allowed, _)| *allowed),
        "{shadow}: {shadowed:?}"
    );
    for (_, s) in &shadowed[LIMIT..] {
        assert_eq!(s.as_deref(), Some("daily"), "{shadow}");
    }
    let after = counters(&c).await;
    assert_eq!(
        after["shadow_denied"] - before["shadow_denied"],
        3,
        "{shadow}"
    );
    assert_eq!(after["denied"] - before["denied"], 0, "{shadow}");
    assert_eq!(
        after["allowed"] - before["allowed"],
        (LIMIT + 3) as u64,
        "{shadow}"
    );
    let denials = "quotad_shadow_denials_total{policy=\"api\",rule=\"daily\"}";
    assert_eq!(metric(port, denials), 3.0, "{shadow}");
    let rejections = "quotad_rate_limiter_rejections_total{policy=\"api\",rule=\"daily\"}";
    assert_eq!(metric(port, rejections), 0.0, "{shadow}");
    let by_rule = c.stats().await.unwrap().shadow_denials.unwrap_or_default();
    assert_eq!(by_rule.get("api.daily"), Some(&3), "{shadow}: {by_rule:?}");
    assert_eq!(
        by_rule.get("api.burst"),
        None,
        "{shadow}: only counts above 0"
    );
    let out = std::process::Command::new(common::QUOTAD)
        .args(["stats", "--socket"])
        .arg(d.socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("shadow_denied.api.daily "));
    assert!(line.is_some_and(|l| l.ends_with(" 3")), "{shadow}: {text}");
    // The shadow rule was not charged for what it would have denied.
    let usage = c.usage("acme", "k1", Some("api")).await.unwrap();
    assert_eq!(usage[1].used, LIMIT as u64, "{shadow}");
    // A check_get a shadow rule would deny reads the cache like any allowed one.
    let set = CacheSetArgs {
        tenant: "acme".into(),
        key: "GET /x".into(),
        value: Bytes::from_static(b"cached"),
        ttl_ms: 60_000,
        stale_ms: 0,
        tags: vec![],
    };
    c.cache_set(set).await.unwrap();
    let args = CheckArgs {
        tenant: "acme".into(),
        key: "k1".into(),
        policy: Some("api".into()),
        cost: 1,
    };
    let (decision, lookup) = c.check_get(args, "GET /x", 0).await.unwrap();
    assert!(
        decision.allowed && decision.shadow_rule.as_deref() == Some("daily"),
        "{shadow}: {decision:?}"
    );
    assert!(
        lookup.is_some_and(|l| l.value.as_deref() == Some(b"cached".as_slice())),
        "{shadow}: the hit, read"
    );

    // Enforcing now: a fresh key is denied at exactly the same check, and
    // the shadowed key at once.
    let file = std::fs::read_to_string(d.config_path()).unwrap();
    let enforcing = file.replace(
        &config(shadow, backend, port),
        &config("none", backend, port),
    );
    assert_ne!(file, enforcing);
    std::fs::write(d.config_path(), enforcing).unwrap();
    d.signal(libc::SIGHUP);
    wait_until_blocking("the reload", SOON, || d.log_contains("reloaded policies"));
    assert!(
        !d.log_contains("take effect only after a restart"),
        "{shadow}"
    );
    let enforced = checks(&c, "k2", LIMIT + 1).await;
    let first_denied = enforced.iter().position(|(allowed, _)| !allowed);
    assert_eq!(first_denied, first_shadow, "{shadow}: {enforced:?}");
    assert!(enforced.iter().all(|(_, s)| s.is_none()), "{shadow}");
    assert_eq!(checks(&c, "k1", 1).await, [(false, None)], "{shadow}");
    assert_eq!(metric(port, rejections), 2.0, "{shadow}");
    assert_eq!(metric(port, denials), 4.0, "{shadow}"); // with the check_get's
}

#[tokio::test]
async fn a_shadow_rule_counts_then_denies_at_the_same_check_in_memory() {
    for shadow in ["rule", "policy", "server"] {
        shadow_then_enforce(shadow, "").await;
    }
}

#[tokio::test]
async fn a_shadow_rule_counts_then_denies_at_the_same_check_on_redis() {
    let redis = Redis::start();
    for shadow in ["rule", "policy", "server"] {
        redis.cli(&["FLUSHALL"]);
        shadow_then_enforce(shadow, &redis_table(&redis)).await;
    }
}

/// A shadow concurrency rule through the daemon, on both backends: full,
/// it lets the check through, names itself, is counted, and takes no slot
/// (usage shows it), while the enforcing concurrency rule takes the lease;
/// an enforcing refusal takes nothing; every lease comes back once.
#[tokio::test]
async fn a_full_shadow_concurrency_rule_takes_no_slot() {
    let redis = Redis::start();
    let policies = r#"
[policies.uploads]
rules = [
  { name = "inflight", kind = "concurrency", limit = 3, lease_ms = 60000 },
  { name = "trial", kind = "concurrency", limit = 1, lease_ms = 60000, shadow = true },
]
"#;
    for backend in [redis_table(&redis), String::new()] {
        let d = Daemon::start(&format!("{backend}{policies}"));
        let c = d.client().await;
        let used = async || -> Vec<u64> {
            let u = c.usage("acme", "k", Some("uploads")).await.unwrap();
            u.iter().map(|u| u.used).collect()
        };
        let mut held = Vec::new();
        for i in 0..3 {
            let d = c.check("acme", "k", Some("uploads"), 1).await.unwrap();
            assert!(d.allowed && d.lease.is_some(), "{i}: {d:?}");
            let named = (i > 0).then_some("trial");
            assert_eq!(d.shadow_rule.as_deref(), named, "{i}: {d:?}");
            assert_eq!(
                (&*d.rule, d.kind, d.remaining),
                ("inflight", "concurrency", 2 - i)
            );
            held.push(d.lease.unwrap());
        }
        assert_eq!(
            used().await,
            [3, 1],
            "the shadow rule holds only the first lease"
        );
        let full = c.check("acme", "k", Some("uploads"), 1).await.unwrap();
        assert!(!full.allowed && full.lease.is_none() && full.shadow_rule.is_none());
        assert_eq!(used().await, [3, 1], "a refusal takes nothing");
        let by_rule = c.stats().await.unwrap().shadow_denials.unwrap_or_default();
        assert_eq!(by_rule.get("uploads.trial"), Some(&2), "{by_rule:?}");
        for lease in held {
            assert!(
                c.release("acme", "k", Some("uploads"), lease)
                    .await
                    .unwrap()
            );
            assert!(
                !c.release("acme", "k", Some("uploads"), lease)
                    .await
                    .unwrap()
            );
        }
        assert_eq!(used().await, [0, 0]);
    }
}

/// With Redis down, the `local` failure mode decides shadow rules too, and
/// `stats` and Prometheus count its shadow denials alike: the total, the
/// per-rule map and the metric agree.
#[tokio::test]
async fn local_shadow_denials_count_the_same_in_stats_and_metrics() {
    let mut redis = Redis::start();
    let table = redis_table(&redis);
    redis.kill();
    let port = free_port();
    let config = config("rule", &table, port).replace(
        "[policies.api]\n",
        "[policies.api]\nfailure_mode = \"local\"\n",
    );
    let d = Daemon::start(&config);
    let c = d.client().await;
    let shadowed = checks(&c, "k", LIMIT + 3).await;
    assert!(shadowed.iter().all(|(allowed, _)| *allowed), "{shadowed:?}");
    let named = shadowed.iter().filter(|(_, s)| s.is_some()).count();
    assert_eq!(named, 3, "the local limiter shadow-denies: {shadowed:?}");
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.counters.unwrap_or_default()["shadow_denied"], 3);
    let by_rule = stats.shadow_denials.unwrap_or_default();
    assert_eq!(by_rule.get("api.daily"), Some(&3), "{by_rule:?}");
    let denials = "quotad_shadow_denials_total{policy=\"api\",rule=\"daily\"}";
    assert_eq!(metric(port, denials), 3.0);
    let degraded = "quotad_checks_total{policy=\"api\",outcome=\"degraded\"}";
    assert_eq!(
        metric(port, degraded),
        (LIMIT + 3) as f64,
        "decided locally"
    );
}
