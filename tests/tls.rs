//! quotad to Redis over TLS (rustls), against real `redis-server`s that
//! speak only TLS: a single server, a 3-node Cluster with a TLS bus, and
//! Sentinels with a TLS master, each with and without mutual TLS.

mod common;

use std::time::Duration;

use common::{Certs, Cluster, Daemon, Redis, SOON, SentinelSet, counters, wait_until};

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 1000, refill_per_sec = 1 }]
"#;

/// `[redis]` keys plus the TLS file names given, e.g. `("tls_ca_file", "ca.crt")`.
fn redis_table(certs: &Certs, addresses: &str, files: &[(&str, &str)]) -> String {
    let mut t = format!("[redis]\n{addresses}\ntimeout_ms = 500\nprobe_interval_ms = 50\n");
    for (key, file) in files {
        t += &format!("{key} = {}\n", certs.toml(file));
    }
    t + POLICY
}

/// `n` checks on different tenants, each decided by Redis (not degraded).
async fn checks_reach_redis(d: &Daemon, n: usize) {
    let client = d.client().await;
    for i in 0..n {
        let r = client
            .check(&format!("tenant-{i}"), "k", None, 1)
            .await
            .unwrap();
        assert!(
            r.allowed && !r.degraded,
            "check {i}: {r:?}; log: {:?}",
            d.stderr.lock().unwrap()
        );
    }
}

#[tokio::test]
async fn rediss_with_a_ca_file_decides_in_redis() {
    let certs = Certs::generate();
    let redis = Redis::start_tls(&certs, false, &[]);
    let port = redis.tls_port;
    let url = format!("url = \"rediss://127.0.0.1:{port}\"");
    let d = Daemon::start(&redis_table(&certs, &url, &[("tls_ca_file", "ca.crt")]));
    checks_reach_redis(&d, 20).await;
    assert!(redis.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 20);
    assert!(d.log_contains("connected, batch code loaded"));
    // The same Redis by name (`localhost` is in the certificate too).
    let url = format!("url = \"rediss://localhost:{port}\"");
    let by_name = Daemon::start(&redis_table(&certs, &url, &[("tls_ca_file", "ca.crt")]));
    checks_reach_redis(&by_name, 3).await;
}

#[test]
fn a_server_certificate_not_signed_by_the_ca_fails_start_up() {
    let certs = Certs::generate();
    let redis = Redis::start_tls(&certs, false, &[]);
    let port = redis.tls_port;
    let url = format!("url = \"rediss://127.0.0.1:{port}\"");
    let (status, log) = Daemon::start_fails(&redis_table(
        &certs,
        &url,
        &[("tls_ca_file", "other-ca.crt")],
    ));
    assert_eq!(status.code(), Some(2), "{log}");
    let wanted = format!(
        "Redis TLS: the server's certificate is not trusted with tls_ca_file {}: invalid peer certificate: UnknownIssuer",
        certs.path("other-ca.crt").display()
    );
    assert!(log.contains(&wanted), "{log}");
    // A CA file that is not a certificate names the field and the file.
    let (status, log) =
        Daemon::start_fails(&redis_table(&certs, &url, &[("tls_ca_file", "server.key")]));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(&format!(
            "`redis.tls_ca_file`: {}",
            certs.path("server.key").display()
        )),
        "{log}"
    );
}

/// The client certificate files of mutual TLS, with the CA.
const MUTUAL: [(&str, &str); 3] = [
    ("tls_ca_file", "ca.crt"),
    ("tls_cert_file", "client.crt"),
    ("tls_key_file", "client.key"),
];

/// `addresses` of servers that require a client certificate: with it
/// checks are decided by Redis. Without it Redis ends the handshake: an
/// outage answered by the failure mode (open here), not a start-up
/// failure, logged once however many round trips fail.
async fn mutual_tls_is_required(certs: &Certs, addresses: &str) {
    let d = Daemon::start(&redis_table(certs, addresses, &MUTUAL));
    checks_reach_redis(&d, 10).await;

    // A breaker that never opens: every check tries a handshake of its own.
    let addresses = format!("{addresses}\nbreaker_failures = 1000");
    let without = Daemon::start(&redis_table(
        certs,
        &addresses,
        &[("tls_ca_file", "ca.crt")],
    ));
    let client = without.client().await;
    for i in 0..5 {
        let r = client
            .check(&format!("other-{i}"), "k", None, 1)
            .await
            .unwrap();
        assert!(r.allowed && r.degraded, "{r:?}");
    }
    assert!(counters(&client).await["redis_errors"] >= 5);
    let failed = "Redis TLS handshake failed";
    common::wait_until_blocking("the handshake failure logged", SOON, || {
        without.log_contains(failed)
    });
    let lines: Vec<String> = (without.stderr.lock().unwrap().iter())
        .filter(|l| l.contains(failed))
        .cloned()
        .collect();
    assert_eq!(lines.len(), 1, "logged once: {lines:?}");
    assert!(lines[0].contains("CertificateRequired"), "{}", lines[0]);
}

#[tokio::test]
async fn mutual_tls_works_with_the_client_certificate_and_is_refused_without() {
    let certs = Certs::generate();
    let redis = Redis::start_tls(&certs, true, &[]);
    mutual_tls_is_required(&certs, &format!("url = {:?}", redis.tcp_url())).await;
    assert!(redis.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 10);
}

#[tokio::test]
async fn a_tls_cluster_with_mutual_tls() {
    let certs = Certs::generate();
    let cluster = Cluster::start_tls(&certs, true);
    mutual_tls_is_required(&certs, &format!("cluster = {:?}", cluster.urls())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_their_master_with_mutual_tls() {
    let certs = Certs::generate();
    let set = SentinelSet::start_tls(&certs, true, None);
    let addrs = format!(
        "sentinels = {:?}\nmaster_name = {:?}",
        set.urls(),
        common::MASTER_NAME
    );
    mutual_tls_is_required(&certs, &addrs).await;
    assert!(set.master.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 10);
}

/// `tls_server_name`: a certificate only for `redis.test`, reached at
/// 127.0.0.1, is checked against that name, by the checks and by the
/// tenant-change subscription, with mutual TLS, and again after Redis
/// restarts. Without the name, or with another, start-up fails.
#[tokio::test]
async fn tls_server_name_checks_the_certificate_against_that_name() {
    let certs = Certs::generate_for("DNS:redis.test");
    let mut redis = Redis::start_tls(&certs, true, &[]);
    let url = format!("url = {:?}", redis.tcp_url());
    let named = |name: &str| {
        let table = redis_table(&certs, &format!("{url}\n{name}"), &MUTUAL);
        table + "[quota]\nsource = \"redis\"\n"
    };
    let d = Daemon::start(&named("tls_server_name = \"redis.test\""));
    checks_reach_redis(&d, 5).await;
    let subscribed = || {
        redis
            .cli(&["PUBSUB", "CHANNELS"])
            .contains("tenant-changes")
    };
    common::wait_until_blocking("the tenant-change subscription", SOON, subscribed);
    redis.restart();
    wait_until("checks decided by the restarted Redis", SOON, async || {
        let r = d.client().await.check("again", "k", None, 1).await.unwrap();
        !r.degraded
    })
    .await;

    let ca = certs.path("ca.crt").display().to_string();
    for (key, name) in [
        ("", "127.0.0.1"),
        ("tls_server_name = \"other.test\"", "other.test"),
    ] {
        let (status, log) = Daemon::start_fails(&named(key));
        assert_eq!(status.code(), Some(2), "{log}");
        let wanted = format!(
            "Redis TLS: the server's certificate is not trusted with tls_ca_file {ca}: \
             invalid peer certificate: certificate not valid for name \"{name}\"; \
             certificate is only valid for DnsName(\"redis.test\")"
        );
        assert!(log.contains(&wanted), "{log}");
    }
}

#[tokio::test]
async fn tls_insecure_checks_no_certificate_and_says_so() {
    let certs = Certs::generate();
    let redis = Redis::start_tls(&certs, false, &[]);
    let port = redis.tls_port;
    let url = format!("url = \"rediss://127.0.0.1:{port}\"\ntls_insecure = true");
    let d = Daemon::start(&redis_table(&certs, &url, &[]));
    checks_reach_redis(&d, 3).await;
    assert!(d.log_contains("the Redis server's certificate is NOT checked"));
}

#[tokio::test]
async fn a_tls_cluster_decides_in_redis() {
    let certs = Certs::generate();
    let cluster = Cluster::start_tls(&certs, false);
    let seeds = format!("cluster = {:?}", cluster.urls());
    let d = Daemon::start(&redis_table(&certs, &seeds, &[("tls_ca_file", "ca.crt")]));
    checks_reach_redis(&d, 60).await;
    // Tenants landed on every node (60 tenants over 3 masters).
    for node in &cluster.nodes {
        assert!(node.cli(&["DBSIZE"]).parse::<u64>().unwrap() > 0);
    }
    let (status, log) = Daemon::start_fails(&redis_table(
        &certs,
        &seeds,
        &[("tls_ca_file", "other-ca.crt")],
    ));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("not trusted with tls_ca_file"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_their_master_over_tls_through_a_failover() {
    let certs = Certs::generate();
    let mut set = SentinelSet::start_tls(&certs, false, None);
    let addrs = format!(
        "sentinels = {:?}\nmaster_name = {:?}",
        set.urls(),
        common::MASTER_NAME
    );
    let (status, log) = Daemon::start_fails(&redis_table(
        &certs,
        &addrs,
        &[("tls_ca_file", "other-ca.crt")],
    ));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("not trusted with tls_ca_file"), "{log}");

    let d = Daemon::start(&redis_table(&certs, &addrs, &[("tls_ca_file", "ca.crt")]));
    checks_reach_redis(&d, 10).await;
    assert!(set.master.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 10);
    // The master dies: Sentinel promotes the replica, and quotad finds it
    // (over TLS) by itself.
    common::wait_until_blocking("replication", SOON, || {
        set.replica.cli(&["DBSIZE"]) == set.master.cli(&["DBSIZE"])
    });
    let replica_port = set.replica.tls_port.to_string();
    let before: u64 = set.replica.cli(&["DBSIZE"]).parse().unwrap();
    set.master.kill();
    let client = d.client().await;
    wait_until(
        "a Redis decision after the failover",
        Duration::from_secs(30),
        async || !client.check("after", "k", None, 1).await.unwrap().degraded,
    )
    .await;
    set.wait_for_master(&replica_port);
    // The decision was written to the promoted replica.
    assert!(set.replica.cli(&["DBSIZE"]).parse::<u64>().unwrap() > before);
}
