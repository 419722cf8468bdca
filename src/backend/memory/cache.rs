//! The embedded response cache: `lua/cache.lua`'s semantics in process,
//! bounded. Entries and tags are named as in Redis ([`Keys::entry`],
//! [`Keys::tag`]); the fill and refresh locks are kept by entry name.
//!
//! Each shard owns one (its tenants' entries), so it needs no lock. It is
//! bounded by bytes (keys and values): past the bound, expired entries are
//! swept, then arbitrary entries are evicted. The tag index is exact: an
//! entry leaves its tags' sets when it is replaced, deleted or evicted.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use crate::keys::Keys;
use crate::protocol::{CacheDelArgs, CacheGetArgs, CacheSetArgs, Lookup};

const SWEEP_EVERY_MS: u64 = 1000;

#[derive(Debug)]
pub struct MemoryCache {
    keys: Keys,
    /// Entry name -> entry.
    entries: HashMap<String, Entry>,
    /// Tag name -> names of the entries carrying it.
    tags: HashMap<String, HashSet<String>>,
    /// Fill and refresh locks: entry name -> held until (ms).
    fills: HashMap<String, u64>,
    refreshes: HashMap<String, u64>,
    bytes: usize,
    max_bytes: usize,
    next_sweep_ms: u64,
}

#[derive(Debug)]
struct Entry {
    value: Bytes,
    fresh_until: u64,
    expires: u64,
    /// Tag names.
    tags: Vec<String>,
}

/// Takes a lock unless it is held; true if taken.
fn lock(locks: &mut HashMap<String, u64>, id: String, until: u64, now: u64) -> bool {
    match locks.get(&id) {
        Some(&held) if held > now => false,
        _ => {
            locks.insert(id, until);
            true
        }
    }
}

impl MemoryCache {
    pub fn new(keys: Keys, max_bytes: usize) -> Self {
        MemoryCache {
            keys,
            entries: HashMap::new(),
            tags: HashMap::new(),
            fills: HashMap::new(),
            refreshes: HashMap::new(),
            bytes: 0,
            max_bytes,
            next_sweep_ms: 0,
        }
    }

    /// Reads an entry. A `poll` takes no lock; its miss has `fill` set when
    /// nobody holds the fill lock (see [`crate::backend::job::Job`]).
    pub fn get(&mut self, g: &CacheGetArgs, poll: bool, now: u64) -> Lookup {
        self.maybe_sweep(now);
        let id = self.keys.entry(&g.tenant, &g.key);
        match self.entries.get(&id) {
            Some(e) if e.expires > now => {
                let value = Some(e.value.clone());
                if now < e.fresh_until {
                    return Lookup {
                        value,
                        ttl_ms: e.fresh_until - now,
                        ..Lookup::default()
                    };
                }
                let expires = e.expires;
                Lookup {
                    value,
                    stale: true,
                    refresh: !poll && lock(&mut self.refreshes, id, expires, now),
                    ..Lookup::default()
                }
            }
            found => {
                if found.is_some() {
                    self.remove(&id);
                }
                let fill = if poll {
                    self.fills.get(&id).is_none_or(|&until| until <= now)
                } else {
                    g.fill_ms > 0 && lock(&mut self.fills, id, now + g.fill_ms, now)
                };
                Lookup {
                    fill,
                    ..Lookup::default()
                }
            }
        }
    }

    pub fn set(&mut self, s: &CacheSetArgs, now: u64) {
        let id = self.keys.entry(&s.tenant, &s.key);
        self.remove(&id);
        self.fills.remove(&id);
        self.refreshes.remove(&id);
        let tags: Vec<String> = s.tags.iter().map(|t| self.keys.tag(&s.tenant, t)).collect();
        for tag in &tags {
            self.tags.entry(tag.clone()).or_default().insert(id.clone());
        }
        self.bytes += id.len() + s.value.len();
        self.entries.insert(
            id,
            Entry {
                value: s.value.clone(),
                fresh_until: now + s.ttl_ms,
                expires: now + s.ttl_ms + s.stale_ms,
                tags,
            },
        );
        if self.bytes > self.max_bytes {
            // At most once a second: a full cache must not rescan per set.
            self.maybe_sweep(now);
            while self.bytes > self.max_bytes {
                let Some(victim) = self.entries.keys().next().cloned() else {
                    break;
                };
                self.remove(&victim);
            }
        }
    }

    /// Deletes entries by key and by tag; returns how many live ones went.
    /// `fill_only`: drops the keys' fill locks instead; returns how many.
    pub fn del(&mut self, d: &CacheDelArgs, now: u64) -> u64 {
        if d.fill_only {
            let held = |until: Option<u64>| until.is_some_and(|u| u > now);
            return d
                .keys
                .iter()
                .map(|k| u64::from(held(self.fills.remove(&self.keys.entry(&d.tenant, k)))))
                .sum();
        }
        let mut deleted = 0;
        let mut ids: Vec<String> = d
            .keys
            .iter()
            .map(|k| self.keys.entry(&d.tenant, k))
            .collect();
        for tag in &d.tags {
            let tag = self.keys.tag(&d.tenant, tag);
            ids.extend(self.tags.remove(&tag).into_iter().flatten());
        }
        for id in ids {
            self.fills.remove(&id);
            self.refreshes.remove(&id);
            if let Some(e) = self.remove(&id) {
                deleted += u64::from(e.expires > now);
            }
        }
        deleted
    }

    /// Bytes held (keys and values).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        self.bytes -= id.len() + e.value.len();
        for tag in &e.tags {
            if let Some(set) = self.tags.get_mut(tag) {
                set.remove(id);
                if set.is_empty() {
                    self.tags.remove(tag);
                }
            }
        }
        Some(e)
    }

    fn maybe_sweep(&mut self, now: u64) {
        if now >= self.next_sweep_ms {
            self.sweep(now);
        }
    }

    /// Drops expired entries and locks.
    fn sweep(&mut self, now: u64) {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.remove(&id);
        }
        self.fills.retain(|_, until| *until > now);
        self.refreshes.retain(|_, until| *until > now);
        self.next_sweep_ms = now + SWEEP_EVERY_MS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(key: &str, fill_ms: u64) -> CacheGetArgs {
        CacheGetArgs {
            tenant: "t".into(),
            key: key.into(),
            fill_ms,
        }
    }

    fn set(key: &str, ttl_ms: u64, stale_ms: u64, tags: &[&str]) -> CacheSetArgs {
        CacheSetArgs {
            tenant: "t".into(),
            key: key.into(),
            value: Bytes::from_static(b"v"),
            ttl_ms,
            stale_ms,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn fresh_then_stale_with_one_refresher_then_gone() {
        let mut c = MemoryCache::new(Keys::new("qd"), 1 << 20);
        c.set(&set("k", 100, 50, &[]), 1000);
        let l = c.get(&get("k", 0), false, 1040);
        assert_eq!((l.ttl_ms, l.stale), (60, false));
        let first = c.get(&get("k", 0), false, 1120);
        let second = c.get(&get("k", 0), false, 1121);
        assert!(first.stale && first.refresh && second.stale && !second.refresh);
        assert!(c.get(&get("k", 0), false, 1150).value.is_none());
    }

    #[test]
    fn one_filler_per_fill_window() {
        let mut c = MemoryCache::new(Keys::new("qd"), 1 << 20);
        assert!(c.get(&get("k", 100), false, 0).fill);
        assert!(!c.get(&get("k", 100), false, 50).fill);
        assert!(
            c.get(&get("k", 100), false, 100).fill,
            "the lock lapses with the window"
        );
    }

    #[test]
    fn no_two_tenant_and_key_pairs_share_an_entry() {
        let mut c = MemoryCache::new(Keys::new("qd"), 1 << 20);
        let mut s = set("b\0c", 1000, 0, &["x"]);
        s.tenant = "a".into();
        c.set(&s, 0);
        let g = CacheGetArgs {
            tenant: "a\0b".into(),
            key: "c".into(),
            fill_ms: 0,
        };
        assert!(c.get(&g, false, 1).value.is_none());
    }

    #[test]
    fn a_poll_tells_whether_anyone_still_fills() {
        let mut c = MemoryCache::new(Keys::new("qd"), 1 << 20);
        assert!(c.get(&get("k", 100), false, 0).fill);
        assert!(!c.get(&get("k", 0), true, 10).fill, "the filler holds it");
        let release = CacheDelArgs {
            tenant: "t".into(),
            keys: vec!["k".into()],
            tags: vec![],
            fill_only: true,
        };
        assert_eq!(c.del(&release, 20), 1);
        assert!(c.get(&get("k", 0), true, 30).fill, "released: nobody fills");
        assert!(c.get(&get("k", 100), false, 40).fill, "a poll took no lock");
        // A release never deletes a value someone stored meanwhile.
        c.set(&set("k", 1000, 0, &[]), 50);
        assert_eq!(c.del(&release, 60), 0);
        assert!(c.get(&get("k", 0), false, 70).value.is_some());
    }

    #[test]
    fn tags_index_exactly_the_entries_that_carry_them() {
        let mut c = MemoryCache::new(Keys::new("qd"), 1 << 20);
        c.set(&set("a", 1000, 0, &["x"]), 0);
        c.set(&set("b", 1000, 0, &["x", "y"]), 0);
        c.set(&set("a", 1000, 0, &["y"]), 0); // `a` no longer carries x
        let del = CacheDelArgs {
            tenant: "t".into(),
            keys: vec![],
            tags: vec!["x".into()],
            fill_only: false,
        };
        assert_eq!(c.del(&del, 1), 1);
        assert!(c.get(&get("a", 0), false, 1).value.is_some());
        assert!(c.get(&get("b", 0), false, 1).value.is_none());
        assert_eq!(c.tags.len(), 1, "tag x is gone, y remains for a");
    }

    #[test]
    fn stays_within_its_byte_bound() {
        let mut c = MemoryCache::new(Keys::new("qd"), 10_000);
        for i in 0..1000 {
            c.set(&set(&format!("k{i}"), 1000, 0, &["tag"]), 0);
        }
        assert!(c.bytes() <= 10_000);
        assert_eq!(
            c.tags.values().map(HashSet::len).sum::<usize>(),
            c.entries.len()
        );
    }
}
