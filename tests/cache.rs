//! The response cache through the real daemon: round trips, expiry, tags,
//! tenant isolation, rate-limit-then-cache, single-flight across quotad
//! processes, stale-while-revalidate, a bounded tag index, and Redis lost.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Daemon, Redis, SOON, counters, redis_table, wait_until};
use futures::future::join_all;
use quotad::client::Client;
use quotad::protocol::{CacheSetArgs, CheckArgs, Lookup};

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "two", kind = "token_bucket", capacity = 2, refill_per_sec = 0.001 }]
"#;

fn set(tenant: &str, key: &str, value: &str, ttl_ms: u64, tags: &[&str]) -> CacheSetArgs {
    CacheSetArgs {
        tenant: tenant.into(),
        key: key.into(),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ttl_ms,
        stale_ms: 0,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

fn value(l: &Lookup) -> Option<&[u8]> {
    l.value.as_deref()
}

/// One daemon on the memory backend, one on a fresh Redis.
fn daemons() -> Vec<(&'static str, Daemon, Option<Redis>)> {
    let redis = Redis::start();
    let on_redis = Daemon::start(&format!("{}{POLICY}", redis_table(&redis)));
    vec![
        ("memory", Daemon::start(POLICY), None),
        ("redis", on_redis, Some(redis)),
    ]
}

/// On both backends: a value comes back as set, with its TTL, is
/// overwritten, expires, and is deleted by key or by its current tags.
#[tokio::test]
async fn round_trip_expiry_overwrite_and_delete_by_key_and_tag() {
    for (backend, d, _redis) in daemons() {
        let c = d.client().await;
        assert!(
            !c.cache_set(set("acme", "k1", "one", 60_000, &["a", "b"]))
                .await
                .unwrap()
        );
        let l = c.cache_get("acme", "k1", 0).await.unwrap();
        assert_eq!(value(&l), Some(&b"one"[..]), "{backend}");
        assert!(
            l.ttl_ms > 59_000 && l.ttl_ms <= 60_000 && !l.stale && !l.degraded,
            "{backend} {l:?}"
        );

        c.cache_set(set("acme", "k1", "uno", 60_000, &["b"]))
            .await
            .unwrap();
        assert_eq!(
            value(&c.cache_get("acme", "k1", 0).await.unwrap()),
            Some(&b"uno"[..])
        );

        c.cache_set(set("acme", "short", "x", 150, &[]))
            .await
            .unwrap();
        assert!(
            c.cache_get("acme", "short", 0)
                .await
                .unwrap()
                .value
                .is_some()
        );
        // The 150 ms TTL passing is what is under test.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            c.cache_get("acme", "short", 0)
                .await
                .unwrap()
                .value
                .is_none(),
            "{backend}: expired"
        );

        c.cache_set(set("acme", "k2", "two", 60_000, &["a"]))
            .await
            .unwrap();
        c.cache_set(set("acme", "k3", "three", 60_000, &["a", "b"]))
            .await
            .unwrap();
        // k1 no longer carries `a`: deleting `a` takes k2 and k3 only.
        assert_eq!(
            c.cache_del("acme", &[], &["a"]).await.unwrap(),
            2,
            "{backend}"
        );
        assert!(c.cache_get("acme", "k1", 0).await.unwrap().value.is_some());
        assert!(c.cache_get("acme", "k2", 0).await.unwrap().value.is_none());
        assert_eq!(c.cache_del("acme", &["k1", "nope"], &[]).await.unwrap(), 1);
        assert!(c.cache_get("acme", "k1", 0).await.unwrap().value.is_none());
        assert_eq!(c.cache_del("acme", &["k1"], &["a", "b"]).await.unwrap(), 0);

        // Values are opaque bytes, up to the configured maximum.
        let big: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
        let mut s = set("acme", "big", "", 60_000, &[]);
        s.value = Bytes::from(big.clone());
        c.cache_set(s).await.unwrap();
        assert_eq!(
            value(&c.cache_get("acme", "big", 0).await.unwrap()),
            Some(&big[..]),
            "{backend}"
        );
    }
}

/// On both backends, no tenant reads or deletes another's entries,
/// whatever separators or braces the strings hold.
#[tokio::test]
async fn tenants_never_see_each_others_entries_whatever_the_strings() {
    for (backend, d, redis) in daemons() {
        let c = d.client().await;
        let keys = ["k", "k}", "{k}", "a}:c:k", "*", "k\r\nFLUSHALL", "é"];
        for k in keys {
            c.cache_set(set("a", k, "a's", 60_000, &["t"]))
                .await
                .unwrap();
        }
        for k in keys {
            assert!(
                c.cache_get("a}", k, 0).await.unwrap().value.is_none(),
                "{backend}: {k:?}"
            );
            assert!(
                c.cache_get("b", k, 0).await.unwrap().value.is_none(),
                "{backend}: {k:?}"
            );
            assert_eq!(
                c.cache_del("b", &[k], &["t"]).await.unwrap(),
                0,
                "{backend}"
            );
            assert_eq!(
                value(&c.cache_get("a", k, 0).await.unwrap()),
                Some(&b"a's"[..])
            );
        }
        // A separator inside the strings must not make two pairs one.
        c.cache_set(set("a", "b\0c", "a's", 60_000, &[]))
            .await
            .unwrap();
        assert!(
            c.cache_get("a\0b", "c", 0).await.unwrap().value.is_none(),
            "{backend}"
        );
        if let Some(r) = redis {
            for key in r.cli(&["KEYS", "*"]).lines() {
                // Entries under `qd:c:{a}:`, tags under `qd:g:{a}:`.
                assert!(
                    ["qd:c:{a}:", "qd:g:{a}:"]
                        .iter()
                        .any(|p| key.starts_with(p)),
                    "{key}: outside tenant a's namespace"
                );
            }
        }
    }
}

/// `check_get` returns the cached value when the check allows, and a
/// denied one reads nothing from Redis and carries no cache fields. (The
/// near cache is off: with it, a repeated read needs no HMGET at all, see
/// tests/near_cache.rs.)
#[tokio::test]
async fn check_get_reads_the_cache_only_when_the_check_allows() {
    let redis = Redis::start();
    let d = Daemon::start(&format!(
        "{}[cache]\nnear_max_bytes = 0\n{POLICY}",
        redis_table(&redis)
    ));
    let c = d.client().await;
    c.cache_set(set("acme", "page", "cached", 60_000, &[]))
        .await
        .unwrap();
    let reads_before = redis.calls("hmget");
    let check = || CheckArgs {
        tenant: "acme".into(),
        key: "user:1".into(),
        policy: None,
        cost: 1,
    };
    let mut hits = 0;
    for _ in 0..2 {
        let (decision, lookup) = c.check_get(check(), "page", 0).await.unwrap();
        assert!(decision.allowed);
        assert_eq!(value(&lookup.unwrap()), Some(&b"cached"[..]));
        hits += 1;
    }
    for _ in 0..3 {
        let (decision, lookup) = c.check_get(check(), "page", 0).await.unwrap();
        assert!(!decision.allowed && decision.retry_after_ms > 0);
        assert!(
            lookup.is_none(),
            "a denied check_get carries no cache fields"
        );
    }
    assert_eq!(
        redis.calls("hmget") - reads_before,
        hits,
        "denied requests read nothing"
    );
    let stats = counters(&c).await;
    assert_eq!(stats["requests_check_get"], 5);
}

/// Fires `n` concurrent `cache_get(fill_ms)` on one cold key from several
/// connections of several daemons; the one told to fill sets the value
/// after `work`. Returns (fill count, values the others got).
async fn stampede(
    daemons: &[&Daemon],
    n: usize,
    fill_ms: u64,
    work: Option<Duration>,
) -> (usize, Vec<Lookup>) {
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(Arc::new(daemons[i % daemons.len()].client().await));
    }
    let calls = (0..n).map(|i| {
        let c = clients[i % clients.len()].clone();
        async move {
            let l = c.cache_get("acme", "cold", fill_ms).await.unwrap();
            if let (true, Some(work)) = (l.fill, work) {
                tokio::time::sleep(work).await; // the filler computing
                c.cache_set(set("acme", "cold", "computed once", 60_000, &[]))
                    .await
                    .unwrap();
            }
            l
        }
    });
    let lookups = join_all(calls).await;
    let fills = lookups.iter().filter(|l| l.fill).count();
    (fills, lookups.into_iter().filter(|l| !l.fill).collect())
}

/// Of 100 concurrent misses on one key across two quotads, exactly one is
/// told to fill and the 99 others get its value, within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_filler_among_a_hundred_missers_on_two_daemons() {
    let redis = Redis::start();
    let config = format!("{}{POLICY}", redis_table(&redis));
    let (a, b) = (Daemon::start(&config), Daemon::start(&config));
    let started = Instant::now();
    let (fills, others) = stampede(&[&a, &b], 100, 5000, Some(Duration::from_millis(200))).await;
    assert_eq!(fills, 1, "exactly one caller computes");
    assert_eq!(others.len(), 99);
    for l in &others {
        assert_eq!(value(l), Some(&b"computed once"[..]), "{l:?}");
    }
    println!("all 100 answered in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2));
    let stats = counters(&a.client().await).await;
    assert!(stats["cache_fill_waits"] > 0);
}

/// The memory backend also names exactly one filler among 50 misses and
/// hands its value to the others.
#[tokio::test]
async fn one_filler_on_the_memory_backend_too() {
    let d = Daemon::start(POLICY);
    let (fills, others) = stampede(&[&d], 50, 5000, Some(Duration::from_millis(100))).await;
    assert_eq!(fills, 1);
    assert!(
        others
            .iter()
            .all(|l| value(l) == Some(&b"computed once"[..]))
    );
}

/// On both backends, callers held for a filler that never sets are let go
/// with a plain miss at their `fill_ms`, not before and not much after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filler_that_never_sets_releases_the_others_at_the_deadline() {
    for (backend, d, _redis) in daemons() {
        let started = Instant::now();
        let (fills, others) = stampede(&[&d], 20, 300, None).await;
        let took = started.elapsed();
        assert_eq!(fills, 1, "{backend}");
        assert_eq!(others.len(), 19);
        for l in &others {
            assert!(
                l.value.is_none() && !l.fill && !l.degraded,
                "{backend}: a plain miss: {l:?}"
            );
        }
        assert!(
            took >= Duration::from_millis(290),
            "{backend}: released early: {took:?}"
        );
        assert!(
            took < Duration::from_millis(1000),
            "{backend}: held too long: {took:?}"
        );
    }
}

/// A filler that gives up releases its fill lock: the callers held for it,
/// here or on another quotad, are let go at once with a plain miss instead
/// of at their deadline. A release never deletes a stored value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filler_that_gives_up_releases_the_others_at_once() {
    for (backend, d, redis) in daemons() {
        // On Redis the callers wait on a second quotad sharing it.
        let other = redis
            .as_ref()
            .map(|r| Daemon::start(&format!("{}{POLICY}", redis_table(r))));
        let filler = d.client().await;
        let waiting = Arc::new(other.as_ref().unwrap_or(&d).client().await);
        assert!(filler.cache_get("acme", "k", 10_000).await.unwrap().fill);
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let c = waiting.clone();
                tokio::spawn(async move { c.cache_get("acme", "k", 10_000).await })
            })
            .collect();
        wait_until("the callers to be held", SOON, async || {
            counters(&waiting).await["cache_fill_waits"] >= 5
        })
        .await;
        let started = Instant::now();
        assert_eq!(filler.cache_release_fill("acme", &["k"]).await.unwrap(), 1);
        for w in waiters {
            let l = w.await.unwrap().unwrap();
            assert!(
                l.value.is_none() && !l.fill && !l.degraded,
                "{backend}: {l:?}"
            );
        }
        // Far below fill_ms (10 s), with room for a busy CI machine.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{backend}: held {:?}",
            started.elapsed()
        );
        let stats = counters(&waiting).await;
        assert_eq!(stats["cache_fill_abandoned"], 5, "{backend}");
        assert_eq!(stats["cache_fill_timeouts"], 0, "{backend}");
        filler
            .cache_set(set("acme", "k", "v", 60_000, &[]))
            .await
            .unwrap();
        assert_eq!(filler.cache_release_fill("acme", &["k"]).await.unwrap(), 0);
        let l = filler.cache_get("acme", "k", 0).await.unwrap();
        assert_eq!(value(&l), Some(&b"v"[..]), "{backend}: the value stays");
    }
}

/// On both backends, 50 reads of a stale entry all get the stale value
/// and exactly one is told to refresh, in each stale period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_names_one_refresher_per_stale_period() {
    for (backend, d, _redis) in daemons() {
        let c = Arc::new(d.client().await);
        let mut s = set("acme", "swr", "v1", 150, &[]);
        s.stale_ms = 5_000;
        c.cache_set(s.clone()).await.unwrap();
        for round in ["v1", "v2"] {
            // The 150 ms TTL passing (into the stale period) is under test.
            tokio::time::sleep(Duration::from_millis(250)).await;
            let gets = (0..50).map(|_| {
                let c = c.clone();
                async move { c.cache_get("acme", "swr", 0).await.unwrap() }
            });
            let lookups = join_all(gets).await;
            assert!(
                lookups
                    .iter()
                    .all(|l| l.stale && value(l) == Some(round.as_bytes())),
                "{backend}"
            );
            assert_eq!(
                lookups.iter().filter(|l| l.refresh).count(),
                1,
                "{backend}: one refresher"
            );
            // The refresher stores a fresh value: fresh again, then stale again.
            s.value = Bytes::from_static(b"v2");
            c.cache_set(s.clone()).await.unwrap();
            let l = c.cache_get("acme", "swr", 0).await.unwrap();
            assert!(!l.stale && l.ttl_ms > 0, "{backend}: {l:?}");
        }
    }
}

/// Under 100k short-lived tagged sets a tag's index holds about the live
/// entries only, and everything expires from Redis afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tag_index_stays_bounded_under_100k_short_lived_sets() {
    let redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICY}", redis_table(&redis)));
    let clients: Vec<Arc<Client>> = join_all((0..4).map(|_| d.client()))
        .await
        .into_iter()
        .map(Arc::new)
        .collect();
    let started = Instant::now();
    let mut peak = 0u64;
    for chunk in 0..100u64 {
        let sets = (0..1000u64).map(|i| {
            let c = clients[(i % 4) as usize].clone();
            let n = chunk * 1000 + i;
            async move {
                let tag = format!("tag-{}", n % 10);
                c.cache_set(set("acme", &format!("k{n}"), "v", 100, &[&tag, "all"]))
                    .await
                    .unwrap();
            }
        });
        join_all(sets).await;
        if chunk % 10 == 9 {
            let size: u64 = redis.cli(&["ZCARD", "qd:g:{acme}:all"]).parse().unwrap();
            peak = peak.max(size);
        }
    }
    let elapsed = started.elapsed();
    let rate = 100_000.0 / elapsed.as_secs_f64();
    // Live entries at any moment: about 100 ms worth of sets, plus what was
    // written since the tag was last pruned.
    let bound = (rate * 0.1) as u64 + 2000;
    println!(
        "100k sets in {elapsed:?} ({rate:.0}/s); largest tag index seen: {peak} (bound {bound})"
    );
    assert!(
        peak <= bound,
        "tag index grew to {peak}, more than the live entries ({bound})"
    );
    wait_until("the entries and their tags to expire", SOON, async || {
        redis.cli(&["DBSIZE"]) == "0"
    })
    .await;
}

/// With Redis gone every cache op answers at once, degraded (misses,
/// no-op writes); once it is back, writes and reads work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lost_means_degraded_misses_and_no_op_writes_then_recovery() {
    let mut redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICY}", redis_table(&redis)));
    let c = d.client().await;
    c.cache_set(set("acme", "k", "v", 60_000, &[]))
        .await
        .unwrap();
    redis.kill();
    for _ in 0..5 {
        let started = Instant::now();
        let l = c.cache_get("acme", "k", 1000).await.unwrap();
        assert!(l.degraded && l.value.is_none() && !l.fill, "{l:?}");
        assert!(
            c.cache_set(set("acme", "k", "v", 60_000, &[]))
                .await
                .unwrap(),
            "degraded set"
        );
        assert_eq!(c.cache_del("acme", &["k"], &[]).await.unwrap(), 0);
        let check = CheckArgs {
            tenant: "acme".into(),
            key: "u".into(),
            policy: None,
            cost: 1,
        };
        let (decision, lookup) = c.check_get(check, "k", 0).await.unwrap();
        assert!(decision.allowed && decision.degraded);
        assert!(lookup.unwrap().degraded);
        assert!(
            started.elapsed() < Duration::from_millis(450),
            "{:?}",
            started.elapsed()
        );
    }
    redis.restart();
    wait_until(
        "a set that is not degraded",
        Duration::from_secs(10),
        async || {
            !c.cache_set(set("acme", "k", "back", 60_000, &[]))
                .await
                .unwrap()
        },
    )
    .await;
    assert_eq!(
        value(&c.cache_get("acme", "k", 0).await.unwrap()),
        Some(&b"back"[..])
    );
}

/// SIGTERM answers the callers held for a fill (a plain miss) instead of
/// dropping them, and quotad exits cleanly within 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_callers_waiting_on_a_fill() {
    let mut d = Daemon::start(POLICY);
    let c = Arc::new(d.client().await);
    assert!(c.cache_get("acme", "slow", 20_000).await.unwrap().fill);
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.cache_get("acme", "slow", 20_000).await })
        })
        .collect();
    wait_until("the callers to be held", SOON, async || {
        counters(&c).await["cache_fill_waits"] >= 5
    })
    .await;
    let started = Instant::now();
    d.signal(libc::SIGTERM);
    for w in waiters {
        let l = w.await.unwrap().expect("answered, not dropped");
        assert!(l.value.is_none() && !l.fill, "{l:?}");
    }
    let status = tokio::task::spawn_blocking(move || d.wait_exit())
        .await
        .unwrap();
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
