//! quotad: a rate-limiting and caching sidecar. Applications ask "may this
//! request go ahead?" and "is this response cached?" over a Unix socket;
//! quotad answers atomically from Redis (or in process, without Redis),
//! batching many requests into one round trip.
//!
//! The data path, in order:
//!
//! - [`server`]: the socket file's life cycle and the accept loop.
//! - [`connection`]: one client; frames in, replies out by `id`.
//! - [`protocol`]: protocol version 1, requests and replies in MessagePack.
//! - [`router`]: answers `hello`/`stats`, routes every other op by tenant
//!   to its shard, as a [`job`].
//! - [`shard`]: the actor that owns a tenant shard's local state.
//! - [`batch`]: adaptive batching of a shard's Redis round trips.
//! - [`redis`]: the Redis backend: the `lua/` scripts, pipelining,
//!   deadlines, NOSCRIPT reloads and the circuit breaker.
//! - [`limiter`]: rules, policies and their math; the in-memory limiter.
//! - [`cache`]: the response cache's in-memory backend.
//!
//! Around it: [`config`] (the TOML file), [`keys`] (Redis key names),
//! [`clock`], [`error`] (wire error codes), [`stats`], [`shutdown`]
//! (signals), [`daemon`] (everything assembled) and [`client`] (a Rust
//! client).

pub mod admin;
pub mod batch;
pub mod cache;
pub mod client;
pub mod clock;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod error;
pub mod job;
pub mod keys;
pub mod limiter;
pub mod protocol;
pub mod quota;
pub mod redis;
pub mod reply;
pub mod router;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod stats;
