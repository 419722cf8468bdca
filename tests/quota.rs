//! Per-tenant quotas end to end: plans from each source of truth (the
//! config file, Redis, PostgreSQL), the two-level quota cache, changes
//! taking effect (after the TTL, or at once through `quotad tenant set`),
//! a source that goes down, bad records, and admin safety.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Postgres, Redis, SOON, counters, redis_table, wait_until};
use futures::future::join_all;
use quotad::client::Client;

const POLICIES: &str = r#"
[policies.default]
rules = [{ name = "r", kind = "token_bucket", capacity = 5, refill_per_sec = 0.001 }]
[policies.api]
rules = [
  { name = "burst", kind = "token_bucket", capacity = 10, refill_per_sec = 0.001 },
  { name = "daily", kind = "daily_quota", limit = 1000 },
]
[plans.free]
[plans.free.limits]
api.burst.capacity = 10
[plans.pro]
default_policy = "api"
[plans.pro.limits]
api.burst.capacity = 1000
"api.daily.limit" = 1000000
"#;

/// The `limit` a check of `tenant` reports (policy `api` unless `None`).
async fn limit(c: &Client, tenant: &str, policy: Option<&str>) -> u64 {
    let d = c.check(tenant, "k", policy, 0).await.unwrap();
    assert!(!d.degraded, "{d:?}");
    d.limit
}

fn cli(d: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = d.tenant_cli(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With the `file` source, tenants get their plan's limits, their own
/// overrides and their plan's default policy; SIGHUP re-reads the plans.
#[tokio::test]
async fn plans_from_the_config_file_give_tenants_their_own_limits() {
    let d = Daemon::start(&format!(
        r#"
[quota]
source = "file"
{POLICIES}
[tenants]
acme = "pro"
free-42 = "free"
big = {{ plan = "pro", limits = {{ "api.burst.capacity" = 5000 }} }}
"#
    ));
    let c = d.client().await;
    assert_eq!(limit(&c, "acme", Some("api")).await, 1000);
    assert_eq!(limit(&c, "free-42", Some("api")).await, 10);
    assert_eq!(
        limit(&c, "big", Some("api")).await,
        5000,
        "a tenant's own override"
    );
    assert_eq!(
        limit(&c, "stranger", Some("api")).await,
        10,
        "unknown: the default plan"
    );
    // A plan names the policy of requests that name none.
    assert_eq!(limit(&c, "acme", None).await, 1000);
    assert_eq!(limit(&c, "free-42", None).await, 5);
    assert_eq!(counters(&c).await["quota_default_plan"], 1);

    // `tenant get` shows the file's record; `set` is for the redis source.
    let (ok, out, _) = cli(&d, &["get", "big"]);
    assert!(
        ok && out.contains("big plan=pro api.burst.capacity=5000"),
        "{out}"
    );
    let (ok, _, err) = cli(&d, &["set", "acme", "--plan", "free"]);
    assert!(
        !ok && err.contains("bad_request") && err.contains("file"),
        "{err}"
    );

    // SIGHUP re-reads the file: acme moves to free.
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        config.replace("acme = \"pro\"", "acme = \"free\""),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_until("the reload", SOON, async || {
        d.log_contains("reloaded policies")
    })
    .await;
    assert_eq!(limit(&c, "acme", Some("api")).await, 10);
}

/// `quotad tenant` manages the `redis` source in its documented layout, a
/// change applies at once on every quotad, and bad records are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_source_is_managed_with_quotad_tenant_and_changes_apply_at_once_everywhere() {
    let redis = Redis::start();
    let config = format!(
        "{}[quota]\nsource = \"redis\"\ncache_ttl_ms = 60000\n{POLICIES}",
        redis_table(&redis)
    );
    let (a, b) = (Daemon::start(&config), Daemon::start(&config));
    let (ca, cb) = (a.client().await, b.client().await);
    assert_eq!(
        limit(&ca, "acme", Some("api")).await,
        10,
        "unknown yet: default plan"
    );
    assert_eq!(limit(&cb, "acme", Some("api")).await, 10);

    let (ok, _, err) = cli(
        &a,
        &[
            "set",
            "acme",
            "--plan",
            "pro",
            "--limit",
            "api.burst.capacity=2000",
        ],
    );
    assert!(ok, "{err}");
    // At once on the daemon that made the change, and (by announcement,
    // despite a 60 s cache TTL) on the other one.
    assert_eq!(limit(&ca, "acme", Some("api")).await, 2000);
    wait_until(
        "the other daemon to take the new plan",
        Duration::from_secs(2),
        async || limit(&cb, "acme", Some("api")).await == 2000,
    )
    .await;
    // The documented Redis layout.
    assert_eq!(redis.cli(&["HGET", "qd:tenant:{acme}", "plan"]), "pro");
    assert_eq!(
        redis.cli(&["HGET", "qd:tenant:{acme}", "limit:api.burst.capacity"]),
        "2000"
    );

    let (_, out, _) = cli(&b, &["list"]);
    assert_eq!(out.trim(), "acme plan=pro api.burst.capacity=2000");
    let (ok, _, _) = cli(&b, &["delete", "acme"]);
    assert!(ok);
    assert_eq!(limit(&cb, "acme", Some("api")).await, 10);
    let (_, out, _) = cli(&a, &["get", "acme"]);
    assert!(out.contains("unknown to the source"), "{out}");

    // Bad records are refused before they reach the source.
    let (ok, _, err) = cli(&a, &["set", "acme", "--plan", "platinum"]);
    assert!(!ok && err.contains("no plan `platinum`"), "{err}");
    for (limit, why) in [
        ("api.nope.capacity=5", "has no rule `nope`"),
        ("api.burst.capacity=lots", "not a number"),
    ] {
        let (ok, _, err) = cli(&a, &["set", "acme", "--plan", "pro", "--limit", limit]);
        assert!(!ok && err.contains(why), "{err}");
    }
    assert_eq!(redis.cli(&["EXISTS", "qd:tenant:{acme}"]), "0");
}

fn postgres_table(pg: &Postgres) {
    pg.psql(
        "CREATE TABLE quotad_tenants (tenant text PRIMARY KEY, plan text NOT NULL, limits jsonb);
         INSERT INTO quotad_tenants VALUES ('acme', 'pro', NULL), ('free-42', 'free', NULL),
           ('big', 'pro', '{\"api.burst.capacity\": 5000}'), ('odd', 'platinum', NULL),
           ('broken', 'pro', '{\"api.burst.capacity\": \"lots\"}');",
    );
}

fn postgres_config(redis: &Redis, pg: &Postgres, ttl_ms: u64) -> String {
    format!(
        "{}[quota]\nsource = \"postgres\"\ncache_ttl_ms = {ttl_ms}\n[quota.postgres]\nurl = {:?}\n{POLICIES}",
        redis_table(redis),
        pg.url()
    )
}

/// A plan changed in PostgreSQL is enforced once the cache TTL has passed
/// (within 2.5 s of a 1 s TTL); until then the cached plan holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_changed_in_postgres_is_enforced_after_the_cache_ttl() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    postgres_table(&pg);
    let d = Daemon::start(&postgres_config(&redis, &pg, 1000));
    let c = d.client().await;
    assert_eq!(limit(&c, "acme", Some("api")).await, 1000);
    assert_eq!(limit(&c, "big", Some("api")).await, 5000);
    assert_eq!(limit(&c, "free-42", Some("api")).await, 10);
    // The Redis level holds what the source said.
    let cached = redis.cli(&["GET", "qd:tenant_quota_cache:{acme}"]);
    assert!(cached.contains("\"plan\":\"pro\""), "{cached}");

    pg.psql("UPDATE quotad_tenants SET plan = 'free' WHERE tenant = 'acme'");
    let changed = Instant::now();
    assert_eq!(limit(&c, "acme", Some("api")).await, 1000, "still cached");
    wait_until(
        "the change to be enforced after the TTL",
        Duration::from_millis(2500).saturating_sub(changed.elapsed()),
        async || limit(&c, "acme", Some("api")).await == 10,
    )
    .await;
    println!(
        "the change was enforced {:?} after the update (TTL 1 s)",
        changed.elapsed()
    );
}

/// 1,000 concurrent checks of a tenant not cached make one source lookup
/// and one Redis-level miss; the next check hits the local level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_checks_for_a_cold_tenant_make_one_lookup() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    postgres_table(&pg);
    let d = Daemon::start(&postgres_config(&redis, &pg, 30_000));
    let clients = join_all((0..4).map(|_| d.client())).await;
    let before = counters(&clients[0]).await;
    let checks = clients.iter().flat_map(|c| {
        (0..250)
            .map(move |i| async move { c.check("acme", &format!("k{i}"), Some("api"), 1).await })
    });
    let decisions = join_all(checks).await;
    assert!(decisions.iter().all(|d| d.as_ref().unwrap().limit == 1000));
    let after = counters(&clients[0]).await;
    assert_eq!(
        after["quota_source_lookups"] - before["quota_source_lookups"],
        1
    );
    assert_eq!(
        after["quota_redis_misses"] - before["quota_redis_misses"],
        1
    );
    // Each check met the local level once: waiting for the lookup (a
    // miss), or, if it arrived after the lookup came back, a hit.
    let delta = |name: &str| after[name] - before[name];
    assert!(delta("quota_local_misses") >= 1);
    assert_eq!(
        delta("quota_local_misses") + delta("quota_local_hits"),
        1000
    );
    // The next ones come from the local level.
    limit(&clients[0], "acme", Some("api")).await;
    let later = counters(&clients[0]).await;
    assert_eq!(later["quota_local_hits"] - after["quota_local_hits"], 1);
}

/// With PostgreSQL down, known tenants keep their plans past the TTL
/// without waiting on lookups, new ones get the default, and it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_the_last_known_plans_stay_in_force() {
    let (redis, mut pg) = (Redis::start(), Postgres::start());
    postgres_table(&pg);
    let d = Daemon::start(&postgres_config(&redis, &pg, 300));
    let c = d.client().await;
    assert_eq!(limit(&c, "acme", Some("api")).await, 1000);
    pg.stop();
    redis.cli(&["FLUSHALL"]); // no help from the Redis level either
    let before = counters(&c).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        // Well past the TTL: every check is answered, under the known plan.
        assert_eq!(limit(&c, "acme", Some("api")).await, 1000);
        // Time passing (five TTLs) is what is under test; this paces it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... from the stale entry, never waiting for another failing lookup.
    assert_eq!(
        counters(&c).await["quota_local_misses"],
        before["quota_local_misses"]
    );
    assert_eq!(
        limit(&c, "never-seen", Some("api")).await,
        10,
        "new tenants: the default plan"
    );
    let stats = counters(&c).await;
    assert!(
        stats["quota_source_errors"] > 0 && stats["quota_local_stale"] > 0,
        "{stats:?}"
    );
    assert!(d.log_contains("tenant source unavailable"));
    // Back up: lookups succeed again by themselves.
    pg.restart();
    pg.psql("UPDATE quotad_tenants SET plan = 'free' WHERE tenant = 'acme'");
    wait_until("lookups to recover", Duration::from_secs(5), async || {
        limit(&c, "acme", Some("api")).await == 10
    })
    .await;
}

/// Bad records and an SQL-injecting tenant name get the default plan,
/// counted and logged; `tenant get` still shows the source's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_and_hostile_tenant_names_fall_back_to_the_default_plan() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    postgres_table(&pg);
    let d = Daemon::start(&postgres_config(&redis, &pg, 30_000));
    let c = d.client().await;
    assert_eq!(
        limit(&c, "odd", Some("api")).await,
        10,
        "unknown plan `platinum`"
    );
    assert_eq!(
        limit(&c, "broken", Some("api")).await,
        10,
        "a malformed override"
    );
    let hostile = "x'); DROP TABLE quotad_tenants; --";
    assert_eq!(limit(&c, hostile, Some("api")).await, 10);
    assert_eq!(
        pg.psql("SELECT count(*) FROM quotad_tenants"),
        "5",
        "parameterised queries only"
    );
    let stats = counters(&c).await;
    assert_eq!(stats["quota_bad_records"], 2, "{stats:?}");
    assert!(d.log_contains("bad tenant record"));
    // `tenant get` reports the source's own record, bad or not.
    let (_, out, _) = cli(&d, &["get", "odd"]);
    assert!(out.contains("plan=platinum"), "{out}");
}

/// Admin ops are `forbidden` to a user not in `admin.allowed_uids`; other
/// ops are unaffected.
#[tokio::test]
async fn admin_ops_are_refused_to_users_not_allowed() {
    let d = Daemon::start(&format!(
        "[admin]\nallowed_uids = [4242]\n[quota]\nsource = \"file\"\n{POLICIES}"
    ));
    let (ok, _, err) = cli(&d, &["list"]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    // Everything else is unaffected.
    assert_eq!(limit(&d.client().await, "acme", Some("api")).await, 10);
}
