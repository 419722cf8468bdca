//! An admin op that cannot reach its source of truth (Redis, PostgreSQL)
//! answers `unavailable` (an outage, retry later), not `internal` (a bug),
//! and works again once the source is back.

mod common;

use common::{Daemon, Postgres, Redis, counters, redis_table};
use quotad::client::{Client, ClientError};
use quotad::config::TenantRecord;

#[tokio::test]
async fn tenant_ops_answer_unavailable_while_redis_is_down() {
    let mut redis = Redis::start();
    let d = Daemon::start(&format!(
        "{}[quota]\nsource = \"redis\"\n[policies.default]\nrules = [{{ name = \"r\", kind = \"fixed_window\", limit = 5, window_ms = 1000 }}]\n",
        redis_table(&redis)
    ));
    let c = d.client().await;
    let record = TenantRecord {
        plan: "default".into(),
        limits: Default::default(),
    };
    c.tenant_set("acme", record.clone()).await.unwrap();
    let before = counters(&c).await["errors_unavailable"];
    redis.kill();
    assert_unavailable([
        c.tenant_set("acme", record.clone()).await.map(drop),
        c.tenant_get("acme").await.map(drop),
        c.tenant_list().await.map(drop),
        c.tenant_delete("acme").await.map(drop),
    ]);
    // Each of the four answers is counted once, as `unavailable`.
    assert_eq!(counters(&c).await["errors_unavailable"] - before, 4);
    redis.restart();
    common::wait_until("tenant set to work again", common::SOON, async || {
        c.tenant_set("acme", record.clone()).await.is_ok()
    })
    .await;
}

/// The PostgreSQL source down: `tenant get`, the one admin op it answers
/// (the others are `bad_request` whatever its state), is `unavailable`,
/// each time counted once; back up, it works again.
#[tokio::test]
async fn tenant_ops_answer_unavailable_while_postgres_is_down() {
    let (redis, mut pg) = (Redis::start(), Postgres::start());
    pg.psql(
        "CREATE TABLE quotad_tenants (tenant text PRIMARY KEY, plan text NOT NULL, limits jsonb);
         INSERT INTO quotad_tenants VALUES ('acme', 'default', NULL);",
    );
    let d = Daemon::start(&format!(
        "{}[quota]\nsource = \"postgres\"\n[quota.postgres]\nurl = {:?}\n[policies.default]\nrules = [{{ name = \"r\", kind = \"fixed_window\", limit = 5, window_ms = 1000 }}]\n",
        redis_table(&redis),
        pg.url()
    ));
    let c = d.client().await;
    assert_eq!(plan_of_acme(&c).await.as_deref(), Some("default"));
    let before = counters(&c).await["errors_unavailable"];
    pg.stop();
    assert_unavailable([
        c.tenant_get("acme").await.map(drop),
        c.tenant_get("other").await.map(drop),
    ]);
    assert_eq!(counters(&c).await["errors_unavailable"] - before, 2);
    pg.restart();
    common::wait_until("tenant get to work again", common::SOON, async || {
        c.tenant_get("acme").await.is_ok()
    })
    .await;
    assert_eq!(plan_of_acme(&c).await.as_deref(), Some("default"));
}

async fn plan_of_acme(c: &Client) -> Option<String> {
    c.tenant_get("acme").await.unwrap().map(|r| r.plan)
}

fn assert_unavailable<const N: usize>(results: [Result<(), ClientError>; N]) {
    for result in results {
        match result {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, "unavailable"),
            other => panic!("expected `unavailable`, got {other:?}"),
        }
    }
}
