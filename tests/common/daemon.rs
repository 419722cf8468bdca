//! The real `quotad` binary (`quotad serve`) on a temp socket, with its
//! log collected. [`Daemon::terminate`] stops it with SIGTERM; dropping it
//! kills it (SIGKILL).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use quotad::client::{Client, ClientOptions, FailureMode};
use tempfile::TempDir;

use super::{SOON, exists, wait_until_blocking};

pub const QUOTAD: &str = env!("CARGO_BIN_EXE_quotad");

pub struct Daemon {
    child: Child,
    dir: TempDir,
    /// quotad's stderr, one entry per line, as it comes.
    pub stderr: Log,
    /// Copies stderr into `stderr`; ends when quotad exits.
    reader: Option<JoinHandle<()>>,
    /// Variables set in quotad's environment.
    env: Vec<(String, String)>,
}

type Log = Arc<Mutex<Vec<String>>>;

impl Daemon {
    /// Starts quotad with `body` appended to a `[server]` table that sets
    /// the socket: keys before `body`'s first table header are `[server]`
    /// keys. Returns once quotad listens.
    pub fn start(body: &str) -> Daemon {
        Daemon::start_with_env(body, &[])
    }

    /// [`Daemon::start`] with these variables in quotad's environment.
    pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> Daemon {
        let env: Vec<(String, String)> = (env.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut d = Daemon::launch(body, env);
        d.wait_ready();
        d
    }

    /// Starts quotad with `body` (as [`Daemon::start`]) and expects it to
    /// exit during start-up: its exit status and its log.
    pub fn start_fails(body: &str) -> (ExitStatus, String) {
        let mut d = Daemon::launch(body, vec![]);
        let status = d.wait_exit();
        if let Some(reader) = d.reader.take() {
            let _ = reader.join(); // the whole log: the pipe has ended
        }
        let log = d.stderr.lock().unwrap().join("\n");
        (status, log)
    }

    fn launch(body: &str, env: Vec<(String, String)>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("quotad.sock");
        let config = format!(
            "[server]\nsocket = {:?}\n{body}",
            socket.display().to_string()
        );
        std::fs::write(dir.path().join("quotad.toml"), config).unwrap();
        let (child, stderr, reader) = launch(dir.path(), &env);
        Daemon {
            child,
            dir,
            stderr,
            reader: Some(reader),
            env,
        }
    }

    /// Waits until quotad listens (panics, with its log, if it exited).
    fn wait_ready(&mut self) {
        let sock = self.socket();
        wait_until_blocking("quotad's socket", SOON, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its whole log: the reader ends at the pipe's end.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
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
    /// and socket; returns once it listens.
    pub fn restart(&mut self) {
        let (child, stderr, reader) = launch(self.dir.path(), &self.env);
        self.child = child;
        self.stderr = stderr;
        self.reader = Some(reader);
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
        let mut status = None;
        wait_until_blocking("quotad to exit", SOON, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }

    /// Runs `quotad tenant <args>` against this daemon's socket.
    pub fn tenant_cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(QUOTAD)
            .arg("tenant")
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log_line(needle).is_some()
    }

    /// The first log line containing `needle`.
    pub fn log_line(&self, needle: &str) -> Option<String> {
        let log = self.stderr.lock().unwrap();
        log.iter().find(|l| l.contains(needle)).cloned()
    }
}

/// Starts `quotad serve` on `dir/quotad.toml` with `env` added to its
/// environment, and a thread collecting its log.
fn launch(dir: &Path, env: &[(String, String)]) -> (Child, Log, JoinHandle<()>) {
    let mut child = Command::new(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("quotad.toml"))
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting quotad");
    let log = Log::default();
    let lines = log.clone();
    let pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    (child, log, reader)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `stats` op's counters, asked through `client`.
pub async fn counters(client: &Client) -> BTreeMap<String, u64> {
    client.stats().await.unwrap().counters.unwrap()
}
