//! `[metrics]`: the Prometheus endpoint of a real daemon, scraped over
//! real HTTP; counters move by exactly what the checks did.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use bytes::Bytes;
use common::{
    Daemon, Postgres, Raw, Redis, SOON, code, free_port, redis_table, wait_until,
    wait_until_blocking,
};
use quotad::client::Client;
use quotad::limiter::Decision;
use quotad::protocol::CacheSetArgs;
use serde_json::json;

/// One policy per failure mode: `api` and `daily` open, `shut` closed,
/// `inproc` local.
const POLICIES: &str = r#"
[policies.api]
rules = [{ name = "burst", kind = "token_bucket", capacity = 5, refill_per_sec = 1 }]
[policies.daily]
rules = [{ name = "day", kind = "daily_quota", limit = 2 }]
[policies.shut]
failure_mode = "closed"
rules = [{ name = "minute", kind = "fixed_window", limit = 100, window_ms = 60000 }]
[policies.inproc]
failure_mode = "local"
rules = [{ name = "minute", kind = "fixed_window", limit = 100, window_ms = 60000 }]
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

/// A daemon on `redis` with the test policies, serving metrics; and the
/// metrics port.
fn serving_metrics(redis: &Redis) -> (Daemon, u16) {
    let port = free_port();
    let d = Daemon::start(&format!(
        "{}[metrics]\nlisten = \"127.0.0.1:{port}\"\n{POLICIES}",
        redis_table(redis)
    ));
    (d, port)
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
    let (d, port) = serving_metrics(&redis);
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
    // One check at a time: each went alone, in a round trip of its own.
    assert_eq!(delta(&m0, &m2, "quotad_batch_ops_count"), 6.0);
    assert_eq!(
        delta(&m0, &m2, "quotad_redis_round_trip_seconds_count"),
        6.0
    );

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
    // The other failure modes, with the breaker open: `closed` denies and
    // `local` decides in process, each answer degraded and counted under
    // its own mode only.
    for _ in 0..3 {
        let dec = check(&c, "shut", "k").await;
        assert!(dec.degraded && !dec.allowed, "{dec:?}");
    }
    for _ in 0..2 {
        let dec = check(&c, "inproc", "k").await;
        assert!(dec.degraded && dec.allowed, "{dec:?}");
    }
    let m5 = scrape(port);
    let mode = |m: &str| format!("quotad_degraded_decisions_total{{failure_mode=\"{m}\"}}");
    for (policy, failure_mode, n) in [("shut", "closed", 3.0), ("inproc", "local", 2.0)] {
        assert_eq!(delta(&m4, &m5, &checks(policy, "degraded")), n, "{policy}");
        assert_eq!(delta(&m4, &m5, &mode(failure_mode)), n, "{failure_mode}");
        for o in ["within_limit", "near_limit", "over_limit"] {
            assert_eq!(delta(&m4, &m5, &checks(policy, o)), 0.0, "{policy} {o}");
        }
        let rejected =
            format!("quotad_rate_limiter_rejections_total{{policy=\"{policy}\",rule=\"minute\"}}");
        assert_eq!(delta(&m4, &m5, &rejected), 0.0, "{policy}");
    }
    assert_eq!(delta(&m4, &m5, &mode("open")), 0.0);
    assert_eq!(delta(&m4, &m5, &checks("api", "degraded")), 0.0);

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
    // At least the open connection's task.
    assert!(m["quotad_tasks"] >= 1.0, "{}", m["quotad_tasks"]);
    assert_eq!(m["quotad_requests_in_flight"], 0.0);
    assert_eq!(m["quotad_shard_queue_depth"], 0.0);
    assert_eq!(http(port, "GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(port, "POST /metrics HTTP/1.1\r\n\r\n").0, 405);
}

/// `forbidden` answers are exported by reason, as `stats` counts them: a
/// tenant the peer's `[[access]]` rules do not grant, an admin op without
/// `admin = true`, and a peer no rule admits any more (after a SIGHUP, at
/// connect).
#[test]
fn forbidden_answers_count_by_reason() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[[access]]\nuids = [0]\ntenants = [\"acme\"]\n{POLICIES}"
    ));
    let forbidden =
        |m: &Samples, reason: &str| m[&format!("quotad_forbidden_total{{reason=\"{reason}\"}}")];
    let m0 = scrape(port);
    for reason in ["connect", "tenant", "admin"] {
        assert_eq!(forbidden(&m0, reason), 0.0, "{reason}");
    }
    let mut c = Raw::connect(&d.socket());
    for (id, tenant) in [(1, "other"), (2, "acme"), (3, "acme-1")] {
        c.send(json!({"id": id, "op": "check", "tenant": tenant, "key": "k", "policy": "api"}));
        let reply = c.recv().expect("a reply");
        assert_eq!(
            code(&reply),
            (tenant != "acme").then_some("forbidden"),
            "{reply}"
        );
    }
    c.send(json!({"id": 4, "op": "tenant_list"}));
    assert_eq!(code(&c.recv().unwrap()), Some("forbidden"));
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        config.replace("uids = [0]", "uids = [4242]"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_until_blocking("the reload", SOON, || d.log_contains("reloaded policies"));
    let reply = Raw::connect(&d.socket()).recv().expect("the refusal");
    assert_eq!(
        (reply["id"].clone(), code(&reply)),
        (json!(0), Some("forbidden"))
    );
    let m1 = scrape(port);
    for (reason, n) in [("connect", 1.0), ("tenant", 2.0), ("admin", 1.0)] {
        assert_eq!(forbidden(&m1, reason), n, "{reason}");
    }
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
    // One check takes each of the shard's two round-trip slots (both stuck
    // on the paused Redis); the next eight queue behind them.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            check(&c, "api", &format!("k{i}")).await
        }));
        if i < 2 {
            wait_until("a batch out", SOON, async || {
                scrape(port)["quotad_requests_in_flight"] == (i + 1) as f64
                    && scrape(port)["quotad_shard_queue_depth"] == 0.0
            })
            .await;
        }
    }
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

/// Each cache read and write moves its counter by exactly one.
#[tokio::test]
async fn cache_counters_move_by_exactly_what_the_ops_did() {
    let redis = Redis::start();
    let (d, port) = serving_metrics(&redis);
    let c = d.client().await;
    let m0 = scrape(port);
    let set = CacheSetArgs {
        tenant: "t".into(),
        key: "a".into(),
        value: Bytes::from_static(b"v"),
        ttl_ms: 60_000,
        stale_ms: 0,
        tags: vec![],
    };
    assert!(!c.cache_set(set).await.unwrap(), "stored, not degraded");
    assert_eq!(
        c.cache_get("t", "a", 0).await.unwrap().value.as_deref(),
        Some(&b"v"[..])
    );
    let miss = c.cache_get("t", "b", 0).await.unwrap();
    assert!(miss.value.is_none() && !miss.fill, "{miss:?}");
    let fill = c.cache_get("t", "c", 1000).await.unwrap();
    assert!(fill.value.is_none() && fill.fill, "{fill:?}");
    assert_eq!(c.cache_del("t", &["a"], &[]).await.unwrap(), 1);
    let m1 = scrape(port);
    for (name, n) in [
        ("quotad_cache_hits_total", 1.0),
        ("quotad_cache_stale_hits_total", 0.0),
        ("quotad_cache_misses_total", 2.0),
        ("quotad_cache_fills_total", 1.0),
        ("quotad_cache_fill_waits_total", 0.0),
        ("quotad_cache_invalidations_total", 1.0),
        (
            "quotad_request_duration_seconds_count{op=\"cache_set\"}",
            1.0,
        ),
        (
            "quotad_request_duration_seconds_count{op=\"cache_get\"}",
            3.0,
        ),
        (
            "quotad_request_duration_seconds_count{op=\"cache_del\"}",
            1.0,
        ),
        ("quotad_request_duration_seconds_count{op=\"check\"}", 0.0),
    ] {
        assert_eq!(delta(&m0, &m1, name), n, "{name}");
    }
}

/// Tenant quota lookups count per cache level: a cold tenant misses the
/// local level and the Redis level (then PostgreSQL answers), its next
/// check hits the local level; a second quotad misses locally and hits the
/// Redis level the first one filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quota_cache_counters_move_per_level() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    pg.psql(
        "CREATE TABLE quotad_tenants (tenant text PRIMARY KEY, plan text NOT NULL, limits jsonb);
         INSERT INTO quotad_tenants VALUES ('acme', 'pro', NULL);",
    );
    let config = |port: u16| {
        format!(
            "{}[metrics]\nlisten = \"127.0.0.1:{port}\"\n[quota]\nsource = \"postgres\"\ncache_ttl_ms = 60000\n[quota.postgres]\nurl = {:?}\n{POLICIES}[plans.pro]\n",
            redis_table(&redis),
            pg.url()
        )
    };
    let level = |name: &str, level: &str| {
        format!("quotad_tenant_quota_cache_{name}_total{{level=\"{level}\"}}")
    };
    let assert_moved = |before: &Samples, after: &Samples, expected: [f64; 4]| {
        let series = [
            level("misses", "local"),
            level("hits", "local"),
            level("misses", "redis"),
            level("hits", "redis"),
        ];
        let moved = series.each_ref().map(|s| delta(before, after, s));
        assert_eq!(moved, expected, "{series:?}");
    };
    let (port_a, port_b) = (free_port(), free_port());
    let (a, b) = (
        Daemon::start(&config(port_a)),
        Daemon::start(&config(port_b)),
    );
    let (ca, cb) = (a.client().await, b.client().await);
    let (a0, b0) = (scrape(port_a), scrape(port_b));
    check(&ca, "api", "k").await; // tenant `t`: unknown to PostgreSQL
    let a1 = scrape(port_a);
    assert_moved(&a0, &a1, [1.0, 0.0, 1.0, 0.0]);
    // `acme`, on the `pro` plan in PostgreSQL, decided by Redis each time.
    let acme = async |c: &Client| {
        let d = c.check("acme", "k", Some("api"), 1).await.unwrap();
        assert!(d.allowed && !d.degraded, "{d:?}");
    };
    acme(&ca).await;
    acme(&ca).await;
    let a2 = scrape(port_a);
    assert_moved(&a1, &a2, [1.0, 1.0, 1.0, 0.0]);
    acme(&cb).await;
    assert_moved(&b0, &scrape(port_b), [1.0, 0.0, 0.0, 1.0]);
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

/// Each exported series name with the labels its series carry, by label
/// name: `quotad_checks_total` → {outcome: {within_limit, …}, policy: …}.
type Exported = BTreeMap<String, BTreeMap<String, std::collections::BTreeSet<String>>>;

fn exported(samples: &Samples) -> Exported {
    let mut out = Exported::new();
    for series in samples.keys() {
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').unwrap()),
            None => (series.as_str(), ""),
        };
        let names = out.entry(name.to_owned()).or_default();
        for label in split_labels(labels).into_iter().filter(|l| !l.is_empty()) {
            let (k, v) = label.split_once('=').unwrap();
            names
                .entry(k.to_owned())
                .or_default()
                .insert(v.trim_matches('"').to_owned());
        }
    }
    out
}

/// The `label="value"` matchers of each `quotad_*{…}` selector in `expr`
/// (`=~`, `!=` and `!~` ones left out: they match patterns or absence).
fn exact_matchers(expr: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for name in metric_names(expr) {
        let selector = format!("{name}{{");
        for (at, _) in expr.match_indices(&selector) {
            let inner = &expr[at + selector.len()..];
            let inner = &inner[..inner.find('}').expect("a selector ends with }")];
            for m in split_labels(inner) {
                let Some((label, value)) = m.split_once('=') else {
                    continue;
                };
                let (label, value) = (label.trim(), value.trim());
                if label.ends_with('!') || value.starts_with('~') {
                    continue;
                }
                out.push((
                    name.clone(),
                    label.to_owned(),
                    value.trim_matches('"').to_owned(),
                ));
            }
        }
    }
    out
}

/// The label names that `expr` groups or joins by (`by`, `without`, `on`,
/// `ignoring`) or that `legend` shows (`{{label}}`).
fn label_names(expr: &str, legend: &str) -> Vec<String> {
    let mut out = Vec::new();
    for keyword in ["by", "without", "on", "ignoring"] {
        for (at, _) in expr.match_indices(keyword) {
            let before = expr[..at].chars().next_back();
            let after = expr[at + keyword.len()..].trim_start();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                || !after.starts_with('(')
            {
                continue;
            }
            let list = &after[1..after.find(')').unwrap()];
            out.extend(
                list.split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    let mut rest = legend;
    while let Some(at) = rest.find("{{") {
        let end = rest[at..].find("}}").unwrap() + at;
        out.push(rest[at + 2..end].trim().to_owned());
        rest = &rest[end..];
    }
    out
}

/// Every matcher and grouping label of `expr` names a label that a series
/// it queries has, with that value: a query of `outcome="within"` or of a
/// `failure_mode` never exported would show an empty panel, not an error.
/// `instance` and `job` come from the scrape, not from quotad.
fn assert_labels_exported(expr: &str, legend: &str, exported: &Exported) {
    let queried = metric_names(expr);
    for (name, label, value) in exact_matchers(expr) {
        let values = exported[&name].get(&label);
        assert!(
            values.is_some_and(|v| v.contains(&value)),
            "{name}{{{label}=\"{value}\"}} is queried, but {name} has {label}: {values:?} in: {expr}"
        );
    }
    for label in label_names(expr, legend) {
        let has = |name: &String| exported[name].contains_key(&label);
        assert!(
            ["instance", "job"].contains(&label.as_str()) || queried.iter().any(has),
            "{label} is used, but none of {queried:?} has it, in: {expr}"
        );
    }
}

/// `promtool check rules` and `promtool test rules` (the alerts' unit
/// tests) where promtool is installed (Debian: `prometheus`).
fn promtool_checks_the_alerts(root: &std::path::Path) {
    let Ok(version) = std::process::Command::new("promtool")
        .arg("--version")
        .output()
    else {
        println!("SKIPPED: promtool is not installed (apt-get install prometheus)");
        return;
    };
    assert!(version.status.success());
    for (args, dir) in [
        (["check", "rules", "alerts.yml"], "deploy/prometheus"),
        (
            ["test", "rules", "alerts_test.yml"],
            "tests/fixtures/prometheus",
        ),
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(root.join(dir))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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

/// The dashboard and the alerts query only metrics, labels and label
/// values a live quotad exports; promtool accepts the alerts and passes
/// their unit tests; the dashboard imports anywhere (a datasource
/// variable, no fixed uid); the pod example's config is valid.
#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let redis = Redis::start();
    let (d, port) = serving_metrics(&redis);
    let c = d.client().await;
    check(&c, "api", "k").await;
    let exported = exported(&scrape(port));

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
    let (mut queried, mut labelled) = (Vec::new(), Vec::new());
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            queried.extend(metric_names(expr));
            labelled.push((
                expr.to_owned(),
                t["legendFormat"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    let alerts = read("deploy/prometheus/alerts.yml");
    queried.extend(metric_names(&alerts));
    labelled.push((alerts, String::new()));
    assert!(queried.len() > 20, "{queried:?}");
    for name in &queried {
        assert!(
            exported.contains_key(name),
            "{name} is queried but not exported: {:?}",
            exported.keys()
        );
    }
    let matchers: usize = labelled.iter().map(|(e, _)| exact_matchers(e).len()).sum();
    assert!(
        matchers >= 3,
        "the alerts match outcome=\"over_limit\" three times"
    );
    for (expr, legend) in &labelled {
        assert_labels_exported(expr, legend, &exported);
    }
    promtool_checks_the_alerts(root);

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
