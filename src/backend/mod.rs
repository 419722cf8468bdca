//! Where a shard's jobs run: the one door between a shard and the state it
//! decides on. A shard hands its backend [`Job`]s and gets [`Outcome`]s
//! back; both backends name state with the same [`crate::keys::Keys`].
//!
//! - [`memory`]: in process. The shard owns it, and a job runs at once.
//! - [`redis`]: in Redis, shared by every quotad. The shard's batcher
//!   collects jobs while a round trip is out; [`RedisBackend::run`] sends
//!   a batch as pipelined Lua calls in its own task, and the outcomes come
//!   back to the shard as a message.

pub mod job;
pub mod memory;
pub mod redis;

pub use job::{Job, Outcome};
pub use memory::MemoryBackend;
pub use redis::RedisBackend;

/// A shard's backend.
// One per shard: its size does not matter, a box would cost a pointer
// chase per job.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Memory(MemoryBackend),
    Redis(RedisBackend),
}
