//! Per-tenant quotas: plans, their source of truth, and the Redis level of
//! the two-level quota cache (the local level lives in each shard).

pub mod directory;
pub mod plans;
pub mod source;

use std::path::PathBuf;

use serde::Deserialize;

pub use directory::{Directory, Found};
pub use plans::{DEFAULT_PLAN, PlanConfig, Plans, TenantConfig, TenantRecord};
pub use source::SourceError;

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
