//! Redis Cluster: a batch splits into one script call per slot group, each
//! routed to the node that owns it; decisions stay exact.

mod common;

use common::{Cluster, Daemon};
use futures::future::join_all;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_exact_and_spread_over_all_three_masters() {
    let cluster = Cluster::start();
    let d = Daemon::start(&format!(
        "[redis]\ncluster = {:?}\ntimeout_ms = 500\n[policies.default]\nrules = [{{ name = \"n\", kind = \"token_bucket\", capacity = 50, refill_per_sec = 0.0001 }}]\n",
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
