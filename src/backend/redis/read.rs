//! Plain cache reads: `HMGET entry v s` and `PTTL entry`, pipelined.
//!
//! A fresh hit, the common case, needs no script: reading through Lua
//! costs Redis several times more (the value is copied into and out of
//! Lua). Only a read that must take a lock (a stale hit names a
//! refresher, a miss with `fill_ms` names a filler) goes to the script.
//!
//! A poll (a shard looking again for the value its callers wait on) also
//! asks, first, whether anyone still holds the entry's fill lock: once
//! nobody does and there is no value, nobody is going to set one.

use bytes::Bytes;
use redis::{Cmd, Value};

use crate::keys::Keys;
use crate::protocol::{CacheGetArgs, Lookup};

/// What the commands found.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    value: Option<Bytes>,
    stale_ms: u64,
    /// The entry's remaining life, from PTTL.
    pttl_ms: i64,
    /// A poll: whether the fill lock was held. `None` for other reads.
    filling: Option<bool>,
}

/// The commands of one read: for a poll `EXISTS fill lock` first (so a
/// value set after it is still seen by the `HMGET`), then `HMGET`, `PTTL`;
/// with the entry's name.
pub fn commands(keys: &Keys, g: &CacheGetArgs, poll: bool) -> (String, Vec<Cmd>) {
    let entry = keys.entry(&g.tenant, &g.key);
    let mut cmds = Vec::with_capacity(3);
    if poll {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(keys.fill_lock(&g.tenant, &g.key));
        cmds.push(exists);
    }
    let mut hmget = redis::cmd("HMGET");
    hmget.arg(&entry).arg("v").arg("s");
    let mut pttl = redis::cmd("PTTL");
    pttl.arg(&entry);
    cmds.extend([hmget, pttl]);
    (entry, cmds)
}

/// Reads the replies of [`commands`] (`exists` for a poll only); `None`
/// if they are not that shape.
pub fn parse(exists: Option<Value>, hmget: Value, pttl: Value) -> Option<Read> {
    let filling = match exists {
        Some(Value::Int(n)) => Some(n > 0),
        Some(_) => return None,
        None => None,
    };
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
        filling,
    })
}

impl Read {
    /// True if answering needs a lock, which only the script can take (a
    /// poll never takes one).
    pub fn needs_lock(&self, g: &CacheGetArgs) -> bool {
        self.filling.is_none() && (self.is_stale() || (self.value.is_none() && g.fill_ms > 0))
    }

    /// A fresh value and how long it stays fresh, for the near cache; not
    /// for an entry without expiry (quotad never writes one).
    pub fn fresh(&self) -> Option<(Bytes, u64)> {
        let value = self.value.as_ref()?;
        (self.pttl_ms > 0 && self.fresh_ms() > 0).then(|| (value.clone(), self.fresh_ms() as u64))
    }

    fn fresh_ms(&self) -> i64 {
        self.pttl_ms - self.stale_ms as i64
    }

    fn is_stale(&self) -> bool {
        self.value.is_some() && self.pttl_ms >= 0 && self.fresh_ms() <= 0
    }

    /// The answer when no lock is needed. A poll's miss has `fill` set
    /// when nobody holds the fill lock any more (see [`crate::backend::job::Job`]).
    pub fn lookup(self) -> Lookup {
        let stale = self.is_stale();
        Lookup {
            ttl_ms: self.fresh_ms().max(0) as u64,
            fill: self.value.is_none() && self.filling == Some(false),
            value: self.value,
            stale,
            ..Lookup::default()
        }
    }
}
