//! How quotad reaches Redis: one server, a Cluster, or a master found
//! through Sentinel. Whatever the topology, a round trip is "run these
//! commands, one result each".

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Cmd, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};
use tokio::sync::{Mutex, OnceCell};

use crate::config::RedisConfig;

pub enum Conn {
    /// One Redis (multiplexed, reconnecting by itself).
    Single(ConnectionManager),
    /// Redis Cluster; connected on first use, so quotad starts (and fails
    /// open) while the cluster is still down.
    Cluster(Box<(ClusterClient, OnceCell<ClusterConnection>)>),
    /// The master named by Sentinel, looked up again after errors.
    Sentinel(Box<Sentinel>),
}

pub struct Sentinel {
    client: Mutex<SentinelClient>,
    master: ArcSwapOption<ConnectionManager>,
    config: ConnectionManagerConfig,
}

impl Conn {
    /// Prepares the connection without waiting for Redis to be up.
    pub fn new(cfg: &RedisConfig) -> RedisResult<Conn> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(cfg.probe_interval_ms));
        if let Some(url) = &cfg.url {
            let client = redis::Client::open(url.as_str())?;
            return Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
                client,
                manager_config,
            )?));
        }
        if !cfg.sentinels.is_empty() {
            return Ok(Conn::Sentinel(Box::new(Sentinel {
                client: Mutex::new(sentinel_client(cfg)?),
                master: ArcSwapOption::empty(),
                config: manager_config,
            })));
        }
        let client = ClusterClient::builder(cfg.cluster.iter().map(String::as_str))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1)
            .build()?;
        Ok(Conn::Cluster(Box::new((client, OnceCell::new()))))
    }

    /// True when keys of different slots may live on different servers.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Runs `cmds`, one result each (a transport failure fails them all).
    pub async fn run(&self, cmds: Vec<Cmd>) -> Vec<RedisResult<Value>> {
        let n = cmds.len();
        match self {
            Conn::Single(cm) => pipeline(cm, cmds).await,
            Conn::Cluster(cluster) => {
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
            Conn::Sentinel(s) => {
                let master = match s.master().await {
                    Ok(m) => m,
                    Err(e) => return vec![Err(e); n],
                };
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

fn sentinel_client(cfg: &RedisConfig) -> RedisResult<SentinelClient> {
    SentinelClient::build(
        cfg.sentinels.iter().map(String::as_str).collect(),
        cfg.master_name.clone().unwrap_or_default(),
        None,
        SentinelServerType::Master,
    )
}

/// A pub/sub connection to the configured Redis (in a Cluster, the first
/// seed node: PUBLISH reaches every node).
pub async fn pubsub(cfg: &RedisConfig) -> RedisResult<redis::aio::PubSub> {
    let client = match (&cfg.url, cfg.cluster.first()) {
        (Some(url), _) => redis::Client::open(url.as_str())?,
        (None, Some(node)) => redis::Client::open(node.as_str())?,
        (None, None) => sentinel_client(cfg)?.async_get_client().await?,
    };
    client.get_async_pubsub().await
}

impl Sentinel {
    /// The current master, asking Sentinel if it is not known.
    async fn master(&self) -> RedisResult<ConnectionManager> {
        if let Some(m) = self.master.load_full() {
            return Ok((*m).clone());
        }
        let mut client = self.client.lock().await;
        if let Some(m) = self.master.load_full() {
            return Ok((*m).clone()); // another round trip looked it up meanwhile
        }
        let master = client.async_get_client().await?;
        tracing::info!(master = ?master.get_connection_info().addr(), "Sentinel names the Redis master");
        let cm = ConnectionManager::new_lazy_with_config(master, self.config.clone())?;
        self.master.store(Some(Arc::new(cm.clone())));
        Ok(cm)
    }
}

/// An error after which the master may have moved.
fn master_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

async fn pipeline(cm: &ConnectionManager, cmds: Vec<Cmd>) -> Vec<RedisResult<Value>> {
    let n = cmds.len();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for c in cmds {
        pipe.add_command(c);
    }
    match pipe
        .query_async::<Vec<RedisResult<Value>>>(&mut cm.clone())
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
