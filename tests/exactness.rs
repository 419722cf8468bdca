//! Exactness under concurrency: with a limit of 50, 200 concurrent checks
//! on 4 connections allow exactly 50, on every backend, and also when two
//! quotad processes share one Redis.

mod common;

use common::{Daemon, Redis, redis_table};
use futures::future::join_all;

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "n", kind = "token_bucket", capacity = 50, refill_per_sec = 0.0001 }]
"#;

/// Fires 200 checks at once, 50 per connection, spread over `daemons`;
/// returns how many were allowed (and asserts none failed).
async fn allowed_of_200(daemons: &[&Daemon]) -> usize {
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(daemons[i % daemons.len()].client().await);
    }
    let calls = clients
        .iter()
        .flat_map(|c| (0..50).map(move |_| c.check("acme", "hot-key", None, 1)));
    let decisions = join_all(calls).await;
    decisions
        .into_iter()
        .map(|d| d.expect("every check is answered"))
        .inspect(|d| assert!(!d.degraded, "Redis decided every check"))
        .filter(|d| d.allowed)
        .count()
}

/// The memory backend allows exactly 50 of 200 concurrent checks.
#[tokio::test]
async fn memory_backend_allows_exactly_the_limit() {
    let d = Daemon::start(POLICY);
    assert_eq!(allowed_of_200(&[&d]).await, 50);
}

/// The Redis backend allows exactly 50 of 200 concurrent checks, then none.
#[tokio::test]
async fn redis_backend_allows_exactly_the_limit() {
    let redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICY}", redis_table(&redis)));
    assert_eq!(allowed_of_200(&[&d]).await, 50);
    // Later checks stay denied, whichever shard or connection asks.
    assert_eq!(allowed_of_200(&[&d]).await, 0);
}

/// Two quotads sharing one Redis allow exactly 50 of 200 checks between
/// them.
#[tokio::test]
async fn two_daemons_sharing_one_redis_allow_exactly_the_limit() {
    let redis = Redis::start();
    let config = format!("{}{POLICY}", redis_table(&redis));
    let a = Daemon::start(&config);
    let b = Daemon::start(&config);
    assert_eq!(allowed_of_200(&[&a, &b]).await, 50);
}
