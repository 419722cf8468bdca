//! The near cache's tracking connection: one RESP3 connection to the Redis
//! master with `CLIENT TRACKING ON BCAST PREFIX <prefix>:c:{`, so Redis
//! tells it of every change to any cache entry (and nothing else, see
//! [`Keys::entry_prefix`]): writes and deletes by any client or script,
//! expiry, eviction, and `FLUSHALL`/`FLUSHDB` (a null message).
//!
//! Push messages are applied to the [`NearCache`] inside redis-rs's reader,
//! before any later reply on this connection is delivered. So a `PING`
//! answered here means every invalidation Redis sent before it has been
//! applied: [`Tracker::sync`], which a round trip that wrote cache entries
//! awaits before answering, so that this quotad's own `cache_set`,
//! `cache_del` and tag deletes are never followed by a near hit of the old
//! value.
//!
//! Until tracking is on, and from the moment the connection is lost (a
//! disconnect, a failed `PING`, a Sentinel failover to another master), the
//! near cache is empty and keeps nothing; it is set up again every
//! `probe_interval_ms`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use std::os::fd::AsFd;

use redis::{AsyncConnectionConfig, ConnectionAddr, PushInfo, PushKind, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, tracking_client};
use super::heard;
use crate::config::RedisConfig;
use crate::keys::Keys;
use crate::near::{CaughtUp, NearCache};

/// How often the connection is checked (a `PING`; on Sentinel, whether the
/// round trips still go to the master it tracks).
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The name the connection gives itself (`CLIENT LIST`), with the pid.
pub fn client_name() -> String {
    format!("quotad-near-{}", std::process::id())
}

/// A handle on the tracking connection, for [`Tracker::sync`].
pub struct Tracker {
    near: Arc<NearCache>,
    conn: Arc<ArcSwapOption<MultiplexedConnection>>,
    timeout: Duration,
}

impl Tracker {
    /// Starts tracking for `near` in the background, until `stop`.
    pub fn spawn(
        cfg: &RedisConfig,
        near: Arc<NearCache>,
        data: Arc<Conn>,
        stop: CancellationToken,
    ) -> Tracker {
        let conn = Arc::new(ArcSwapOption::empty());
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let task = Task {
            cfg: cfg.clone(),
            prefix: Keys::new(&cfg.prefix).entry_prefix(),
            near: near.clone(),
            conn: conn.clone(),
            data,
            timeout,
            retry: Duration::from_millis(cfg.probe_interval_ms),
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = task.run() => {}
                _ = stop.cancelled() => {}
            }
        });
        Tracker {
            near,
            conn,
            timeout,
        }
    }

    /// Returns once every invalidation Redis sent before now has been
    /// applied. If that cannot be known by `deadline` (tracking down or
    /// slow), the near cache is flushed: either way nothing old is served.
    pub async fn sync(&self, deadline: tokio::time::Instant) {
        if !self.near.is_up() {
            return;
        }
        let Some(conn) = self.conn.load_full() else {
            self.near.flush();
            return;
        };
        let limit = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !ping(&mut (*conn).clone(), limit.min(self.timeout)).await {
            self.near.flush();
        }
    }
}

/// One tracking connection, set up.
struct Tracking {
    conn: MultiplexedConnection,
    /// Where it goes, as Sentinel names the master (or the configured URL).
    addr: String,
    /// Hears of the connection's end.
    lost: tokio::sync::mpsc::UnboundedReceiver<()>,
    /// False once given up: its end, reported late, is then ignored.
    live: Arc<AtomicBool>,
    heard: Option<Box<dyn CaughtUp>>,
}

/// A multiplexed connection over `stream`, its reads watched; its driver
/// runs until the connection ends.
async fn attach<S>(
    settings: &redis::RedisConnectionInfo,
    stream: S,
    config: AsyncConnectionConfig,
) -> redis::RedisResult<(MultiplexedConnection, Option<Box<dyn CaughtUp>>)>
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
{
    let (stream, heard) = heard::watch(stream)?;
    let (conn, driver) = MultiplexedConnection::new_with_config(settings, stream, config).await?;
    tokio::spawn(driver);
    Ok((conn, Some(Box::new(heard))))
}

struct Task {
    cfg: RedisConfig,
    prefix: String,
    near: Arc<NearCache>,
    conn: Arc<ArcSwapOption<MultiplexedConnection>>,
    data: Arc<Conn>,
    timeout: Duration,
    retry: Duration,
}

impl Task {
    async fn run(self) {
        let mut said: Option<String> = None;
        loop {
            match self.connect().await {
                Ok(Some(Tracking {
                    conn,
                    addr,
                    mut lost,
                    live,
                    heard,
                })) => {
                    if said.take().is_some() {
                        tracing::info!(redis = %addr, "near cache tracking on again");
                    } else {
                        tracing::debug!(redis = %addr, "near cache tracking on");
                    }
                    self.conn.store(Some(Arc::new(conn.clone())));
                    self.near.tracking_up(heard);
                    let why = self.watch(conn, &addr, &mut lost).await;
                    // Its own end, reported later, must not stop the next one.
                    live.store(false, Ordering::SeqCst);
                    self.conn.store(None);
                    self.near.tracking_down();
                    tracing::info!(redis = %addr, reason = why, "near cache tracking lost: near cache flushed, off until it is back");
                    said = Some(why.into());
                }
                Ok(None) => {
                    tracing::info!(
                        "near cache off: a Redis Cluster, or a Redis reached with tls_server_name, is not tracked (see docs/config.md, near_max_bytes)"
                    );
                    return;
                }
                Err(e) => {
                    let e = e.to_string();
                    if said.as_deref() != Some(&e) {
                        tracing::warn!(error = %e, "near cache tracking could not be set up: near cache off until it can");
                        said = Some(e);
                    }
                }
            }
            tokio::time::sleep(self.retry).await;
        }
    }

    /// Connects and turns tracking on.
    async fn connect(&self) -> redis::RedisResult<Option<Tracking>> {
        let Some((client, addr)) = tracking_client(&self.cfg).await? else {
            return Ok(None);
        };
        let (lost_tx, lost) = tokio::sync::mpsc::unbounded_channel();
        let live = Arc::new(AtomicBool::new(true));
        let near = self.near.clone();
        let alive = live.clone();
        let on_push = move |info: PushInfo| -> Result<(), ()> {
            match info.kind {
                PushKind::Invalidate => invalidate(&near, &info.data),
                PushKind::Disconnection if alive.load(Ordering::SeqCst) => {
                    // Before anything else can be read from this connection.
                    near.tracking_down();
                    let _ = lost_tx.send(());
                }
                _ => {}
            }
            Ok(())
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(on_push);
        let (mut conn, heard) = tokio::time::timeout(self.timeout, self.open(&client, config))
            .await
            .map_err(timed_out)??;
        let name = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(client_name())
            .query_async::<()>(&mut conn)
            .await;
        let on = match name {
            Ok(()) => {
                redis::cmd("CLIENT")
                    .arg("TRACKING")
                    .arg("ON")
                    .arg("BCAST")
                    .arg("PREFIX")
                    .arg(&self.prefix)
                    .query_async::<()>(&mut conn)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = on {
            live.store(false, Ordering::SeqCst);
            return Err(e);
        }
        Ok(Some(Tracking {
            conn,
            addr,
            lost,
            live,
            heard,
        }))
    }

    /// The connection, over a socket of our own where we can watch it (TCP
    /// or a Unix socket: see [`heard`](super::heard)); over TLS, redis-rs's
    /// own, which cannot tell whether it is caught up.
    async fn open(
        &self,
        client: &redis::Client,
        config: AsyncConnectionConfig,
    ) -> redis::RedisResult<(MultiplexedConnection, Option<Box<dyn CaughtUp>>)> {
        let info = client.get_connection_info();
        let (conn, heard) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                attach(info.redis_settings(), stream, config).await?
            }
            ConnectionAddr::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await?;
                attach(info.redis_settings(), stream, config).await?
            }
            _ => {
                tracing::info!(
                    "near cache over TLS: a change through another quotad is seen here once its invalidation is read, not checked before each near hit (see docs/config.md)"
                );
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                (conn, None)
            }
        };
        Ok((conn, heard))
    }

    /// Watches the connection until it is lost; why.
    async fn watch(
        &self,
        mut conn: MultiplexedConnection,
        addr: &str,
        lost: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    ) -> &'static str {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = lost.recv() => return "disconnected",
                _ = tick.tick() => {
                    if let Some(master) = self.data.sentinel_master()
                        && master != addr
                    {
                        return "Sentinel names another master";
                    }
                    if !ping(&mut conn, self.timeout).await {
                        return "no answer to PING";
                    }
                }
            }
        }
    }
}

fn timed_out(e: tokio::time::error::Elapsed) -> redis::RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, e).into()
}

/// Whether `conn` answers a PING within `limit`.
async fn ping(conn: &mut MultiplexedConnection, limit: Duration) -> bool {
    let cmd = redis::cmd("PING");
    matches!(
        tokio::time::timeout(limit, cmd.query_async::<Value>(conn)).await,
        Ok(Ok(_))
    )
}

/// Applies one invalidation message: key names, or null for a flush.
fn invalidate(near: &NearCache, data: &[Value]) {
    for v in data {
        match v {
            Value::Array(keys) => {
                for k in keys {
                    if let Value::BulkString(name) = k {
                        near.invalidate(name);
                    }
                }
            }
            Value::Nil => near.flush(),
            _ => {}
        }
    }
}
