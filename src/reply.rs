//! How an answer finds its way back to its connection.
//!
//! Each connection has one channel for its replies; a request carries a
//! [`ReplyTo`] (the channel and the request's `id`) to the shard that
//! answers it. Replies that complete together are drained in one go.
//! A `ReplyTo` dropped without an answer (its shard stopped) answers
//! `shutting_down` by itself, so no request is ever left hanging.

use tokio::sync::mpsc;

use crate::error::Error;
use crate::metrics::Timer;
use crate::protocol::{Body, Reply};

/// The reply channel of one connection.
pub type Replies = mpsc::UnboundedSender<Reply>;

/// Where the answer to one request goes.
#[derive(Debug)]
pub struct ReplyTo {
    id: u64,
    tx: Option<Replies>,
    timer: Option<Timer>,
}

impl ReplyTo {
    pub fn new(id: u64, tx: Replies) -> Self {
        ReplyTo {
            id,
            tx: Some(tx),
            timer: None,
        }
    }

    /// Observes the request's latency when it is answered (if timed).
    pub fn timed(mut self, timer: Option<Timer>) -> Self {
        self.timer = timer;
        self
    }

    pub fn send(mut self, body: Result<Body, Error>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Reply { id: self.id, body });
        }
        if let Some(t) = self.timer.take() {
            t.observe();
        }
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Reply::err(self.id, Error::ShuttingDown));
        }
    }
}
