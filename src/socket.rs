//! A connected Unix stream, registered with the runtime for reads only.
//!
//! tokio registers a `UnixStream` for readability and writability, and
//! Linux wakes a Unix socket's writer every time its peer reads from it
//! (`unix_write_space` does not ask whether the writer ever found the
//! socket full). So every read of replies by a client woke quotad once
//! more for nothing (at 1 request in flight, 1 of its 3 wake-ups per
//! request), and every read of requests by quotad woke a tokio client
//! (the Rust client uses this module too). Here the descriptor is
//! registered for reads; a write goes straight to the socket, and only one
//! that finds the socket full registers a duplicate descriptor for
//! writability, until a write goes through whole.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Splits a stream into halves that share one read-only registration.
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    // into_std deregisters the stream and leaves it non-blocking.
    let fd = Arc::new(register(stream.into_std()?, Interest::READABLE)?);
    Ok((ReadHalf { fd: fd.clone() }, WriteHalf { fd, full: None }))
}

fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the AsyncFd owns the stream, so its descriptor stays open and
    // the same until the AsyncFd drops.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(|e| e.into_parts().1)
}

pub struct ReadHalf {
    fd: Arc<AsyncFd<UnixStream>>,
}

/// Shuts the stream's write side down when dropped (as tokio's own halves
/// do), so a peer reads end of stream even if the read half lives on.
pub struct WriteHalf {
    fd: Arc<AsyncFd<UnixStream>>,
    /// Registered for writability while the socket is full.
    full: Option<AsyncFd<UnixStream>>,
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.fd.poll_read_ready(cx))?;
            // SAFETY: recv writes only into the unfilled part and says how
            // much; only that much is marked initialised.
            let unfilled = unsafe { buf.unfilled_mut() };
            let len = unfilled.len();
            match ready.try_io(|fd| recv(fd.get_ref(), unfilled)) {
                Ok(Ok(n)) => {
                    // A short read drained the socket: the next read would
                    // only find it empty (as tokio's own streams reason).
                    if n > 0 && n < len {
                        ready.clear_ready();
                    }
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

fn recv(stream: &UnixStream, dst: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `dst`; the descriptor is open.
    let n = unsafe { libc::recv(stream.as_raw_fd(), dst.as_mut_ptr().cast(), dst.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn send(mut stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    stream.write(data)
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if let Some(full) = &this.full {
                let mut ready = ready!(full.poll_write_ready(cx))?;
                match ready.try_io(|fd| send(fd.get_ref(), data)) {
                    Ok(Ok(n)) => {
                        if n == data.len() {
                            this.full = None;
                        }
                        return Poll::Ready(Ok(n));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) => continue,
                }
            }
            match send(this.fd.get_ref(), data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A duplicate shares the open file (and its O_NONBLOCK);
                    // registering it reports at once if the peer read since.
                    let dup = this.fd.get_ref().try_clone()?;
                    this.full = Some(register(dup, Interest::WRITABLE)?);
                }
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.fd.get_ref().shutdown(Shutdown::Write))
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        let _ = self.fd.get_ref().shutdown(Shutdown::Write);
    }
}
