//! What a shard asks a backend to do, and what comes back.

use crate::limiter::{Check, Release, Verdict, usage};
use crate::protocol::{Body, CacheDelArgs, CacheGetArgs, CacheSetArgs, Lookup};

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
    /// Boxed as in [`crate::protocol::ShardOp`].
    Set(Box<CacheSetArgs>),
    Del(CacheDelArgs),
    /// A check, then (only if it allows) a cache read.
    CheckGet(Check, Box<CacheGetArgs>),
    /// Gives a lease back (the policy has concurrency rules).
    Release(Release),
    /// Every rule of the check's policy as it stands: charges nothing.
    Usage(Check),
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
    /// Whether the lease was still outstanding.
    Released(bool),
    /// Per rule, in order: `(remaining, reset_ms)`.
    Usage(Vec<(u64, u64)>),
}

impl Outcome {
    /// The reply body of `job`'s outcome; `None` if the outcome does not
    /// fit the job (answered, like a failure, by failure mode).
    pub fn into_body(self, job: &Job) -> Option<Body> {
        Some(match (job, self) {
            (Job::Check(c), Outcome::Decided(v)) => Body::Decision(c.decision(v, false)),
            (Job::Get { .. }, Outcome::Looked(l)) => Body::Lookup(l),
            (Job::Set(_), Outcome::Stored) => Body::Stored { degraded: false },
            (Job::Del(_), Outcome::Deleted(deleted)) => Body::Deleted {
                deleted,
                degraded: false,
            },
            (Job::CheckGet(c, _), Outcome::CheckLooked(v, l)) => {
                Body::CheckLookup(c.decision(v, false), l)
            }
            (Job::Release(_), Outcome::Released(released)) => Body::Released {
                released,
                degraded: false,
            },
            (Job::Usage(c), Outcome::Usage(u)) => Body::Usage(usage::lines(&c.policy, &u)?),
            _ => return None,
        })
    }
}

impl Job {
    pub fn tenant(&self) -> &str {
        match self {
            Job::Check(c) | Job::CheckGet(c, _) | Job::Usage(c) => &c.tenant,
            Job::Get { args, .. } => &args.tenant,
            Job::Set(s) => &s.tenant,
            Job::Del(d) => &d.tenant,
            Job::Release(r) => &r.tenant,
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
