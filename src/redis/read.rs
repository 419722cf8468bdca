//! Plain cache reads: `HMGET entry v s` and `PTTL entry`, pipelined.
//!
//! A fresh hit, the common case, needs no script: reading through Lua
//! costs Redis several times more (the value is copied into and out of
//! Lua). Only a read that must take a lock (a stale hit names a
//! refresher, a miss with `fill_ms` names a filler) goes to the script.

use bytes::Bytes;
use redis::{Cmd, Value};

use crate::keys::Keys;
use crate::protocol::{CacheGetArgs, Lookup};

/// What the two commands found.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    value: Option<Bytes>,
    stale_ms: u64,
    /// The entry's remaining life, from PTTL.
    pttl_ms: i64,
}

/// The two commands of one read.
pub fn commands(keys: &Keys, g: &CacheGetArgs) -> [Cmd; 2] {
    let entry = keys.entry(&g.tenant, &g.key);
    let mut hmget = redis::cmd("HMGET");
    hmget.arg(&entry).arg("v").arg("s");
    let mut pttl = redis::cmd("PTTL");
    pttl.arg(entry);
    [hmget, pttl]
}

/// Reads the replies of [`commands`]; `None` if they are not that shape.
pub fn parse(hmget: Value, pttl: Value) -> Option<Read> {
    let (Value::Array(fields), Value::Int(pttl_ms)) = (hmget, pttl) else {
        return None;
    };
    let mut fields = fields.into_iter();
    let value = match fields.next()? {
        Value::BulkString(v) => Some(Bytes::from(v)),
        Value::Nil => None,
        _ => return None,
    };
    let stale_ms = match fields.next()? {
        Value::BulkString(s) => std::str::from_utf8(&s).ok()?.parse().ok()?,
        _ => 0,
    };
    Some(Read {
        value,
        stale_ms,
        pttl_ms,
    })
}

impl Read {
    /// True if answering needs a lock, which only the script can take.
    pub fn needs_lock(&self, g: &CacheGetArgs, poll: bool) -> bool {
        !poll && (self.is_stale() || (self.value.is_none() && g.fill_ms > 0))
    }

    fn fresh_ms(&self) -> i64 {
        self.pttl_ms - self.stale_ms as i64
    }

    fn is_stale(&self) -> bool {
        self.value.is_some() && self.pttl_ms >= 0 && self.fresh_ms() <= 0
    }

    /// The answer when no lock is needed (or wanted, for a poll).
    pub fn lookup(self) -> Lookup {
        let stale = self.is_stale();
        Lookup {
            ttl_ms: self.fresh_ms().max(0) as u64,
            value: self.value,
            stale,
            ..Lookup::default()
        }
    }
}
