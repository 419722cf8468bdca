//! The shard actor: one per tenant shard, owning its tenants' local state.
//!
//! A shard answers from local state when it can (a key Redis denied until
//! T; Redis known to be down), and otherwise hands the job to its
//! [`Backend`]: the memory backend runs it at once; for Redis it queues in
//! the shard's [`batch::Batcher`] for the next round trip. Replies are
//! deferred: each job carries a reply sender that the handler stores, and
//! the handler returns at once, so a slow Redis never blocks the mailbox.
//! The round trip runs in its own task and comes back as a [`BatchDone`]
//! message; a failed one is answered by failure mode and never stops the
//! actor. What an outcome becomes, and what it teaches the shard, is in
//! [`answer`]; cache reads that must wait for another caller's fill wait
//! in [`fills`].

mod answer;
pub mod batch;
mod fills;
mod orphans;
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

use crate::backend::{Backend, Job, MemoryBackend, Outcome, RedisBackend};
use crate::config::Plans;
use crate::error::Error;
use crate::metrics::metrics;
use crate::protocol::{Body, CheckArgs, ShardOp};
use crate::quota::Directory;
use crate::reply::ReplyTo;
use crate::stats::Stats;
use batch::{Batcher, Weighted};
use fills::Fills;
pub use fills::ReleaseWaiters;
use orphans::Orphans;
use overlimit::OverLimit;
pub use quota::Forget;
use quota::{PendingCheck, Then};
pub use set::{Outbox, Shards};
use tenants::Tenants;

/// Run these requests' ops (already validated by the connection) and answer
/// them: what one connection read for this shard in one wake-up, so that
/// the mailbox, not each request, pays for a message.
#[derive(Debug)]
pub struct Jobs(pub Vec<(ShardOp, ReplyTo)>);

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

/// Sends what the batcher holds (see [`batch`]): a message the shard sends
/// itself, so that it runs after the requests already in its mailbox.
struct Flush;

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
    backend: Backend,
    /// The `local` failure mode's limiter (beside Redis).
    fallback: MemoryBackend,
    /// Jobs waiting for a Redis round trip.
    batcher: Batcher<Waiter>,
    /// Every plan's policies (swapped on reload).
    plans: Arc<ArcSwap<Plans>>,
    /// Where tenants' plans come from; `None`: all on the `default` plan.
    directory: Option<Arc<Directory>>,
    /// The local level of the quota cache.
    tenants: Tenants,
    overlimit: OverLimit,
    fills: Fills,
    /// Leases of checks whose outcome Redis never told: released here.
    orphans: Orphans,
    fill_poll: Duration,
    /// A [`fills::PollFills`] is scheduled.
    polling: bool,
    /// Polls sent and not back yet: the next round waits for them.
    polls_out: usize,
    stats: Arc<Stats>,
}

/// What a shard is built from: its parts, sized by [`Shards::spawn`].
pub struct ShardArgs {
    backend: Backend,
    fallback: MemoryBackend,
    batcher: Batcher<Waiter>,
    overlimit: OverLimit,
    tenants: Tenants,
    fill_poll: Duration,
    plans: Arc<ArcSwap<Plans>>,
    directory: Option<Arc<Directory>>,
    stats: Arc<Stats>,
}

impl Actor for Shard {
    type Args = ShardArgs;
    type Error = Infallible;

    async fn on_start(a: ShardArgs, _: ActorRef<Self>) -> Result<Self, Infallible> {
        Ok(Shard {
            backend: a.backend,
            fallback: a.fallback,
            batcher: a.batcher,
            plans: a.plans,
            directory: a.directory,
            tenants: a.tenants,
            overlimit: a.overlimit,
            fills: Fills::default(),
            orphans: Orphans::default(),
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

impl Message<Jobs> for Shard {
    type Reply = ();

    async fn handle(&mut self, Jobs(jobs): Jobs, ctx: &mut Context<Self, ()>) {
        for (op, reply) in jobs {
            self.run(op, reply, ctx);
        }
    }
}

impl Message<BatchDone> for Shard {
    type Reply = ();

    async fn handle(&mut self, done: BatchDone, ctx: &mut Context<Self, ()>) {
        for ((job, reply), outcome) in done.jobs.into_iter().zip(done.replies).zip(done.outcomes) {
            // Sent, and no outcome: the script may have taken the lease.
            if let (Job::Check(c) | Job::CheckGet(c, _), None) = (&job, &outcome) {
                self.orphan(c, ctx);
            }
            self.finish(job, outcome, reply, ctx);
        }
        if self.batcher.complete() {
            self.schedule_flush(ctx);
        }
    }
}

impl Message<Flush> for Shard {
    type Reply = ();

    async fn handle(&mut self, _: Flush, ctx: &mut Context<Self, ()>) {
        self.flush(ctx);
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
    /// Runs one request's op.
    fn run(&mut self, op: ShardOp, reply: ReplyTo, ctx: &Context<Self, ()>) {
        match op {
            ShardOp::Check(args) => self.resolve(
                PendingCheck {
                    args,
                    then: Then::Check,
                },
                reply,
                ctx,
            ),
            ShardOp::CheckGet(args, get) => self.resolve(
                PendingCheck {
                    args,
                    then: Then::Get(get),
                },
                reply,
                ctx,
            ),
            ShardOp::Usage(args) => self.resolve(
                PendingCheck {
                    args,
                    then: Then::Usage,
                },
                reply,
                ctx,
            ),
            ShardOp::Release(r) => {
                let args = CheckArgs {
                    tenant: r.tenant,
                    key: r.key,
                    policy: r.policy,
                    cost: 0,
                };
                let op = PendingCheck {
                    args,
                    then: Then::Release(r.lease),
                };
                self.resolve(op, reply, ctx)
            }
            ShardOp::CacheGet(args) => self.start(Job::Get { args, poll: false }, reply, ctx),
            ShardOp::CacheSet(args) => self.start(Job::Set(args), reply, ctx),
            ShardOp::CacheDel(args) => self.start(Job::Del(args), reply, ctx),
        }
    }

    /// Runs a request's job: a denial remembered from Redis answers at
    /// once; anything else goes to the backend.
    fn start(&mut self, job: Job, reply: ReplyTo, ctx: &Context<Self, ()>) {
        if let Job::Check(c) | Job::CheckGet(c, _) = &job
            && let Some(d) = self.overlimit.get(c, Instant::now())
        {
            Stats::add(&self.stats.counters.denied_locally, 1);
            metrics().over_limit_local.inc();
            c.policy.count(&d, c.cost);
            let body = match job {
                Job::CheckGet(..) => Body::CheckLookup(d, None),
                _ => Body::Decision(d),
            };
            return self.reply(reply, body);
        }
        self.submit(job, Some(reply), ctx);
    }

    /// Hands a job to the backend: the memory backend runs it now; Redis
    /// gets it in a batch, or (while it is known to be down) never.
    fn submit(&mut self, job: Job, reply: Option<ReplyTo>, ctx: &Context<Self, ()>) {
        let redis = match &mut self.backend {
            Backend::Memory(memory) => {
                let outcome = memory.run(&job);
                return self.finish(job, Some(outcome), reply, ctx);
            }
            Backend::Redis(redis) if redis.is_down() => return self.finish(job, None, reply, ctx),
            Backend::Redis(redis) => redis.clone(),
        };
        let waiter = Waiter {
            job,
            reply,
            deadline: Instant::now() + redis.timeout(),
        };
        match self.batcher.push(waiter) {
            Ok(true) => self.schedule_flush(ctx),
            Ok(false) => {}
            Err(w) => match w.reply {
                Some(reply) => reply.send(Err(Error::Overloaded("shard queue full"))),
                None => self.finish(w.job, None, None, ctx), // a poll: counted back
            },
        }
    }

    /// Has [`Flush`] run once the mailbox holds nothing older; with a full
    /// mailbox (it cannot wait behind it) the batch goes out now.
    fn schedule_flush(&mut self, ctx: &Context<Self, ()>) {
        if ctx.actor_ref().tell(Flush).try_send().is_err() {
            self.flush(ctx);
        }
    }

    fn flush(&mut self, ctx: &Context<Self, ()>) {
        let Backend::Redis(redis) = &self.backend else {
            return;
        };
        let redis = redis.clone();
        while let Some(batch) = self.batcher.flush() {
            self.send(&redis, batch, ctx);
        }
    }

    /// Sends a batch to Redis in its own task. Jobs already past their
    /// deadline are answered by failure mode instead of being sent.
    fn send(&mut self, redis: &RedisBackend, batch: Vec<Waiter>, ctx: &Context<Self, ()>) {
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
            if self.batcher.complete() {
                self.schedule_flush(ctx);
            }
            return;
        };
        let redis = redis.clone();
        // Boxed: a round trip's future is several KiB, and a task moves its
        // future whole more than once (measured: ~3% of quotad's CPU).
        ctx.pipe(Box::pin(async move {
            let outcomes = redis.run(&jobs, deadline).await;
            BatchDone {
                jobs,
                replies,
                outcomes,
            }
        }));
    }

    fn reply(&self, reply: ReplyTo, body: Body) {
        let d = match &body {
            Body::Decision(d) | Body::CheckLookup(d, _) => Some(d),
            _ => None,
        };
        if let Some(d) = d {
            let c = &self.stats.counters;
            Stats::add(if d.allowed { &c.allowed } else { &c.denied }, 1);
            if d.shadow_rule.is_some() {
                Stats::add(&c.shadow_denied, 1);
            }
        }
        reply.send(Ok(body));
    }
}
