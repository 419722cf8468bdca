//! From a decoded request to its answer: ops answered on the spot, checks
//! routed to the shard that owns their tenant.
//!
//! A tenant's shard is its Redis Cluster slot modulo the shard count: a
//! stable hash, so a tenant always lands on the same shard. Policies are
//! read from a lock-free snapshot that a reload swaps as a whole.

use std::sync::Arc;

use arc_swap::ArcSwap;
use kameo::actor::{ActorRef, Spawn};
use kameo::error::SendError;
use kameo::mailbox;

use crate::clock::Clock;
use crate::config::{Config, Policies};
use crate::error::Error;
use crate::job::Job;
use crate::keys::{self, Keys};
use crate::limiter::Check;
use crate::protocol::{Body, CheckArgs, Hello, Op, Reply, Request, Stats as StatsBody};
use crate::redis::RedisBackend;
use crate::reply::{Replies, ReplyTo};
use crate::shard::{JobMsg, ReleaseWaiters, Reload, Shard, ShardArgs};
use crate::stats::Stats;

pub struct Router {
    shards: Vec<ActorRef<Shard>>,
    policies: ArcSwap<Policies>,
    stats: Arc<Stats>,
    backend: &'static str,
}

/// What a request becomes: an answer now, or one a shard will send to
/// the connection's reply channel.
pub enum Routed {
    Ready(Reply),
    Pending,
}

impl Router {
    /// Spawns the shard actors.
    pub fn start(
        cfg: &Config,
        redis: Option<RedisBackend>,
        clock: Clock,
        stats: Arc<Stats>,
    ) -> Self {
        let s = &cfg.server;
        let n = s.shard_count();
        let prefix = cfg
            .redis
            .as_ref()
            .map_or(keys::DEFAULT_PREFIX, |r| r.prefix.as_str());
        let backend = if redis.is_some() { "redis" } else { "memory" };
        let shards = (0..n)
            .map(|_| {
                let args = ShardArgs {
                    redis: redis.clone(),
                    keys: Keys::new(prefix),
                    clock: clock.clone(),
                    batch_max: s.batch_max,
                    batch_max_bytes: s.batch_max_bytes,
                    max_in_flight: s.max_batches_in_flight,
                    max_queued: s.max_queued_per_shard,
                    local_max_entries: s.local_max_entries.div_ceil(n),
                    cache_max_bytes: cfg.cache.memory_max_bytes.div_ceil(n),
                    fill_poll: std::time::Duration::from_millis(cfg.cache.fill_poll_ms),
                    stats: stats.clone(),
                };
                Shard::spawn_with_mailbox(args, mailbox::bounded(s.mailbox_capacity))
            })
            .collect();
        Router {
            shards,
            policies: ArcSwap::new(cfg.policies.clone()),
            stats,
            backend,
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Answers `hello` and `stats` here; sends every other op to the
    /// shard that owns its tenant.
    pub fn route(&self, req: Request, replies: &Replies) -> Routed {
        let c = &self.stats.counters;
        let id = req.id;
        let job = match req.op {
            Op::Hello => {
                Stats::add(&c.requests_hello, 1);
                let hello = Hello {
                    backend: self.backend,
                };
                return Routed::Ready(Reply::ok(id, Body::Hello(hello)));
            }
            Op::Stats => {
                Stats::add(&c.requests_stats, 1);
                let stats = StatsBody {
                    uptime_ms: self.stats.uptime_ms(),
                    backend: self.backend,
                    shards: self.shards.len() as u64,
                    counters: c.snapshot(),
                };
                return Routed::Ready(Reply::ok(id, Body::Stats(stats)));
            }
            Op::Check(args) => {
                Stats::add(&c.requests_check, 1);
                self.check(args).map(Job::Check)
            }
            Op::CheckGet(args, get) => {
                Stats::add(&c.requests_check_get, 1);
                self.check(args).map(|check| Job::CheckGet(check, get))
            }
            Op::CacheGet(args) => {
                Stats::add(&c.requests_cache_get, 1);
                Ok(Job::Get { args, poll: false })
            }
            Op::CacheSet(args) => {
                Stats::add(&c.requests_cache_set, 1);
                Ok(Job::Set(args))
            }
            Op::CacheDel(args) => {
                Stats::add(&c.requests_cache_del, 1);
                Ok(Job::Del(args))
            }
        };
        match job.and_then(|job| self.send(job, ReplyTo::new(id, replies.clone()))) {
            Ok(()) => Routed::Pending,
            Err(e) => Routed::Ready(Reply::err(id, e)),
        }
    }

    /// Resolves the policy of a check and refuses a cost it can never allow.
    fn check(&self, args: CheckArgs) -> Result<Check, Error> {
        let policy = self.policies.load().get(args.policy.as_deref())?.clone();
        policy.check_cost(args.cost)?;
        Ok(Check {
            policy,
            tenant: args.tenant,
            key: args.key,
            cost: args.cost,
        })
    }

    /// Hands a job to its tenant's shard; a full mailbox is `overloaded`.
    fn send(&self, job: Job, reply: ReplyTo) -> Result<(), Error> {
        let shard = &self.shards[keys::slot(job.tenant()) as usize % self.shards.len()];
        shard
            .tell(JobMsg(job, reply))
            .try_send()
            .map_err(|e| match e {
                // The message comes back with its reply sender: the caller
                // answers, so the sender must not answer by itself.
                SendError::MailboxFull(JobMsg(_, reply)) => {
                    reply.cancel();
                    Error::Overloaded("shard mailbox full")
                }
                SendError::ActorNotRunning(JobMsg(_, reply)) => {
                    reply.cancel();
                    Error::ShuttingDown
                }
                _ => Error::ShuttingDown,
            })
    }

    /// Swaps in new policies; shards forget cached denials.
    pub async fn reload(&self, policies: Arc<Policies>) {
        self.policies.store(policies);
        for shard in &self.shards {
            let _ = shard.tell(Reload).send().await;
        }
    }

    /// At shutdown: callers waiting on a cache fill get a plain miss now
    /// rather than at their deadline, so connections can drain.
    pub async fn release_waiters(&self) {
        for shard in &self.shards {
            let _ = shard.tell(ReleaseWaiters).send().await;
        }
    }

    /// Stops every shard, answering whatever they still hold.
    pub async fn stop(&self) {
        for shard in &self.shards {
            let _ = shard.stop_gracefully().await;
        }
        for shard in &self.shards {
            shard.wait_for_shutdown().await;
        }
    }
}
