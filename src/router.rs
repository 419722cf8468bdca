//! From a decoded request to its answer: ops answered on the spot, checks
//! routed to the shard that owns their tenant.
//!
//! A tenant's shard is its Redis Cluster slot modulo the shard count: a
//! stable hash, so a tenant always lands on the same shard. Policies are
//! read from a lock-free snapshot that a reload swaps as a whole.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use kameo::actor::{ActorRef, Spawn};
use kameo::error::SendError;
use kameo::mailbox;
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::config::{Config, Policies};
use crate::error::Error;
use crate::keys::{self, Keys};
use crate::limiter::{Check, Decision};
use crate::protocol::{Body, CheckArgs, Hello, Op, Reply, Request, Stats as StatsBody};
use crate::redis::RedisBackend;
use crate::shard::{CheckMsg, Reload, Shard, ShardArgs};
use crate::stats::Stats;

pub struct Router {
    shards: Vec<ActorRef<Shard>>,
    policies: ArcSwap<Policies>,
    stats: Arc<Stats>,
    backend: &'static str,
}

/// What a request becomes: an answer now, or one a shard will give.
pub enum Routed {
    Ready(Reply),
    Pending(PendingCheck),
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
                    max_in_flight: s.max_batches_in_flight,
                    max_queued: s.max_queued_per_shard,
                    local_max_entries: s.local_max_entries.div_ceil(n),
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

    /// Answers `hello` and `stats` here; sends a `check` to its shard.
    pub fn route(&self, req: Request) -> Routed {
        let c = &self.stats.counters;
        let id = req.id;
        match req.op {
            Op::Hello => {
                Stats::add(&c.requests_hello, 1);
                Routed::Ready(Reply::ok(
                    id,
                    Body::Hello(Hello {
                        backend: self.backend,
                    }),
                ))
            }
            Op::Stats => {
                Stats::add(&c.requests_stats, 1);
                Routed::Ready(Reply::ok(
                    id,
                    Body::Stats(StatsBody {
                        uptime_ms: self.stats.uptime_ms(),
                        backend: self.backend,
                        shards: self.shards.len() as u64,
                        counters: c.snapshot(),
                    }),
                ))
            }
            Op::Check(args) => {
                Stats::add(&c.requests_check, 1);
                match self.check(args) {
                    Ok(pending) => Routed::Pending(PendingCheck { id, pending }),
                    Err(e) => Routed::Ready(Reply::err(id, e)),
                }
            }
        }
    }

    fn check(&self, args: CheckArgs) -> Result<oneshot::Receiver<Result<Decision, Error>>, Error> {
        let policy = self.policies.load().get(args.policy.as_deref())?.clone();
        policy.check_cost(args.cost)?;
        let shard = &self.shards[keys::slot(&args.tenant) as usize % self.shards.len()];
        let check = Check {
            policy,
            tenant: args.tenant,
            key: args.key,
            cost: args.cost,
        };
        let (tx, rx) = oneshot::channel();
        shard
            .tell(CheckMsg(check, tx))
            .try_send()
            .map_err(|e| match e {
                SendError::MailboxFull(_) => Error::Overloaded("shard mailbox full"),
                _ => Error::ShuttingDown,
            })?;
        Ok(rx)
    }

    /// Swaps in new policies; shards forget cached denials.
    pub async fn reload(&self, policies: Arc<Policies>) {
        self.policies.store(policies);
        for shard in &self.shards {
            let _ = shard.tell(Reload).send().await;
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

/// A check's answer on its way from a shard, tagged with the request id.
pub struct PendingCheck {
    id: u64,
    pending: oneshot::Receiver<Result<Decision, Error>>,
}

impl Future for PendingCheck {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let id = self.id;
        Pin::new(&mut self.pending).poll(cx).map(|r| match r {
            Ok(Ok(d)) => Reply::ok(id, Body::Decision(d)),
            Ok(Err(e)) => Reply::err(id, e),
            // The shard stopped before answering: only at shutdown.
            Err(_) => Reply::err(id, Error::ShuttingDown),
        })
    }
}
