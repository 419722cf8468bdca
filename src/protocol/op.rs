//! The ops of protocol version 1, typed by who answers them: the
//! connection's router on the spot ([`LocalOp`]), the shard that owns the
//! request's tenant ([`ShardOp`]), or the admin side ([`AdminOp`]). So no
//! handler ever meets an op that is not its own.
//!
//! Every op is written once, in the op table below: its kind, its name and
//! who answers it. `hello` lists [`OPS`], the decoder looks names up
//! through [`OpKind::from_name`] and must decode every kind (an exhaustive
//! match), and per-op tables such as the latency histograms are indexed by
//! [`OpKind::index`].

use super::{CacheDelArgs, CacheGetArgs, CacheSetArgs, CheckArgs, ReleaseArgs};
use crate::config::TenantRecord;

/// The op table: each op's kind, its name on the wire and who answers it,
/// written once. [`OpKind`], [`OpKind::ALL`], [`OpKind::name`] and
/// [`OpKind::answerer`] are generated from it, so a kind cannot be added
/// without being listed, named and given an answerer.
macro_rules! op_table {
    ($($kind:ident => $name:literal, $answerer:ident;)+) => {
        /// Every op, without its fields.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum OpKind {
            $($kind,)+
        }

        impl OpKind {
            /// In the order `hello` lists them, which is also [`OpKind::index`] order.
            pub const ALL: [OpKind; [$($name),+].len()] = [$(OpKind::$kind),+];

            pub const fn name(self) -> &'static str {
                match self {
                    $(OpKind::$kind => $name,)+
                }
            }

            /// Who answers the op (the [`Op`] variant it decodes into).
            pub const fn answerer(self) -> Answerer {
                match self {
                    $(OpKind::$kind => Answerer::$answerer,)+
                }
            }
        }
    };
}

op_table! {
    Hello => "hello", Local;
    Check => "check", Shard;
    CacheGet => "cache_get", Shard;
    CacheSet => "cache_set", Shard;
    CacheDel => "cache_del", Shard;
    CheckGet => "check_get", Shard;
    Stats => "stats", Local;
    TenantGet => "tenant_get", Admin;
    TenantSet => "tenant_set", Admin;
    TenantDelete => "tenant_delete", Admin;
    TenantList => "tenant_list", Admin;
    Release => "release", Shard;
    Usage => "usage", Shard;
}

/// Who answers an op: the variants of [`Op`], without their ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answerer {
    Local,
    Shard,
    Admin,
}

impl OpKind {
    /// The kind's place in [`OpKind::ALL`]: a table index for per-op data.
    pub const fn index(self) -> usize {
        self as usize
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
    /// Boxed, as the next one's cache read: rare or large, they would make
    /// every op as big as they are (each move of one over 128 bytes is a
    /// `memcpy` call).
    CacheSet(Box<CacheSetArgs>),
    CacheDel(CacheDelArgs),
    /// A check, then (only if allowed) a cache read, in one round trip.
    CheckGet(CheckArgs, Box<CacheGetArgs>),
    /// Gives back a lease a check took.
    Release(ReleaseArgs),
    /// Every rule of the policy as it stands for the key (cost 0: nothing
    /// is charged).
    Usage(CheckArgs),
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
    pub fn answerer(&self) -> Answerer {
        match self {
            Op::Local(_) => Answerer::Local,
            Op::Shard(_) => Answerer::Shard,
            Op::Admin(_) => Answerer::Admin,
        }
    }

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
            ShardOp::Release(_) => OpKind::Release,
            ShardOp::Usage(_) => OpKind::Usage,
        }
    }

    /// The tenant whose shard answers.
    pub fn tenant(&self) -> &str {
        match self {
            ShardOp::Check(a) | ShardOp::CheckGet(a, _) | ShardOp::Usage(a) => &a.tenant,
            ShardOp::CacheGet(a) => &a.tenant,
            ShardOp::CacheSet(a) => &a.tenant,
            ShardOp::CacheDel(a) => &a.tenant,
            ShardOp::Release(a) => &a.tenant,
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

    #[test]
    fn the_index_of_a_kind_is_its_place_in_all() {
        for (i, kind) in OpKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
    }
}
