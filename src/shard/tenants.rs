//! The local level of the quota cache: a shard's tenants and their
//! policies.
//!
//! A tenant seen for the first time (or whose entry expired) is looked up
//! once, however many requests arrive meanwhile: they wait here. A fresh
//! entry past 80% of its life is refreshed in the background, so a busy
//! tenant never waits for a lookup. When the source cannot answer, the
//! last known entry turns stale: it keeps being served, without waiting,
//! and is looked up again in the background every [`RETRY_AFTER`].
//! Bounded: past `max` tenants, expired entries go first, then arbitrary
//! ones (a quarter of the room at once, so inserts stay cheap when full).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::quota::PendingCheck;
use crate::config::Policies;
use crate::config::TenantRecord;
use crate::reply::ReplyTo;

/// While the source is down, how often a stale tenant is looked up again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct Entry {
    /// `None`: the source does not know the tenant.
    pub record: Option<TenantRecord>,
    pub policies: Arc<Policies>,
    expires: Instant,
    refresh_at: Instant,
    refreshing: bool,
    /// The source failed to confirm it: served past `expires` until it does.
    stale: bool,
}

/// What a request finds.
pub enum Found {
    /// Fresh, or `stale`; `refresh`: start a background lookup now.
    Ready {
        policies: Arc<Policies>,
        refresh: bool,
        stale: bool,
    },
    /// Missing or expired: wait for a lookup; `lookup`: start it now.
    Wait { lookup: bool },
}

pub struct Tenants {
    entries: HashMap<String, Entry>,
    waiting: HashMap<String, Vec<(PendingCheck, ReplyTo)>>,
    max: usize,
    /// Counts record changes; a lookup notes it when it starts. A lookup
    /// that started before its tenant changed (or all did) may have read
    /// the old record: its result is not kept.
    epoch: u64,
    /// The epoch of the last change of each tenant, while lookups are out.
    changed: HashMap<String, u64>,
    /// The epoch of the last change of every tenant ([`Tenants::clear`]).
    cleared: u64,
    lookups_out: usize,
}

impl Tenants {
    pub fn new(max: usize) -> Self {
        Tenants {
            entries: HashMap::new(),
            waiting: HashMap::new(),
            max: max.max(1),
            epoch: 0,
            changed: HashMap::new(),
            cleared: 0,
            lookups_out: 0,
        }
    }

    /// A lookup starts: its epoch, for [`Tenants::lookup_done`].
    pub fn lookup_started(&mut self) -> u64 {
        self.lookups_out += 1;
        self.epoch
    }

    /// A lookup that started at `epoch` is back: false if its tenant's
    /// record changed since, so that what it read may be stale.
    pub fn lookup_done(&mut self, tenant: &str, epoch: u64) -> bool {
        let current = epoch >= self.cleared && self.changed.get(tenant).is_none_or(|&c| c <= epoch);
        self.lookups_out = self.lookups_out.saturating_sub(1);
        if self.lookups_out == 0 {
            self.changed.clear(); // no lookup left that could predate them
        }
        current
    }

    /// True if requests of `tenant` wait for a lookup, or its entry for
    /// a refresh.
    pub fn awaits_lookup(&self, tenant: &str) -> bool {
        self.waiting.contains_key(tenant) || self.entries.get(tenant).is_some_and(|e| e.refreshing)
    }

    pub fn find(&mut self, tenant: &str, now: Instant) -> Found {
        let mut refreshing = false;
        if let Some(e) = self.entries.get_mut(tenant) {
            if e.expires > now || e.stale {
                let refresh = now >= e.refresh_at && !e.refreshing;
                e.refreshing |= refresh;
                return Found::Ready {
                    policies: e.policies.clone(),
                    refresh,
                    stale: e.stale,
                };
            }
            refreshing = e.refreshing;
        }
        // Expired with its refresh still out: wait for that one.
        Found::Wait {
            lookup: !refreshing && !self.waiting.contains_key(tenant),
        }
    }

    /// Parks a request until its tenant's lookup is done.
    pub fn park(&mut self, tenant: &str, op: PendingCheck, reply: ReplyTo) {
        self.waiting
            .entry(tenant.to_owned())
            .or_default()
            .push((op, reply));
    }

    /// Stores a looked-up entry; returns the requests that waited for it.
    pub fn fill(
        &mut self,
        tenant: &str,
        record: Option<TenantRecord>,
        policies: Arc<Policies>,
        ttl: Duration,
        now: Instant,
    ) -> Vec<(PendingCheck, ReplyTo)> {
        if self.entries.len() >= self.max && !self.entries.contains_key(tenant) {
            self.make_room(now);
        }
        self.entries.insert(
            tenant.to_owned(),
            Entry {
                record,
                policies,
                expires: now + ttl,
                refresh_at: now + ttl.mul_f64(0.8),
                refreshing: false,
                stale: false,
            },
        );
        self.waiting.remove(tenant).unwrap_or_default()
    }

    /// Drops expired entries, then arbitrary ones, down to three quarters
    /// of `max`, so that the next scan is far away. Stale entries (all
    /// there is of a tenant while the source is down) go last.
    fn make_room(&mut self, now: Instant) {
        self.entries.retain(|_, e| e.expires > now || e.stale);
        let excess = self.entries.len().saturating_sub(self.max * 3 / 4);
        let (stale, fresh): (Vec<_>, Vec<_>) = self.entries.iter().partition(|(_, e)| e.stale);
        let victims: Vec<String> = (fresh.into_iter().chain(stale))
            .take(excess)
            .map(|(k, _)| k.clone())
            .collect();
        for v in victims {
            self.entries.remove(&v);
        }
    }

    /// The lookup failed: keep serving the last known entry, stale, and
    /// look it up again in a while. Returns its policies (if there was
    /// one) and the waiting requests.
    pub fn keep_stale(
        &mut self,
        tenant: &str,
        now: Instant,
    ) -> (Option<Arc<Policies>>, Vec<(PendingCheck, ReplyTo)>) {
        let stale = self.entries.get_mut(tenant).map(|e| {
            e.stale = true;
            e.refresh_at = now + RETRY_AFTER;
            e.refreshing = false;
            e.policies.clone()
        });
        (stale, self.waiting.remove(tenant).unwrap_or_default())
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.epoch += 1;
        self.cleared = self.epoch;
    }

    /// Drops a tenant's entry: the next request looks it up again.
    pub fn forget(&mut self, tenant: &str) {
        self.entries.remove(tenant);
        if self.lookups_out > 0 {
            self.epoch += 1;
            self.changed.insert(tenant.to_owned(), self.epoch);
        }
    }

    /// Recompiles every entry's policies (after a reload).
    pub fn recompile(
        &mut self,
        mut compile: impl FnMut(&str, Option<&TenantRecord>) -> Arc<Policies>,
    ) {
        for (tenant, e) in self.entries.iter_mut() {
            e.policies = compile(tenant, e.record.as_ref());
        }
    }

    /// Every waiting request (at shutdown).
    pub fn drain_waiting(&mut self) -> impl Iterator<Item = (PendingCheck, ReplyTo)> + '_ {
        self.waiting.drain().flat_map(|(_, w)| w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NameMap;

    fn policies() -> Arc<Policies> {
        Arc::new(Policies::new("default", "default", NameMap::default()))
    }

    #[test]
    fn a_lookup_is_kept_unless_its_own_tenant_changed_after_it_started() {
        let mut t = Tenants::new(8);
        t.forget("a"); // before any lookup: nothing to invalidate
        let a = t.lookup_started();
        let b = t.lookup_started();
        t.forget("b");
        let c = t.lookup_started();
        assert!(t.lookup_done("a", a), "another tenant's change");
        assert!(!t.lookup_done("b", b), "started before b changed");
        assert!(t.lookup_done("b", c), "started after b changed");
        assert!(t.changed.is_empty(), "nothing left to remember");
        let d = t.lookup_started();
        t.clear();
        assert!(!t.lookup_done("d", d), "started before everything changed");
    }

    #[test]
    fn stays_bounded_and_keeps_stale_entries_over_expired_ones() {
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        let mut t = Tenants::new(8);
        t.fill("old", None, policies(), Duration::ZERO, now);
        t.keep_stale("old", now); // the source is down: all we have
        t.fill("expired", None, policies(), Duration::ZERO, now);
        for i in 0..100 {
            t.fill(&i.to_string(), None, policies(), ttl, now);
            assert!(t.entries.len() <= 8);
        }
        assert!(t.entries.contains_key("old"));
        assert!(!t.entries.contains_key("expired"));
        assert!(t.entries.contains_key("99"), "the newest is in");
    }
}
