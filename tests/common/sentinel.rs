//! A Redis master, one replica and three Sentinels watching them, all on
//! loopback TCP ports. Dropping the set kills the Sentinels (SIGKILL); the
//! master and replica are [`Redis`] handles, killed when they drop.

use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::{Redis, SOON, free_port, require, wait_until_blocking};

/// The name the Sentinels monitor the master under.
pub const MASTER_NAME: &str = "quotad-test";

pub struct SentinelSet {
    pub master: Redis,
    pub replica: Redis,
    sentinels: Vec<(Child, TempDir, u16)>,
}

impl SentinelSet {
    /// Starts the set and waits until the replica syncs and every Sentinel
    /// knows of it.
    pub fn start() -> SentinelSet {
        let master = Redis::start_with(free_port(), &[]);
        let replica = Redis::start_with(
            free_port(),
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
        );
        wait_until_blocking("the replica to sync", SOON, || {
            replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        });
        let sentinels = (0..3).map(|_| sentinel(master.port)).collect();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
        };
        for &(_, _, port) in &set.sentinels {
            wait_until_blocking("the sentinels to see the replica", SOON, || {
                tcp_cli(port, &["SENTINEL", "REPLICAS", MASTER_NAME])
                    .contains(&set.replica.port.to_string())
            });
        }
        set
    }

    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(_, _, p)| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The master's port, as the first Sentinel sees it.
    pub fn master_port(&self) -> String {
        let out = tcp_cli(
            self.sentinels[0].2,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        );
        out.lines().nth(1).unwrap_or_default().to_owned()
    }
}

/// One Sentinel watching the master on `master_port`.
fn sentinel(master_port: u16) -> (Child, TempDir, u16) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Sentinel rewrites its config file: give it its own copy.
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 5000\n",
            dir = dir.path().display(),
        ),
    )
    .unwrap();
    (spawn_sentinel(&conf), dir, port)
}

/// `redis-server <conf> --sentinel`, quiet.
pub fn spawn_sentinel(conf: &std::path::Path) -> Child {
    Command::new(require("redis-server"))
        .arg(conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting redis-server --sentinel")
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `redis-cli` against a TCP port.
fn tcp_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(require("redis-cli"))
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
