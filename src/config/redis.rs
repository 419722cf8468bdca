//! `[redis]`: where shared state lives.

use serde::Deserialize;

use super::{ConfigError, IDENT_RULE, invalid, is_ident};

/// `[redis]`: where shared state lives. Omit the table for the memory backend.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// A single Redis: `redis://host:port[/db]`, `redis+unix:///path` or
    /// `unix:///path`. Give either `url` or `cluster`.
    pub url: Option<String>,
    /// Redis Cluster seed nodes, e.g. `["redis://10.0.0.1:7000", ...]`.
    #[serde(default)]
    pub cluster: Vec<String>,
    /// Sentinel addresses, e.g. `["redis://10.0.0.1:26379", ...]`; the
    /// master is looked up by `master_name`, and again after a failover.
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// The Sentinel service name of the master. Required with `sentinels`.
    pub master_name: Option<String>,
    /// Deadline of every Redis round trip, in ms. Default 100.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// First component of every key. Default `qd`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Consecutive failed round trips that open the circuit breaker. Default 3.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// While the breaker is open, how often Redis is probed, in ms. Default 500.
    #[serde(default = "default_probe_ms")]
    pub probe_interval_ms: u64,
}

fn default_timeout_ms() -> u64 {
    100
}
fn default_prefix() -> String {
    crate::keys::DEFAULT_PREFIX.into()
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_probe_ms() -> u64 {
    500
}

impl RedisConfig {
    /// Where Redis is, for log lines: addresses only, never credentials.
    pub fn target(&self) -> String {
        let addr = |url: &str| match redis::Client::open(url) {
            Ok(c) => c.get_connection_info().addr().to_string(),
            Err(_) => "an unparsable address".into(),
        };
        let all = |urls: &[String]| urls.iter().map(|u| addr(u)).collect::<Vec<_>>().join(", ");
        match (&self.url, &self.master_name) {
            (Some(url), _) => addr(url),
            (None, Some(master)) => {
                format!(
                    "master `{master}` of the Sentinels {}",
                    all(&self.sentinels)
                )
            }
            (None, None) => format!("the Cluster of {}", all(&self.cluster)),
        }
    }

    /// Refuses a table that names no Redis (or several), an address that
    /// does not parse, and values outside their bounds.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let given = [
            self.url.is_some(),
            !self.cluster.is_empty(),
            !self.sentinels.is_empty(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid(
                "redis",
                "give exactly one of `url`, `cluster` and `sentinels`",
            ));
        }
        if self.sentinels.is_empty() != self.master_name.is_none() {
            return Err(invalid(
                "redis.master_name",
                "goes with `sentinels`, and only with it",
            ));
        }
        let urls = (self.url.iter().map(|u| ("redis.url", u)))
            .chain(self.cluster.iter().map(|u| ("redis.cluster", u)))
            .chain(self.sentinels.iter().map(|u| ("redis.sentinels", u)));
        for (field, url) in urls {
            redis::Client::open(url.as_str())
                .map_err(|e| invalid(field, format!("`{url}`: {e}")))?;
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err(invalid("redis.timeout_ms", "must be within 1..=60000"));
        }
        if !is_ident(&self.prefix) {
            return Err(invalid("redis.prefix", IDENT_RULE));
        }
        if self.breaker_failures == 0 {
            return Err(invalid("redis.breaker_failures", "must be at least 1"));
        }
        if !(10..=60_000).contains(&self.probe_interval_ms) {
            return Err(invalid(
                "redis.probe_interval_ms",
                "must be within 10..=60000",
            ));
        }
        Ok(())
    }
}
