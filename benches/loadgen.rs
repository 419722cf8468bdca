//! Load generator: quotad side by side with the baseline a user would
//! otherwise write, in one run, against one Redis on loopback.
//!
//!     cargo bench --bench loadgen -- [--seconds 5] [--concurrency 1,16,64,256]
//!         [--connections 4] [--shards 0] [--threads 1]
//!
//! For each concurrency (requests in flight), two closed-loop phases:
//!   quotad:   `check`s through the real daemon (release build) over its Unix
//!             socket, with the Rust client.
//!   baseline: every request runs its own EVALSHA of the same token-bucket
//!             Lua (`lua/check.lua`, one check per call) through redis-rs
//!             multiplexed ConnectionManagers (which pipeline).
//! Both spread their requests over the same number of connections.
//! Reported: checks/s, latency p50/p99, and Redis CPU per check (from
//! `INFO cpu`) plus quotad's own CPU per check (from /proc).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quotad::client::Client;
use quotad::config::Config;
use quotad::job::{Job, Outcome};
use quotad::keys::Keys;
use quotad::limiter::Check;
use quotad::redis::script;

const TENANTS: usize = 100;
const KEYS_PER_TENANT: usize = 100;
const POLICY: &str = r#"
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 1000000000, refill_per_sec = 1000000 }]
"#;

struct Phase {
    checks: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    redis_cpu_us: f64,
    quotad_cpu_us: Option<f64>,
    client_cpu_us: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.checks as f64 / self.secs
    }
}

fn main() {
    let mut seconds = 5.0;
    let mut levels = vec![1usize, 16, 64, 256];
    let mut shards = 0usize;
    let mut connections = 4usize;
    let mut threads = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().unwrap().parse().unwrap(),
            "--concurrency" => {
                levels = args
                    .next()
                    .unwrap()
                    .split(',')
                    .map(|s| s.parse().unwrap())
                    .collect()
            }
            "--shards" => shards = args.next().unwrap().parse().unwrap(),
            "--connections" => connections = args.next().unwrap().parse().unwrap(),
            "--threads" => threads = args.next().unwrap().parse().unwrap(),
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
        "[server]\nsocket = {:?}\nshards = {shards}\nthreads = {threads}\n[redis]\nurl = {url:?}\ntimeout_ms = 1000\n{POLICY}",
        socket.display().to_string()
    );
    std::fs::write(dir.path().join("quotad.toml"), &config).unwrap();
    wait(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let mut quotad = Command::new(env!("CARGO_BIN_EXE_quotad"))
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("quotad.toml"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    wait(|| std::os::unix::net::UnixStream::connect(&socket).is_ok());

    // One event loop, like one asyncio or Node worker process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = Config::from_toml(&config).unwrap();
    println!(
        "Redis {} on loopback, {} CPUs, {seconds} s per phase, {TENANTS} tenants x {KEYS_PER_TENANT} keys",
        redis_version(port),
        num_cpus()
    );
    println!();
    println!(
        "| in flight | quotad checks/s | baseline checks/s | ratio | quotad p50 / p99 (µs) | baseline p50 / p99 (µs) | Redis CPU/check quotad / baseline (µs) | quotad CPU/check (µs) | client CPU/check quotad / baseline (µs) | checks per batch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &c in &levels {
        let before = rt.block_on(batch_counters(&socket));
        let conns = connections.min(c);
        let q = rt.block_on(run_quotad(&socket, c, conns, seconds, port, quotad.id()));
        let after = rt.block_on(batch_counters(&socket));
        let per_batch = (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64;
        let b = rt.block_on(run_baseline(&url, &config, c, conns, seconds, port));
        println!(
            "| {c} | {:.0} | {:.0} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} / {:.1} ({:.2}x) | {:.1} | {:.1} / {:.1} | {per_batch:.1} |",
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
    kill(&mut quotad);
    kill(&mut redis);
}

async fn run_quotad(
    socket: &std::path::Path,
    inflight: usize,
    conns: usize,
    seconds: f64,
    port: u16,
    pid: u32,
) -> Phase {
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(Arc::new(Client::connect(socket).await.unwrap()));
    }
    measure(inflight, seconds, port, Some(pid), move |task| {
        let client = clients[task % conns].clone();
        move |tenant: String, key: String| {
            let client = client.clone();
            async move {
                let d = client.check(&tenant, &key, None, 1).await.unwrap();
                assert!(d.allowed && !d.degraded);
            }
        }
    })
    .await
}

async fn run_baseline(
    url: &str,
    config: &Config,
    inflight: usize,
    conns: usize,
    seconds: f64,
    port: u16,
) -> Phase {
    let mut cms = Vec::new();
    for _ in 0..conns {
        cms.push(
            redis::aio::ConnectionManager::new(redis::Client::open(url).unwrap())
                .await
                .unwrap(),
        );
    }
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(script::SOURCE)
        .query_async(&mut cms[0].clone())
        .await
        .unwrap();
    let policy = config.policies.get(None).unwrap().clone();
    let keys = Arc::new(Keys::new("bench"));
    measure(inflight, seconds, port, None, move |task| {
        let (cm, policy, keys) = (cms[task % conns].clone(), policy.clone(), keys.clone());
        move |tenant: String, key: String| {
            let mut cm = cm.clone();
            let job = Job::Check(Check {
                policy: policy.clone(),
                tenant,
                key,
                cost: 1,
            });
            let cmd = script::command(std::iter::once(&job), &keys, None, false);
            async move {
                let reply: redis::Value = cmd.query_async(&mut cm).await.unwrap();
                let outcome = script::outcomes(reply, std::iter::once(&job)).unwrap();
                assert!(matches!(outcome[0], Outcome::Decided(v) if v.allowed));
            }
        }
    })
    .await
}

/// Runs `inflight` closed-loop workers for a warm-up second, then
/// `seconds`, and measures.
async fn measure<F, W, Fut>(
    inflight: usize,
    seconds: f64,
    port: u16,
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
                let tenant = format!("tenant-{}", i % TENANTS);
                let key = format!("key-{}", (i / TENANTS) % KEYS_PER_TENANT);
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
    let (redis0, quotad0, client0) = (
        redis_cpu(port),
        pid.map(proc_cpu),
        proc_cpu(std::process::id()),
    );
    let start = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let (redis1, quotad1, client1) = (
        redis_cpu(port),
        pid.map(proc_cpu),
        proc_cpu(std::process::id()),
    );
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u32> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat.sort_unstable();
    let checks = lat.len() as u64;
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64;
    Phase {
        checks,
        secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        redis_cpu_us: (redis1 - redis0) * 1e6 / checks as f64,
        quotad_cpu_us: quotad0
            .zip(quotad1)
            .map(|(a, b)| (b - a) * 1e6 / checks as f64),
        client_cpu_us: (client1 - client0) * 1e6 / checks as f64,
    }
}

/// quotad's (batches, batched checks) counters.
async fn batch_counters(socket: &std::path::Path) -> (u64, u64) {
    let stats = Client::connect(socket)
        .await
        .unwrap()
        .stats()
        .await
        .unwrap();
    let c = stats.counters.unwrap();
    (c["batches"], c["batched_checks"])
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
