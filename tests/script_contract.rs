//! The batch script refuses what it does not know: an unknown operation
//! code or rule kind fails the whole call (answered by failure mode),
//! instead of running as some other operation.

mod common;

use common::Redis;
use quotad::backend::redis::script;

fn packed(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

async fn eval(
    redis: &Redis,
    keys: &[&str],
    args: Vec<Vec<u8>>,
) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script::SOURCE).arg(keys.len()).arg(keys).arg(args);
    cmd.query_async(&mut conn).await
}

#[tokio::test]
async fn unknown_codes_are_script_errors() {
    let redis = Redis::start();
    // Time, no state keys, no policy, then one operation with code 9.
    let none = || b"0".to_vec();
    let e = eval(
        &redis,
        &[],
        vec![b"".to_vec(), none(), none(), packed(&[9.0])],
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("unknown operation code 9"), "{e}");
    // A check (policy 0, cost 1, state key 1) under a policy of one rule
    // of kind 7.
    let policy = packed(&[1.0, 7.0, 10.0, 1000.0]);
    let check = packed(&[script::op::CHECK as f64, 0.0, 1.0, 1.0]);
    let e = eval(
        &redis,
        &["qd:{t}:l:p:r:k"],
        vec![b"".to_vec(), b"1".to_vec(), b"1".to_vec(), policy, check],
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("unknown rule kind 7"), "{e}");
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "nothing was written");
}

/// A batch larger than Lua's unpack limit (~8,000 values) still decides:
/// the script reads its state keys in chunks.
#[tokio::test]
async fn a_batch_of_nine_thousand_state_keys_decides() {
    use std::sync::Arc;

    use quotad::backend::{Job, Outcome, RedisBackend};
    use quotad::clock::Clock;
    use quotad::config::Config;
    use quotad::limiter::Check;
    use quotad::stats::Stats;
    use tokio_util::sync::CancellationToken;

    let redis = Redis::start();
    let config = Config::from_toml(&format!(
        "{}[policies.three]\nrules = [\n  {{ name = \"a\", kind = \"fixed_window\", limit = 5, window_ms = 60000 }},\n  {{ name = \"b\", kind = \"sliding_window\", limit = 5, window_ms = 60000 }},\n  {{ name = \"c\", kind = \"token_bucket\", capacity = 5, refill_per_sec = 1 }},\n]\n",
        common::redis_table(&redis)
    ))
    .unwrap();
    let policy = config
        .plans
        .default_plan()
        .get(Some("three"))
        .unwrap()
        .clone();
    let backend = RedisBackend::new(
        config.redis.as_ref().unwrap(),
        Clock::default(),
        Arc::new(Stats::default()),
        CancellationToken::new(),
    )
    .unwrap();
    let jobs: Vec<Job> = (0..3000)
        .map(|i| {
            Job::Check(Check {
                policy: policy.clone(),
                tenant: format!("t{}", i % 7),
                key: format!("k{i}"),
                cost: 1,
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let outcomes = backend.run(&jobs, deadline).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Some(Outcome::Decided(v)) if v.allowed && v.remaining == 4)),
        "{:?}",
        outcomes.iter().find(|o| o.is_none())
    );
    assert_eq!(redis.cli(&["DBSIZE"]), "9000");
}
