//! An admin op that cannot reach Redis answers `unavailable` (an outage,
//! retry later), not `internal` (a bug), and works again once Redis is back.

mod common;

use common::{Daemon, Redis, counters, redis_table};
use quotad::client::ClientError;
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
    for result in [
        c.tenant_set("acme", record.clone()).await.map(drop),
        c.tenant_get("acme").await.map(drop),
        c.tenant_list().await.map(drop),
        c.tenant_delete("acme").await.map(drop),
    ] {
        match result {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, "unavailable"),
            other => panic!("expected `unavailable`, got {other:?}"),
        }
    }
    // Each of the four answers is counted once, as `unavailable`.
    assert_eq!(counters(&c).await["errors_unavailable"] - before, 4);
    redis.restart();
    common::wait_until("tenant set to work again", common::SOON, async || {
        c.tenant_set("acme", record.clone()).await.is_ok()
    })
    .await;
}
