//! A leased check whose Redis round trip misses its deadline after the
//! script already took the lease: the caller gets the failure mode's
//! answer without a lease, and quotad releases that lease itself once Redis
//! answers again, so the slot comes back long before `lease_ms`.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Redis, SOON, redis_table, wait_until};

/// Calls of `cmd` Redis ran so far, scripts' own calls included.
fn calls(redis: &Redis, cmd: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{cmd}:calls=");
    (stats.lines())
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn a_timed_out_checks_lease_is_released_by_quotad() {
    let redis = Redis::start();
    let lease_ms = 60_000;
    let config = format!(
        "{}\n[policies.default]\nrules = [{{ name = \"inflight\", kind = \"concurrency\", limit = 1, lease_ms = {lease_ms} }}]\n",
        redis_table(&redis)
    );
    let d = Daemon::start(&config);
    let c = d.client().await;
    // Warm: the script is loaded and the connection up.
    let warm = c.check("acme", "warm", None, 1).await.unwrap();
    assert!(!warm.degraded && warm.lease.is_some());
    let (zadd, zrem) = (calls(&redis, "zadd"), calls(&redis, "zrem"));

    // Frozen, Redis holds the call unread; the deadline (100 ms) passes.
    redis.pause();
    let asked = Instant::now();
    let lost = c.check("acme", "k", None, 1).await.unwrap();
    redis.resume();
    assert!(lost.degraded && lost.allowed, "open: {lost:?}");
    assert!(lost.lease.is_none(), "the lease is not known to the caller");

    // Redis then runs the script (it takes the lease) and quotad's release.
    wait_until("quotad's own release", SOON, async || {
        calls(&redis, "zrem") > zrem
    })
    .await;
    assert_eq!(calls(&redis, "zadd"), zadd + 1, "the script took the lease");
    let back = c.check("acme", "k", None, 1).await.unwrap();
    assert!(back.allowed && !back.degraded, "the slot is free: {back:?}");
    assert!(back.lease.is_some());
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
}
