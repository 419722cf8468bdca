//! The response cache, independent of where entries live.
//!
//! The Redis backend keeps entries with `lua/cache.lua`; [`memory`] keeps
//! them in process for the embedded backend, with the same semantics:
//! entries are fresh for `ttl_ms`, then served stale (one caller told to
//! refresh) for `stale_ms`; a miss with `fill_ms` makes one caller the
//! filler; tags index entries for deletion.

pub mod memory;
