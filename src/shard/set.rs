//! Every shard of the process: spawned together, found by tenant, told
//! together of a reload or a stop.
//!
//! A tenant's shard is its Redis Cluster slot modulo the shard count: a
//! stable hash, so a tenant always lands on the same shard, which owns its
//! local state (quota entry, over-limit memory, fill waiters).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use kameo::actor::{ActorRef, Spawn};
use kameo::error::SendError;
use kameo::mailbox;

use super::batch::Batcher;
use super::overlimit::OverLimit;
use super::tenants::Tenants;
use super::{Forget, Jobs, ReleaseWaiters, Reload, Shard, ShardArgs};
use crate::backend::{Backend, MemoryBackend, RedisBackend};
use crate::clock::Clock;
use crate::config::{Config, Plans};
use crate::error::Error;
use crate::keys::{self, Keys};
use crate::protocol::ShardOp;
use crate::quota::Directory;
use crate::reply::{Replies, ReplyTo};
use crate::stats::Stats;

/// Largest over-limit memory per shard.
const OVERLIMIT_ENTRIES: usize = 65_536;

pub struct Shards {
    shards: Vec<ActorRef<Shard>>,
}

impl Shards {
    /// Spawns `server.shards` actors, each with its share of the
    /// process-wide bounds and its own backend: a handle on the shared
    /// Redis, or an in-process one of its own.
    pub fn spawn(
        cfg: &Config,
        redis: Option<RedisBackend>,
        plans: Arc<ArcSwap<Plans>>,
        directory: Option<Arc<Directory>>,
        clock: Clock,
        stats: Arc<Stats>,
    ) -> Self {
        let s = &cfg.server;
        let n = s.shard_count();
        let keys = Keys::new(
            cfg.redis
                .as_ref()
                .map_or(keys::DEFAULT_PREFIX, |r| r.prefix.as_str()),
        );
        let max_tenants = cfg.quota.as_ref().map_or(1, |q| q.local_max_tenants);
        let memory = || {
            MemoryBackend::new(
                keys.clone(),
                clock.clone(),
                s.local_max_entries.div_ceil(n),
                cfg.cache.memory_max_bytes.div_ceil(n),
            )
        };
        let shards = (0..n)
            .map(|_| {
                let (backend, overlimit) = match &redis {
                    Some(r) => (Backend::Redis(r.clone()), OVERLIMIT_ENTRIES),
                    None => (Backend::Memory(memory()), 0),
                };
                let args = ShardArgs {
                    backend,
                    fallback: memory(),
                    batcher: Batcher::new(
                        s.batch_max,
                        s.batch_max_bytes,
                        s.max_batches_in_flight,
                        s.max_queued_per_shard,
                    ),
                    overlimit: OverLimit::new(overlimit),
                    tenants: Tenants::new(max_tenants.div_ceil(n)),
                    fill_poll: Duration::from_millis(cfg.cache.fill_poll_ms),
                    plans: plans.clone(),
                    directory: directory.clone(),
                    stats: stats.clone(),
                };
                Shard::spawn_with_mailbox(args, mailbox::bounded(s.mailbox_capacity))
            })
            .collect();
        Shards { shards }
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    fn of(&self, tenant: &str) -> &ActorRef<Shard> {
        &self.shards[index(tenant, self.shards.len())]
    }

    /// An empty outbox for a connection whose answers go to `replies`.
    pub fn outbox(&self, replies: Replies) -> Outbox {
        Outbox {
            replies,
            shards: (0..self.shards.len()).map(|_| Pending::default()).collect(),
        }
    }

    /// Hands on what `outbox` holds: one message per shard. A full mailbox
    /// answers each of its requests `overloaded`.
    pub fn deliver(&self, outbox: &mut Outbox) {
        for (shard, pending) in self.shards.iter().zip(&mut outbox.shards) {
            if pending.jobs.is_empty() {
                continue;
            }
            pending.last = pending.jobs.len();
            let jobs = std::mem::take(&mut pending.jobs);
            // A refused message comes back with its reply senders.
            let (jobs, error) = match shard.tell(Jobs(jobs)).try_send() {
                Ok(()) => continue,
                Err(SendError::MailboxFull(Jobs(jobs))) => {
                    (jobs, Error::Overloaded("shard mailbox full"))
                }
                Err(SendError::ActorNotRunning(Jobs(jobs))) => (jobs, Error::ShuttingDown),
                // Not a `try_send` outcome; dropped senders answer anyway.
                Err(_) => continue,
            };
            for (_, reply) in jobs {
                reply.send(Err(error.clone()));
            }
        }
    }

    /// Makes the tenant's shard look its record up again.
    pub fn forget(&self, tenant: &str) {
        let _ = self.of(tenant).tell(Forget(tenant.to_owned())).try_send();
    }

    /// Policies were reloaded: shards recompile their tenants and forget
    /// cached denials.
    pub async fn reload(&self) {
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

/// The shard a tenant belongs to, of `n`.
fn index(tenant: &str, n: usize) -> usize {
    keys::slot(tenant) as usize % n
}

/// A connection's requests for the shards, gathered over one wake-up and
/// sent by [`Shards::deliver`]: one message per shard, not per request.
pub struct Outbox {
    replies: Replies,
    shards: Vec<Pending>,
}

#[derive(Default)]
struct Pending {
    jobs: Vec<(ShardOp, ReplyTo)>,
    /// How many the last delivery held: the next list's first capacity.
    last: usize,
}

impl Outbox {
    /// A reply sender for request `id`.
    pub fn reply_to(&self, id: u64) -> ReplyTo {
        ReplyTo::new(id, self.replies.clone())
    }

    /// Queues `op` for its tenant's shard.
    pub fn push(&mut self, op: ShardOp, reply: ReplyTo) {
        let n = self.shards.len();
        let pending = &mut self.shards[index(op.tenant(), n)];
        if pending.jobs.capacity() == 0 {
            pending.jobs.reserve(pending.last.max(1));
        }
        pending.jobs.push((op, reply));
    }
}
