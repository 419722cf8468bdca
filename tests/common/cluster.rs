//! A 3-master Redis Cluster on loopback TCP ports, made of [`Redis`]
//! nodes, plain or TLS only (its bus too); dropping it kills every node
//! (SIGKILL).

use std::process::Command;

use super::{Certs, Redis, SOON, require, wait_until_blocking};

pub struct Cluster {
    pub nodes: Vec<Redis>,
}

const NODE: [&str; 4] = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];

impl Cluster {
    pub fn start() -> Cluster {
        let nodes = cluster_ports(3)
            .into_iter()
            .map(|p| Redis::start_with(p, &NODE))
            .collect();
        Cluster::join(nodes, &[])
    }

    /// A Cluster over TLS only (`--tls-cluster yes`); clients must show a
    /// certificate if `auth_clients`.
    pub fn start_tls(certs: &Certs, auth_clients: bool) -> Cluster {
        let nodes = cluster_ports(3)
            .into_iter()
            .map(|p| Redis::start_tls_on(p, certs, auth_clients, &NODE))
            .collect();
        Cluster::join(nodes, &certs.cli_args())
    }

    /// Joins the nodes with `redis-cli <cli_args> --cluster create` and
    /// waits until each reports `cluster_state:ok`.
    fn join(nodes: Vec<Redis>, cli_args: &[String]) -> Cluster {
        let addrs = nodes.iter().map(|n| format!("127.0.0.1:{}", n.tcp_port()));
        let out = Command::new(require("redis-cli"))
            .args(cli_args)
            .args(["--cluster", "create"])
            .args(addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            wait_until_blocking("the cluster to be ok", SOON, || {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        Cluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::tcp_url).collect()
    }
}

/// `n` ports in 20000..45000 that are free, with their bus ports (port +
/// 10000, so ≤ 55535) free too.
fn cluster_ports(n: usize) -> Vec<u16> {
    // Tests of one binary run in parallel threads: never hand out a port
    // twice, and seed each call differently (the pid alone is shared).
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut seed = std::process::id() as u64 ^ nanos ^ taken.len() as u64;
    let mut ports = Vec::new();
    while ports.len() < n {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let p = 20000 + (seed >> 33) as u16 % 25000;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        // A node also takes port + 10000 for its cluster bus.
        let clash = |q: &u16| *q == p || *q + 10000 == p || *q == p + 10000;
        let clashes = ports.iter().chain(taken.iter()).any(clash);
        if !clashes && free(p) && free(p + 10000) {
            ports.push(p);
        }
    }
    taken.extend(&ports);
    ports
}
