//! Sources of truth for tenants' plans: the config file, a Redis hash per
//! tenant, or a PostgreSQL query.
//!
//! Redis layout: [`Keys::tenant_record`] is a hash with field `plan` and one
//! field `limit:<policy>.<rule>.<parameter>` per override; the set
//! [`Keys::tenant_index`] lists the tenants, for `tenant list`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::Value;
use tokio::sync::Mutex;

use crate::backend::redis::RedisBackend;
use crate::config::Overrides;
use crate::config::{ConfigError, PgSslMode, PostgresConfig, TenantRecord, flatten};
use crate::keys::Keys;
use crate::tls::AcceptAnyCertificate;
use rustls::ClientConfig;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why a source could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// Down, slow or refusing: keep serving what was known.
    #[error("{0}")]
    Unavailable(String),
    /// It answered with a record that makes no sense.
    #[error("{0}")]
    BadRecord(String),
}

pub enum Source {
    /// `[tenants]` of the config (or its tenants file), swapped on reload.
    File(ArcSwap<HashMap<String, TenantRecord>>),
    Redis {
        redis: RedisBackend,
        keys: Keys,
    },
    Postgres(Postgres),
}

impl Source {
    pub fn name(&self) -> &'static str {
        match self {
            Source::File(_) => "file",
            Source::Redis { .. } => "redis",
            Source::Postgres(_) => "postgres",
        }
    }

    /// The tenant's record; `None` if the source does not know it.
    pub async fn lookup(&self, tenant: &str) -> Result<Option<TenantRecord>, SourceError> {
        match self {
            Source::File(tenants) => Ok(tenants.load().get(tenant).cloned()),
            Source::Redis { redis, keys } => {
                let reply = redis
                    .query(vec![read_record(keys, tenant)])
                    .await
                    .map_err(redis_error)?;
                parse_hash(reply.into_iter().next())
            }
            Source::Postgres(pg) => pg.lookup(tenant).await,
        }
    }
}

fn redis_error(e: redis::RedisError) -> SourceError {
    SourceError::Unavailable(format!("Redis: {e}"))
}

/// Reads a record (see [`parse_hash`]).
pub fn read_record(keys: &Keys, tenant: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("HGETALL");
    cmd.arg(keys.tenant_record(tenant));
    cmd
}

/// Replaces a record atomically (`lua/tenant_set.lua`).
pub fn write_record(keys: &Keys, tenant: &str, record: &TenantRecord) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(include_str!("../../lua/tenant_set.lua"))
        .arg(1)
        .arg(keys.tenant_record(tenant));
    for (f, v) in hash_fields(record) {
        cmd.arg(f).arg(v);
    }
    cmd
}

/// The Redis hash fields of a record.
fn hash_fields(record: &TenantRecord) -> Vec<(String, String)> {
    let mut fields = vec![("plan".to_owned(), record.plan.clone())];
    fields.extend(
        record
            .limits
            .iter()
            .map(|(k, v)| (format!("limit:{k}"), v.to_string())),
    );
    fields
}

/// The record in a [`read_record`] reply; `None` for no hash.
pub fn parse_hash(reply: Option<Value>) -> Result<Option<TenantRecord>, SourceError> {
    let bad = |why: &str| SourceError::BadRecord(format!("malformed tenant hash: {why}"));
    let pairs: Vec<(String, String)> = match reply {
        Some(Value::Array(items)) => items
            .chunks(2)
            .map(|kv| match kv {
                [Value::BulkString(k), Value::BulkString(v)] => Ok((
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )),
                _ => Err(bad("not string pairs")),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Map(items)) => items
            .into_iter()
            .map(|kv| match kv {
                (Value::BulkString(k), Value::BulkString(v)) => Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )),
                _ => Err(bad("not string pairs")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("not a hash")),
    };
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut plan = None;
    let mut limits = Overrides::new();
    for (k, v) in pairs {
        if k == "plan" {
            plan = Some(v);
        } else if let Some(path) = k.strip_prefix("limit:") {
            let n: f64 = v
                .parse()
                .map_err(|_| bad(&format!("`{k}` is not a number")))?;
            limits.insert(path.to_owned(), n);
        }
    }
    let plan = plan.ok_or_else(|| bad("no `plan` field"))?;
    Ok(Some(TenantRecord { plan, limits }))
}

/// A tokio-postgres error with its causes: its own text leaves out why,
/// e.g. why a TLS handshake failed.
fn pg_error(e: tokio_postgres::Error) -> SourceError {
    let mut message = format!("PostgreSQL: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        message += &format!(": {c}");
        cause = c.source();
    }
    SourceError::Unavailable(message)
}

/// A PostgreSQL source: one connection, made (again) on demand.
pub struct Postgres {
    config: PostgresConfig,
    timeout: Duration,
    conn: Mutex<Option<Arc<(tokio_postgres::Client, tokio_postgres::Statement)>>>,
}

impl Postgres {
    pub fn new(config: PostgresConfig, timeout: Duration) -> Self {
        Postgres {
            config,
            timeout,
            conn: Mutex::new(None),
        }
    }

    async fn connection(
        &self,
    ) -> Result<Arc<(tokio_postgres::Client, tokio_postgres::Statement)>, SourceError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.0.is_closed()) {
            return Ok(c.clone());
        }
        let (settings, tls) = self
            .settings()
            .map_err(|e| SourceError::Unavailable(e.to_string()))?;
        let (client, connection) = settings.connect(tls).await.map_err(pg_error)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection lost");
            }
        });
        let statement = client.prepare(&self.config.query).await.map_err(pg_error)?;
        let c = Arc::new((client, statement));
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The connection settings, with the password as its file (or
    /// variable) has it now, and the TLS connector `sslmode` asks for.
    fn settings(&self) -> Result<(tokio_postgres::Config, MakeRustlsConnect), ConfigError> {
        let (mut settings, mode) = self.config.connection()?;
        if let Some(pw) = self.config.password_source().read()? {
            settings.password(pw.expose());
        }
        let tls = match mode {
            PgSslMode::VerifyFull => ClientConfig::builder()
                .with_root_certificates(crate::tls::root_store(
                    "quota.postgres.tls_ca_file",
                    self.config.tls_ca_file.as_deref(),
                )?)
                .with_no_client_auth(),
            // As libpq: encrypted when asked, the certificate unchecked.
            PgSslMode::Require | PgSslMode::Prefer | PgSslMode::Disable => ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate::default()))
                .with_no_client_auth(),
        };
        Ok((settings, MakeRustlsConnect::new(tls)))
    }

    async fn lookup(&self, tenant: &str) -> Result<Option<TenantRecord>, SourceError> {
        let query = async {
            let c = self.connection().await?;
            let rows = c.0.query(&c.1, &[&tenant]).await.map_err(pg_error)?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let bad = |why: String| {
                SourceError::BadRecord(format!("PostgreSQL row for `{tenant}`: {why}"))
            };
            let plan: String = row.try_get(0).map_err(|e| bad(e.to_string()))?;
            let limits = if row.len() > 1 {
                match row
                    .try_get::<_, Option<String>>(1)
                    .map_err(|e| bad(e.to_string()))?
                {
                    Some(json) => {
                        let v: serde_json::Value =
                            serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
                        flatten(&v, "limits").map_err(|e| bad(e.to_string()))?
                    }
                    None => Overrides::new(),
                }
            } else {
                Overrides::new()
            };
            Ok(Some(TenantRecord { plan, limits }))
        };
        match tokio::time::timeout(self.timeout, query).await {
            Ok(r) => r,
            Err(_) => {
                // A hung connection is dropped; the next lookup reconnects.
                *self.conn.lock().await = None;
                Err(SourceError::Unavailable(format!(
                    "PostgreSQL did not answer within {:?}",
                    self.timeout
                )))
            }
        }
    }
}
