//! Requests and replies to MessagePack maps.
//!
//! Each message is first listed as `(name, value)` pairs, so the map's
//! length is exact and the field order fixed (the golden frames pin it).

use std::collections::BTreeMap;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use super::{
    AdminOp, Body, CheckArgs, Lookup, OPS, Op, PROTOCOL_VERSION, Reply, Request, ShardOp,
    server_name,
};
use crate::config::TenantRecord;
use crate::error::Error;
use crate::limiter::Decision;

/// One field's value.
enum Val<'a> {
    Bool(bool),
    U64(u64),
    Str(&'a str),
    String(String),
    Bin(&'a [u8]),
    Strs(&'a [String]),
    Ops,
    Counters(&'a [(&'static str, u64)]),
    /// Names to numbers (whole numbers as integers).
    Numbers(&'a BTreeMap<String, f64>),
    Tenants(&'a [(String, TenantRecord)]),
    Error(&'a Error),
}

impl Serialize for Val<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Val::Bool(b) => s.serialize_bool(*b),
            Val::U64(n) => s.serialize_u64(*n),
            Val::Str(v) => s.serialize_str(v),
            Val::String(v) => s.serialize_str(v),
            Val::Bin(v) => s.serialize_bytes(v),
            Val::Strs(v) => v.serialize(s),
            Val::Ops => OPS.serialize(s),
            Val::Counters(c) => {
                let mut m = s.serialize_map(Some(c.len()))?;
                for (k, v) in c.iter() {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
            Val::Numbers(n) => {
                let mut m = s.serialize_map(Some(n.len()))?;
                for (k, v) in n.iter() {
                    m.serialize_entry(k, &Number(*v))?;
                }
                m.end()
            }
            Val::Tenants(all) => {
                let mut seq = s.serialize_seq(Some(all.len()))?;
                for (tenant, r) in all.iter() {
                    let fields = vec![
                        ("tenant", Val::Str(tenant)),
                        ("plan", Val::Str(&r.plan)),
                        ("limits", Val::Numbers(&r.limits)),
                    ];
                    seq.serialize_element(&Map(fields))?;
                }
                seq.end()
            }
            Val::Error(e) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("code", e.code())?;
                m.serialize_entry("message", &e.to_string())?;
                m.end()
            }
        }
    }
}

type Fields<'a> = Vec<(&'static str, Val<'a>)>;

/// A number on the wire: an integer when it is whole.
struct Number(f64);

impl Serialize for Number {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        if n.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&n) {
            s.serialize_u64(n as u64)
        } else if n.fract() == 0.0 && n >= i64::MIN as f64 && n < 0.0 {
            s.serialize_i64(n as i64)
        } else {
            s.serialize_f64(n)
        }
    }
}

/// Fields written as a nested map.
struct Map<'a>(Fields<'a>);

impl Serialize for Map<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

fn write_map<S: Serializer>(s: S, fields: Fields) -> Result<S::Ok, S::Error> {
    Map(fields).serialize(s)
}

fn decision<'a>(f: &mut Fields<'a>, d: &'a Decision) {
    f.extend([
        ("allowed", Val::Bool(d.allowed)),
        ("limit", Val::U64(d.limit)),
        ("remaining", Val::U64(d.remaining)),
        ("reset_ms", Val::U64(d.reset_ms)),
        ("retry_after_ms", Val::U64(d.retry_after_ms)),
        ("degraded", Val::Bool(d.degraded)),
        ("rule", Val::Str(&d.rule)),
    ]);
}

/// A lookup's fields (`degraded` is the caller's to write).
fn lookup<'a>(f: &mut Fields<'a>, l: &'a Lookup) {
    f.push(("hit", Val::Bool(l.value.is_some())));
    match &l.value {
        Some(v) => f.extend([
            ("value", Val::Bin(v)),
            ("ttl_ms", Val::U64(l.ttl_ms)),
            ("stale", Val::Bool(l.stale)),
            ("refresh", Val::Bool(l.refresh)),
        ]),
        None => f.push(("fill", Val::Bool(l.fill))),
    }
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut f: Fields = Vec::with_capacity(16);
        f.push(("id", Val::U64(self.id)));
        f.push(("ok", Val::Bool(self.body.is_ok())));
        match &self.body {
            Err(e) => f.push(("error", Val::Error(e))),
            Ok(Body::Hello(h)) => f.extend([
                ("protocol", Val::U64(PROTOCOL_VERSION.into())),
                ("server", Val::String(server_name())),
                ("backend", Val::Str(h.backend)),
                ("ops", Val::Ops),
            ]),
            Ok(Body::Decision(d)) => decision(&mut f, d),
            Ok(Body::Lookup(l)) => {
                lookup(&mut f, l);
                f.push(("degraded", Val::Bool(l.degraded)));
            }
            Ok(Body::Stored { degraded }) => f.push(("degraded", Val::Bool(*degraded))),
            Ok(Body::Deleted { deleted, degraded }) => f.extend([
                ("deleted", Val::U64(*deleted)),
                ("degraded", Val::Bool(*degraded)),
            ]),
            Ok(Body::CheckLookup(d, l)) => {
                decision(&mut f, d);
                if let Some(l) = l {
                    lookup(&mut f, l);
                }
            }
            Ok(Body::Stats(st)) => f.extend([
                ("uptime_ms", Val::U64(st.uptime_ms)),
                ("backend", Val::Str(st.backend)),
                ("shards", Val::U64(st.shards)),
                ("counters", Val::Counters(&st.counters)),
            ]),
            Ok(Body::Tenant { source, record }) => {
                f.push(("source", Val::Str(source)));
                f.push(("known", Val::Bool(record.is_some())));
                if let Some(r) = record {
                    f.extend([
                        ("plan", Val::Str(&r.plan)),
                        ("limits", Val::Numbers(&r.limits)),
                    ]);
                }
            }
            Ok(Body::Done) => {}
            Ok(Body::Removed(existed)) => f.push(("deleted", Val::U64(u64::from(*existed)))),
            Ok(Body::Tenants(all)) => f.push(("tenants", Val::Tenants(all))),
        }
        write_map(s, f)
    }
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut f: Fields = Vec::with_capacity(10);
        f.push(("id", Val::U64(self.id)));
        f.push(("op", Val::Str(self.op.name())));
        match &self.op {
            Op::Local(_) => {}
            Op::Shard(ShardOp::Check(c)) => check_fields(&mut f, c),
            Op::Shard(ShardOp::CheckGet(c, g)) => {
                check_fields(&mut f, c);
                f.push(("cache_key", Val::Str(&g.key)));
                if g.fill_ms > 0 {
                    f.push(("fill_ms", Val::U64(g.fill_ms)));
                }
            }
            Op::Shard(ShardOp::CacheGet(g)) => {
                f.extend([("tenant", Val::Str(&g.tenant)), ("key", Val::Str(&g.key))]);
                if g.fill_ms > 0 {
                    f.push(("fill_ms", Val::U64(g.fill_ms)));
                }
            }
            Op::Shard(ShardOp::CacheSet(c)) => {
                f.extend([
                    ("tenant", Val::Str(&c.tenant)),
                    ("key", Val::Str(&c.key)),
                    ("value", Val::Bin(&c.value)),
                    ("ttl_ms", Val::U64(c.ttl_ms)),
                ]);
                if c.stale_ms > 0 {
                    f.push(("stale_ms", Val::U64(c.stale_ms)));
                }
                if !c.tags.is_empty() {
                    f.push(("tags", Val::Strs(&c.tags)));
                }
            }
            Op::Shard(ShardOp::CacheDel(d)) => {
                f.push(("tenant", Val::Str(&d.tenant)));
                if !d.keys.is_empty() {
                    f.push(("keys", Val::Strs(&d.keys)));
                }
                if !d.tags.is_empty() {
                    f.push(("tags", Val::Strs(&d.tags)));
                }
                if d.fill_only {
                    f.push(("fill_only", Val::Bool(true)));
                }
            }
            Op::Admin(AdminOp::TenantGet(t) | AdminOp::TenantDelete(t)) => {
                f.push(("tenant", Val::Str(t)))
            }
            Op::Admin(AdminOp::TenantSet(t, r)) => {
                f.extend([("tenant", Val::Str(t)), ("plan", Val::Str(&r.plan))]);
                if !r.limits.is_empty() {
                    f.push(("limits", Val::Numbers(&r.limits)));
                }
            }
            Op::Admin(AdminOp::TenantList) => {}
        }
        write_map(s, f)
    }
}

fn check_fields<'a>(f: &mut Fields<'a>, c: &'a CheckArgs) {
    f.extend([("tenant", Val::Str(&c.tenant)), ("key", Val::Str(&c.key))]);
    if let Some(p) = &c.policy {
        f.push(("policy", Val::Str(p)));
    }
    f.push(("cost", Val::U64(c.cost)));
}

/// Writes one reply, as a MessagePack map, to `out`.
pub fn encode_reply(reply: &Reply, out: &mut impl std::io::Write) {
    let mut ser = rmp_serde::Serializer::new(out);
    reply
        .serialize(&mut ser)
        .expect("serializing into memory cannot fail");
}

/// Appends one request, as a MessagePack map, to `out`.
pub fn encode_request(req: &Request, out: &mut Vec<u8>) {
    let mut ser = rmp_serde::Serializer::new(out);
    req.serialize(&mut ser)
        .expect("serializing into memory cannot fail");
}
