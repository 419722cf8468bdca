//! Requests and replies to MessagePack maps.
//!
//! Each message is first listed as `(name, value)` pairs, so the map's
//! length is exact and the field order fixed (the golden frames pin it).
//! The pairs are written straight into the output buffer in the smallest
//! MessagePack form of each value, as rmp does: a reply goes out for every
//! request, and serde's generic path cost more than the rest of a check.

use std::collections::BTreeMap;

use smallvec::SmallVec;

use super::{
    AdminOp, Body, CheckArgs, Lookup, OPS, Op, PROTOCOL_VERSION, Reply, Request, ShardOp,
    server_name,
};
use crate::config::TenantRecord;
use crate::error::Error;
use crate::limiter::Decision;
use crate::limiter::usage::RuleUsage;

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
    /// Names to counts.
    Tally(&'a [(String, u64)]),
    /// Names to numbers (whole numbers as integers).
    Numbers(&'a BTreeMap<String, f64>),
    Tenants(&'a [(String, TenantRecord)]),
    Usage(&'a [RuleUsage]),
    Error(&'a Error),
}

impl Val<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Val::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            Val::U64(n) => uint(out, *n),
            Val::Str(v) => string(out, v),
            Val::String(v) => string(out, v),
            Val::Bin(v) => bin(out, v),
            Val::Strs(v) => strs(out, v.iter().map(String::as_str), v.len()),
            Val::Ops => strs(out, OPS.iter().copied(), OPS.len()),
            Val::Counters(c) => {
                map_len(out, c.len());
                for (k, v) in c.iter() {
                    string(out, k);
                    uint(out, *v);
                }
            }
            Val::Tally(c) => {
                map_len(out, c.len());
                for (k, v) in c.iter() {
                    string(out, k);
                    uint(out, *v);
                }
            }
            Val::Numbers(n) => {
                map_len(out, n.len());
                for (k, v) in n.iter() {
                    string(out, k);
                    number(out, *v);
                }
            }
            Val::Tenants(all) => {
                array_len(out, all.len());
                for (tenant, r) in all.iter() {
                    write_map(
                        out,
                        &[
                            ("tenant", Val::Str(tenant)),
                            ("plan", Val::Str(&r.plan)),
                            ("limits", Val::Numbers(&r.limits)),
                        ],
                    );
                }
            }
            Val::Usage(rules) => {
                array_len(out, rules.len());
                for u in rules.iter() {
                    write_map(
                        out,
                        &[
                            ("rule", Val::Str(&u.rule)),
                            ("kind", Val::Str(u.kind)),
                            ("limit", Val::U64(u.limit)),
                            ("used", Val::U64(u.used)),
                            ("remaining", Val::U64(u.remaining)),
                            ("reset_ms", Val::U64(u.reset_ms)),
                            ("window_ms", Val::U64(u.window_ms)),
                        ],
                    );
                }
            }
            Val::Error(e) => write_map(
                out,
                &[
                    ("code", Val::Str(e.code())),
                    ("message", Val::String(e.to_string())),
                ],
            ),
        }
    }
}

/// An array or map length: `fix` holds up to 15, then 16 or 32 bits.
fn len(out: &mut Vec<u8>, n: usize, fix: u8, marker16: u8) {
    if n < 16 {
        out.push(fix | n as u8);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(marker16);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(marker16 + 1);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

fn map_len(out: &mut Vec<u8>, n: usize) {
    len(out, n, 0x80, 0xde);
}

fn array_len(out: &mut Vec<u8>, n: usize) {
    len(out, n, 0x90, 0xdc);
}

fn uint(out: &mut Vec<u8>, n: u64) {
    match n {
        0..=0x7f => out.push(n as u8),
        0x80..=0xff => {
            out.push(0xcc);
            out.push(n as u8);
        }
        0x100..=0xffff => {
            out.push(0xcd);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// A negative integer.
fn negative(out: &mut Vec<u8>, n: i64) {
    if n >= -32 {
        out.push(n as i8 as u8);
    } else if let Ok(n) = i8::try_from(n) {
        out.push(0xd0);
        out.push(n as u8);
    } else if let Ok(n) = i16::try_from(n) {
        out.push(0xd1);
        out.extend_from_slice(&n.to_be_bytes());
    } else if let Ok(n) = i32::try_from(n) {
        out.push(0xd2);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// A number on the wire: an integer when it is whole.
fn number(out: &mut Vec<u8>, n: f64) {
    if n.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&n) {
        uint(out, n as u64)
    } else if n.fract() == 0.0 && n >= i64::MIN as f64 && n < 0.0 {
        negative(out, n as i64)
    } else {
        out.push(0xcb);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// A string or binary's length past the fixed forms: 8, 16 or 32 bits.
fn sized(out: &mut Vec<u8>, n: usize, marker8: u8) {
    if let Ok(n) = u8::try_from(n) {
        out.push(marker8);
        out.push(n);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(marker8 + 1);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(marker8 + 2);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    if s.len() < 32 {
        out.push(0xa0 | s.len() as u8);
    } else {
        sized(out, s.len(), 0xd9);
    }
    out.extend_from_slice(s.as_bytes());
}

fn bin(out: &mut Vec<u8>, b: &[u8]) {
    sized(out, b.len(), 0xc4);
    out.extend_from_slice(b);
}

fn strs<'s>(out: &mut Vec<u8>, all: impl Iterator<Item = &'s str>, n: usize) {
    array_len(out, n);
    for s in all {
        string(out, s);
    }
}

fn write_map(out: &mut Vec<u8>, f: &[(&str, Val)]) {
    map_len(out, f.len());
    fields(out, f);
}

fn fields(out: &mut Vec<u8>, f: &[(&str, Val)]) {
    for (k, v) in f {
        string(out, k);
        v.write(out);
    }
}

/// A message's fields, on the stack: a reply is written for every request,
/// and a heap list per reply cost more than writing it.
type Fields<'a> = SmallVec<[(&'static str, Val<'a>); 20]>;

/// How many fields [`decision`] writes.
fn decision_len(d: &Decision) -> usize {
    9 + usize::from(d.lease.is_some()) + 2 * usize::from(d.shadow_rule.is_some())
}

/// A decision's fields, written straight out: a check's reply is the most
/// common message by far, and listing its fields first cost more than
/// writing them.
fn decision(out: &mut Vec<u8>, d: &Decision) {
    let boolean = |out: &mut Vec<u8>, b: bool| out.push(if b { 0xc3 } else { 0xc2 });
    string(out, "allowed");
    boolean(out, d.allowed);
    string(out, "limit");
    uint(out, d.limit);
    string(out, "remaining");
    uint(out, d.remaining);
    string(out, "reset_ms");
    uint(out, d.reset_ms);
    string(out, "retry_after_ms");
    uint(out, d.retry_after_ms);
    string(out, "degraded");
    boolean(out, d.degraded);
    string(out, "rule");
    string(out, &d.rule);
    string(out, "kind");
    string(out, d.kind);
    string(out, "window_ms");
    uint(out, d.window_ms);
    if let Some(lease) = d.lease {
        string(out, "lease");
        string(out, &lease.to_string());
    }
    if let Some(s) = &d.shadow_rule {
        string(out, "shadow_denied");
        boolean(out, true);
        string(out, "shadow_rule");
        string(out, s);
    }
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

impl Reply {
    fn write(&self, out: &mut Vec<u8>) {
        // A decision's fields are written straight out, ahead of the list.
        let mut decided = None;
        let mut f = Fields::new();
        match &self.body {
            Err(e) => f.push(("error", Val::Error(e))),
            Ok(Body::Hello(h)) => f.extend([
                ("protocol", Val::U64(PROTOCOL_VERSION.into())),
                ("server", Val::String(server_name())),
                ("backend", Val::Str(h.backend)),
                ("ops", Val::Ops),
            ]),
            Ok(Body::Decision(d)) => decided = Some(d),
            Ok(Body::CheckLookup(d, l)) => {
                decided = Some(d);
                if let Some(l) = l {
                    lookup(&mut f, l);
                }
            }
            Ok(Body::Lookup(l)) => {
                lookup(&mut f, l);
                f.push(("degraded", Val::Bool(l.degraded)));
            }
            Ok(Body::Stored { degraded }) => f.push(("degraded", Val::Bool(*degraded))),
            Ok(Body::Deleted { deleted, degraded }) => f.extend([
                ("deleted", Val::U64(*deleted)),
                ("degraded", Val::Bool(*degraded)),
            ]),
            Ok(Body::Released { released, degraded }) => f.extend([
                ("released", Val::Bool(*released)),
                ("degraded", Val::Bool(*degraded)),
            ]),
            Ok(Body::Stats(st)) => f.extend([
                ("uptime_ms", Val::U64(st.uptime_ms)),
                ("backend", Val::Str(st.backend)),
                ("shards", Val::U64(st.shards)),
                ("counters", Val::Counters(&st.counters)),
                ("shadow_denials", Val::Tally(&st.shadow_denials)),
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
            Ok(Body::Usage(rules)) => f.push(("rules", Val::Usage(rules))),
        }
        map_len(out, 2 + decided.map_or(0, decision_len) + f.len());
        string(out, "id");
        uint(out, self.id);
        string(out, "ok");
        Val::Bool(self.body.is_ok()).write(out);
        if let Some(d) = decided {
            decision(out, d);
        }
        fields(out, &f);
    }
}

impl Request {
    fn write(&self, out: &mut Vec<u8>) {
        let mut f = Fields::new();
        f.push(("id", Val::U64(self.id)));
        f.push(("op", Val::Str(self.op.name())));
        match &self.op {
            Op::Local(_) => {}
            Op::Shard(ShardOp::Check(c)) => check_fields(&mut f, c),
            Op::Shard(ShardOp::Usage(c)) => {
                f.extend([("tenant", Val::Str(&c.tenant)), ("key", Val::Str(&c.key))]);
                if let Some(p) = &c.policy {
                    f.push(("policy", Val::Str(p)));
                }
            }
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
            Op::Shard(ShardOp::Release(r)) => {
                f.extend([("tenant", Val::Str(&r.tenant)), ("key", Val::Str(&r.key))]);
                if let Some(p) = &r.policy {
                    f.push(("policy", Val::Str(p)));
                }
                f.push(("lease", Val::String(r.lease.to_string())));
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
        write_map(out, &f)
    }
}

fn check_fields<'a>(f: &mut Fields<'a>, c: &'a CheckArgs) {
    f.extend([("tenant", Val::Str(&c.tenant)), ("key", Val::Str(&c.key))]);
    if let Some(p) = &c.policy {
        f.push(("policy", Val::Str(p)));
    }
    f.push(("cost", Val::U64(c.cost)));
}

/// Appends one reply, as a MessagePack map, to `out`.
pub fn encode_reply(reply: &Reply, out: &mut Vec<u8>) {
    reply.write(out);
}

/// Appends one request, as a MessagePack map, to `out`.
pub fn encode_request(req: &Request, out: &mut Vec<u8>) {
    req.write(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(v: Val) -> Vec<u8> {
        let mut out = Vec::new();
        v.write(&mut out);
        out
    }

    /// Every form at and around each size boundary is the one rmp writes.
    #[test]
    fn each_value_is_written_as_rmp_writes_it() {
        for n in [
            0u64,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            u64::MAX,
        ] {
            assert_eq!(ours(Val::U64(n)), rmp_serde::to_vec(&n).unwrap(), "{n}");
        }
        for b in [true, false] {
            assert_eq!(ours(Val::Bool(b)), rmp_serde::to_vec(&b).unwrap());
        }
        for len in [0, 31, 32, 255, 256, 65535, 65536] {
            let s = "x".repeat(len);
            assert_eq!(
                ours(Val::Str(&s)),
                rmp_serde::to_vec(&s).unwrap(),
                "str {len}"
            );
            let b: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut want = Vec::new();
            rmpv::encode::write_value(&mut want, &rmpv::Value::Binary(b.clone())).unwrap();
            assert_eq!(ours(Val::Bin(&b)), want, "bin {len}");
        }
        for len in [0, 15, 16, 65535, 65536] {
            let v: Vec<String> = vec!["a".into(); len];
            assert_eq!(
                ours(Val::Strs(&v)),
                rmp_serde::to_vec(&v).unwrap(),
                "array {len}"
            );
            let m: BTreeMap<String, f64> = (0..len).map(|i| (i.to_string(), 1.0)).collect();
            let want: BTreeMap<String, u64> = m.keys().map(|k| (k.clone(), 1)).collect();
            assert_eq!(
                ours(Val::Numbers(&m)),
                rmp_serde::to_vec(&want).unwrap(),
                "map {len}"
            );
        }
        for n in [
            -1i64,
            -32,
            -33,
            -128,
            -129,
            -32768,
            -32769,
            i32::MIN as i64,
            i32::MIN as i64 - 1,
            i64::MIN,
        ] {
            let m = BTreeMap::from([("n".to_owned(), n as f64)]);
            let want = BTreeMap::from([("n", n)]);
            assert_eq!(
                ours(Val::Numbers(&m)),
                rmp_serde::to_vec(&want).unwrap(),
                "{n}"
            );
        }
        let m = BTreeMap::from([("n".to_owned(), 0.5)]);
        assert_eq!(
            ours(Val::Numbers(&m)),
            rmp_serde::to_vec(&BTreeMap::from([("n", 0.5)])).unwrap()
        );
    }
}
