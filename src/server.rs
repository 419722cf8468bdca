//! The socket file's whole life: bind (refusing to steal a live socket),
//! set its mode, accept until shutdown, bound the connections, wait for
//! them to finish, and remove the file. A socket systemd passed (socket
//! activation) is systemd's: its file is left in place.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access::Peer;
use crate::connection::{self, ConnLimits};
use crate::error::Error;
use crate::protocol::Reply;
use crate::router::Router;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another process is already listening on {0}: refusing to start a second quotad")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot bind {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A bound socket; dropping it removes the socket file (if it is still ours).
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the file we created; `None` for an inherited
    /// socket, whose file is not ours to remove.
    identity: Option<(u64, u64)>,
}

impl Listener {
    /// Binds `path` with file mode `mode`. A socket file nobody listens on
    /// (left by a crash) is replaced; a live one is an error.
    pub fn bind(path: &Path, mode: u32) -> Result<Listener, BindError> {
        let io_err = |source| BindError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(BindError::NotASocket(path.to_owned()));
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(BindError::InUse(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale socket file");
                    std::fs::remove_file(path).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
        let meta = std::fs::metadata(path).map_err(io_err)?;
        Ok(Listener {
            listener,
            path: path.to_owned(),
            identity: Some((meta.dev(), meta.ino())),
        })
    }

    /// Serves on a socket inherited from systemd (already bound, with
    /// systemd's mode and owner), and leaves its file at exit.
    pub fn inherit(listener: std::os::unix::net::UnixListener) -> Result<Listener, BindError> {
        let addr = listener.local_addr();
        let path = addr
            .as_ref()
            .ok()
            .and_then(|a| a.as_pathname())
            .map_or_else(|| PathBuf::from("(inherited socket)"), Path::to_owned);
        let listener = UnixListener::from_std(listener).map_err(|source| BindError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Listener {
            listener,
            path,
            identity: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let ours =
            std::fs::metadata(&self.path).is_ok_and(|m| Some((m.dev(), m.ino())) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Peers being told why they are refused (`forbidden`, `overloaded`) at
/// once, each for a second at most; more are closed without a word.
const MAX_REFUSING: usize = 16;

/// Server-wide bounds.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    pub conn: ConnLimits,
}

/// Accepts connections until `shutdown`, then removes the socket file and
/// waits (at most `shutdown_timeout`) for open connections to answer what
/// they have in flight.
pub async fn run(
    listener: Listener,
    router: Arc<Router>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSING));
    let stats = router.stats().clone();
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, usually: pause rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        // Admission comes first, so a peer the `[[access]]` rules refuse
        // never holds a connection slot an admitted one could use.
        let grant = match router.access().admit(Peer::of(&stream)) {
            Ok(grant) => grant,
            Err(e) => {
                stats.error(&e);
                turn_away(&tracker, &refusals, stream, Reply::err(0, e));
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            Stats::add(&stats.counters.connections_refused, 1);
            let reply = Reply::err(0, Error::Overloaded("too many connections"));
            turn_away(&tracker, &refusals, stream, reply);
            continue;
        };
        Stats::add(&stats.counters.connections_total, 1);
        Stats::add(&stats.counters.connections_open, 1);
        let (router, stats, shutdown) = (router.clone(), stats.clone(), shutdown.clone());
        let span = tracing::debug_span!("conn", id = next_id);
        tracker.spawn(
            async move {
                tracing::debug!("accepted");
                connection::serve(stream, grant, router, limits.conn, shutdown).await;
                stats
                    .counters
                    .connections_open
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                drop(permit);
                tracing::debug!("closed");
            }
            .instrument(span),
        );
    }
    drop(listener); // new clients now fail fast instead of queueing
    tracker.close();
    if tokio::time::timeout(limits.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the shutdown timeout; closing them");
    }
}

/// Tells a peer why it is turned away (`reply`), unless [`MAX_REFUSING`]
/// others are being told already: then it is closed at once. A flood of
/// refused connects thus costs a few tasks, never a connection slot.
fn turn_away(tracker: &TaskTracker, refusals: &Arc<Semaphore>, stream: UnixStream, reply: Reply) {
    if let Ok(permit) = refusals.clone().try_acquire_owned() {
        tracker.spawn(async move {
            connection::refuse(stream, reply).await;
            drop(permit);
        });
    }
}
