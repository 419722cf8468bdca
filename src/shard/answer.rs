//! From a job's outcome to its caller's answer, in named steps:
//!
//! - the reply body: [`Outcome::into_body`] (pure), or the policy's failure
//!   mode when the backend could not answer ([`Shard::fail`]);
//! - what the answer teaches the shard ([`Shard::learn`]): a denial to
//!   remember, a stored value for the callers waiting on it;
//! - the answer itself ([`Shard::answer`]), unless it is a miss that
//!   another caller fills: then the caller waits for the value.

use kameo::message::Context;
use tokio::time::Instant;

use super::Shard;
use crate::backend::{Backend, Job, Outcome};
use crate::error::Error;
use crate::limiter::{Check, Decision, FailureMode, Release};
use crate::protocol::{Body, Lookup};
use crate::reply::ReplyTo;
use crate::stats::Stats;

impl Shard {
    /// Answers a job from its outcome, or by failure mode when it has none.
    pub(super) fn finish(
        &mut self,
        job: Job,
        outcome: Option<Outcome>,
        reply: Option<ReplyTo>,
        ctx: &Context<Self, ()>,
    ) {
        if let Job::Get { args, poll: true } = &job {
            return self.polled(args, outcome);
        }
        if let Job::Usage(_) = &job {
            return self.report(&job, outcome, reply);
        }
        let (job, reply) = match (job, reply) {
            // Only the shard's own releases of orphaned leases have no reply.
            (Job::Release(r), None) => return self.orphan_released(r, outcome, ctx),
            other => other,
        };
        let mut body = match outcome.and_then(|o| o.into_body(&job)) {
            Some(body) => body,
            None => self.fail(&job),
        };
        if let (Job::Release(r), Body::Released { released, .. }) = (&job, &mut body) {
            *released |= self.release_locally(r);
        }
        if let (Job::Check(c) | Job::CheckGet(c, _), Body::Decision(d) | Body::CheckLookup(d, _)) =
            (&job, &body)
        {
            c.policy.count(d, c.cost);
        }
        self.learn(&job, &body);
        if let Some(reply) = reply {
            self.answer(&job, body, reply, ctx);
        }
    }

    /// Answers a `usage`: a report has no failure mode to fall back on (an
    /// `open` answer would claim nothing used), so without its backend it
    /// is `unavailable`.
    fn report(&mut self, job: &Job, outcome: Option<Outcome>, reply: Option<ReplyTo>) {
        let Some(reply) = reply else { return };
        match outcome.and_then(|o| o.into_body(job)) {
            Some(body) => reply.send(Ok(body)),
            None => reply.send(Err(Error::Unavailable(
                "the backend could not report usage (Redis unreachable or too slow)".into(),
            ))),
        }
    }

    /// The answer when the backend could not give one: the policy's
    /// failure mode for a check, a degraded miss or write otherwise.
    fn fail(&mut self, job: &Job) -> Body {
        Stats::add(&self.stats.counters.degraded, 1);
        match job {
            Job::Check(c) => Body::Decision(self.failure_decision(c)),
            Job::CheckGet(c, _) => {
                let d = self.failure_decision(c);
                let l = d.allowed.then(Lookup::degraded_miss);
                Body::CheckLookup(d, l)
            }
            Job::Get { .. } => Body::Lookup(Lookup::degraded_miss()),
            Job::Set(_) => Body::Stored { degraded: true },
            Job::Del(_) => Body::Deleted {
                deleted: 0,
                degraded: true,
            },
            Job::Release(_) => Body::Released {
                released: false,
                degraded: true,
            },
            Job::Usage(_) => unreachable!("a usage is answered by `report`"),
        }
    }

    /// Beside Redis, a `local` policy's leases may also have been taken by
    /// the fallback limiter while Redis was down: those are given back
    /// there too (always harmless: a lease is in one place or the other).
    fn release_locally(&mut self, r: &Release) -> bool {
        matches!(self.backend, Backend::Redis(_))
            && r.policy.failure_mode == FailureMode::Local
            && self.fallback.release(r)
    }

    /// The decision when Redis cannot decide.
    fn failure_decision(&mut self, check: &Check) -> Decision {
        check.policy.metrics.degraded_decision();
        match check.policy.failure_mode {
            FailureMode::Open | FailureMode::Closed => Decision::failed(&check.policy),
            FailureMode::Local => check.decision(self.fallback.limit(check), true),
        }
    }

    /// Keeps what an answer says about later requests: a Redis denial
    /// (until its retry time), a stored value (for the callers waiting on
    /// its fill); and counts cache writes.
    fn learn(&mut self, job: &Job, body: &Body) {
        let c = &self.stats.counters;
        match (job, body) {
            (Job::Check(check) | Job::CheckGet(check, _), Body::Decision(d))
            | (Job::Check(check) | Job::CheckGet(check, _), Body::CheckLookup(d, _)) => {
                self.overlimit.insert(check, d, Instant::now());
            }
            (Job::Set(s), Body::Stored { degraded: false }) => {
                Stats::add(&c.cache_sets, 1);
                let fresh = Lookup {
                    value: Some(s.value.clone()),
                    ttl_ms: s.ttl_ms,
                    ..Lookup::default()
                };
                self.deliver(&s.tenant, &s.key, &fresh);
            }
            (
                Job::Del(_),
                Body::Deleted {
                    deleted,
                    degraded: false,
                },
            ) => Stats::add(&c.cache_deleted, *deleted),
            _ => {}
        }
    }

    /// Sends the answer; a cache read goes through [`Shard::looked`],
    /// which may hold it for another caller's fill.
    fn answer(&mut self, job: &Job, body: Body, reply: ReplyTo, ctx: &Context<Self, ()>) {
        match (job, body) {
            (Job::Get { args, .. }, Body::Lookup(l)) => self.looked(args, l, None, reply, ctx),
            (Job::CheckGet(_, get), Body::CheckLookup(d, Some(l))) => {
                self.looked(get, l, Some(d), reply, ctx)
            }
            (_, body) => self.reply(reply, body),
        }
    }

    pub(super) fn count_lookup(&self, l: Lookup) -> Lookup {
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
}
