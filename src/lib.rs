//! quotad: a rate-limiting and caching sidecar. Applications ask "may this
//! request go ahead?" and "is this response cached?" over a Unix socket;
//! quotad answers atomically from Redis (or in process, without Redis),
//! batching many requests into one round trip.
//!
//! The data path, in order:
//!
//! - [`server`]: the socket file's life cycle and the accept loop.
//! - [`socket`]: a client's stream, registered to wake quotad for reads only.
//! - [`connection`]: one client; frames in, replies out by `id`.
//! - [`protocol`]: protocol version 1, requests and replies in MessagePack;
//!   a decoded op already says who answers it.
//! - [`router`]: answers `hello`/`stats`, sends a tenant's op to its shard
//!   and an admin op to [`admin`]; a `cache_get` of an entry the [`near`]
//!   cache holds fresh is answered there.
//! - [`shard`]: the actor that owns a tenant shard's local state (over-limit
//!   memory, quota entries, fill waiters) and batches its backend's work.
//! - [`backend`]: where jobs run: [`backend::memory`] in process, or
//!   [`backend::redis`]: the `lua/` scripts, pipelining, deadlines,
//!   NOSCRIPT reloads and the circuit breaker.
//! - [`reply`]: how an answer finds its way back to its connection.
//!
//! Around it: [`config`] (the TOML file, validated), [`limiter`] (rules,
//! policies and their math), [`quota`] (tenants' plans at their source of
//! truth), [`access`] (who may use which tenants, by peer credentials),
//! [`admin`] (the `tenant_*` ops), [`keys`] (state key names),
//! [`clock`], [`error`] (wire error codes), [`stats`], [`metrics`]
//! (Prometheus), [`shutdown`] (signals), [`systemd`] (socket activation,
//! readiness and watchdog), [`tls`] (rustls for Redis and PostgreSQL), [`daemon`]
//! (everything assembled) and [`client`] (a Rust client).

pub mod access;
pub mod admin;
pub mod backend;
pub mod client;
pub mod clock;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod error;
pub mod keys;
pub mod limiter;
pub mod metrics;
pub mod near;
pub mod protocol;
pub mod quota;
pub mod reply;
pub mod router;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod socket;
pub mod stats;
pub mod systemd;
pub mod tls;
