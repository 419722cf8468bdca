//! Running under systemd: a listening socket handed over by socket
//! activation (`LISTEN_FDS`), watchdog pings (`WATCHDOG_USEC`) and state
//! notifications (`NOTIFY_SOCKET`). Each does nothing outside systemd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use sd_notify::NotifyState;

/// The listening Unix socket systemd passed to this process (fd 3), if it
/// passed one; `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` are cleared so that they never
/// reach a child.
///
/// # Safety
///
/// Edits the environment: call it before any other thread exists.
pub unsafe fn take_listener() -> io::Result<Option<UnixListener>> {
    // SAFETY: the caller's promise.
    let mut fds = unsafe {
        std::env::remove_var("LISTEN_FDNAMES");
        sd_notify::listen_fds_and_unset_env()
    }?;
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let n = fds.len();
    let fd = match fds.next() {
        None => return Ok(None),
        Some(_) if n > 1 => {
            return Err(invalid(format!(
                "systemd passed {n} sockets; quotad listens on one (one ListenStream= in quotad.socket)"
            )));
        }
        Some(fd) => fd,
    };
    // SAFETY: systemd passed fd 3 for this process to own (LISTEN_PID).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if !is_listening(&fd) {
        return Err(invalid(
            "systemd passed a socket that is not listening for connections (quotad.socket needs ListenStream=, not ListenDatagram=)".into(),
        ));
    }
    let listener = UnixListener::from(fd);
    // Fails on a socket of another family (a TCP port in ListenStream=).
    listener.local_addr().map_err(|e| {
        invalid(format!(
            "systemd passed a socket quotad cannot use (ListenStream= must be a path): {e}"
        ))
    })?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// True for a stream socket that listens (SO_ACCEPTCONN).
fn is_listening(fd: &OwnedFd) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd, and `on`/`len` are the buffer getsockopt fills.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut on).cast(),
            &mut len,
        )
    };
    rc == 0 && on != 0
}

/// Pings the watchdog at half its interval, if systemd set one
/// (`WatchdogSec=`): a runtime too stuck to run this task gets restarted.
pub fn spawn_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
    });
}

/// The listener is up and the daemon serves.
pub fn ready() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

/// A reload begins (`READY=1` again when it is done); systemd ≥ 253 wants
/// the time with it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    states.extend(NotifyState::monotonic_usec_now().ok());
    let _ = sd_notify::notify(&states);
}

/// Shutting down: finishing the requests in flight.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}
