//! The daemon's life: the socket file from bind to removal, SIGTERM with
//! requests in flight, SIGHUP reloads, and one quotad per socket.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{
    Daemon, QUOTAD, Raw, Redis, SOON, code, exists, free_port, redis_table, wait_until_blocking,
};
use serde_json::json;

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 2, refill_per_sec = 0.001 }]
"#;

/// SIGTERM removes the socket file at once, refuses new requests with
/// `shutting_down`, answers every request in flight, and exits 0.
#[test]
fn sigterm_answers_in_flight_requests_refuses_new_ones_and_removes_the_socket() {
    let redis = Redis::start();
    let d = Daemon::start(&format!(
        "[redis]\nurl = {:?}\ntimeout_ms = 3000\n{POLICY}",
        redis.url()
    ));
    let mut c = Raw::connect(&d.socket());
    c.send(json!({"id": 1, "op": "check", "tenant": "t", "key": "warm"}));
    assert_eq!(c.recv().unwrap()["degraded"], false);

    // Freeze Redis: the next requests stay in flight until it resumes.
    redis.pause();
    for id in 10..60 {
        c.send(json!({"id": id, "op": "check", "tenant": format!("t{id}"), "key": "k"}));
    }
    let mut stats = Raw::connect(&d.socket());
    wait_until_blocking("the checks to be in flight", SOON, || {
        stats.counters()["requests_check"] == 51
    });
    drop(stats);
    d.signal(libc::SIGTERM);
    // "At once": while those are still in flight, new connections cannot
    // even find the socket...
    wait_until_blocking("the socket file to go", SOON, || !exists(&d.socket()));
    // ...and new requests on an open connection are refused. (Only a
    // `hello` can be answered while Redis is frozen.)
    let mut id = 100;
    wait_until_blocking("a new request to be refused", SOON, || {
        id += 1;
        c.send(json!({"id": id, "op": "hello"}));
        let r = c.recv().unwrap();
        assert_eq!(r["id"], id, "{r}");
        code(&r) == Some("shutting_down")
    });
    redis.resume();

    let answered: Vec<_> = std::iter::from_fn(|| c.recv()).collect();
    assert_eq!(answered.len(), 50, "every in-flight request is answered");
    for r in answered {
        assert!((10..60).contains(&r["id"].as_u64().unwrap()), "{r}");
        assert_eq!(
            (r["allowed"].as_bool(), r["degraded"].as_bool()),
            (Some(true), Some(false)),
            "{r}"
        );
    }
    let mut d = d;
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status:?}");
}

/// A second quotad refuses a socket someone listens on, but replaces a
/// stale socket file left by a killed one.
#[test]
fn a_stale_socket_file_is_replaced_but_a_live_one_is_refused() {
    let mut d = Daemon::start(POLICY);
    // A second quotad on the same socket refuses to start.
    let out = Command::new(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(d.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    let mut c = Raw::connect(&d.socket());
    c.send(json!({"id": 1, "op": "hello"}));
    assert_eq!(
        c.recv().unwrap()["ok"],
        true,
        "the first quotad still serves"
    );

    // Kill it hard: the socket file stays behind, stale.
    d.kill();
    assert!(exists(&d.socket()), "SIGKILL leaves the socket file");
    assert!(Raw::try_connect(&d.socket()).is_none(), "nobody listens");
    // Waits for the ready log line: SIGTERM before it (the signal handler
    // is installed after the bind) would kill the new quotad outright.
    d.restart();
    assert!(d.log_contains("removing stale socket file"));
    let mut c = Raw::connect(&d.socket());
    c.send(json!({"id": 1, "op": "hello"}));
    assert_eq!(c.recv().unwrap()["ok"], true, "the new quotad serves");
    drop(c);
    let status = d.terminate();
    assert!(status.success(), "exit status {status:?}");
}

/// quotad refuses to start over a regular file at its socket path, and
/// leaves the file alone.
#[test]
fn a_regular_file_at_the_socket_path_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("quotad.sock");
    std::fs::write(&socket, "precious").unwrap();
    let config = dir.path().join("q.toml");
    std::fs::write(
        &config,
        format!("[server]\nsocket = {:?}\n", socket.display().to_string()),
    )
    .unwrap();
    let out = Command::new(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
}

/// The socket file gets `socket_mode`.
#[test]
fn the_socket_file_gets_the_configured_mode() {
    let d = Daemon::start(&format!("socket_mode = 0o600\n{POLICY}"));
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

/// SIGHUP applies changed policies to open connections, and a bad file
/// keeps the running ones.
#[test]
fn sighup_reloads_policies_on_open_connections_and_keeps_them_on_a_bad_file() {
    let d = Daemon::start(POLICY);
    let mut c = Raw::connect(&d.socket());
    let mut id = 0;
    let mut check = |c: &mut Raw, key: &str| {
        id += 1;
        c.send(json!({"id": id, "op": "check", "tenant": "t", "key": key}));
        c.recv().unwrap()
    };
    assert_eq!(check(&mut c, "a")["limit"], 2);

    let config = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        config.replace("capacity = 2", "capacity = 7"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_until_blocking("the reload", SOON, || d.log_contains("reloaded policies"));
    assert_eq!(
        check(&mut c, "b")["limit"],
        7,
        "same connection, new policy"
    );

    std::fs::write(
        d.config_path(),
        "[policies.default]\nrules = 'not a list'\n",
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_until_blocking("the failed reload", SOON, || {
        d.log_contains("reload failed")
    });
    assert_eq!(
        check(&mut c, "c")["limit"],
        7,
        "a bad file keeps the running policies"
    );
}

/// quotad starts and answers with Redis down, logging where Redis should
/// be, why it does not answer, and what quotad does meanwhile.
#[test]
fn redis_down_at_start_does_not_stop_quotad_from_starting() {
    let mut redis = Redis::start();
    let table = redis_table(&redis);
    redis.kill();
    let d = Daemon::start(&format!("{table}{POLICY}"));
    let mut c = Raw::connect(&d.socket());
    c.send(json!({"id": 1, "op": "hello"}));
    let r = c.recv().unwrap();
    assert_eq!(r["backend"], "redis");
    assert_eq!(r["protocol"], 1);
    let line = d.log_line(" not answering (").expect("a start-up line");
    let at = format!("Redis at redis+unix://{}", redis.socket().display());
    assert!(line.contains(&at), "{line}");
    assert!(line.contains("No such file or directory"), "{line}");
    assert!(
        line.contains("deciding by each policy's failure mode"),
        "{line}"
    );
}

/// The same over TCP, the issue's case: a port nothing listens on is named
/// with the OS's "Connection refused".
#[test]
fn redis_refusing_tcp_at_start_names_the_address_and_the_os_error() {
    let port = free_port();
    let table = format!("[redis]\nurl = \"redis://127.0.0.1:{port}\"\ntimeout_ms = 100\n");
    let d = Daemon::start(&format!("{table}{POLICY}"));
    let mut c = Raw::connect(&d.socket());
    c.send(json!({"id": 1, "op": "check", "tenant": "t", "key": "k"}));
    let r = c.recv().unwrap();
    assert_eq!(
        (r["allowed"].as_bool(), r["degraded"].as_bool()),
        (Some(true), Some(true))
    );
    let line = d.log_line(" not answering (").expect("a start-up line");
    assert!(
        line.contains(&format!(
            "Redis at redis://127.0.0.1:{port} not answering ("
        )),
        "{line}"
    );
    assert!(line.contains("Connection refused"), "{line}");
    assert!(
        line.contains("deciding by each policy's failure mode"),
        "{line}"
    );
}

/// The batch code is loaded once at start, so the first check is one
/// FCALL with no reload.
#[test]
fn the_batch_code_is_loaded_before_the_first_request() {
    let redis = Redis::start();
    let d = Daemon::start(&format!("{}{POLICY}", redis_table(&redis)));
    assert!(d.log_contains(&format!(
        "Redis at redis+unix://{} connected, batch code loaded",
        redis.socket().display()
    )));
    assert_eq!(redis.calls("function|load"), 1);
    let mut c = Raw::connect(&d.socket());
    c.send(json!({"id": 1, "op": "check", "tenant": "t", "key": "k"}));
    assert_eq!(c.recv().unwrap()["allowed"], true);
    assert_eq!(redis.calls("fcall"), 1);
    assert_eq!(redis.calls("function|load"), 1, "no reload was needed");
}
