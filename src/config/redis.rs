//! `[redis]`: where shared state lives.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::secret::{Secret, SecretSource, mask_url, relative_to};
use super::{ConfigError, IDENT_RULE, invalid, is_ident};

/// `[redis]`: where shared state lives. Omit the table for the memory backend.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// A single Redis: `redis://host:port[/db]`, `rediss://host:port` (TLS),
    /// `redis+unix:///path` or `unix:///path`. Give one of `url`, `cluster`
    /// and `sentinels`.
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
    /// The ACL user of the master (or every Cluster node). Needs a password.
    pub username: Option<String>,
    /// The password: inline, or read from `password_file` (at start and on
    /// SIGHUP) or the variable `password_env`. At most one of the three.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// The same for the sentinels themselves.
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<Secret>,
    pub sentinel_password_file: Option<PathBuf>,
    pub sentinel_password_env: Option<String>,
    /// TLS (`rediss://` addresses): the CA certificates (PEM) that sign the
    /// servers'; default: the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Mutual TLS: the client certificate chain and its key (PEM), together.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Accept any server certificate (warned about loudly at start).
    #[serde(default)]
    pub tls_insecure: bool,
    /// The name the server's certificate must carry (and the SNI sent),
    /// when `url` is an IP address or another name. Only with `url`.
    pub tls_server_name: Option<String>,
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
                .map_err(|e| invalid(field, format!("`{}`: {e}", mask_url(url))))?;
        }
        self.validate_auth()?;
        self.validate_tls()?;
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

    /// Every address, with passwords masked: for the log.
    pub fn addresses(&self) -> String {
        let all: Vec<String> = (self.url.iter())
            .chain(&self.cluster)
            .chain(&self.sentinels)
            .map(|u| mask_url(u))
            .collect();
        match (&self.url, self.cluster.is_empty()) {
            (Some(_), _) => all.join(","),
            (None, true) => format!("sentinel {}", all.join(",")),
            (None, false) => format!("cluster {}", all.join(",")),
        }
    }

    /// The password of the master (or every Cluster node).
    pub fn password_source(&self) -> SecretSource<'_> {
        SecretSource {
            field: "redis.password",
            inline: self.password.as_ref(),
            file: self.password_file.as_deref(),
            env: self.password_env.as_deref(),
        }
    }

    /// The password of the sentinels.
    pub fn sentinel_password_source(&self) -> SecretSource<'_> {
        SecretSource {
            field: "redis.sentinel_password",
            inline: self.sentinel_password.as_ref(),
            file: self.sentinel_password_file.as_deref(),
            env: self.sentinel_password_env.as_deref(),
        }
    }

    /// True when the addresses are `rediss://`.
    pub fn uses_tls(&self) -> bool {
        self.all_urls().any(|u| u.starts_with("rediss://"))
    }

    /// Makes the file paths relative to the config file's directory.
    pub(super) fn resolve_paths(&mut self, dir: &Path) {
        for p in [
            &mut self.password_file,
            &mut self.sentinel_password_file,
            &mut self.tls_ca_file,
            &mut self.tls_cert_file,
            &mut self.tls_key_file,
        ] {
            relative_to(dir, p);
        }
    }

    fn all_urls(&self) -> impl Iterator<Item = &String> {
        self.url.iter().chain(&self.cluster).chain(&self.sentinels)
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let (master, sentinel) = (self.password_source(), self.sentinel_password_source());
        master.validate()?;
        sentinel.validate()?;
        if self.username.is_some() && !master.is_given() {
            return Err(invalid(
                "redis.username",
                "needs a password (`password`, `password_file` or `password_env`)",
            ));
        }
        if self.sentinel_username.is_some() && !sentinel.is_given() {
            return Err(invalid(
                "redis.sentinel_username",
                "needs a password (`sentinel_password`, `sentinel_password_file` or `sentinel_password_env`)",
            ));
        }
        if self.sentinels.is_empty() && (self.sentinel_username.is_some() || sentinel.is_given()) {
            return Err(invalid(
                "redis.sentinel_password",
                "goes with `sentinels`, and only with them",
            ));
        }
        if master.is_given() || self.username.is_some() {
            let inline = (self.url.iter().chain(&self.cluster)).any(|u| {
                redis::IntoConnectionInfo::into_connection_info(u.as_str()).is_ok_and(|c| {
                    c.redis_settings().password().is_some()
                        || c.redis_settings().username().is_some()
                })
            });
            if inline {
                return Err(invalid(
                    "redis.password",
                    "the URL has a user or password already: give it in one place",
                ));
            }
        }
        Ok(())
    }

    fn validate_server_name(&self, name: &str, tls: usize) -> Result<(), ConfigError> {
        let field = "redis.tls_server_name";
        if self.url.is_none() {
            return Err(invalid(
                field,
                "only with `url`: a Cluster's nodes and a Sentinel's master are reached \
                 by the addresses they announce (see docs/config.md)",
            ));
        }
        if tls == 0 {
            return Err(invalid(field, "needs a `rediss://` address"));
        }
        if self.tls_insecure {
            return Err(invalid(
                field,
                "`tls_insecure` checks no certificate, so the name would be unused",
            ));
        }
        if rustls::pki_types::ServerName::try_from(name).is_err() {
            return Err(invalid(
                field,
                format!("`{name}` is not a DNS name or an IP address"),
            ));
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let tls = self
            .all_urls()
            .filter(|u| u.starts_with("rediss://"))
            .count();
        // A Sentinel's master is reached the way the sentinels are.
        if tls != 0 && tls != self.all_urls().count() {
            return Err(invalid(
                "redis",
                "either every address is `rediss://` (TLS) or none",
            ));
        }
        let files = [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        ];
        for (field, file) in files {
            if file.is_some() && tls == 0 {
                return Err(invalid(field, "needs `rediss://` addresses"));
            }
        }
        if self.tls_insecure && tls == 0 {
            return Err(invalid("redis.tls_insecure", "needs `rediss://` addresses"));
        }
        if self.tls_insecure && self.tls_ca_file.is_some() {
            return Err(invalid(
                "redis.tls_insecure",
                "checks no certificate, so `tls_ca_file` would be unused: give one of them",
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "redis.tls_cert_file",
                "goes with `tls_key_file`: give both or neither",
            ));
        }
        if let Some(name) = &self.tls_server_name {
            self.validate_server_name(name, tls)?;
        }
        if self.all_urls().any(|u| u.ends_with("#insecure")) {
            return Err(invalid(
                "redis",
                "write `tls_insecure = true` instead of `#insecure`",
            ));
        }
        Ok(())
    }
}
