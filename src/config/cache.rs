//! `[cache]`: bounds of the response cache.

use serde::Deserialize;

use super::{ConfigError, in_range, invalid};

/// `[cache]`: bounds of the response cache.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Largest value, in bytes; more is `too_large`. Default 512 KiB.
    pub max_value_bytes: usize,
    /// Tags on one entry at most. Default 16.
    pub max_tags: usize,
    /// Keys plus tags in one `cache_del` at most. Default 256.
    pub max_delete: usize,
    /// Longest `ttl_ms` and `stale_ms`. Default 30 days.
    pub max_ttl_ms: u64,
    /// Longest `fill_ms`. Default 30000.
    pub max_fill_ms: u64,
    /// How often a shard looks in Redis for a value that callers wait on
    /// while another quotad fills it, in ms. Default 10.
    pub fill_poll_ms: u64,
    /// The memory backend's cache size (keys and values) per process, in
    /// bytes. Default 64 MiB.
    pub memory_max_bytes: usize,
    /// The Redis backend's near cache (fresh entries kept in process, kept
    /// exact by Redis's invalidation messages), in bytes; 0: off. Default
    /// 64 MiB.
    pub near_max_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_value_bytes: 512 << 10,
            max_tags: 16,
            max_delete: 256,
            max_ttl_ms: 30 * 86_400_000,
            max_fill_ms: 30_000,
            fill_poll_ms: 10,
            memory_max_bytes: 64 << 20,
            near_max_bytes: 64 << 20,
        }
    }
}

/// The smallest near cache: below it, its 16 shards could keep next to
/// nothing.
const NEAR_MIN_BYTES: usize = 64 << 10;

impl CacheConfig {
    /// Refuses values outside their bounds; a value must fit in a frame.
    pub(super) fn validate(&self, max_frame_bytes: usize) -> Result<(), ConfigError> {
        if self.max_value_bytes >= max_frame_bytes {
            return Err(invalid(
                "cache.max_value_bytes",
                "must be below `server.max_frame_bytes`, which bounds the whole request",
            ));
        }
        if self.near_max_bytes != 0 && self.near_max_bytes < NEAR_MIN_BYTES {
            return Err(invalid(
                "cache.near_max_bytes",
                "must be 0 (off) or at least 65536",
            ));
        }
        in_range(&[
            ("cache.max_tags", self.max_tags as u64, 0, 256),
            ("cache.max_delete", self.max_delete as u64, 1, 100_000),
            (
                "cache.max_ttl_ms",
                self.max_ttl_ms,
                1,
                10 * 365 * 86_400_000,
            ),
            ("cache.max_fill_ms", self.max_fill_ms, 1, 3_600_000),
            ("cache.fill_poll_ms", self.fill_poll_ms, 1, 10_000),
            (
                "cache.memory_max_bytes",
                self.memory_max_bytes as u64,
                1 << 10,
                1 << 40,
            ),
            (
                "cache.near_max_bytes",
                self.near_max_bytes as u64,
                0,
                1 << 40,
            ),
        ])
    }
}
