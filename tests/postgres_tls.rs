//! The PostgreSQL quota source over TLS: a real PostgreSQL with `ssl = on`
//! and a throwaway certificate, reachable over TCP only with TLS and a
//! password (`hostssl … scram-sha-256`); quotad connects with
//! `sslmode=verify-full`, its password read from a file.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{Daemon, Postgres};
use quotad::client::Client;

const SECRET: &str = "pg-s3cret-41c9";

const POLICIES: &str = r#"
[policies.api]
rules = [{ name = "burst", kind = "token_bucket", capacity = 10, refill_per_sec = 0.001 }]
[plans.pro]
[plans.pro.limits]
api.burst.capacity = 1000
"#;

/// PostgreSQL on the data of a [`Postgres`], restarted to listen on
/// 127.0.0.1 with TLS. Killed when dropped.
struct TlsPostgres {
    child: Child,
    port: u16,
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The server's own copy of a file (PostgreSQL wants its key private and
/// its own), in the data directory.
fn install(from: &Path, data: &Path, name: &str) {
    let to = data.join(name);
    std::fs::copy(from, &to).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    if is_root() {
        assert!(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(&to)
                .status()
                .unwrap()
                .success()
        );
    }
}

fn start_tls(pg: &mut Postgres, certs: &tls::Certs) -> TlsPostgres {
    pg.psql(
        "CREATE TABLE quotad_tenants (tenant text PRIMARY KEY, plan text NOT NULL, limits jsonb)",
    );
    pg.psql("INSERT INTO quotad_tenants VALUES ('acme', 'pro', NULL)");
    pg.psql(&format!("ALTER ROLE quotad PASSWORD '{SECRET}'"));
    pg.stop();
    // `host=<dir> port=…`: the data directory is `<dir>/data`.
    let url = pg.url();
    let dir = PathBuf::from(url.split(' ').next().unwrap().trim_start_matches("host="));
    let data = dir.join("data");
    install(&certs.path("server.crt"), &data, "server.crt");
    install(&certs.path("server.key"), &data, "server.key");
    let hba = dir.join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 scram-sha-256\n\
         hostnossl all all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    install(&hba, &data, "pg_hba.conf");
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    versions.sort();
    let postgres = versions.last().unwrap().join("bin/postgres");
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(postgres);
        c
    } else {
        Command::new(postgres)
    };
    let child = cmd
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(&dir)
        .args(["-p", &pg.port.to_string()])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "ssl=on",
        ])
        .args([
            "-c",
            "ssl_cert_file=server.crt",
            "-c",
            "ssl_key_file=server.key",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting postgres");
    common::wait_until_blocking("PostgreSQL with TLS", common::SOON, || {
        pg.psql("SELECT 1") == "1"
    });
    TlsPostgres {
        child,
        port: pg.port,
    }
}

fn config(port: u16, sslmode: &str, ca: &str, password_file: &Path) -> String {
    format!(
        "[quota]\nsource = \"postgres\"\n[quota.postgres]\n\
         url = \"host=localhost port={port} user=quotad dbname=postgres sslmode={sslmode}\"\n\
         {ca}password_file = {:?}\n{POLICIES}",
        password_file.display().to_string()
    )
}

async fn limit(c: &Client) -> u64 {
    c.check("acme", "k", Some("api"), 0).await.unwrap().limit
}

#[tokio::test]
async fn the_postgres_source_connects_with_verify_full() {
    let certs = tls::Certs::generate();
    let mut pg = Postgres::start();
    let server = start_tls(&mut pg, &certs);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pg-password");
    std::fs::write(&pw, format!("{SECRET}\n")).unwrap();
    let ca = |f: &str| format!("tls_ca_file = {}\n", certs.toml(f));

    // Verified against the CA, by name (`localhost`): acme's plan applies.
    let d = Daemon::start(&config(server.port, "verify-full", &ca("ca.crt"), &pw));
    assert_eq!(limit(&d.client().await).await, 1000);
    let mut raw = common::Raw::connect(&d.socket());
    raw.send(serde_json::json!({"id": 1, "op": "stats"}));
    let stats = raw.recv().unwrap();
    assert_eq!(stats["counters"]["quota_source_errors"], 0, "{stats}");

    // Another CA: the lookup fails (acme gets the default plan), logged
    // with the reason.
    let wrong = Daemon::start(&config(
        server.port,
        "verify-full",
        &ca("other-ca.crt"),
        &pw,
    ));
    assert_eq!(limit(&wrong.client().await).await, 10);
    common::wait_until_blocking("the certificate error logged", common::SOON, || {
        wrong.log_contains("invalid peer certificate: UnknownIssuer")
    });

    // Without TLS the server refuses (hostnossl reject): TLS was in use.
    let plain = Daemon::start(&config(server.port, "disable", "", &pw));
    assert_eq!(limit(&plain.client().await).await, 10);
    common::wait_until_blocking("the refusal logged", common::SOON, || {
        plain.log_contains("no encryption")
    });

    for d in [&d, &wrong, &plain] {
        for line in d.stderr.lock().unwrap().iter() {
            assert!(
                !line.contains(SECRET),
                "a log line shows the password: {line}"
            );
        }
    }
    assert!(!stats.to_string().contains(SECRET));
}
