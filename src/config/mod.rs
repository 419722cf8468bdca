//! Configuration: one TOML file, every field documented in `docs/config.md`.
//!
//! [`Config::from_toml`] is the single place where defaults apply and values
//! are validated; unknown keys and invalid values are errors that name the
//! field. Policies are compiled into [`Policies`] here, so nothing past
//! start-up (or a SIGHUP reload) ever sees an invalid rule.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::protocol::Limits;
use crate::quota::{PlanConfig, Plans, QuotaConfig, SourceKind, TenantConfig, TenantRecord};

mod policy;

pub use policy::{Overrides, Policies, PolicyConfig, RuleConfig};
pub(crate) use policy::{compile_policy, compile_with};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// `None`: decide with the embedded in-memory backend.
    pub redis: Option<RedisConfig>,
    pub cache: CacheConfig,
    /// `None`: every tenant is on the `default` plan.
    pub quota: Option<QuotaConfig>,
    pub admin: AdminConfig,
    /// The policies of every plan.
    pub plans: Arc<Plans>,
    /// The `file` source's tenants.
    pub tenants: Arc<HashMap<String, TenantRecord>>,
}

/// `[admin]`: who may use the admin ops (`tenant_*`) on the socket.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Unix user ids allowed, checked against the peer's credentials
    /// (SO_PEERCRED). Default: the user quotad runs as, and root.
    pub allowed_uids: Vec<u32>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        // SAFETY: geteuid cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        AdminConfig {
            allowed_uids: if me == 0 { vec![0] } else { vec![me, 0] },
        }
    }
}

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
    /// Shard actors; 0 = two per worker thread. Default 0.
    pub shards: usize,
    /// Messages a shard's mailbox holds; past it, `overloaded`. Default 4096.
    pub mailbox_capacity: usize,
    /// Checks a shard queues for its next Redis round trip; past it,
    /// `overloaded`. Default 16384.
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
            mailbox_capacity: 4096,
            max_queued_per_shard: 16384,
            batch_max: 256,
            batch_max_bytes: 4 << 20,
            max_batches_in_flight: 2,
            max_tenant_bytes: 256,
            max_key_bytes: 1024,
            local_max_entries: 1_000_000,
            shutdown_timeout_ms: 5000,
        }
    }
}

impl ServerConfig {
    /// The shard count after resolving `0` (auto).
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => 2 * self.threads,
            n => n,
        }
    }
}

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
        }
    }
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    server: ServerConfig,
    redis: Option<RedisConfig>,
    #[serde(default)]
    cache: CacheConfig,
    quota: Option<QuotaConfig>,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    policies: BTreeMap<String, PolicyConfig>,
    #[serde(default)]
    plans: BTreeMap<String, PlanConfig>,
    #[serde(default)]
    tenants: BTreeMap<String, TenantConfig>,
}

/// A separate file of tenants (`quota.tenants_file`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenants: BTreeMap<String, TenantConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: `{field}`: {message}")]
    Invalid { field: String, message: String },
}

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads and validates a config file (and its tenants file, if any).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let mut config = Config::from_toml(&read(path)?)?;
        if let Some(file) = config.quota.as_ref().and_then(|q| q.tenants_file.clone()) {
            let file = path.parent().unwrap_or(Path::new(".")).join(file);
            let tenants: TenantsFile = toml::from_str(&read(&file)?)
                .map_err(|e| ConfigError::Parse(format!("{}: {e}", file.display())))?;
            config.tenants = Arc::new(tenant_records(&tenants.tenants, &config.plans)?);
        }
        Ok(config)
    }

    /// The configuration used when no file is given: the embedded memory
    /// backend and one `default` policy, so `quotad serve` works out of the box.
    pub fn builtin() -> Config {
        Config::from_toml(
            r#"
            [policies.default]
            rules = [
              { name = "burst", kind = "token_bucket", capacity = 20, refill_per_sec = 10 },
              { name = "daily", kind = "daily_quota", limit = 100000 },
            ]
            "#,
        )
        .expect("the built-in config is valid")
    }

    /// Parses and validates; every default and every check lives here.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let s = &file.server;
        if s.socket.as_os_str().is_empty() {
            return Err(invalid("server.socket", "must not be empty"));
        }
        if s.socket_mode > 0o777 {
            return Err(invalid(
                "server.socket_mode",
                format!(
                    "{} is not a file mode; write it in octal, e.g. 0o660",
                    s.socket_mode
                ),
            ));
        }
        for (field, value, min, max) in [
            ("server.max_connections", s.max_connections, 1, 1 << 20),
            ("server.max_frame_bytes", s.max_frame_bytes, 64, 64 << 20),
            (
                "server.max_inflight_per_connection",
                s.max_inflight_per_connection,
                1,
                1 << 20,
            ),
            ("server.threads", s.threads, 1, 256),
            ("server.shards", s.shards, 0, 1024),
            ("server.mailbox_capacity", s.mailbox_capacity, 1, 1 << 20),
            (
                "server.max_queued_per_shard",
                s.max_queued_per_shard,
                1,
                1 << 24,
            ),
            ("server.batch_max", s.batch_max, 1, 4096),
            ("server.batch_max_bytes", s.batch_max_bytes, 1024, 1 << 30),
            (
                "server.max_batches_in_flight",
                s.max_batches_in_flight,
                1,
                64,
            ),
            ("server.max_tenant_bytes", s.max_tenant_bytes, 1, 4096),
            ("server.max_key_bytes", s.max_key_bytes, 1, 65536),
            ("server.local_max_entries", s.local_max_entries, 1, 1 << 30),
        ] {
            if !(min..=max).contains(&value) {
                return Err(invalid(field, format!("{value} is outside {min}..={max}")));
            }
        }
        if let Some(r) = &file.redis {
            let given = [
                r.url.is_some(),
                !r.cluster.is_empty(),
                !r.sentinels.is_empty(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(invalid(
                    "redis",
                    "give exactly one of `url`, `cluster` and `sentinels`",
                ));
            }
            if r.sentinels.is_empty() != r.master_name.is_none() {
                return Err(invalid(
                    "redis.master_name",
                    "goes with `sentinels`, and only with it",
                ));
            }
            let urls = (r.url.iter().map(|u| ("redis.url", u)))
                .chain(r.cluster.iter().map(|u| ("redis.cluster", u)))
                .chain(r.sentinels.iter().map(|u| ("redis.sentinels", u)));
            for (field, url) in urls {
                redis::Client::open(url.as_str())
                    .map_err(|e| invalid(field, format!("`{url}`: {e}")))?;
            }
            if !(1..=60_000).contains(&r.timeout_ms) {
                return Err(invalid("redis.timeout_ms", "must be within 1..=60000"));
            }
            if !is_ident(&r.prefix) {
                return Err(invalid("redis.prefix", IDENT_RULE));
            }
            if r.breaker_failures == 0 {
                return Err(invalid("redis.breaker_failures", "must be at least 1"));
            }
            if !(10..=60_000).contains(&r.probe_interval_ms) {
                return Err(invalid(
                    "redis.probe_interval_ms",
                    "must be within 10..=60000",
                ));
            }
        }
        let c = &file.cache;
        if c.max_value_bytes >= s.max_frame_bytes {
            return Err(invalid(
                "cache.max_value_bytes",
                "must be below `server.max_frame_bytes`, which bounds the whole request",
            ));
        }
        for (field, value, min, max) in [
            ("cache.max_tags", c.max_tags as u64, 0, 256),
            ("cache.max_delete", c.max_delete as u64, 1, 100_000),
            ("cache.max_ttl_ms", c.max_ttl_ms, 1, 10 * 365 * 86_400_000),
            ("cache.max_fill_ms", c.max_fill_ms, 1, 3_600_000),
            ("cache.fill_poll_ms", c.fill_poll_ms, 1, 10_000),
            (
                "cache.memory_max_bytes",
                c.memory_max_bytes as u64,
                1 << 10,
                1 << 40,
            ),
        ] {
            if !(min..=max).contains(&value) {
                return Err(invalid(field, format!("{value} is outside {min}..={max}")));
            }
        }
        let plans = Plans::compile(&file.policies, &file.plans)?;
        match (&file.quota, file.tenants.is_empty()) {
            (Some(q), _) if q.source == SourceKind::Redis && file.redis.is_none() => {
                return Err(invalid("quota.source", "`redis` needs a [redis] table"));
            }
            (Some(q), _) if q.source == SourceKind::Postgres && q.postgres.is_none() => {
                return Err(invalid(
                    "quota.source",
                    "`postgres` needs a [quota.postgres] table",
                ));
            }
            (Some(q), false) if q.source != SourceKind::File || q.tenants_file.is_some() => {
                return Err(invalid(
                    "tenants",
                    "[tenants] is the `file` source's, without `quota.tenants_file`",
                ));
            }
            (None, false) => {
                return Err(invalid(
                    "tenants",
                    "[tenants] needs `quota.source = \"file\"`",
                ));
            }
            _ => {}
        }
        if let Some(q) = &file.quota {
            for (field, value, min, max) in [
                ("quota.cache_ttl_ms", q.cache_ttl_ms, 100, 86_400_000),
                ("quota.source_timeout_ms", q.source_timeout_ms, 1, 60_000),
                (
                    "quota.local_max_tenants",
                    q.local_max_tenants as u64,
                    1,
                    1 << 30,
                ),
            ] {
                if !(min..=max).contains(&value) {
                    return Err(invalid(field, format!("{value} is outside {min}..={max}")));
                }
            }
        }
        let tenants = tenant_records(&file.tenants, &plans)?;
        Ok(Config {
            server: file.server,
            redis: file.redis,
            cache: file.cache,
            quota: file.quota,
            admin: file.admin,
            plans: Arc::new(plans),
            tenants: Arc::new(tenants),
        })
    }

    /// The bounds every request is checked against.
    pub fn limits(&self) -> Limits {
        Limits {
            max_tenant_bytes: self.server.max_tenant_bytes,
            max_key_bytes: self.server.max_key_bytes,
            max_value_bytes: self.cache.max_value_bytes,
            max_tags: self.cache.max_tags,
            max_delete: self.cache.max_delete,
            max_ttl_ms: self.cache.max_ttl_ms,
            max_fill_ms: self.cache.max_fill_ms,
        }
    }
}

/// Validates the `file` source's tenants: each on a known plan, with
/// overrides that compile.
fn tenant_records(
    tenants: &BTreeMap<String, TenantConfig>,
    plans: &Plans,
) -> Result<HashMap<String, TenantRecord>, ConfigError> {
    let mut out = HashMap::new();
    for (name, t) in tenants {
        let at = format!("tenants.{name}");
        let record = t.record(&at)?;
        plans.for_record(&record).map_err(|e| match e {
            ConfigError::Invalid { field, message } => invalid(format!("{at}.{field}"), message),
            other => other,
        })?;
        out.insert(name.clone(), record);
    }
    Ok(out)
}

pub(crate) const IDENT_RULE: &str = "must be 1 to 64 characters from A-Z a-z 0-9 _ -";

pub(crate) fn is_ident(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::limiter::RuleKind;

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_example_parses() {
        let c = Config::from_toml(
            r#"
            [server]
            socket = "/tmp/q/quotad.sock"
            [redis]
            url = "redis://127.0.0.1:6379"
            timeout_ms = 100
            [policies.api]
            failure_mode = "open"
            rules = [
              { name = "burst", kind = "token_bucket", capacity = 10, refill_per_sec = 5 },
              { name = "daily", kind = "daily_quota", limit = 1000 },
            ]
            "#,
        )
        .unwrap();
        let api = c.plans.default_plan().get(Some("api")).unwrap();
        assert_eq!(
            api.rules[0].kind,
            RuleKind::TokenBucket {
                capacity: 10,
                interval_us: 200_000
            }
        );
        assert_eq!(c.redis.unwrap().prefix, "qd");
        assert!(matches!(
            c.plans.default_plan().get(None),
            Err(Error::UnknownPolicy(_))
        ));
    }

    #[test]
    fn mistakes_name_their_field() {
        assert!(err("[server]\nsockt = 'x'").contains("unknown field `sockt`"));
        assert!(err("[server]\nsocket_mode = 660").contains("server.socket_mode"));
        assert!(err("[redis]\nurl = 'nope://x'").contains("redis.url"));
        let rule = |r: &str| err(&format!("[policies.p]\nrules = [{r}]"));
        assert!(
            rule("{name='a', kind='token_bucket', capacity=5}").contains("rules[0].refill_per_sec")
        );
        assert!(
            rule("{name='a', kind='daily_quota', limit=5, window_ms=9}").contains("does not apply")
        );
        assert!(rule("{name='a', kind='leaky'}").contains("unknown kind `leaky`"));
        assert!(rule("{name='a:b', kind='daily_quota', limit=5}").contains("rules[0].name"));
        assert!(rule("{name='a', kind='fixed_window', limit=0, window_ms=5}").contains("limit"));
        assert!(err("[policies.p]\nrules = []").contains("policies.p.rules"));
        assert!(err("[policies.p]\nfailure_mode='maybe'\nrules=[]").contains("maybe"));
    }
}
