//! Load generator: quotad side by side with the baseline a user would
//! otherwise write, in one run, against one Redis on loopback.
//!
//!     cargo bench --bench loadgen -- [--workload check,hot_key,cold_key,check_get,cache_get,tenants]
//!         [--seconds 5] [--concurrency 1,16,64,256] [--connections 4]
//!         [--value-bytes 1024] [--shards 0] [--batches 2] [--threads 1]
//!         [--near-max-bytes N] [--quotad PATH]
//!
//! `--near-max-bytes` sets `[cache] near_max_bytes` (0: the near cache off;
//! without it, quotad's default).
//!
//! `--quotad` runs another quotad binary (say, a build of an older commit)
//! instead of this one's, to compare two builds on the same machine.
//!
//! For each workload and concurrency (requests in flight), two closed-loop
//! phases, quotad then baseline:
//!
//! - `check`: quotad `check`s through the real daemon (release build) over
//!   its Unix socket, with the Rust client; the baseline runs, per request,
//!   its own EVALSHA of the same token-bucket Lua (one check per call).
//! - `hot_key`: the same, every check on one tenant-wide key.
//! - `cold_key`: the same over 1,000 tenants x 10,000 keys, so most checks
//!   find no live state (as with per-IP limits).
//! - `check_get`: quotad `check_get`s (limit, then cache, one hop); the
//!   baseline, per request, one EVALSHA for the limit and then one GET for
//!   the cache, as the article's middleware does.
//! - `cache_get`: quotad `cache_get` hits; the baseline, one GET per request.
//! - `tenants`: quotad `check`s spread over 10,000 tenants (on two plans,
//!   from the `redis` quota source) against the same checks from one
//!   tenant: a tenant's plan must come from the shard's local level, not
//!   from a Redis round trip, so the two should match.
//!
//! The baseline uses redis-rs multiplexed ConnectionManagers (which already
//! pipeline concurrent commands). Both spread their requests over the same
//! number of connections (and the baseline runs once more on a single
//! multiplexed connection, its strongest form, when that differs) and run on one single-threaded tokio runtime (like
//! one asyncio or Node worker). Every cache read hits a value of
//! `--value-bytes`. Reported: requests/s, latency p50/p99, Redis CPU per
//! request (from `INFO cpu`), quotad's own CPU per request (from /proc),
//! the load generator's CPU per request, and quotad's operations per Redis
//! round trip.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quotad::backend::redis::script;
use quotad::backend::{Job, Outcome};
use quotad::client::Client;
use quotad::config::Config;
use quotad::config::TenantRecord;
use quotad::keys::Keys;
use quotad::limiter::{Check, Policy};
use quotad::protocol::{CacheSetArgs, CheckArgs};
use redis::aio::ConnectionManager;

const TENANTS: usize = 100;
const KEYS_PER_TENANT: usize = 100;
const POLICY: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 1000000000, refill_per_sec = 1000000 }]
[plans.pro.limits]
default.burst.capacity = 2000000000
[plans.free.limits]
default.burst.capacity = 500000000
"#;
/// Tenants of the `tenants` workload.
const MANY_TENANTS: usize = 10_000;

/// The `cold_key` workload's spread.
const COLD: (usize, usize) = (1_000, 10_000);

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Check,
    HotKey,
    ColdKey,
    CheckGet,
    CacheGet,
    Tenants,
}

impl Workload {
    fn parse(s: &str) -> Workload {
        match s {
            "check" => Workload::Check,
            "hot_key" => Workload::HotKey,
            "cold_key" => Workload::ColdKey,
            "check_get" => Workload::CheckGet,
            "cache_get" => Workload::CacheGet,
            "tenants" => Workload::Tenants,
            other => panic!("unknown workload {other}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Check => "check",
            Workload::HotKey => "hot_key",
            Workload::ColdKey => "cold_key",
            Workload::CheckGet => "check_get",
            Workload::CacheGet => "cache_get",
            Workload::Tenants => "tenants",
        }
    }

    /// How quotad's requests are spread: (tenants, keys per tenant).
    fn spread(self) -> (usize, usize) {
        match self {
            Workload::Tenants => (MANY_TENANTS, 1),
            Workload::HotKey => (1, 1),
            Workload::ColdKey => COLD,
            _ => (TENANTS, KEYS_PER_TENANT),
        }
    }

    fn baseline(self) -> &'static str {
        match self {
            Workload::Check | Workload::HotKey | Workload::ColdKey => "EVALSHA per request",
            Workload::CheckGet => "EVALSHA then GET per request",
            Workload::CacheGet => "GET per request",
            Workload::Tenants => "the same checks from 1 tenant",
        }
    }
}

struct Phase {
    requests: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    redis_cpu_us: f64,
    quotad_cpu_us: Option<f64>,
    client_cpu_us: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }
}

struct Bench {
    socket: std::path::PathBuf,
    url: String,
    port: u16,
    quotad_pid: u32,
    policy: Arc<Policy>,
    seconds: f64,
}

fn main() {
    let mut seconds = 5.0;
    let mut levels = vec![1usize, 16, 64, 256];
    let mut workloads = vec![
        Workload::Check,
        Workload::HotKey,
        Workload::ColdKey,
        Workload::CheckGet,
        Workload::CacheGet,
        Workload::Tenants,
    ];
    let mut shards = 0usize;
    let mut batches = 2usize;
    let mut connections = 4usize;
    let mut threads = 1usize;
    let mut value_bytes = 1024usize;
    let mut binary = std::path::PathBuf::from(env!("CARGO_BIN_EXE_quotad"));
    let mut near = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().expect("a value");
        match a.as_str() {
            "--seconds" => seconds = value().parse().unwrap(),
            "--concurrency" => levels = value().split(',').map(|s| s.parse().unwrap()).collect(),
            "--workload" => workloads = value().split(',').map(Workload::parse).collect(),
            "--shards" => shards = value().parse().unwrap(),
            "--batches" => batches = value().parse().unwrap(),
            "--connections" => connections = value().parse().unwrap(),
            "--threads" => threads = value().parse().unwrap(),
            "--value-bytes" => value_bytes = value().parse().unwrap(),
            "--quotad" => binary = value().into(),
            "--near-max-bytes" => {
                near = format!(
                    "[cache]\nnear_max_bytes = {}\n",
                    value().parse::<u64>().unwrap()
                )
            }
            _ => {} // cargo passes --bench
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    let url = format!("redis://127.0.0.1:{port}");
    let socket = dir.path().join("quotad.sock");
    let config = format!(
        "[server]\nsocket = {:?}\nshards = {shards}\nmax_batches_in_flight = {batches}\nthreads = {threads}\n[redis]\nurl = {url:?}\ntimeout_ms = 1000\n[quota]\nsource = \"redis\"\n{near}{POLICY}",
        socket.display().to_string()
    );
    std::fs::write(dir.path().join("quotad.toml"), &config).unwrap();
    wait(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let mut quotad = Command::new(&binary)
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("quotad.toml"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    wait(|| std::os::unix::net::UnixStream::connect(&socket).is_ok());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bench = Bench {
        socket,
        url,
        port,
        quotad_pid: quotad.id(),
        policy: Config::from_toml(&config)
            .unwrap()
            .plans
            .default_plan()
            .get(None)
            .unwrap()
            .clone(),
        seconds,
    };
    if workloads
        .iter()
        .any(|w| matches!(w, Workload::CheckGet | Workload::CacheGet))
    {
        rt.block_on(bench.fill_caches(value_bytes));
    }
    if workloads.contains(&Workload::Tenants) {
        rt.block_on(bench.add_tenants());
    }
    println!(
        "Redis {} on loopback, {} CPUs, {seconds} s per phase, {TENANTS} tenants x {KEYS_PER_TENANT} keys, {value_bytes}-byte cached values",
        redis_version(port),
        num_cpus()
    );
    for w in workloads {
        println!();
        println!("`{}` (baseline: {}):", w.name(), w.baseline());
        println!();
        println!(
            "| in flight | quotad req/s | baseline req/s | ratio | quotad p50 / p99 (µs) | baseline p50 / p99 (µs) | Redis CPU/req quotad / baseline (µs) | quotad CPU/req (µs) | client CPU/req quotad / baseline (µs) | ops per batch | batch time (µs) | baseline on 1 connection: req/s, ratio, Redis CPU/req (µs) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for &c in &levels {
            let conns = connections.min(c);
            let before = rt.block_on(bench.batch_counters());
            let q = rt.block_on(bench.run_quotad(w, c, conns, w.spread()));
            let after = rt.block_on(bench.batch_counters());
            let batches = (after.0 - before.0).max(1) as f64;
            let per_batch = (after.1 - before.1) as f64 / batches;
            let batch_us = (after.2 - before.2) as f64 / batches;
            let b = rt.block_on(bench.run_baseline(w, c, conns));
            let one = match (conns, w) {
                (1, _) | (_, Workload::Tenants) => "(same)".to_owned(),
                _ => {
                    let b1 = rt.block_on(bench.run_baseline(w, c, 1));
                    format!(
                        "{:.0}, {:.2}x, {:.1}",
                        b1.rate(),
                        q.rate() / b1.rate(),
                        b1.redis_cpu_us
                    )
                }
            };
            println!(
                "| {c} | {:.0} | {:.0} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} / {:.1} ({:.2}x) | {:.1} | {:.1} / {:.1} | {per_batch:.1} | {batch_us:.0} | {one} |",
                q.rate(),
                b.rate(),
                q.rate() / b.rate(),
                q.p50_us,
                q.p99_us,
                b.p50_us,
                b.p99_us,
                q.redis_cpu_us,
                b.redis_cpu_us,
                q.redis_cpu_us / b.redis_cpu_us,
                q.quotad_cpu_us.unwrap_or(f64::NAN),
                q.client_cpu_us,
                b.client_cpu_us,
            );
        }
    }
    kill(&mut quotad);
    kill(&mut redis);
}

/// The cache key a request reads, and the baseline's Redis key for it.
fn cache_key(key: &str) -> String {
    format!("GET /{key}")
}

fn baseline_cache_key(tenant: &str, key: &str) -> String {
    format!("bench:cache:{tenant}:{key}")
}

impl Bench {
    /// Stores one value per (tenant, key), in quotad's cache and as a plain
    /// string for the baseline, so every read hits.
    async fn fill_caches(&self, value_bytes: usize) {
        let value = Bytes::from(vec![b'x'; value_bytes]);
        let client = Client::connect(&self.socket).await.unwrap();
        let mut cm = self.connect().await;
        for t in 0..TENANTS {
            let tenant = format!("tenant-{t}");
            let sets = (0..KEYS_PER_TENANT).map(|k| {
                client.cache_set(CacheSetArgs {
                    tenant: tenant.clone(),
                    key: cache_key(&format!("key-{k}")),
                    value: value.clone(),
                    ttl_ms: 3_600_000,
                    stale_ms: 0,
                    tags: vec![],
                })
            });
            for degraded in futures::future::join_all(sets).await {
                assert!(!degraded.unwrap());
            }
            let mut pipe = redis::pipe();
            for k in 0..KEYS_PER_TENANT {
                pipe.set(baseline_cache_key(&tenant, &format!("key-{k}")), &value[..])
                    .ignore();
            }
            let () = pipe.query_async(&mut cm).await.unwrap();
        }
    }

    /// Puts the `tenants` workload's tenants on plans, through quotad, and
    /// has quotad look each of them up once.
    async fn add_tenants(&self) {
        let client = Client::connect(&self.socket).await.unwrap();
        for chunk in (0..MANY_TENANTS).collect::<Vec<_>>().chunks(500) {
            let client = &client;
            let sets = chunk.iter().map(|t| async move {
                let plan = if t % 2 == 0 { "pro" } else { "free" };
                let record = TenantRecord {
                    plan: plan.into(),
                    limits: Default::default(),
                };
                client.tenant_set(&format!("tenant-{t}"), record).await
            });
            for r in futures::future::join_all(sets).await {
                r.unwrap();
            }
            let warm = chunk.iter().map(|t| async move {
                client.check(&format!("tenant-{t}"), "warm", None, 0).await
            });
            for d in futures::future::join_all(warm).await {
                assert!(!d.unwrap().degraded);
            }
        }
    }

    async fn connect(&self) -> ConnectionManager {
        ConnectionManager::new(redis::Client::open(self.url.as_str()).unwrap())
            .await
            .unwrap()
    }

    async fn run_quotad(
        &self,
        w: Workload,
        inflight: usize,
        conns: usize,
        spread: (usize, usize),
    ) -> Phase {
        let mut clients = Vec::new();
        for _ in 0..conns {
            clients.push(Arc::new(Client::connect(&self.socket).await.unwrap()));
        }
        measure(self, inflight, spread, Some(self.quotad_pid), move |task| {
            let client = clients[task % conns].clone();
            move |tenant: String, key: String| {
                let client = client.clone();
                async move {
                    match w {
                        Workload::Check
                        | Workload::HotKey
                        | Workload::ColdKey
                        | Workload::Tenants => {
                            let d = client.check(&tenant, &key, None, 1).await.unwrap();
                            assert!(d.allowed && !d.degraded);
                        }
                        Workload::CheckGet => {
                            let check = CheckArgs {
                                tenant,
                                key: key.clone(),
                                policy: None,
                                cost: 1,
                            };
                            let (d, l) =
                                client.check_get(check, &cache_key(&key), 0).await.unwrap();
                            assert!(d.allowed && !d.degraded && l.unwrap().value.is_some());
                        }
                        Workload::CacheGet => {
                            let l = client
                                .cache_get(&tenant, &cache_key(&key), 0)
                                .await
                                .unwrap();
                            assert!(l.value.is_some());
                        }
                    }
                }
            }
        })
        .await
    }

    async fn run_baseline(&self, w: Workload, inflight: usize, conns: usize) -> Phase {
        if w == Workload::Tenants {
            // As many distinct keys, all of one tenant.
            return self.run_quotad(w, inflight, conns, (1, MANY_TENANTS)).await;
        }
        let mut cms = Vec::new();
        for _ in 0..conns {
            cms.push(self.connect().await);
        }
        // The same batch code quotad runs, one check per call.
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&script::lua().library)
            .query_async(&mut cms[0].clone())
            .await
            .unwrap();
        let policy = self.policy.clone();
        let keys = Arc::new(Keys::new("bench"));
        measure(self, inflight, w.spread(), None, move |task| {
            let (cm, policy, keys) = (cms[task % conns].clone(), policy.clone(), keys.clone());
            move |tenant: String, key: String| {
                let mut cm = cm.clone();
                let cache = baseline_cache_key(&tenant, &key);
                let job = Job::Check(Check::new(policy.clone(), tenant, key, 1));
                let cmd = (w != Workload::CacheGet).then(|| {
                    script::command(std::iter::once(&job), &keys, None, script::Via::Function)
                });
                async move {
                    if let Some(cmd) = cmd {
                        let reply: redis::Value = cmd.query_async(&mut cm).await.unwrap();
                        let outcome = script::outcomes(reply, std::iter::once(&job)).unwrap();
                        assert!(matches!(outcome[0], Outcome::Decided(v) if v.allowed));
                    }
                    if matches!(w, Workload::CheckGet | Workload::CacheGet) {
                        let v: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(&cache)
                            .query_async(&mut cm)
                            .await
                            .unwrap();
                        assert!(v.is_some());
                    }
                }
            }
        })
        .await
    }

    /// quotad's (batches, operations in them, µs in them) counters.
    async fn batch_counters(&self) -> (u64, u64, u64) {
        let stats = Client::connect(&self.socket)
            .await
            .unwrap()
            .stats()
            .await
            .unwrap();
        let c = stats.counters.unwrap();
        (c["batches"], c["batched_checks"], c["round_trip_us"])
    }
}

/// Runs `inflight` closed-loop workers for a warm-up second, then the
/// phase's seconds, and measures.
async fn measure<F, W, Fut>(
    bench: &Bench,
    inflight: usize,
    (tenants, keys): (usize, usize),
    pid: Option<u32>,
    mut make: F,
) -> Phase
where
    F: FnMut(usize) -> W,
    W: Fn(String, String) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..inflight {
        let work = make(t);
        let (measuring, stop) = (measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut i = t * 7919;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_add(104_729);
                let tenant = format!("tenant-{}", i % tenants);
                let key = format!("key-{}", (i / tenants) % keys);
                let start = Instant::now();
                work(tenant, key).await;
                if measuring.load(Ordering::Relaxed) {
                    lat.push(start.elapsed().as_micros() as u32);
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = || {
        (
            redis_cpu(bench.port),
            pid.map(proc_cpu),
            proc_cpu(std::process::id()),
        )
    };
    let (redis0, quotad0, client0) = cpu();
    let start = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(bench.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let (redis1, quotad1, client1) = cpu();
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u32> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat.sort_unstable();
    let requests = lat.len() as u64;
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64;
    let per = |a: f64, b: f64| (b - a) * 1e6 / requests as f64;
    Phase {
        requests,
        secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        redis_cpu_us: per(redis0, redis1),
        quotad_cpu_us: quotad0.zip(quotad1).map(|(a, b)| per(a, b)),
        client_cpu_us: per(client0, client1),
    }
}

/// Redis's CPU seconds (user + system) so far.
fn redis_cpu(port: u16) -> f64 {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let info: String = redis::cmd("INFO").arg("cpu").query(&mut c).unwrap();
    info.lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_sys:")
                .or_else(|| l.strip_prefix("used_cpu_user:"))
        })
        .map(|v| v.trim().parse::<f64>().unwrap())
        .sum()
}

/// A process's CPU seconds (user + system) so far, from /proc.
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn redis_version(port: u16) -> String {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let info: String = redis::cmd("INFO").arg("server").query(&mut c).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned()
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn wait(mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out starting"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}
