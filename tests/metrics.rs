//! `[metrics]`: the Prometheus endpoint of a real daemon, scraped over
//! real HTTP; counters move by exactly what the checks did.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Daemon, Redis, SOON, free_port, redis_table, wait_until};
use quotad::client::Client;
use quotad::limiter::Decision;

const POLICIES: &str = r#"
[policies.api]
rules = [{ name = "burst", kind = "token_bucket", capacity = 5, refill_per_sec = 1 }]
[policies.daily]
rules = [{ name = "day", kind = "daily_quota", limit = 2 }]
"#;

/// Samples by name and labels as written (`name{a="x",b="y"}`).
type Samples = BTreeMap<String, f64>;

/// Sends one request; returns the status code and the body.
fn http(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "Content-Length matches the body");
    (status, body.to_owned())
}

fn scrape(port: u16) -> Samples {
    let (status, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

/// A strict parser of the OpenMetrics text format as quotad writes it:
/// every sample belongs to a family declared by `# TYPE` before it, with
/// that type's suffixes; labels are `name="value"`; values are numbers;
/// `# EOF` ends the text and nothing follows it.
fn parse(text: &str) -> Samples {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Samples::new();
    let mut lines = text.lines();
    let mut ended = false;
    for line in lines.by_ref() {
        if line == "# EOF" {
            ended = true;
            break;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().expect("a name"));
            assert!(valid_name(name), "bad metric name in {line:?}");
            match kind {
                "TYPE" => {
                    let t = parts.next().expect("a type");
                    assert!(
                        ["counter", "gauge", "histogram", "info"].contains(&t),
                        "{line:?}"
                    );
                    assert!(
                        families.insert(name.into(), t.into()).is_none(),
                        "{name} declared twice"
                    );
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown descriptor {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels end with }");
                for label in split_labels(labels) {
                    let (k, v) = label.split_once('=').expect("label=value");
                    assert!(valid_name(k), "bad label name in {line:?}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "unquoted label value in {line:?}"
                    );
                }
                name
            }
            None => series,
        };
        let declared = families.iter().any(|(family, t)| {
            let suffixes: &[&str] = match t.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_count", "_sum", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            suffixes.iter().any(|s| name == format!("{family}{s}"))
        });
        assert!(declared, "sample {name} of no declared family");
        assert!(
            samples.insert(series.into(), value).is_none(),
            "{series} twice"
        );
    }
    assert!(ended, "no # EOF");
    assert_eq!(lines.next(), None, "text after # EOF");
    samples
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Splits `a="x",b="y"` at the commas between labels (not inside quotes).
fn split_labels(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// How much each sample moved from `before` to `after` (absent: 0).
fn delta(before: &Samples, after: &Samples, series: &str) -> f64 {
    let get = |s: &Samples| s.get(series).copied().unwrap_or(0.0);
    get(after) - get(before)
}

fn checks(policy: &str, outcome: &str) -> String {
    format!("quotad_checks_total{{policy=\"{policy}\",outcome=\"{outcome}\"}}")
}

async fn check(c: &Client, policy: &str, key: &str) -> Decision {
    c.check("t", key, Some(policy), 1).await.unwrap()
}

/// The expected outcome label of a decision (`near_limit`: ≥ 80% used).
fn outcome(d: &Decision) -> &'static str {
    match d {
        d if d.degraded => "degraded",
        d if !d.allowed => "over_limit",
        d if d.remaining * 5 <= d.limit => "near_limit",
        _ => "within_limit",
    }
}

#[tokio::test]
async fn counters_move_by_exactly_what_the_checks_did() {
    let mut redis = Redis::start();
    let port = free_port();
    let d = Daemon::start(&format!(
        "{}[metrics]\nlisten = \"127.0.0.1:{port}\"\n{POLICIES}",
        redis_table(&redis)
    ));
    let c = d.client().await;
    let m0 = scrape(port);
    assert_eq!(m0["quotad_datastore_partitioned"], 0.0);

    // A token bucket of 5: five allowed, then Redis denies, then the
    // over-limit memory denies without Redis.
    let mut seen: BTreeMap<&str, f64> = BTreeMap::new();
    for _ in 0..5 {
        let dec = check(&c, "api", "k").await;
        assert!(dec.allowed && !dec.degraded, "{dec:?}");
        *seen.entry(outcome(&dec)).or_default() += 1.0;
    }
    assert!(seen.contains_key("near_limit"), "{seen:?}");
    let redis_deny = check(&c, "api", "k").await;
    assert!(!redis_deny.allowed && !redis_deny.degraded);
    let m1 = scrape(port);
    let local_deny = check(&c, "api", "k").await;
    assert!(!local_deny.allowed && !local_deny.degraded);
    let m2 = scrape(port);
    for o in ["within_limit", "near_limit"] {
        assert_eq!(
            delta(&m0, &m2, &checks("api", o)),
            seen.get(o).copied().unwrap_or(0.0),
            "{o}"
        );
    }
    assert_eq!(delta(&m0, &m2, &checks("api", "over_limit")), 2.0);
    assert_eq!(delta(&m0, &m2, &checks("api", "degraded")), 0.0);
    assert_eq!(
        delta(
            &m0,
            &m2,
            "quotad_token_bucket_consumed_total{policy=\"api\"}"
        ),
        5.0
    );
    let rejections = "quotad_rate_limiter_rejections_total{policy=\"api\",rule=\"burst\"}";
    assert_eq!(delta(&m0, &m2, rejections), 2.0);
    assert_eq!(delta(&m0, &m1, "quotad_over_limit_local_total"), 0.0);
    assert_eq!(delta(&m1, &m2, "quotad_over_limit_local_total"), 1.0);
    assert_eq!(
        delta(&m0, &m2, "quotad_daily_quota_hits_total{policy=\"api\"}"),
        0.0
    );
    // One latency sample per check; the six that reached Redis in batches.
    let latency = "quotad_request_duration_seconds_count{op=\"check\"}";
    assert_eq!(delta(&m0, &m2, latency), 7.0);
    assert_eq!(delta(&m0, &m2, "quotad_batch_ops_sum"), 6.0);
    assert!(delta(&m0, &m2, "quotad_redis_round_trip_seconds_count") >= 1.0);

    // A daily quota of 2: the third is denied by it.
    for expect in [true, true, false] {
        assert_eq!(check(&c, "daily", "k").await.allowed, expect);
    }
    let m3 = scrape(port);
    assert_eq!(
        delta(&m2, &m3, "quotad_daily_quota_hits_total{policy=\"daily\"}"),
        1.0
    );
    let day = "quotad_rate_limiter_rejections_total{policy=\"daily\",rule=\"day\"}";
    assert_eq!(delta(&m2, &m3, day), 1.0);
    assert_eq!(delta(&m2, &m3, &checks("daily", "over_limit")), 1.0);
    assert_eq!(delta(&m2, &m3, &checks("api", "over_limit")), 0.0);

    // Redis killed: answers by failure mode (open) until the breaker opens.
    redis.kill();
    let mut degraded = 0.0;
    wait_until("the partition gauge to be 1", SOON, async || {
        let dec = check(&c, "api", "other").await;
        assert!(dec.degraded && dec.allowed, "{dec:?}");
        degraded += 1.0;
        scrape(port)["quotad_datastore_partitioned"] == 1.0
    })
    .await;
    let m4 = scrape(port);
    assert_eq!(m4["quotad_shard_queue_depth"], 0.0, "all answered");
    assert_eq!(m4["quotad_requests_in_flight"], 0.0, "all answered");
    assert_eq!(delta(&m3, &m4, &checks("api", "degraded")), degraded);
    let open = "quotad_degraded_decisions_total{failure_mode=\"open\"}";
    assert_eq!(delta(&m3, &m4, open), degraded);
    assert_eq!(delta(&m3, &m4, "quotad_redis_down_events_total"), 1.0);
    assert_eq!(
        delta(
            &m3,
            &m4,
            "quotad_token_bucket_consumed_total{policy=\"api\"}"
        ),
        0.0
    );

    redis.restart();
    wait_until("the partition gauge to be 0", SOON, async || {
        scrape(port)["quotad_datastore_partitioned"] == 0.0
    })
    .await;
    assert!(!check(&c, "api", "again").await.degraded);

    // SIGHUP: the policies recompile, the counters carry on.
    let before = scrape(port);
    d.signal(libc::SIGHUP);
    wait_until("the reload", SOON, async || {
        d.log_contains("reloaded policies")
    })
    .await;
    check(&c, "api", "after").await;
    let after = scrape(port);
    assert_eq!(delta(&before, &after, &checks("api", "within_limit")), 1.0);
    assert_eq!(
        delta(&before, &after, "quotad_redis_down_events_total"),
        0.0
    );
}

#[tokio::test]
async fn only_get_metrics_is_served() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{POLICIES}"
    ));
    let c = d.client().await;
    check(&c, "api", "k").await;
    let m = scrape(port);
    // The memory backend decides: no round trip, no partition.
    assert_eq!(m[&checks("api", "within_limit")], 1.0);
    assert_eq!(m["quotad_batch_ops_count"], 0.0);
    assert_eq!(m["quotad_connections_open"], 1.0);
    assert_eq!(m["quotad_requests_in_flight"], 0.0);
    assert_eq!(m["quotad_shard_queue_depth"], 0.0);
    assert_eq!(http(port, "GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(port, "POST /metrics HTTP/1.1\r\n\r\n").0, 405);
}

/// Redis frozen: requests wait in flight, and past the round trips a shard
/// may have out (2), in its queue; both gauges fall back to 0.
#[tokio::test]
async fn gauges_show_requests_waiting_for_redis() {
    let redis = Redis::start();
    let port = free_port();
    let d = Daemon::start(&format!(
        "shards = 1\n[redis]\nurl = {:?}\ntimeout_ms = 3000\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n{POLICIES}",
        redis.url()
    ));
    let c = std::sync::Arc::new(d.client().await);
    check(&c, "api", "warm").await;
    redis.pause();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { check(&c, "api", &format!("k{i}")).await })
        })
        .collect();
    wait_until("10 in flight, 8 queued", SOON, async || {
        let m = scrape(port);
        m["quotad_requests_in_flight"] == 10.0 && m["quotad_shard_queue_depth"] == 8.0
    })
    .await;
    redis.resume();
    for t in tasks {
        assert!(!t.await.unwrap().degraded);
    }
    let m = scrape(port);
    assert_eq!(m["quotad_requests_in_flight"], 0.0);
    assert_eq!(m["quotad_shard_queue_depth"], 0.0);
}

/// Every `quotad_*` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("quotad_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every `uid` in the dashboard is the datasource variable.
fn assert_uids_are_variables(v: &serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(uid) = o.get("uid") {
                assert_eq!(uid, "${datasource}", "a hard-coded uid: {o:?}");
            }
            o.values().for_each(assert_uids_are_variables);
        }
        serde_json::Value::Array(a) => a.iter().for_each(assert_uids_are_variables),
        _ => {}
    }
}

/// The dashboard and the alerts query only metrics a live quotad exports;
/// the dashboard imports anywhere (a datasource variable, no fixed uid);
/// the pod example's config is valid.
#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let redis = Redis::start();
    let port = free_port();
    let d = Daemon::start(&format!(
        "{}[metrics]\nlisten = \"127.0.0.1:{port}\"\n{POLICIES}",
        redis_table(&redis)
    ));
    let c = d.client().await;
    check(&c, "api", "k").await;
    let exported: std::collections::BTreeSet<String> = scrape(port)
        .keys()
        .map(|series| series.split('{').next().unwrap().to_owned())
        .collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/quotad.json")).expect("the dashboard is JSON");
    assert!(dashboard.get("uid").is_none(), "a fixed dashboard uid");
    assert_uids_are_variables(&dashboard);
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no datasource variable"
    );
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            queried.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    queried.extend(metric_names(&read("deploy/prometheus/alerts.yml")));
    assert!(queried.len() > 20, "{queried:?}");
    for name in &queried {
        assert!(
            exported.contains(name),
            "{name} is queried but not exported: {exported:?}"
        );
    }

    let pod = read("deploy/kubernetes/sidecar.yaml");
    let toml: String = pod
        .split("quotad.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    let config = quotad::config::Config::from_toml(&toml).unwrap();
    assert!(config.metrics.is_some());
}
