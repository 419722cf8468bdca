//! What a shard asks a backend to do, and what comes back.

use crate::limiter::{Check, Verdict};
use crate::protocol::{CacheDelArgs, CacheGetArgs, CacheSetArgs, Lookup};

/// One operation for a backend.
#[derive(Debug, Clone)]
pub enum Job {
    Check(Check),
    /// A cache read; `poll`: a shard looking for a value another caller is
    /// filling, which takes no lock. A poll's miss has `fill` set when
    /// nobody holds the fill lock any more: nobody will set the value.
    Get {
        args: CacheGetArgs,
        poll: bool,
    },
    Set(CacheSetArgs),
    Del(CacheDelArgs),
    /// A check, then (only if it allows) a cache read.
    CheckGet(Check, CacheGetArgs),
}

/// A backend's answer to one [`Job`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Decided(Verdict),
    Looked(Lookup),
    Stored,
    Deleted(u64),
    /// The lookup is `None` when the check denied.
    CheckLooked(Verdict, Option<Lookup>),
}

impl Job {
    pub fn tenant(&self) -> &str {
        match self {
            Job::Check(c) | Job::CheckGet(c, _) => &c.tenant,
            Job::Get { args, .. } => &args.tenant,
            Job::Set(s) => &s.tenant,
            Job::Del(d) => &d.tenant,
        }
    }

    /// Roughly the bytes this job adds to a round trip.
    pub fn weight(&self) -> usize {
        match self {
            Job::Set(s) => {
                64 + s.key.len()
                    + s.value.len()
                    + s.tags.iter().map(|t| t.len() + 16).sum::<usize>()
            }
            Job::Del(d) => {
                64 + d
                    .keys
                    .iter()
                    .chain(&d.tags)
                    .map(|k| k.len() + 48)
                    .sum::<usize>()
            }
            _ => 128,
        }
    }
}
