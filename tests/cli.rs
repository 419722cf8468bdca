//! The command line: `quotad check` against a running daemon (exit status
//! 0 allowed, 1 denied, 2 error, 3 degraded), `quotad tenant`, the messages
//! that say what went wrong and what to do, and `quotad --help`/`--version`.

mod common;

use std::process::Command;

use common::{Daemon, QUOTAD};

fn check(d: &Daemon, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(QUOTAD)
        .args(["check", "--tenant", "acme", "--key", "user:1"])
        .arg("--socket")
        .arg(d.socket())
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `quotad check` prints the decision and exits 0 allowed, 1 denied, 2 on
/// an error; the config file can name the socket.
#[test]
fn check_prints_the_decision_and_exits_by_it() {
    let d = Daemon::start(
        "[policies.default]\nrules = [{ name = \"burst\", kind = \"token_bucket\", capacity = 2, refill_per_sec = 0.01 }]\n",
    );
    let (code, out, _) = check(&d, &[]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("allowed=true limit=2 remaining=1 "),
        "{out}"
    );
    assert_eq!(check(&d, &[]).0, 0);
    let (code, out, _) = check(&d, &[]);
    assert_eq!(code, 1, "denied");
    assert!(
        out.contains("allowed=false") && out.contains("rule=burst"),
        "{out}"
    );
    let (code, _, err) = check(&d, &["--policy", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown_policy"), "{err}");
    // The config file names the socket too (an empty QUOTAD_SOCKET is unset).
    let out = Command::new(QUOTAD)
        .args([
            "check", "--tenant", "t", "--key", "k", "--cost", "0", "--config",
        ])
        .arg(d.config_path())
        .env("QUOTAD_SOCKET", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

/// `quotad check` with no daemon at the socket exits 2, saying so.
#[test]
fn check_without_a_daemon_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(QUOTAD)
        .args(["check", "--tenant", "t", "--key", "k", "--socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach quotad: ") && err.contains("none.sock: No such file"),
        "{err}"
    );
    assert!(
        err.contains(
            "Is quotad running? Start it with `quotad serve`, or give its socket with --socket or QUOTAD_SOCKET."
        ),
        "{err}"
    );
}

#[test]
fn a_degraded_answer_exits_3_unless_allowed() {
    // Redis is not there: every check is answered by the failure mode.
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[redis]\nurl = \"redis+unix://{}/absent.sock\"\ntimeout_ms = 50\n\
         [policies.default]\nfailure_mode = \"open\"\n\
         rules = [{{ name = \"r\", kind = \"fixed_window\", limit = 5, window_ms = 60000 }}]\n",
        dir.path().display()
    ));
    let (code, out, err) = check(&d, &[]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("allowed=true") && out.contains("degraded=true"),
        "{out}"
    );
    assert!(
        err.contains("degraded: decided by the policy's failure mode"),
        "{err}"
    );
    let (code, out, _) = check(&d, &["--allow-degraded"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn an_unknown_policy_lists_the_config_s_policies() {
    let d = Daemon::start(
        "[policies.api]\nrules = [{ name = \"r\", kind = \"fixed_window\", limit = 5, window_ms = 60000 }]\n\
         [policies.writes]\nrules = [{ name = \"r\", kind = \"fixed_window\", limit = 5, window_ms = 60000 }]\n",
    );
    let out = Command::new(QUOTAD)
        .args(["check", "--tenant", "t", "--key", "k", "--config"])
        .arg(d.config_path())
        .env("QUOTAD_SOCKET", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown policy `default`"), "{err}");
    assert!(
        err.contains("quotad.toml defines `api`, `writes`: pass one with --policy"),
        "{err}"
    );
    // Without the file, the hint says how to list them.
    let (_, _, err) = check(&d, &["--policy", "nope"]);
    assert!(
        err.contains("unknown policy `nope`; pass one of the daemon's policies with --policy"),
        "{err}"
    );
}

#[test]
fn a_missing_config_file_names_its_cause_once() {
    for command in [
        &["serve"][..],
        &["check", "--tenant", "t", "--key", "k"],
        &["stats"],
        &["health"],
    ] {
        let out = Command::new(QUOTAD)
            .args(command)
            .args(["--config", "/nonexistent/quotad.toml"])
            .env_remove("QUOTAD_SOCKET")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim(),
            "quotad: cannot read config file /nonexistent/quotad.toml: No such file or directory (os error 2)"
        );
    }
}

#[test]
fn tenant_set_and_delete_say_what_they_did() {
    let redis = common::Redis::start();
    let d = Daemon::start(&format!(
        "{}[quota]\nsource = \"redis\"\n\
         [policies.api]\nrules = [{{ name = \"burst\", kind = \"token_bucket\", capacity = 10, refill_per_sec = 1 }}]\n\
         [plans.pro]\n",
        common::redis_table(&redis)
    ));
    let tenant = |args: &[&str]| {
        let out = d.tenant_cli(args);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        tenant(&[
            "set",
            "acme",
            "--plan",
            "pro",
            "--limit",
            "api.burst.capacity=50"
        ]),
        "set: acme plan=pro api.burst.capacity=50\n"
    );
    assert_eq!(
        tenant(&["delete", "acme"]),
        "deleted: acme is on the default plan\n"
    );
    assert_eq!(tenant(&["delete", "acme"]), "acme had no record\n");
}

#[test]
fn the_top_level_help_names_the_cache() {
    for flag in ["-h", "--help"] {
        let out = Command::new(QUOTAD).arg(flag).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Rate-limiting and caching sidecar"), "{help}");
    }
    let out = Command::new(QUOTAD).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("whether a response is already cached"));
}

/// `quotad --version` prints the package version.
#[test]
fn version_names_the_package_version() {
    let out = Command::new(QUOTAD).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("quotad {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `quotad serve` with an invalid config exits 2 and names the bad field.
#[test]
fn an_invalid_config_names_the_field_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("q.toml");
    std::fs::write(&config, "[redis]\nurl = 'redis://x'\ntimeout_ms = 0\n").unwrap();
    let out = Command::new(QUOTAD)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis.timeout_ms"));
}

/// `$QUOTAD_SOCKET` sets where `serve` listens and where `check` connects.
#[test]
fn quotad_socket_places_the_daemon_and_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("env.sock");
    let mut serve = Command::new(QUOTAD)
        .arg("serve")
        .env("QUOTAD_SOCKET", &socket)
        .env_remove("QUOTAD_CONFIG")
        .env_remove("XDG_RUNTIME_DIR")
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_until_blocking("the socket at $QUOTAD_SOCKET", common::SOON, || {
        socket.exists()
    });
    let out = Command::new(QUOTAD)
        .args(["check", "--tenant", "t", "--key", "k"])
        .env("QUOTAD_SOCKET", &socket)
        .env_remove("QUOTAD_CONFIG")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("allowed=true limit=20 "));
    assert!(
        !dir.path().join("quotad.sock").exists(),
        "the default path is unused"
    );
    serve.kill().unwrap();
    serve.wait().unwrap();
}

/// `quotad check` prints the lease a concurrency rule took, and `quotad
/// release` gives it back: exit 0 released, 1 not held (twice), 2 for a
/// string that is not a lease.
#[test]
fn release_gives_back_the_lease_check_printed() {
    let d = Daemon::start(
        "[policies.default]\nrules = [{ name = \"inflight\", kind = \"concurrency\", limit = 1, lease_ms = 60000 }]\n",
    );
    let (code, out, _) = check(&d, &[]);
    assert_eq!(code, 0, "{out}");
    let lease = out
        .trim()
        .rsplit_once(" lease=")
        .expect("a lease")
        .1
        .to_owned();
    assert_eq!(check(&d, &[]).0, 1, "the one slot is taken");
    let release = |lease: &str| {
        let out = Command::new(QUOTAD)
            .args([
                "release", "--tenant", "acme", "--key", "user:1", "--lease", lease, "--socket",
            ])
            .arg(d.socket())
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        release(&lease),
        (0, "released=true\n".into(), String::new())
    );
    assert_eq!(release(&lease).0, 1, "twice");
    let (code, _, err) = release("nope");
    assert_eq!(code, 2);
    assert!(err.contains("is not a lease"), "{err}");
    assert_eq!(check(&d, &[]).0, 0, "the slot is free again");
}
