//! Protocol version 1: the requests and replies every client speaks, and
//! their MessagePack form (`docs/protocol.md` is the normative text).
//!
//! A frame is a 4-byte big-endian length and one MessagePack map with string
//! keys. [`decode`] turns a request frame into a [`Request`] or an error
//! that says whether the connection must close; [`encode_reply`] writes a
//! [`Reply`]. The client half ([`encode_request`], [`ReplyFields`]) lives
//! here too, so the two sides cannot drift apart: the golden frames in
//! `tests/fixtures/` check both.

mod decode;
mod encode;
mod fields;
mod flat;
mod loose;
mod op;

use bytes::Bytes;

use crate::config::TenantRecord;
use crate::error::Error;
use crate::limiter::usage::RuleUsage;
use crate::limiter::{Decision, Lease};

pub use decode::{DecodeError, decode, decode_general};
pub use encode::{encode_reply, encode_request};
pub use fields::{ReplyFields, TenantFields, UsageFields, WireError};
pub use op::{AdminOp, Answerer, LocalOp, OPS, Op, OpKind, ShardOp};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckArgs {
    pub tenant: String,
    pub key: String,
    /// `None`: the policy named `default`.
    pub policy: Option<String>,
    /// Units to charge; 0 peeks without charging.
    pub cost: u64,
}

/// `release`: the check's tenant, key and policy, and the lease it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseArgs {
    pub tenant: String,
    pub key: String,
    /// `None`: the tenant's default policy.
    pub policy: Option<String>,
    pub lease: Lease,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheGetArgs {
    pub tenant: String,
    pub key: String,
    /// On a miss, hold concurrent missers this long while the first one
    /// (told `fill: true`) computes the value. 0: no single-flight.
    pub fill_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSetArgs {
    pub tenant: String,
    pub key: String,
    pub value: Bytes,
    /// How long the entry is fresh (> 0).
    pub ttl_ms: u64,
    /// After `ttl_ms`, how long it is still served, marked stale.
    pub stale_ms: u64,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDelArgs {
    pub tenant: String,
    pub keys: Vec<String>,
    pub tags: Vec<String>,
    /// Only the fill locks of `keys` go (a filler giving up); entries stay.
    pub fill_only: bool,
}

/// A reply: `id`, `ok`, then the op's fields or an `error` map.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub id: u64,
    pub body: Result<Body, Error>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Hello(Hello),
    Decision(Decision),
    Lookup(Lookup),
    /// `cache_set`: stored (or, when degraded, not).
    Stored {
        degraded: bool,
    },
    /// `cache_del`: how many entries went.
    Deleted {
        deleted: u64,
        degraded: bool,
    },
    /// `check_get`: the decision, and the lookup when it allowed.
    CheckLookup(Decision, Option<Lookup>),
    /// `release`: whether the lease was still outstanding (degraded: the
    /// backend could not say, and nothing was released there).
    Released {
        released: bool,
        degraded: bool,
    },
    Stats(Stats),
    /// `tenant_get`: the record (`None`: unknown to the source).
    Tenant {
        source: &'static str,
        record: Option<TenantRecord>,
    },
    /// `tenant_set`: done.
    Done,
    /// `tenant_delete`: whether a record was there.
    Removed(bool),
    /// `tenant_list`.
    Tenants(Vec<(String, TenantRecord)>),
    /// `usage`: every rule of the policy, in order.
    Usage(Vec<RuleUsage>),
}

/// The answer to a cache read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lookup {
    /// `None`: a miss.
    pub value: Option<Bytes>,
    /// Hit: ms the entry stays fresh (0 when stale).
    pub ttl_ms: u64,
    /// Hit: past its `ttl_ms`, served within its `stale_ms`.
    pub stale: bool,
    /// Stale hit: this caller, and no other, should refresh the entry.
    pub refresh: bool,
    /// Miss with `fill_ms`: this caller, and no other, should compute the
    /// value and `cache_set` it; the others wait for it.
    pub fill: bool,
    pub degraded: bool,
}

impl Lookup {
    /// A miss because the backend could not answer.
    pub fn degraded_miss() -> Self {
        Lookup {
            degraded: true,
            ..Lookup::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// `redis` or `memory`.
    pub backend: &'static str,
}

/// The `stats` reply: a snapshot of the daemon's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub uptime_ms: u64,
    pub backend: &'static str,
    pub shards: u64,
    pub counters: Vec<(&'static str, u64)>,
    /// Shadow denials by `<policy>.<rule>` (only those above 0).
    pub shadow_denials: Vec<(String, u64)>,
}

impl Reply {
    pub fn ok(id: u64, body: Body) -> Self {
        Reply { id, body: Ok(body) }
    }

    pub fn err(id: u64, error: Error) -> Self {
        Reply {
            id,
            body: Err(error),
        }
    }
}

/// The server's name and version, as `hello` reports it.
pub fn server_name() -> String {
    format!("quotad/{}", env!("CARGO_PKG_VERSION"))
}
