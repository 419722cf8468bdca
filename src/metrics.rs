//! Prometheus metrics (`[metrics] listen`), in the text exposition format.
//!
//! One registry per process, created on first use: policies compile their
//! counter handles from it (see [`PolicyMetrics`]) and the router its
//! latency histograms, so a handle is an `Arc` to an atomic looked up once
//! per config load, never per request, and a SIGHUP reload that recompiles
//! a policy gets the same counters back. The `stats` counters ([`Stats`])
//! are read at scrape time. Labels are policy, rule, op, level, reason and failure
//! mode: all bounded by the config or the code, never a tenant or a key.
//!
//! This module knows label values and counters, not what a policy, a
//! decision or an op is: those modules hold their handles and say what to
//! count, so they import this one and it imports none of them.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;

pub struct Metrics {
    registry: Registry,
    checks: Counters,
    rejections: Counters,
    daily_hits: Counters,
    tokens: Counters,
    shadow_denials: Counters,
    /// The same counters by `<policy>.<rule>`, for `stats`: filled when a
    /// policy compiles (a reload, a tenant's plan), read by `stats`; never
    /// touched by a check.
    shadow_by_rule: Mutex<BTreeMap<String, Counter>>,
    pub over_limit_local: Counter,
    /// Degraded check decisions by failure mode.
    degraded: Counters,
    /// Request latency (seconds) by op.
    latency: Family<Labels, Histogram>,
    pub round_trip: Histogram,
    pub batch_ops: Histogram,
    in_flight: Gauge,
    /// Jobs queued in shards for a Redis round trip, all shards together.
    pub shard_queued: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("quotad");
        let checks = Counters::default();
        r.register(
            "checks",
            "Checks answered, by policy and outcome (within_limit, near_limit: allowed with at least 80% used, over_limit, degraded)",
            checks.clone(),
        );
        let rejections = Counters::default();
        r.register(
            "rate_limiter_rejections",
            "Checks denied, by policy and the rule that denied (degraded answers excluded)",
            rejections.clone(),
        );
        let daily_hits = Counters::default();
        r.register(
            "daily_quota_hits",
            "Checks denied by a daily quota rule",
            daily_hits.clone(),
        );
        let shadow_denials = Counters::default();
        r.register(
            "shadow_denials",
            "Checks allowed that a shadow rule would have denied, by policy and that rule",
            shadow_denials.clone(),
        );
        let tokens = Counters::default();
        r.register(
            "token_bucket_consumed",
            "Tokens taken from a policy's token buckets by allowed checks",
            tokens.clone(),
        );
        let over_limit_local = Counter::default();
        r.register(
            "over_limit_local",
            "Denials answered from a shard's over-limit memory, without Redis",
            over_limit_local.clone(),
        );
        let degraded = Counters::default();
        r.register(
            "degraded_decisions",
            "Check decisions made by failure mode because Redis could not decide",
            degraded.clone(),
        );
        let latency = Family::<Labels, Histogram>::new_with_constructor(seconds_histogram);
        r.register(
            "request_duration_seconds",
            "Time from a request's dispatch to its answer, by op",
            latency.clone(),
        );
        let round_trip = seconds_histogram();
        r.register(
            "redis_round_trip_seconds",
            "Duration of one Redis round trip (a batch)",
            round_trip.clone(),
        );
        let batch_ops = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        r.register(
            "batch_ops",
            "Operations carried by one Redis round trip",
            batch_ops.clone(),
        );
        let in_flight = Gauge::default();
        r.register(
            "requests_in_flight",
            "Requests handed to shards and not answered yet",
            in_flight.clone(),
        );
        let shard_queued = Gauge::default();
        r.register(
            "shard_queue_depth",
            "Jobs queued in shards for their next Redis round trip, all shards together",
            shard_queued.clone(),
        );
        Metrics {
            registry: r,
            in_flight,
            shard_queued,
            checks,
            rejections,
            daily_hits,
            tokens,
            shadow_denials,
            shadow_by_rule: Mutex::default(),
            over_limit_local,
            degraded,
            latency,
            round_trip,
            batch_ops,
        }
    }

    /// The latency histogram of `op`'s requests (created, so exported, now).
    pub fn request_duration(&self, op: &str) -> Histogram {
        self.latency
            .get_or_create_owned(&vec![("op", op.to_string())])
    }

    /// Shadow denials by `<policy>.<rule>`, those above 0 (`stats`).
    pub fn shadow_denials(&self) -> Vec<(String, u64)> {
        let by_rule = self
            .shadow_by_rule
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (by_rule.iter())
            .map(|(name, c)| (name.clone(), c.get()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The whole exposition: the registry, then the `stats` counters.
    pub fn encode(&self, stats: &Arc<Stats>) -> String {
        let mut out = String::new();
        let mut scrape = Registry::with_prefix("quotad");
        scrape.register_collector(Box::new(StatsCollector(stats.clone())));
        encode_registry(&mut out, &self.registry).expect("writing to a String");
        encode_registry(&mut out, &scrape).expect("writing to a String");
        encode_eof(&mut out).expect("writing to a String");
        out
    }
}

/// 50 µs to ~3.3 s.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// One policy's counter handles, created when it compiles.
#[derive(Debug, Clone)]
pub struct PolicyMetrics {
    /// within_limit, near_limit, over_limit, degraded.
    outcomes: [Counter; 4],
    /// By rule, in the policy's rule order.
    rejections: Vec<Counter>,
    /// Shadow denials by rule, in the policy's rule order.
    shadow_denials: Vec<Counter>,
    daily_hits: Counter,
    tokens: Counter,
    /// Of the policy's failure mode.
    degraded_decisions: Counter,
}

/// Handles are not part of what a policy is.
impl PartialEq for PolicyMetrics {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// One check's answer, as its policy's counters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Allowed; `near_limit`: with at least 80% used; `tokens` taken from
    /// token buckets; `shadow`: the index of the shadow rule that would
    /// have denied.
    Allowed {
        near_limit: bool,
        tokens: u64,
        shadow: Option<usize>,
    },
    /// Denied by the rule at index `rule` (`None`: no rule of the policy
    /// named it); `daily`: that rule is a daily quota.
    Denied { rule: Option<usize>, daily: bool },
    /// Answered by failure mode; `shadow` as for `Allowed` (the `local`
    /// failure mode decides shadow rules too).
    Degraded { shadow: Option<usize> },
}

impl PolicyMetrics {
    /// The handles of `policy`, whose rules are named `rules` (in order)
    /// and whose failure mode is named `failure_mode`.
    pub fn new<'a>(
        policy: &str,
        rules: impl IntoIterator<Item = &'a str>,
        failure_mode: &str,
    ) -> PolicyMetrics {
        let m = metrics();
        let p = || ("policy", policy.to_string());
        let outcomes = ["within_limit", "near_limit", "over_limit", "degraded"].map(|o| {
            m.checks
                .get_or_create_owned(&vec![p(), ("outcome", o.into())])
        });
        let rules: Vec<&str> = rules.into_iter().collect();
        let by_rule = |family: &Counters| {
            (rules.iter())
                .map(|r| family.get_or_create_owned(&vec![p(), ("rule", r.to_string())]))
                .collect()
        };
        let shadow_denials: Vec<Counter> = by_rule(&m.shadow_denials);
        let mut index = m.shadow_by_rule.lock().unwrap_or_else(|e| e.into_inner());
        for (r, c) in rules.iter().zip(&shadow_denials) {
            index
                .entry(format!("{policy}.{r}"))
                .or_insert_with(|| c.clone());
        }
        drop(index);
        PolicyMetrics {
            outcomes,
            rejections: by_rule(&m.rejections),
            shadow_denials,
            daily_hits: m.daily_hits.get_or_create_owned(&vec![p()]),
            tokens: m.tokens.get_or_create_owned(&vec![p()]),
            degraded_decisions: m
                .degraded
                .get_or_create_owned(&vec![("failure_mode", failure_mode.to_string())]),
        }
    }

    /// Counts one check's answer.
    pub fn count(&self, answer: Counted) {
        match answer {
            Counted::Allowed {
                near_limit,
                tokens,
                shadow,
            } => {
                self.outcomes[usize::from(near_limit)].inc();
                if tokens > 0 {
                    self.tokens.inc_by(tokens);
                }
                if let Some(i) = shadow {
                    self.shadow_denials[i].inc();
                }
            }
            Counted::Denied { rule, daily } => {
                self.outcomes[2].inc();
                if let Some(i) = rule {
                    self.rejections[i].inc();
                }
                if daily {
                    self.daily_hits.inc();
                }
            }
            Counted::Degraded { shadow } => {
                self.outcomes[3].inc();
                if let Some(i) = shadow {
                    self.shadow_denials[i].inc();
                }
            }
        }
    }

    /// Counts a decision made by the failure mode (Redis could not decide).
    pub fn degraded_decision(&self) {
        self.degraded_decisions.inc();
    }
}

/// A request handed to a shard: in flight until dropped; its latency is
/// observed when it is answered.
#[derive(Debug)]
pub struct Timer {
    started: Instant,
    histogram: Histogram,
}

impl Timer {
    /// Starts timing a request whose latency goes to `histogram`.
    pub fn start(histogram: &Histogram) -> Timer {
        metrics().in_flight.inc();
        Timer {
            started: Instant::now(),
            histogram: histogram.clone(),
        }
    }

    pub fn observe(self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        metrics().in_flight.dec();
    }
}

/// The `stats` counters that are also metrics, read at scrape time.
#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

impl Collector for StatsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.0.counters;
        let counters = [
            (
                "redis_down_events",
                "Times Redis became unreachable (circuit breaker opened)",
                &c.breaker_trips,
            ),
            (
                "cache_hits",
                "Cache reads answered with a fresh value",
                &c.cache_hits,
            ),
            (
                "cache_stale_hits",
                "Cache reads answered with a stale value",
                &c.cache_stale_hits,
            ),
            (
                "cache_misses",
                "Cache reads that found nothing",
                &c.cache_misses,
            ),
            (
                "cache_fills",
                "Cache misses told to fill the entry",
                &c.cache_fills,
            ),
            (
                "cache_fill_waits",
                "Cache reads that waited for another caller's fill",
                &c.cache_fill_waits,
            ),
            (
                "cache_invalidations",
                "Cache entries deleted by cache_del (by key or tag)",
                &c.cache_deleted,
            ),
            (
                "near_cache_hits",
                "cache_get reads answered from the near cache, without Redis",
                &c.near_hits,
            ),
            (
                "near_cache_misses",
                "cache_get reads the near cache could not answer",
                &c.near_misses,
            ),
            (
                "near_cache_invalidations",
                "Entry changes Redis announced to the near cache's tracking connection",
                &c.near_invalidations,
            ),
            (
                "near_cache_flushes",
                "Times the near cache was emptied whole (tracking lost, Redis flushed)",
                &c.near_flushes,
            ),
            ("connections", "Connections accepted", &c.connections_total),
            (
                "redis_errors",
                "Redis round trips that failed",
                &c.redis_errors,
            ),
            (
                "redis_timeouts",
                "Redis round trips that passed their deadline",
                &c.redis_timeouts,
            ),
        ];
        for (name, help, v) in counters {
            let m = ConstCounter::new(v.load(Relaxed));
            m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)?;
        }
        let gauges = [
            (
                "datastore_partitioned",
                "1 while Redis is unreachable (circuit breaker open)",
                &c.breaker_open,
            ),
            (
                "connections_open",
                "Connections open now",
                &c.connections_open,
            ),
            (
                "near_cache_bytes",
                "Bytes the near cache holds now (keys, values, overhead)",
                &c.near_bytes,
            ),
            (
                "near_cache_entries",
                "Entries the near cache holds now",
                &c.near_entries,
            ),
        ];
        let tasks = (
            "tasks",
            "Tokio tasks alive now (connections, shards, timers)",
            crate::stats::alive_tasks(),
        );
        let gauges = gauges.map(|(name, help, v)| (name, help, v.load(Relaxed)));
        for (name, help, v) in gauges.into_iter().chain([tasks]) {
            let m = ConstGauge::new(v as i64);
            m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)?;
        }
        let levels = [
            (
                "tenant_quota_cache_hits",
                "Tenant quota lookups found in a cache level",
                [&c.quota_local_hits, &c.quota_redis_hits],
            ),
            (
                "tenant_quota_cache_misses",
                "Tenant quota lookups not found in a cache level",
                [&c.quota_local_misses, &c.quota_redis_misses],
            ),
        ];
        for (name, help, [local, redis]) in levels {
            let mut f = e.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (level, v) in [("local", local), ("redis", redis)] {
                let m = ConstCounter::new(v.load(Relaxed));
                m.encode(f.encode_family(&[("level", level)])?)?;
            }
        }
        let mut f = e.encode_descriptor(
            "forbidden",
            "Requests and connections answered forbidden by the [[access]] rules (or admin.allowed_uids), by reason: connect (no rule admits the peer), tenant (a tenant its rules do not grant), admin (an admin op without the admin grant)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let reasons = [
            ("connect", &c.forbidden_connect),
            ("tenant", &c.forbidden_tenant),
            ("admin", &c.forbidden_admin),
        ];
        for (reason, v) in reasons {
            let m = ConstCounter::new(v.load(Relaxed));
            m.encode(f.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(10), respond(stream, &stats))
                    .await;
        });
    }
}

/// One request per connection: the request head is read (to 8 KiB), the
/// answer sent, the connection closed.
async fn respond(mut s: TcpStream, stats: &Arc<Stats>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 || head.len() + n > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let path = path.map(|p| p.split(|&b| b == b'?').next().unwrap_or_default());
    let (status, kind, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics().encode(stats),
        ),
        (Some(b"GET"), _) => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(reply.as_bytes()).await?;
    s.shutdown().await
}
