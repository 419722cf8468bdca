//! How quotad reaches Redis: one server, a Cluster, or a master found
//! through Sentinel. Whatever the topology, a round trip is "run these
//! commands, one result each".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ClientTlsConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisError, RedisResult, ServerErrorKind, TlsCertificates, TlsMode, Value,
};
use tokio::sync::{Mutex, OnceCell};

use super::named::{Named, named_pubsub};
use crate::config::{ConfigError, RedisConfig, Secret, SecretSource};

/// The connection, rebuilt when a password file changes (SIGHUP).
pub struct Conn {
    cfg: RedisConfig,
    topology: ArcSwap<Topology>,
    /// The passwords the topology was built with (master, sentinels).
    secrets: std::sync::Mutex<Secrets>,
    /// An authentication or certificate failure has been logged since the
    /// last success: log it once, not per round trip.
    reported: AtomicBool,
}

type Secrets = (Option<Secret>, Option<Secret>);

enum Topology {
    /// One Redis (multiplexed, reconnecting by itself).
    Single(ConnectionManager),
    /// One Redis whose certificate is checked against `tls_server_name`.
    Named(Box<Named>),
    /// Redis Cluster; connected on first use, so quotad starts (and fails
    /// open) while the cluster is still down.
    Cluster(Box<(ClusterClient, OnceCell<ClusterConnection>)>),
    /// The master named by Sentinel, looked up again after errors and
    /// every [`MASTER_RECHECK`].
    Sentinel(Arc<Sentinel>),
}

/// How often Sentinel is asked again for the master while round trips
/// succeed. A planned failover (`SENTINEL FAILOVER`) leaves the old master
/// up and writable until Sentinel demotes it, about 10 s later: errors
/// alone would notice only then, and the decisions made there meanwhile
/// are lost when it resyncs from the new master.
const MASTER_RECHECK: Duration = Duration::from_secs(1);

pub struct Sentinel {
    client: Mutex<SentinelClient>,
    master: ArcSwapOption<Master>,
    config: ConnectionManagerConfig,
    /// When Sentinel last named the master (or a recheck was claimed).
    checked: std::sync::Mutex<Instant>,
}

/// The master's connection, and its address as Sentinel gave it.
struct Master {
    conn: ConnectionManager,
    addr: String,
}

/// Why the Redis connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A password or certificate file (or variable) that cannot be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid Redis settings: {0}")]
    Redis(#[from] RedisError),
}

impl Conn {
    /// Prepares the connection without waiting for Redis to be up; reads
    /// the password and certificate files.
    pub fn new(cfg: &RedisConfig) -> Result<Conn, SetupError> {
        let secrets = read_secrets(cfg)?;
        if cfg.tls_insecure {
            tracing::warn!(
                "redis.tls_insecure = true: the Redis server's certificate is NOT checked; \
                 anyone on the path can read and change quotad's traffic"
            );
        }
        Ok(Conn {
            topology: ArcSwap::from_pointee(Topology::new(cfg, &secrets)?),
            cfg: cfg.clone(),
            secrets: std::sync::Mutex::new(secrets),
            reported: AtomicBool::new(false),
        })
    }

    /// Reads the password files (or variables) again; if a password
    /// changed, later round trips use a new connection made with it.
    /// True if one changed.
    pub fn reload_secrets(&self) -> Result<bool, SetupError> {
        let fresh = read_secrets(&self.cfg)?;
        let mut current = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        if *current == fresh {
            return Ok(false);
        }
        self.topology
            .store(Arc::new(Topology::new(&self.cfg, &fresh)?));
        *current = fresh;
        self.reported.store(false, Ordering::Relaxed);
        Ok(true)
    }

    /// True when keys of different slots may live on different servers.
    pub fn is_cluster(&self) -> bool {
        matches!(**self.topology.load(), Topology::Cluster(_))
    }

    /// Runs `cmds`, one result each (a transport failure fails them all).
    pub async fn run(&self, cmds: Vec<Cmd>) -> Vec<RedisResult<Value>> {
        let results = self.topology.load_full().run(cmds).await;
        match results.iter().find_map(|r| r.as_ref().err()) {
            Some(e) => self.report(e),
            // Read first: shards share this flag, and nearly every round trip succeeds.
            None if self.reported.load(Ordering::Relaxed) => {
                self.reported.store(false, Ordering::Relaxed)
            }
            None => {}
        }
        results
    }

    /// Logs, once until the next success, a failure that will not pass by
    /// itself: credentials refused or a TLS handshake failed. The log
    /// names the user and where the password came from, never the password.
    fn report(&self, e: &RedisError) {
        let tls = crate::tls::handshake_failed(e);
        if !(refused_credentials(e) || tls.is_some()) || self.reported.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let cfg = &self.cfg;
        if let Some(reason) = tls {
            tracing::error!(
                redis = %cfg.addresses(),
                ca = %trust_anchors(cfg),
                reason,
                "Redis TLS handshake failed; answering by failure mode"
            );
        } else {
            tracing::error!(
                redis = %cfg.addresses(),
                user = cfg.username.as_deref().unwrap_or("default"),
                password = password_origin(cfg.password_source()),
                sentinel_password = password_origin(cfg.sentinel_password_source()),
                error = %e,
                "Redis refused quotad's credentials; answering by failure mode (fix the password and send SIGHUP)"
            );
        }
    }
}

/// Redis refused the user or password. A Cluster wraps the error of its
/// first connections in an I/O error that keeps only its text.
fn refused_credentials(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed
        || e.code().is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH")
        || e.to_string().contains("AuthenticationFailed")
}

/// The current passwords of the master and of the sentinels.
fn read_secrets(cfg: &RedisConfig) -> Result<Secrets, ConfigError> {
    Ok((
        cfg.password_source().read()?,
        cfg.sentinel_password_source().read()?,
    ))
}

/// Where a password comes from, for the log (the file or variable name).
fn password_origin(src: SecretSource<'_>) -> String {
    match (src.inline, src.file, src.env) {
        (Some(_), _, _) => "inline".into(),
        (_, Some(f), _) => format!("file {}", f.display()),
        (_, _, Some(v)) => format!("environment variable {v}"),
        _ => "none".into(),
    }
}

/// What the server's certificate is checked against, for messages.
pub fn trust_anchors(cfg: &RedisConfig) -> String {
    match &cfg.tls_ca_file {
        Some(f) => format!("tls_ca_file {}", f.display()),
        None => "the system's root certificates".into(),
    }
}

/// The certificates of `[redis]`: its CA and client certificate files.
pub(super) fn certificates(cfg: &RedisConfig) -> Result<Option<TlsCertificates>, ConfigError> {
    if !cfg.uses_tls() || cfg.tls_insecure {
        return Ok(None);
    }
    let root_cert = match &cfg.tls_ca_file {
        Some(f) => Some(crate::tls::read_certs("redis.tls_ca_file", f)?),
        None => None,
    };
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: crate::tls::read_certs("redis.tls_cert_file", cert)?,
            client_key: crate::tls::read_key("redis.tls_key_file", key)?,
        }),
        _ => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The connection info of `url` with `[redis]`'s user, password and TLS
/// settings.
pub(super) fn connection_info(
    cfg: &RedisConfig,
    url: &str,
    password: Option<&Secret>,
) -> RedisResult<ConnectionInfo> {
    let mut info = url.into_connection_info()?;
    if let Some(pw) = password {
        let mut redis = info.redis_settings().clone().set_password(pw.expose());
        if let Some(user) = &cfg.username {
            redis = redis.set_username(user);
        }
        info = info.set_redis_settings(redis);
    }
    if let ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone()
        && cfg.tls_insecure
    {
        info = info.set_addr(ConnectionAddr::TcpTls {
            host,
            port,
            insecure: true,
            tls_params: None,
        });
    }
    Ok(info)
}

/// A client for one address (a standalone Redis, a Cluster node).
fn client(cfg: &RedisConfig, url: &str, password: Option<&Secret>) -> Result<Client, SetupError> {
    let info = connection_info(cfg, url, password)?;
    Ok(match certificates(cfg)? {
        Some(certs) => Client::build_with_tls(info, certs)?,
        None => Client::open(info)?,
    })
}

impl Topology {
    fn new(
        cfg: &RedisConfig,
        (password, sentinel_password): &Secrets,
    ) -> Result<Topology, SetupError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(cfg.probe_interval_ms));
        if let (Some(url), Some(name)) = (&cfg.url, &cfg.tls_server_name) {
            let named = Named::new(cfg, name, url, password.as_ref(), timeout)?;
            return Ok(Topology::Named(Box::new(named)));
        }
        if let Some(url) = &cfg.url {
            return Ok(Topology::Single(ConnectionManager::new_lazy_with_config(
                client(cfg, url, password.as_ref())?,
                manager_config,
            )?));
        }
        if !cfg.sentinels.is_empty() {
            return Ok(Topology::Sentinel(Arc::new(Sentinel {
                client: Mutex::new(sentinel_client(
                    cfg,
                    password.as_ref(),
                    sentinel_password.as_ref(),
                )?),
                master: ArcSwapOption::empty(),
                config: manager_config,
                checked: std::sync::Mutex::new(Instant::now()),
            })));
        }
        let nodes = (cfg.cluster.iter())
            .map(|u| connection_info(cfg, u, password.as_ref()))
            .collect::<RedisResult<Vec<_>>>()?;
        let mut builder = ClusterClient::builder(nodes)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1);
        if let Some(certs) = certificates(cfg)? {
            builder = builder.certs(certs);
        }
        Ok(Topology::Cluster(Box::new((
            builder.build()?,
            OnceCell::new(),
        ))))
    }

    async fn run(&self, cmds: Vec<Cmd>) -> Vec<RedisResult<Value>> {
        let n = cmds.len();
        match self {
            Topology::Single(cm) => pipeline(cm, cmds).await,
            Topology::Named(named) => named.run(cmds).await,
            Topology::Cluster(cluster) => {
                let (client, cell) = &**cluster;
                let conn = match cell.get_or_try_init(|| client.get_async_connection()).await {
                    Ok(c) => c,
                    Err(e) => return vec![Err(e); n],
                };
                join_all(cmds.into_iter().map(|c| {
                    let mut conn = conn.clone();
                    async move { c.query_async::<Value>(&mut conn).await }
                }))
                .await
            }
            Topology::Sentinel(s) => {
                let master = match s.master().await {
                    Ok(m) => m,
                    Err(e) => return vec![Err(e); n],
                };
                s.recheck_if_due();
                let results = pipeline(&master, cmds).await;
                if results
                    .iter()
                    .any(|r| matches!(r, Err(e) if master_lost(e)))
                {
                    // Failed over, or gone: ask Sentinel again next time.
                    s.master.store(None);
                }
                results
            }
        }
    }
}

/// The sentinels' client: the sentinels and the master it names are
/// reached the same way (TLS or not), each with its own credentials.
fn sentinel_client(
    cfg: &RedisConfig,
    password: Option<&Secret>,
    sentinel_password: Option<&Secret>,
) -> Result<SentinelClient, SetupError> {
    let addrs = (cfg.sentinels.iter())
        .map(|u| Ok(u.as_str().into_connection_info()?.addr().clone()))
        .collect::<RedisResult<Vec<_>>>()?;
    let mut b = SentinelClientBuilder::new(
        addrs,
        cfg.master_name.clone().unwrap_or_default(),
        SentinelServerType::Master,
    )?;
    if cfg.uses_tls() {
        let mode = match cfg.tls_insecure {
            true => TlsMode::Insecure,
            false => TlsMode::Secure,
        };
        b = b
            .set_client_to_sentinel_tls_mode(mode)
            .set_client_to_redis_tls_mode(mode);
        if let Some(certs) = certificates(cfg)? {
            b = b
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_certificates(certs);
        }
    }
    if let Some(pw) = password {
        b = b.set_client_to_redis_password(pw.expose());
        if let Some(user) = &cfg.username {
            b = b.set_client_to_redis_username(user);
        }
    }
    if let Some(pw) = sentinel_password {
        b = b.set_client_to_sentinel_password(pw.expose());
        if let Some(user) = &cfg.sentinel_username {
            b = b.set_client_to_sentinel_username(user);
        }
    }
    Ok(b.build()?)
}

/// A set-up failure as the redis error the side connections report.
fn setup(e: SetupError) -> RedisError {
    match e {
        SetupError::Redis(e) => e,
        SetupError::Config(e) => RedisError::from((
            ErrorKind::InvalidClientConfig,
            "Redis settings",
            e.to_string(),
        )),
    }
}

/// A pub/sub connection to the configured Redis (in a Cluster, the first
/// seed node: PUBLISH reaches every node).
pub async fn pubsub(cfg: &RedisConfig) -> RedisResult<redis::aio::PubSub> {
    let (password, sentinel_password) = read_secrets(cfg).map_err(|e| setup(e.into()))?;
    if let (Some(url), Some(name)) = (&cfg.url, &cfg.tls_server_name) {
        return named_pubsub(cfg, name, url, password.as_ref()).await;
    }
    let client = match (&cfg.url, cfg.cluster.first()) {
        (Some(url), _) | (None, Some(url)) => client(cfg, url, password.as_ref()).map_err(setup)?,
        (None, None) => {
            sentinel_client(cfg, password.as_ref(), sentinel_password.as_ref())
                .map_err(setup)?
                .async_get_client()
                .await?
        }
    };
    client.get_async_pubsub().await
}

/// Where the near cache's tracking connection goes, if this topology has
/// one: the configured Redis, or the master Sentinel names now. Its client
/// speaks RESP3 (invalidations arrive as push messages on the same
/// connection). `Ok(None)`: the topology has no single master to track
/// (a Cluster; a Redis reached with `tls_server_name`).
pub(super) async fn tracking_client(cfg: &RedisConfig) -> RedisResult<Option<(Client, String)>> {
    let (password, sentinel_password) = read_secrets(cfg).map_err(|e| setup(e.into()))?;
    let found = match (&cfg.url, &cfg.tls_server_name) {
        (Some(_), Some(_)) => return Ok(None),
        (Some(url), None) => client(cfg, url, password.as_ref()).map_err(setup)?,
        (None, _) if cfg.sentinels.is_empty() => return Ok(None),
        (None, _) => {
            sentinel_client(cfg, password.as_ref(), sentinel_password.as_ref())
                .map_err(setup)?
                .async_get_client()
                .await?
        }
    };
    let info = found.get_connection_info().clone();
    let addr = info.addr().to_string();
    let redis = (info.redis_settings().clone()).set_protocol(redis::ProtocolVersion::RESP3);
    let info = info.set_redis_settings(redis);
    let client = match certificates(cfg).map_err(|e| setup(e.into()))? {
        Some(certs) => Client::build_with_tls(info, certs)?,
        None => Client::open(info)?,
    };
    Ok(Some((client, addr)))
}

impl Conn {
    /// The master the round trips go to now, on Sentinel (`None`
    /// elsewhere, or while it is being looked up).
    pub fn sentinel_master(&self) -> Option<String> {
        match &**self.topology.load() {
            Topology::Sentinel(s) => s.master.load().as_ref().map(|m| m.addr.clone()),
            _ => None,
        }
    }
}

impl Sentinel {
    /// The current master, asking Sentinel if it is not known.
    async fn master(&self) -> RedisResult<ConnectionManager> {
        if let Some(m) = self.master.load_full() {
            return Ok(m.conn.clone());
        }
        let mut client = self.client.lock().await;
        match self.master.load_full() {
            Some(m) => Ok(m.conn.clone()), // another round trip looked it up meanwhile
            None => self.ask(&mut client).await,
        }
    }

    /// Asks Sentinel which server is the master; keeps the connection if
    /// it is the same one.
    async fn ask(&self, client: &mut SentinelClient) -> RedisResult<ConnectionManager> {
        let found = client.async_get_client().await?;
        *self.checked.lock().unwrap() = Instant::now();
        let addr = found.get_connection_info().addr().to_string();
        if let Some(m) = self.master.load_full()
            && m.addr == addr
        {
            return Ok(m.conn.clone());
        }
        tracing::info!(master = %addr, "Sentinel names the Redis master");
        let conn = ConnectionManager::new_lazy_with_config(found, self.config.clone())?;
        let master = Master {
            conn: conn.clone(),
            addr,
        };
        self.master.store(Some(Arc::new(master)));
        Ok(conn)
    }

    /// Once [`MASTER_RECHECK`] has passed since Sentinel last answered,
    /// asks it again in the background (round trips go on meanwhile). Its
    /// failures are left to the round trips' own errors.
    fn recheck_if_due(self: &Arc<Self>) {
        {
            let mut checked = self.checked.lock().unwrap();
            if checked.elapsed() < MASTER_RECHECK {
                return;
            }
            *checked = Instant::now(); // claimed: one recheck at a time
        }
        let s = self.clone();
        tokio::spawn(async move {
            if let Ok(mut client) = s.client.try_lock()
                && let Err(e) = s.ask(&mut client).await
            {
                tracing::debug!(error = %e, "asking Sentinel for the master again failed");
            }
        });
    }
}

/// An error after which the master may have moved.
fn master_lost(e: &RedisError) -> bool {
    connection_lost(e) || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// An error after which the connection is not to be used again.
pub(super) fn connection_lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

pub(super) async fn pipeline<C>(conn: &C, cmds: Vec<Cmd>) -> Vec<RedisResult<Value>>
where
    C: redis::aio::ConnectionLike + Clone,
{
    let n = cmds.len();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for c in cmds {
        pipe.add_command(c);
    }
    match pipe
        .query_async::<Vec<RedisResult<Value>>>(&mut conn.clone())
        .await
    {
        Ok(results) if results.len() == n => results,
        Ok(_) => vec![
            Err(RedisError::from((
                ErrorKind::Client,
                "pipeline reply of the wrong length"
            )));
            n
        ],
        Err(e) => vec![Err(e); n],
    }
}
