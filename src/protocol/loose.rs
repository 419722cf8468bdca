//! Any MessagePack value, loosely typed: what a request field holds before
//! its type is checked, so that a mistyped field can be reported by name.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::OPS;

/// The request fields this build reads, in a fixed order (field and op
/// names are borrowed, not allocated, when a frame is read).
pub(super) const NAMES: [&str; 17] = [
    "id",
    "op",
    "tenant",
    "key",
    "policy",
    "cost",
    "cache_key",
    "fill_ms",
    "value",
    "ttl_ms",
    "stale_ms",
    "tags",
    "keys",
    "fill_only",
    "plan",
    "limits",
    "lease",
];

/// Any MessagePack value, as far as a request needs to tell them apart.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    Float(f64),
    /// Borrowed when it is a field or op name: map keys cost no allocation.
    Str(Cow<'static, str>),
    Bin(Bytes),
    Array(Vec<Field>),
    Map(Vec<(Field, Field)>),
    Ext,
}

impl Field {
    pub fn kind(&self) -> &'static str {
        match self {
            Field::Nil => "nil",
            Field::Bool(_) => "a boolean",
            Field::Uint(_) | Field::Int(_) => "an integer",
            Field::Float(_) => "a float",
            Field::Str(_) => "a string",
            Field::Bin(_) => "binary",
            Field::Array(_) => "an array",
            Field::Map(_) => "a map",
            Field::Ext => "an extension type",
        }
    }
}

/// A string value. Field names and op names come over and over: they are
/// borrowed, not allocated.
pub(super) fn string(v: &str) -> Field {
    Field::Str(match NAMES.iter().chain(&OPS).find(|k| **k == v) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(v.to_owned()),
    })
}

/// The value as a number, if it is one.
pub fn number(f: &Field) -> Option<f64> {
    match *f {
        Field::Uint(n) => Some(n as f64),
        Field::Int(n) => Some(n as f64),
        Field::Float(n) => Some(n),
        _ => None,
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any MessagePack value")
    }
    fn visit_unit<E>(self) -> Result<Field, E> {
        Ok(Field::Nil)
    }
    fn visit_none<E>(self) -> Result<Field, E> {
        Ok(Field::Nil)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Field, E> {
        Ok(Field::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Field, E> {
        Ok(Field::Uint(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Field, E> {
        Ok(u64::try_from(v).map_or(Field::Int(v), Field::Uint))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Field, E> {
        Ok(Field::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Field, E> {
        Ok(string(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Field, E> {
        Ok(Field::Bin(Bytes::copy_from_slice(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Field>()? {
            items.push(item);
        }
        Ok(Field::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Field, Field>()? {
            entries.push(entry);
        }
        Ok(Field::Map(entries))
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        // MessagePack ext types arrive here; no request field is one.
        de::IgnoredAny::deserialize(d)?;
        Ok(Field::Ext)
    }
}
