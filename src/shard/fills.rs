//! Callers waiting on a cache fill (single-flight).
//!
//! When a cache read misses and another caller is already filling the
//! entry, this caller waits here, keyed by (tenant, key), until the value
//! arrives (a `cache_set` through this shard, or a poll of Redis that finds
//! it, when the filler uses another quotad) or its own deadline passes.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::limiter::Decision;
use crate::reply::ReplyTo;

pub struct FillWaiter {
    pub reply: ReplyTo,
    pub deadline: Instant,
    /// For a `check_get`: its (allowing) decision, to answer with.
    pub decision: Option<Decision>,
}

#[derive(Default)]
pub struct Fills {
    waiting: HashMap<(String, String), Vec<FillWaiter>>,
}

impl Fills {
    pub fn park(&mut self, tenant: &str, key: &str, waiter: FillWaiter) {
        self.waiting
            .entry((tenant.to_owned(), key.to_owned()))
            .or_default()
            .push(waiter);
    }

    /// The waiters of an entry whose value just arrived.
    pub fn take(&mut self, tenant: &str, key: &str) -> Vec<FillWaiter> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        self.waiting
            .remove(&(tenant.to_owned(), key.to_owned()))
            .unwrap_or_default()
    }

    /// Removes and returns the waiters whose deadline has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<FillWaiter> {
        let mut out = Vec::new();
        self.waiting.retain(|_, ws| {
            let (gone, kept): (Vec<_>, Vec<_>) = ws.drain(..).partition(|w| w.deadline <= now);
            out.extend(gone);
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
        self.waiting.drain().flat_map(|(_, ws)| ws)
    }
}
