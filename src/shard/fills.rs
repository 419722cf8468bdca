//! Callers waiting on a cache fill (single-flight).
//!
//! When a cache read misses and another caller is already filling the
//! entry, this caller waits here, keyed by (tenant, key), until the value
//! arrives (a `cache_set` through this shard, or a poll of Redis that finds
//! it, when the filler uses another quotad), until a poll finds that nobody
//! holds the fill lock any more (the filler gave up and deleted the entry,
//! or its lock lapsed), or until its own deadline passes.

use std::collections::HashMap;
use std::time::Duration;

use kameo::message::{Context, Message};
use tokio::time::Instant;

use super::Shard;
use crate::backend::{Job, Outcome};
use crate::limiter::Decision;
use crate::protocol::{Body, CacheGetArgs, Lookup};
use crate::reply::ReplyTo;
use crate::stats::Stats;

/// Time to look again for the values that callers wait on.
pub struct PollFills;

/// Shutdown began: answer every caller waiting on a fill with a miss.
pub struct ReleaseWaiters;

pub struct FillWaiter {
    pub reply: ReplyTo,
    pub deadline: Instant,
    /// For a `check_get`: its (allowing) decision, to answer with.
    pub decision: Option<Decision>,
}

/// Callers waiting on fills, by (tenant, key), each numbered in the order
/// it was parked.
#[derive(Default)]
pub struct Fills {
    waiting: HashMap<(String, String), Vec<(u64, FillWaiter)>>,
    /// How many callers were ever parked: the next one's number.
    parked: u64,
    /// `parked` when the polls now out were sent.
    polled_at: u64,
}

impl Fills {
    pub fn park(&mut self, tenant: &str, key: &str, waiter: FillWaiter) {
        self.waiting
            .entry((tenant.to_owned(), key.to_owned()))
            .or_default()
            .push((self.parked, waiter));
        self.parked += 1;
    }

    /// The waiters of an entry whose value just arrived.
    pub fn take(&mut self, tenant: &str, key: &str) -> Vec<FillWaiter> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let ws = self.waiting.remove(&(tenant.to_owned(), key.to_owned()));
        ws.into_iter().flatten().map(|(_, w)| w).collect()
    }

    /// Polls go out now.
    pub fn polling(&mut self) {
        self.polled_at = self.parked;
    }

    /// The waiters of an entry that a poll found nobody filling, among
    /// those parked before the poll went out: a caller parked since may
    /// wait for a new filler that the poll did not see.
    pub fn take_abandoned(&mut self, tenant: &str, key: &str) -> Vec<FillWaiter> {
        let polled_at = self.polled_at;
        let id = (tenant.to_owned(), key.to_owned());
        let Some(ws) = self.waiting.get_mut(&id) else {
            return Vec::new();
        };
        let (gone, kept): (Vec<_>, Vec<_>) = ws.drain(..).partition(|(n, _)| *n < polled_at);
        *ws = kept;
        if ws.is_empty() {
            self.waiting.remove(&id);
        }
        gone.into_iter().map(|(_, w)| w).collect()
    }

    /// Removes and returns the waiters whose deadline has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<FillWaiter> {
        let mut out = Vec::new();
        self.waiting.retain(|_, ws| {
            let (gone, kept): (Vec<_>, Vec<_>) = ws.drain(..).partition(|(_, w)| w.deadline <= now);
            out.extend(gone.into_iter().map(|(_, w)| w));
            *ws = kept;
            !ws.is_empty()
        });
        out
    }

    /// The entries someone waits on.
    pub fn keys(&self) -> impl Iterator<Item = &(String, String)> {
        self.waiting.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Every waiter (at shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = FillWaiter> + '_ {
        self.waiting
            .drain()
            .flat_map(|(_, ws)| ws.into_iter().map(|(_, w)| w))
    }
}

impl Message<PollFills> for Shard {
    type Reply = ();

    async fn handle(&mut self, _: PollFills, ctx: &mut Context<Self, ()>) {
        self.polling = false;
        for w in self.fills.expire(Instant::now()) {
            Stats::add(&self.stats.counters.cache_fill_timeouts, 1);
            self.release(w);
        }
        // One round of polls at a time: a slow Redis must not pile them up.
        if self.polls_out > 0 {
            return self.schedule_poll(ctx);
        }
        let polls: Vec<CacheGetArgs> = self
            .fills
            .keys()
            .map(|(tenant, key)| CacheGetArgs {
                tenant: tenant.clone(),
                key: key.clone(),
                fill_ms: 0,
            })
            .collect();
        if !polls.is_empty() {
            self.fills.polling();
        }
        for args in polls {
            self.polls_out += 1;
            self.submit(Job::Get { args, poll: true }, None, ctx);
        }
        self.schedule_poll(ctx);
    }
}

impl Message<ReleaseWaiters> for Shard {
    type Reply = ();

    async fn handle(&mut self, _: ReleaseWaiters, _: &mut Context<Self, ()>) {
        let waiters: Vec<FillWaiter> = self.fills.drain().collect();
        for w in waiters {
            self.release(w);
        }
    }
}

impl Shard {
    /// A cache read came back. A miss that another caller is filling makes
    /// this caller wait for the value; anything else is answered now.
    pub(super) fn looked(
        &mut self,
        args: &CacheGetArgs,
        l: Lookup,
        decision: Option<Decision>,
        reply: ReplyTo,
        ctx: &Context<Self, ()>,
    ) {
        if l.value.is_none() && !l.fill && !l.degraded && args.fill_ms > 0 {
            Stats::add(&self.stats.counters.cache_fill_waits, 1);
            let deadline = Instant::now() + Duration::from_millis(args.fill_ms);
            self.fills.park(
                &args.tenant,
                &args.key,
                FillWaiter {
                    reply,
                    deadline,
                    decision,
                },
            );
            return self.schedule_poll(ctx);
        }
        let l = self.count_lookup(l);
        let body = match decision {
            Some(d) => Body::CheckLookup(d, Some(l)),
            None => Body::Lookup(l),
        };
        self.reply(reply, body);
    }

    /// A poll came back: callers waiting on a value that arrived get it;
    /// callers of an entry nobody fills any more stop waiting.
    pub(super) fn polled(&mut self, args: &CacheGetArgs, outcome: Option<Outcome>) {
        self.polls_out = self.polls_out.saturating_sub(1);
        match outcome {
            Some(Outcome::Looked(l)) if l.value.is_some() => {
                self.deliver(&args.tenant, &args.key, &l)
            }
            Some(Outcome::Looked(l)) if l.fill => self.abandon(&args.tenant, &args.key),
            _ => {}
        }
    }

    /// Lets a caller stop waiting on a fill: a plain miss, compute it yourself.
    pub(super) fn release(&self, w: FillWaiter) {
        let lookup = self.count_lookup(Lookup::default());
        let body = match w.decision {
            Some(d) => Body::CheckLookup(d, Some(lookup)),
            None => Body::Lookup(lookup),
        };
        self.reply(w.reply, body);
    }

    /// Answers everyone waiting for this entry with its value.
    pub(super) fn deliver(&mut self, tenant: &str, key: &str, l: &Lookup) {
        for w in self.fills.take(tenant, key) {
            let l = self.count_lookup(l.clone());
            let body = match w.decision {
                Some(d) => Body::CheckLookup(d, Some(l)),
                None => Body::Lookup(l),
            };
            self.reply(w.reply, body);
        }
    }

    /// Nobody fills this entry any more: its callers stop waiting.
    pub(super) fn abandon(&mut self, tenant: &str, key: &str) {
        for w in self.fills.take_abandoned(tenant, key) {
            Stats::add(&self.stats.counters.cache_fill_abandoned, 1);
            self.release(w);
        }
    }

    fn schedule_poll(&mut self, ctx: &Context<Self, ()>) {
        if self.polling || self.fills.is_empty() {
            return;
        }
        self.polling = true;
        let every = self.fill_poll;
        ctx.pipe(async move {
            tokio::time::sleep(every).await;
            PollFills
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(id: u64, tx: &crate::reply::Replies) -> FillWaiter {
        FillWaiter {
            reply: ReplyTo::new(id, tx.clone()),
            deadline: Instant::now() + Duration::from_secs(10),
            decision: None,
        }
    }

    #[test]
    fn a_poll_lets_go_only_of_callers_parked_before_it_went_out() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut f = Fills::default();
        f.park("t", "k", waiter(1, &tx));
        f.polling();
        f.park("t", "k", waiter(2, &tx)); // behind a filler the poll did not see
        let gone = f.take_abandoned("t", "k");
        assert_eq!(gone.len(), 1);
        drop(gone); // a dropped waiter answers by itself, with its id
        assert_eq!(rx.try_recv().unwrap().id, 1);
        assert!(rx.try_recv().is_err(), "caller 2 still waits");
        assert_eq!(f.take("t", "k").len(), 1);
    }
}
