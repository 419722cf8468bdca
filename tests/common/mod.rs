//! Real processes for the integration tests: a `redis-server` of our own
//! on a temp Unix socket (or a spare port), and the `quotad` binary on a
//! temp socket. Each is stopped when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use quotad::client::{Client, ClientOptions, FailureMode};
use tempfile::TempDir;

pub const QUOTAD: &str = env!("CARGO_BIN_EXE_quotad");

fn require(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{program}` is not installed: run ./scripts/test.sh, which installs it")
        })
}

/// Polls `ready` until it holds or 10 s pass.
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `redis-server` of our own.
pub struct Redis {
    child: Option<Child>,
    dir: TempDir,
    pub port: u16,
}

impl Redis {
    /// A Redis listening on a Unix socket only.
    pub fn start() -> Redis {
        Redis::start_with(0, &[])
    }

    /// A Redis on `port` (0: none) and a Unix socket, with extra arguments.
    pub fn start_with(port: u16, extra: &[&str]) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Redis {
            child: None,
            dir,
            port,
        };
        r.spawn(extra);
        r
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    fn spawn(&mut self, extra: &[&str]) {
        let mut cmd = Command::new(require("redis-server"));
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("starting redis-server"));
        let sock = self.socket();
        wait_until("redis-server", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok() && self.cli(&["PING"]) == "PONG"
        });
    }

    /// Kills Redis at once (SIGKILL): no goodbye to its clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Freezes Redis (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Starts Redis again on the same socket and port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(&[]);
    }

    /// Runs a command through `redis-cli`; returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(require("redis-cli"))
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Calls of a command since start (from `INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real `quotad` binary on a temp socket.
pub struct Daemon {
    child: Child,
    dir: TempDir,
    pub stderr: Log,
}

impl Daemon {
    /// Starts quotad with `body` appended to a `[server]` table that sets
    /// the socket: keys before `body`'s first table header are `[server]`
    /// keys.
    pub fn start(body: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("quotad.sock");
        let config = format!(
            "[server]\nsocket = {:?}\n{body}",
            socket.display().to_string()
        );
        std::fs::write(dir.path().join("quotad.toml"), config).unwrap();
        Daemon::spawn(dir)
    }

    fn spawn(dir: TempDir) -> Daemon {
        let (child, stderr) = launch(dir.path());
        let mut d = Daemon { child, dir, stderr };
        d.wait_ready();
        d
    }

    /// Waits until quotad listens (panics, with its log, if it exited).
    fn wait_ready(&mut self) {
        let sock = self.socket();
        wait_until("quotad's socket", || {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "quotad exited with {status}: {:?}",
                    self.stderr.lock().unwrap()
                );
            }
            // Logged once the socket listens; probing by connecting would
            // take one of the daemon's connection slots.
            exists(&sock) && self.log_contains("quotad ready")
        });
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("quotad.sock")
    }

    /// Kills quotad at once (SIGKILL: the socket file stays, stale).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts quotad again (after [`Daemon::kill`]) with the same config
    /// and socket.
    pub fn restart(&mut self) {
        let (child, stderr) = launch(self.dir.path());
        self.child = child;
        self.stderr = stderr;
        self.wait_ready();
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("quotad.toml")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A client whose failures are errors, never a fail-open decision a
    /// test would count as allowed; patient, as CI machines are busy.
    pub async fn client(&self) -> Client {
        let options = ClientOptions {
            timeout: Duration::from_secs(10),
            failure_mode: FailureMode::Error,
            ..ClientOptions::default()
        };
        let client = Client::new(self.socket(), options);
        client.hello().await.expect("connecting to quotad");
        client
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Sends SIGTERM and waits (at most 10 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// Waits (at most 10 s) for quotad to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "quotad did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Starts `quotad serve` on `dir/quotad.toml`, collecting its log.
fn launch(dir: &Path) -> (Child, Log) {
    let mut child = Command::new(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("quotad.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting quotad");
    let log = Log::default();
    let lines = log.clone();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    (child, log)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `[redis]` table for `redis`, with a short deadline.
pub fn redis_table(redis: &Redis) -> String {
    format!(
        "[redis]\nurl = {:?}\ntimeout_ms = 100\nprobe_interval_ms = 50\n",
        redis.url()
    )
}

/// A free TCP port (for Redis Cluster, which needs ports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// A raw connection for speaking (and abusing) the wire protocol by hand.
pub struct Raw {
    stream: std::os::unix::net::UnixStream,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Raw { stream }
    }

    /// Connects if something listens at `path`.
    pub fn try_connect(path: &Path) -> Option<Raw> {
        std::os::unix::net::UnixStream::connect(path)
            .ok()
            .map(|stream| Raw { stream })
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let _ = self.stream.write_all(bytes);
    }

    /// Sends one frame: a 4-byte big-endian length, then `body`.
    pub fn send_frame(&mut self, body: &[u8]) {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        self.send_bytes(&f);
    }

    /// Sends a JSON value encoded as MessagePack.
    pub fn send(&mut self, v: serde_json::Value) {
        self.send_frame(&rmp_serde::to_vec_named(&v).unwrap());
    }

    /// The next reply decoded to JSON, or `None` at end of stream.
    pub fn recv(&mut self) -> Option<serde_json::Value> {
        let body = self.recv_body()?;
        Some(rmp_serde::from_slice(&body).expect("replies are MessagePack"))
    }

    /// The next reply's body, or `None` at end of stream.
    pub fn recv_body(&mut self) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).ok()?;
        let mut body = vec![0; u32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut body).ok()?;
        Some(body)
    }

    /// True once the daemon has closed the connection.
    pub fn closed(&mut self) -> bool {
        self.recv().is_none()
    }
}

/// The `error.code` of a reply, if it is an error.
pub fn code(reply: &serde_json::Value) -> Option<&str> {
    reply["error"]["code"].as_str()
}

/// A 3-master Redis Cluster on loopback (ports ≤ 55535: the bus port is
/// port + 10000).
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let ports = cluster_ports(3);
        let nodes: Vec<Redis> = ports
            .iter()
            .map(|&p| {
                Redis::start_with(
                    p,
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                )
            })
            .collect();
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new(require("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            wait_until("the cluster to be ok", || {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        Cluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }
}

/// `n` ports in 20000..45000 that are free, with their bus ports free too.
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

/// A Redis master, one replica and three Sentinels watching them.
pub struct SentinelSet {
    pub master: Redis,
    pub replica: Redis,
    sentinels: Vec<(Child, TempDir, u16)>,
}

pub const MASTER_NAME: &str = "quotad-test";

impl SentinelSet {
    pub fn start() -> SentinelSet {
        let master = Redis::start_with(free_port(), &[]);
        let replica = Redis::start_with(
            free_port(),
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
        );
        wait_until("the replica to sync", || {
            replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        });
        let sentinels = (0..3)
            .map(|_| {
                let dir = tempfile::tempdir().unwrap();
                let port = free_port();
                // Sentinel rewrites its config file: give it its own copy.
                let conf = dir.path().join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                         sentinel monitor {MASTER_NAME} 127.0.0.1 {m} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 5000\n",
                        dir = dir.path().display(),
                        m = master.port
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
            })
            .collect();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
        };
        for &(_, _, port) in &set.sentinels {
            wait_until("the sentinels to see the replica", || {
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

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `redis-cli` against a TCP port.
pub fn tcp_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(require("redis-cli"))
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A PostgreSQL server of our own (from Debian's packages), on a Unix
/// socket only. As root, it runs as the `postgres` user.
pub struct Postgres {
    child: Option<Child>,
    dir: TempDir,
    pub port: u16,
}

fn postgres_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run ./scripts/test.sh, which installs it")
        .map(|e| e.unwrap().path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("a PostgreSQL version")
        .join("bin")
        .join(name)
}

fn as_postgres(program: &Path) -> Command {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        // setpriv execs (unlike runuser), so killing it kills PostgreSQL.
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        // SAFETY: geteuid cannot fail and touches no memory.
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&data)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let out = as_postgres(&postgres_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "quotad", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            child: None,
            dir,
            port: free_port(),
        };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        let child = as_postgres(&postgres_bin("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        wait_until("PostgreSQL", || self.psql("SELECT 1") == "1");
    }

    /// A libpq connection string for quotad.
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=quotad dbname=postgres",
            self.dir.path().display(),
            self.port
        )
    }

    /// Runs SQL through `psql`; returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "quotad",
                "-d",
                "postgres",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("running psql");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT); // fast shutdown
            }
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
