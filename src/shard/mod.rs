//! The shard actor: one per tenant shard, owning its tenants' local state.
//!
//! A shard answers from local state when it can (a key Redis denied until
//! T; Redis known to be down; the memory backend), and otherwise queues the
//! check for its next Redis round trip (see [`crate::batch`]). Replies are
//! deferred: each check carries a reply sender that the handler stores, and
//! the handler returns at once, so a slow Redis never blocks the mailbox.
//! The round trip runs in its own task and comes back as a [`BatchDone`]
//! message; a failed one is answered by each policy's failure mode and
//! never stops the actor.

mod overlimit;

use std::convert::Infallible;
use std::sync::Arc;

use kameo::actor::{Actor, ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::batch::Batcher;
use crate::clock::Clock;
use crate::error::Error;
use crate::keys::Keys;
use crate::limiter::memory::MemoryLimiter;
use crate::limiter::{Check, Decision, FailureMode, Verdict};
use crate::redis::RedisBackend;
use crate::stats::Stats;
use overlimit::OverLimit;

/// Largest over-limit memory per shard.
const OVERLIMIT_ENTRIES: usize = 65_536;

/// Where a shard sends its answer to one check.
pub type ReplyTo = oneshot::Sender<Result<Decision, Error>>;

/// Decide one check (already validated by the connection) and answer it.
#[derive(Debug)]
pub struct CheckMsg(pub Check, pub ReplyTo);

/// A Redis round trip came back: one verdict (or `None`) per check sent.
/// The reply senders travel with the batch: if the shard is gone when it
/// returns, dropping them tells each caller so.
pub struct BatchDone {
    checks: Vec<Check>,
    replies: Vec<ReplyTo>,
    verdicts: Vec<Option<Verdict>>,
}

/// Policies were reloaded: forget cached denials, they may no longer hold.
pub struct Reload;

/// A check waiting for Redis.
struct Waiter {
    check: Check,
    reply: ReplyTo,
    /// No answer may come later than this.
    deadline: Instant,
}

pub struct Shard {
    redis: Option<RedisBackend>,
    /// The memory backend, or the `local` failure mode beside Redis.
    local: MemoryLimiter,
    keys: Keys,
    clock: Clock,
    batcher: Batcher<Waiter>,
    overlimit: OverLimit,
    stats: Arc<Stats>,
}

/// What a shard is built from.
pub struct ShardArgs {
    pub redis: Option<RedisBackend>,
    pub keys: Keys,
    pub clock: Clock,
    pub batch_max: usize,
    pub max_in_flight: usize,
    pub max_queued: usize,
    pub local_max_entries: usize,
    pub stats: Arc<Stats>,
}

impl Actor for Shard {
    type Args = ShardArgs;
    type Error = Infallible;

    async fn on_start(a: ShardArgs, _: ActorRef<Self>) -> Result<Self, Infallible> {
        Ok(Shard {
            redis: a.redis,
            local: MemoryLimiter::new(a.local_max_entries),
            keys: a.keys,
            clock: a.clock,
            batcher: Batcher::new(a.batch_max, a.max_in_flight, a.max_queued),
            overlimit: OverLimit::new(OVERLIMIT_ENTRIES),
            stats: a.stats,
        })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), Infallible> {
        for w in self.batcher.drain() {
            let _ = w.reply.send(Err(Error::ShuttingDown));
        }
        Ok(())
    }
}

impl Message<CheckMsg> for Shard {
    type Reply = ();

    async fn handle(&mut self, CheckMsg(check, reply): CheckMsg, ctx: &mut Context<Self, ()>) {
        let Some(redis) = &self.redis else {
            let decision = self.decide_locally(&check, false);
            self.answer(reply, decision);
            return;
        };
        let now = Instant::now();
        if let Some(d) = self.overlimit.get(&check, now) {
            Stats::add(&self.stats.counters.denied_locally, 1);
            self.answer(reply, d);
        } else if redis.is_down() {
            let d = self.failure_answer(&check);
            self.answer(reply, d);
        } else {
            let deadline = now + redis.timeout();
            match self.batcher.push(Waiter {
                check,
                reply,
                deadline,
            }) {
                Ok(Some(batch)) => self.send(batch, ctx),
                Ok(None) => {}
                Err(w) => {
                    let _ = w.reply.send(Err(Error::Overloaded("shard queue full")));
                }
            }
        }
    }
}

impl Message<BatchDone> for Shard {
    type Reply = ();

    async fn handle(&mut self, done: BatchDone, ctx: &mut Context<Self, ()>) {
        let now = Instant::now();
        for ((check, verdict), reply) in done.checks.iter().zip(done.verdicts).zip(done.replies) {
            let decision = match verdict {
                Some(v) => {
                    let d = Decision::from_verdict(&check.policy, v, false);
                    self.overlimit.insert(check, &d, now);
                    d
                }
                None => self.failure_answer(check),
            };
            self.answer(reply, decision);
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
    }
}

impl Shard {
    /// Sends a batch to Redis in its own task. Checks already past their
    /// deadline are answered by failure mode instead of being sent.
    fn send(&mut self, batch: Vec<Waiter>, ctx: &Context<Self, ()>) {
        let now = Instant::now();
        let mut deadline = None;
        let mut checks = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for w in batch {
            if w.deadline <= now {
                let d = self.failure_answer(&w.check);
                self.answer(w.reply, d);
            } else {
                // The oldest check's deadline bounds the whole round trip.
                deadline.get_or_insert(w.deadline);
                replies.push(w.reply);
                checks.push(w.check);
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
            let verdicts = redis.check(&checks, deadline).await;
            BatchDone {
                checks,
                replies,
                verdicts,
            }
        });
    }

    /// The answer when Redis cannot decide: the policy's failure mode.
    fn failure_answer(&mut self, check: &Check) -> Decision {
        Stats::add(&self.stats.counters.degraded, 1);
        match check.policy.failure_mode {
            FailureMode::Open | FailureMode::Closed => Decision::failed(&check.policy),
            FailureMode::Local => self.decide_locally(check, true),
        }
    }

    fn decide_locally(&mut self, check: &Check, degraded: bool) -> Decision {
        let keys = check.state_keys(&self.keys);
        let now = self.clock.now_us();
        let v = self.local.check(&check.policy, &keys, now, check.cost);
        Decision::from_verdict(&check.policy, v, degraded)
    }

    fn answer(&self, reply: ReplyTo, decision: Decision) {
        let counter = if decision.allowed {
            &self.stats.counters.allowed
        } else {
            &self.stats.counters.denied
        };
        Stats::add(counter, 1);
        let _ = reply.send(Ok(decision));
    }
}
