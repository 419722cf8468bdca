//! Operating quotad: `quotad health` and `quotad stats` against a real
//! daemon, socket activation through `systemd-socket-activate`, and the
//! notifications systemd gets on `NOTIFY_SOCKET` (ready, watchdog, reload,
//! stopping).

mod common;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, QUOTAD, Raw, Redis, SOON, redis_table, wait_until_blocking};
use serde_json::json;

const POLICY: &str = r#"
[policies.default]
failure_mode = "open"
rules = [{ name = "burst", kind = "token_bucket", capacity = 100, refill_per_sec = 1 }]
"#;

/// Runs `quotad <args>` (no socket or config from the environment):
/// exit status and stdout.
fn quotad(args: &[&str], at: &[&str], path: &Path) -> (i32, String) {
    let out = Command::new(QUOTAD)
        .args(args)
        .args(at)
        .arg(path)
        .env_remove("QUOTAD_SOCKET")
        .env_remove("QUOTAD_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn health(d: &Daemon, extra: &[&str]) -> (i32, String) {
    let args: Vec<&str> = ["health"].iter().chain(extra).copied().collect();
    quotad(&args, &["--socket"], &d.socket())
}

/// `quotad health`: 2 with nobody listening, 0 while quotad and its
/// Redis answer, 1 while Redis is down (`--live` still 0), 0 again once
/// Redis is back.
#[test]
fn health_exits_by_what_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = quotad(&["health"], &["--socket"], &dir.path().join("none.sock"));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.starts_with("unreachable: cannot reach quotad: "),
        "{out}"
    );

    let mut redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICY}", redis_table(&redis)));
    // The config file gives the socket, as for `quotad check`.
    let (code, out) = quotad(&["health"], &["--config"], &d.config_path());
    assert_eq!(
        (code, out.as_str()),
        (0, "ok: quotad answers and Redis is up\n")
    );

    redis.kill();
    // The breaker opens after failed round trips: checks make them.
    let mut c = Raw::connect(&d.socket());
    let mut id = 0;
    wait_until_blocking("health to report Redis down", SOON, || {
        id += 1;
        c.send(json!({"id": id, "op": "check", "tenant": "t", "key": "k"}));
        assert_eq!(c.recv().unwrap()["id"], id);
        health(&d, &[]).0 == 1
    });
    let (code, out) = health(&d, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("degraded: quotad answers, but Redis does not"),
        "{out}"
    );
    let (code, out) = health(&d, &["--live"]);
    assert_eq!(code, 0, "--live: quotad answers; {out}");
    assert!(out.starts_with("degraded: "), "{out}");

    redis.restart();
    wait_until_blocking("health to report Redis up again", SOON, || {
        health(&d, &[]).0 == 0
    });
}

/// `quotad health` on the memory backend: 0, and says so.
#[test]
fn health_without_redis_is_ok() {
    let d = Daemon::start(POLICY);
    let (code, out) = health(&d, &[]);
    assert_eq!(
        (code, out.as_str()),
        (0, "ok: quotad answers (in-memory backend)\n")
    );
}

/// `quotad stats` prints every counter, one per line; `--json` prints one
/// object with the same counters.
#[test]
fn stats_prints_the_counters_as_a_table_or_json() {
    let d = Daemon::start(POLICY);
    let mut c = Raw::connect(&d.socket());
    for id in 1..=3 {
        c.send(json!({"id": id, "op": "check", "tenant": "t", "key": "k"}));
        assert_eq!(c.recv().unwrap()["allowed"], true);
    }
    let (code, out) = quotad(&["stats"], &["--socket"], &d.socket());
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    let head = lines.next().unwrap();
    assert!(
        head.starts_with("uptime_ms=") && head.ends_with(" backend=memory shards=1"),
        "{head}"
    );
    let table: Vec<(&str, u64)> = lines
        .map(|l| {
            let mut words = l.split_whitespace();
            let row = (
                words.next().unwrap(),
                words.next().unwrap().parse().unwrap(),
            );
            assert_eq!(words.next(), None, "{l}");
            row
        })
        .collect();
    assert!(table.contains(&("requests_check", 3)), "{out}");
    assert!(table.contains(&("allowed", 3)), "{out}");
    assert!(table.contains(&("breaker_open", 0)), "{out}");

    let (code, out) = quotad(&["stats", "--json"], &["--socket"], &d.socket());
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["backend"], "memory");
    assert_eq!(v["shards"], 1);
    assert!(v["uptime_ms"].is_u64(), "{v}");
    assert_eq!(v["counters"]["requests_check"], 3);
    assert_eq!(v["counters"]["allowed"], 3);
    assert_eq!(
        v["counters"].as_object().unwrap().len(),
        table.len(),
        "the same counters as the table"
    );
}

/// Writes a config whose `server.socket` is `socket`.
fn config(dir: &Path, socket: &Path) -> std::path::PathBuf {
    let path = dir.join("quotad.toml");
    let text = format!(
        "[server]\nsocket = {:?}\nthreads = 1\n{POLICY}",
        socket.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Sends SIGTERM and waits for `child` to exit successfully.
fn terminate(child: &mut Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let mut status = None;
    wait_until_blocking("quotad to exit", SOON, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
}

/// systemd-socket-activate's path; `None`, saying the test is skipped,
/// without it.
fn socket_activate() -> Option<&'static str> {
    let found = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| Path::new(p).is_file());
    if found.is_none() {
        println!("SKIPPED: systemd-socket-activate is not installed (apt-get install systemd)");
    }
    found
}

/// Under `systemd-socket-activate`, quotad serves on the socket it
/// inherits (not on its config's path) and leaves that file at exit.
#[test]
fn socket_activation_serves_the_inherited_socket_and_leaves_it() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let activated = dir.path().join("activated.sock");
    let configured = dir.path().join("configured.sock");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(&activated)
        .arg(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(config(dir.path(), &configured))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until_blocking("the activation socket", SOON, || activated.exists());
    // The first connection makes systemd-socket-activate exec quotad.
    let (code, out) = quotad(
        &["check", "--tenant", "t", "--key", "k"],
        &["--socket"],
        &activated,
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("allowed=true limit=100 remaining=99 "),
        "{out}"
    );
    let (code, out) = quotad(&["health"], &["--socket"], &activated);
    assert_eq!(code, 0, "{out}");
    assert!(!configured.exists(), "quotad bound its config's path too");
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(log.contains("activated=true"), "{log}");

    terminate(&mut child);
    let meta = std::fs::symlink_metadata(&activated).expect("the socket file stays");
    assert!(meta.file_type().is_socket());
}

/// One datagram quotad sent to `NOTIFY_SOCKET`.
struct Note {
    at: Instant,
    text: String,
    /// Whether quotad's socket took a connection when the note arrived.
    listening: bool,
}

/// A datagram socket playing systemd's part: collects quotad's notes
/// until dropped.
struct Notify {
    notes: Arc<Mutex<Vec<Note>>>,
    stop: Arc<AtomicBool>,
}

impl Notify {
    fn bind(path: &Path, quotad_socket: &Path) -> Notify {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let notes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, stopped, target) = (notes.clone(), stop.clone(), quotad_socket.to_owned());
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let listening =
                        text.contains("READY=1") && UnixStream::connect(&target).is_ok();
                    let at = Instant::now();
                    into.lock().unwrap().push(Note {
                        at,
                        text,
                        listening,
                    });
                }
            }
        });
        Notify { notes, stop }
    }

    /// Indexes of the notes that contain `needle`.
    fn find(&self, needle: &str) -> Vec<usize> {
        let notes = self.notes.lock().unwrap();
        (0..notes.len())
            .filter(|&i| notes[i].text.contains(needle))
            .collect()
    }

    fn wait_for(&self, needle: &str, count: usize) {
        wait_until_blocking(needle, SOON, || self.find(needle).len() >= count);
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// With `NOTIFY_SOCKET` and `WATCHDOG_USEC` set: `READY=1` once the socket
/// listens, `WATCHDOG=1` every half interval, `RELOADING=1` (with
/// `MONOTONIC_USEC`) then `READY=1` around a SIGHUP reload, `STOPPING=1`
/// on SIGTERM.
#[test]
fn systemd_hears_ready_watchdog_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("quotad.sock");
    let notify = Notify::bind(&dir.path().join("notify.sock"), &socket);
    let mut child = Command::new(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(config(dir.path(), &socket))
        .env("NOTIFY_SOCKET", dir.path().join("notify.sock"))
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", 1);
    {
        let notes = notify.notes.lock().unwrap();
        let ready = notes.iter().find(|n| n.text.contains("READY=1")).unwrap();
        assert!(ready.listening, "READY=1 came before the socket listened");
    }

    // Pings every 100 ms: over a second, 8 to 13 (a busy machine may
    // delay one; tokio's interval catches up rather than drift).
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let pings: Vec<Instant> = {
        let notes = notify.notes.lock().unwrap();
        notes
            .iter()
            .filter(|n| n.text == "WATCHDOG=1\n" && n.at >= start)
            .map(|n| n.at)
            .collect()
    };
    let end = start + Duration::from_millis(1000);
    let in_window = pings.iter().filter(|&&t| t <= end).count();
    assert!((8..=13).contains(&in_window), "{in_window} pings in 1 s");

    unsafe {
        libc::kill(child.id() as i32, libc::SIGHUP);
    }
    notify.wait_for("READY=1", 2);
    let reloading = notify.find("RELOADING=1");
    assert_eq!(reloading.len(), 1);
    let ready = notify.find("READY=1");
    assert!(
        reloading[0] < ready[1],
        "RELOADING=1 before the second READY=1"
    );
    {
        let notes = notify.notes.lock().unwrap();
        let text = &notes[reloading[0]].text;
        let usec = text
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC with RELOADING=1: {text:?}"));
        assert!(usec.parse::<u64>().unwrap() > 0, "{text:?}");
    }

    assert!(notify.find("STOPPING=1").is_empty());
    terminate(&mut child);
    notify.wait_for("STOPPING=1", 1);
    assert!(notify.find("STOPPING=1")[0] > ready[1]);
}

/// `systemd-analyze verify` accepts both units (with `ExecStart=` pointing
/// at this build), and the packaged config loads.
#[test]
fn the_systemd_units_verify_and_the_packaged_config_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    quotad::config::Config::load(&root.join("systemd/quotad.toml")).expect("systemd/quotad.toml");
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
    else {
        println!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for unit in ["quotad.service", "quotad.socket"] {
        let text = std::fs::read_to_string(root.join("systemd").join(unit)).unwrap();
        let text = text.replace("/usr/local/bin/quotad", QUOTAD);
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("quotad.service"))
        .arg(dir.path().join("quotad.socket"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

/// Handed two sockets, quotad refuses to start and says why.
#[test]
fn socket_activation_with_two_sockets_is_refused() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let child = Command::new(activate)
        .arg("-l")
        .arg(&a)
        .arg("-l")
        .arg(&b)
        .arg(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(config(dir.path(), &dir.path().join("configured.sock")))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_blocking("the activation socket", SOON, || a.exists());
    let _first = UnixStream::connect(&a).unwrap(); // makes it exec quotad
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("quotad: socket activation: systemd passed 2 sockets; quotad listens on one"),
        "{err}"
    );
}
