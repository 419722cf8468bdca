//! A shard's side of tenant quotas: which policies a request's tenant is
//! under, looked up through the local level ([`Tenants`]) and, on a miss,
//! the directory (the Redis level, then the source of truth).

use std::sync::Arc;

use kameo::message::{Context, Message};
use tokio::time::Instant;

use super::Shard;
use super::tenants::{Found, RETRY_AFTER};
use crate::backend::Job;
use crate::config::Policies;
use crate::config::{Plans, TenantRecord};
use crate::error::Error;
use crate::limiter::{Check, Lease, Release};
use crate::protocol::Body;
use crate::protocol::{CacheGetArgs, CheckArgs};
use crate::quota::{Directory, Found as Looked, SourceError};
use crate::reply::ReplyTo;
use crate::stats::Stats;

/// A directory lookup came back.
pub struct TenantLoaded {
    /// Where it was looked up (to look again).
    directory: Arc<Directory>,
    tenant: String,
    result: Result<Looked, SourceError>,
    /// From [`Tenants::lookup_started`](super::tenants::Tenants::lookup_started).
    epoch: u64,
}

/// A `check`, `check_get` or `usage` that needs its tenant's policies
/// before it becomes a job.
#[derive(Debug)]
pub struct PendingCheck {
    pub args: CheckArgs,
    pub then: Then,
}

/// What a [`PendingCheck`] becomes.
#[derive(Debug)]
pub enum Then {
    Check,
    /// A `check_get`: the cache read after it.
    Get(Box<CacheGetArgs>),
    Usage,
    /// A `release` of this lease, under the same tenant, key and policy
    /// (which it resolves the same way), rather than a check.
    Release(Lease),
}

/// A tenant's record changed: look it up again on its next request.
pub struct Forget(pub String);

impl Message<TenantLoaded> for Shard {
    type Reply = ();

    async fn handle(&mut self, done: TenantLoaded, ctx: &mut Context<Self, ()>) {
        if !self.tenants.lookup_done(&done.tenant, done.epoch) {
            // The record changed while it ran: it may hold the old one.
            if self.tenants.awaits_lookup(&done.tenant) {
                self.look_up(done.directory, done.tenant, ctx);
            }
            return;
        }
        let now = Instant::now();
        let (policies, waiting) = match done.result {
            Ok(found) => {
                let policies = compile(
                    &self.plans.load(),
                    &self.stats,
                    &done.tenant,
                    found.record.as_ref(),
                );
                let waiting =
                    self.tenants
                        .fill(&done.tenant, found.record, policies.clone(), found.ttl, now);
                (policies, waiting)
            }
            Err(_) => match self.tenants.keep_stale(&done.tenant, now) {
                (Some(stale), waiting) => {
                    Stats::add(&self.stats.counters.quota_local_stale, waiting.len() as u64);
                    (stale, waiting)
                }
                (None, waiting) => {
                    // Never seen and the source is down: the default plan,
                    // stale at once (served without waiting, looked up again).
                    let policies = compile(&self.plans.load(), &self.stats, &done.tenant, None);
                    self.tenants
                        .fill(&done.tenant, None, policies.clone(), RETRY_AFTER, now);
                    self.tenants.keep_stale(&done.tenant, now);
                    (policies, waiting)
                }
            },
        };
        for (op, reply) in waiting {
            self.admit(op, reply, &policies, ctx);
        }
    }
}

impl Message<Forget> for Shard {
    type Reply = ();

    async fn handle(&mut self, Forget(tenant): Forget, _: &mut Context<Self, ()>) {
        self.tenants.forget(&tenant);
        self.overlimit.forget(&tenant);
    }
}

impl Shard {
    /// A `check`, `check_get`, `usage` or `release`: resolves its tenant's policies, waiting
    /// for a lookup if the local level does not have them.
    pub(super) fn resolve(&mut self, op: PendingCheck, reply: ReplyTo, ctx: &Context<Self, ()>) {
        let Some(directory) = self.directory.clone() else {
            let policies = self.plans.load().default_plan().clone();
            return self.admit(op, reply, &policies, ctx);
        };
        let tenant = op.args.tenant.clone();
        let c = &self.stats.counters;
        match self.tenants.find(&tenant, Instant::now()) {
            Found::Ready {
                policies,
                refresh,
                stale,
            } => {
                Stats::add(
                    if stale {
                        &c.quota_local_stale
                    } else {
                        &c.quota_local_hits
                    },
                    1,
                );
                if refresh {
                    self.look_up(directory, tenant, ctx);
                }
                self.admit(op, reply, &policies, ctx);
            }
            Found::Wait { lookup } => {
                Stats::add(&c.quota_local_misses, 1);
                if lookup {
                    self.look_up(directory, tenant.clone(), ctx);
                }
                self.tenants.park(&tenant, op, reply);
            }
        }
    }

    fn look_up(&mut self, directory: Arc<Directory>, tenant: String, ctx: &Context<Self, ()>) {
        let epoch = self.tenants.lookup_started();
        ctx.pipe(async move {
            let result = directory.lookup(&tenant).await;
            TenantLoaded {
                directory,
                tenant,
                result,
                epoch,
            }
        });
    }

    /// Turns a check into a job under `policies`, or answers its error.
    fn admit(
        &mut self,
        op: PendingCheck,
        reply: ReplyTo,
        policies: &Policies,
        ctx: &Context<Self, ()>,
    ) {
        let job = match op.then {
            Then::Check => check(op.args, policies).map(|c| Some(Job::Check(c))),
            Then::Get(get) => check(op.args, policies).map(|c| Some(Job::CheckGet(c, get))),
            Then::Usage => check(op.args, policies).map(|c| Some(Job::Usage(c))),
            Then::Release(lease) => release(op.args, lease, policies),
        };
        match job {
            Ok(Some(job)) => self.start(job, reply, ctx),
            // Nothing to give back: no rule of the policy takes a lease.
            Ok(None) => reply.send(Ok(Body::Released {
                released: false,
                degraded: false,
            })),
            Err(e) => reply.send(Err(e)),
        }
    }

    /// After a reload: every known tenant under the new plans.
    pub(super) fn recompile_tenants(&mut self) {
        let plans = self.plans.load();
        let stats = self.stats.clone();
        self.tenants
            .recompile(|tenant, record| compile(&plans, &stats, tenant, record));
    }
}

/// Resolves the policy of a check and refuses a cost it can never allow.
fn check(args: CheckArgs, policies: &Policies) -> Result<Check, Error> {
    let policy = policies.get(args.policy.as_deref())?.clone();
    policy.check_cost(args.cost)?;
    Ok(Check::new(policy, args.tenant, args.key, args.cost))
}

/// Resolves the policy of a release: `None` when it takes no leases.
fn release(args: CheckArgs, lease: Lease, policies: &Policies) -> Result<Option<Job>, Error> {
    let policy = policies.get(args.policy.as_deref())?;
    Ok(policy.has_leases().then(|| {
        Job::Release(Release {
            policy: policy.clone(),
            tenant: args.tenant,
            key: args.key,
            lease,
        })
    }))
}

/// A tenant's policies: its plan with its own overrides, or the `default`
/// plan when the source does not know it or its record does not compile.
fn compile(
    plans: &Plans,
    stats: &Stats,
    tenant: &str,
    record: Option<&TenantRecord>,
) -> Arc<Policies> {
    let c = &stats.counters;
    let Some(record) = record else {
        Stats::add(&c.quota_default_plan, 1);
        tracing::debug!(tenant, "tenant unknown to the source: default plan");
        return plans.default_plan().clone();
    };
    plans.for_record(record).unwrap_or_else(|e| {
        Stats::add(&c.quota_bad_records, 1);
        Stats::add(&c.quota_default_plan, 1);
        tracing::warn!(tenant, plan = %record.plan, error = %e, "bad tenant record: default plan");
        plans.default_plan().clone()
    })
}
