//! The daemon assembled: backend, shards, socket; run until shutdown,
//! reloading policies on request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::redis::{RedisBackend, SetupError, trust_anchors};
use crate::clock::Clock;
use crate::config::Config;
use crate::connection::ConnLimits;
use crate::metrics;
use crate::quota::Directory;
use crate::router::Router;
use crate::server::{self, BindError, Listener, ServerLimits};
use crate::stats::Stats;
use crate::systemd;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Redis(#[from] SetupError),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The Redis server's certificate failed this side's check at start.
    #[error("Redis TLS: the server's certificate is not trusted with {anchors}: {reason}")]
    Certificate { anchors: String, reason: String },
}

pub struct Daemon {
    config: Config,
    listener: Listener,
    router: Arc<Router>,
    redis: Option<RedisBackend>,
    /// The bound `[metrics]` endpoint, served once the daemon runs.
    metrics: Option<std::net::TcpListener>,
    stats: Arc<Stats>,
    /// Stops background tasks (the breaker's prober) once the daemon ends.
    background: CancellationToken,
}

impl Daemon {
    /// Binds the socket and starts the shards. Redis need not be up: until
    /// it answers, checks are decided by each policy's failure mode.
    /// `inherited`: a listening socket from systemd (socket activation),
    /// served instead of binding `server.socket`.
    pub fn start(
        config: Config,
        clock: Clock,
        inherited: Option<std::os::unix::net::UnixListener>,
    ) -> Result<Daemon, StartError> {
        let stats = Arc::new(Stats::default());
        let background = CancellationToken::new();
        let redis = match &config.redis {
            Some(r) => Some(
                RedisBackend::new(r, clock.clone(), stats.clone(), background.clone())?
                    .with_near_cache(r, config.cache.near_max_bytes),
            ),
            None => None,
        };
        let listener = match inherited {
            Some(l) => Listener::inherit(l)?,
            None => Listener::bind(&config.server.socket, config.server.socket_mode)?,
        };
        let metrics = match &config.metrics {
            Some(m) => Some(bind_metrics(m.listen)?),
            None => None,
        };
        let directory = Directory::new(&config, redis.clone(), stats.clone());
        let router = Arc::new(Router::start(
            &config,
            redis.clone(),
            directory.clone(),
            clock,
            stats.clone(),
        ));
        if let (Some(dir), Some(redis)) = (&directory, &config.redis)
            && dir.announces_changes()
        {
            // Tenant changes made through any quotad reach this one at once.
            let weak = Arc::downgrade(&router);
            let on_change = move |tenant: String| {
                if let Some(router) = weak.upgrade() {
                    router.shards().forget(&tenant);
                }
            };
            dir.watch(redis.clone(), on_change, background.clone());
        }
        Ok(Daemon {
            config,
            listener,
            router,
            redis,
            metrics,
            stats,
            background,
        })
    }

    /// Gives Redis up to a second to connect and load the script before
    /// requests are served (they queue meanwhile). If it cannot, quotad
    /// serves anyway, deciding by failure mode until Redis answers; but a
    /// server certificate this side does not trust fails the start, as no
    /// wait would mend it.
    pub async fn warm_up(&self) -> Result<(), StartError> {
        let (Some(redis), Some(cfg)) = (&self.redis, &self.config.redis) else {
            return Ok(());
        };
        match redis.warm_up(Duration::from_secs(1)).await {
            Ok(()) => tracing::info!("Redis at {} connected, batch code loaded", redis.target()),
            Err(e) => {
                if let Some(reason) = e.as_ref().and_then(|e| crate::tls::certificate_rejected(e)) {
                    return Err(StartError::Certificate {
                        anchors: trust_anchors(cfg),
                        reason,
                    });
                }
                let error = e.map_or("no answer within 1 s".into(), |e| e.to_string());
                tracing::warn!(
                    "Redis at {} not answering ({error}): deciding by each policy's failure mode until it answers; is redis-server running there?",
                    redis.target()
                );
            }
        }
        Ok(())
    }

    pub fn socket(&self) -> &Path {
        self.listener.path()
    }

    /// Serves until `shutdown`; each message on `reload` re-reads
    /// `config_path` and swaps in its policies (a bad file is logged and
    /// the running policies kept).
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        mut reload: mpsc::Receiver<()>,
        config_path: Option<PathBuf>,
    ) {
        let s = &self.config.server;
        let limits = ServerLimits {
            max_connections: s.max_connections,
            shutdown_timeout: Duration::from_millis(s.shutdown_timeout_ms),
            conn: ConnLimits {
                max_frame_bytes: s.max_frame_bytes,
                max_inflight: s.max_inflight_per_connection,
                request: self.config.limits(),
            },
        };
        if let Some(l) = self.metrics.take() {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    let stop = self.background.clone();
                    tokio::spawn(metrics::serve(l, self.stats.clone(), stop));
                }
                Err(e) => tracing::error!(error = %e, "metrics endpoint not served"),
            }
        }
        let router = self.router.clone();
        let draining = shutdown.clone();
        tokio::spawn(async move {
            draining.cancelled().await;
            systemd::stopping();
            router.shards().release_waiters().await;
        });
        let server = server::run(self.listener, self.router.clone(), limits, shutdown);
        tokio::pin!(server);
        loop {
            tokio::select! {
                _ = &mut server => break,
                Some(()) = reload.recv() => {
                    systemd::reloading();
                    reload_secrets(self.redis.as_ref());
                    match &config_path {
                        Some(path) => reload_from(&mut self.config, &self.router, path).await,
                        None => tracing::warn!("SIGHUP: no config file was given, nothing to reload"),
                    }
                    systemd::ready();
                }
            }
        }
        self.router.shards().stop().await;
        self.background.cancel();
        tracing::info!("stopped");
    }
}

fn bind_metrics(addr: std::net::SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| StartError::Metrics { addr, source })?;
    tracing::info!("metrics at http://{addr}/metrics");
    Ok(listener)
}

/// SIGHUP: the Redis passwords are read again from their files (or
/// variables); one that cannot be read keeps the running one.
fn reload_secrets(redis: Option<&RedisBackend>) {
    let Some(redis) = redis else { return };
    match redis.reload_secrets() {
        Ok(true) => tracing::info!("reload: a Redis password changed; reconnecting with it"),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "reload: keeping the running Redis password"),
    }
}

async fn reload_from(current: &mut Config, router: &Router, path: &Path) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload failed: keeping the running configuration");
            return;
        }
    };
    // `[server] shadow` is compiled into the policies: it reloads with them.
    let server = crate::config::ServerConfig {
        shadow: current.server.shadow,
        ..new.server.clone()
    };
    if server != current.server
        || new.redis != current.redis
        || new.cache != current.cache
        || new.quota != current.quota
        || new.metrics != current.metrics
        || new.log != current.log
    {
        tracing::warn!(
            "reload: changes to [server] (but `shadow`), [redis], [cache], [quota], [metrics] and [log] take effect only after a restart"
        );
    }
    router.reload(&new).await;
    // Logged once the new rules are in force: tests and operators wait on it.
    tracing::info!(
        policies = ?new.plans.default_plan().names(),
        plans = ?new.plans.names(),
        tenants = new.tenants.len(),
        "reloaded policies"
    );
    current.server.shadow = new.server.shadow;
    current.plans = new.plans;
    current.tenants = new.tenants;
    current.admin = new.admin;
    current.access = new.access;
}
