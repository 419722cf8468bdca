//! Protocol version 1: the requests and replies every client speaks, and
//! their MessagePack form (`docs/protocol.md` is the normative text).
//!
//! A frame is a 4-byte big-endian length and one MessagePack map with string
//! keys. [`decode`] turns a request frame into a [`Request`] or an error
//! that says whether the connection must close; [`Reply`] serializes itself.
//! The client half (request encoding, [`ReplyFields`]) lives here too, so the
//! two sides cannot drift apart: the golden frames in `tests/fixtures/` check
//! both.

mod decode;

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::error::Error;
use crate::limiter::Decision;

pub use decode::{DecodeError, Limits, decode};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every op this build answers, as listed by `hello`.
pub const OPS: &[&str] = &["hello", "check", "stats"];

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Hello,
    Check(CheckArgs),
    Stats,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Check(_) => "check",
            Op::Stats => "stats",
        }
    }
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
    Stats(Stats),
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

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = match &self.body {
            Err(_) => 1,
            Ok(Body::Hello(_)) => 4,
            Ok(Body::Decision(_)) => 7,
            Ok(Body::Stats(_)) => 4,
        };
        let mut m = s.serialize_map(Some(2 + fields))?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("ok", &self.body.is_ok())?;
        match &self.body {
            Err(e) => m.serialize_entry(
                "error",
                &WireError {
                    code: e.code().to_owned(),
                    message: e.to_string(),
                },
            )?,
            Ok(Body::Hello(h)) => {
                m.serialize_entry("protocol", &PROTOCOL_VERSION)?;
                m.serialize_entry("server", &server_name())?;
                m.serialize_entry("backend", h.backend)?;
                m.serialize_entry("ops", OPS)?;
            }
            Ok(Body::Decision(d)) => {
                m.serialize_entry("allowed", &d.allowed)?;
                m.serialize_entry("limit", &d.limit)?;
                m.serialize_entry("remaining", &d.remaining)?;
                m.serialize_entry("reset_ms", &d.reset_ms)?;
                m.serialize_entry("retry_after_ms", &d.retry_after_ms)?;
                m.serialize_entry("degraded", &d.degraded)?;
                m.serialize_entry("rule", &*d.rule)?;
            }
            Ok(Body::Stats(st)) => {
                m.serialize_entry("uptime_ms", &st.uptime_ms)?;
                m.serialize_entry("backend", st.backend)?;
                m.serialize_entry("shards", &st.shards)?;
                m.serialize_entry("counters", &CounterMap(&st.counters))?;
            }
        }
        m.end()
    }
}

struct CounterMap<'a>(&'a [(&'static str, u64)]);

impl Serialize for CounterMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The `error` map of a failed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
}

/// Writes one reply, as a MessagePack map, to `out`.
pub fn encode_reply(reply: &Reply, out: &mut impl std::io::Write) {
    let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
    reply
        .serialize(&mut ser)
        .expect("serializing into memory cannot fail");
}

// ---- The client half ------------------------------------------------------

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = match &self.op {
            Op::Hello | Op::Stats => 0,
            Op::Check(c) => 3 + usize::from(c.policy.is_some()),
        };
        let mut m = s.serialize_map(Some(2 + fields))?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("op", self.op.name())?;
        if let Op::Check(c) = &self.op {
            m.serialize_entry("tenant", &c.tenant)?;
            m.serialize_entry("key", &c.key)?;
            if let Some(p) = &c.policy {
                m.serialize_entry("policy", p)?;
            }
            m.serialize_entry("cost", &c.cost)?;
        }
        m.end()
    }
}

/// Appends one request, as a MessagePack map, to `out`.
pub fn encode_request(req: &Request, out: &mut Vec<u8>) {
    let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
    req.serialize(&mut ser)
        .expect("serializing into memory cannot fail");
}

/// Every field any reply may carry, as a client reads it: unknown fields
/// are ignored, so a newer server's additions never break an older client.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ReplyFields {
    pub id: u64,
    pub ok: bool,
    pub error: Option<WireError>,
    // hello
    pub protocol: Option<u32>,
    pub server: Option<String>,
    pub backend: Option<String>,
    pub ops: Option<Vec<String>>,
    // check
    pub allowed: Option<bool>,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub reset_ms: Option<u64>,
    pub retry_after_ms: Option<u64>,
    pub degraded: Option<bool>,
    pub rule: Option<String>,
    // stats
    pub uptime_ms: Option<u64>,
    pub shards: Option<u64>,
    pub counters: Option<BTreeMap<String, u64>>,
}

impl ReplyFields {
    pub fn from_slice(frame: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(frame)
    }

    /// The decision of a `check` reply, if it is one.
    pub fn decision(&self) -> Option<Decision> {
        Some(Decision {
            allowed: self.allowed?,
            limit: self.limit?,
            remaining: self.remaining?,
            reset_ms: self.reset_ms?,
            retry_after_ms: self.retry_after_ms?,
            degraded: self.degraded?,
            rule: self.rule.as_deref()?.into(),
        })
    }
}
