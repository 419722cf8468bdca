//! From a decoded request to its answer: `hello` and `stats` answered on
//! the spot, admin ops run against the tenant directory, and every other
//! op sent to the shard that owns its tenant.
//!
//! A tenant's shard is its Redis Cluster slot modulo the shard count: a
//! stable hash, so a tenant always lands on the same shard, which owns its
//! local state (quota entry, over-limit memory, fill waiters).

use std::sync::Arc;

use arc_swap::ArcSwap;
use kameo::actor::{ActorRef, Spawn};
use kameo::error::SendError;
use kameo::mailbox;

use crate::clock::Clock;
use crate::config::Config;
use crate::config::{Plans, TenantRecord};
use crate::error::Error;
use crate::keys::{self, Keys};
use crate::protocol::{Body, Hello, Op, Reply, Request, Stats as StatsBody};
use crate::quota::Directory;
use crate::redis::RedisBackend;
use crate::reply::{Replies, ReplyTo};
use crate::shard::{Forget, JobMsg, ReleaseWaiters, Reload, Shard, ShardArgs};
use crate::stats::Stats;

pub struct Router {
    shards: Vec<ActorRef<Shard>>,
    /// Shared with the shards; a reload swaps it.
    plans: Arc<ArcSwap<Plans>>,
    directory: Option<Arc<Directory>>,
    /// Unix users allowed to use admin ops.
    admins: ArcSwap<Vec<u32>>,
    stats: Arc<Stats>,
    backend: &'static str,
}

/// What a request becomes: an answer now, or one sent later to the
/// connection's reply channel.
pub enum Routed {
    Ready(Reply),
    Pending,
}

impl Router {
    /// Spawns the shard actors.
    pub fn start(
        cfg: &Config,
        redis: Option<RedisBackend>,
        directory: Option<Arc<Directory>>,
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
        let plans = Arc::new(ArcSwap::new(cfg.plans.clone()));
        let max_tenants = cfg.quota.as_ref().map_or(1, |q| q.local_max_tenants);
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
                    plans: plans.clone(),
                    directory: directory.clone(),
                    max_tenants: max_tenants.div_ceil(n),
                    stats: stats.clone(),
                };
                Shard::spawn_with_mailbox(args, mailbox::bounded(s.mailbox_capacity))
            })
            .collect();
        Router {
            shards,
            plans,
            directory,
            admins: ArcSwap::from_pointee(cfg.admin.allowed_uids.clone()),
            stats,
            backend,
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Answers `hello` and `stats` here, admin ops through the directory;
    /// sends every other op to the shard that owns its tenant. `peer_uid`
    /// is the connected process's user (for admin ops).
    pub fn route(
        self: &Arc<Self>,
        req: Request,
        replies: &Replies,
        peer_uid: Option<u32>,
    ) -> Routed {
        let c = &self.stats.counters;
        let id = req.id;
        let op = req.op;
        if op.is_admin() {
            Stats::add(&c.requests_admin, 1);
            if !peer_uid.is_some_and(|uid| self.admins.load().contains(&uid)) {
                let message = format!(
                    "`{}` is for the users in `admin.allowed_uids` only",
                    op.name()
                );
                return Routed::Ready(Reply::err(id, Error::Forbidden(message)));
            }
            self.admin(op, ReplyTo::new(id, replies.clone()));
            return Routed::Pending;
        }
        let counter = match &op {
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
            Op::Check(_) => &c.requests_check,
            Op::CheckGet(..) => &c.requests_check_get,
            Op::CacheGet(_) => &c.requests_cache_get,
            Op::CacheSet(_) => &c.requests_cache_set,
            _ => &c.requests_cache_del,
        };
        Stats::add(counter, 1);
        match self.send(op, ReplyTo::new(id, replies.clone())) {
            Ok(()) => Routed::Pending,
            Err(e) => Routed::Ready(Reply::err(id, e)),
        }
    }

    fn shard_of(&self, tenant: &str) -> &ActorRef<Shard> {
        &self.shards[keys::slot(tenant) as usize % self.shards.len()]
    }

    /// Hands an op to its tenant's shard; a full mailbox is `overloaded`.
    fn send(&self, op: Op, reply: ReplyTo) -> Result<(), Error> {
        let tenant = match &op {
            Op::Check(a) | Op::CheckGet(a, _) => a.tenant.as_str(),
            Op::CacheGet(a) => &a.tenant,
            Op::CacheSet(a) => &a.tenant,
            Op::CacheDel(a) => &a.tenant,
            _ => return Err(Error::Internal("not a shard op".into())),
        };
        let shard = self.shard_of(tenant);
        shard
            .tell(JobMsg(op, reply))
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

    /// Runs an admin op in its own task (it waits on the source of truth).
    fn admin(self: &Arc<Self>, op: Op, reply: ReplyTo) {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(dir) = this.directory.clone() else {
                let body = match op {
                    Op::TenantGet(_) => Ok(Body::Tenant {
                        source: "none",
                        record: None,
                    }),
                    _ => Err(Error::bad_request(
                        "no `[quota]` source: every tenant is on the default plan",
                    )),
                };
                return reply.send(body);
            };
            let body = match op {
                Op::TenantGet(tenant) => dir.get(&tenant).await.map(|record| Body::Tenant {
                    source: dir.source_name(),
                    record,
                }),
                Op::TenantSet(tenant, record) => match this.validate(&record) {
                    Ok(()) => dir.set(&tenant, &record).await.map(|()| {
                        this.forget(&tenant);
                        Body::Done
                    }),
                    Err(e) => Err(e),
                },
                Op::TenantDelete(tenant) => dir.delete(&tenant).await.map(|existed| {
                    this.forget(&tenant);
                    Body::Removed(existed)
                }),
                Op::TenantList => dir.list().await.map(Body::Tenants),
                _ => Err(Error::Internal("not an admin op".into())),
            };
            reply.send(body);
        });
    }

    /// Refuses a record that would not compile (an unknown plan, a bad
    /// override) before it reaches the source.
    fn validate(&self, record: &TenantRecord) -> Result<(), Error> {
        self.plans
            .load()
            .for_record(record)
            .map(drop)
            .map_err(|e| Error::bad_request(e.to_string()))
    }

    /// Makes the tenant's shard look its record up again.
    pub fn forget(&self, tenant: &str) {
        let _ = self
            .shard_of(tenant)
            .tell(Forget(tenant.to_owned()))
            .try_send();
    }

    /// Swaps in a reloaded config's plans and admins; shards recompile
    /// their tenants and forget cached denials.
    pub async fn reload(&self, config: &Config) {
        self.plans.store(config.plans.clone());
        self.admins
            .store(Arc::new(config.admin.allowed_uids.clone()));
        if let Some(dir) = &self.directory {
            dir.reload(config);
        }
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
