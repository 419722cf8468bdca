//! Leases nobody knows about: a leased check whose Redis round trip missed
//! its deadline (or lost its connection) may still have run its script and
//! taken the lease, but the caller got a failure-mode answer without it,
//! and an old client would not release it anyway. Left alone, its slot
//! stays taken for up to `lease_ms` (up to a day).
//!
//! So the shard keeps each such lease in a bounded queue and releases it
//! itself, in the background, once Redis answers again: every
//! [`RETRY_EVERY`] while the queue is not empty, skipped while the breaker
//! is open. A release that fails again goes back in the queue. Releasing a
//! lease that was never taken is harmless, so when in doubt quotad releases.
//! A full queue drops its oldest lease: that one frees at its `lease_ms`.

use std::collections::VecDeque;
use std::time::Duration;

use kameo::message::{Context, Message};

use super::Shard;
use crate::backend::{Backend, Job, Outcome};
use crate::limiter::{Check, Release};

/// Leases one shard keeps for release at most; beyond, the oldest goes.
pub const MAX_ORPHANS: usize = 4096;

/// How often a shard tries to release its queued leases.
pub const RETRY_EVERY: Duration = Duration::from_millis(100);

/// Time to try the queued releases again.
pub struct RetryOrphans;

#[derive(Default)]
pub(super) struct Orphans {
    queue: VecDeque<Release>,
    /// A [`RetryOrphans`] is on its way.
    scheduled: bool,
}

impl Orphans {
    fn push(&mut self, r: Release) {
        if self.queue.len() == MAX_ORPHANS {
            self.queue.pop_front();
        }
        self.queue.push_back(r);
    }
}

impl Message<RetryOrphans> for Shard {
    type Reply = ();

    async fn handle(&mut self, _: RetryOrphans, ctx: &mut Context<Self, ()>) {
        self.orphans.scheduled = false;
        if let Backend::Redis(redis) = &self.backend
            && !redis.is_down()
        {
            let releases: Vec<Release> = self.orphans.queue.drain(..).collect();
            for r in releases {
                // No reply: `finish` hands an unanswered release back here.
                self.submit(Job::Release(r), None, ctx);
            }
        }
        self.schedule_orphans(ctx);
    }
}

impl Shard {
    /// A check Redis may have run without telling: its lease goes in the
    /// queue (only Redis has round trips whose outcome can be unknown).
    pub(super) fn orphan(&mut self, c: &Check, ctx: &Context<Self, ()>) {
        let Some(lease) = c.lease else { return };
        if !matches!(self.backend, Backend::Redis(_)) {
            return;
        }
        self.orphans.push(Release {
            policy: c.policy.clone(),
            tenant: c.tenant.clone(),
            key: c.key.clone(),
            lease,
        });
        self.schedule_orphans(ctx);
    }

    /// The outcome of one of the shard's own releases: done, or (no
    /// outcome) back in the queue. The `local` fallback's leases are not
    /// touched: a degraded `local` answer's lease is its caller's.
    pub(super) fn orphan_released(
        &mut self,
        r: Release,
        outcome: Option<Outcome>,
        ctx: &Context<Self, ()>,
    ) {
        if outcome.is_none() {
            self.orphans.push(r);
            self.schedule_orphans(ctx);
        }
    }

    fn schedule_orphans(&mut self, ctx: &Context<Self, ()>) {
        if self.orphans.scheduled || self.orphans.queue.is_empty() {
            return;
        }
        self.orphans.scheduled = true;
        ctx.pipe(async move {
            tokio::time::sleep(RETRY_EVERY).await;
            RetryOrphans
        });
    }
}
