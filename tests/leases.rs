//! Concurrency rules end to end, through the real daemon: with `limit =
//! 20`, 200 concurrent holders on 4 connections never hold more than 20
//! leases, exactly 20 of a burst get one, and each release lets exactly one
//! more in; on the memory backend, on Redis, and with two quotads on one
//! Redis. A holder that dies without releasing frees its slot after
//! `lease_ms`; a double or malformed release is answered as such.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, Raw, Redis, SOON, code, counters, redis_table, wait_until};
use futures::future::join_all;
use quotad::client::Client;
use quotad::limiter::{Decision, Lease};
use quotad::protocol::CheckArgs;
use serde_json::json;

const LIMIT: u64 = 20;

fn policy(limit: u64, lease_ms: u64) -> String {
    format!(
        r#"
[policies.default]
rules = [{{ name = "inflight", kind = "concurrency", limit = {limit}, lease_ms = {lease_ms} }}]
"#
    )
}

/// 4 connections, spread over `daemons`.
async fn clients(daemons: &[&Daemon]) -> Vec<Arc<Client>> {
    let mut out = Vec::new();
    for i in 0..4 {
        out.push(Arc::new(daemons[i % daemons.len()].client().await));
    }
    out
}

async fn take(c: &Client, key: &str) -> Decision {
    let d = c.check("acme", key, None, 1).await.expect("answered");
    assert!(!d.degraded, "the backend decided");
    assert_eq!(d.lease.is_some(), d.allowed, "a lease exactly when allowed");
    d
}

/// Leases outstanding for `key`, by a peek (which takes none).
async fn outstanding(c: &Client, key: &str) -> u64 {
    let d = c.check("acme", key, None, 0).await.unwrap();
    assert!(d.lease.is_none(), "a peek takes no lease");
    LIMIT - d.remaining
}

/// 200 checks at once, 50 per connection: the leases of those allowed.
async fn burst(clients: &[Arc<Client>], key: &str) -> Vec<Lease> {
    let calls = (clients.iter()).flat_map(|c| (0..50).map(move |_| take(c, key)));
    let decisions = join_all(calls).await;
    decisions.into_iter().filter_map(|d| d.lease).collect()
}

/// Exactly `LIMIT` of a burst of 200 get a lease and then nobody; each
/// release lets exactly one more in; then 200 holders, each taking a lease
/// (retrying until it gets one), holding it a little and releasing it,
/// never hold more than `LIMIT` at once, and all of them get their turn.
async fn holds_exactly_the_limit(daemons: &[&Daemon]) {
    let cs = clients(daemons).await;
    let key = "hot";
    let held = burst(&cs, key).await;
    assert_eq!(held.len() as u64, LIMIT);
    assert_eq!(outstanding(&cs[0], key).await, LIMIT);
    assert!(burst(&cs, key).await.is_empty(), "full: nobody else");
    // A release frees its slot at once: the denial is not remembered.
    for (i, lease) in held[..7].iter().enumerate() {
        let c = &cs[i % cs.len()];
        assert!(c.release("acme", key, None, *lease).await.unwrap());
    }
    assert_eq!(outstanding(&cs[1], key).await, LIMIT - 7);
    assert_eq!(burst(&cs, key).await.len(), 7, "exactly the released slots");
    assert_eq!(outstanding(&cs[2], key).await, LIMIT);

    let key = "holders";
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    // quotad's own count, sampled by peeks while the holders run: never
    // over the limit, and at the limit while holders wait for a slot.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (c, stop) = (cs[3].clone(), stop.clone());
        tokio::spawn(async move {
            let mut counts = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                counts.push(outstanding(&c, key).await);
            }
            counts
        })
    };
    let tasks = (0..200).map(|i| {
        let (c, now, most) = (cs[i % cs.len()].clone(), now.clone(), most.clone());
        tokio::spawn(async move {
            let lease = loop {
                if let Some(lease) = take(&c, key).await.lease {
                    break lease;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            // Counted after the grant and uncounted before the release, so
            // this undercounts what quotad holds, never overcounts it.
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            assert!(c.release("acme", key, None, lease).await.unwrap());
        })
    });
    for t in join_all(tasks).await {
        t.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let counts = sampler.await.unwrap();
    assert!(counts.iter().all(|&n| n <= LIMIT), "{counts:?}");
    let full = counts.iter().filter(|&&n| n == LIMIT).count();
    assert!(
        full > 0,
        "never all {LIMIT} held while holders waited: {counts:?}"
    );
    let most = most.load(Ordering::SeqCst) as u64;
    assert!(most <= LIMIT, "{most} holders at once");
    assert!(most >= 2, "holders did overlap ({most})");
    assert_eq!(outstanding(&cs[3], key).await, 0, "every lease came back");
}

#[tokio::test]
async fn memory_backend_holds_exactly_the_limit() {
    let d = Daemon::start(&policy(LIMIT, 60_000));
    holds_exactly_the_limit(&[&d]).await;
}

#[tokio::test]
async fn redis_backend_holds_exactly_the_limit() {
    let redis = Redis::start();
    let d = Daemon::start(&format!("{}{}", redis_table(&redis), policy(LIMIT, 60_000)));
    holds_exactly_the_limit(&[&d]).await;
}

#[tokio::test]
async fn two_daemons_on_one_redis_hold_exactly_the_limit() {
    let redis = Redis::start();
    let config = format!("{}{}", redis_table(&redis), policy(LIMIT, 60_000));
    let (a, b) = (Daemon::start(&config), Daemon::start(&config));
    holds_exactly_the_limit(&[&a, &b]).await;
}

/// Run as its own process by [`a_dead_holders_lease_expires`] (with
/// `HOLDER_SOCKET` set): takes the lease, says so on stdout, and holds it
/// (connection open, lease in hand) until it is killed. Without the
/// variable (a plain `cargo test -- --ignored`) it does nothing.
#[tokio::test]
#[ignore = "a helper process, started by the dead-holder tests"]
async fn lease_holder_process() {
    let Some(socket) = std::env::var_os("HOLDER_SOCKET") else {
        return;
    };
    let c = Client::connect(&socket)
        .await
        .expect("connecting to quotad");
    let d = c.check("acme", "k", None, 1).await.expect("answered");
    assert!(d.allowed && !d.degraded, "{d:?}");
    println!("HOLDING {}", d.lease.expect("a lease"));
    tokio::time::sleep(Duration::from_secs(60)).await;
    c.release("acme", "k", None, d.lease.unwrap())
        .await
        .unwrap();
}

/// A holder process that takes the only slot and is killed (SIGKILL)
/// while it holds it: the slot frees itself `lease_ms` after it was taken,
/// not before.
async fn a_dead_holders_lease_expires(d: &Daemon) {
    use std::io::BufRead;
    let lease_ms = 1500;
    // This test binary again, running only `lease_holder_process`.
    let mut holder = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lease_holder_process",
            "--ignored",
            "--nocapture",
        ])
        .env("HOLDER_SOCKET", d.socket())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("HOLDING ") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the holder ended");
    }
    // Told after the lease was taken: measuring from here is on the strict side.
    let taken = Instant::now();
    let c = d.client().await;
    let peek = c.check("acme", "k", None, 0).await.unwrap();
    assert_eq!(
        peek.remaining, 0,
        "the holder holds the only slot: {peek:?}"
    );
    let lease = Lease::parse(line["HOLDING ".len()..].trim()).expect("a lease");
    // Holding: the holder is alive, and its lease is still outstanding.
    assert!(holder.try_wait().unwrap().is_none(), "the holder is alive");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let denied = c.check("acme", "k", None, 1).await.unwrap();
    assert!(!denied.allowed);
    assert!(
        denied.retry_after_ms <= lease_ms && denied.retry_after_ms > lease_ms - 1000,
        "{denied:?}"
    );
    wait_until("the dead holder's slot", SOON, async || {
        take(&c, "k").await.allowed
    })
    .await;
    let after = taken.elapsed();
    assert!(after >= Duration::from_millis(lease_ms - 100), "{after:?}");
    assert!(
        !c.release("acme", "k", None, lease).await.unwrap(),
        "the dead holder's lease expired"
    );
}

#[tokio::test]
async fn a_dead_holders_lease_frees_after_lease_ms_in_memory() {
    let d = Daemon::start(&policy(1, 1500));
    a_dead_holders_lease_expires(&d).await;
}

#[tokio::test]
async fn a_dead_holders_lease_frees_after_lease_ms_in_redis() {
    let redis = Redis::start();
    let d = Daemon::start(&format!("{}{}", redis_table(&redis), policy(1, 1500)));
    a_dead_holders_lease_expires(&d).await;
    // The lease set expires with its last lease: nothing stays behind.
    let keys = redis.cli(&["KEYS", "*:n:*"]);
    for key in keys.lines() {
        let ttl: i64 = redis.cli(&["PTTL", key]).parse().unwrap();
        assert!(ttl > 0 && ttl <= 1500 + 1000, "{key}: {ttl}");
    }
}

/// `release` answers what happened: true once, then false; false for an
/// unknown lease and for a policy without concurrency rules; a malformed
/// lease is a `bad_request`. `check_get` takes a lease like `check`.
async fn release_says_what_it_did(d: &Daemon) {
    let c = d.client().await;
    let lease = take(&c, "k").await.lease.unwrap();
    assert!(c.release("acme", "k", None, lease).await.unwrap());
    assert!(!c.release("acme", "k", None, lease).await.unwrap(), "twice");
    assert!(!c.release("acme", "k", None, Lease::mint()).await.unwrap());
    assert!(!c.release("acme", "other", None, lease).await.unwrap());
    assert!(!c.release("acme", "k", Some("plain"), lease).await.unwrap());

    let args = CheckArgs {
        tenant: "acme".into(),
        key: "k".into(),
        policy: None,
        cost: 1,
    };
    let (got, _) = c.check_get(args, "page", 0).await.unwrap();
    let lease = got.lease.expect("check_get takes a lease");
    assert_eq!(outstanding(&c, "k").await, 1);
    assert!(c.release("acme", "k", None, lease).await.unwrap());
    assert_eq!(outstanding(&c, "k").await, 0);

    let mut raw = Raw::connect(&d.socket());
    let frame = |lease: serde_json::Value| json!({"id": 9, "op": "release", "tenant": "acme", "key": "k", "lease": lease});
    for bad in ["", "not-a-lease", &"A".repeat(32), &"0".repeat(33)] {
        raw.send(frame(json!(bad)));
        let reply = raw.recv().unwrap();
        assert_eq!(code(&reply), Some("bad_request"), "{bad:?}: {reply}");
    }
    raw.send(frame(json!(7)));
    assert_eq!(code(&raw.recv().unwrap()), Some("bad_request"));
    raw.send(frame(json!(lease.to_string())));
    let reply = raw.recv().unwrap();
    assert_eq!(reply["released"], json!(false), "{reply}");
    assert_eq!(reply["degraded"], json!(false), "{reply}");
    assert_eq!(counters(&c).await["requests_release"], 7);
}

fn release_config() -> String {
    format!(
        "{}\n[policies.plain]\nrules = [{{ name = \"n\", kind = \"fixed_window\", limit = 5, window_ms = 1000 }}]\n",
        policy(LIMIT, 60_000)
    )
}

#[tokio::test]
async fn release_says_what_it_did_in_memory() {
    let d = Daemon::start(&release_config());
    release_says_what_it_did(&d).await;
}

#[tokio::test]
async fn release_says_what_it_did_in_redis() {
    let redis = Redis::start();
    let d = Daemon::start(&format!("{}{}", redis_table(&redis), release_config()));
    release_says_what_it_did(&d).await;
}

/// With Redis gone, `local` counts leases in quotad's own limiter (marked
/// degraded) and its releases free them there; `open` allows without a
/// lease, and a release then says it could not release anything.
#[tokio::test]
async fn failure_modes_apply_to_leases() {
    let mut redis = Redis::start();
    let config = format!(
        "{}\n[policies.local]\nfailure_mode = \"local\"\nrules = [{{ name = \"inflight\", kind = \"concurrency\", limit = 2, lease_ms = 60000 }}]\n\n[policies.open]\nrules = [{{ name = \"inflight\", kind = \"concurrency\", limit = 2, lease_ms = 60000 }}]\n",
        redis_table(&redis)
    );
    let d = Daemon::start(&config);
    let c = d.client().await;
    let before = c.check("acme", "k", Some("local"), 1).await.unwrap();
    assert!(before.allowed && !before.degraded && before.lease.is_some());
    redis.kill();

    let check = async |policy| c.check("acme", "k", Some(policy), 1).await.unwrap();
    let a = check("local").await;
    let b = check("local").await;
    let full = check("local").await;
    assert!(a.degraded && b.degraded && full.degraded);
    assert!(a.lease.is_some() && b.lease.is_some(), "{a:?} {b:?}");
    assert!(!full.allowed && full.lease.is_none(), "{full:?}");
    assert!(
        c.release("acme", "k", Some("local"), a.lease.unwrap())
            .await
            .unwrap()
    );
    assert!(
        check("local").await.allowed,
        "the released slot is free locally"
    );
    // Taken from Redis before it went: nothing local to give back.
    let r = c
        .release("acme", "k", Some("local"), before.lease.unwrap())
        .await;
    assert!(!r.unwrap());

    let open = check("open").await;
    assert!(
        open.allowed && open.degraded && open.lease.is_none(),
        "{open:?}"
    );
    let mut raw = Raw::connect(&d.socket());
    let lease = Lease::mint().to_string();
    raw.send(json!({"id": 1, "op": "release", "tenant": "acme", "key": "k", "policy": "open", "lease": lease}));
    let reply = raw.recv().unwrap();
    assert_eq!(reply["released"], json!(false), "{reply}");
    assert_eq!(reply["degraded"], json!(true), "{reply}");
}

/// In a policy of a token bucket and a concurrency rule, through the
/// daemon: a lease refusal charges no token, and a bucket denial takes no
/// lease.
async fn one_decision_for_both_rules(d: &Daemon) {
    let c = d.client().await;
    let check = async || c.check("acme", "both", None, 1).await.unwrap();
    let a = check().await;
    assert!(a.allowed && a.lease.is_some(), "{a:?}");
    let refused = check().await;
    assert!(
        !refused.allowed && refused.rule.as_ref() == "inflight",
        "{refused:?}"
    );
    assert!(
        c.release("acme", "both", None, a.lease.unwrap())
            .await
            .unwrap()
    );
    // The refusal took no token: the bucket's second one is still there.
    let b = check().await;
    assert!(b.allowed && b.lease.is_some(), "{b:?}");
    assert!(
        c.release("acme", "both", None, b.lease.unwrap())
            .await
            .unwrap()
    );
    let empty = check().await;
    assert!(
        !empty.allowed && empty.rule.as_ref() == "burst",
        "{empty:?}"
    );
    assert!(empty.lease.is_none());
    // The bucket's denial took no slot: once a token is back, a check passes.
    let waited = wait_until("a token", SOON, async || {
        let d = check().await;
        if let Some(lease) = d.lease {
            assert!(c.release("acme", "both", None, lease).await.unwrap());
        }
        d.allowed
    })
    .await;
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
}

const BOTH: &str = r#"
[policies.default]
rules = [
  { name = "burst", kind = "token_bucket", capacity = 2, refill_per_sec = 5 },
  { name = "inflight", kind = "concurrency", limit = 1, lease_ms = 60000 },
]
"#;

#[tokio::test]
async fn one_decision_for_both_rules_in_memory() {
    one_decision_for_both_rules(&Daemon::start(BOTH)).await;
}

#[tokio::test]
async fn one_decision_for_both_rules_in_redis() {
    let redis = Redis::start();
    one_decision_for_both_rules(&Daemon::start(&format!("{}{BOTH}", redis_table(&redis)))).await;
    assert_eq!(redis.cli(&["KEYS", "*:n:*"]), "", "no lease is left");
}
