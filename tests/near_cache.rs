//! The near cache with two quotads on one Redis: B serves a hot entry from
//! its near cache (its near-hit counter says so), and a change made through
//! A (a set, a delete by key, a delete by tag), or a FLUSHALL, is seen by
//! B's next read; B's tracking connection killed never lets it serve an old
//! value, and it recovers; its bytes stay within `near_max_bytes` under
//! 100k distinct keys; a near hit never bypasses the `[[access]]` rules;
//! on Sentinel, tracking moves to the promoted master after a failover; a
//! `check_get` takes its value from the near cache.

mod common;

use bytes::Bytes;
use common::{
    Daemon, MASTER_NAME, Raw, Redis, SOON, SentinelSet, code, counters, redis_table, wait_until,
    wait_until_blocking,
};
use futures::future::join_all;
use quotad::client::Client;
use quotad::protocol::CacheSetArgs;
use serde_json::json;

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "r", kind = "fixed_window", limit = 5, window_ms = 1000 }]
"#;

fn set(key: &str, value: &str, tags: &[&str]) -> CacheSetArgs {
    CacheSetArgs {
        tenant: "acme".into(),
        key: key.into(),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ttl_ms: 60_000,
        stale_ms: 0,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

async fn get(c: &Client, key: &str) -> Option<String> {
    let l = c.cache_get("acme", key, 0).await.unwrap();
    assert!(!l.degraded, "{l:?}");
    l.value.map(|v| String::from_utf8(v.to_vec()).unwrap())
}

async fn near_hits(c: &Client) -> u64 {
    counters(c).await["near_hits"]
}

/// Reads `key` on `c` until one read is a near hit (tracking may still be
/// coming up); the value that hit.
async fn near_hit(c: &Client, key: &str) -> Option<String> {
    near_hit_in(c, "acme", key).await
}

/// [`near_hit`] of `key` of `tenant`.
async fn near_hit_in(c: &Client, tenant: &str, key: &str) -> Option<String> {
    let mut seen = None;
    wait_until("a near hit", SOON, async || {
        let before = near_hits(c).await;
        let l = c.cache_get(tenant, key, 0).await.unwrap();
        seen = l.value.map(|v| String::from_utf8(v.to_vec()).unwrap());
        near_hits(c).await > before
    })
    .await;
    seen
}

fn two(redis: &Redis, extra: &str) -> (Daemon, Daemon) {
    let config = format!("{}{extra}{POLICY}", redis_table(redis));
    (Daemon::start(&config), Daemon::start(&config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_a_is_seen_by_bs_next_read() {
    let redis = Redis::start();
    let (a, b) = two(&redis, "");
    let (ca, cb) = (a.client().await, b.client().await);

    ca.cache_set(set("k", "v1", &["t"])).await.unwrap();
    assert_eq!(near_hit(&cb, "k").await.as_deref(), Some("v1"));
    ca.cache_set(set("k", "v2", &["t"])).await.unwrap();
    assert_eq!(get(&cb, "k").await.as_deref(), Some("v2"), "a set on A");

    assert_eq!(near_hit(&cb, "k").await.as_deref(), Some("v2"));
    assert_eq!(ca.cache_del("acme", &[], &["t"]).await.unwrap(), 1);
    assert_eq!(get(&cb, "k").await, None, "a tag delete on A");

    ca.cache_set(set("k", "v3", &[])).await.unwrap();
    assert_eq!(near_hit(&cb, "k").await.as_deref(), Some("v3"));
    assert_eq!(ca.cache_del("acme", &["k"], &[]).await.unwrap(), 1);
    assert_eq!(get(&cb, "k").await, None, "a delete by key on A");

    ca.cache_set(set("k", "v4", &[])).await.unwrap();
    assert_eq!(near_hit(&cb, "k").await.as_deref(), Some("v4"));
    redis.cli(&["FLUSHALL"]);
    assert_eq!(get(&cb, "k").await, None, "FLUSHALL");
    assert!(counters(&cb).await["near_flushes"] >= 1);

    // A's own writes are never followed by its own near hit of the old value.
    ca.cache_set(set("own", "o1", &["t"])).await.unwrap();
    assert_eq!(near_hit(&ca, "own").await.as_deref(), Some("o1"));
    ca.cache_set(set("own", "o2", &["t"])).await.unwrap();
    assert_eq!(get(&ca, "own").await.as_deref(), Some("o2"));
    assert_eq!(near_hit(&ca, "own").await.as_deref(), Some("o2"));
    ca.cache_del("acme", &[], &["t"]).await.unwrap();
    assert_eq!(get(&ca, "own").await, None);

    let stats = counters(&cb).await;
    assert!(stats["near_invalidations"] >= 3, "{stats:?}");
    assert_eq!(stats["degraded"], 0);
}

/// The id of `d`'s tracking connection, from `CLIENT LIST`.
fn tracking_id(redis: &Redis, d: &Daemon) -> Option<String> {
    let name = format!("name=quotad-near-{}", d.pid());
    let list = redis.cli(&["CLIENT", "LIST"]);
    let line = list.lines().find(|l| l.split(' ').any(|f| f == name))?;
    let id = line.split(' ').find_map(|f| f.strip_prefix("id="))?;
    Some(id.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tracking_connection_never_serves_an_old_value_and_recovers() {
    let redis = Redis::start();
    let (a, b) = two(&redis, "");
    let (ca, cb) = (a.client().await, b.client().await);
    ca.cache_set(set("k", "old", &[])).await.unwrap();
    assert_eq!(near_hit(&cb, "k").await.as_deref(), Some("old"));
    let first = tracking_id(&redis, &b).expect("B's tracking connection");
    let flushes = counters(&cb).await["near_flushes"];

    assert_eq!(redis.cli(&["CLIENT", "KILL", "ID", &first]), "1");
    // Written while B hears nothing: B must not answer with "old".
    ca.cache_set(set("k", "new", &[])).await.unwrap();
    for _ in 0..50 {
        assert_eq!(get(&cb, "k").await.as_deref(), Some("new"));
    }
    assert!(counters(&cb).await["near_flushes"] > flushes);

    // Back: a new tracking connection, and near hits again.
    assert_eq!(near_hit(&cb, "k").await.as_deref(), Some("new"));
    let again = tracking_id(&redis, &b).expect("B's tracking connection again");
    assert_ne!(again, first);
    ca.cache_set(set("k", "newer", &[])).await.unwrap();
    assert_eq!(get(&cb, "k").await.as_deref(), Some("newer"));
    assert!(b.log_contains("near cache tracking lost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_stay_within_near_max_bytes_under_100k_distinct_keys() {
    const MAX: u64 = 1 << 20;
    let redis = Redis::start();
    // A deadline ample for batches of 500 writes on a busy machine.
    let config = format!(
        "[redis]\nurl = {:?}\ntimeout_ms = 3000\n[cache]\nnear_max_bytes = {MAX}\n{POLICY}",
        redis.url()
    );
    let (a, b) = (Daemon::start(&config), Daemon::start(&config));
    let (ca, cb) = (a.client().await, b.client().await);
    let value = "x".repeat(100);
    let keys: Vec<String> = (0..100_000).map(|i| format!("key-{i}")).collect();
    // In chunks a shard's queue takes (past it: `overloaded`).
    for chunk in keys.chunks(500) {
        let sets = chunk.iter().map(|k| ca.cache_set(set(k, &value, &[])));
        for r in join_all(sets).await {
            assert!(matches!(r, Ok(false)), "{r:?}");
        }
    }
    let mut most = 0;
    for chunk in keys.chunks(500) {
        let gets = chunk.iter().map(|k| cb.cache_get("acme", k, 0));
        for l in join_all(gets).await {
            assert_eq!(l.unwrap().value.as_deref(), Some(value.as_bytes()));
        }
        let bytes = counters(&cb).await["near_bytes"];
        assert!(bytes <= MAX, "{bytes} bytes held, bound {MAX}");
        most = most.max(bytes);
    }
    let stats = counters(&cb).await;
    // It did fill up (so the bound, not emptiness, kept it small).
    assert!(most > MAX / 2, "{stats:?}");
    assert!(stats["near_entries"] > 1000, "{stats:?}");
    assert!(stats["near_entries"] < 100_000 / 10, "{stats:?}");
    // The latest keys are held and served near.
    let last = keys.last().unwrap();
    assert_eq!(near_hit(&cb, last).await.as_deref(), Some(value.as_str()));
}

#[tokio::test]
async fn near_max_bytes_0_turns_it_off() {
    let redis = Redis::start();
    let (a, _b) = two(&redis, "[cache]\nnear_max_bytes = 0\n");
    let c = a.client().await;
    c.cache_set(set("k", "v", &[])).await.unwrap();
    for _ in 0..5 {
        assert_eq!(get(&c, "k").await.as_deref(), Some("v"));
    }
    let stats = counters(&c).await;
    assert_eq!((stats["near_hits"], stats["near_misses"]), (0, 0));
    assert_eq!(tracking_id(&redis, &a), None);
}

/// A peer whose rules no longer grant a tenant is refused its entries
/// even while they are held near (the access check comes first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_hit_never_bypasses_the_access_rules() {
    let redis = Redis::start();
    let rules = "[[access]]\nuids = [0]\ntenants = [\"*\"]\n";
    let d = Daemon::start(&format!("{rules}{}{POLICY}", redis_table(&redis)));
    let c = d.client().await;
    let mut other = set("k", "secret", &[]);
    other.tenant = "other".into();
    c.cache_set(other).await.unwrap();
    assert_eq!(
        near_hit_in(&c, "other", "k").await.as_deref(),
        Some("secret")
    );

    let config = std::fs::read_to_string(d.config_path()).unwrap();
    let narrowed = config.replace("tenants = [\"*\"]", "tenants = [\"acme\"]");
    assert_ne!(config, narrowed);
    std::fs::write(d.config_path(), narrowed).unwrap();
    d.signal(libc::SIGHUP);
    wait_until_blocking("the reload", SOON, || d.log_contains("reloaded policies"));
    let hits = near_hits(&c).await;
    let e = c.cache_get("other", "k", 0).await.unwrap_err();
    assert!(e.to_string().contains("forbidden"), "{e}");
    assert_eq!(near_hits(&c).await, hits, "not looked up at all");
    // On the wire: `forbidden`, with the request's id.
    let mut raw = Raw::connect(&d.socket());
    raw.send(json!({"id": 2, "op": "cache_get", "tenant": "other", "key": "k"}));
    let reply = raw.recv().unwrap();
    assert_eq!(
        (reply["id"].clone(), code(&reply)),
        (json!(2), Some("forbidden"))
    );
}

/// After a failover, tracking is set up again on the master Sentinel
/// promotes: a write there by any client is seen, not the value held
/// from before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sentinel_tracking_follows_a_failover() {
    let mut sentinels = SentinelSet::start();
    let d = Daemon::start(&format!(
        "[redis]\nsentinels = {:?}\nmaster_name = {MASTER_NAME:?}\ntimeout_ms = 200\nprobe_interval_ms = 100\n{POLICY}",
        sentinels.urls()
    ));
    let c = d.client().await;
    c.cache_set(set("k", "before", &[])).await.unwrap();
    assert_eq!(near_hit(&c, "k").await.as_deref(), Some("before"));
    wait_until("replication", SOON, async || {
        sentinels.replica.cli(&["EXISTS", "qd:c:{acme}:k"]) == "1"
    })
    .await;
    sentinels.master.kill();
    sentinels.wait_for_master(&sentinels.replica.port.to_string());
    // Near hits again, from the promoted master.
    wait_until(
        "tracking on the new master",
        std::time::Duration::from_secs(30),
        async || {
            let before = near_hits(&c).await;
            let l = c.cache_get("acme", "k", 0).await.unwrap();
            l.value.is_some() && near_hits(&c).await > before
        },
    )
    .await;
    // Any client's write on the new master reaches this quotad.
    sentinels
        .replica
        .cli(&["HSET", "qd:c:{acme}:k", "v", "after"]);
    assert_eq!(get(&c, "k").await.as_deref(), Some("after"));
    assert!(d.log_contains("near cache tracking lost"));
}

/// A `check_get` whose entry B holds near runs its check in Redis and takes
/// the value from the near cache: B's near hits count it, the check is
/// charged (the limit still denies, and a denied one gets no value), and a
/// change through A is seen by B's next `check_get`. A `check_get`'s own
/// fresh hit is kept near as a `cache_get`'s is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_get_takes_its_value_from_the_near_cache() {
    use quotad::protocol::CheckArgs;
    let redis = Redis::start();
    let policy = r#"
[policies.default]
rules = [{ name = "r", kind = "fixed_window", limit = 3, window_ms = 600000 }]
"#;
    let config = format!("{}{policy}", redis_table(&redis));
    let (a, b) = (Daemon::start(&config), Daemon::start(&config));
    let (ca, cb) = (a.client().await, b.client().await);
    let check_get = async |cb: &Client, user: &str, entry: &str| {
        let args = CheckArgs {
            tenant: "acme".into(),
            key: user.into(),
            policy: None,
            cost: 1,
        };
        let (d, l) = cb.check_get(args, entry, 0).await.unwrap();
        assert!(!d.degraded, "{d:?}");
        let value = l
            .and_then(|l| l.value)
            .map(|v| String::from_utf8(v.to_vec()).unwrap());
        (d.allowed, d.remaining, value)
    };

    ca.cache_set(set("k", "v1", &[])).await.unwrap();
    assert_eq!(near_hit(&cb, "k").await.as_deref(), Some("v1"));
    let before = near_hits(&cb).await;
    assert_eq!(
        check_get(&cb, "user", "k").await,
        (true, 2, Some("v1".into()))
    );
    assert_eq!(
        near_hits(&cb).await,
        before + 1,
        "the value came from the near cache"
    );

    ca.cache_set(set("k", "v2", &[])).await.unwrap();
    assert_eq!(
        check_get(&cb, "user", "k").await,
        (true, 1, Some("v2".into())),
        "a set on A"
    );
    assert_eq!(near_hit(&cb, "k").await.as_deref(), Some("v2"));
    assert_eq!(
        check_get(&cb, "user", "k").await,
        (true, 0, Some("v2".into()))
    );
    assert_eq!(
        check_get(&cb, "user", "k").await,
        (false, 0, None),
        "denied: no value"
    );

    // An entry only check_gets read: the first read keeps it near.
    ca.cache_set(set("j", "w", &[])).await.unwrap();
    let mut user = 0;
    wait_until("a check_get near hit", SOON, async || {
        let before = near_hits(&cb).await;
        user += 1;
        let got = check_get(&cb, &format!("u{user}"), "j").await;
        assert_eq!(got.2.as_deref(), Some("w"));
        near_hits(&cb).await > before
    })
    .await;
    assert!(user >= 2, "the first check_get of j found nothing near");
}
