//! From a decoded request to whoever answers it: `hello` and `stats` here,
//! on the spot; a tenant's op to the shard that owns the tenant; an admin
//! op to the [`Admin`] side; either of the last two only if the
//! connection's [`PeerGrant`] allows it.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access::{Access, PeerGrant};
use crate::admin::Admin;
use crate::backend::redis::RedisBackend;
use crate::clock::Clock;
use crate::config::{Config, Plans};
use prometheus_client::metrics::histogram::Histogram;

use crate::keys::Keys;
use crate::metrics::{Timer, metrics};
use crate::near::NearCache;
use crate::protocol::{
    Answerer, Body, CacheGetArgs, Hello, LocalOp, Lookup, Op, OpKind, Reply, Request, ShardOp,
    Stats as StatsBody,
};
use crate::quota::Directory;
use crate::shard::{Outbox, Shards};
use crate::stats::Stats;

pub struct Router {
    shards: Arc<Shards>,
    /// Every plan's policies, shared with the shards and the admin side.
    plans: Arc<ArcSwap<Plans>>,
    admin: Admin,
    access: Access,
    stats: Arc<Stats>,
    backend: &'static str,
    /// Latency histograms by [`OpKind::index`], for the ops shards answer.
    latency: [Option<Histogram>; OpKind::ALL.len()],
    /// The Redis backend's near cache, if on, and its key names.
    near: Option<(Arc<NearCache>, Keys)>,
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
        let backend = if redis.is_some() { "redis" } else { "memory" };
        let near = (redis.as_ref()).and_then(|r| Some((r.near()?.clone(), r.keys().clone())));
        let plans = Arc::new(ArcSwap::new(cfg.plans.clone()));
        let shards = Arc::new(Shards::spawn(
            cfg,
            redis,
            plans.clone(),
            directory.clone(),
            clock,
            stats.clone(),
        ));
        let admin = Admin::new(directory, plans.clone(), shards.clone());
        Router {
            shards,
            plans,
            admin,
            access: Access::new(cfg, stats.clone()),
            stats,
            backend,
            latency: OpKind::ALL.map(|k| {
                (k.answerer() == Answerer::Shard).then(|| metrics().request_duration(k.name()))
            }),
            near,
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn shards(&self) -> &Shards {
        &self.shards
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Routes one request of a connection that `grant` describes. A
    /// shard's op waits in `outbox` for [`Shards::deliver`].
    pub fn route(&self, req: Request, outbox: &mut Outbox, grant: &mut PeerGrant) -> Routed {
        let id = req.id;
        match req.op {
            Op::Local(op) => return Routed::Ready(Reply::ok(id, self.local(op))),
            Op::Shard(op) => {
                self.count(&op);
                let timer = self.latency[op.kind().index()].as_ref().map(Timer::start);
                if !grant.covers(op.tenant()) {
                    let e = self.access.refuse_tenant(grant, op.tenant());
                    return Routed::Ready(Reply::err(id, e));
                }
                // After the access check: a near hit never bypasses it.
                if let ShardOp::CacheGet(g) = &op
                    && let Some(lookup) = self.near_hit(g)
                {
                    if let Some(t) = timer {
                        t.observe();
                    }
                    return Routed::Ready(Reply::ok(id, Body::Lookup(lookup)));
                }
                outbox.push(op, outbox.reply_to(id).timed(timer));
            }
            Op::Admin(op) => {
                Stats::add(&self.stats.counters.requests_admin, 1);
                if !grant.admin() {
                    let e = self.access.refuse_admin(grant, op.kind().name());
                    return Routed::Ready(Reply::err(id, e));
                }
                // What came before it reaches the shards first.
                self.shards.deliver(outbox);
                self.admin.run(op, outbox.reply_to(id));
            }
        }
        Routed::Pending
    }

    fn local(&self, op: LocalOp) -> Body {
        let c = &self.stats.counters;
        match op {
            LocalOp::Hello => {
                Stats::add(&c.requests_hello, 1);
                Body::Hello(Hello {
                    backend: self.backend,
                })
            }
            LocalOp::Stats => {
                Stats::add(&c.requests_stats, 1);
                Body::Stats(StatsBody {
                    uptime_ms: self.stats.uptime_ms(),
                    backend: self.backend,
                    shards: self.shards.len() as u64,
                    counters: self.stats.snapshot(),
                    shadow_denials: crate::metrics::metrics().shadow_denials(),
                })
            }
        }
    }

    /// A fresh hit from the near cache, counted as a fresh hit.
    fn near_hit(&self, g: &CacheGetArgs) -> Option<Lookup> {
        let (near, keys) = self.near.as_ref()?;
        let (value, ttl_ms) = near.get(&keys.entry(&g.tenant, &g.key))?;
        Stats::add(&self.stats.counters.cache_hits, 1);
        Some(Lookup {
            value: Some(value),
            ttl_ms,
            ..Lookup::default()
        })
    }

    /// Counts a request in `stats`.
    fn count(&self, op: &ShardOp) {
        let c = &self.stats.counters;
        let counter = match op {
            ShardOp::Check(_) => &c.requests_check,
            ShardOp::CheckGet(..) => &c.requests_check_get,
            ShardOp::CacheGet(_) => &c.requests_cache_get,
            ShardOp::CacheSet(_) => &c.requests_cache_set,
            ShardOp::CacheDel(_) => &c.requests_cache_del,
            ShardOp::Release(_) => &c.requests_release,
            ShardOp::Usage(_) => &c.requests_usage,
        };
        Stats::add(counter, 1);
    }

    /// Swaps in a reloaded config: plans (shared with the shards and the
    /// admin side), access rules, admins and source settings; then the
    /// shards recompile.
    pub async fn reload(&self, config: &Config) {
        self.plans.store(config.plans.clone());
        self.access.reload(config);
        self.admin.reload(config);
        self.shards.reload().await;
    }
}
