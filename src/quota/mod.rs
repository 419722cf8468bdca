//! Per-tenant quotas at run time: the source of truth for tenants' plans,
//! and the Redis level of the two-level quota cache (the local level lives
//! in each shard). Plans themselves are configuration ([`crate::config::Plans`]).

pub mod directory;
pub mod source;

pub use directory::{Directory, Found};
pub use source::SourceError;
