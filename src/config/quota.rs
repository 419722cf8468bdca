//! `[quota]`: where tenants' plans come from.

use std::path::PathBuf;

use serde::Deserialize;

use super::secret::{SecretSource, relative_to};
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
    /// `sslmode=verify-full`: the CA certificates (PEM) that sign the
    /// server's; default: the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// The password, read from this file (or variable) at each connection
    /// instead of being written in `url`.
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
}

/// `sslmode` of the connection string, as libpq has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSslMode {
    Disable,
    /// TLS if the server offers it, else plain; the certificate unchecked.
    Prefer,
    /// TLS, the certificate unchecked.
    Require,
    /// TLS, the certificate checked against the CA and the host name.
    VerifyFull,
}

impl PostgresConfig {
    /// The connection settings for tokio-postgres (which knows `sslmode`
    /// only up to `require`: `verify-full` is passed on as `require`, and
    /// the certificate check is done by quotad's TLS connector), and the
    /// mode asked for. The password is not set here.
    pub fn connection(&self) -> Result<(tokio_postgres::Config, PgSslMode), ConfigError> {
        let field = "quota.postgres.url";
        let mut verify_full = false;
        let mut url = self.url.clone();
        for mode in ["verify-full", "verify-ca"] {
            let given = format!("sslmode={mode}");
            if let Some(at) = url.find(&given) {
                if mode == "verify-ca" {
                    return Err(invalid(
                        field,
                        "sslmode=verify-ca is not supported: use verify-full",
                    ));
                }
                verify_full = true;
                url.replace_range(at..at + given.len(), "sslmode=require");
            }
        }
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| invalid(field, format!("{e}")))?;
        let mode = match config.get_ssl_mode() {
            _ if verify_full => PgSslMode::VerifyFull,
            tokio_postgres::config::SslMode::Disable => PgSslMode::Disable,
            tokio_postgres::config::SslMode::Require => PgSslMode::Require,
            _ => PgSslMode::Prefer,
        };
        Ok((config, mode))
    }

    pub fn password_source(&self) -> SecretSource<'_> {
        SecretSource {
            field: "quota.postgres.password",
            inline: None,
            file: self.password_file.as_deref(),
            env: self.password_env.as_deref(),
        }
    }

    pub(super) fn resolve_paths(&mut self, dir: &std::path::Path) {
        relative_to(dir, &mut self.tls_ca_file);
        relative_to(dir, &mut self.password_file);
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let (config, mode) = self.connection()?;
        self.password_source().validate()?;
        if self.password_source().is_given() && config.get_password().is_some() {
            return Err(invalid(
                "quota.postgres.password_file",
                "the connection string has a password already: give it in one place",
            ));
        }
        if self.tls_ca_file.is_some() && mode != PgSslMode::VerifyFull {
            return Err(invalid(
                "quota.postgres.tls_ca_file",
                "is used only with `sslmode=verify-full` in the connection string",
            ));
        }
        Ok(())
    }
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
        if let Some(pg) = &q.postgres {
            pg.validate()?;
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
