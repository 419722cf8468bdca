//! The Redis backend: one pipelined round trip decides a whole batch.
//!
//! A batch becomes one call of the batch code (`lua/`, see [`script`]) per
//! Redis Cluster slot group (on a single Redis, where slots do not matter,
//! the whole batch is one call), all sent together. Every round trip has a
//! deadline. A call that Redis refused because it lacks the code (it
//! restarted, failed over, or was flushed) did not run, so the code is
//! loaded and the call sent once more; any other failure leaves the
//! outcome unknown and is never retried: those checks are answered by
//! their policy's failure mode.

mod breaker;
mod conn;
mod heard;
mod named;
mod read;
pub mod script;
pub mod tracking;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use breaker::Breaker;
use conn::Conn;
pub use conn::{SetupError, pubsub, trust_anchors};
use read::Read;
use script::Via;
use tracking::Tracker;

use crate::backend::job::{Job, Outcome};
use crate::clock::Clock;
use crate::config::RedisConfig;
use crate::keys::{self, Keys};
use crate::metrics::metrics;
use crate::near::NearCache;
use crate::protocol::{CacheGetArgs, Lookup};
use crate::stats::Stats;

/// The jobs of one round trip, by their index in the batch.
#[derive(Default)]
struct Round<'a> {
    scripts: Vec<(usize, &'a Job)>,
    /// Plain cache reads: job index, args, poll.
    reads: Vec<(usize, &'a CacheGetArgs, bool)>,
}

impl Round<'_> {
    fn is_empty(&self) -> bool {
        self.scripts.is_empty() && self.reads.is_empty()
    }
}

/// What one entry of a round came back with.
enum Done {
    Script(Outcome),
    Read(Read),
}

/// A handle on the Redis backend; clones share one connection and breaker.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Arc<Conn>,
    /// Where Redis is, for log lines.
    target: String,
    keys: Keys,
    breaker: Arc<Breaker>,
    timeout: Duration,
    probe_interval: Duration,
    clock: Clock,
    stats: Arc<Stats>,
    /// Stops the breaker's prober at shutdown.
    stop: CancellationToken,
    /// Redis keeps function libraries (7.0+); false once it said it does not.
    functions: AtomicBool,
    /// The near cache and its tracking connection, if on.
    near: Option<(Arc<NearCache>, Tracker)>,
}

impl RedisBackend {
    /// Prepares the connection without waiting for Redis to be up.
    pub fn new(
        cfg: &RedisConfig,
        clock: Clock,
        stats: Arc<Stats>,
        stop: CancellationToken,
    ) -> Result<Self, SetupError> {
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn: Arc::new(Conn::new(cfg)?),
                target: cfg.addresses(),
                keys: Keys::new(&cfg.prefix),
                breaker: Arc::new(Breaker::new(cfg.breaker_failures, stats.clone())),
                timeout: Duration::from_millis(cfg.timeout_ms),
                probe_interval: Duration::from_millis(cfg.probe_interval_ms),
                clock,
                stats,
                stop,
                functions: AtomicBool::new(true),
                near: None,
            }),
        })
    }

    /// Turns the near cache on, at most `max_bytes` (0: off), and starts
    /// its tracking connection. Before the backend is cloned.
    pub fn with_near_cache(mut self, cfg: &RedisConfig, max_bytes: usize) -> Self {
        let Some(inner) = Arc::get_mut(&mut self.inner) else {
            return self;
        };
        if max_bytes == 0 {
            return self;
        }
        if inner.conn.is_cluster() || (cfg.url.is_some() && cfg.tls_server_name.is_some()) {
            tracing::info!(
                "near cache off: a Redis Cluster, or a Redis reached with tls_server_name, is not tracked (see docs/config.md, near_max_bytes)"
            );
            return self;
        }
        let near = Arc::new(NearCache::new(max_bytes, inner.stats.clone()));
        let tracker = Tracker::spawn(cfg, near.clone(), inner.conn.clone(), inner.stop.clone());
        inner.near = Some((near, tracker));
        self
    }

    /// The near cache, if on.
    pub fn near(&self) -> Option<&Arc<NearCache>> {
        self.inner.near.as_ref().map(|(n, _)| n)
    }

    /// The key names, as the backend builds them.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Reads the password files again (SIGHUP); true if one changed, and
    /// later round trips then connect with it.
    pub fn reload_secrets(&self) -> Result<bool, SetupError> {
        self.inner.conn.reload_secrets()
    }

    /// The deadline of a round trip that starts now.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// True while the breaker is open: answer by failure mode, do not call.
    pub fn is_down(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Runs `jobs`, ending by `deadline`. `None` for a job Redis could not
    /// run (answer it by failure mode).
    ///
    /// One round trip: the script for checks, `check_get`s and writes,
    /// plain reads beside it for cache reads; then, only if some read must
    /// take a lock (see [`read`]), a second one to the script for those.
    pub async fn run(&self, jobs: &[Job], deadline: Instant) -> Vec<Option<Outcome>> {
        let inner = &*self.inner;
        let mut out = vec![None; jobs.len()];
        if inner.breaker.is_open() {
            return out;
        }
        Stats::add(&inner.stats.counters.batches, 1);
        Stats::add(&inner.stats.counters.batched_checks, jobs.len() as u64);
        let started = std::time::Instant::now();
        match tokio::time::timeout_at(deadline, self.rounds(jobs, &mut out)).await {
            Ok(true) => inner.breaker.record_success(),
            Ok(false) => self.failed(),
            Err(_) => {
                // Outcomes of a finished first round stand; the rest is unknown.
                Stats::add(&inner.stats.counters.redis_timeouts, 1);
                self.failed();
            }
        }
        // This quotad's own writes are not followed by its near hits of the
        // old values: their invalidations are applied before the answers.
        // Within the same deadline, but apart: the writes are done, and a
        // sync that does not finish in time flushes the near cache instead.
        if let Some((_, tracker)) = &inner.near
            && jobs.iter().any(|j| matches!(j, Job::Set(_) | Job::Del(_)))
        {
            tracker.sync(deadline).await;
        }
        let took = started.elapsed();
        Stats::add(&inner.stats.counters.round_trip_us, took.as_micros() as u64);
        let m = metrics();
        m.round_trip.observe(took.as_secs_f64());
        m.batch_ops.observe(jobs.len() as f64);
        out
    }

    /// Fills `out` round by round; false if any part failed.
    async fn rounds(&self, jobs: &[Job], out: &mut [Option<Outcome>]) -> bool {
        let now = self.inner.clock.fixed_us();
        let mut ok = true;
        let near = self.near_gets(jobs);
        let mut first = Round::default();
        let mut near_at = near.iter().peekable();
        for (i, job) in jobs.iter().enumerate() {
            match job {
                Job::Get { args, poll } => first.reads.push((i, args, *poll)),
                _ => match near_at.next_if(|(at, ..)| *at == i) {
                    Some((_, check, _)) => first.scripts.push((i, check)),
                    None => first.scripts.push((i, job)),
                },
            }
        }
        let mut locking = Round::default();
        for (i, done) in self.round(first, now).await {
            match (&jobs[i], done) {
                // A check_get that ran as its check alone: its value is near.
                (Job::CheckGet(..), Some(Done::Script(Outcome::Decided(v)))) => {
                    let Ok(at) = near.binary_search_by_key(&i, |(at, ..)| *at) else {
                        ok = false;
                        continue;
                    };
                    let hit = v.allowed.then(|| near[at].2.clone());
                    out[i] = Some(Outcome::CheckLooked(v, hit));
                }
                (Job::Get { args, .. }, Some(Done::Read(r))) if r.needs_lock(args) => {
                    locking.scripts.push((i, &jobs[i]));
                }
                (Job::Get { .. }, Some(Done::Read(r))) => {
                    out[i] = Some(Outcome::Looked(r.lookup()))
                }
                (_, Some(Done::Script(o))) => out[i] = Some(o),
                _ => ok = false,
            }
        }
        if locking.is_empty() {
            return ok;
        }
        for (i, done) in self.round(locking, now).await {
            match done {
                Some(Done::Script(o)) => out[i] = Some(o),
                _ => ok = false,
            }
        }
        ok
    }

    /// The `check_get`s whose entries the near cache holds fresh, by job
    /// index: each runs as its check alone (with the same lease), and an
    /// allowed one is answered with the near value, which never goes
    /// through Lua (that costs Redis ~5 µs per KiB). The hit stands for the
    /// moment the batch was built, as a `cache_get` near hit would.
    fn near_gets(&self, jobs: &[Job]) -> Vec<(usize, Job, Lookup)> {
        let Some((near, _)) = &self.inner.near else {
            return Vec::new();
        };
        let keys = &self.inner.keys;
        (jobs.iter().enumerate())
            .filter_map(|(i, job)| {
                let Job::CheckGet(c, g) = job else {
                    return None;
                };
                let (value, ttl_ms) = near.get(&keys.entry(&g.tenant, &g.key))?;
                let hit = Lookup {
                    value: Some(value),
                    ttl_ms,
                    ..Lookup::default()
                };
                Some((i, Job::Check(c.clone()), hit))
            })
            .collect()
    }

    /// One pipelined round trip: one call of the batch code per slot group
    /// (one in all on a single Redis) and two commands per plain read.
    /// Calls refused for want of the code go once more, after loading it.
    /// Returns each entry's result by job index (`None`: it failed).
    async fn round(&self, round: Round<'_>, now: Option<u64>) -> Vec<(usize, Option<Done>)> {
        let inner = &*self.inner;
        let groups = self.groups(&round.scripts);
        let call = |group: &Vec<usize>, via| {
            script::command(
                group.iter().map(|&g| round.scripts[g].1),
                &inner.keys,
                now,
                via,
            )
        };
        let via = if inner.functions.load(Ordering::Relaxed) {
            Via::Function
        } else {
            Via::Sha
        };
        let mut cmds: Vec<redis::Cmd> = groups.iter().map(|g| call(g, via)).collect();
        // Taken before the reads are sent: see `near`'s race rule.
        let mut tickets = Vec::with_capacity(round.reads.len());
        for (_, args, poll) in &round.reads {
            let (name, read) = read::commands(&inner.keys, args, *poll);
            cmds.extend(read);
            let near = inner.near.as_ref().map(|(n, _)| n);
            tickets.push(near.and_then(|n| Some((n.ticket(&name)?, name))));
        }
        // A check_get's fresh hit is kept near too, on the same rule.
        let near = inner.near.as_ref().map(|(n, _)| n);
        let script_tickets: Vec<_> = (round.scripts.iter())
            .map(|(_, job)| match (near, job) {
                (Some(n), Job::CheckGet(_, g)) => {
                    let name = inner.keys.entry(&g.tenant, &g.key);
                    Some((n.ticket(&name)?, name))
                }
                _ => None,
            })
            .collect();
        Stats::add(&inner.stats.counters.script_calls, groups.len() as u64);
        let mut results = inner.conn.run(cmds).await;
        let mut missing: Vec<usize> = (0..groups.len())
            .filter(|&i| matches!(&results[i], Err(e) if not_loaded(e, via)))
            .collect();
        // Load and resend, again if the code vanished once more in between
        // (another flush or failover): Redis is answering, so these calls
        // must not fail for it (nor count towards the breaker).
        let mut via = via;
        for _ in 0..RELOAD_ATTEMPTS {
            if missing.is_empty() {
                break;
            }
            Stats::add(&inner.stats.counters.script_reloads, 1);
            tracing::info!(
                calls = missing.len(),
                "batch code not in Redis yet (first use, restart, failover or flush): loading"
            );
            let again = match via {
                Via::Function => self.load().await.ok(),
                _ => Some(Via::Source),
            };
            let Some(again) = again else { break };
            via = again;
            let cmds = missing.iter().map(|&i| call(&groups[i], again)).collect();
            for (&i, r) in missing.iter().zip(inner.conn.run(cmds).await) {
                results[i] = r;
            }
            missing.retain(|&i| matches!(&results[i], Err(e) if not_loaded(e, again)));
        }
        let mut results = results.into_iter();
        let mut done = Vec::with_capacity(round.scripts.len() + round.reads.len());
        for group in &groups {
            let parsed = match results.next() {
                Some(Ok(v)) => script::outcomes(v, group.iter().map(|&g| round.scripts[g].1)),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "Redis call failed");
                    None
                }
                None => None,
            };
            match parsed {
                Some(outcomes) => {
                    for (&g, o) in group.iter().zip(outcomes) {
                        if let (Some(near), Some((ticket, name))) = (near, &script_tickets[g])
                            && let Outcome::CheckLooked(_, Some(l)) = &o
                            && let (Some(v), false, false, false) =
                                (&l.value, l.stale, l.refresh, l.fill)
                        {
                            near.insert(*ticket, name, v.clone(), l.ttl_ms);
                        }
                        done.push((round.scripts[g].0, Some(Done::Script(o))));
                    }
                }
                None => done.extend(group.iter().map(|&g| (round.scripts[g].0, None))),
            }
        }
        for ((i, _, poll), ticket) in round.reads.iter().zip(tickets) {
            let exists = poll.then(|| results.next());
            let read = match (exists, results.next(), results.next()) {
                (None, Some(Ok(hmget)), Some(Ok(pttl))) => read::parse(None, hmget, pttl),
                (Some(Some(Ok(e))), Some(Ok(hmget)), Some(Ok(pttl))) => {
                    read::parse(Some(e), hmget, pttl)
                }
                _ => None,
            };
            if let (Some((near, _)), Some((ticket, name)), Some(r)) = (&inner.near, ticket, &read)
                && let Some((value, fresh_ms)) = r.fresh()
            {
                near.insert(ticket, &name, value, fresh_ms);
            }
            done.push((*i, read.map(Done::Read)));
        }
        done
    }

    /// Indices into `scripts` per script call: one per slot on a Cluster.
    fn groups(&self, scripts: &[(usize, &Job)]) -> Vec<Vec<usize>> {
        if scripts.is_empty() {
            return Vec::new();
        }
        if !self.inner.conn.is_cluster() {
            return vec![(0..scripts.len()).collect()];
        }
        // Sorted by (slot, index): grouped by slot, in arrival order within one.
        let mut order: Vec<(u16, usize)> = scripts
            .iter()
            .enumerate()
            .map(|(g, (_, job))| (keys::slot(job.tenant()), g))
            .collect();
        order.sort_unstable();
        order
            .chunk_by(|a, b| a.0 == b.0)
            .map(|g| g.iter().map(|&(_, i)| i).collect())
            .collect()
    }

    /// Runs plain commands in one round trip, within the Redis deadline:
    /// every reply, or the first error (also when the breaker is open).
    pub async fn query(&self, cmds: Vec<redis::Cmd>) -> RedisResult<Vec<Value>> {
        if self.is_down() {
            return Err(RedisError::from((
                ErrorKind::Io,
                "Redis unreachable (circuit breaker open)",
            )));
        }
        let run = self.inner.conn.run(cmds);
        match tokio::time::timeout(self.inner.timeout, run).await {
            Ok(results) => {
                let out: RedisResult<Vec<Value>> = results.into_iter().collect();
                match &out {
                    Ok(_) => self.inner.breaker.record_success(),
                    Err(e)
                        if e.kind() == ErrorKind::Io
                            || e.is_timeout()
                            || e.is_connection_dropped() =>
                    {
                        self.failed()
                    }
                    Err(_) => {}
                }
                out
            }
            Err(_) => {
                self.failed();
                Err(RedisError::from((ErrorKind::Io, "Redis timed out")))
            }
        }
    }

    /// Counts a failed round trip; the one that opens the breaker starts
    /// the prober that will close it.
    fn failed(&self) {
        let inner = &*self.inner;
        Stats::add(&inner.stats.counters.redis_errors, 1);
        if inner.breaker.record_failure() {
            tracing::warn!(
                "Redis at {} unreachable: circuit breaker open, deciding by each policy's failure mode and probing every {:?} until it answers",
                inner.target,
                inner.probe_interval
            );
            let this = self.clone();
            let breaker = inner.breaker.clone();
            let mut said = false;
            tokio::spawn(breaker.probe_until_closed(
                inner.probe_interval,
                inner.stop.clone(),
                move || {
                    let this = this.clone();
                    // The cause, once per outage (not once per probe).
                    let say = !std::mem::replace(&mut said, true);
                    async move {
                        let answer = this.ping().await;
                        if let (Err(e), true) = (&answer, say) {
                            tracing::warn!("Redis at {}: {e}", this.inner.target);
                        }
                        answer.is_ok()
                    }
                },
            ));
        }
    }

    /// Connects and loads the batch code, so that the first requests pay
    /// for neither. The error if Redis did not manage within `limit`
    /// (`None`: it did not answer in time).
    pub async fn warm_up(&self, limit: Duration) -> Result<(), Option<RedisError>> {
        let load = async {
            if self.load().await? == Via::Function {
                return Ok(());
            }
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(&script::lua().script);
            self.inner.conn.run(vec![load]).await.remove(0).map(drop)
        };
        match tokio::time::timeout(limit, load).await {
            Ok(r) => r.map_err(Some),
            Err(_) => Err(None),
        }
    }

    /// Loads the function library: `Via::Function` once loaded, or
    /// `Via::Source` when Redis keeps no functions (before 7.0, or not for
    /// this ACL user), and from then on the code runs as a script.
    async fn load(&self) -> RedisResult<Via> {
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg(&script::lua().library);
        match self.inner.conn.run(vec![load]).await.remove(0) {
            Ok(_) => Ok(Via::Function),
            Err(e) if no_functions(&e) => {
                if self.inner.functions.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        "Redis at {} keeps no functions ({e}): running the batch code as a script",
                        self.inner.target
                    );
                }
                Ok(Via::Source)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether Redis answers a PING within the deadline, and why not.
    pub async fn ping(&self) -> Result<(), String> {
        self.answer(redis::cmd("PING"), self.inner.timeout).await
    }

    async fn answer(&self, cmd: redis::Cmd, limit: Duration) -> Result<(), String> {
        match tokio::time::timeout(limit, self.inner.conn.run(vec![cmd])).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("no reply".into()),
            },
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    /// Where Redis is (addresses only), for log lines.
    pub fn target(&self) -> &str {
        &self.inner.target
    }
}

/// How many times one round loads the batch code and resends the calls
/// refused for want of it.
const RELOAD_ATTEMPTS: usize = 3;

/// Whether a call made `via` did not run for want of the batch code in
/// Redis (first use, a restart, failover or flush), so that it may be sent
/// again once the code is there.
fn not_loaded(e: &RedisError, via: Via) -> bool {
    match via {
        Via::Function => {
            e.detail()
                .is_some_and(|d| d.starts_with("Function not found"))
                || no_functions(e)
        }
        _ => e.kind() == ErrorKind::Server(ServerErrorKind::NoScript),
    }
}

/// Whether Redis refused a function command as such: one it does not
/// know, or one this ACL user may not run.
fn no_functions(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
        || e.detail().is_some_and(|d| d.starts_with("unknown command"))
}
