//! Redis lost, restarted or flushed: every request is still answered, in
//! bounded time, without an error; decisions return to Redis by themselves.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    Daemon, Raw, Redis, SOON, code, counters, redis_table, wait_until, wait_until_blocking,
};
use quotad::client::Client;

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 1000000, refill_per_sec = 1000 }]
"#;

#[derive(Default, Debug)]
struct Tally {
    answered: u64,
    degraded: u64,
    errors: Vec<String>,
    slowest: Duration,
}

/// Keeps 32 checks in flight on each of 4 connections until `stop`.
async fn load(d: &Daemon, stop: Arc<AtomicBool>) -> Tally {
    let mut tasks = Vec::new();
    for c in 0..4 {
        let client = Arc::new(d.client().await);
        for w in 0..32 {
            let (client, stop) = (client.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut t = Tally::default();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let started = Instant::now();
                    let r = client
                        .check(&format!("tenant-{c}"), &format!("k{w}-{}", i % 50), None, 1)
                        .await;
                    t.slowest = t.slowest.max(started.elapsed());
                    match r {
                        Ok(d) => {
                            t.answered += 1;
                            t.degraded += u64::from(d.degraded);
                        }
                        Err(e) => t.errors.push(e.to_string()),
                    }
                }
                t
            }));
        }
    }
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        total.answered += t.answered;
        total.degraded += t.degraded;
        total.errors.extend(t.errors);
        total.slowest = total.slowest.max(t.slowest);
    }
    total
}

/// Every request answered, some degraded, none later than the deadline.
fn assert_degraded_within_the_deadline(tally: &Tally) {
    println!("{tally:?}");
    let first = tally.errors.first();
    assert!(tally.errors.is_empty(), "errors reached clients: {first:?}");
    assert!(tally.answered > 1000, "too little load to prove anything");
    assert!(tally.degraded > 0, "no answer was marked degraded");
    // The deadline is 100 ms; the margin covers a loaded 2-core machine
    // (350 ms was exceeded once at load average 6). Still half the fault's
    // 1 s, so a check that waited for Redis instead of the deadline fails.
    let slowest = tally.slowest;
    assert!(
        slowest < Duration::from_millis(500),
        "slowest answer {slowest:?}"
    );
}

/// How long until Redis decides checks again (at most 10 s).
async fn until_redis_decides(client: &Client) -> Duration {
    wait_until(
        "Redis decisions to resume",
        Duration::from_secs(10),
        async || !client.check("probe", "k", None, 1).await.unwrap().degraded,
    )
    .await
}

/// Waits until the load has carried 500 checks to Redis, so that the
/// fault that follows comes under load.
async fn until_under_load(client: &Client) {
    wait_until("the load to reach Redis", SOON, async || {
        counters(client).await["batched_checks"] >= 500
    })
    .await;
}

/// Redis killed under load: every check is answered, degraded ones within
/// the deadline, and decisions return to Redis after its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_open_within_the_deadline_then_recovers() {
    let mut redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICY}", redis_table(&redis)));
    let probe = d.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, ()) = tokio::join!(load(&d, stop.clone()), async {
        until_under_load(&probe).await;
        redis.kill();
        // The outage under test: 1 s of load with Redis gone.
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
    });
    assert_degraded_within_the_deadline(&tally);

    redis.restart();
    let took = until_redis_decides(&probe).await;
    println!("Redis decisions resumed {took:?} after the restart");
    let stats = counters(&probe).await;
    assert!(stats["breaker_trips"] >= 1);
    assert_eq!(stats["breaker_open"], 0);
    // The outage was logged with where Redis is, why it failed, and what
    // quotad did meanwhile; and its end.
    let at = format!("Redis at redis+unix://{}", redis.socket().display());
    let open = d
        .log_line(&format!("{at} unreachable: circuit breaker open"))
        .unwrap();
    assert!(
        open.contains("deciding by each policy's failure mode"),
        "{open}"
    );
    assert!(d.log_contains(&format!("{at}: ")), "the cause, once");
    assert!(d.log_contains("Redis answers again: circuit breaker closed"));
}

/// A frozen Redis costs each check at most the deadline, and decisions
/// return to Redis once it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_each_request_at_most_the_deadline() {
    let redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICY}", redis_table(&redis)));
    let probe = d.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, took) = tokio::join!(load(&d, stop.clone()), async {
        until_under_load(&probe).await;
        redis.pause();
        // The hang under test: 1 s, ten deadlines.
        tokio::time::sleep(Duration::from_secs(1)).await;
        redis.resume();
        // The load goes on through the recovery.
        let took = until_redis_decides(&probe).await;
        stop.store(true, Ordering::Relaxed);
        took
    });
    assert_degraded_within_the_deadline(&tally);
    println!("Redis decisions resumed {took:?} after the pause ended");
}

/// FUNCTION FLUSH under load is mended by reloading the batch code: no
/// error and no degraded answer reaches a client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_flush_mid_run_reaches_no_client() {
    let redis = Redis::start();
    // A deadline of 2 s, not the harness's 100 ms: reloading the library
    // and resending is what is tested, not whether a loaded 2-core machine
    // does it within 100 ms (it did not once, at load average 6).
    let d = Daemon::start(&format!(
        "[redis]\nurl = {:?}\ntimeout_ms = 2000\nprobe_interval_ms = 50\n{POLICY}",
        redis.url()
    ));
    let probe = d.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, ()) = tokio::join!(load(&d, stop.clone()), async {
        until_under_load(&probe).await;
        for _ in 0..5 {
            let reloads = counters(&probe).await["script_reloads"];
            assert_eq!(redis.cli(&["FUNCTION", "FLUSH"]), "OK");
            // Each flush is met, and mended, while the load runs.
            wait_until("the batch code to be reloaded", SOON, async || {
                counters(&probe).await["script_reloads"] > reloads
                    && redis.cli(&["FUNCTION", "LIST"]).contains("quotad_")
            })
            .await;
        }
        stop.store(true, Ordering::Relaxed);
    });
    println!("{tally:?}");
    assert!(
        tally.errors.is_empty(),
        "errors reached clients: {:?}",
        tally.errors.first()
    );
    assert_eq!(tally.degraded, 0, "a flush must not degrade any answer");
    let stats = counters(&probe).await;
    assert!(stats["script_reloads"] >= 5, "{stats:?}");
}

/// With Redis down from the start, each policy's failure mode answers:
/// open allows, closed denies with its retry-after, local enforces.
#[tokio::test]
async fn redis_down_from_the_start_is_answered_by_failure_mode() {
    let mut redis = Redis::start();
    let table = redis_table(&redis);
    redis.kill();
    let d = Daemon::start(&format!(
        r#"{table}
[policies.open]
rules = [{{ name = "r", kind = "fixed_window", limit = 2, window_ms = 60000 }}]
[policies.closed]
failure_mode = "closed"
closed_retry_after_ms = 2500
rules = [{{ name = "r", kind = "fixed_window", limit = 2, window_ms = 60000 }}]
[policies.local]
failure_mode = "local"
rules = [{{ name = "r", kind = "token_bucket", capacity = 2, refill_per_sec = 0.001 }}]
"#
    ));
    let c = d.client().await;
    for _ in 0..3 {
        let open = c.check("t", "k", Some("open"), 1).await.unwrap();
        assert!(open.allowed && open.degraded);
        let closed = c.check("t", "k", Some("closed"), 1).await.unwrap();
        assert!(!closed.allowed && closed.degraded);
        assert_eq!(closed.retry_after_ms, 2500);
    }
    // `local` enforces the policy in process: 2 allowed, then denied.
    let local: Vec<bool> =
        futures::future::join_all((0..4).map(|_| c.check("t", "k", Some("local"), 1)))
            .await
            .into_iter()
            .map(|d| {
                let d = d.unwrap();
                assert!(d.degraded);
                d.allowed
            })
            .collect();
    assert_eq!(local.iter().filter(|a| **a).count(), 2, "{local:?}");
}

/// With Redis frozen, a shard's full queues answer `overloaded` instead of
/// growing; what was queued is decided, and the shard is fine afterwards.
#[test]
fn a_full_shard_queue_answers_overloaded_instead_of_growing() {
    let redis = Redis::start();
    let d = Daemon::start(&format!(
        "shards = 1\nmax_batches_in_flight = 1\nmax_queued_per_shard = 8\nmailbox_capacity = 16\n\
         [redis]\nurl = {:?}\ntimeout_ms = 2000\n{POLICY}",
        redis.url()
    ));
    let mut c = Raw::connect(&d.socket());
    redis.pause();
    for id in 1..=200u64 {
        c.send(
            serde_json::json!({"id": id, "op": "check", "tenant": "t", "key": format!("k{id}")}),
        );
    }
    // Every check reaches its shard (queued or refused) while Redis hangs.
    let mut stats = Raw::connect(&d.socket());
    wait_until_blocking("the 200 checks to be routed", SOON, || {
        stats.counters()["requests_check"] == 200
    });
    redis.resume();
    let mut overloaded = 0;
    let mut decided = 0;
    for _ in 0..200 {
        let r = c
            .recv()
            .unwrap_or_else(|| panic!("unanswered: {:?}", d.stderr.lock().unwrap()));
        match code(&r) {
            Some("overloaded") => overloaded += 1,
            None => decided += 1,
            Some(other) => panic!("unexpected {other}: {r}"),
        }
    }
    println!("{decided} decided, {overloaded} overloaded");
    assert!(overloaded > 0, "the bounded queues must refuse some");
    // At least a full queue's worth: the 8 that queued before the first
    // flush went out together (the batch in flight), and whatever queued
    // behind them is decided too.
    assert!(
        decided >= 8,
        "the batch in flight and the queue are answered"
    );
    // The shard is fine afterwards.
    c.send(serde_json::json!({"id": 999, "op": "check", "tenant": "t", "key": "after"}));
    assert_eq!(c.recv().unwrap()["allowed"], true);
}
