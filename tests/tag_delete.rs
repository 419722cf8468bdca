//! Deleting by tag on Redis removes each found entry's fill and refresh
//! locks too: the script reaches them through the key-name markers that
//! src/keys.rs sends, not names of its own.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Daemon, Redis, redis_table};
use quotad::protocol::CacheSetArgs;

#[tokio::test]
async fn a_tag_delete_takes_the_entries_locks_with_them() {
    let redis = Redis::start();
    let d = Daemon::start(&format!(
        "{}[policies.default]\nrules = [{{ name = \"r\", kind = \"fixed_window\", limit = 5, window_ms = 1000 }}]\n",
        redis_table(&redis)
    ));
    let c = d.client().await;
    let set = CacheSetArgs {
        tenant: "a}:c:b".into(),
        key: "k}:c:1".into(),
        value: Bytes::from_static(b"v"),
        ttl_ms: 50,
        stale_ms: 60_000,
        tags: vec!["t".into()],
    };
    c.cache_set(set.clone()).await.unwrap();
    let refresh_lock = "qd:r:{a%7D%3Ac%3Ab}:k%7D%3Ac%3A1";
    // Past its ttl: the first reader takes the refresh lock.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let l = c.cache_get(&set.tenant, &set.key, 0).await.unwrap();
    assert!(l.stale && l.refresh, "{l:?}");
    assert_eq!(redis.cli(&["EXISTS", refresh_lock]), "1");
    assert_eq!(c.cache_del(&set.tenant, &[], &["t"]).await.unwrap(), 1);
    assert_eq!(redis.cli(&["EXISTS", refresh_lock]), "0");
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "nothing of the entry is left");
}
