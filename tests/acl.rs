//! An ACL user whose password quotad reads from a file: it works, a wrong
//! one is an outage answered by the failure mode (the log names the user,
//! never the password), and a rotated file takes effect on SIGHUP without
//! a restart. The same for a Sentinel set that requires a password, over
//! TLS, and for passwords in environment variables. Every log line, reply
//! (`check` and `cache_get` while the password is wrong too), `hello` and
//! `stats` answer and `/metrics` page of these runs is searched for the
//! passwords' bytes. The worked examples of docs/config.md run as written.

mod common;

use std::path::Path;

use common::{Certs, Cluster, Daemon, MASTER_NAME, Raw, Redis, SOON, SentinelSet, wait_until};
use quotad::limiter::Decision;

const SECRET: &str = "s3cret-Pa55-9f1e";
const WRONG: &str = "wr0ng-Pa55-77ab";
const ROTATED: &str = "r0tated-Pa55-c3d2";

const POLICIES: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 1000, refill_per_sec = 1 }]

[policies.login]
failure_mode = "closed"
rules = [{ name = "burst", kind = "token_bucket", capacity = 1000, refill_per_sec = 1 }]

[quota]
source = "redis"
"#;

/// The policies, and `/metrics` on a port of its own (found again in the
/// log by [`assert_never_shown`]).
fn policies() -> String {
    format!(
        "{POLICIES}[metrics]\nlisten = \"127.0.0.1:{}\"\n",
        common::free_port()
    )
}

fn acl_user(redis: &Redis, password: &str) {
    acl_user_with(redis, password, &[]);
}

/// The `quotad` user with every command on its keys, less `denied`.
fn acl_user_with(redis: &Redis, password: &str, denied: &[&str]) {
    let pass = format!(">{password}");
    let mut args = vec![
        "ACL",
        "SETUSER",
        "quotad",
        "on",
        "resetpass",
        &pass,
        "~qd:*",
        "&qd:*",
        "+@all",
    ];
    args.extend(denied);
    assert_eq!(redis.cli(&args), "OK");
}

fn config(redis: &Redis, password_file: &Path) -> String {
    format!(
        "[redis]\nurl = {:?}\nusername = \"quotad\"\npassword_file = {:?}\n\
         timeout_ms = 200\nprobe_interval_ms = 50\n{}",
        redis.url(),
        password_file.display().to_string(),
        policies()
    )
}

async fn check(d: &Daemon, policy: Option<&str>) -> Decision {
    d.client()
        .await
        .check("acme", "k", policy, 1)
        .await
        .unwrap()
}

/// Waits until checks are decided by Redis again.
async fn until_decided_by_redis(d: &Daemon, what: &str) {
    wait_until(what, SOON, async || !check(d, None).await.degraded).await;
}

fn log_count(d: &Daemon, needle: &str) -> usize {
    d.stderr
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Everything quotad said over `raw`, on its `/metrics` page and in its
/// log has none of `secrets`.
fn assert_never_shown(d: &Daemon, replies: &[serde_json::Value], secrets: &[&str]) {
    let log = d.stderr.lock().unwrap().clone();
    assert!(!log.is_empty());
    let metrics = (d.log_line("metrics at http://"))
        .and_then(|l| {
            l.split("http://")
                .nth(1)?
                .split('/')
                .next()
                .map(str::to_owned)
        })
        .expect("/metrics is on");
    let page = common::http_get(&metrics, "/metrics");
    assert!(page.contains("quotad_"), "{page}");
    for s in secrets {
        for line in &log {
            assert!(!line.contains(s), "a log line shows a password: {line}");
        }
        for r in replies {
            assert!(!r.to_string().contains(s), "a reply shows a password: {r}");
        }
        assert!(!page.contains(s), "/metrics shows a password: {page}");
    }
}

/// `hello`, `stats`, a `tenant_get` (whose failure is an error reply that
/// quotes Redis), a `check` and a `cache_get`, as raw JSON.
fn ask_everything(d: &Daemon) -> Vec<serde_json::Value> {
    let mut raw = Raw::connect(&d.socket());
    let ops = [
        serde_json::json!({"id": 1, "op": "hello"}),
        serde_json::json!({"id": 2, "op": "stats"}),
        serde_json::json!({"id": 3, "op": "tenant_get", "tenant": "acme"}),
        serde_json::json!({"id": 4, "op": "check", "tenant": "acme", "key": "k"}),
        serde_json::json!({"id": 5, "op": "cache_get", "tenant": "acme", "key": "page"}),
    ];
    ops.into_iter()
        .map(|op| {
            raw.send(op);
            raw.recv().expect("a reply")
        })
        .collect()
}

/// A user who may not use functions (like any user of a Redis before 7.0,
/// which has none) is served by the same batch code, run as a script.
#[tokio::test]
async fn a_user_without_functions_is_served_by_the_script() {
    let redis = Redis::start();
    acl_user_with(&redis, SECRET, &["-function", "-fcall", "-fcall_ro"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("redis-password");
    std::fs::write(&file, SECRET).unwrap();
    let d = Daemon::start(&config(&redis, &file));
    for _ in 0..3 {
        let decided = check(&d, None).await;
        assert!(decided.allowed && !decided.degraded, "{decided:?}");
    }
    assert_eq!(redis.calls("fcall"), 0);
    assert_eq!(redis.calls("function|load"), 0);
    assert!(redis.calls("evalsha") >= 3, "checks ran as a script");
    assert_eq!(log_count(&d, "keeps no functions"), 1, "said once");
}

#[tokio::test]
async fn an_acl_user_with_a_password_file_wrong_password_and_rotation() {
    let redis = Redis::start();
    acl_user(&redis, SECRET);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("redis-password");
    std::fs::write(&file, format!("{WRONG}\n")).unwrap();
    let d = Daemon::start(&config(&redis, &file));

    // Wrong password: an outage, answered by each policy's failure mode.
    let open = check(&d, None).await;
    assert!(open.allowed && open.degraded, "{open:?}");
    let closed = check(&d, Some("login")).await;
    assert!(!closed.allowed && closed.degraded, "{closed:?}");
    common::wait_until_blocking("the refusal logged", SOON, || {
        d.log_contains("Redis refused quotad's credentials")
    });
    let refusal: Vec<String> = (d.stderr.lock().unwrap().iter())
        .filter(|l| l.contains("Redis refused quotad's credentials"))
        .cloned()
        .collect();
    assert_eq!(refusal.len(), 1, "logged once: {refusal:?}");
    assert!(refusal[0].contains("user=\"quotad\""), "{}", refusal[0]);
    assert!(
        refusal[0].contains(&file.display().to_string()),
        "{}",
        refusal[0]
    );
    let mut replies = ask_everything(&d);
    assert_eq!(replies[2]["error"]["code"], "unavailable", "{}", replies[2]);
    assert_eq!(replies[3]["degraded"], true, "{}", replies[3]);

    // The right password in the file, SIGHUP: Redis decides again, no restart.
    let pid = d.pid();
    std::fs::write(&file, SECRET).unwrap();
    d.signal(libc::SIGHUP);
    until_decided_by_redis(&d, "checks decided by Redis again").await;
    assert_eq!(log_count(&d, "a Redis password changed"), 1);
    assert!(redis.cli(&["DBSIZE"]).parse::<u64>().unwrap() > 0);

    // Rotation: the server's password changes, then the file, then SIGHUP;
    // connections made afterwards use the new one.
    acl_user(&redis, ROTATED);
    std::fs::write(&file, ROTATED).unwrap();
    d.signal(libc::SIGHUP);
    common::wait_until_blocking("the new password taken", SOON, || {
        log_count(&d, "a Redis password changed") == 2
    });
    redis.cli(&["CLIENT", "KILL", "USER", "quotad"]);
    until_decided_by_redis(&d, "checks decided by Redis after the rotation").await;
    assert_eq!(d.pid(), pid);
    let r = check(&d, Some("login")).await;
    assert!(r.allowed && !r.degraded, "{r:?}");
    replies.extend(ask_everything(&d));
    assert_eq!(replies[7]["ok"], true, "{}", replies[7]);

    // An unreadable file at SIGHUP keeps the running password.
    std::fs::remove_file(&file).unwrap();
    d.signal(libc::SIGHUP);
    common::wait_until_blocking("the unreadable file logged", SOON, || {
        d.log_contains("keeping the running Redis password")
    });
    assert!(!check(&d, None).await.degraded);

    assert_never_shown(&d, &replies, &[SECRET, WRONG, ROTATED]);
}

#[tokio::test]
async fn a_password_in_the_url_is_masked() {
    // Inline in a URL (TCP, so the URL carries user info): masked in the log.
    let port = common::free_port();
    let tcp = Redis::start_with(port, &[]);
    acl_user(&tcp, SECRET);
    let body = format!(
        "[redis]\nurl = \"redis://quotad:{SECRET}@127.0.0.1:{port}\"\ntimeout_ms = 200\n{}",
        policies()
    );
    let d = Daemon::start(&body);
    assert!(!check(&d, None).await.degraded);
    assert!(d.log_contains(&format!("redis://quotad:***@127.0.0.1:{port}")));
    let replies = ask_everything(&d);
    assert_never_shown(&d, &replies, &[SECRET]);
}

#[tokio::test]
async fn sentinels_with_a_password_and_an_acl_user_on_the_master_over_tls() {
    let certs = Certs::generate();
    let set = SentinelSet::start_tls(&certs, false, Some(ROTATED));
    acl_user(&set.master, SECRET);
    let dir = tempfile::tempdir().unwrap();
    let (master_pw, sentinel_pw) = (dir.path().join("master"), dir.path().join("sentinel"));
    std::fs::write(&master_pw, SECRET).unwrap();
    std::fs::write(&sentinel_pw, ROTATED).unwrap();
    let sentinels = format!(
        "[redis]\nsentinels = {:?}\nmaster_name = {MASTER_NAME:?}\ntls_ca_file = {}\n\
         username = \"quotad\"\ntimeout_ms = 500\nprobe_interval_ms = 50\n",
        set.urls(),
        certs.toml("ca.crt"),
    );
    let body = format!(
        "{sentinels}password_file = {:?}\nsentinel_password_file = {:?}\n{}",
        master_pw.display().to_string(),
        sentinel_pw.display().to_string(),
        policies()
    );
    let d = Daemon::start(&body);
    let r = check(&d, None).await;
    assert!(
        r.allowed && !r.degraded,
        "{r:?}: {:?}",
        d.stderr.lock().unwrap()
    );
    let replies = ask_everything(&d);
    assert_eq!(replies[2]["ok"], true, "{}", replies[2]);
    assert!(set.master.cli(&["DBSIZE"]).parse::<u64>().unwrap() > 0);
    assert_never_shown(&d, &replies, &[SECRET, ROTATED]);

    // From environment variables, and as an ACL user of the sentinels
    // whose password is not their `requirepass`: only the user gets in.
    for i in 0..3 {
        let user = set.cli(
            i,
            &[
                "ACL",
                "SETUSER",
                "watcher",
                "on",
                &format!(">{WRONG}"),
                "+@all",
            ],
        );
        assert_eq!(user, "OK");
    }
    let env = [
        ("QUOTAD_TEST_PW", SECRET),
        ("QUOTAD_TEST_SENTINEL_PW", WRONG),
    ];
    let by_env = |user: &str| {
        format!(
            "{sentinels}password_env = \"QUOTAD_TEST_PW\"\n{user}\
             sentinel_password_env = \"QUOTAD_TEST_SENTINEL_PW\"\n{}",
            policies()
        )
    };
    let d = Daemon::start_with_env(&by_env("sentinel_username = \"watcher\"\n"), &env);
    let r = check(&d, Some("login")).await;
    assert!(r.allowed && !r.degraded, "{r:?}");
    let replies = ask_everything(&d);
    assert_never_shown(&d, &replies, &[SECRET, WRONG, ROTATED]);
    // Without the user, the same password is refused by the sentinels.
    let refused = Daemon::start_with_env(&by_env(""), &env);
    let r = check(&refused, Some("login")).await;
    assert!(!r.allowed && r.degraded, "{r:?}");
}

/// A password in an environment variable: used, named by its variable in
/// the log when Redis refuses it, and read again (unchanged) on SIGHUP.
#[tokio::test]
async fn a_password_from_the_environment() {
    let redis = Redis::start();
    acl_user(&redis, SECRET);
    let body = || {
        format!(
            "[redis]\nurl = {:?}\nusername = \"quotad\"\npassword_env = \"QUOTAD_TEST_PW\"\n\
             timeout_ms = 200\nprobe_interval_ms = 50\n{}",
            redis.url(),
            policies()
        )
    };
    let wrong = Daemon::start_with_env(&body(), &[("QUOTAD_TEST_PW", WRONG)]);
    assert!(check(&wrong, None).await.degraded);
    common::wait_until_blocking("the refusal logged", SOON, || {
        wrong.log_contains("password=\"environment variable QUOTAD_TEST_PW\"")
    });
    let mut replies = ask_everything(&wrong);
    assert_never_shown(&wrong, &replies, &[SECRET, WRONG]);

    let d = Daemon::start_with_env(&body(), &[("QUOTAD_TEST_PW", SECRET)]);
    assert!(!check(&d, None).await.degraded);
    d.signal(libc::SIGHUP);
    common::wait_until_blocking("the reload", SOON, || d.log_contains("reloaded policies"));
    assert!(!d.log_contains("a Redis password changed"));
    assert!(!d.log_contains("keeping the running Redis password"));
    let r = check(&d, Some("login")).await;
    assert!(r.allowed && !r.degraded, "{r:?}");
    replies.extend(ask_everything(&d));
    assert_never_shown(&d, &replies, &[SECRET, WRONG]);
}

/// `text` with `from` replaced by `to`; `from` must be in it (so that a
/// change to the documented example fails here, not silently).
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "`{from}` is not in:\n{text}");
    text.replace(from, to)
}

/// The ```toml block of docs/config.md that contains `marker`.
fn documented(marker: &str) -> String {
    let doc = include_str!("../docs/config.md");
    (doc.split("```toml\n").skip(1))
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("no TOML example with `{marker}` in docs/config.md"))
        .to_owned()
}

/// The two worked examples of docs/config.md, with their addresses and
/// file names replaced by this test's: a managed Redis over TLS with an
/// ACL user, and a Sentinel set with auth and mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_examples_work() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, format!("{SECRET}\n")).unwrap();
    let pw = format!("{:?}", pw.display().to_string());
    let credential = "\"/run/credentials/quotad.service/redis-password\"";

    let managed = Redis::start_tls(&certs, false, &[]);
    acl_user(&managed, SECRET);
    let example = documented("rediss://master.my-cache");
    let example = replaced(
        &example,
        "\"rediss://master.my-cache.abc123.use1.cache.amazonaws.com:6379\"",
        &format!("\"rediss://localhost:{}\"", managed.tls_port),
    );
    let example = replaced(&example, credential, &pw);
    let example = replaced(
        &example,
        "# tls_ca_file = \"/etc/quotad/provider-ca.pem\"",
        &format!("tls_ca_file = {}", certs.toml("ca.crt")),
    );
    let d = Daemon::start(&format!("{example}{}", policies()));
    until_decided_by_redis(&d, "a check decided by the managed Redis").await;
    assert!(managed.cli(&["DBSIZE"]).parse::<u64>().unwrap() > 0);

    let set = SentinelSet::start_tls(&certs, true, Some(ROTATED));
    acl_user(&set.master, SECRET);
    let example = documented("sentinel_password_env");
    let example = replaced(
        &example,
        "[\"rediss://10.0.0.1:26379\", \"rediss://10.0.0.2:26379\", \"rediss://10.0.0.3:26379\"]",
        &format!("{:?}", set.urls()),
    );
    let example = replaced(&example, "\"mymaster\"", &format!("{MASTER_NAME:?}"));
    let example = replaced(&example, credential, &pw);
    let mut example = example;
    for (file, ours) in [
        ("redis-ca.pem", "ca.crt"),
        ("quotad.crt", "client.crt"),
        ("quotad.key", "client.key"),
    ] {
        example = replaced(
            &example,
            &format!("\"/etc/quotad/{file}\""),
            &certs.toml(ours),
        );
    }
    let env = [("QUOTAD_SENTINEL_PASSWORD", ROTATED)];
    let d = Daemon::start_with_env(&format!("{example}{}", policies()), &env);
    until_decided_by_redis(&d, "a check decided by the Sentinel's master").await;
    assert!(set.master.cli(&["DBSIZE"]).parse::<u64>().unwrap() > 0);
}

#[test]
fn a_bad_secret_setting_is_refused_without_showing_the_secret() {
    // Written twice (URL and password_file): refused at start; the error
    // masks the URL's password.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, SECRET).unwrap();
    let config = dir.path().join("quotad.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"redis://quotad:{SECRET}@127.0.0.1:1\"\npassword_file = {:?}\n",
            file.display().to_string()
        ),
    )
    .unwrap();
    let refused = || {
        let out = std::process::Command::new(common::QUOTAD)
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        err
    };
    let err = refused();
    assert!(err.contains("give it in one place"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
    // A password file that is missing names the file.
    std::fs::write(
        &config,
        "[redis]\nurl = \"redis://127.0.0.1:1\"\nusername = \"quotad\"\npassword_file = \"missing\"\n",
    )
    .unwrap();
    let err = refused();
    let missing = dir.path().join("missing");
    assert!(
        err.contains(&format!(
            "`redis.password_file`: cannot read {}",
            missing.display()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn a_tls_cluster_with_an_acl_user_and_a_rotated_password() {
    let certs = Certs::generate();
    let cluster = Cluster::start_tls(&certs, false);
    for node in &cluster.nodes {
        acl_user(node, SECRET);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, WRONG).unwrap();
    let body = format!(
        "[redis]\ncluster = {:?}\ntls_ca_file = {}\nusername = \"quotad\"\npassword_file = {:?}\n\
         timeout_ms = 500\nprobe_interval_ms = 50\n{}",
        cluster.urls(),
        certs.toml("ca.crt"),
        file.display().to_string(),
        policies()
    );
    let d = Daemon::start(&body);
    let r = check(&d, None).await;
    assert!(r.allowed && r.degraded, "{r:?}");
    common::wait_until_blocking("the refusal logged", SOON, || {
        d.log_contains("Redis refused quotad's credentials")
    });
    std::fs::write(&file, SECRET).unwrap();
    d.signal(libc::SIGHUP);
    until_decided_by_redis(&d, "the cluster deciding with the right password").await;
    let client = d.client().await;
    for i in 0..30 {
        let r = client.check(&format!("t{i}"), "k", None, 1).await.unwrap();
        assert!(!r.degraded, "{r:?}");
    }
    let replies = ask_everything(&d);
    assert_never_shown(&d, &replies, &[SECRET, WRONG]);
}
