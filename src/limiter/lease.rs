//! Leases of `concurrency` rules: what an allowed check of such a policy
//! takes, and what `release` gives back.
//!
//! A lease id is 128 random bits, written as 32 lowercase hex digits: it
//! names one slot in every concurrency rule of its policy, for one tenant
//! and key. quotad mints it before the backend decides, so the decision and
//! the taking of the slot are one atomic step (one Lua call, or one call of
//! the memory limiter); a check that is denied simply drops it.

use std::fmt;
use std::sync::Arc;

use super::{Policy, RuleKind};
use crate::keys::Keys;

/// One lease id: its high and low 64 bits. Not a `u128`, whose 16-byte
/// alignment padded every decision and job that holds an `Option<Lease>`
/// (a `Decision` was 128 bytes, moved by a `memcpy` call each time).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lease([u64; 2]);

impl Lease {
    /// A fresh id from the OS's random source: unique across every quotad
    /// on one Redis without any coordination, and not guessable by a peer
    /// that wants to release someone else's slot.
    pub fn mint() -> Lease {
        let mut b = [0u8; 16];
        // The OS source only fails where quotad cannot run at all (no
        // getrandom(2) and no /dev/urandom); a lease must never be predictable.
        getrandom::getrandom(&mut b).expect("the OS random source");
        Lease::from_u128(u128::from_le_bytes(b))
    }

    fn from_u128(v: u128) -> Lease {
        Lease([(v >> 64) as u64, v as u64])
    }

    /// Reads the wire form (exactly 32 lowercase hex digits).
    pub fn parse(s: &str) -> Option<Lease> {
        let lower = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        if s.len() != 32 || !s.as_bytes().iter().all(lower) {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Lease::from_u128)
    }
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({self})")
    }
}

/// A `release`, as a shard hands it to a backend.
#[derive(Debug, Clone)]
pub struct Release {
    pub policy: Arc<Policy>,
    pub tenant: String,
    pub key: String,
    pub lease: Lease,
}

impl Release {
    /// The state key of each concurrency rule of the policy, in rule order
    /// (the same keys its checks take the lease in).
    pub fn lease_keys(&self, keys: &Keys) -> Vec<String> {
        (self.policy.rules.iter())
            .filter(|r| matches!(r.kind, RuleKind::Concurrency { .. }))
            .map(|r| keys.leases(&self.tenant, &self.policy.name, &r.name, &self.key))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_reads_back_what_it_writes_and_nothing_else() {
        let a = Lease::mint();
        assert_ne!(a, Lease::mint());
        let s = a.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(Lease::parse(&s), Some(a));
        assert_eq!(Lease::parse(&"0".repeat(32)), Some(Lease([0, 0])));
        for bad in [
            "",
            "abc",
            &"0".repeat(31),
            &"0".repeat(33),
            &"A".repeat(32),
            &"g".repeat(32),
            "+0000000000000000000000000000000",
            &format!(" {}", &s[1..]),
        ] {
            assert_eq!(Lease::parse(bad), None, "{bad:?}");
        }
    }
}
