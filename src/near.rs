//! The near cache: fresh response-cache entries kept in this process, so a
//! repeated `cache_get` of a hot entry is answered by the connection task
//! itself, with no shard hop and no Redis round trip.
//!
//! It is kept exact by Redis, not by guessing: the Redis backend's tracking
//! connection (`backend::redis::tracking`) hears of every change to any
//! entry, from any client (a write, a delete, expiry, eviction, a flush),
//! and removes the entry here. What it cannot know it does not serve:
//!
//! - A value only ever enters from a plain read that found it fresh, and
//!   stays until its fresh time (PTTL minus `stale_ms`, counted from when
//!   the read was *sent*) ends; stale entries, misses and locks stay
//!   Redis's (the script's) business.
//! - The race between a read and an invalidation: a read takes a
//!   [`Ticket`] before it is sent (the state and the invalidation sequence
//!   of the entry's slot); its reply goes in only if no invalidation of
//!   that slot and no flush happened since. An invalidation that passes
//!   the reply on the way is therefore never lost.
//! - While the tracking connection is down, nothing is served or kept: the
//!   cache is flushed when it is lost, and the state number moves on, so a
//!   reply to a read sent before the loss is dropped too.
//!
//! Shared by every connection task and shard, so it is sharded behind
//! short `std` mutexes (a lookup is a hash, a compare and a `Bytes` clone);
//! bounded by bytes (key + value + [`OVERHEAD`] per entry), evicting by
//! CLOCK (second chance) within each shard.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;

use crate::stats::Stats;

/// Whether the tracking connection has applied every message Redis sent
/// it so far (see `backend::redis::heard`). A near hit is served only then,
/// so a request that follows a change's answer to another quotad never
/// sees the old value here.
pub trait CaughtUp: Send + Sync {
    fn caught_up(&self) -> bool;
}

/// Shards (independent locks and byte budgets).
const SHARDS: usize = 16;
/// Invalidation sequences: slots of hashed entry names, each in one shard.
const SLOTS: usize = 4096;
/// Bytes counted per entry beside its name and value: the map entry, the
/// slot, the `Arc<str>` and `Bytes` headers, the allocator's rounding.
pub const OVERHEAD: usize = 128;
/// A value larger than its shard's budget divided by this is not kept:
/// one value must not evict a whole shard.
const LARGEST_SHARE: usize = 8;

pub struct NearCache {
    shards: Box<[Mutex<Shard>]>,
    seqs: Box<[AtomicU64]>,
    /// `2 × epoch + up`: odd while the tracking connection listens. Every
    /// loss and every (re)start of tracking moves the epoch on.
    state: AtomicU64,
    shard_budget: usize,
    largest: usize,
    stats: Arc<Stats>,
    hasher: BuildHasherDefault<DefaultHasher>,
    /// The current tracking connection's [`CaughtUp`], while it is up.
    heard: ArcSwapOption<Box<dyn CaughtUp>>,
}

/// Taken before a read is sent; see [`NearCache::insert`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    state: u64,
    slot: usize,
    seq: u64,
    sent: Instant,
}

#[derive(Default)]
struct Shard {
    index: HashMap<Arc<str>, usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    hand: usize,
    bytes: usize,
}

struct Slot {
    name: Arc<str>,
    value: Bytes,
    fresh_until: Instant,
    /// CLOCK's reference bit: read since the hand last passed.
    used: bool,
}

impl Slot {
    fn bytes(&self) -> usize {
        self.name.len() + self.value.len() + OVERHEAD
    }
}

impl NearCache {
    /// An empty cache of at most `max_bytes`, not serving until
    /// [`NearCache::tracking_up`].
    pub fn new(max_bytes: usize, stats: Arc<Stats>) -> Self {
        let shard_budget = max_bytes / SHARDS;
        NearCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            seqs: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            state: AtomicU64::new(0),
            shard_budget,
            largest: shard_budget / LARGEST_SHARE,
            stats,
            hasher: BuildHasherDefault::default(),
            heard: ArcSwapOption::empty(),
        }
    }

    /// The fresh value of the entry named `name` and its remaining fresh
    /// time in ms, if held. Counts a near hit or miss.
    pub fn get(&self, name: &str) -> Option<(Bytes, u64)> {
        let c = &self.stats.counters;
        let slot = self.slot(name);
        // Not held: a miss, without asking the kernel (below) first.
        if !self.shard(slot).index.contains_key(name) {
            Stats::add(&c.near_misses, 1);
            return None;
        }
        // Then caught up, then the lookup proper, in that order: an
        // invalidation applied after the check is seen by the lookup.
        let heard = self.heard.load();
        if self.state.load(SeqCst) & 1 == 0 || heard.as_ref().is_some_and(|h| !h.caught_up()) {
            Stats::add(&c.near_misses, 1);
            return None;
        }
        let mut shard = self.shard(slot);
        let found = shard.index.get(name).copied();
        let answer = found.and_then(|i| {
            let s = shard.slots[i].as_mut().expect("indexed slot is live");
            let left = s.fresh_until.saturating_duration_since(Instant::now());
            let ms = left.as_millis() as u64;
            (ms > 0).then(|| {
                s.used = true;
                (s.value.clone(), ms)
            })
        });
        if answer.is_none() && found.is_some() {
            // Its fresh time is over: Redis decides from here (stale or gone).
            self.remove(&mut shard, name);
        }
        drop(shard);
        Stats::add(
            if answer.is_some() {
                &c.near_hits
            } else {
                &c.near_misses
            },
            1,
        );
        answer
    }

    /// Before sending a read of `name`: `None` while tracking is down
    /// (nothing may be kept from that read).
    pub fn ticket(&self, name: &str) -> Option<Ticket> {
        let state = self.state.load(SeqCst);
        if state & 1 == 0 {
            return None;
        }
        let slot = self.slot(name);
        Some(Ticket {
            state,
            slot,
            seq: self.seqs[slot].load(SeqCst),
            sent: Instant::now(),
        })
    }

    /// Keeps what a read taken with `ticket` found: `value`, fresh for
    /// `fresh_ms` after the read was sent. Dropped if an invalidation of
    /// its slot or a flush came in between, or if it is too large.
    pub fn insert(&self, ticket: Ticket, name: &str, value: Bytes, fresh_ms: u64) {
        let need = name.len() + value.len() + OVERHEAD;
        if fresh_ms == 0 || need > self.largest {
            return;
        }
        let mut shard = self.shard(ticket.slot);
        // Checked under the shard's lock, which invalidations and flushes
        // of this slot also take.
        if self.state.load(SeqCst) != ticket.state
            || self.seqs[ticket.slot].load(SeqCst) != ticket.seq
        {
            return;
        }
        self.remove(&mut shard, name);
        while shard.bytes + need > self.shard_budget && self.evict_one(&mut shard) {}
        let name: Arc<str> = name.into();
        let entry = Slot {
            name: name.clone(),
            value,
            fresh_until: ticket.sent + Duration::from_millis(fresh_ms),
            used: false,
        };
        let i = match shard.free.pop() {
            Some(i) => {
                shard.slots[i] = Some(entry);
                i
            }
            None => {
                shard.slots.push(Some(entry));
                shard.slots.len() - 1
            }
        };
        shard.index.insert(name, i);
        shard.bytes += need;
        let c = &self.stats.counters;
        Stats::add(&c.near_bytes, need as u64);
        Stats::add(&c.near_entries, 1);
    }

    /// Redis says the entry named `name` changed: drop it, and any reply
    /// of a read of its slot still under way.
    pub fn invalidate(&self, name: &[u8]) {
        let Ok(name) = std::str::from_utf8(name) else {
            return; // quotad names entries in UTF-8 only
        };
        let slot = self.slot(name);
        let mut shard = self.shard(slot);
        self.seqs[slot].fetch_add(1, SeqCst);
        self.remove(&mut shard, name);
        Stats::add(&self.stats.counters.near_invalidations, 1);
    }

    /// Tracking listens (again): entries may be kept from reads sent from
    /// now on, and served while `heard` says it is caught up (`None`: a
    /// connection that cannot tell, served without that check).
    pub fn tracking_up(&self, heard: Option<Box<dyn CaughtUp>>) {
        self.heard.store(heard.map(Arc::new));
        self.set_state(true);
    }

    /// Tracking was lost: drop everything, keep nothing until it is back.
    pub fn tracking_down(&self) {
        if self.state.load(SeqCst) & 1 == 1 {
            self.set_state(false);
            self.clear();
        }
    }

    /// Drop everything (Redis was flushed, or a sync with the tracking
    /// connection failed), tracking staying as it is.
    pub fn flush(&self) {
        let up = self.state.load(SeqCst) & 1 == 1;
        self.set_state(up);
        self.clear();
    }

    /// Moves the epoch on, to `up` or down.
    fn set_state(&self, up: bool) {
        let _ = self
            .state
            .fetch_update(SeqCst, SeqCst, |s| Some(((s >> 1) + 1) << 1 | up as u64));
    }

    /// True while tracking listens.
    pub fn is_up(&self) -> bool {
        self.state.load(SeqCst) & 1 == 1
    }

    fn clear(&self) {
        let c = &self.stats.counters;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            c.near_bytes.fetch_sub(shard.bytes as u64, Relaxed);
            c.near_entries.fetch_sub(shard.index.len() as u64, Relaxed);
            *shard = Shard::default();
        }
        Stats::add(&c.near_flushes, 1);
    }

    fn slot(&self, name: &str) -> usize {
        (self.hasher.hash_one(name) % SLOTS as u64) as usize
    }

    fn shard(&self, slot: usize) -> MutexGuard<'_, Shard> {
        // A panic under the lock leaves a consistent map (no await inside).
        self.shards[slot % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, shard: &mut Shard, name: &str) {
        if let Some(i) = shard.index.remove(name) {
            self.free_slot(shard, i);
        }
    }

    fn free_slot(&self, shard: &mut Shard, i: usize) {
        if let Some(s) = shard.slots[i].take() {
            let n = s.bytes();
            shard.bytes -= n;
            shard.free.push(i);
            let c = &self.stats.counters;
            c.near_bytes.fetch_sub(n as u64, Relaxed);
            c.near_entries.fetch_sub(1, Relaxed);
        }
    }

    /// CLOCK: the hand clears reference bits until it finds an entry not
    /// read since it last passed, and evicts that one. False if empty.
    fn evict_one(&self, shard: &mut Shard) -> bool {
        let len = shard.slots.len();
        for _ in 0..2 * len {
            let i = shard.hand % len;
            shard.hand = i + 1;
            let evict = match &mut shard.slots[i] {
                Some(s) if s.used => {
                    s.used = false;
                    None
                }
                Some(s) => Some(s.name.clone()),
                None => None,
            };
            if let Some(name) = evict {
                shard.index.remove(&name);
                self.free_slot(shard, i);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn up(max: usize) -> NearCache {
        let n = NearCache::new(max, Arc::new(Stats::default()));
        n.tracking_up(None);
        n
    }

    struct Flag(Arc<AtomicBool>);

    impl CaughtUp for Flag {
        fn caught_up(&self) -> bool {
            self.0.load(SeqCst)
        }
    }

    #[test]
    fn nothing_is_served_while_tracking_has_unapplied_messages() {
        let n = NearCache::new(1 << 20, Arc::new(Stats::default()));
        let caught_up = Arc::new(AtomicBool::new(true));
        n.tracking_up(Some(Box::new(Flag(caught_up.clone()))));
        put(&n, "k", b"v");
        assert!(n.get("k").is_some());
        caught_up.store(false, SeqCst);
        assert_eq!(n.get("k"), None);
        caught_up.store(true, SeqCst);
        assert!(n.get("k").is_some(), "held meanwhile, served again");
    }

    fn put(n: &NearCache, name: &str, v: &'static [u8]) {
        let t = n.ticket(name).unwrap();
        n.insert(t, name, Bytes::from_static(v), 60_000);
    }

    #[test]
    fn an_invalidation_between_send_and_reply_drops_the_insert() {
        let n = up(1 << 20);
        let t = n.ticket("qd:c:{t}:k").unwrap();
        // The write lands and Redis's message arrives before the read's reply.
        n.invalidate(b"qd:c:{t}:k");
        n.insert(t, "qd:c:{t}:k", Bytes::from_static(b"old"), 60_000);
        assert_eq!(n.get("qd:c:{t}:k"), None);
        // A read sent after the message is kept.
        put(&n, "qd:c:{t}:k", b"new");
        assert_eq!(n.get("qd:c:{t}:k").unwrap().0, "new");
        n.invalidate(b"qd:c:{t}:k");
        assert_eq!(n.get("qd:c:{t}:k"), None);
    }

    #[test]
    fn a_lost_tracking_connection_drops_everything_and_late_replies() {
        let n = up(1 << 20);
        put(&n, "a", b"1");
        let before = n.ticket("b").unwrap();
        n.tracking_down();
        assert_eq!(n.get("a"), None);
        assert!(
            n.ticket("b").is_none(),
            "nothing is read for keeping while down"
        );
        n.tracking_up(None);
        n.insert(before, "b", Bytes::from_static(b"2"), 60_000);
        assert_eq!(n.get("b"), None, "a reply from before the loss is dropped");
        put(&n, "b", b"2");
        assert_eq!(n.get("b").unwrap().0, "2");
        let before = n.ticket("c").unwrap();
        n.flush();
        n.insert(before, "c", Bytes::from_static(b"3"), 60_000);
        assert_eq!(n.get("b"), None);
        assert_eq!(n.get("c"), None);
        let c = &n.stats.counters;
        assert_eq!(c.near_flushes.load(Relaxed), 2);
        assert_eq!(c.near_entries.load(Relaxed), 0);
        assert_eq!(c.near_bytes.load(Relaxed), 0);
    }

    #[test]
    fn an_entry_is_served_only_while_fresh() {
        let n = up(1 << 20);
        let t = n.ticket("k").unwrap();
        n.insert(t, "k", Bytes::from_static(b"v"), 30);
        let (v, ttl) = n.get("k").unwrap();
        assert!(v == "v" && ttl <= 30 && ttl > 0);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(n.get("k"), None);
        assert_eq!(n.stats.counters.near_entries.load(Relaxed), 0);
    }

    #[test]
    fn bytes_stay_within_the_bound_and_read_entries_survive() {
        let max = 64 << 10;
        let n = up(max);
        put(&n, "hot", b"h");
        for i in 0..20_000 {
            let _ = n.get("hot");
            put(&n, &format!("qd:c:{{t}}:{i}"), b"0123456789");
            let bytes = n.stats.counters.near_bytes.load(Relaxed) as usize;
            assert!(bytes <= max, "{bytes} > {max}");
        }
        assert!(n.get("hot").is_some(), "CLOCK keeps what is read");
        let entries = n.stats.counters.near_entries.load(Relaxed) as usize;
        assert!(entries > 100, "{entries}");
        let total: usize = n.shards.iter().map(|s| s.lock().unwrap().index.len()).sum();
        assert_eq!(total, entries);
    }

    #[test]
    fn a_value_too_large_for_its_share_is_not_kept() {
        let n = up(16 * 1024);
        let t = n.ticket("k").unwrap();
        n.insert(t, "k", Bytes::from(vec![0u8; 1024]), 60_000);
        assert_eq!(n.get("k"), None);
    }
}
