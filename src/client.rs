//! A small async Rust client: one connection, requests pipelined and
//! matched to replies by `id`. Used by `quotad check` and the benchmark.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::connection::codec;
use crate::limiter::Decision;
use crate::protocol::{self, CheckArgs, Op, ReplyFields, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach quotad: {0}")]
    Io(#[from] io::Error),
    #[error("the connection to quotad closed")]
    Closed,
    #[error("quotad answered {code}: {message}")]
    Server { code: String, message: String },
    #[error("malformed reply: {0}")]
    Protocol(String),
}

type Waiter = oneshot::Sender<Result<ReplyFields, ClientError>>;

/// A connection to quotad. Cheap to share: calls from many tasks are
/// pipelined on the one connection.
pub struct Client {
    calls: mpsc::Sender<(Request, Waiter)>,
    next_id: AtomicU64,
}

impl Client {
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<Client> {
        let stream = UnixStream::connect(path).await?;
        let (calls, rx) = mpsc::channel(4096);
        tokio::spawn(drive(stream, rx));
        Ok(Client {
            calls,
            next_id: AtomicU64::new(1),
        })
    }

    pub async fn hello(&self) -> Result<ReplyFields, ClientError> {
        self.call(Op::Hello).await
    }

    pub async fn stats(&self) -> Result<ReplyFields, ClientError> {
        self.call(Op::Stats).await
    }

    pub async fn check(
        &self,
        tenant: &str,
        key: &str,
        policy: Option<&str>,
        cost: u64,
    ) -> Result<Decision, ClientError> {
        let op = Op::Check(CheckArgs {
            tenant: tenant.to_owned(),
            key: key.to_owned(),
            policy: policy.map(str::to_owned),
            cost,
        });
        let reply = self.call(op).await?;
        reply
            .decision()
            .ok_or_else(|| ClientError::Protocol("a check reply without its decision".into()))
    }

    /// Sends one request and waits for its reply; an error reply becomes
    /// [`ClientError::Server`].
    pub async fn call(&self, op: Op) -> Result<ReplyFields, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.calls
            .send((Request { id, op }, tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        let reply = rx.await.map_err(|_| ClientError::Closed)??;
        server_error(reply)
    }
}

fn server_error(reply: ReplyFields) -> Result<ReplyFields, ClientError> {
    match (&reply.ok, &reply.error) {
        (true, _) => Ok(reply),
        (false, Some(e)) => Err(ClientError::Server {
            code: e.code.clone(),
            message: e.message.clone(),
        }),
        (false, None) => Err(ClientError::Protocol(
            "an error reply without `error`".into(),
        )),
    }
}

/// Owns the socket: writes queued requests, routes replies to their callers.
async fn drive(stream: UnixStream, mut calls: mpsc::Receiver<(Request, Waiter)>) {
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::new(rd, codec(64 << 20));
    let mut sink = FramedWrite::new(wr, codec(64 << 20));
    let mut waiting: HashMap<u64, Waiter> = HashMap::new();
    loop {
        tokio::select! {
            call = calls.recv() => {
                let Some(mut call) = call else { break };
                // Send everything already queued with one flush.
                loop {
                    let (req, waiter) = call;
                    let mut buf = Vec::with_capacity(64);
                    protocol::encode_request(&req, &mut buf);
                    waiting.insert(req.id, waiter);
                    if sink.feed(bytes::Bytes::from(buf)).await.is_err() {
                        break;
                    }
                    match calls.try_recv() {
                        Ok(next) => call = next,
                        Err(_) => break,
                    }
                }
                if SinkExt::<bytes::Bytes>::flush(&mut sink).await.is_err() {
                    break;
                }
            }
            frame = frames.next() => {
                let Some(Ok(buf)) = frame else { break };
                let reply = match ReplyFields::from_slice(&buf) {
                    Ok(r) => r,
                    Err(e) => {
                        fail_all(&mut waiting, || ClientError::Protocol(e.to_string()));
                        return;
                    }
                };
                if reply.id == 0 && !reply.ok {
                    // A connection-level error (too large, over the connection limit).
                    let e = reply.error.unwrap_or(protocol::WireError { code: "internal".into(), message: String::new() });
                    fail_all(&mut waiting, || ClientError::Server { code: e.code.clone(), message: e.message.clone() });
                    return;
                }
                if let Some(w) = waiting.remove(&reply.id) {
                    let _ = w.send(Ok(reply));
                }
            }
        }
    }
    fail_all(&mut waiting, || ClientError::Closed);
}

fn fail_all(waiting: &mut HashMap<u64, Waiter>, err: impl Fn() -> ClientError) {
    for (_, w) in waiting.drain() {
        let _ = w.send(Err(err()));
    }
}
