//! A Redis master, one replica and three Sentinels watching them, all on
//! loopback TCP ports, plain or TLS only. Dropping the set kills the
//! Sentinels (SIGKILL); the master and replica are [`Redis`] handles,
//! killed when they drop.

use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::tls::yes_no;
use super::{Certs, Redis, SOON, free_port, require, wait_until_blocking};

/// The name the Sentinels monitor the master under.
pub const MASTER_NAME: &str = "quotad-test";

pub struct SentinelSet {
    pub master: Redis,
    pub replica: Redis,
    sentinels: Vec<(Child, TempDir, u16)>,
    tls: Option<Certs>,
    /// The Sentinels' `requirepass`.
    password: Option<String>,
}

/// How the servers of a set speak TLS: the certificates, and whether
/// clients must show one.
type Tls<'a> = Option<(&'a Certs, bool)>;

impl SentinelSet {
    pub fn start() -> SentinelSet {
        SentinelSet::start_with(None, None)
    }

    /// A set over TLS only (replication too); clients of every server must
    /// show a certificate if `auth_clients`, and the Sentinels want
    /// `sentinel_password` if given.
    pub fn start_tls(
        certs: &Certs,
        auth_clients: bool,
        sentinel_password: Option<&str>,
    ) -> SentinelSet {
        SentinelSet::start_with(Some((certs, auth_clients)), sentinel_password)
    }

    /// Starts the set and waits until the replica syncs and every Sentinel
    /// knows of it.
    fn start_with(tls: Tls<'_>, password: Option<&str>) -> SentinelSet {
        let redis = |extra: &[&str]| match tls {
            None => Redis::start_with(free_port(), extra),
            Some((certs, auth)) => Redis::start_tls(certs, auth, extra),
        };
        let master = redis(&[]);
        let replica = redis(&["--replicaof", "127.0.0.1", &master.tcp_port().to_string()]);
        wait_until_blocking("the replica to sync", SOON, || {
            replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        });
        let sentinels = (0..3)
            .map(|_| sentinel(master.tcp_port(), tls, password))
            .collect();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
            tls: tls.map(|(c, _)| c.clone()),
            password: password.map(str::to_owned),
        };
        let replica_port = set.replica.tcp_port().to_string();
        for i in 0..3 {
            wait_until_blocking("the sentinels to see the replica", SOON, || {
                set.cli(i, &["SENTINEL", "REPLICAS", MASTER_NAME])
                    .contains(&replica_port)
            });
        }
        set
    }

    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.sentinels
            .iter()
            .map(|(_, _, p)| format!("{scheme}://127.0.0.1:{p}"))
            .collect()
    }

    /// The master's port, as the first Sentinel sees it.
    pub fn master_port(&self) -> String {
        let out = self.cli(0, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]);
        out.lines().nth(1).unwrap_or_default().to_owned()
    }

    /// Waits until the first Sentinel names the server on `port` as the
    /// master: the Sentinels learn of a failover from the one that led it
    /// within seconds, and quotad may well have asked another one first.
    pub fn wait_for_master(&self, port: &str) {
        wait_until_blocking("the first Sentinel to name the new master", SOON, || {
            self.master_port() == port
        });
    }

    /// `redis-cli` against Sentinel `i` (with the TLS client certificate
    /// and the Sentinels' password, if any); its trimmed output.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let mut cmd = Command::new(require("redis-cli"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.sentinels[i].2.to_string()]);
        if let Some(certs) = &self.tls {
            cmd.args(certs.cli_args());
        }
        if let Some(pw) = &self.password {
            cmd.args(["--pass", pw, "--no-auth-warning"]);
        }
        let out = cmd.args(args).output().expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// One Sentinel watching the master on `master_port`.
fn sentinel(master_port: u16, tls: Tls<'_>, password: Option<&str>) -> (Child, TempDir, u16) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = match tls {
        None => format!("port {port}\n"),
        Some((certs, auth)) => {
            let p = |n: &str| certs.path(n).display().to_string();
            format!(
                "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients {}\ntls-replication yes\n",
                p("server.crt"),
                p("server.key"),
                p("ca.crt"),
                yes_no(auth)
            )
        }
    };
    let auth = password
        .map(|pw| format!("requirepass {pw}\n"))
        .unwrap_or_default();
    // Sentinel rewrites its config file: give it its own copy.
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "{listen}{auth}bind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 5000\n",
            dir = dir.path().display(),
        ),
    )
    .unwrap();
    let child = Command::new(require("redis-server"))
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting redis-server --sentinel");
    (child, dir, port)
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
