//! One client connection: read frames, hand requests on, write replies as
//! they complete (in any order, tagged by `id`).
//!
//! Reading never waits for a reply: a client may pipeline thousands of
//! requests. Once `max_inflight` are unanswered, quotad stops reading from
//! that connection until some are answered (back-pressure, not an error).
//! The requests of one wake-up reach each shard as one message.
//! Replies that complete together are written with one flush. A frame over
//! the size limit, or one that is not a MessagePack map, gets an error
//! reply with `id` 0; then the connection's in-flight requests are answered
//! and it is closed. Other connections never notice.
//!
//! The server admits a peer before its connection counts (see
//! `server::run`); one that a reload stops admitting gets `forbidden` with
//! `id` 0 at its next request, and is closed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{
    Decoder, Encoder, FramedRead, LengthDelimitedCodec, LengthDelimitedCodecError,
};
use tokio_util::sync::CancellationToken;

use crate::access::PeerGrant;
use crate::config::Limits;
use crate::error::Error;
use crate::protocol::{self, DecodeError, Reply};
use crate::router::{Routed, Router};
use crate::shard::Outbox;
use crate::socket::{self, ReadHalf, WriteHalf};
use crate::stats::Stats;

/// The per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_frame_bytes: usize,
    pub max_inflight: usize,
    pub request: Limits,
}

/// The frame codec: a 4-byte big-endian length, then the body. Request
/// bodies come out as bytes; a reply is written into a buffer kept from
/// reply to reply, then copied into the write buffer whole (one copy, where
/// writing each small piece into the `BytesMut` cost a call apiece).
pub struct FrameCodec {
    frames: LengthDelimitedCodec,
    scratch: Vec<u8>,
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec {
            frames: LengthDelimitedCodec::builder()
                .length_field_length(4)
                .max_frame_length(max_frame_bytes)
                .new_codec(),
            scratch: Vec::new(),
        }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        self.frames.decode(src)
    }
}

impl Encoder<&Reply> for FrameCodec {
    type Error = io::Error;

    fn encode(&mut self, reply: &Reply, dst: &mut BytesMut) -> io::Result<()> {
        self.scratch.clear();
        protocol::encode_reply(reply, &mut self.scratch);
        dst.reserve(4 + self.scratch.len());
        dst.put_u32(self.scratch.len() as u32);
        dst.put_slice(&self.scratch);
        // A huge reply (a big cached value) is not kept for the next one.
        if self.scratch.capacity() > 64 << 10 {
            self.scratch = Vec::new();
        }
        Ok(())
    }
}

/// Frames handled from one read before replies are flushed and other
/// work (shards' answers, shutdown) gets a turn.
const MAX_FRAMES_PER_WAKE: usize = 256;

/// Buffered replies past this are written out before more are taken.
const HIGH_WATER: usize = 128 << 10;

/// Serves one connection, already admitted with `grant`, until the peer
/// leaves, a fatal frame arrives, or shutdown is signalled and every
/// in-flight request is answered.
pub async fn serve(
    stream: UnixStream,
    grant: PeerGrant,
    router: Arc<Router>,
    limits: ConnLimits,
    shutdown: CancellationToken,
) {
    let (rd, wr) = match socket::split(stream) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::debug!(error = %e, "connection not served");
            return;
        }
    };
    let mut frames = FramedRead::new(rd, FrameCodec::new(limits.max_frame_bytes));
    let mut out = Out::new(wr);
    let (replies, mut answers) = mpsc::unbounded_channel();
    let mut conn = Conn {
        router: &router,
        grant,
        limits,
        outbox: router.shards().outbox(replies),
        in_flight: 0,
        reading: true,
        draining: false,
    };
    let mut ready = Vec::with_capacity(64);
    let stats = &**router.stats();
    // Replies are buffered as they complete and written once nothing else
    // is ready, so replies that complete together share one write.
    loop {
        let result: io::Result<()> = tokio::select! {
            biased;
            _ = answers.recv_many(&mut ready, 256), if conn.in_flight > 0 => {
                conn.in_flight -= ready.len();
                for reply in &ready {
                    out.put(stats, reply);
                }
                ready.clear();
                out.drain_if_full().await
            }
            r = out.drain(), if out.pending() => r,
            frame = frames.next(), if conn.reading && conn.in_flight < limits.max_inflight => {
                // Frames already read are handled before the flush, so the
                // replies given on the spot (near-cache hits) share a write.
                let mut next = Some(frame);
                let mut result = Ok(());
                for _ in 0..MAX_FRAMES_PER_WAKE {
                    let Some(frame) = next.take() else { break };
                    result = match conn.on_frame(frame) {
                        Ok(Some(reply)) => {
                            out.put(stats, &reply);
                            out.drain_if_full().await
                        }
                        other => other.map(drop),
                    };
                    if result.is_err() || !conn.reading || conn.in_flight >= limits.max_inflight {
                        break;
                    }
                    next = buffered_frame(&mut frames);
                }
                router.shards().deliver(&mut conn.outbox);
                result
            }
            _ = shutdown.cancelled(), if !conn.draining => {
                conn.draining = true;
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection closed");
            return;
        }
        if (!conn.reading || conn.draining) && conn.in_flight == 0 && !out.pending() {
            break;
        }
    }
    let _ = out.wr.shutdown().await;
}

/// A connection's reply side: replies encoded into one buffer as they come,
/// written out whole. (Encoded in place, not handed to a `Sink` by value:
/// a reply is ~180 bytes, and each move of one was a `memcpy` call.)
struct Out {
    wr: WriteHalf,
    codec: FrameCodec,
    buf: BytesMut,
}

impl Out {
    fn new(wr: WriteHalf) -> Self {
        Out {
            wr,
            codec: FrameCodec::new(0),
            buf: BytesMut::new(),
        }
    }

    /// Buffers one reply, counting an error reply in `stats`.
    fn put(&mut self, stats: &Stats, reply: &Reply) {
        if let Err(e) = &reply.body {
            stats.error(e);
        }
        self.encode(reply);
    }

    fn encode(&mut self, reply: &Reply) {
        let _infallible = self.codec.encode(reply, &mut self.buf);
    }

    fn pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes what is buffered. Cancel-safe: what was written is gone
    /// from the buffer, the rest goes at the next call.
    async fn drain(&mut self) -> io::Result<()> {
        while !self.buf.is_empty() {
            if self.wr.write_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    async fn drain_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= HIGH_WATER {
            self.drain().await
        } else {
            Ok(())
        }
    }
}

/// A connection's request side.
struct Conn<'a> {
    router: &'a Arc<Router>,
    /// What the peer may use; refreshed after a reload.
    grant: PeerGrant,
    limits: ConnLimits,
    /// Requests for the shards, handed on once per wake-up.
    outbox: Outbox,
    /// Requests handed to shards and not answered yet.
    in_flight: usize,
    /// False once the peer closed its side or sent a fatal frame.
    reading: bool,
    /// True once shutdown began: new requests are refused.
    draining: bool,
}

impl Conn<'_> {
    /// Handles what one read brought: the reply to write now, if any.
    fn on_frame(&mut self, frame: Option<io::Result<BytesMut>>) -> io::Result<Option<Reply>> {
        let buf = match frame {
            Some(Ok(buf)) => buf,
            Some(Err(e)) if is_too_large(&e) => {
                self.reading = false;
                let msg = format!(
                    "frame over the maximum of {} bytes",
                    self.limits.max_frame_bytes
                );
                return Ok(Some(Reply::err(0, Error::TooLarge(msg))));
            }
            Some(Err(e)) => return Err(e),
            None => {
                self.reading = false;
                return Ok(None);
            }
        };
        Ok(match protocol::decode(&buf, &self.limits.request) {
            Ok(req) if self.draining => Some(Reply::err(req.id, Error::ShuttingDown)),
            Ok(req) => {
                if let Err(e) = self.router.access().refresh(&mut self.grant) {
                    // A reload no longer admits the peer: as at connect.
                    self.reading = false;
                    return Ok(Some(Reply::err(0, e)));
                }
                match self.router.route(req, &mut self.outbox, &mut self.grant) {
                    Routed::Ready(reply) => Some(reply),
                    Routed::Pending => {
                        self.in_flight += 1;
                        None
                    }
                }
            }
            Err(DecodeError::Request { id, error }) => Some(Reply::err(id, error)),
            Err(DecodeError::Fatal(error)) => {
                self.reading = false;
                Some(Reply::err(0, error))
            }
        })
    }
}

/// Turns a peer away with `reply`, then end of stream. What it sent
/// meanwhile is read and dropped (for a second at most), so it reads the
/// reply rather than a connection reset.
pub async fn refuse(stream: UnixStream, reply: Reply) {
    let Ok((mut rd, wr)) = socket::split(stream) else {
        return;
    };
    let mut out = Out::new(wr);
    out.encode(&reply);
    let _ = tokio::time::timeout(Duration::from_secs(1), async move {
        out.drain().await?;
        drop(out); // shuts our side down
        let mut scratch = [0u8; 4096];
        while rd.read(&mut scratch).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// The next frame already in `frames`' read buffer, without reading more.
fn buffered_frame(frames: &mut FramedRead<ReadHalf, FrameCodec>) -> Option<Frame> {
    let mut buf = std::mem::take(frames.read_buffer_mut());
    let next = frames.decoder_mut().decode(&mut buf).transpose();
    *frames.read_buffer_mut() = buf;
    next.map(Some)
}

type Frame = Option<io::Result<BytesMut>>;

fn is_too_large(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}
