//! The shard actor: one per tenant shard, owning its tenants' local state.
//!
//! A shard answers from local state when it can (a key Redis denied until
//! T; Redis known to be down; the memory backend), and otherwise queues the
//! job for its next Redis round trip (see [`crate::batch`]). Replies are
//! deferred: each job carries a reply sender that the handler stores, and
//! the handler returns at once, so a slow Redis never blocks the mailbox.
//! The round trip runs in its own task and comes back as a [`BatchDone`]
//! message; a failed one is answered by failure mode and never stops the
//! actor. Cache reads that must wait for another caller's fill wait here
//! too ([`fills`]).

mod fills;
mod overlimit;
mod quota;
mod set;
mod tenants;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use kameo::actor::{Actor, ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};
use tokio::time::Instant;

use crate::batch::{Batcher, Weighted};
use crate::cache::memory::MemoryCache;
use crate::clock::Clock;
use crate::config::Plans;
use crate::error::Error;
use crate::job::{Job, Outcome};
use crate::keys::Keys;
use crate::limiter::memory::MemoryLimiter;
use crate::limiter::{Check, Decision, FailureMode};
use crate::protocol::{Body, Lookup, ShardOp};
use crate::quota::Directory;
use crate::redis::RedisBackend;
use crate::reply::ReplyTo;
use crate::stats::Stats;
use fills::Fills;
pub use fills::ReleaseWaiters;
use overlimit::OverLimit;
pub use quota::Forget;
use quota::PendingCheck;
pub use set::Shards;
use tenants::Tenants;

/// Largest over-limit memory per shard.
const OVERLIMIT_ENTRIES: usize = 65_536;

/// Run one request's op (already validated by the connection) and answer it.
#[derive(Debug)]
pub struct JobMsg(pub ShardOp, pub ReplyTo);

/// A Redis round trip came back: one outcome (or `None`) per job sent.
/// The reply senders travel with the batch: if the shard is gone when it
/// returns, dropping them tells each caller so.
pub struct BatchDone {
    jobs: Vec<Job>,
    replies: Vec<Option<ReplyTo>>,
    outcomes: Vec<Option<Outcome>>,
}

/// Policies were reloaded: forget cached denials, they may no longer hold.
pub struct Reload;

/// A job waiting for Redis. `reply` is `None` for the shard's own polls.
struct Waiter {
    job: Job,
    reply: Option<ReplyTo>,
    /// No answer may come later than this.
    deadline: Instant,
}

impl Weighted for Waiter {
    fn weight(&self) -> usize {
        self.job.weight()
    }
}

pub struct Shard {
    redis: Option<RedisBackend>,
    /// The memory backend's limiter, or the `local` failure mode.
    limiter: MemoryLimiter,
    /// The memory backend's cache (unused beside Redis).
    cache: MemoryCache,
    keys: Keys,
    clock: Clock,
    batcher: Batcher<Waiter>,
    /// Every plan's policies (swapped on reload).
    plans: Arc<ArcSwap<Plans>>,
    /// Where tenants' plans come from; `None`: all on the `default` plan.
    directory: Option<Arc<Directory>>,
    /// The local level of the quota cache.
    tenants: Tenants,
    overlimit: OverLimit,
    fills: Fills,
    fill_poll: Duration,
    /// A [`PollFills`] is scheduled.
    polling: bool,
    /// Polls sent and not back yet: the next round waits for them.
    polls_out: usize,
    stats: Arc<Stats>,
}

/// What a shard is built from.
pub struct ShardArgs {
    pub redis: Option<RedisBackend>,
    pub keys: Keys,
    pub clock: Clock,
    pub batch_max: usize,
    pub batch_max_bytes: usize,
    pub max_in_flight: usize,
    pub max_queued: usize,
    pub local_max_entries: usize,
    pub cache_max_bytes: usize,
    pub fill_poll: Duration,
    pub plans: Arc<ArcSwap<Plans>>,
    pub directory: Option<Arc<Directory>>,
    pub max_tenants: usize,
    pub stats: Arc<Stats>,
}

impl Actor for Shard {
    type Args = ShardArgs;
    type Error = Infallible;

    async fn on_start(a: ShardArgs, _: ActorRef<Self>) -> Result<Self, Infallible> {
        let overlimit = OverLimit::new(if a.redis.is_some() {
            OVERLIMIT_ENTRIES
        } else {
            0
        });
        Ok(Shard {
            redis: a.redis,
            limiter: MemoryLimiter::new(a.local_max_entries),
            cache: MemoryCache::new(a.cache_max_bytes),
            keys: a.keys,
            clock: a.clock,
            batcher: Batcher::new(
                a.batch_max,
                a.batch_max_bytes,
                a.max_in_flight,
                a.max_queued,
            ),
            plans: a.plans,
            directory: a.directory,
            tenants: Tenants::new(a.max_tenants),
            overlimit,
            fills: Fills::default(),
            fill_poll: a.fill_poll,
            polling: false,
            polls_out: 0,
            stats: a.stats,
        })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), Infallible> {
        // Dropped replies answer `shutting_down` by themselves.
        self.batcher.drain().for_each(drop);
        self.fills.drain().for_each(drop);
        self.tenants.drain_waiting().for_each(drop);
        Ok(())
    }
}

impl Message<JobMsg> for Shard {
    type Reply = ();

    async fn handle(&mut self, JobMsg(op, reply): JobMsg, ctx: &mut Context<Self, ()>) {
        match op {
            ShardOp::Check(args) => self.resolve(PendingCheck { args, get: None }, reply, ctx),
            ShardOp::CheckGet(args, get) => self.resolve(
                PendingCheck {
                    args,
                    get: Some(get),
                },
                reply,
                ctx,
            ),
            ShardOp::CacheGet(args) => self.start(Job::Get { args, poll: false }, reply, ctx),
            ShardOp::CacheSet(args) => self.start(Job::Set(args), reply, ctx),
            ShardOp::CacheDel(args) => self.start(Job::Del(args), reply, ctx),
        }
    }
}

impl Shard {
    /// Runs a job: from local state when possible, else through Redis.
    fn start(&mut self, job: Job, reply: ReplyTo, ctx: &Context<Self, ()>) {
        let Some(redis) = &self.redis else {
            let outcome = self.run_locally(&job);
            self.finish(job, Some(outcome), Some(reply), ctx);
            return;
        };
        let now = Instant::now();
        if let Job::Check(c) | Job::CheckGet(c, _) = &job
            && let Some(d) = self.overlimit.get(c, now)
        {
            Stats::add(&self.stats.counters.denied_locally, 1);
            let body = match job {
                Job::CheckGet(..) => Body::CheckLookup(d, None),
                _ => Body::Decision(d),
            };
            self.reply(reply, body);
        } else if redis.is_down() {
            self.finish(job, None, Some(reply), ctx);
        } else {
            let deadline = now + redis.timeout();
            self.enqueue(
                Waiter {
                    job,
                    reply: Some(reply),
                    deadline,
                },
                ctx,
            );
        }
    }
}

impl Message<BatchDone> for Shard {
    type Reply = ();

    async fn handle(&mut self, done: BatchDone, ctx: &mut Context<Self, ()>) {
        for ((job, reply), outcome) in done.jobs.into_iter().zip(done.replies).zip(done.outcomes) {
            self.finish(job, outcome, reply, ctx);
        }
        if let Some(batch) = self.batcher.complete() {
            self.send(batch, ctx);
        }
    }
}

impl Message<Reload> for Shard {
    type Reply = ();

    async fn handle(&mut self, _: Reload, _: &mut Context<Self, ()>) {
        self.overlimit.clear();
        if self
            .directory
            .as_ref()
            .is_some_and(|d| d.reloads_with_config())
        {
            self.tenants.clear(); // their records may have changed: look them up again
        } else {
            self.recompile_tenants();
        }
    }
}

impl Shard {
    fn enqueue(&mut self, w: Waiter, ctx: &Context<Self, ()>) {
        match self.batcher.push(w) {
            Ok(Some(batch)) => self.send(batch, ctx),
            Ok(None) => {}
            Err(w) => match w.reply {
                Some(reply) => reply.send(Err(Error::Overloaded("shard queue full"))),
                None => self.finish(w.job, None, None, ctx), // a poll: counted back
            },
        }
    }

    /// Sends a batch to Redis in its own task. Jobs already past their
    /// deadline are answered by failure mode instead of being sent.
    fn send(&mut self, batch: Vec<Waiter>, ctx: &Context<Self, ()>) {
        let now = Instant::now();
        let mut deadline = None;
        let mut jobs = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for w in batch {
            if w.deadline <= now {
                self.finish(w.job, None, w.reply, ctx);
            } else {
                // The oldest job's deadline bounds the whole round trip.
                deadline.get_or_insert(w.deadline);
                jobs.push(w.job);
                replies.push(w.reply);
            }
        }
        let Some(deadline) = deadline else {
            if let Some(next) = self.batcher.complete() {
                self.send(next, ctx);
            }
            return;
        };
        let redis = self.redis.clone().expect("only the Redis backend batches");
        ctx.pipe(async move {
            let outcomes = redis.run(&jobs, deadline).await;
            BatchDone {
                jobs,
                replies,
                outcomes,
            }
        });
    }

    /// Runs a job on the memory backend.
    fn run_locally(&mut self, job: &Job) -> Outcome {
        let now_ms = self.clock.now_us() / 1000;
        match job {
            Job::Check(c) => Outcome::Decided(self.limit_locally(c)),
            Job::Get { args, poll } => Outcome::Looked(self.cache.get(args, *poll, now_ms)),
            Job::Set(s) => {
                self.cache.set(s, now_ms);
                Outcome::Stored
            }
            Job::Del(d) => Outcome::Deleted(self.cache.del(d, now_ms)),
            Job::CheckGet(c, g) => {
                let v = self.limit_locally(c);
                let l = v.allowed.then(|| self.cache.get(g, false, now_ms));
                Outcome::CheckLooked(v, l)
            }
        }
    }

    fn limit_locally(&mut self, c: &Check) -> crate::limiter::Verdict {
        let keys = c.state_keys(&self.keys);
        self.limiter
            .check(&c.policy, &keys, self.clock.now_us(), c.cost)
    }

    /// Answers a job from its outcome, or by failure mode when it has none.
    fn finish(
        &mut self,
        job: Job,
        outcome: Option<Outcome>,
        reply: Option<ReplyTo>,
        ctx: &Context<Self, ()>,
    ) {
        let degraded = outcome.is_none();
        if degraded && !matches!(job, Job::Get { poll: true, .. }) {
            Stats::add(&self.stats.counters.degraded, 1);
        }
        let now = Instant::now();
        let body = match (job, outcome) {
            (Job::Check(c), Some(Outcome::Decided(v))) => {
                let d = Decision::from_verdict(&c.policy, v, false);
                self.overlimit.insert(&c, &d, now);
                Body::Decision(d)
            }
            (Job::Check(c), _) => Body::Decision(self.failure_decision(&c)),
            (Job::Get { args, poll: true }, outcome) => {
                self.polls_out = self.polls_out.saturating_sub(1);
                match outcome {
                    Some(Outcome::Looked(l)) if l.value.is_some() => {
                        self.deliver(&args.tenant, &args.key, &l)
                    }
                    Some(Outcome::Looked(l)) if l.fill => self.abandon(&args.tenant, &args.key),
                    _ => {}
                }
                return;
            }
            (Job::Get { args, .. }, Some(Outcome::Looked(l))) => {
                match self.looked(&args, l, None, reply, ctx) {
                    Some((reply, body)) => return self.reply(reply, body),
                    None => return,
                }
            }
            (Job::Get { .. }, _) => Body::Lookup(self.count_lookup(Lookup::degraded_miss())),
            (Job::Set(s), Some(Outcome::Stored)) => {
                Stats::add(&self.stats.counters.cache_sets, 1);
                let fresh = Lookup {
                    value: Some(s.value.clone()),
                    ttl_ms: s.ttl_ms,
                    ..Lookup::default()
                };
                self.deliver(&s.tenant, &s.key, &fresh);
                Body::Stored { degraded: false }
            }
            (Job::Set(_), _) => Body::Stored { degraded: true },
            (Job::Del(_), Some(Outcome::Deleted(n))) => {
                Stats::add(&self.stats.counters.cache_deleted, n);
                Body::Deleted {
                    deleted: n,
                    degraded: false,
                }
            }
            (Job::Del(_), _) => Body::Deleted {
                deleted: 0,
                degraded: true,
            },
            (Job::CheckGet(c, g), Some(Outcome::CheckLooked(v, l))) => {
                let d = Decision::from_verdict(&c.policy, v, false);
                self.overlimit.insert(&c, &d, now);
                match l {
                    Some(l) => match self.looked(&g, l, Some(d), reply, ctx) {
                        Some((reply, body)) => return self.reply(reply, body),
                        None => return,
                    },
                    None => Body::CheckLookup(d, None),
                }
            }
            (Job::CheckGet(c, _), _) => {
                let d = self.failure_decision(&c);
                let l = d
                    .allowed
                    .then(|| self.count_lookup(Lookup::degraded_miss()));
                Body::CheckLookup(d, l)
            }
        };
        if let Some(reply) = reply {
            self.reply(reply, body);
        }
    }

    /// The decision when Redis cannot decide: the policy's failure mode.
    fn failure_decision(&mut self, check: &Check) -> Decision {
        match check.policy.failure_mode {
            FailureMode::Open | FailureMode::Closed => Decision::failed(&check.policy),
            FailureMode::Local => {
                Decision::from_verdict(&check.policy, self.limit_locally(check), true)
            }
        }
    }

    fn count_lookup(&self, l: Lookup) -> Lookup {
        let c = &self.stats.counters;
        let counter = match (&l.value, l.stale) {
            (Some(_), false) => &c.cache_hits,
            (Some(_), true) => &c.cache_stale_hits,
            (None, _) => &c.cache_misses,
        };
        Stats::add(counter, 1);
        if l.fill {
            Stats::add(&c.cache_fills, 1);
        }
        l
    }

    fn reply(&self, reply: ReplyTo, body: Body) {
        let d = match &body {
            Body::Decision(d) | Body::CheckLookup(d, _) => Some(d),
            _ => None,
        };
        if let Some(d) = d {
            let c = &self.stats.counters;
            Stats::add(if d.allowed { &c.allowed } else { &c.denied }, 1);
        }
        reply.send(Ok(body));
    }
}
