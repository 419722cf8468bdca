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

mod access;
mod admin;
mod cache;
mod log;
mod metrics;
mod plans;
mod policy;
mod quota;
mod redis;
mod secret;
mod server;

pub use access::{AccessConfig, AccessRules, Grant, TenantSet};
pub use admin::AdminConfig;
pub use cache::CacheConfig;
pub use log::{LogConfig, LogFormat};
pub use metrics::MetricsConfig;
use plans::tenant_records;
pub use plans::{DEFAULT_PLAN, PlanConfig, Plans, TenantConfig, TenantRecord, flatten};
pub use policy::{Overrides, Policies, PolicyConfig, RuleConfig};

/// A map keyed by configured names (policies, plans), looked up on every
/// check: foldhash, since SipHash's resistance to chosen keys buys nothing
/// where no request can add a key.
pub type NameMap<V> = HashMap<String, V, foldhash::fast::RandomState>;
pub use quota::{PgSslMode, PostgresConfig, QuotaConfig, SourceKind};
pub use redis::RedisConfig;
pub use secret::{Secret, SecretSource, mask_url};
pub use server::ServerConfig;

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
    /// `None`: no metrics endpoint.
    pub metrics: Option<MetricsConfig>,
    pub log: LogConfig,
    /// `[[access]]`, compiled (empty: no tables).
    pub access: Arc<AccessRules>,
    /// The policies of every plan.
    pub plans: Arc<Plans>,
    /// The `file` source's tenants.
    pub tenants: Arc<HashMap<String, TenantRecord>>,
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
    admin: Option<AdminConfig>,
    metrics: Option<MetricsConfig>,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    access: Vec<AccessConfig>,
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

/// The bounds a request is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tenant_bytes: usize,
    /// Also the bound of a cache key and of a tag.
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Tags of one cache entry.
    pub max_tags: usize,
    /// Keys plus tags of one `cache_del`.
    pub max_delete: usize,
    pub max_ttl_ms: u64,
    pub max_fill_ms: u64,
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
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(r) = &mut config.redis {
            r.resolve_paths(dir);
        }
        if let Some(pg) = config.quota.as_mut().and_then(|q| q.postgres.as_mut()) {
            pg.resolve_paths(dir);
        }
        if let Some(file) = config.quota.as_ref().and_then(|q| q.tenants_file.clone()) {
            let file = dir.join(file);
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

    /// Parses and validates; every default applies and every table is
    /// checked here, by that table's own validator.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        file.server.validate()?;
        if let Some(r) = &file.redis {
            r.validate()?;
        }
        file.cache.validate(file.server.max_frame_bytes)?;
        if let Some(m) = &file.metrics {
            m.validate()?;
        }
        QuotaConfig::validate(
            file.quota.as_ref(),
            file.redis.is_some(),
            !file.tenants.is_empty(),
        )?;
        let access = AccessRules::compile(&file.access)?;
        if access.is_configured() && file.admin.is_some() {
            return Err(invalid(
                "admin",
                "with `[[access]]` tables, admin ops are granted by `admin = true` in a rule: remove `[admin]`",
            ));
        }
        if file.server.shadow {
            // Before plans and tenants compile: their policies are shadow too.
            file.policies.values_mut().for_each(|p| p.shadow = true);
        }
        let plans = Plans::compile(&file.policies, &file.plans)?;
        let tenants = tenant_records(&file.tenants, &plans)?;
        Ok(Config {
            server: file.server,
            redis: file.redis,
            cache: file.cache,
            quota: file.quota,
            admin: file.admin.unwrap_or_default(),
            metrics: file.metrics,
            log: file.log,
            access: Arc::new(access),
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

/// Checks each `(field, value, min, max)` against its inclusive bounds.
fn in_range(checks: &[(&str, u64, u64, u64)]) -> Result<(), ConfigError> {
    for &(field, value, min, max) in checks {
        if !(min..=max).contains(&value) {
            return Err(invalid(field, format!("{value} is outside {min}..={max}")));
        }
    }
    Ok(())
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
        let leases = |r: &str| rule(&format!("{{name='c', kind='concurrency', {r}}}"));
        assert!(leases("limit=5").contains("rules[0].lease_ms"));
        assert!(leases("lease_ms=5").contains("rules[0].limit"));
        assert!(leases("limit=0, lease_ms=5").contains("rules[0].limit"));
        assert!(leases("limit=1000001, lease_ms=5").contains("1..=1000000"));
        assert!(leases("limit=5, lease_ms=0").contains("rules[0].lease_ms"));
        assert!(leases("limit=5, lease_ms=86400001").contains("one day"));
        assert!(leases("limit=5, lease_ms=5, window_ms=9").contains("does not apply"));
        assert!(
            rule("{name='a', kind='fixed_window', limit=5, window_ms=9, lease_ms=9}")
                .contains("rules[0].lease_ms")
        );
        assert!(err("[metrics]\nlisten = '127.0.0.1:0'").contains("metrics.listen"));
        assert!(err("[metrics]\nlisten = 'localhost'").contains("listen"));
        assert!(err("[log]\nformat = 'xml'").contains("unknown variant `xml`"));
        assert!(err("[policies.p]\nfailure_mode='maybe'\nrules=[]").contains("maybe"));
        let both = err("[admin]\nallowed_uids = [1]\n[[access]]\nuids = [1]\ntenants = ['*']");
        assert!(
            both.contains("`admin`") && both.contains("admin = true"),
            "{both}"
        );
    }

    #[test]
    fn tls_and_secret_mistakes_name_their_field() {
        let redis = |t: &str| err(&format!("[redis]\n{t}"));
        let tls = "url = 'rediss://h:6380'\n";
        assert!(
            redis("url = 'redis://h'\ntls_ca_file = 'ca.pem'")
                .contains("`redis.tls_ca_file`: needs `rediss://`")
        );
        assert!(redis(&format!("{tls}tls_cert_file = 'c.pem'")).contains("give both or neither"));
        assert!(
            redis(&format!("{tls}tls_insecure = true\ntls_ca_file = 'ca.pem'"))
                .contains("redis.tls_insecure")
        );
        assert!(redis("url = 'rediss://h/#insecure'").contains("tls_insecure = true"));
        let named = "tls_server_name = 'redis.test'";
        assert!(Config::from_toml(&format!("[redis]\n{tls}{named}")).is_ok());
        assert!(redis(&format!("cluster = ['rediss://a:1']\n{named}")).contains("only with `url`"));
        assert!(redis(&format!("url = 'redis://h'\n{named}")).contains("needs a `rediss://`"));
        assert!(redis(&format!("{tls}tls_server_name = 'a b'")).contains("is not a DNS name"));
        let mixed = "cluster = ['rediss://a:1', 'redis://b:1']";
        assert!(redis(mixed).contains("every address is `rediss://`"));
        assert!(
            redis("url = 'redis://h'\npassword = 'a'\npassword_env = 'B'")
                .contains("give only one of")
        );
        assert!(
            redis("url = 'redis://h'\nusername = 'u'")
                .contains("`redis.username`: needs a password")
        );
        assert!(
            redis("url = 'redis://h'\nsentinel_password = 'a'").contains("goes with `sentinels`")
        );
        let twice = redis("url = 'redis://u:hunter2@h'\npassword_file = 'pw'");
        assert!(
            twice.contains("give it in one place") && !twice.contains("hunter2"),
            "{twice}"
        );
        let bad_url = redis("url = 'redis://u:hunter2@h:notaport'");
        assert!(
            bad_url.contains("redis://u:***@h:notaport") && !bad_url.contains("hunter2"),
            "{bad_url}"
        );
        // A config dump shows no password.
        let c =
            Config::from_toml("[redis]\nurl = 'redis://h'\nusername = 'u'\npassword = 'hunter2'")
                .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));

        let pg = |url: &str, more: &str| {
            err(&format!(
                "[quota]\nsource = 'postgres'\n[quota.postgres]\nurl = '{url}'\n{more}"
            ))
        };
        assert!(pg("host=h sslmode=verify-ca", "").contains("use verify-full"));
        assert!(
            pg("host=h sslmode=require", "tls_ca_file = 'ca.pem'")
                .contains("quota.postgres.tls_ca_file")
        );
        assert!(pg("postgres://u:pw@h/db", "password_file = 'pw'").contains("in one place"));
        let ok = Config::from_toml(
            "[quota]\nsource = 'postgres'\n[quota.postgres]\nurl = 'postgres://u@h/db?sslmode=verify-full'\ntls_ca_file = 'ca.pem'",
        )
        .unwrap();
        let (_, mode) = ok.quota.unwrap().postgres.unwrap().connection().unwrap();
        assert_eq!(mode, PgSslMode::VerifyFull);
    }
}
