//! TLS for the integration tests: a throwaway CA and certificates made with
//! the `openssl` command, and Redis servers, a Cluster and Sentinels that
//! speak only TLS. Included by a test file after `mod common;` with
//! `#[path = "common/tls.rs"] mod tls;`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};

use tempfile::TempDir;

use crate::common::{MASTER_NAME, Redis, SOON, free_port, spawn_sentinel, wait_until_blocking};

/// `ca.crt`, `server.{crt,key}` and `client.{crt,key}` signed by it, and
/// `other-ca.crt`, a CA that signed nothing here. The server certificate
/// is for `127.0.0.1` and `localhost`.
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    pub fn generate() -> Certs {
        let c = Certs {
            dir: tempfile::tempdir().unwrap(),
        };
        c.ca("ca");
        c.ca("other-ca");
        c.leaf(
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        c.leaf("client", "extendedKeyUsage=clientAuth\n");
        c
    }

    /// The path of one of the files, e.g. `ca.crt`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The path as a TOML string.
    pub fn toml(&self, name: &str) -> String {
        format!("{:?}", self.path(name).display().to_string())
    }

    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=quotad test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ]);
    }

    fn leaf(&self, name: &str, ext: &str) {
        std::fs::write(self.path(&format!("{name}.ext")), ext).unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `redis-server` arguments for TLS only on `port`; clients must show
    /// a certificate if `auth_clients`.
    pub fn redis_args(&self, port: u16, auth_clients: bool) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            p("server.crt"),
            "--tls-key-file".into(),
            p("server.key"),
            "--tls-ca-cert-file".into(),
            p("ca.crt"),
            "--tls-auth-clients".into(),
            if auth_clients { "yes" } else { "no" }.into(),
        ]
    }

    /// `redis-cli` over TLS (with the client certificate) on `port`.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["--tls", "-h", "127.0.0.1", "-p", &port.to_string()])
            .arg("--cacert")
            .arg(self.path("ca.crt"))
            .arg("--cert")
            .arg(self.path("client.crt"))
            .arg("--key")
            .arg(self.path("client.key"))
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// A Redis that speaks TLS on a port (and plain text on its Unix socket,
/// for [`Redis::cli`]).
pub fn redis(certs: &Certs, auth_clients: bool, extra: &[&str]) -> (Redis, u16) {
    redis_on(free_port(), certs, auth_clients, extra)
}

fn redis_on(port: u16, certs: &Certs, auth_clients: bool, extra: &[&str]) -> (Redis, u16) {
    let mut args = certs.redis_args(port, auth_clients);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Redis::start_with(0, &args), port)
}

/// A free port in 20000..45000 whose Cluster bus port (port + 10000) is
/// free too, never handed out twice by this test binary.
fn cluster_port() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap();
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    loop {
        let p = 20000 + free_port() % 25000;
        let clash = taken
            .iter()
            .any(|&q| q == p || q + 10000 == p || q == p + 10000);
        if !clash && free(p) && free(p + 10000) {
            taken.push(p);
            return p;
        }
    }
}

/// A 3-master Redis Cluster over TLS, its bus too (`--tls-cluster yes`).
pub struct Cluster {
    pub nodes: Vec<(Redis, u16)>,
}

impl Cluster {
    pub fn start(certs: &Certs) -> Cluster {
        let nodes: Vec<(Redis, u16)> = (0..3)
            .map(|_| {
                redis_on(
                    cluster_port(),
                    certs,
                    false,
                    &[
                        "--tls-cluster",
                        "yes",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create
            .args(["--tls", "--cacert"])
            .arg(certs.path("ca.crt"))
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|(_, p)| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = create.output().expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for (n, _) in &nodes {
            wait_until_blocking("the TLS cluster to be ok", SOON, || {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        Cluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(_, p)| format!("rediss://127.0.0.1:{p}"))
            .collect()
    }
}

/// A master, a replica and three Sentinels, all over TLS only; the
/// sentinels need `sentinel_password` if given, the master `masterauth`
/// users as the test sets them up.
pub struct Sentinels {
    pub master: (Redis, u16),
    pub replica: (Redis, u16),
    sentinels: Vec<(Child, TempDir, u16)>,
}

impl Sentinels {
    pub fn start(certs: &Certs, sentinel_password: Option<&str>) -> Sentinels {
        let master = redis(certs, false, &["--tls-replication", "yes"]);
        let replica = redis(
            certs,
            false,
            &[
                "--tls-replication",
                "yes",
                "--replicaof",
                "127.0.0.1",
                &master.1.to_string(),
            ],
        );
        wait_until_blocking("the replica to sync over TLS", SOON, || {
            replica
                .0
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        });
        let p = |n: &str| certs.path(n).display().to_string();
        let sentinels = (0..3)
            .map(|_| {
                let dir = tempfile::tempdir().unwrap();
                let port = free_port();
                let auth = sentinel_password
                    .map(|pw| format!("requirepass {pw}\n"))
                    .unwrap_or_default();
                let conf = dir.path().join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {dir}\n\
                         tls-cert-file {crt}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
                         tls-auth-clients no\ntls-replication yes\n{auth}\
                         sentinel monitor {MASTER_NAME} 127.0.0.1 {m} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 5000\n",
                        dir = dir.path().display(),
                        crt = p("server.crt"),
                        key = p("server.key"),
                        ca = p("ca.crt"),
                        m = master.1
                    ),
                )
                .unwrap();
                (spawn_sentinel(&conf), dir, port)
            })
            .collect();
        let set = Sentinels {
            master,
            replica,
            sentinels,
        };
        let mut ask = vec![];
        if let Some(pw) = sentinel_password {
            ask.extend(["--pass", pw, "--no-auth-warning"]);
        }
        ask.extend(["SENTINEL", "REPLICAS", MASTER_NAME]);
        for &(_, _, port) in &set.sentinels {
            wait_until_blocking("the TLS sentinels to see the replica", SOON, || {
                certs.cli(port, &ask).contains(&set.replica.1.to_string())
            });
        }
        set
    }

    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(_, _, p)| format!("rediss://127.0.0.1:{p}"))
            .collect()
    }

    /// The master's TLS port, as the first Sentinel sees it (a set without
    /// a Sentinel password).
    pub fn master_port(&self, certs: &Certs) -> String {
        let ask = ["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME];
        let out = certs.cli(self.sentinels[0].2, &ask);
        out.lines().nth(1).unwrap_or_default().to_owned()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
