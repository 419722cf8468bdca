//! Request frames to [`Request`]s, with an error that names the field.
//!
//! The map is first read into loosely typed [`Field`]s (any well-formed
//! MessagePack value is accepted there), and only then checked field by
//! field. So a mistyped field never hides the `id`: the error reply still
//! carries it, and the connection stays open. Only a frame that is not one
//! well-formed MessagePack map is fatal (reply with `id` 0, then close).
//! Nesting depth is bounded and nothing is preallocated from a length the
//! peer claims.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

use bytes::Bytes;

use super::loose::{Field, NAMES, number};
use super::{
    AdminOp, CacheDelArgs, CacheGetArgs, CacheSetArgs, CheckArgs, LocalOp, OpKind, ReleaseArgs,
    Request, ShardOp,
};
use crate::config::{Limits, TenantRecord};
use crate::error::Error;
use crate::limiter::Lease;

/// Nesting allowed in a request. Requests need 2 (a map holding a list of
/// strings); the bound keeps a hostile frame from exhausting the stack.
/// docs/protocol.md allows 16 levels (the request map counting as one);
/// rmp_serde refuses a frame that reaches its limit, hence 17.
const MAX_DEPTH: usize = 17;

/// Why a frame did not become a request.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// Not one well-formed MessagePack map: reply with `id` 0, then close.
    Fatal(Error),
    /// A readable map with a bad field: reply with its `id`, keep going.
    Request { id: u64, error: Error },
}

/// Decodes one request frame (without its length prefix).
pub fn decode(frame: &[u8], limits: &Limits) -> Result<Request, DecodeError> {
    let mut raw = RawRequest {
        fields: Default::default(),
        problem: None,
    };
    if super::flat::fields(frame, &mut raw.fields) {
        into_request(&mut raw, limits)
    } else {
        decode_general(frame, limits)
    }
}

/// [`decode`] without its fast path for flat maps ([`super::flat`]), which
/// must give the same answer for every frame it reads (the fuzz target and
/// the tests compare them).
#[doc(hidden)]
pub fn decode_general(frame: &[u8], limits: &Limits) -> Result<Request, DecodeError> {
    // Read in place: strings are borrowed from the frame rather than
    // copied into the deserializer's own buffer first. The borrowing
    // reader cannot say where it stopped, so trailing bytes are found by
    // measuring the first value beforehand.
    let whole = first_value_len(frame).is_none_or(|n| n == frame.len());
    let mut de = rmp_serde::Deserializer::from_read_ref(frame);
    de.set_max_depth(MAX_DEPTH);
    let mut raw = RawRequest::deserialize(&mut de).map_err(|e| {
        DecodeError::Fatal(Error::bad_request(format!(
            "a frame must hold one MessagePack map with string keys: {e}"
        )))
    })?;
    if !whole {
        return Err(DecodeError::Fatal(Error::bad_request(
            "trailing bytes after the request map",
        )));
    }
    into_request(&mut raw, limits)
}

/// A read map's request, or the error that names its first bad field.
fn into_request(raw: &mut RawRequest, limits: &Limits) -> Result<Request, DecodeError> {
    let id = match raw.fields[0].take() {
        Some(Field::Uint(id)) => id,
        other => {
            let error = Error::bad_request(type_error("id", "an unsigned integer", other.as_ref()));
            return Err(DecodeError::Request { id: 0, error });
        }
    };
    raw.request(id, limits)
        .map_err(|error| DecodeError::Request { id, error })
}

/// The length in bytes of the MessagePack value `b` starts with, or `None`
/// if `b` holds no whole one. Iterative, so nesting costs no stack; a
/// claimed element count past the bytes left fails at once.
fn first_value_len(b: &[u8]) -> Option<usize> {
    let (mut at, mut pending) = (0usize, 1usize);
    let be = |at: usize, n: usize| -> Option<usize> {
        let bytes = b.get(at..at + n)?;
        Some(bytes.iter().fold(0usize, |v, &x| (v << 8) | x as usize))
    };
    while pending > 0 {
        pending -= 1;
        let m = *b.get(at)?;
        at += 1;
        // (header bytes, payload bytes, child values) after the marker.
        let (head, payload, children) = match m {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, 0, 0),
            0x80..=0x8f => (0, 0, 2 * (m & 0x0f) as usize),
            0x90..=0x9f => (0, 0, (m & 0x0f) as usize),
            0xa0..=0xbf => (0, (m & 0x1f) as usize, 0),
            0xc4 | 0xd9 => (1, be(at, 1)?, 0),
            0xc5 | 0xda => (2, be(at, 2)?, 0),
            0xc6 | 0xdb => (4, be(at, 4)?, 0),
            0xc7 => (2, be(at, 1)?, 0),
            0xc8 => (3, be(at, 2)?, 0),
            0xc9 => (5, be(at, 4)?, 0),
            0xca => (0, 4, 0),
            0xcb => (0, 8, 0),
            0xcc..=0xcf => (0, 1 << (m - 0xcc), 0),
            0xd0..=0xd3 => (0, 1 << (m - 0xd0), 0),
            0xd4..=0xd8 => (0, 1 + (1 << (m - 0xd4)), 0),
            0xdc => (2, 0, be(at, 2)?),
            0xdd => (4, 0, be(at, 4)?),
            0xde => (2, 0, 2 * be(at, 2)?),
            0xdf => (4, 0, 2 * be(at, 4)?),
            0xc1 => return None,
        };
        at = at.checked_add(head + payload)?;
        pending = pending.checked_add(children)?;
        if at > b.len() || pending > b.len() - at {
            return None;
        }
    }
    Some(at)
}

fn type_error(field: &str, wanted: &str, got: Option<&Field>) -> String {
    match got {
        None => format!("missing field `{field}`"),
        Some(f) => format!("field `{field}` must be {wanted}, not {}", f.kind()),
    }
}

/// The fields of a request map, before their types are checked.
#[derive(Debug, Default)]
struct RawRequest {
    /// By position in [`NAMES`].
    fields: [Option<Field>; NAMES.len()],
    /// The first structural problem (a non-string or duplicate key).
    problem: Option<String>,
}

fn index(name: &str) -> usize {
    NAMES
        .iter()
        .position(|n| *n == name)
        .expect("a known field")
}

impl RawRequest {
    /// The request its fields make (taking them out).
    fn request(&mut self, id: u64, limits: &Limits) -> Result<Request, Error> {
        if let Some(p) = self.problem.take() {
            return Err(Error::BadRequest(p));
        }
        let name = match self.take("op") {
            Some(Field::Str(op)) => op,
            other => {
                return Err(Error::bad_request(type_error(
                    "op",
                    "a string",
                    other.as_ref(),
                )));
            }
        };
        let kind = OpKind::from_name(&name).ok_or_else(|| Error::unknown_op(&name))?;
        let l = limits;
        let op = match kind {
            OpKind::Hello => LocalOp::Hello.into(),
            OpKind::Stats => LocalOp::Stats.into(),
            OpKind::Check => ShardOp::Check(self.check(l)?).into(),
            OpKind::Usage => ShardOp::Usage(self.usage(l)?).into(),
            OpKind::CheckGet => {
                let check = self.check(l)?;
                let get = CacheGetArgs {
                    tenant: check.tenant.clone(),
                    key: self.string("cache_key", l.max_key_bytes)?,
                    fill_ms: self.fill_ms(l)?,
                };
                ShardOp::CheckGet(check, Box::new(get)).into()
            }
            OpKind::CacheGet => ShardOp::CacheGet(CacheGetArgs {
                tenant: self.string("tenant", l.max_tenant_bytes)?,
                key: self.string("key", l.max_key_bytes)?,
                fill_ms: self.fill_ms(l)?,
            })
            .into(),
            OpKind::CacheSet => ShardOp::CacheSet(Box::new(self.cache_set(l)?)).into(),
            OpKind::Release => ShardOp::Release(self.release(l)?).into(),
            OpKind::CacheDel => ShardOp::CacheDel(self.cache_del(l)?).into(),
            OpKind::TenantGet => {
                AdminOp::TenantGet(self.string("tenant", l.max_tenant_bytes)?).into()
            }
            OpKind::TenantDelete => {
                AdminOp::TenantDelete(self.string("tenant", l.max_tenant_bytes)?).into()
            }
            OpKind::TenantList => AdminOp::TenantList.into(),
            OpKind::TenantSet => {
                let tenant = self.string("tenant", l.max_tenant_bytes)?;
                let plan = self.string("plan", 64)?;
                let limits = self.numbers("limits")?;
                AdminOp::TenantSet(tenant, TenantRecord { plan, limits }).into()
            }
        };
        Ok(Request { id, op })
    }

    fn cache_set(&mut self, l: &Limits) -> Result<CacheSetArgs, Error> {
        let set = CacheSetArgs {
            tenant: self.string("tenant", l.max_tenant_bytes)?,
            key: self.string("key", l.max_key_bytes)?,
            value: self.bin("value", l.max_value_bytes)?,
            ttl_ms: self.uint("ttl_ms", None)?,
            stale_ms: self.uint("stale_ms", Some(0))?,
            tags: self.strings("tags", l.max_tags, l.max_key_bytes)?,
        };
        for (field, v) in [("ttl_ms", set.ttl_ms), ("stale_ms", set.stale_ms)] {
            if v > l.max_ttl_ms {
                return Err(Error::bad_request(format!(
                    "field `{field}` must be at most {}",
                    l.max_ttl_ms
                )));
            }
        }
        if set.ttl_ms == 0 {
            return Err(Error::bad_request("field `ttl_ms` must be greater than 0"));
        }
        Ok(set)
    }

    fn cache_del(&mut self, l: &Limits) -> Result<CacheDelArgs, Error> {
        let tenant = self.string("tenant", l.max_tenant_bytes)?;
        let keys = self.strings("keys", l.max_delete, l.max_key_bytes)?;
        let tags = self.strings("tags", l.max_delete, l.max_key_bytes)?;
        let fill_only = self.flag("fill_only")?;
        if keys.is_empty() && tags.is_empty() {
            return Err(Error::bad_request("`cache_del` needs `keys` or `tags`"));
        }
        if fill_only && !tags.is_empty() {
            return Err(Error::bad_request(
                "`fill_only` drops the fill locks of `keys`: no `tags`",
            ));
        }
        if keys.len() + tags.len() > l.max_delete {
            return Err(Error::bad_request(format!(
                "at most {} keys and tags in one `cache_del`",
                l.max_delete
            )));
        }
        Ok(CacheDelArgs {
            tenant,
            keys,
            tags,
            fill_only,
        })
    }

    /// Takes a field; `nil` counts as absent.
    fn take(&mut self, name: &str) -> Option<Field> {
        self.fields[index(name)].take().filter(|f| *f != Field::Nil)
    }

    fn check(&mut self, l: &Limits) -> Result<CheckArgs, Error> {
        let mut check = self.usage(l)?;
        check.cost = self.uint("cost", Some(1))?;
        Ok(check)
    }

    /// A check's tenant, key and policy, at cost 0 (a `usage` has no cost).
    fn usage(&mut self, l: &Limits) -> Result<CheckArgs, Error> {
        Ok(CheckArgs {
            tenant: self.string("tenant", l.max_tenant_bytes)?,
            key: self.string("key", l.max_key_bytes)?,
            policy: match self.take("policy") {
                None => None,
                Some(Field::Str(p)) => Some(p.into_owned()),
                Some(other) => {
                    return Err(Error::bad_request(type_error(
                        "policy",
                        "a string",
                        Some(&other),
                    )));
                }
            },
            cost: 0,
        })
    }

    fn release(&mut self, l: &Limits) -> Result<ReleaseArgs, Error> {
        let check = self.check(l)?;
        let lease = match self.take("lease") {
            Some(Field::Str(s)) => Lease::parse(&s).ok_or_else(|| {
                Error::bad_request(
                    "field `lease` must be a lease from a check reply (32 lowercase hex digits)",
                )
            })?,
            other => {
                return Err(Error::bad_request(type_error(
                    "lease",
                    "a string",
                    other.as_ref(),
                )));
            }
        };
        Ok(ReleaseArgs {
            tenant: check.tenant,
            key: check.key,
            policy: check.policy,
            lease,
        })
    }

    fn fill_ms(&mut self, l: &Limits) -> Result<u64, Error> {
        let fill = self.uint("fill_ms", Some(0))?;
        if fill > l.max_fill_ms {
            return Err(Error::bad_request(format!(
                "field `fill_ms` must be at most {}",
                l.max_fill_ms
            )));
        }
        Ok(fill)
    }

    /// A required string of 1 to `max` bytes.
    fn string(&mut self, name: &str, max: usize) -> Result<String, Error> {
        match self.take(name) {
            Some(Field::Str(s)) => bounded(name, s.into_owned(), max),
            other => Err(Error::bad_request(type_error(
                name,
                "a string",
                other.as_ref(),
            ))),
        }
    }

    /// An unsigned integer; `default: None` makes it required.
    fn uint(&mut self, name: &str, default: Option<u64>) -> Result<u64, Error> {
        match (self.take(name), default) {
            (Some(Field::Uint(n)), _) => Ok(n),
            (None, Some(d)) => Ok(d),
            (other, _) => Err(Error::bad_request(type_error(
                name,
                "an unsigned integer",
                other.as_ref(),
            ))),
        }
    }

    /// An optional boolean, false when absent.
    fn flag(&mut self, name: &str) -> Result<bool, Error> {
        match self.take(name) {
            None => Ok(false),
            Some(Field::Bool(b)) => Ok(b),
            other => Err(Error::bad_request(type_error(
                name,
                "a boolean",
                other.as_ref(),
            ))),
        }
    }

    /// Required binary of at most `max` bytes (more is `too_large`).
    fn bin(&mut self, name: &str, max: usize) -> Result<Bytes, Error> {
        match self.take(name) {
            Some(Field::Bin(b)) if b.len() <= max => Ok(b),
            Some(Field::Bin(b)) => Err(Error::TooLarge(format!(
                "field `{name}` is {} bytes, over the maximum of {max}",
                b.len()
            ))),
            other => Err(Error::bad_request(type_error(
                name,
                "binary",
                other.as_ref(),
            ))),
        }
    }

    /// An optional map of strings to numbers (at most 256 of them).
    fn numbers(&mut self, name: &str) -> Result<BTreeMap<String, f64>, Error> {
        let entries = match self.take(name) {
            None => return Ok(BTreeMap::new()),
            Some(Field::Map(entries)) if entries.len() <= 256 => entries,
            Some(other) => {
                return Err(Error::bad_request(type_error(
                    name,
                    "a map of up to 256 names to numbers",
                    Some(&other),
                )));
            }
        };
        let mut out = BTreeMap::new();
        for (k, v) in entries {
            let (Field::Str(k), Some(n)) = (&k, number(&v)) else {
                return Err(Error::bad_request(format!(
                    "field `{name}` must map names to numbers"
                )));
            };
            out.insert(bounded(name, k.to_string(), 256)?, n);
        }
        Ok(out)
    }

    /// An optional list of at most `max_items` strings of 1 to
    /// `max_bytes` bytes each, without duplicates.
    fn strings(
        &mut self,
        name: &str,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<String>, Error> {
        let items = match self.take(name) {
            None => return Ok(Vec::new()),
            Some(Field::Array(items)) => items,
            Some(other) => {
                return Err(Error::bad_request(type_error(
                    name,
                    "a list of strings",
                    Some(&other),
                )));
            }
        };
        if items.len() > max_items {
            return Err(Error::bad_request(format!(
                "field `{name}` holds {} items, over the maximum of {max_items}",
                items.len()
            )));
        }
        let mut out: Vec<String> = Vec::with_capacity(items.len());
        for item in items {
            let Field::Str(s) = item else {
                return Err(Error::bad_request(type_error(
                    name,
                    "a list of strings",
                    Some(&item),
                )));
            };
            let s = bounded(name, s.into_owned(), max_bytes)?;
            if !out.contains(&s) {
                out.push(s);
            }
        }
        Ok(out)
    }
}

fn bounded(name: &str, s: String, max: usize) -> Result<String, Error> {
    if s.is_empty() || s.len() > max {
        return Err(Error::bad_request(format!(
            "field `{name}` must be 1 to {max} bytes, not {}",
            s.len()
        )));
    }
    Ok(s)
}

impl<'de> Deserialize<'de> for RawRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = RawRequest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRequest, A::Error> {
        let mut raw = RawRequest::default();
        while let Some(key) = map.next_key::<Field>()? {
            let value = map.next_value::<Field>()?;
            let Field::Str(name) = key else {
                raw.problem
                    .get_or_insert_with(|| "map keys must be strings".into());
                continue;
            };
            let Some(i) = NAMES.iter().position(|n| *n == name) else {
                continue; // newer clients may send fields this build does not know
            };
            let slot = &mut raw.fields[i];
            if slot.replace(value).is_some() {
                raw.problem
                    .get_or_insert_with(|| format!("field `{name}` appears twice"));
            }
        }
        Ok(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_tenant_bytes: 8,
        max_key_bytes: 8,
        max_value_bytes: 16,
        max_tags: 2,
        max_delete: 3,
        max_ttl_ms: 1000,
        max_fill_ms: 500,
    };

    fn frame(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec(v).unwrap()
    }

    fn error(v: serde_json::Value) -> (u64, String) {
        match decode(&frame(&v), &LIMITS) {
            Err(DecodeError::Request { id, error }) => (id, format!("{}: {error}", error.code())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_field_keeps_the_id_whatever_the_order() {
        let (id, e) = error(
            serde_json::json!({"cost": -1, "op": "check", "id": 7, "tenant": "t", "key": "k"}),
        );
        assert_eq!(id, 7);
        assert_eq!(
            e,
            "bad_request: field `cost` must be an unsigned integer, not an integer"
        );
        let (_, e) = error(
            serde_json::json!({"id": 1, "op": "check", "tenant": "much too long", "key": "k"}),
        );
        assert_eq!(
            e,
            "bad_request: field `tenant` must be 1 to 8 bytes, not 13"
        );
        let (_, e) = error(serde_json::json!({"id": 1, "op": "check", "tenant": "", "key": "k"}));
        assert!(e.contains("1 to 8 bytes, not 0"));
        let (_, e) = error(serde_json::json!({"id": 1, "op": "fly"}));
        assert_eq!(e, "unknown_op: unknown op `fly`");
        let (id, e) = error(serde_json::json!({"op": "hello"}));
        assert_eq!((id, e.as_str()), (0, "bad_request: missing field `id`"));
        let release = |lease| serde_json::json!({"id": 3, "op": "release", "tenant": "t", "key": "k", "lease": lease});
        let (id, e) = error(release(serde_json::json!("not a lease")));
        assert_eq!(id, 3);
        assert!(
            e.starts_with("bad_request: field `lease` must be a lease"),
            "{e}"
        );
        let (_, e) = error(release(serde_json::json!(7)));
        assert_eq!(
            e,
            "bad_request: field `lease` must be a string, not an integer"
        );
    }

    /// A valid request of `kind`. The match is exhaustive, so a new op
    /// cannot be added without a sample here, and so without this test.
    fn sample(kind: OpKind) -> Vec<u8> {
        use rmpv::Value;
        let s = |v: &str| Value::from(v);
        let mut fields = vec![(s("id"), Value::from(1)), (s("op"), s(kind.name()))];
        let t = (s("tenant"), s("t"));
        let k = (s("key"), s("k"));
        fields.extend(match kind {
            OpKind::Hello | OpKind::Stats | OpKind::TenantList => vec![],
            OpKind::Check | OpKind::CacheGet | OpKind::Usage => vec![t, k],
            OpKind::CheckGet => vec![t, k, (s("cache_key"), s("c"))],
            OpKind::CacheSet => vec![
                t,
                k,
                (s("value"), Value::Binary(b"v".to_vec())),
                (s("ttl_ms"), Value::from(10)),
            ],
            OpKind::CacheDel => vec![t, (s("keys"), Value::Array(vec![s("k")]))],
            OpKind::TenantGet | OpKind::TenantDelete => vec![t],
            OpKind::TenantSet => vec![t, (s("plan"), s("p"))],
            OpKind::Release => vec![t, k, (s("lease"), s(&"0".repeat(32)))],
        });
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &Value::Map(fields)).unwrap();
        out
    }

    #[test]
    fn every_kind_decodes_into_itself_for_its_answerer() {
        for kind in OpKind::ALL {
            let req = decode(&sample(kind), &LIMITS).unwrap_or_else(|e| panic!("{kind:?}: {e:?}"));
            assert_eq!(req.op.kind(), kind);
            assert_eq!(req.op.answerer(), kind.answerer(), "{kind:?}");
        }
    }

    /// The fast path and the general reader agree on `frame`; true if the
    /// fast path read it (rather than leaving it to the general one).
    fn agree(frame: &[u8]) -> bool {
        let (fast, general) = (decode(frame, &LIMITS), decode_general(frame, &LIMITS));
        assert_eq!(format!("{fast:?}"), format!("{general:?}"), "{frame:x?}");
        super::super::flat::fields(frame, &mut Default::default())
    }

    #[test]
    fn the_fast_path_reads_flat_maps_as_the_general_reader_does() {
        use rmpv::Value;
        let s = |v: &str| Value::from(v);
        // Every scalar marker the fast path reads, and some it leaves.
        let values = [
            Value::Nil,
            Value::from(true),
            Value::from(false),
            Value::from(0),
            Value::from(127),
            Value::from(128),
            Value::from(65_536),
            Value::from(u64::MAX),
            Value::from(-1),
            Value::from(-33),
            Value::from(-40_000),
            Value::from(i64::MIN),
            Value::F32(1.5),
            Value::F64(f64::NAN),
            s(""),
            s("t"),
            s("check"),
            s(&"x".repeat(40)),
            s(&"é".repeat(200)),
            s("a\0b"),
            Value::Binary(b"v".to_vec()),
            Value::Binary(vec![7; 300]),
            Value::Array(vec![s("a")]),
            Value::Map(vec![]),
            Value::Ext(1, vec![1]),
        ];
        let mut fast = 0;
        for kind in OpKind::ALL {
            // Lists and maps (tags, keys, limits) go to the general reader.
            let nested = kind == OpKind::CacheDel;
            assert_eq!(agree(&sample(kind)), !nested, "{kind:?}");
        }
        for name in NAMES.iter().chain(&["unknown"]) {
            for v in &values {
                let base = vec![
                    (s("id"), Value::from(9)),
                    (s("op"), s("check")),
                    (s("tenant"), s("t")),
                    (s("key"), s("k")),
                ];
                for at in [0, 2, 4] {
                    let mut fields = base.clone();
                    fields.insert(at, (s(name), v.clone()));
                    let mut frame = Vec::new();
                    rmpv::encode::write_value(&mut frame, &Value::Map(fields)).unwrap();
                    fast += usize::from(agree(&frame));
                    // Truncated anywhere, or with a byte more.
                    for cut in 0..frame.len() {
                        agree(&frame[..cut]);
                    }
                    frame.push(0);
                    assert!(!agree(&frame), "trailing bytes go to the general reader");
                }
            }
        }
        assert!(fast > 500, "the fast path read {fast} frames");
        // Keys that are not strings, or that come twice, go to the general reader.
        let dup = Value::Map(vec![(s("id"), Value::from(1)), (s("id"), Value::from(2))]);
        let num_key = Value::Map(vec![
            (Value::from(1), Value::from(1)),
            (s("id"), Value::from(2)),
        ]);
        for v in [dup, num_key] {
            let mut frame = Vec::new();
            rmpv::encode::write_value(&mut frame, &v).unwrap();
            assert!(!agree(&frame));
        }
    }

    #[test]
    fn only_a_non_map_or_malformed_frame_is_fatal() {
        for f in [
            frame(&serde_json::json!([1, 2])),
            vec![0x81, 0xa2, b'i'],
            vec![0xc1],
            vec![],
        ] {
            assert!(
                matches!(decode(&f, &LIMITS), Err(DecodeError::Fatal(_))),
                "{f:?}"
            );
        }
        let ok = frame(&serde_json::json!({"id": 1, "op": "hello"}));
        assert!(decode(&ok, &LIMITS).is_ok());
        // Trailing bytes: a whole value, a cut one, one claiming more
        // elements than there are bytes.
        for tail in [
            &[0x00][..],
            &[0xcc],
            &[0xd9, 0x05, b'a'],
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
        ] {
            let f = [&ok[..], tail].concat();
            let e = decode(&f, &LIMITS);
            assert!(
                matches!(&e, Err(DecodeError::Fatal(e)) if e.to_string().contains("trailing bytes")),
                "{tail:?}: {e:?}"
            );
        }
    }

    /// The measured length is where a full decoder stops, for values of
    /// every marker.
    #[test]
    fn first_value_len_ends_where_the_value_does() {
        use rmpv::Value;
        let values = [
            Value::Nil,
            Value::from(true),
            Value::from(5),
            Value::from(-3),
            Value::from(-100),
            Value::from(300),
            Value::from(70_000),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(1.5f32),
            Value::from(2.5f64),
            Value::from("x".repeat(31)),
            Value::from("x".repeat(200)),
            Value::from("x".repeat(70_000)),
            Value::Binary(vec![1; 300]),
            Value::Ext(3, vec![1; 1]),
            Value::Ext(3, vec![1; 16]),
            Value::Ext(3, vec![1; 17]),
            Value::Array(vec![Value::from(1); 20]),
            Value::Map(vec![
                (Value::from("k"), Value::Array(vec![Value::Nil; 3]));
                17
            ]),
        ];
        for v in values {
            let mut b = Vec::new();
            rmpv::encode::write_value(&mut b, &v).unwrap();
            assert_eq!(first_value_len(&b), Some(b.len()), "{v:?}");
            assert_eq!(first_value_len(&b[..b.len() - 1]), None, "{v:?} cut");
            b.push(0xc0);
            assert_eq!(first_value_len(&b), Some(b.len() - 1), "{v:?} + nil");
        }
        assert_eq!(first_value_len(&[0xc1]), None);
        assert_eq!(first_value_len(&[]), None);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let mut f = vec![0x82, 0xa2, b'i', b'd', 0x01, 0xa1, b'x'];
        f.extend(std::iter::repeat_n(0x91, 100_000));
        f.push(0xc0);
        assert!(matches!(decode(&f, &LIMITS), Err(DecodeError::Fatal(_))));
    }

    #[test]
    fn a_huge_claimed_length_allocates_nothing() {
        // array32 claiming 4 billion elements, then nothing.
        let f = [0x81, 0xa1, b'x', 0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode(&f, &LIMITS), Err(DecodeError::Fatal(_))));
    }
}
