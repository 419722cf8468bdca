//! quotad to Redis over TLS (rustls), against real `redis-server`s that
//! speak only TLS: a single server (with and without mutual TLS), a
//! 3-node Cluster with a TLS bus, and Sentinels with a TLS master.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, QUOTAD};
use tls::Certs;

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

/// Runs quotad with `body` and expects it to exit at start: its status
/// and log. Fails if it is still running after 10 s.
fn start_fails(body: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("quotad.toml");
    let socket = dir.path().join("quotad.sock");
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = {:?}\n{body}",
            socket.display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("quotad started although it should not have");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    (status, log)
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
    let (redis, port) = tls::redis(&certs, false, &[]);
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
    let (_redis, port) = tls::redis(&certs, false, &[]);
    let url = format!("url = \"rediss://127.0.0.1:{port}\"");
    let (status, log) = start_fails(&redis_table(
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
    let (status, log) = start_fails(&redis_table(&certs, &url, &[("tls_ca_file", "server.key")]));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(&format!(
            "`redis.tls_ca_file`: {}",
            certs.path("server.key").display()
        )),
        "{log}"
    );
}

#[tokio::test]
async fn mutual_tls_works_with_the_client_certificate_and_is_refused_without() {
    let certs = Certs::generate();
    let (redis, port) = tls::redis(&certs, true, &[]);
    let url = format!("url = \"rediss://127.0.0.1:{port}\"");
    let with = [
        ("tls_ca_file", "ca.crt"),
        ("tls_cert_file", "client.crt"),
        ("tls_key_file", "client.key"),
    ];
    let d = Daemon::start(&redis_table(&certs, &url, &with));
    checks_reach_redis(&d, 10).await;
    assert!(redis.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 10);

    // Without it Redis ends the handshake: an outage, answered by the
    // failure mode (open here), not a start-up failure.
    let without = Daemon::start(&redis_table(&certs, &url, &[("tls_ca_file", "ca.crt")]));
    let client = without.client().await;
    for i in 0..5 {
        let r = client
            .check(&format!("other-{i}"), "k", None, 1)
            .await
            .unwrap();
        assert!(r.allowed && r.degraded, "{r:?}");
    }
    assert!(without.log_contains("not answering ("));
    common::wait_until_blocking("the handshake failure logged", common::SOON, || {
        without.log_contains("Redis TLS handshake failed")
            && without.log_contains("CertificateRequired")
    });
}

#[tokio::test]
async fn tls_insecure_checks_no_certificate_and_says_so() {
    let certs = Certs::generate();
    let (_redis, port) = tls::redis(&certs, false, &[]);
    let url = format!("url = \"rediss://127.0.0.1:{port}\"\ntls_insecure = true");
    let d = Daemon::start(&redis_table(&certs, &url, &[]));
    checks_reach_redis(&d, 3).await;
    assert!(d.log_contains("the Redis server's certificate is NOT checked"));
}

#[tokio::test]
async fn a_tls_cluster_decides_in_redis() {
    let certs = Certs::generate();
    let cluster = tls::Cluster::start(&certs);
    let seeds = format!("cluster = {:?}", cluster.urls());
    let d = Daemon::start(&redis_table(&certs, &seeds, &[("tls_ca_file", "ca.crt")]));
    checks_reach_redis(&d, 60).await;
    // Tenants landed on every node (60 tenants over 3 masters).
    for (node, _) in &cluster.nodes {
        assert!(node.cli(&["DBSIZE"]).parse::<u64>().unwrap() > 0);
    }
    let (status, log) = start_fails(&redis_table(
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
    let mut set = tls::Sentinels::start(&certs, None);
    let addrs = format!(
        "sentinels = {:?}\nmaster_name = {:?}",
        set.urls(),
        common::MASTER_NAME
    );
    let (status, log) = start_fails(&redis_table(
        &certs,
        &addrs,
        &[("tls_ca_file", "other-ca.crt")],
    ));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("not trusted with tls_ca_file"), "{log}");

    let d = Daemon::start(&redis_table(&certs, &addrs, &[("tls_ca_file", "ca.crt")]));
    checks_reach_redis(&d, 10).await;
    assert!(set.master.0.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 10);
    // The master dies: Sentinel promotes the replica, and quotad finds it
    // (over TLS) by itself.
    common::wait_until_blocking("replication", common::SOON, || {
        set.replica.0.cli(&["DBSIZE"]) == set.master.0.cli(&["DBSIZE"])
    });
    let replica_port = set.replica.1.to_string();
    let before: u64 = set.replica.0.cli(&["DBSIZE"]).parse().unwrap();
    set.master.0.kill();
    let client = d.client().await;
    let start = Instant::now();
    while client.check("after", "k", None, 1).await.unwrap().degraded {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no Redis decision after the failover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(set.master_port(&certs), replica_port);
    // The decision was written to the promoted replica.
    assert!(set.replica.0.cli(&["DBSIZE"]).parse::<u64>().unwrap() > before);
}
