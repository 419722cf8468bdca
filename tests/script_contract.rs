//! The batch code refuses what it does not know, in both of the forms
//! Redis keeps it in: an unknown operation code or rule kind fails the
//! whole call (answered by failure mode), instead of running as some other
//! operation. And a function library, which keeps its tables from call to
//! call, never lets one call see another's state.

mod common;

use common::Redis;
use quotad::backend::redis::script;

fn packed(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs the batch code as a script (EVAL), or as a function (FCALL).
async fn eval(
    redis: &Redis,
    keys: &[&str],
    args: Vec<Vec<u8>>,
    function: bool,
) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let lua = script::lua();
    let mut cmd = if function {
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&lua.library)
            .query_async(&mut conn)
            .await?;
        redis::cmd("FCALL").arg(&lua.function).clone()
    } else {
        redis::cmd("EVAL").arg(&lua.script).clone()
    };
    cmd.arg(keys.len()).arg(keys).arg(args);
    cmd.query_async(&mut conn).await
}

#[tokio::test]
async fn unknown_codes_are_errors_of_the_script_and_the_function() {
    for function in [false, true] {
        unknown_codes_are_errors(function).await;
    }
}

async fn unknown_codes_are_errors(function: bool) {
    let redis = Redis::start();
    // Time, no state keys, no policy, no plain check, then one operation
    // with code 9.
    let none = || b"0".to_vec();
    let e = eval(
        &redis,
        &[],
        vec![b"".to_vec(), none(), none(), none(), vec![], packed(&[9.0])],
        function,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("unknown operation code 9"), "{e}");
    // A check (policy 0, cost 1, state key 1) under a policy of one rule
    // of kind 7.
    let policy = packed(&[1.0, 7.0, 10.0, 1000.0]);
    let check = packed(&[0.0, 1.0, 1.0]); // policy 0, cost 1, state key 1
    let e = eval(
        &redis,
        &["qd:{t}:l:p:r:k"],
        vec![
            b"".to_vec(),
            b"1".to_vec(),
            b"1".to_vec(),
            policy,
            b"1".to_vec(),
            check,
        ],
        function,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("unknown rule kind 7"), "{e}");
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "nothing was written");
}

/// One call spends a whole bucket; the next call's first state key, of
/// another bucket, is new: the function's tables, kept from the first
/// call, must not lend it the first call's state.
#[tokio::test]
async fn a_call_never_sees_the_state_of_the_call_before() {
    let redis = Redis::start();
    let policy = || packed(&[1.0, script::kind::TOKEN_BUCKET as f64, 5.0, 1e6]);
    let check = |cost: f64| packed(&[0.0, cost, 1.0]);
    let args = |cost| {
        vec![
            b"".to_vec(),
            b"1".to_vec(),
            b"1".to_vec(),
            policy(),
            b"1".to_vec(),
            check(cost),
        ]
    };
    let remaining = |v: redis::Value| {
        let redis::Value::Array(items) = v else {
            panic!("{v:?}")
        };
        // The numbers, as packed doubles; an allowed check by its first
        // rule: remaining, reset_ms.
        let [redis::Value::BulkString(numbers)] = &items[..] else {
            panic!("{items:?}")
        };
        let n: Vec<f64> = numbers
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let [remaining, _] = n[..] else {
            panic!("{n:?}")
        };
        remaining
    };
    let first = eval(&redis, &["qd:{t}:l:p:r:a"], args(5.0), true).await;
    assert_eq!(remaining(first.unwrap()), 0.0);
    let second = eval(&redis, &["qd:{t}:l:p:r:b"], args(1.0), true).await;
    assert_eq!(remaining(second.unwrap()), 4.0, "a fresh bucket");
}

/// A batch larger than Lua's unpack limit (~8,000 values) still decides:
/// the script reads its state keys in chunks.
#[tokio::test]
async fn a_batch_of_nine_thousand_state_keys_decides() {
    use quotad::backend::{Job, Outcome};
    use quotad::clock::Clock;
    use quotad::config::Config;
    use quotad::limiter::Check;

    let redis = Redis::start();
    let config = Config::from_toml(&format!(
        "{}[policies.three]\nrules = [\n  {{ name = \"a\", kind = \"fixed_window\", limit = 5, window_ms = 60000 }},\n  {{ name = \"b\", kind = \"sliding_window\", limit = 5, window_ms = 60000 }},\n  {{ name = \"c\", kind = \"token_bucket\", capacity = 5, refill_per_sec = 1 }},\n]\n",
        // A call this big may take longer than the tests' usual deadline.
        common::redis_table(&redis).replace("timeout_ms = 100", "timeout_ms = 5000")
    ))
    .unwrap();
    let policy = config
        .plans
        .default_plan()
        .get(Some("three"))
        .unwrap()
        .clone();
    let backend = common::redis_backend(&config, Clock::default());
    let jobs: Vec<Job> = (0..3000)
        .map(|i| {
            Job::Check(Check::new(
                policy.clone(),
                format!("t{}", i % 7),
                format!("k{i}"),
                1,
            ))
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
