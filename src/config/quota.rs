//! `[quota]`: where tenants' plans come from.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, in_range, invalid};

/// `[quota]`: where tenants' plans come from. Without it, every tenant is
/// on the `default` plan.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Required: `file`, `redis` or `postgres`.
    pub source: SourceKind,
    /// The Redis level's TTL (`tenant_quota_cache`), in ms: a plan changed
    /// at the source is enforced within it. Default 30000.
    #[serde(default = "default_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    /// Deadline of one source lookup, in ms. Default 1000.
    #[serde(default = "default_source_timeout_ms")]
    pub source_timeout_ms: u64,
    /// Tenants kept in the local level, per process. Default 1,000,000.
    #[serde(default = "default_local_max_tenants")]
    pub local_max_tenants: usize,
    /// `file` source: read `[tenants]` from this file instead of the config
    /// (relative paths are from the config file's directory).
    pub tenants_file: Option<PathBuf>,
    /// `postgres` source: the database and the query.
    pub postgres: Option<PostgresConfig>,
}

fn default_cache_ttl_ms() -> u64 {
    30_000
}
fn default_source_timeout_ms() -> u64 {
    1000
}
fn default_local_max_tenants() -> usize {
    1_000_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    File,
    Redis,
    Postgres,
}

/// `[quota.postgres]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Required, e.g. `postgres://quotad@db/app` or
    /// `host=/run/postgresql user=quotad dbname=app`.
    pub url: String,
    /// Takes the tenant as `$1`; returns its plan (text) in the first
    /// column and, optionally, its own limits as a JSON object (text) in
    /// the second. No row: the tenant is unknown (`default` plan).
    #[serde(default = "default_query")]
    pub query: String,
}

fn default_query() -> String {
    "SELECT plan, limits::text FROM quotad_tenants WHERE tenant = $1".into()
}

impl QuotaConfig {
    /// Refuses a source that lacks what it reads from, `[tenants]` beside
    /// a source that does not read them, and values outside their bounds.
    /// `quota` is `None` when the file has no `[quota]` table.
    pub(super) fn validate(
        quota: Option<&QuotaConfig>,
        has_redis: bool,
        has_tenants: bool,
    ) -> Result<(), ConfigError> {
        let Some(q) = quota else {
            return match has_tenants {
                true => Err(invalid(
                    "tenants",
                    "[tenants] needs `quota.source = \"file\"`",
                )),
                false => Ok(()),
            };
        };
        if q.source == SourceKind::Redis && !has_redis {
            return Err(invalid("quota.source", "`redis` needs a [redis] table"));
        }
        if q.source == SourceKind::Postgres && q.postgres.is_none() {
            return Err(invalid(
                "quota.source",
                "`postgres` needs a [quota.postgres] table",
            ));
        }
        if has_tenants && (q.source != SourceKind::File || q.tenants_file.is_some()) {
            return Err(invalid(
                "tenants",
                "[tenants] is the `file` source's, without `quota.tenants_file`",
            ));
        }
        in_range(&[
            ("quota.cache_ttl_ms", q.cache_ttl_ms, 100, 86_400_000),
            ("quota.source_timeout_ms", q.source_timeout_ms, 1, 60_000),
            (
                "quota.local_max_tenants",
                q.local_max_tenants as u64,
                1,
                1 << 30,
            ),
        ])
    }
}
