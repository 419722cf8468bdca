//! Replies as a client reads them.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::Lookup;
use crate::limiter::usage::RuleUsage;
use crate::limiter::{Decision, Lease, RuleKind};

/// The `error` map of a failed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
}

/// Every field any reply may carry: unknown fields are ignored, so a newer
/// server's additions never break an older client.
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
    pub kind: Option<String>,
    pub window_ms: Option<u64>,
    /// An allowed check of a policy with concurrency rules.
    pub lease: Option<String>,
    pub shadow_denied: Option<bool>,
    pub shadow_rule: Option<String>,
    // release
    pub released: Option<bool>,
    // usage
    pub rules: Option<Vec<UsageFields>>,
    // cache
    pub hit: Option<bool>,
    pub value: Option<Bin>,
    pub ttl_ms: Option<u64>,
    pub stale: Option<bool>,
    pub refresh: Option<bool>,
    pub fill: Option<bool>,
    pub deleted: Option<u64>,
    // tenants
    pub source: Option<String>,
    pub known: Option<bool>,
    pub plan: Option<String>,
    pub limits: Option<BTreeMap<String, f64>>,
    pub tenants: Option<Vec<TenantFields>>,
    // stats
    pub uptime_ms: Option<u64>,
    pub shards: Option<u64>,
    pub counters: Option<BTreeMap<String, u64>>,
    /// Shadow denials by `<policy>.<rule>`.
    pub shadow_denials: Option<BTreeMap<String, u64>>,
}

impl ReplyFields {
    pub fn from_slice(frame: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(frame)
    }

    /// The decision of a `check` or `check_get` reply: `None` if it is not
    /// one, an error if its `lease` is not in the form quotad mints (32
    /// lowercase hex digits, docs/protocol.md): a lease dropped here would
    /// hold its slot until `lease_ms` with nobody told why.
    pub fn decision(&self) -> Option<Result<Decision, String>> {
        let lease = match self.lease.as_deref() {
            None => None,
            Some(s) => match Lease::parse(s) {
                Some(lease) => Some(lease),
                None => return Some(Err(format!("a lease not in a lease's form: {s:?}"))),
            },
        };
        Some(Ok(Decision {
            allowed: self.allowed?,
            limit: self.limit?,
            remaining: self.remaining?,
            reset_ms: self.reset_ms?,
            retry_after_ms: self.retry_after_ms?,
            degraded: self.degraded?,
            rule: self.rule.as_deref()?.into(),
            // A kind this build does not know reads as "".
            kind: (RuleKind::NAMES.iter())
                .find(|k| Some(**k) == self.kind.as_deref())
                .map_or("", |k| k),
            window_ms: self.window_ms.unwrap_or(0),
            lease,
            shadow_rule: self.shadow_rule.as_deref().map(Into::into),
        }))
    }

    /// The rules of a `usage` reply, if it is one.
    pub fn usage(&self) -> Option<Vec<RuleUsage>> {
        let rules = self.rules.as_ref()?.iter().map(|u| RuleUsage {
            rule: u.rule.as_str().into(),
            kind: (RuleKind::NAMES.iter())
                .find(|k| **k == u.kind)
                .map_or("", |k| k),
            limit: u.limit,
            used: u.used,
            remaining: u.remaining,
            reset_ms: u.reset_ms,
            window_ms: u.window_ms,
        });
        Some(rules.collect())
    }

    /// The lookup of a `cache_get` or `check_get` reply, if it has one.
    pub fn lookup(&self) -> Option<Lookup> {
        let hit = self.hit?;
        Some(Lookup {
            value: if hit {
                Some(self.value.clone()?.0)
            } else {
                None
            },
            ttl_ms: self.ttl_ms.unwrap_or(0),
            stale: self.stale.unwrap_or(false),
            refresh: self.refresh.unwrap_or(false),
            fill: self.fill.unwrap_or(false),
            degraded: self.degraded.unwrap_or(false),
        })
    }
}

/// One entry of a `tenant_list` reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct TenantFields {
    pub tenant: String,
    pub plan: String,
    pub limits: BTreeMap<String, f64>,
}

/// One rule of a `usage` reply.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct UsageFields {
    pub rule: String,
    pub kind: String,
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    pub window_ms: u64,
}

/// A MessagePack `bin` value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bin(pub Bytes);

impl<'de> Deserialize<'de> for Bin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BinVisitor;
        impl Visitor<'_> for BinVisitor {
            type Value = Bin;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("binary")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bin, E> {
                Ok(Bin(Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bin, E> {
                Ok(Bin(Bytes::from(v)))
            }
        }
        d.deserialize_bytes(BinVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_quotad_does_not_mint_is_an_error_not_dropped() {
        let reply = |lease: Option<&str>| ReplyFields {
            ok: true,
            allowed: Some(true),
            limit: Some(3),
            remaining: Some(2),
            reset_ms: Some(0),
            retry_after_ms: Some(0),
            degraded: Some(false),
            rule: Some("inflight".into()),
            lease: lease.map(Into::into),
            ..ReplyFields::default()
        };
        let hex = "0123456789abcdef0123456789abcdef";
        let d = reply(Some(hex)).decision().unwrap().unwrap();
        assert_eq!(d.lease, Lease::parse(hex));
        assert_eq!(reply(None).decision().unwrap().unwrap().lease, None);
        for bad in ["", "lease-1", &hex.to_uppercase(), &hex[1..]] {
            let e = reply(Some(bad)).decision().unwrap().unwrap_err();
            assert!(e.contains("a lease not in a lease's form"), "{bad:?}: {e}");
        }
        let not_a_check = ReplyFields::default();
        assert_eq!(not_a_check.decision(), None);
    }
}
