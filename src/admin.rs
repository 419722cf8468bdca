//! The admin ops (`tenant_get`, `tenant_set`, `tenant_delete`,
//! `tenant_list`), run against the tenants' source of truth through the
//! [`Directory`]. Who may use them is [`crate::access`]'s to decide.
//!
//! Each runs in its own task, since it waits on the source; a change makes
//! the tenant's shard look its record up again.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, Plans, TenantRecord};
use crate::error::Error;
use crate::protocol::{AdminOp, Body};
use crate::quota::Directory;
use crate::reply::ReplyTo;
use crate::shard::Shards;

pub struct Admin {
    /// `None`: no `[quota]` source, every tenant on the `default` plan.
    directory: Option<Arc<Directory>>,
    /// Shared with the shards; a reload swaps it.
    plans: Arc<ArcSwap<Plans>>,
    shards: Arc<Shards>,
}

impl Admin {
    pub fn new(
        directory: Option<Arc<Directory>>,
        plans: Arc<ArcSwap<Plans>>,
        shards: Arc<Shards>,
    ) -> Self {
        Admin {
            directory,
            plans,
            shards,
        }
    }

    /// Starts `op`, answering through `reply`.
    pub fn run(&self, op: AdminOp, reply: ReplyTo) {
        let Some(directory) = self.directory.clone() else {
            reply.send(match op {
                AdminOp::TenantGet(_) => Ok(Body::Tenant {
                    source: "none",
                    record: None,
                }),
                _ => Err(Error::bad_request(
                    "no `[quota]` source: every tenant is on the default plan",
                )),
            });
            return;
        };
        let plans = self.plans.clone();
        let shards = self.shards.clone();
        tokio::spawn(async move {
            reply.send(execute(op, &directory, &plans.load(), &shards).await);
        });
    }

    /// A reload's new source settings.
    pub fn reload(&self, config: &Config) {
        if let Some(dir) = &self.directory {
            dir.reload(config);
        }
    }
}

async fn execute(
    op: AdminOp,
    dir: &Directory,
    plans: &Plans,
    shards: &Shards,
) -> Result<Body, Error> {
    match op {
        AdminOp::TenantGet(tenant) => Ok(Body::Tenant {
            source: dir.source_name(),
            record: dir.get(&tenant).await?,
        }),
        AdminOp::TenantSet(tenant, record) => {
            validate(plans, &record)?;
            dir.set(&tenant, &record).await?;
            shards.forget(&tenant);
            Ok(Body::Done)
        }
        AdminOp::TenantDelete(tenant) => {
            let existed = dir.delete(&tenant).await?;
            shards.forget(&tenant);
            Ok(Body::Removed(existed))
        }
        AdminOp::TenantList => Ok(Body::Tenants(dir.list().await?)),
    }
}

/// Refuses a record that would not compile (an unknown plan, a bad
/// override) before it reaches the source.
fn validate(plans: &Plans, record: &TenantRecord) -> Result<(), Error> {
    plans
        .for_record(record)
        .map(drop)
        .map_err(|e| Error::bad_request(e.to_string()))
}
