//! One client connection: read frames, hand requests on, write replies as
//! they complete (in any order, tagged by `id`).
//!
//! Reading never waits for a reply: a client may pipeline thousands of
//! requests. Once `max_inflight` are unanswered, quotad stops reading from
//! that connection until some are answered (back-pressure, not an error).
//! Replies that complete together are written with one flush. A frame over
//! the size limit, or one that is not a MessagePack map, gets an error
//! reply with `id` 0; then the connection's in-flight requests are answered
//! and it is closed. Other connections never notice.

use std::io;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{
    Decoder, Encoder, FramedRead, FramedWrite, LengthDelimitedCodec, LengthDelimitedCodecError,
};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::protocol::{self, DecodeError, Limits, Reply};
use crate::router::{Routed, Router};
use crate::stats::Stats;

/// The per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_frame_bytes: usize,
    pub max_inflight: usize,
    pub request: Limits,
}

/// The frame codec: a 4-byte big-endian length, then the body. Request
/// bodies come out as bytes; replies are encoded straight into the write
/// buffer.
pub struct FrameCodec(LengthDelimitedCodec);

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec(
            LengthDelimitedCodec::builder()
                .length_field_length(4)
                .max_frame_length(max_frame_bytes)
                .new_codec(),
        )
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        self.0.decode(src)
    }
}

impl Encoder<&Reply> for FrameCodec {
    type Error = io::Error;

    fn encode(&mut self, reply: &Reply, dst: &mut BytesMut) -> io::Result<()> {
        let at = dst.len();
        dst.put_u32(0);
        protocol::encode_reply(reply, &mut dst.writer());
        let len = (dst.len() - at - 4) as u32;
        dst[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

type Sink = FramedWrite<tokio::net::unix::OwnedWriteHalf, FrameCodec>;

/// Serves one connection until the peer leaves, a fatal frame arrives, or
/// shutdown is signalled and every in-flight request is answered.
pub async fn serve(
    stream: UnixStream,
    router: Arc<Router>,
    limits: ConnLimits,
    shutdown: CancellationToken,
) {
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::new(rd, FrameCodec::new(limits.max_frame_bytes));
    let mut sink = FramedWrite::new(wr, FrameCodec::new(limits.max_frame_bytes));
    let mut pending = FuturesUnordered::new();
    let mut reading = true;
    let mut draining = false;
    let mut dirty = false;
    let stats = router.stats().clone();
    let stats = &*stats;

    loop {
        let result: io::Result<()> = tokio::select! {
            biased;
            Some(reply) = pending.next(), if !pending.is_empty() => {
                dirty = true;
                write(&mut sink, stats, reply).await
            }
            r = SinkExt::<&Reply>::flush(&mut sink), if dirty => {
                dirty = false;
                r
            }
            frame = frames.next(), if reading && pending.len() < limits.max_inflight => {
                match frame {
                    Some(Ok(buf)) => {
                        let reply = match protocol::decode(&buf, &limits.request) {
                            Ok(req) if draining => Some(Reply::err(req.id, Error::ShuttingDown)),
                            Ok(req) => match router.route(req) {
                                Routed::Ready(reply) => Some(reply),
                                Routed::Pending(p) => {
                                    pending.push(p);
                                    None
                                }
                            },
                            Err(DecodeError::Request { id, error }) => Some(Reply::err(id, error)),
                            Err(DecodeError::Fatal(error)) => {
                                reading = false;
                                Some(Reply::err(0, error))
                            }
                        };
                        match reply {
                            Some(reply) => {
                                dirty = true;
                                write(&mut sink, stats, reply).await
                            }
                            None => Ok(()),
                        }
                    }
                    Some(Err(e)) => {
                        reading = false;
                        if is_too_large(&e) {
                            let msg = format!("frame over the maximum of {} bytes", limits.max_frame_bytes);
                            dirty = true;
                            write(&mut sink, stats, Reply::err(0, Error::TooLarge(msg))).await
                        } else {
                            Err(e)
                        }
                    }
                    None => {
                        reading = false;
                        Ok(())
                    }
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection closed");
            return;
        }
        if (!reading || draining) && pending.is_empty() && !dirty {
            break;
        }
    }
    let _ = SinkExt::<&Reply>::close(&mut sink).await;
}

/// Buffers one reply (`feed` flushes only past a high-water mark).
async fn write(sink: &mut Sink, stats: &Stats, reply: Reply) -> io::Result<()> {
    if let Err(e) = &reply.body {
        stats.error(e);
    }
    sink.feed(&reply).await
}

fn is_too_large(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}
