//! Redis Sentinel: quotad finds the master through Sentinel, and after a
//! failover finds the new one by itself, with the limiter state intact.

mod common;

use std::time::Duration;

use common::{Daemon, MASTER_NAME, SOON, SentinelSet, wait_until};

/// After the master dies, quotad finds the replica Sentinel promotes and
/// enforces the state written before the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotad_follows_a_failover_to_the_promoted_replica() {
    let mut set = SentinelSet::start();
    let d = Daemon::start(&format!(
        "[redis]\nsentinels = {:?}\nmaster_name = {MASTER_NAME:?}\ntimeout_ms = 200\nprobe_interval_ms = 100\n\
         [policies.default]\nrules = [{{ name = \"n\", kind = \"token_bucket\", capacity = 5, refill_per_sec = 0.0001 }}]\n",
        set.urls()
    ));
    let c = d.client().await;
    for left in [4, 3, 2] {
        let d = c.check("acme", "k", None, 1).await.unwrap();
        assert!(!d.degraded, "Redis decides through Sentinel");
        assert_eq!(d.remaining, left);
    }
    // Let the writes reach the replica, then lose the master.
    wait_until("replication", SOON, async || {
        set.replica.cli(&["DBSIZE"]) == "1"
    })
    .await;
    set.master.kill();

    let took = wait_until(
        "a Redis decision after the failover",
        Duration::from_secs(30),
        async || !c.check("other", "k", None, 1).await.unwrap().degraded,
    )
    .await;
    println!("Redis decisions resumed {took:?} after the master died");
    set.wait_for_master(&set.replica.port.to_string());
    // The state written before the failover is still enforced.
    let after: Vec<bool> = futures::future::join_all((0..4).map(|_| c.check("acme", "k", None, 1)))
        .await
        .into_iter()
        .map(|d| d.unwrap().allowed)
        .collect();
    assert_eq!(after.iter().filter(|a| **a).count(), 2, "{after:?}");
}

/// A planned failover (`SENTINEL FAILOVER`) leaves the old master up and
/// writable until Sentinel demotes it, some 10 s later. quotad asks
/// Sentinel again every second, so its checks move to the promoted replica
/// within seconds of the switch, not when the old master starts refusing
/// writes (decisions made there meanwhile would be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_moves_the_checks_within_seconds() {
    let set = SentinelSet::start();
    let d = Daemon::start(&format!(
        "[redis]\nsentinels = {:?}\nmaster_name = {MASTER_NAME:?}\ntimeout_ms = 200\nprobe_interval_ms = 100\n\
         [policies.default]\nrules = [{{ name = \"n\", kind = \"token_bucket\", capacity = 1000000, refill_per_sec = 1000 }}]\n",
        set.urls()
    ));
    let c = d.client().await;
    assert!(!c.check("acme", "k", None, 1).await.unwrap().degraded);
    let calls = |r: &common::Redis| {
        let stats = r.cli(&["INFO", "commandstats"]);
        (stats.lines())
            .find_map(|l| l.strip_prefix("cmdstat_fcall:calls="))
            .map_or(0, |v| v.split(',').next().unwrap().parse::<u64>().unwrap())
    };
    assert_eq!(calls(&set.replica), 0, "the replica decides nothing yet");
    // A Sentinel learns of the replica from the master's INFO, every 10 s:
    // until then it refuses with NOGOODSLAVE.
    wait_until(
        "Sentinel to accept the failover",
        Duration::from_secs(30),
        async || set.cli(0, &["SENTINEL", "FAILOVER", MASTER_NAME]) == "OK",
    )
    .await;
    let took = wait_until(
        "checks decided by the promoted replica",
        Duration::from_secs(8),
        async || {
            c.check("acme", "k", None, 1).await.unwrap();
            calls(&set.replica) > 0
        },
    )
    .await;
    println!("checks reached the promoted replica {took:?} after SENTINEL FAILOVER");
    set.wait_for_master(&set.replica.port.to_string());
}
