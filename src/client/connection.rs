//! One pipelined connection to quotad.
//!
//! Callers encode their frame straight into a shared output buffer and
//! wake the writer task only when the buffer was empty, so a burst of
//! calls costs one wake-up and one write; a reader task hands each reply
//! to its caller by `id`.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{Notify, oneshot};

use super::ClientError;
use crate::protocol::{self, ReplyFields, Request};
use crate::socket::{self, ReadHalf, WriteHalf};

type Waiter = oneshot::Sender<Result<ReplyFields, ClientError>>;

/// Largest reply frame accepted.
const MAX_REPLY: usize = 64 << 20;

pub struct Connection {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Mirrors `state.closed.is_some()`, read without the lock.
    closed: AtomicBool,
    /// Wakes the writer when `out` goes from empty to non-empty.
    wake_writer: Notify,
}

#[derive(Default)]
struct State {
    /// Frames waiting to be written.
    out: Vec<u8>,
    waiting: HashMap<u64, Waiter>,
    /// Set once the connection is gone; later calls fail with it.
    closed: Option<ClientError>,
}

impl Connection {
    pub async fn open(path: &Path) -> io::Result<Connection> {
        let (rd, wr) = socket::split(UnixStream::connect(path).await?)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            closed: AtomicBool::new(false),
            wake_writer: Notify::new(),
        });
        tokio::spawn(write_loop(wr, shared.clone()));
        tokio::spawn(read_loop(rd, shared.clone()));
        Ok(Connection { shared })
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Queues a request; the receiver gets its reply.
    pub fn send(
        &self,
        req: &Request,
    ) -> Result<oneshot::Receiver<Result<ReplyFields, ClientError>>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let was_empty = {
            let mut st = self.shared.state.lock().unwrap();
            if let Some(e) = &st.closed {
                return Err(e.clone());
            }
            let was_empty = st.out.is_empty();
            let at = st.out.len();
            st.out.extend_from_slice(&[0; 4]);
            protocol::encode_request(req, &mut st.out);
            let len = (st.out.len() - at - 4) as u32;
            st.out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            st.waiting.insert(req.id, tx);
            was_empty
        };
        if was_empty {
            self.shared.wake_writer.notify_one();
        }
        Ok(rx)
    }

    /// Forgets a request whose caller gave up waiting.
    pub fn abandon(&self, id: u64) {
        self.shared.state.lock().unwrap().waiting.remove(&id);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.close(ClientError::Closed);
    }
}

impl Shared {
    /// Fails every waiting call and every later one with `err`.
    fn close(&self, err: ClientError) {
        let waiting = {
            let mut st = self.state.lock().unwrap();
            st.closed.get_or_insert(err.clone());
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut st.waiting)
        };
        for (_, w) in waiting {
            let _ = w.send(Err(err.clone()));
        }
        self.wake_writer.notify_one();
    }
}

/// Writes whatever callers have buffered, one write per wake-up.
async fn write_loop(mut wr: WriteHalf, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    loop {
        shared.wake_writer.notified().await;
        {
            let mut st = shared.state.lock().unwrap();
            if st.closed.is_some() {
                return;
            }
            std::mem::swap(&mut buf, &mut st.out);
        }
        if let Err(e) = wr.write_all(&buf).await {
            shared.close(ClientError::Io(e.to_string()));
            return;
        }
        buf.clear();
    }
}

/// Reads reply frames and hands each to its caller.
async fn read_loop(mut rd: ReadHalf, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let err = loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) => break ClientError::Closed,
            Ok(_) => {}
            Err(e) => break ClientError::Io(e.to_string()),
        }
        while buf.len() >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if len > MAX_REPLY {
                shared.close(ClientError::Protocol(format!("a {len}-byte reply")));
                return;
            }
            if buf.len() < 4 + len {
                buf.reserve(4 + len - buf.len());
                break;
            }
            buf.advance(4);
            let frame = buf.split_to(len);
            let reply = match ReplyFields::from_slice(&frame) {
                Ok(r) => r,
                Err(e) => {
                    shared.close(ClientError::Protocol(e.to_string()));
                    return;
                }
            };
            if reply.id == 0 && !reply.ok {
                // A connection-level error (a frame too large, too many connections).
                let e = reply
                    .error
                    .map_or(ClientError::Closed, |e| ClientError::Server {
                        code: e.code,
                        message: e.message,
                    });
                shared.close(e);
                return;
            }
            let waiter = shared.state.lock().unwrap().waiting.remove(&reply.id);
            if let Some(w) = waiter {
                let _ = w.send(Ok(reply));
            }
        }
    };
    shared.close(err);
}
