//! Signals: SIGTERM and SIGINT ask for a graceful shutdown (a second one
//! exits at once); SIGHUP asks for a reload of the policies.

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Listens for signals: cancels `shutdown` on SIGTERM/SIGINT and sends on
/// `reload` for SIGHUP.
pub fn listen(shutdown: CancellationToken, reload: mpsc::Sender<()>) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            match sig {
                SIGHUP => {
                    let _ = reload.try_send(());
                }
                _ if shutdown.is_cancelled() => {
                    tracing::warn!("second termination signal: exiting now");
                    std::process::exit(1);
                }
                _ => {
                    tracing::info!(signal = sig, "shutting down: finishing in-flight requests");
                    shutdown.cancel();
                }
            }
        }
    });
    Ok(())
}
