//! The daemon's log: JSON when asked, one line at each end of a Redis
//! outage, and nothing per request at the default level.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{Daemon, QUOTAD, Redis, SOON, counters, redis_table, wait_until};
use serde_json::Value;

const POLICY: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 1000000, refill_per_sec = 1000 }]
"#;

fn lines(d: &Daemon) -> Vec<String> {
    d.stderr.lock().unwrap().clone()
}

fn matching(d: &Daemon, needle: &str) -> Vec<String> {
    lines(d)
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect()
}

#[tokio::test]
async fn json_log_with_one_line_per_outage_end_and_none_per_request() {
    let mut redis = Redis::start();
    let d = Daemon::start(&format!(
        "[log]\nformat = \"json\"\n{}{POLICY}",
        redis_table(&redis)
    ));
    let c = d.client().await;
    let before = lines(&d).len();
    for i in 0..100 {
        assert!(
            !c.check("t", &format!("k{i}"), None, 1)
                .await
                .unwrap()
                .degraded
        );
    }
    assert_eq!(
        lines(&d).len(),
        before,
        "logged per request: {:?}",
        &lines(&d)[before..]
    );

    redis.kill();
    let mut degraded = 0;
    wait_until("the breaker to open", SOON, async || {
        degraded += u64::from(c.check("t", "k", None, 1).await.unwrap().degraded);
        counters(&c).await["breaker_open"] == 1
    })
    .await;
    // Degraded answers while the breaker is open (no Redis call at all).
    let open_degraded = counters(&c).await["degraded"];
    for _ in 0..20 {
        assert!(c.check("t", "k", None, 1).await.unwrap().degraded);
    }
    redis.restart();
    wait_until("the breaker to close", SOON, async || {
        counters(&c).await["breaker_open"] == 0
    })
    .await;
    assert!(degraded > 0);

    for line in lines(&d) {
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert_eq!(
        matching(&d, "circuit breaker open").len(),
        1,
        "{:?}",
        lines(&d)
    );
    let end = matching(&d, "circuit breaker closed");
    assert_eq!(end.len(), 1, "{:?}", lines(&d));
    let end: Value = serde_json::from_str(&end[0]).unwrap();
    let fields = &end["fields"];
    assert!(fields["outage_ms"].as_u64().unwrap() > 0, "{end}");
    // Counted from the breaker's opening: the 20 sent while it was open,
    // plus the few answered between its opening and `open_degraded`.
    let logged = fields["degraded"].as_u64().unwrap();
    let total = counters(&c).await["degraded"];
    assert!(
        logged >= 20 && logged <= total - open_degraded + 20,
        "{end}"
    );
}

/// `--log-format json` without a config file: the first line is JSON.
#[test]
fn log_format_flag_gives_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(QUOTAD)
        .args(["serve", "--log-format", "json", "--socket"])
        .arg(dir.path().join("q.sock"))
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let v: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(v["level"], "INFO", "{first}");
}

#[test]
fn an_unknown_log_format_is_refused() {
    let out = Command::new(QUOTAD)
        .args(["serve", "--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("xml"));
}
