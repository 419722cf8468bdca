//! The Rust client: pipelining on one connection, failing open (or
//! closed) within its timeout when quotad is gone, reconnecting by itself,
//! and refusing bad values before sending anything.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, counters, wait_until};
use futures::future::join_all;
use quotad::client::{Client, ClientError, ClientOptions, FailureMode};
use quotad::protocol::{CacheSetArgs, CheckArgs};

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "n", kind = "token_bucket", capacity = 50, refill_per_sec = 0.0001 }]
"#;

fn options(failure_mode: FailureMode) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_millis(200),
        failure_mode,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..ClientOptions::default()
    }
}

/// 200 concurrent calls on one client are exact (50 allowed) and use one
/// connection.
#[tokio::test]
async fn many_concurrent_calls_share_one_connection() {
    let d = Daemon::start(POLICY);
    let c = Client::new(d.socket(), ClientOptions::default());
    let decisions = join_all((0..200).map(|_| c.check("acme", "k", None, 1))).await;
    assert_eq!(
        decisions
            .iter()
            .filter(|d| d.as_ref().unwrap().allowed)
            .count(),
        50
    );
    let stats = counters(&c).await;
    assert_eq!(stats["connections_total"], 1);
}

/// With quotad gone, `FailureMode::Open` answers allowed and degraded
/// within the timeout; after a restart the client reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_sidecar_fails_open_within_the_timeout_then_reconnects() {
    let mut d = Daemon::start(POLICY);
    let c = Client::new(d.socket(), options(FailureMode::Open));
    assert!(!c.check("acme", "k", None, 1).await.unwrap().degraded);
    d.kill();
    for _ in 0..5 {
        let started = Instant::now();
        let decision = c.check("acme", "k", None, 1).await.unwrap();
        assert!(decision.allowed && decision.degraded, "{decision:?}");
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        let l = c.cache_get("acme", "page", 0).await.unwrap();
        assert!(l.degraded && l.value.is_none());
    }
    d.restart();
    wait_until(
        "the client to reconnect",
        Duration::from_secs(3),
        async || !c.check("acme", "k", None, 1).await.unwrap().degraded,
    )
    .await;
}

/// With no quotad, `FailureMode::Closed` denies and `FailureMode::Error`
/// raises; `Client::connect` fails at once.
#[tokio::test]
async fn the_failure_mode_can_deny_or_raise() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("none.sock");
    let closed = Client::new(&gone, options(FailureMode::Closed));
    let d = closed.check("acme", "k", None, 1).await.unwrap();
    assert!(!d.allowed && d.degraded && d.retry_after_ms == 1000);
    let raise = Client::new(&gone, options(FailureMode::Error));
    assert!(
        raise
            .check("acme", "k", None, 1)
            .await
            .unwrap_err()
            .is_unreachable()
    );
    assert!(
        Client::connect(&gone).await.is_err(),
        "connect() wants quotad now"
    );
}

/// The client refuses bad values itself (empty names, nothing to delete,
/// a zero TTL): none reaches quotad. Server-side errors still come back
/// as errors.
#[tokio::test]
async fn bad_values_are_refused_before_anything_is_sent() {
    let d = Daemon::start(POLICY);
    let c = Client::connect(d.socket()).await.unwrap();
    let invalid = |r: Result<_, ClientError>| matches!(r, Err(ClientError::Invalid(_)));
    assert!(invalid(c.check("", "k", None, 1).await.map(drop)));
    assert!(invalid(c.cache_get("t", "", 0).await.map(drop)));
    assert!(invalid(c.cache_del("t", &[], &[]).await.map(drop)));
    let set = CacheSetArgs {
        tenant: "t".into(),
        key: "k".into(),
        value: bytes::Bytes::from_static(b"v"),
        ttl_ms: 0,
        stale_ms: 0,
        tags: vec![],
    };
    assert!(invalid(c.cache_set(set).await.map(drop)));
    let check = CheckArgs {
        tenant: "t".into(),
        key: "k".into(),
        policy: None,
        cost: 1,
    };
    assert!(invalid(c.check_get(check, "", 0).await.map(drop)));
    let stats = counters(&c).await;
    assert_eq!(
        stats["requests_check"] + stats["requests_cache_get"] + stats["requests_check_get"],
        0
    );
    // Server-side errors still come back as errors, not as a failure answer.
    let err = c.check("t", "k", Some("nope"), 1).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Server { ref code, .. } if code == "unknown_policy"),
        "{err}"
    );
}
