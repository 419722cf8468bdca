//! A `redis-server` of our own: on a Unix socket in a temp dir (and a TCP
//! port if asked, plain or TLS only), no persistence. Dropping it kills it
//! (SIGKILL).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::{Certs, SOON, free_port, require, wait_until_blocking};

pub struct Redis {
    child: Option<Child>,
    dir: TempDir,
    /// The plain TCP port (0: none).
    pub port: u16,
    /// The TLS port (0: none).
    pub tls_port: u16,
    /// Extra `redis-server` arguments, kept for [`Redis::restart`].
    args: Vec<String>,
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
            tls_port: 0,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn();
        r
    }

    /// A Redis that speaks only TLS over TCP (plain text on its Unix socket,
    /// for [`Redis::cli`]); clients must show a certificate if `auth_clients`.
    pub fn start_tls(certs: &Certs, auth_clients: bool, extra: &[&str]) -> Redis {
        Redis::start_tls_on(free_port(), certs, auth_clients, extra)
    }

    /// [`Redis::start_tls`] on `tls_port`.
    pub fn start_tls_on(tls_port: u16, certs: &Certs, auth_clients: bool, extra: &[&str]) -> Redis {
        let mut args = certs.redis_args(tls_port, auth_clients);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut r = Redis::start_with(0, &args);
        r.tls_port = tls_port;
        r
    }

    /// The TCP port clients use: the TLS one if there is one.
    pub fn tcp_port(&self) -> u16 {
        if self.tls_port != 0 {
            self.tls_port
        } else {
            self.port
        }
    }

    /// `redis://` or `rediss://` (TLS) on [`Redis::tcp_port`].
    pub fn tcp_url(&self) -> String {
        match self.tls_port {
            0 => format!("redis://127.0.0.1:{}", self.port),
            p => format!("rediss://127.0.0.1:{p}"),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(require("redis-server"));
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("starting redis-server"));
        let sock = self.socket();
        wait_until_blocking("redis-server", SOON, || {
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

    /// Starts Redis again on the same socket and ports and with the same
    /// arguments, empty, and waits until it answers `PING`.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
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

/// A `[redis]` table for `redis`, with a short deadline.
pub fn redis_table(redis: &Redis) -> String {
    format!(
        "[redis]\nurl = {:?}\ntimeout_ms = 100\nprobe_interval_ms = 50\n",
        redis.url()
    )
}

/// A Redis backend on `config`'s `[redis]` table, its clock `clock`.
pub fn redis_backend(
    config: &quotad::config::Config,
    clock: quotad::clock::Clock,
) -> quotad::backend::redis::RedisBackend {
    quotad::backend::redis::RedisBackend::new(
        config.redis.as_ref().expect("a [redis] table"),
        clock,
        std::sync::Arc::new(quotad::stats::Stats::default()),
        tokio_util::sync::CancellationToken::new(),
    )
    .unwrap()
}
