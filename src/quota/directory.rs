//! The tenant directory: a tenant's record from the Redis level of the
//! quota cache, or from the source of truth (filling the Redis level on
//! the way back), plus the admin operations on the source.
//!
//! The Redis level is `<prefix>:tenant_quota_cache:{<tenant>}`: the record
//! as JSON (`null` for a tenant the source does not know), expiring after
//! `quota.cache_ttl_ms`. It sits in front of the `postgres` source only:
//! the `file` source is in memory already, and the `redis` source is one
//! read of the same Redis. A change made with `tenant set`/`delete` (the
//! `redis` source) is announced on the channel `<prefix>:tenant-changes`,
//! so every quotad drops its local copy at once.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::Value;
use tokio_util::sync::CancellationToken;

use super::source::{self, Postgres, Source, SourceError};
use crate::backend::redis::RedisBackend;
use crate::config::{Config, RedisConfig};
use crate::config::{QuotaConfig, SourceKind, TenantRecord};
use crate::error::Error;
use crate::keys::{self, Keys};
use crate::stats::Stats;

/// Records read per round trip by `tenant list`.
const LIST_CHUNK: usize = 200;

pub struct Directory {
    source: Source,
    /// The Redis level (the `postgres` source with `[redis]`).
    cache: Option<RedisBackend>,
    keys: Keys,
    ttl: Duration,
    stats: Arc<Stats>,
}

/// A tenant's record, and how long it may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// `None`: the source does not know the tenant (`default` plan).
    pub record: Option<TenantRecord>,
    pub ttl: Duration,
}

impl Directory {
    /// The directory of `config`'s `[quota]`; `None` without one.
    pub fn new(
        config: &Config,
        redis: Option<RedisBackend>,
        stats: Arc<Stats>,
    ) -> Option<Arc<Directory>> {
        let q: &QuotaConfig = config.quota.as_ref()?;
        let keys = Keys::new(
            config
                .redis
                .as_ref()
                .map_or(keys::DEFAULT_PREFIX, |r| r.prefix.as_str()),
        );
        let timeout = Duration::from_millis(q.source_timeout_ms);
        let source = match q.source {
            SourceKind::File => Source::File(arc_swap::ArcSwap::new(config.tenants.clone())),
            SourceKind::Redis => Source::Redis {
                redis: redis
                    .clone()
                    .expect("validated: the redis source has [redis]"),
                keys: keys.clone(),
            },
            SourceKind::Postgres => Source::Postgres(Postgres::new(
                q.postgres
                    .clone()
                    .expect("validated: the postgres source has [quota.postgres]"),
                timeout,
            )),
        };
        let cache = redis.filter(|_| q.source == SourceKind::Postgres);
        Some(Arc::new(Directory {
            source,
            cache,
            keys,
            ttl: Duration::from_millis(q.cache_ttl_ms),
            stats,
        }))
    }

    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }

    /// True when records are changed through quotad (the `redis` source),
    /// which announces each change.
    pub fn announces_changes(&self) -> bool {
        matches!(self.source, Source::Redis { .. })
    }

    /// True when the source is part of the config (the `file` source), so
    /// a reload may change tenants' records.
    pub fn reloads_with_config(&self) -> bool {
        matches!(self.source, Source::File(_))
    }

    /// After a reload: the `file` source's new tenants.
    pub fn reload(&self, config: &Config) {
        if let Source::File(tenants) = &self.source {
            tenants.store(config.tenants.clone());
        }
    }

    fn cache_key(&self, tenant: &str) -> String {
        self.keys.tenant_quota_cache(tenant)
    }

    fn channel(&self) -> String {
        self.keys.tenant_changes()
    }

    /// The Redis level, then the source. An unreachable Redis level is
    /// skipped; an unreachable source is an error (the caller keeps
    /// serving what it knew).
    pub async fn lookup(&self, tenant: &str) -> Result<Found, SourceError> {
        let c = &self.stats.counters;
        if let Some(redis) = &self.cache {
            let key = self.cache_key(tenant);
            let mut get = redis::cmd("GET");
            get.arg(&key);
            let mut pttl = redis::cmd("PTTL");
            pttl.arg(&key);
            match redis.query(vec![get, pttl]).await.as_deref() {
                Ok([Value::BulkString(json), Value::Int(ms)]) if *ms > 0 => {
                    if let Ok(record) = serde_json::from_slice::<Option<TenantRecord>>(json) {
                        Stats::add(&c.quota_redis_hits, 1);
                        return Ok(Found {
                            record,
                            ttl: Duration::from_millis(*ms as u64),
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "quota cache in Redis unavailable"),
            }
            Stats::add(&c.quota_redis_misses, 1);
        }
        Stats::add(&c.quota_source_lookups, 1);
        let record = match self.source.lookup(tenant).await {
            Ok(record) => record,
            Err(SourceError::BadRecord(e)) => {
                // Cached like an unknown tenant, so the source is not asked
                // again and again.
                Stats::add(&c.quota_bad_records, 1);
                tracing::warn!(tenant, error = %e, "bad tenant record: default plan");
                None
            }
            Err(e) => {
                Stats::add(&c.quota_source_errors, 1);
                tracing::warn!(tenant, error = %e, "tenant source unavailable: serving the last known plan");
                return Err(e);
            }
        };
        if let Some(redis) = &self.cache {
            let mut set = redis::cmd("SET");
            set.arg(self.cache_key(tenant))
                .arg(serde_json::to_vec(&record).expect("records serialize"))
                .arg("PX")
                .arg(self.ttl.as_millis() as u64);
            let _ = redis.query(vec![set]).await;
        }
        Ok(Found {
            record,
            ttl: self.ttl,
        })
    }

    /// The record at the source, uncached.
    pub async fn get(&self, tenant: &str) -> Result<Option<TenantRecord>, Error> {
        self.source.lookup(tenant).await.map_err(|e| match e {
            SourceError::BadRecord(m) => Error::bad_request(m),
            SourceError::Unavailable(m) => Error::Unavailable(m),
        })
    }

    fn writable(&self) -> Result<(&RedisBackend, &Keys), Error> {
        match &self.source {
            Source::Redis { redis, keys } => Ok((redis, keys)),
            other => Err(Error::bad_request(format!(
                "tenants live in the `{}` source: change them there (a file: edit it and reload)",
                other.name()
            ))),
        }
    }

    /// Sets a tenant's record (the `redis` source only).
    pub async fn set(&self, tenant: &str, record: &TenantRecord) -> Result<(), Error> {
        let (redis, keys) = self.writable()?;
        let mut sadd = redis::cmd("SADD");
        sadd.arg(keys.tenant_index()).arg(tenant);
        // The record's key and the index may live in different Cluster
        // slots, so this is two steps; the record (what lookups read) first.
        let write = source::write_record(keys, tenant, record);
        redis.query(vec![write]).await.map_err(unavailable)?;
        redis.query(vec![sadd]).await.map_err(unavailable)?;
        self.changed(redis, tenant).await;
        Ok(())
    }

    /// Deletes a tenant's record (the `redis` source only).
    pub async fn delete(&self, tenant: &str) -> Result<bool, Error> {
        let (redis, keys) = self.writable()?;
        let mut del = redis::cmd("DEL");
        del.arg(keys.tenant_record(tenant));
        let mut srem = redis::cmd("SREM");
        srem.arg(keys.tenant_index()).arg(tenant);
        let existed = matches!(
            redis.query(vec![del]).await.map_err(unavailable)?.first(),
            Some(Value::Int(1))
        );
        redis.query(vec![srem]).await.map_err(unavailable)?;
        self.changed(redis, tenant).await;
        Ok(existed)
    }

    /// Every tenant the source knows, with its record (`file` and `redis`).
    pub async fn list(&self) -> Result<Vec<(String, TenantRecord)>, Error> {
        match &self.source {
            Source::File(tenants) => {
                let mut all: Vec<_> = tenants
                    .load()
                    .iter()
                    .map(|(t, r)| (t.clone(), r.clone()))
                    .collect();
                all.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(all)
            }
            Source::Redis { redis, keys } => {
                let mut members = redis::cmd("SMEMBERS");
                members.arg(keys.tenant_index());
                let names: Vec<String> =
                    match redis.query(vec![members]).await.map_err(unavailable)?.pop() {
                        Some(v) => redis::from_redis_value(v).map_err(internal)?,
                        None => Vec::new(),
                    };
                let mut all = Vec::with_capacity(names.len());
                // Pipelined in modest chunks: this shares the connection
                // (and its deadline) with the checks.
                for chunk in names.chunks(LIST_CHUNK) {
                    let reads = chunk.iter().map(|t| source::read_record(keys, t));
                    let replies = redis.query(reads.collect()).await.map_err(unavailable)?;
                    for (name, reply) in chunk.iter().zip(replies) {
                        match source::parse_hash(Some(reply)) {
                            Ok(Some(record)) => all.push((name.clone(), record)),
                            Ok(None) => {} // deleted meanwhile
                            Err(e) => return Err(Error::bad_request(e.to_string())),
                        }
                    }
                }
                all.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(all)
            }
            Source::Postgres(_) => Err(Error::bad_request(
                "the `postgres` source is listed with your database's tools",
            )),
        }
    }

    /// Tells every quotad (this one too) to drop its copy.
    async fn changed(&self, redis: &RedisBackend, tenant: &str) {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.channel()).arg(tenant);
        let _ = redis.query(vec![publish]).await;
    }

    /// Listens for changes announced by any quotad, calling `on_change`
    /// with the tenant; reconnects until `stop`.
    pub fn watch(
        self: &Arc<Self>,
        config: RedisConfig,
        on_change: impl Fn(String) + Send + Sync + 'static,
        stop: CancellationToken,
    ) {
        let channel = self.channel();
        tokio::spawn(async move {
            loop {
                let listen = async {
                    let mut pubsub = crate::backend::redis::pubsub(&config).await?;
                    pubsub.subscribe(&channel).await?;
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        if let Ok(tenant) = msg.get_payload::<String>() {
                            on_change(tenant);
                        }
                    }
                    Ok::<(), redis::RedisError>(())
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listen => if let Err(e) = r {
                        tracing::debug!(error = %e, "tenant change channel lost; retrying");
                    },
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
}

/// Redis did not answer (down, slow, failing over).
fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("Redis: {e}"))
}

/// Redis answered something no command of ours returns.
fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("Redis: {e}"))
}
