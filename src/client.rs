//! A small async Rust client: one connection, requests pipelined and
//! matched to replies by `id`. Used by `quotad check` and the benchmark.
//!
//! Callers encode their frame straight into a shared output buffer and
//! wake the writer task only when the buffer was empty, so a burst of
//! calls costs one wake-up and one write; a reader task hands each reply
//! to its caller.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, oneshot};

use crate::limiter::Decision;
use crate::protocol::{
    self, CacheDelArgs, CacheGetArgs, CacheSetArgs, CheckArgs, Lookup, Op, ReplyFields, Request,
    TenantFields,
};
use crate::quota::TenantRecord;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach quotad: {0}")]
    Io(String),
    #[error("the connection to quotad closed")]
    Closed,
    #[error("quotad answered {code}: {message}")]
    Server { code: String, message: String },
    #[error("malformed reply: {0}")]
    Protocol(String),
}

type Waiter = oneshot::Sender<Result<ReplyFields, ClientError>>;

/// Largest reply frame the client accepts.
const MAX_REPLY: usize = 64 << 20;

/// A connection to quotad. Cheap to share: calls from many tasks are
/// pipelined on the one connection.
pub struct Client {
    shared: Arc<Shared>,
    next_id: AtomicU64,
}

struct Shared {
    state: Mutex<State>,
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

impl Client {
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<Client> {
        let (rd, wr) = UnixStream::connect(path).await?.into_split();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
        });
        tokio::spawn(write_loop(wr, shared.clone()));
        tokio::spawn(read_loop(rd, shared.clone()));
        Ok(Client {
            shared,
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
        reply.decision().ok_or_else(|| missing("decision"))
    }

    /// Reads a cache entry; `fill_ms` > 0 asks for single-flight on a miss.
    pub async fn cache_get(
        &self,
        tenant: &str,
        key: &str,
        fill_ms: u64,
    ) -> Result<Lookup, ClientError> {
        let op = Op::CacheGet(CacheGetArgs {
            tenant: tenant.to_owned(),
            key: key.to_owned(),
            fill_ms,
        });
        let reply = self.call(op).await?;
        reply.lookup().ok_or_else(|| missing("lookup"))
    }

    /// Stores a cache entry; returns whether the store was degraded (not done).
    pub async fn cache_set(&self, set: CacheSetArgs) -> Result<bool, ClientError> {
        let reply = self.call(Op::CacheSet(set)).await?;
        reply.degraded.ok_or_else(|| missing("degraded"))
    }

    /// Deletes entries by key and by tag; returns how many went.
    pub async fn cache_del(
        &self,
        tenant: &str,
        keys: &[&str],
        tags: &[&str],
    ) -> Result<u64, ClientError> {
        let op = Op::CacheDel(CacheDelArgs {
            tenant: tenant.to_owned(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        });
        let reply = self.call(op).await?;
        reply.deleted.ok_or_else(|| missing("deleted"))
    }

    /// A check, then (only if allowed) a cache read, in one round trip.
    pub async fn check_get(
        &self,
        check: CheckArgs,
        cache_key: &str,
        fill_ms: u64,
    ) -> Result<(Decision, Option<Lookup>), ClientError> {
        let get = CacheGetArgs {
            tenant: check.tenant.clone(),
            key: cache_key.to_owned(),
            fill_ms,
        };
        let reply = self.call(Op::CheckGet(check, get)).await?;
        let decision = reply.decision().ok_or_else(|| missing("decision"))?;
        Ok((decision, reply.lookup()))
    }

    /// Admin: a tenant's record at the source (`None`: unknown there).
    pub async fn tenant_get(&self, tenant: &str) -> Result<Option<TenantRecord>, ClientError> {
        let reply = self.call(Op::TenantGet(tenant.to_owned())).await?;
        Ok(match (reply.known, reply.plan) {
            (Some(true), Some(plan)) => Some(TenantRecord {
                plan,
                limits: reply.limits.unwrap_or_default(),
            }),
            _ => None,
        })
    }

    /// Admin: sets a tenant's record (the `redis` source).
    pub async fn tenant_set(&self, tenant: &str, record: TenantRecord) -> Result<(), ClientError> {
        self.call(Op::TenantSet(tenant.to_owned(), record))
            .await
            .map(drop)
    }

    /// Admin: deletes a tenant's record; true if it existed.
    pub async fn tenant_delete(&self, tenant: &str) -> Result<bool, ClientError> {
        let reply = self.call(Op::TenantDelete(tenant.to_owned())).await?;
        Ok(reply.deleted == Some(1))
    }

    /// Admin: every tenant the source lists.
    pub async fn tenant_list(&self) -> Result<Vec<TenantFields>, ClientError> {
        let reply = self.call(Op::TenantList).await?;
        Ok(reply.tenants.unwrap_or_default())
    }

    /// Sends one request and waits for its reply; an error reply becomes
    /// [`ClientError::Server`].
    pub async fn call(&self, op: Op) -> Result<ReplyFields, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let was_empty = {
            let mut st = self.shared.state.lock().unwrap();
            if let Some(e) = &st.closed {
                return Err(e.clone());
            }
            let was_empty = st.out.is_empty();
            let at = st.out.len();
            st.out.extend_from_slice(&[0; 4]);
            protocol::encode_request(&Request { id, op }, &mut st.out);
            let len = (st.out.len() - at - 4) as u32;
            st.out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            st.waiting.insert(id, tx);
            was_empty
        };
        if was_empty {
            self.shared.wake_writer.notify_one();
        }
        let reply = rx.await.map_err(|_| ClientError::Closed)??;
        server_error(reply)
    }
}

impl Drop for Client {
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
            std::mem::take(&mut st.waiting)
        };
        for (_, w) in waiting {
            let _ = w.send(Err(err.clone()));
        }
        self.wake_writer.notify_one();
    }
}

fn missing(what: &str) -> ClientError {
    ClientError::Protocol(format!("a reply without its {what}"))
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

/// Writes whatever callers have buffered, one write per wake-up.
async fn write_loop(mut wr: OwnedWriteHalf, shared: Arc<Shared>) {
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
async fn read_loop(mut rd: OwnedReadHalf, shared: Arc<Shared>) {
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
