//! `[[access]]`: peers admitted by their credentials (SO_PEERCRED), pinned
//! to their tenants, granted the admin ops or not; a SIGHUP re-evaluates
//! open connections. Another user's client is the real `quotad` CLI run
//! as `nobody` (the tests run as root); root's own connections are [`Raw`].

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{Daemon, QUOTAD, Raw, SOON, code, wait_until_blocking};
use serde_json::{Value, json};

const NOBODY: u32 = 65534;

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 100, refill_per_sec = 1 }]
"#;

/// A daemon whose socket `nobody` can reach, with `rules` (TOML) and a
/// default policy.
fn start(rules: &str) -> Daemon {
    let d = Daemon::start(&format!("socket_mode = 0o666\n{rules}\n{POLICY}"));
    let dir = d.config_path().parent().unwrap().to_owned();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Runs `quotad <args> --socket <d's>` as `nobody`: exit status, stdout,
/// stderr.
fn as_nobody(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    run_as(d, NOBODY, NOBODY, args)
}

/// Runs `quotad <args> --socket <d's>` as `uid` with primary group `gid`.
fn run_as(d: &Daemon, uid: u32, gid: u32, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(QUOTAD)
        .args(args)
        .arg("--socket")
        .arg(d.socket())
        .output()
        .expect("running setpriv (util-linux)");
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check_as_nobody(d: &Daemon, tenant: &str) -> (i32, String, String) {
    as_nobody(d, &["check", "--tenant", tenant, "--key", "k"])
}

fn check(c: &mut Raw, id: u64, tenant: &str) -> Value {
    c.send(json!({"id": id, "op": "check", "tenant": tenant, "key": "k"}));
    c.recv().expect("a reply")
}

fn log_count(d: &Daemon, needle: &str) -> usize {
    let log = d.stderr.lock().unwrap();
    log.iter().filter(|l| l.contains(needle)).count()
}

/// A uid no rule matches is refused at connect (`forbidden`, `id` 0, then
/// end of stream), root included when it is not listed, unless its primary
/// group is listed; refusals are
/// counted each time and logged once per uid per minute.
#[test]
fn a_peer_no_rule_matches_is_refused_at_connect() {
    let d = start(
        "[[access]]\nuids = [4242]\ntenants = [\"*\"]\n[[access]]\ngids = [4243]\ntenants = [\"*\"]",
    );
    for _ in 0..3 {
        let (status, out, err) = check_as_nobody(&d, "acme");
        assert_eq!(status, 2, "{out}{err}");
        assert!(
            err.contains("forbidden") && err.contains("no `[[access]]` rule admits uid 65534"),
            "{err}"
        );
    }
    // The same uid with a listed primary group is admitted.
    let (status, out, err) = run_as(
        &d,
        NOBODY,
        4243,
        &["check", "--tenant", "acme", "--key", "k"],
    );
    assert_eq!(status, 0, "{out}{err}");
    // Root is not special: the raw refusal.
    let mut root = Raw::connect(&d.socket());
    let reply = root.recv().expect("the refusal");
    assert_eq!(reply["id"], 0);
    assert_eq!(code(&reply), Some("forbidden"), "{reply}");
    assert!(root.closed());
    wait_until_blocking("the refusals' log lines", SOON, || {
        log_count(&d, "access: forbidden") == 2
    });
    assert_eq!(log_count(&d, "uid 65534"), 1, "once per uid per minute");
    assert_eq!(log_count(&d, "uid 0 "), 1);
}

/// Refused peers never take connection slots: with `max_connections = 2`,
/// `nobody` (no rule admits it) holds 20 connections open without reading
/// or closing, and root still gets both slots; the refusals are counted.
#[test]
fn refused_peers_do_not_take_connection_slots() {
    let d = start("max_connections = 2\n[[access]]\nuids = [0]\ntenants = [\"*\"]");
    let hold = format!(
        "import socket, sys, time\n\
         ss = []\n\
         for _ in range(20):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect({:?})\n    ss.append(s)\n\
         print('connected', flush=True)\n\
         time.sleep(30)\n",
        d.socket().display().to_string()
    );
    let mut holder = Command::new("setpriv")
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            "/usr/bin/python3".into(),
            "-c".into(),
            hold,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running setpriv (util-linux) and /usr/bin/python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "connected\n");
    // Connected in the listen queue before root's, so accepted before them.
    let mut roots = [Raw::connect(&d.socket()), Raw::connect(&d.socket())];
    for (id, c) in roots.iter_mut().enumerate() {
        c.send(json!({"id": id + 1, "op": "hello"}));
        let reply = c.recv().expect("a reply");
        assert_eq!(reply["ok"], true, "{reply}");
    }
    let counters = roots[0].counters();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(counters["forbidden_connect"], 20, "{counters:?}");
    assert_eq!(counters["connections_refused"], 0, "{counters:?}");
    assert_eq!(counters["connections_total"], 2, "{counters:?}");
}

/// A uid pinned to `acme-*` is served on `acme-1` and refused `other`;
/// on one connection, a refused tenant gets `forbidden` with the request's
/// `id` and the connection stays open; `hello` and `stats` stay allowed;
/// an admin op without `admin = true` is `forbidden`.
#[test]
fn a_peer_is_served_on_its_tenants_only() {
    let d = start(&format!(
        "[[access]]\nuids = [{NOBODY}]\ntenants = [\"acme-*\"]\n[[access]]\nuids = [0]\ntenants = [\"acme\", \"acme-*\"]"
    ));
    let (status, out, err) = check_as_nobody(&d, "acme-1");
    assert_eq!(status, 0, "{out}{err}");
    assert!(out.starts_with("allowed=true"), "{out}");
    let (status, _, err) = check_as_nobody(&d, "other");
    assert_eq!(status, 2, "{err}");
    assert!(
        err.contains("forbidden") && err.contains("tenant `other` is not granted to uid 65534"),
        "{err}"
    );
    let (status, _, err) = check_as_nobody(&d, "acme");
    assert_eq!(status, 2, "`acme-*` does not cover `acme`: {err}");

    let mut c = Raw::connect(&d.socket());
    let reply = check(&mut c, 5, "other");
    assert_eq!(
        (reply["id"].clone(), code(&reply)),
        (json!(5), Some("forbidden"))
    );
    c.send(json!({"id": 6, "op": "cache_get", "tenant": "acme-2x", "key": "k"}));
    assert_eq!(
        c.recv().unwrap()["ok"],
        true,
        "a prefix covers what follows it"
    );
    assert_eq!(check(&mut c, 7, "acme")["allowed"], true);
    c.send(json!({"id": 8, "op": "tenant_list"}));
    let reply = c.recv().unwrap();
    assert_eq!(
        (reply["id"].clone(), code(&reply)),
        (json!(8), Some("forbidden"))
    );
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`admin = true`"),
        "{reply}"
    );
    c.send(json!({"id": 9, "op": "hello"}));
    assert_eq!(c.recv().unwrap()["ok"], true);
    let counters = c.counters();
    assert_eq!(counters["forbidden_tenant"], 3, "{counters:?}");
    assert_eq!(counters["forbidden_admin"], 1, "{counters:?}");
    assert_eq!(counters["forbidden_connect"], 0, "{counters:?}");
    assert_eq!(counters["errors_forbidden"], 4, "{counters:?}");
}

/// Admin ops need `admin = true`; a SIGHUP that grants it lets the same
/// uid in.
#[test]
fn admin_ops_need_admin_true() {
    let d = start(&format!("[[access]]\nuids = [{NOBODY}]\ntenants = [\"*\"]"));
    let (status, _, err) = as_nobody(&d, &["tenant", "get", "acme"]);
    assert_eq!(status, 2, "{err}");
    assert!(
        err.contains("forbidden")
            && err.contains(
                "`tenant_get` needs an `[[access]]` rule with `admin = true` for uid 65534"
            ),
        "{err}"
    );
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        config.replace("tenants = [\"*\"]", "tenants = [\"*\"]\nadmin = true"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_until_blocking("the reload", SOON, || d.log_contains("reloaded policies"));
    let (status, out, err) = as_nobody(&d, &["tenant", "get", "acme"]);
    assert_eq!(status, 0, "{out}{err}");
    assert!(out.contains("acme unknown to the source"), "{out}");
}

/// A SIGHUP re-evaluates open connections at their next request: one whose
/// tenants shrank is refused the others and stays open; one no rule admits
/// any more gets `forbidden` with `id` 0 and is closed.
#[test]
fn sighup_re_evaluates_open_connections() {
    let d = start(&format!(
        "[[access]]\nuids = [0]\ntenants = [\"*\"]\n[[access]]\nuids = [{NOBODY}]\ntenants = [\"acme\"]"
    ));
    let mut c = Raw::connect(&d.socket());
    assert_eq!(check(&mut c, 1, "other")["allowed"], true);
    let reload = |from: &str, to: &str, n: usize| {
        let config = std::fs::read_to_string(d.config_path()).unwrap();
        assert!(config.contains(from));
        std::fs::write(d.config_path(), config.replace(from, to)).unwrap();
        d.signal(libc::SIGHUP);
        wait_until_blocking("the reload", SOON, || {
            log_count(&d, "reloaded policies") == n
        });
    };
    reload(
        "uids = [0]\ntenants = [\"*\"]",
        "uids = [0]\ntenants = [\"acme\"]",
        1,
    );
    let reply = check(&mut c, 2, "other");
    assert_eq!(
        (reply["id"].clone(), code(&reply)),
        (json!(2), Some("forbidden"))
    );
    assert_eq!(check(&mut c, 3, "acme")["allowed"], true, "still open");

    reload("uids = [0]\n", "uids = [4242]\n", 2);
    let reply = check(&mut c, 4, "acme");
    assert_eq!(reply["id"], 0, "{reply}");
    assert_eq!(code(&reply), Some("forbidden"));
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no `[[access]]` rule admits uid 0"),
        "{reply}"
    );
    assert!(c.closed());
    // A new connection is refused at connect; `nobody` is still served.
    assert_eq!(Raw::connect(&d.socket()).recv().unwrap()["id"], 0);
    assert_eq!(check_as_nobody(&d, "acme").0, 0);
}

/// Without `[[access]]` tables any peer the socket's mode lets in may use
/// every tenant, and admin ops are for `admin.allowed_uids`, as before.
#[test]
fn without_tables_every_peer_may_use_every_tenant() {
    let d = start("");
    let (status, out, err) = check_as_nobody(&d, "anything");
    assert_eq!(status, 0, "{out}{err}");
    let (status, _, err) = as_nobody(&d, &["tenant", "get", "acme"]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("`admin.allowed_uids`"), "{err}");
    let mut root = Raw::connect(&d.socket());
    root.send(json!({"id": 1, "op": "tenant_get", "tenant": "acme"}));
    assert_eq!(root.recv().unwrap()["ok"], true, "root is in the default");
    let counters = root.counters();
    assert_eq!(counters["forbidden_admin"], 1, "{counters:?}");
    assert_eq!(
        counters["forbidden_connect"] + counters["forbidden_tenant"],
        0
    );
}
