//! `[server]`: the socket and the bounds of everything the daemon holds.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, in_range, invalid};

/// `[server]`: the socket and the bounds of everything the daemon holds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Socket path. Default `$XDG_RUNTIME_DIR/quotad.sock`, else `./quotad.sock`.
    pub socket: PathBuf,
    /// Socket file mode. Default `0o660`.
    pub socket_mode: u32,
    /// Open connections at most; one more is told `overloaded`. Default 1024.
    pub max_connections: usize,
    /// Largest frame accepted, in bytes. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// Requests one connection may have in flight before quotad stops
    /// reading from it (back-pressure, not an error). Default 1024.
    pub max_inflight_per_connection: usize,
    /// Runtime worker threads. One thread outruns one Redis (a check costs
    /// quotad a few µs); raise it for Redis Cluster or a busy memory
    /// backend. Default 1.
    pub threads: usize,
    /// Shard actors; 0 = one per worker thread. Default 0.
    pub shards: usize,
    /// Messages a shard's mailbox holds; past it, `overloaded`. Default 8192.
    pub mailbox_capacity: usize,
    /// Checks a shard queues for its next Redis round trip; past it,
    /// `overloaded`. Default 32768.
    pub max_queued_per_shard: usize,
    /// Operations in one Redis round trip at most. Default 256.
    pub batch_max: usize,
    /// Bytes (mostly cache values) in one Redis round trip, roughly, at
    /// most; a single larger operation still goes alone. Default 4 MiB.
    pub batch_max_bytes: usize,
    /// Round trips a shard may have in flight at once. Default 2.
    pub max_batches_in_flight: usize,
    /// Longest tenant string, in bytes. Default 256.
    pub max_tenant_bytes: usize,
    /// Longest key string, in bytes. Default 1024.
    pub max_key_bytes: usize,
    /// In-memory limiter states per process (memory backend and `local`
    /// failure mode). Default 1,000,000.
    pub local_max_entries: usize,
    /// On SIGTERM, how long open connections may take to finish. Default 5000.
    pub shutdown_timeout_ms: u64,
    /// Every rule of every policy is shadow: counts what it would deny,
    /// denies nothing. Reloaded with the policies. Default false.
    pub shadow: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(|| PathBuf::from("."));
        ServerConfig {
            socket: dir.join("quotad.sock"),
            socket_mode: 0o660,
            max_connections: 1024,
            max_frame_bytes: 1 << 20,
            max_inflight_per_connection: 1024,
            threads: 1,
            shards: 0,
            mailbox_capacity: 8192,
            max_queued_per_shard: 32768,
            batch_max: 256,
            batch_max_bytes: 4 << 20,
            max_batches_in_flight: 2,
            max_tenant_bytes: 256,
            max_key_bytes: 1024,
            local_max_entries: 1_000_000,
            shutdown_timeout_ms: 5000,
            shadow: false,
        }
    }
}

impl ServerConfig {
    /// The shard count after resolving `0` (auto).
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => self.threads,
            n => n,
        }
    }

    /// Refuses values outside their documented bounds.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.socket.as_os_str().is_empty() {
            return Err(invalid("server.socket", "must not be empty"));
        }
        if self.socket_mode > 0o777 {
            return Err(invalid(
                "server.socket_mode",
                format!(
                    "{} is not a file mode; write it in octal, e.g. 0o660",
                    self.socket_mode
                ),
            ));
        }
        let s = self;
        in_range(&[
            (
                "server.max_connections",
                s.max_connections as u64,
                1,
                1 << 20,
            ),
            (
                "server.max_frame_bytes",
                s.max_frame_bytes as u64,
                64,
                64 << 20,
            ),
            (
                "server.max_inflight_per_connection",
                s.max_inflight_per_connection as u64,
                1,
                1 << 20,
            ),
            ("server.threads", s.threads as u64, 1, 256),
            ("server.shards", s.shards as u64, 0, 1024),
            (
                "server.mailbox_capacity",
                s.mailbox_capacity as u64,
                1,
                1 << 20,
            ),
            (
                "server.max_queued_per_shard",
                s.max_queued_per_shard as u64,
                1,
                1 << 24,
            ),
            ("server.batch_max", s.batch_max as u64, 1, 4096),
            (
                "server.batch_max_bytes",
                s.batch_max_bytes as u64,
                1024,
                1 << 30,
            ),
            (
                "server.max_batches_in_flight",
                s.max_batches_in_flight as u64,
                1,
                64,
            ),
            (
                "server.max_tenant_bytes",
                s.max_tenant_bytes as u64,
                1,
                4096,
            ),
            ("server.max_key_bytes", s.max_key_bytes as u64, 1, 65536),
            (
                "server.local_max_entries",
                s.local_max_entries as u64,
                1,
                1 << 30,
            ),
        ])
    }
}
