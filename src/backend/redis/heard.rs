//! Whether the tracking connection has applied everything Redis has sent
//! it so far: what makes a near hit respect causality across quotads.
//!
//! Redis queues the invalidation for this quotad's tracking connection
//! before it answers the writer (another quotad), so by the time a request
//! that follows that answer reaches this quotad, the invalidation is in
//! this side's socket buffer, or read and being applied, or applied. A
//! near hit is served only in the last case: nothing unread in the socket
//! (`FIONREAD`), and no read of it still being decoded ([`Watched`] marks
//! the time from a read until the reader finds nothing more to read).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::near::CaughtUp;

/// A stream whose reads are watched, for [`Heard`].
pub struct Watched<S> {
    inner: S,
    busy: Arc<AtomicBool>,
}

/// The other side of a [`Watched`] stream: its socket and its reader.
pub struct Heard {
    /// A duplicate of the stream's descriptor (the same socket).
    fd: OwnedFd,
    busy: Arc<AtomicBool>,
}

/// Watches `stream`'s reads; the [`Heard`] says when it is caught up.
pub fn watch<S: AsFd>(stream: S) -> std::io::Result<(Watched<S>, Heard)> {
    let fd = stream.as_fd().try_clone_to_owned()?;
    let busy = Arc::new(AtomicBool::new(false));
    let heard = Heard {
        fd,
        busy: busy.clone(),
    };
    Ok((
        Watched {
            inner: stream,
            busy,
        },
        heard,
    ))
}

impl CaughtUp for Heard {
    fn caught_up(&self) -> bool {
        // The socket first: a byte read after this check was in it during it.
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int; the descriptor is ours.
        let ok = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::FIONREAD, &mut unread) } == 0;
        ok && unread == 0 && !self.busy.load(SeqCst)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Busy from before the read until a read finds nothing: the reader
        // decodes (and applies) everything it read before it reads again.
        self.busy.store(true, SeqCst);
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_pending() {
            self.busy.store(false, SeqCst);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
    use tokio::net::UnixStream;

    use super::*;

    /// One read of `w` into `buf`, waiting for the socket to be readable.
    async fn read(w: &mut Watched<UnixStream>, buf: &mut [u8]) -> usize {
        let mut rb = ReadBuf::new(buf);
        std::future::poll_fn(|cx| Pin::new(&mut *w).poll_read(cx, &mut rb))
            .await
            .unwrap();
        rb.filled().len()
    }

    /// Polls one read of `w` once, without waiting.
    fn poll_once(w: &mut Watched<UnixStream>) -> Poll<()> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut buf = [0u8; 64];
        let mut rb = ReadBuf::new(&mut buf);
        Pin::new(w).poll_read(&mut cx, &mut rb).map(|r| r.unwrap())
    }

    /// Caught up only with nothing unread in the socket and no read still
    /// being decoded: bytes sent by Redis and not yet read, or read and not
    /// yet applied, keep a near hit from being served.
    #[tokio::test]
    async fn caught_up_only_once_everything_sent_was_read_and_decoded() {
        let (ours, mut redis) = UnixStream::pair().unwrap();
        let (mut watched, heard) = watch(ours).unwrap();
        assert!(heard.caught_up(), "nothing sent yet");

        redis.write_all(b"an invalidation").await.unwrap();
        redis.flush().await.unwrap();
        assert!(!heard.caught_up(), "unread bytes in the socket");

        // Read part of it: still unread bytes.
        let mut buf = [0u8; 3];
        assert_eq!(read(&mut watched, &mut buf).await, 3);
        assert!(!heard.caught_up(), "12 bytes still unread");

        // Read the rest: the socket is empty, but the reader has not yet
        // come back for more, so it may still be applying what it read.
        let mut buf = [0u8; 64];
        assert_eq!(read(&mut watched, &mut buf).await, 12);
        assert!(!heard.caught_up(), "a read is still being decoded");

        // The reader finds nothing more: caught up.
        assert_eq!(poll_once(&mut watched), Poll::Pending);
        assert!(heard.caught_up());
    }
}
