//! The ops of protocol version 1, typed by who answers them: the
//! connection's router on the spot ([`LocalOp`]), the shard that owns the
//! request's tenant ([`ShardOp`]), or the admin side ([`AdminOp`]). So no
//! handler ever meets an op that is not its own.
//!
//! Every op's name is written once, in [`OpKind::name`]: `hello` lists
//! [`OPS`], the decoder looks names up through [`OpKind::from_name`], and
//! the compiler checks that each kind is decoded and named.

use super::{CacheDelArgs, CacheGetArgs, CacheSetArgs, CheckArgs};
use crate::config::TenantRecord;

/// Every op, without its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Hello,
    Check,
    CacheGet,
    CacheSet,
    CacheDel,
    CheckGet,
    Stats,
    TenantGet,
    TenantSet,
    TenantDelete,
    TenantList,
}

impl OpKind {
    /// In the order `hello` lists them.
    pub const ALL: [OpKind; 11] = [
        OpKind::Hello,
        OpKind::Check,
        OpKind::CacheGet,
        OpKind::CacheSet,
        OpKind::CacheDel,
        OpKind::CheckGet,
        OpKind::Stats,
        OpKind::TenantGet,
        OpKind::TenantSet,
        OpKind::TenantDelete,
        OpKind::TenantList,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            OpKind::Hello => "hello",
            OpKind::Check => "check",
            OpKind::CacheGet => "cache_get",
            OpKind::CacheSet => "cache_set",
            OpKind::CacheDel => "cache_del",
            OpKind::CheckGet => "check_get",
            OpKind::Stats => "stats",
            OpKind::TenantGet => "tenant_get",
            OpKind::TenantSet => "tenant_set",
            OpKind::TenantDelete => "tenant_delete",
            OpKind::TenantList => "tenant_list",
        }
    }

    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Every op this build answers, as listed by `hello`.
pub const OPS: [&str; OpKind::ALL.len()] = {
    let mut names = [""; OpKind::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = OpKind::ALL[i].name();
        i += 1;
    }
    names
};

/// A request's op, by who answers it.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Local(LocalOp),
    Shard(ShardOp),
    Admin(AdminOp),
}

/// Answered by the router itself, from process-wide state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalOp {
    Hello,
    Stats,
}

/// Answered by the shard that owns the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardOp {
    Check(CheckArgs),
    CacheGet(CacheGetArgs),
    CacheSet(CacheSetArgs),
    CacheDel(CacheDelArgs),
    /// A check, then (only if allowed) a cache read, in one round trip.
    CheckGet(CheckArgs, CacheGetArgs),
}

/// Answered by the admin side, from the tenants' source of truth; only
/// for the allowed Unix users.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminOp {
    /// A tenant's record at the source of truth.
    TenantGet(String),
    /// Sets a tenant's record (the `redis` source).
    TenantSet(String, TenantRecord),
    /// Deletes a tenant's record (the `redis` source).
    TenantDelete(String),
    /// Every tenant the source lists.
    TenantList,
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Local(LocalOp::Hello) => OpKind::Hello,
            Op::Local(LocalOp::Stats) => OpKind::Stats,
            Op::Shard(op) => op.kind(),
            Op::Admin(op) => op.kind(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

impl ShardOp {
    pub fn kind(&self) -> OpKind {
        match self {
            ShardOp::Check(_) => OpKind::Check,
            ShardOp::CacheGet(_) => OpKind::CacheGet,
            ShardOp::CacheSet(_) => OpKind::CacheSet,
            ShardOp::CacheDel(_) => OpKind::CacheDel,
            ShardOp::CheckGet(..) => OpKind::CheckGet,
        }
    }

    /// The tenant whose shard answers.
    pub fn tenant(&self) -> &str {
        match self {
            ShardOp::Check(a) | ShardOp::CheckGet(a, _) => &a.tenant,
            ShardOp::CacheGet(a) => &a.tenant,
            ShardOp::CacheSet(a) => &a.tenant,
            ShardOp::CacheDel(a) => &a.tenant,
        }
    }
}

impl AdminOp {
    pub fn kind(&self) -> OpKind {
        match self {
            AdminOp::TenantGet(_) => OpKind::TenantGet,
            AdminOp::TenantSet(..) => OpKind::TenantSet,
            AdminOp::TenantDelete(_) => OpKind::TenantDelete,
            AdminOp::TenantList => OpKind::TenantList,
        }
    }
}

impl From<LocalOp> for Op {
    fn from(op: LocalOp) -> Op {
        Op::Local(op)
    }
}

impl From<ShardOp> for Op {
    fn from(op: ShardOp) -> Op {
        Op::Shard(op)
    }
}

impl From<AdminOp> for Op {
    fn from(op: AdminOp) -> Op {
        Op::Admin(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_named_once_and_found_by_its_name() {
        for (i, kind) in OpKind::ALL.into_iter().enumerate() {
            assert_eq!(OPS[i], kind.name());
            assert_eq!(OpKind::from_name(kind.name()), Some(kind));
        }
        let mut names = OPS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), OPS.len());
        assert_eq!(OpKind::from_name("fly"), None);
    }
}
