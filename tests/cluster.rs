//! Redis Cluster: a batch splits into one script call per slot group, each
//! routed to the node that owns it; decisions stay exact.

mod common;

use common::{Cluster, Daemon};
use futures::future::join_all;

/// On a 3-master Redis Cluster checks stay exact (one hot key, and 300
/// tenants at once), spread over every master, with batches split by slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_exact_and_spread_over_all_three_masters() {
    let cluster = Cluster::start();
    // A generous deadline: a round trip cut short on a busy CI machine
    // would be answered by failure mode (open), which is not what this
    // test is about.
    let d = Daemon::start(&format!(
        "[redis]\ncluster = {:?}\ntimeout_ms = 2000\n[policies.default]\nrules = [{{ name = \"n\", kind = \"token_bucket\", capacity = 50, refill_per_sec = 0.0001 }}]\n",
        cluster.urls()
    ));
    let clients = join_all((0..4).map(|_| d.client())).await;

    // One hot key: exactly the limit, from 200 concurrent checks.
    let hot = join_all(
        clients
            .iter()
            .flat_map(|c| (0..50).map(move |_| c.check("acme", "hot", None, 1))),
    )
    .await;
    let allowed = hot.iter().filter(|d| d.as_ref().unwrap().allowed).count();
    assert_eq!(allowed, 50);

    // 300 tenants at once, 60 checks each with a limit of 50.
    let per_tenant = join_all((0..300).map(|t| {
        let clients = &clients;
        async move {
            let tenant = format!("tenant-{t}");
            let checks = clients
                .iter()
                .flat_map(|c| (0..15).map(|_| c.check(&tenant, "k", None, 1)));
            join_all(checks)
                .await
                .into_iter()
                .filter(|d| d.as_ref().unwrap().allowed)
                .count()
        }
    }))
    .await;
    assert!(per_tenant.iter().all(|&n| n == 50), "{per_tenant:?}");

    for node in &cluster.nodes {
        let keys: u64 = node.cli(&["DBSIZE"]).parse().unwrap();
        assert!(
            keys > 50,
            "a master holds only {keys} keys: slots were not spread"
        );
    }
    let stats = clients[0].stats().await.unwrap().counters.unwrap();
    assert!(
        stats["script_calls"] > stats["batches"],
        "batches were split by slot: {stats:?}"
    );
    assert_eq!(stats["degraded"], 0);
}

/// On a Redis Cluster, cache sets, gets, `check_get`, deletes by tag and
/// stale refreshes work for tenants on every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_works_across_the_masters() {
    let cluster = Cluster::start();
    let d = Daemon::start(&format!(
        "[redis]\ncluster = {:?}\ntimeout_ms = 2000\n[policies.default]\nrules = [{{ name = \"n\", kind = \"token_bucket\", capacity = 1000, refill_per_sec = 1 }}]\n",
        cluster.urls()
    ));
    let c = d.client().await;
    let set = |tenant: String, key: &str, stale_ms| quotad::protocol::CacheSetArgs {
        tenant,
        key: key.into(),
        value: bytes::Bytes::from(format!("{key} value")),
        ttl_ms: 60_000,
        stale_ms,
        tags: vec!["shared".into()],
    };
    let tenants: Vec<String> = (0..30).map(|t| format!("tenant-{t}")).collect();
    for t in &tenants {
        for k in ["a", "b"] {
            assert!(!c.cache_set(set(t.clone(), k, 0)).await.unwrap());
        }
    }
    for t in &tenants {
        let l = c.cache_get(t, "a", 0).await.unwrap();
        assert_eq!(l.value.as_deref(), Some(&b"a value"[..]), "{t}");
        let check = quotad::protocol::CheckArgs {
            tenant: t.clone(),
            key: "user".into(),
            policy: None,
            cost: 1,
        };
        let (decision, lookup) = c.check_get(check, "b", 0).await.unwrap();
        assert!(decision.allowed && !decision.degraded);
        assert_eq!(lookup.unwrap().value.as_deref(), Some(&b"b value"[..]));
    }
    // Deleting by tag stays within the tenant, wherever its slot lives.
    assert_eq!(c.cache_del("tenant-0", &[], &["shared"]).await.unwrap(), 2);
    assert!(
        c.cache_get("tenant-0", "a", 0)
            .await
            .unwrap()
            .value
            .is_none()
    );
    assert!(
        c.cache_get("tenant-1", "a", 0)
            .await
            .unwrap()
            .value
            .is_some()
    );
    // A stale read that must take the refresh lock goes through the script.
    let mut stale = set("tenant-2".into(), "s", 5_000);
    stale.ttl_ms = 50;
    c.cache_set(stale).await.unwrap();
    // The 50 ms TTL passing (into the stale period) is under test.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let l = c.cache_get("tenant-2", "s", 0).await.unwrap();
    assert!(l.stale && l.refresh, "{l:?}");
    for node in &cluster.nodes {
        let keys: u64 = node.cli(&["DBSIZE"]).parse().unwrap();
        assert!(keys > 0, "every master holds some of the entries");
    }
}

/// On a Redis Cluster, leases of a policy with a token bucket and a
/// concurrency rule are taken and released for tenants on every master
/// (the lease set shares its tenant's hash tag), exactly, in mixed batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_exact_across_the_masters() {
    let cluster = Cluster::start();
    let d = Daemon::start(&format!(
        "[redis]\ncluster = {:?}\ntimeout_ms = 2000\n[policies.default]\nrules = [{{ name = \"n\", kind = \"token_bucket\", capacity = 1000, refill_per_sec = 1 }}, {{ name = \"inflight\", kind = \"concurrency\", limit = 3, lease_ms = 60000 }}]\n",
        cluster.urls()
    ));
    let clients = join_all((0..4).map(|_| d.client())).await;
    let per_tenant = join_all((0..60).map(|t| {
        let clients = &clients;
        async move {
            let tenant = format!("tenant-{t}");
            let checks = clients
                .iter()
                .flat_map(|c| (0..3).map(|_| c.check(&tenant, "k", None, 1)));
            let leases: Vec<_> = join_all(checks)
                .await
                .into_iter()
                .filter_map(|d| d.unwrap().lease)
                .collect();
            assert_eq!(leases.len(), 3, "{tenant}");
            for lease in &leases {
                assert!(
                    clients[0]
                        .release(&tenant, "k", None, *lease)
                        .await
                        .unwrap()
                );
            }
            let peek = clients[1].check(&tenant, "k", None, 0).await.unwrap();
            (peek.remaining, leases.len())
        }
    }))
    .await;
    assert!(per_tenant.iter().all(|&p| p == (3, 3)), "{per_tenant:?}");
    let stats = clients[0].stats().await.unwrap().counters.unwrap();
    assert_eq!(stats["degraded"], 0);
    for node in &cluster.nodes {
        let keys: u64 = node.cli(&["DBSIZE"]).parse().unwrap();
        assert!(keys > 0, "every master holds some tenants' state");
    }
}
