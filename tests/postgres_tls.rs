//! The PostgreSQL quota source over TLS: a real PostgreSQL with `ssl = on`
//! and a throwaway certificate, reachable over TCP only with TLS and a
//! password (`hostssl … scram-sha-256`); quotad connects with
//! `sslmode=verify-full` (and `require`), its password read from a file or
//! an environment variable.

mod common;

use std::path::Path;

use common::{Certs, Daemon, Postgres, Raw, SOON, wait_until_blocking};
use quotad::client::Client;

const SECRET: &str = "pg-s3cret-41c9";

const POLICIES: &str = r#"
[policies.api]
rules = [{ name = "burst", kind = "token_bucket", capacity = 10, refill_per_sec = 0.001 }]
[plans.pro]
[plans.pro.limits]
api.burst.capacity = 1000
"#;

/// A PostgreSQL over TLS holding acme on the `pro` plan, and the role's
/// password.
fn postgres(certs: &Certs) -> Postgres {
    let pg = Postgres::start_tls(certs);
    pg.psql(
        "CREATE TABLE quotad_tenants (tenant text PRIMARY KEY, plan text NOT NULL, limits jsonb)",
    );
    pg.psql("INSERT INTO quotad_tenants VALUES ('acme', 'pro', NULL)");
    pg.psql(&format!("ALTER ROLE quotad PASSWORD '{SECRET}'"));
    pg
}

/// `[quota.postgres]` by name (`localhost`) over TCP, then `password`
/// (e.g. `password_file = "…"`).
fn config(port: u16, sslmode: &str, ca: &str, password: &str) -> String {
    format!(
        "[quota]\nsource = \"postgres\"\n[quota.postgres]\n\
         url = \"host=localhost port={port} user=quotad dbname=postgres sslmode={sslmode}\"\n\
         {ca}{password}\n{POLICIES}"
    )
}

fn password_file(file: &Path) -> String {
    format!("password_file = {:?}", file.display().to_string())
}

async fn limit(c: &Client) -> u64 {
    c.check("acme", "k", Some("api"), 0).await.unwrap().limit
}

/// The log of `d` has no line with the password.
fn assert_password_never_logged(d: &Daemon) {
    for line in d.stderr.lock().unwrap().iter() {
        assert!(
            !line.contains(SECRET),
            "a log line shows the password: {line}"
        );
    }
}

#[tokio::test]
async fn the_postgres_source_connects_with_verify_full() {
    let certs = Certs::generate();
    let pg = postgres(&certs);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pg-password");
    std::fs::write(&pw, format!("{SECRET}\n")).unwrap();
    let ca = |f: &str| format!("tls_ca_file = {}\n", certs.toml(f));

    // Verified against the CA, by name (`localhost`): acme's plan applies.
    let d = Daemon::start(&config(
        pg.port,
        "verify-full",
        &ca("ca.crt"),
        &password_file(&pw),
    ));
    assert_eq!(limit(&d.client().await).await, 1000);
    let mut raw = Raw::connect(&d.socket());
    raw.send(serde_json::json!({"id": 1, "op": "stats"}));
    let stats = raw.recv().unwrap();
    assert_eq!(stats["counters"]["quota_source_errors"], 0, "{stats}");

    // Another CA: the lookup fails (acme gets the default plan), logged
    // with the reason.
    let wrong = Daemon::start(&config(
        pg.port,
        "verify-full",
        &ca("other-ca.crt"),
        &password_file(&pw),
    ));
    assert_eq!(limit(&wrong.client().await).await, 10);
    wait_until_blocking("the certificate error logged", SOON, || {
        wrong.log_contains("invalid peer certificate: UnknownIssuer")
    });

    // Without TLS the server refuses (hostnossl reject): TLS was in use.
    let plain = Daemon::start(&config(pg.port, "disable", "", &password_file(&pw)));
    assert_eq!(limit(&plain.client().await).await, 10);
    wait_until_blocking("the refusal logged", SOON, || {
        plain.log_contains("no encryption")
    });

    for d in [&d, &wrong, &plain] {
        assert_password_never_logged(d);
    }
    assert!(!stats.to_string().contains(SECRET));
}

/// `sslmode=require` encrypts without checking the certificate (as libpq
/// does): one from a CA the system does not know is accepted. The
/// password comes from a variable.
#[tokio::test]
async fn require_checks_no_certificate_and_the_password_may_come_from_the_environment() {
    let certs = Certs::generate();
    let pg = postgres(&certs);
    let body = config(
        pg.port,
        "require",
        "",
        "password_env = \"QUOTAD_TEST_PG_PW\"",
    );
    let d = Daemon::start_with_env(&body, &[("QUOTAD_TEST_PG_PW", SECRET)]);
    assert_eq!(limit(&d.client().await).await, 1000);

    // A wrong password in the variable: refused, acme on the default plan.
    let wrong = Daemon::start_with_env(&body, &[("QUOTAD_TEST_PG_PW", "not-it")]);
    assert_eq!(limit(&wrong.client().await).await, 10);
    wait_until_blocking("the refusal logged", SOON, || {
        wrong.log_contains("password authentication failed")
    });
    assert_password_never_logged(&d);
    assert_password_never_logged(&wrong);
}
