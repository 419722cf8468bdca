//! A small async Rust client for quotad, with the same surface as the
//! Python and Node shims: one pipelined connection, made on first use and
//! remade after a failure (with exponential backoff between attempts), and
//! a failure policy: while quotad cannot answer within `timeout`, checks
//! are answered by [`FailureMode`], cache reads miss and cache writes do
//! nothing, all marked `degraded`. Used by `quotad check`/`tenant` and the
//! benchmark.

mod connection;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use crate::config::TenantRecord;
use crate::limiter::usage::RuleUsage;
use crate::limiter::{Decision, Lease};
use crate::protocol::{
    AdminOp, CacheDelArgs, CacheGetArgs, CacheSetArgs, CheckArgs, LocalOp, Lookup, Op, ReleaseArgs,
    ReplyFields, Request, ShardOp, TenantFields,
};
use connection::Connection;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach quotad: {0}")]
    Io(String),
    #[error("the connection to quotad closed")]
    Closed,
    #[error("quotad did not answer within {0:?}")]
    Timeout(Duration),
    #[error("quotad answered {code}: {message}")]
    Server { code: String, message: String },
    #[error("malformed reply: {0}")]
    Protocol(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl ClientError {
    /// True when quotad could not be reached or did not answer (the
    /// failure policy applies), rather than answering with an error.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Io(_) | ClientError::Closed | ClientError::Timeout(_)
        )
    }
}

/// What a `check` answers while quotad is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Allowed, `degraded`.
    Open,
    /// Denied, `degraded`, with `closed_retry_after_ms`.
    Closed,
    /// The error.
    Error,
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long a call may wait for its reply. Default 500 ms.
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    /// `retry_after_ms` of a `Closed` failure answer. Default 1000.
    pub closed_retry_after_ms: u64,
    /// First and longest wait between failed connection attempts.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_millis(500),
            failure_mode: FailureMode::Open,
            closed_retry_after_ms: 1000,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// A client of one quotad. Cheap to share: calls from many tasks are
/// pipelined on one connection.
pub struct Client {
    path: PathBuf,
    options: ClientOptions,
    /// The current connection, read without a lock on every call.
    conn: ArcSwapOption<Connection>,
    /// Held while (re)connecting, so that one caller does it.
    connecting: tokio::sync::Mutex<()>,
    backoff: Mutex<Backoff>,
    next_id: AtomicU64,
}

/// When the next connection attempt may be made.
#[derive(Debug)]
struct Backoff {
    not_before: Option<Instant>,
    wait: Duration,
}

impl Client {
    /// A client that connects on first use.
    pub fn new(path: impl AsRef<Path>, options: ClientOptions) -> Client {
        let wait = options.backoff_initial;
        Client {
            path: path.as_ref().to_owned(),
            options,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            backoff: Mutex::new(Backoff {
                not_before: None,
                wait,
            }),
            next_id: AtomicU64::new(1),
        }
    }

    /// A client connected now (an unreachable quotad is an error), with
    /// the default options.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let client = Client::new(path, ClientOptions::default());
        client.connection().await?;
        Ok(client)
    }

    pub async fn hello(&self) -> Result<ReplyFields, ClientError> {
        self.call(LocalOp::Hello.into()).await
    }

    pub async fn stats(&self) -> Result<ReplyFields, ClientError> {
        self.call(LocalOp::Stats.into()).await
    }

    /// May `key` of `tenant` go ahead? `cost` 0 peeks.
    pub async fn check(
        &self,
        tenant: &str,
        key: &str,
        policy: Option<&str>,
        cost: u64,
    ) -> Result<Decision, ClientError> {
        let args = CheckArgs {
            tenant: nonempty("tenant", tenant)?,
            key: nonempty("key", key)?,
            policy: policy.map(str::to_owned),
            cost,
        };
        match self.call(ShardOp::Check(args).into()).await {
            Ok(reply) => decision(&reply),
            Err(e) => self.failed_check(e),
        }
    }

    /// Every rule of the policy as it stands for `key`, charging nothing.
    /// Without quotad there is nothing to report: the error is returned,
    /// whatever the failure mode.
    pub async fn usage(
        &self,
        tenant: &str,
        key: &str,
        policy: Option<&str>,
    ) -> Result<Vec<RuleUsage>, ClientError> {
        let args = CheckArgs {
            tenant: nonempty("tenant", tenant)?,
            key: nonempty("key", key)?,
            policy: policy.map(str::to_owned),
            cost: 0,
        };
        let reply = self.call(ShardOp::Usage(args).into()).await?;
        reply.usage().ok_or_else(|| missing("rules"))
    }

    /// Gives back the lease an allowed check took (`decision.lease`):
    /// true if it was still outstanding; false if it was released already,
    /// expired, unknown, or quotad (or, unless the failure mode is
    /// `Error`, the daemon itself) could not be asked.
    pub async fn release(
        &self,
        tenant: &str,
        key: &str,
        policy: Option<&str>,
        lease: Lease,
    ) -> Result<bool, ClientError> {
        let args = ReleaseArgs {
            tenant: nonempty("tenant", tenant)?,
            key: nonempty("key", key)?,
            policy: policy.map(str::to_owned),
            lease,
        };
        match self.call(ShardOp::Release(args).into()).await {
            Ok(reply) => reply.released.ok_or_else(|| missing("released")),
            Err(e) if e.is_unreachable() && self.options.failure_mode != FailureMode::Error => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a cache entry; `fill_ms` > 0 asks for single-flight on a miss.
    pub async fn cache_get(
        &self,
        tenant: &str,
        key: &str,
        fill_ms: u64,
    ) -> Result<Lookup, ClientError> {
        let op = ShardOp::CacheGet(CacheGetArgs {
            tenant: nonempty("tenant", tenant)?,
            key: nonempty("key", key)?,
            fill_ms,
        });
        match self.call(op.into()).await {
            Ok(reply) => reply.lookup().ok_or_else(|| missing("lookup")),
            Err(e) if e.is_unreachable() => Ok(Lookup::degraded_miss()),
            Err(e) => Err(e),
        }
    }

    /// Stores a cache entry; returns whether the store was degraded (not done).
    pub async fn cache_set(&self, set: CacheSetArgs) -> Result<bool, ClientError> {
        nonempty("tenant", &set.tenant)?;
        nonempty("key", &set.key)?;
        if set.ttl_ms == 0 {
            return Err(ClientError::Invalid("ttl_ms must be greater than 0".into()));
        }
        match self.call(ShardOp::CacheSet(Box::new(set)).into()).await {
            Ok(reply) => reply.degraded.ok_or_else(|| missing("degraded")),
            Err(e) if e.is_unreachable() => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Deletes entries by key and by tag; returns how many went.
    pub async fn cache_del(
        &self,
        tenant: &str,
        keys: &[&str],
        tags: &[&str],
    ) -> Result<u64, ClientError> {
        if keys.is_empty() && tags.is_empty() {
            return Err(ClientError::Invalid(
                "nothing to delete: give keys or tags".into(),
            ));
        }
        self.del(tenant, keys, tags, false).await
    }

    /// For a filler that will not store a value: drops the fill locks of
    /// `keys` (the callers held for them are let go, and the next caller
    /// may fill), never a stored value. Returns how many locks went.
    pub async fn cache_release_fill(
        &self,
        tenant: &str,
        keys: &[&str],
    ) -> Result<u64, ClientError> {
        if keys.is_empty() {
            return Err(ClientError::Invalid("no keys to release".into()));
        }
        self.del(tenant, keys, &[], true).await
    }

    async fn del(
        &self,
        tenant: &str,
        keys: &[&str],
        tags: &[&str],
        fill_only: bool,
    ) -> Result<u64, ClientError> {
        let op = ShardOp::CacheDel(CacheDelArgs {
            tenant: nonempty("tenant", tenant)?,
            keys: keys.iter().map(|k| k.to_string()).collect(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            fill_only,
        });
        match self.call(op.into()).await {
            Ok(reply) => reply.deleted.ok_or_else(|| missing("deleted")),
            Err(e) if e.is_unreachable() => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// A check, then (only if allowed) a cache read, in one request.
    pub async fn check_get(
        &self,
        check: CheckArgs,
        cache_key: &str,
        fill_ms: u64,
    ) -> Result<(Decision, Option<Lookup>), ClientError> {
        nonempty("tenant", &check.tenant)?;
        nonempty("key", &check.key)?;
        let get = CacheGetArgs {
            tenant: check.tenant.clone(),
            key: nonempty("cache_key", cache_key)?,
            fill_ms,
        };
        match self
            .call(ShardOp::CheckGet(check, Box::new(get)).into())
            .await
        {
            Ok(reply) => {
                let decision = decision(&reply)?;
                Ok((decision, reply.lookup()))
            }
            Err(e) => {
                let d = self.failed_check(e)?;
                let lookup = d.allowed.then(Lookup::degraded_miss);
                Ok((d, lookup))
            }
        }
    }

    /// Admin: a tenant's record at the source (`None`: unknown there).
    pub async fn tenant_get(&self, tenant: &str) -> Result<Option<TenantRecord>, ClientError> {
        let reply = self
            .call(AdminOp::TenantGet(tenant.to_owned()).into())
            .await?;
        Ok(match (reply.known, reply.plan) {
            (Some(true), Some(plan)) => Some(TenantRecord {
                plan,
                limits: reply.limits.unwrap_or_default(),
            }),
            _ => None,
        })
    }

    /// Admin: sets a tenant's record (the `redis` source).
    pub async fn tenant_set(&self, tenant: &str, record: TenantRecord) -> Result<(), ClientError> {
        self.call(AdminOp::TenantSet(tenant.to_owned(), record).into())
            .await
            .map(drop)
    }

    /// Admin: deletes a tenant's record; true if it existed.
    pub async fn tenant_delete(&self, tenant: &str) -> Result<bool, ClientError> {
        let reply = self
            .call(AdminOp::TenantDelete(tenant.to_owned()).into())
            .await?;
        Ok(reply.deleted == Some(1))
    }

    /// Admin: every tenant the source lists.
    pub async fn tenant_list(&self) -> Result<Vec<TenantFields>, ClientError> {
        let reply = self.call(AdminOp::TenantList.into()).await?;
        Ok(reply.tenants.unwrap_or_default())
    }

    /// Sends one request and waits (at most `timeout`) for its reply; an
    /// error reply becomes [`ClientError::Server`].
    pub async fn call(&self, op: Op) -> Result<ReplyFields, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = self.connection().await?;
        let rx = conn.send(&Request { id, op })?;
        let reply = match tokio::time::timeout(self.options.timeout, rx).await {
            Ok(reply) => reply.map_err(|_| ClientError::Closed)??,
            Err(_) => {
                conn.abandon(id);
                return Err(ClientError::Timeout(self.options.timeout));
            }
        };
        match (reply.ok, &reply.error) {
            (true, _) => Ok(reply),
            (false, Some(e)) => Err(ClientError::Server {
                code: e.code.clone(),
                message: e.message.clone(),
            }),
            (false, None) => Err(missing("error")),
        }
    }

    /// The open connection, or a new one if the backoff allows.
    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        if let Some(c) = self.conn.load_full().filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        let _connecting = self.connecting.lock().await;
        // Another caller may have connected meanwhile.
        if let Some(c) = self.conn.load_full().filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        self.conn.store(None);
        let now = Instant::now();
        if let Some(t) = self.backoff.lock().unwrap().not_before.filter(|t| *t > now) {
            return Err(ClientError::Io(format!(
                "{} unreachable; next attempt in {:?}",
                self.path.display(),
                t - now
            )));
        }
        match Connection::open(&self.path).await {
            Ok(c) => {
                let c = Arc::new(c);
                self.conn.store(Some(c.clone()));
                *self.backoff.lock().unwrap() = Backoff {
                    not_before: None,
                    wait: self.options.backoff_initial,
                };
                Ok(c)
            }
            Err(e) => {
                let mut b = self.backoff.lock().unwrap();
                b.not_before = Some(now + b.wait);
                b.wait = (b.wait * 2).min(self.options.backoff_max);
                Err(ClientError::Io(format!("{}: {e}", self.path.display())))
            }
        }
    }

    /// The answer of a check that quotad could not give.
    fn failed_check(&self, e: ClientError) -> Result<Decision, ClientError> {
        if !e.is_unreachable() || self.options.failure_mode == FailureMode::Error {
            return Err(e);
        }
        let allowed = self.options.failure_mode == FailureMode::Open;
        Ok(Decision {
            allowed,
            limit: 0,
            remaining: 0,
            reset_ms: 0,
            retry_after_ms: if allowed {
                0
            } else {
                self.options.closed_retry_after_ms
            },
            degraded: true,
            rule: "".into(),
            kind: "",
            window_ms: 0,
            lease: None,
            shadow_rule: None,
        })
    }
}

fn nonempty(field: &str, value: &str) -> Result<String, ClientError> {
    if value.is_empty() {
        return Err(ClientError::Invalid(format!("`{field}` must not be empty")));
    }
    Ok(value.to_owned())
}

/// The decision a check reply carries.
fn decision(reply: &ReplyFields) -> Result<Decision, ClientError> {
    let d = reply.decision().ok_or_else(|| missing("decision"))?;
    d.map_err(ClientError::Protocol)
}

fn missing(what: &str) -> ClientError {
    ClientError::Protocol(format!("a reply without its {what}"))
}
