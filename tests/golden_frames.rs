//! Golden frames: the bytes of every op's requests and replies, pinned in
//! `tests/fixtures/frames.json`. The server's encoder and decoder and the
//! Rust client's must produce and accept exactly these bytes; the Python
//! and Node clients' tests read the same file. `QUOTAD_BLESS=1` rewrites it
//! (review the diff: a change there is a wire change).
//!
//! In the file, `value` is the frame's body as JSON, with MessagePack
//! binary written as `{"$bin": "<hex>"}`.

use bytes::Bytes;
use quotad::config::Config;
use quotad::config::TenantRecord;
use quotad::error::Error;
use quotad::limiter::usage::RuleUsage;
use quotad::limiter::{Decision, Lease};
use quotad::protocol::{
    self, AdminOp, Body, CacheDelArgs, CacheGetArgs, CacheSetArgs, CheckArgs, Hello, LocalOp,
    Lookup, Op, ReleaseArgs, Reply, ReplyFields, Request, ShardOp, Stats,
};
use serde_json::{Value, json};

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/frames.json");

fn check_args(policy: Option<&str>, cost: u64) -> CheckArgs {
    CheckArgs {
        tenant: "acme".into(),
        key: "user:42".into(),
        policy: policy.map(Into::into),
        cost,
    }
}

fn get_args(fill_ms: u64) -> CacheGetArgs {
    CacheGetArgs {
        tenant: "acme".into(),
        key: "GET /items?page=2".into(),
        fill_ms,
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    fn req(id: u64, op: impl Into<Op>) -> Request {
        Request { id, op: op.into() }
    }
    vec![
        ("hello_request", req(1, LocalOp::Hello)),
        (
            "check_request",
            req(2, ShardOp::Check(check_args(Some("api"), 1))),
        ),
        (
            "check_request_default_policy_peek",
            req(3, ShardOp::Check(check_args(None, 0))),
        ),
        (
            "check_request_large_id",
            req(u64::MAX, ShardOp::Check(check_args(Some("api"), 300))),
        ),
        ("stats_request", req(4, LocalOp::Stats)),
        ("cache_get_request", req(5, ShardOp::CacheGet(get_args(0)))),
        (
            "cache_get_request_fill",
            req(6, ShardOp::CacheGet(get_args(2000))),
        ),
        (
            "cache_set_request",
            req(
                7,
                ShardOp::CacheSet(Box::new(CacheSetArgs {
                    tenant: "acme".into(),
                    key: "GET /items?page=2".into(),
                    value: Bytes::from_static(b"{\"items\":[]}\x00\xff"),
                    ttl_ms: 30_000,
                    stale_ms: 5_000,
                    tags: vec!["items".into(), "user:42".into()],
                })),
            ),
        ),
        (
            "cache_del_request",
            req(
                8,
                ShardOp::CacheDel(CacheDelArgs {
                    tenant: "acme".into(),
                    keys: vec!["GET /items?page=2".into()],
                    tags: vec!["user:42".into()],
                    fill_only: false,
                }),
            ),
        ),
        (
            "cache_del_fill_only_request",
            req(
                8,
                ShardOp::CacheDel(CacheDelArgs {
                    tenant: "acme".into(),
                    keys: vec!["GET /items?page=2".into()],
                    tags: vec![],
                    fill_only: true,
                }),
            ),
        ),
        (
            "check_get_request",
            req(
                9,
                ShardOp::CheckGet(check_args(Some("api"), 1), Box::new(get_args(2000))),
            ),
        ),
        (
            "tenant_get_request",
            req(10, AdminOp::TenantGet("acme".into())),
        ),
        (
            "tenant_set_request",
            req(11, AdminOp::TenantSet("acme".into(), pro_record())),
        ),
        (
            "tenant_delete_request",
            req(12, AdminOp::TenantDelete("acme".into())),
        ),
        ("tenant_list_request", req(13, AdminOp::TenantList)),
        (
            "release_request",
            req(
                16,
                ShardOp::Release(ReleaseArgs {
                    tenant: "acme".into(),
                    key: "user:42".into(),
                    policy: Some("api".into()),
                    lease: lease(),
                }),
            ),
        ),
        (
            "usage_request",
            req(16, ShardOp::Usage(check_args(Some("api"), 0))),
        ),
        (
            "usage_request_default_policy",
            req(17, ShardOp::Usage(check_args(None, 0))),
        ),
    ]
}

/// The lease of the pinned frames.
fn lease() -> Lease {
    Lease::parse("0123456789abcdef0123456789abcdef").unwrap()
}

fn pro_record() -> TenantRecord {
    TenantRecord {
        plan: "pro".into(),
        limits: [
            ("api.burst.capacity".to_owned(), 1000.0),
            ("api.burst.refill_per_sec".to_owned(), 2.5),
        ]
        .into(),
    }
}

fn decision(allowed: bool, degraded: bool) -> Decision {
    Decision {
        allowed,
        limit: 10,
        remaining: if allowed { 9 } else { 0 },
        reset_ms: 200,
        retry_after_ms: if allowed { 0 } else { 200 },
        degraded,
        rule: "burst".into(),
        kind: "token_bucket",
        window_ms: 2000,
        lease: None,
        shadow_rule: None,
    }
}

fn usage_lines() -> Vec<RuleUsage> {
    vec![
        RuleUsage {
            rule: "burst".into(),
            kind: "token_bucket",
            limit: 10,
            used: 3,
            remaining: 7,
            reset_ms: 600,
            window_ms: 2000,
        },
        RuleUsage {
            rule: "daily".into(),
            kind: "daily_quota",
            limit: 1000,
            used: 412,
            remaining: 588,
            reset_ms: 40_000_000,
            window_ms: 86_400_000,
        },
    ]
}

fn hit() -> Lookup {
    Lookup {
        value: Some(Bytes::from_static(b"{\"items\":[]}")),
        ttl_ms: 29_500,
        ..Lookup::default()
    }
}

fn replies() -> Vec<(&'static str, Reply)> {
    let ok = Reply::ok;
    vec![
        (
            "hello_reply",
            ok(1, Body::Hello(Hello { backend: "redis" })),
        ),
        (
            "check_reply_allowed",
            ok(2, Body::Decision(decision(true, false))),
        ),
        (
            "check_reply_denied",
            ok(3, Body::Decision(decision(false, false))),
        ),
        (
            "check_reply_degraded",
            ok(u64::MAX, Body::Decision(decision(true, true))),
        ),
        (
            "check_reply_shadow_denied",
            ok(
                2,
                Body::Decision(Decision {
                    shadow_rule: Some("daily".into()),
                    ..decision(true, false)
                }),
            ),
        ),
        ("usage_reply", ok(16, Body::Usage(usage_lines()))),
        (
            "stats_reply",
            ok(
                4,
                Body::Stats(Stats {
                    uptime_ms: 123_456,
                    backend: "memory",
                    shards: 8,
                    counters: vec![
                        ("requests_check", 70_000),
                        ("allowed", 69_999),
                        ("denied", 1),
                    ],
                    shadow_denials: vec![("api.daily".into(), 3)],
                }),
            ),
        ),
        ("cache_get_reply_hit", ok(5, Body::Lookup(hit()))),
        (
            "cache_get_reply_stale_refresh",
            ok(
                5,
                Body::Lookup(Lookup {
                    ttl_ms: 0,
                    stale: true,
                    refresh: true,
                    ..hit()
                }),
            ),
        ),
        (
            "cache_get_reply_miss_fill",
            ok(
                6,
                Body::Lookup(Lookup {
                    fill: true,
                    ..Lookup::default()
                }),
            ),
        ),
        (
            "cache_get_reply_degraded",
            ok(6, Body::Lookup(Lookup::degraded_miss())),
        ),
        ("cache_set_reply", ok(7, Body::Stored { degraded: false })),
        (
            "cache_del_reply",
            ok(
                8,
                Body::Deleted {
                    deleted: 3,
                    degraded: false,
                },
            ),
        ),
        (
            "check_get_reply_allowed_hit",
            ok(9, Body::CheckLookup(decision(true, false), Some(hit()))),
        ),
        (
            "check_get_reply_denied",
            ok(9, Body::CheckLookup(decision(false, false), None)),
        ),
        (
            "tenant_get_reply",
            ok(
                10,
                Body::Tenant {
                    source: "redis",
                    record: Some(pro_record()),
                },
            ),
        ),
        (
            "tenant_get_reply_unknown",
            ok(
                10,
                Body::Tenant {
                    source: "postgres",
                    record: None,
                },
            ),
        ),
        ("tenant_set_reply", ok(11, Body::Done)),
        ("tenant_delete_reply", ok(12, Body::Removed(true))),
        (
            "tenant_list_reply",
            ok(
                13,
                Body::Tenants(vec![
                    ("acme".into(), pro_record()),
                    (
                        "free-42".into(),
                        TenantRecord {
                            plan: "free".into(),
                            limits: Default::default(),
                        },
                    ),
                ]),
            ),
        ),
        (
            "error_reply_forbidden",
            Reply::err(
                14,
                Error::Forbidden(
                    "`tenant_set` is for the users in `admin.allowed_uids` only".into(),
                ),
            ),
        ),
        (
            "error_reply_bad_request",
            Reply::err(5, Error::bad_request("missing field `key`")),
        ),
        (
            "error_reply_unknown_op",
            Reply::err(6, Error::UnknownOp("launch".into())),
        ),
        (
            "error_reply_fatal_frame",
            Reply::err(
                0,
                Error::TooLarge("frame over the maximum of 1048576 bytes".into()),
            ),
        ),
        (
            "error_reply_overloaded",
            Reply::err(7, Error::Overloaded("shard mailbox full")),
        ),
        (
            "error_reply_unavailable",
            Reply::err(15, Error::Unavailable("Redis: Redis timed out".into())),
        ),
        (
            "check_reply_allowed_lease",
            ok(
                2,
                Body::Decision(Decision {
                    limit: 20,
                    remaining: 19,
                    reset_ms: 30_000,
                    rule: "inflight".into(),
                    kind: "concurrency",
                    window_ms: 0,
                    lease: Some(lease()),
                    ..decision(true, false)
                }),
            ),
        ),
        (
            // Every field v1 appended to a check reply, in the contract's order.
            "check_reply_allowed_lease_shadow_denied",
            ok(
                2,
                Body::Decision(Decision {
                    limit: 20,
                    remaining: 19,
                    reset_ms: 30_000,
                    rule: "inflight".into(),
                    kind: "concurrency",
                    window_ms: 0,
                    lease: Some(lease()),
                    shadow_rule: Some("daily".into()),
                    ..decision(true, false)
                }),
            ),
        ),
        (
            "release_reply",
            ok(
                16,
                Body::Released {
                    released: true,
                    degraded: false,
                },
            ),
        ),
        (
            "release_reply_not_held",
            ok(
                16,
                Body::Released {
                    released: false,
                    degraded: false,
                },
            ),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A MessagePack value as JSON, binary as `{"$bin": hex}`.
fn to_json(v: &rmpv::Value) -> Value {
    use rmpv::Value as M;
    match v {
        M::Nil => Value::Null,
        M::Boolean(b) => json!(b),
        M::Integer(i) => i.as_u64().map_or_else(|| json!(i.as_i64()), |u| json!(u)),
        M::String(s) => json!(s.as_str().expect("UTF-8 strings")),
        M::Binary(b) => json!({"$bin": hex(b)}),
        M::F64(f) => json!(f),
        M::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        M::Map(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().expect("string keys").to_owned(), to_json(v)))
                .collect(),
        ),
        other => panic!("not in protocol v1: {other:?}"),
    }
}

fn entry(name: &str, direction: &str, body: &[u8]) -> Value {
    let value = rmpv::decode::read_value(&mut &body[..]).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    json!({"name": name, "direction": direction, "hex": hex(&frame), "value": to_json(&value)})
}

fn generate() -> Value {
    let mut frames = Vec::new();
    for (name, req) in requests() {
        let mut body = Vec::new();
        protocol::encode_request(&req, &mut body);
        frames.push(entry(name, "request", &body));
    }
    for (name, reply) in replies() {
        let mut body = Vec::new();
        protocol::encode_reply(&reply, &mut body);
        frames.push(entry(name, "reply", &body));
    }
    json!({
        "about": "Protocol v1 golden frames. hex = 4-byte big-endian length + MessagePack body; value = the body as JSON, with MessagePack binary as {\"$bin\": hex}. Generated by tests/golden_frames.rs (QUOTAD_BLESS=1).",
        "frames": frames,
    })
}

fn pinned() -> Value {
    serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap()
}

#[test]
fn encoders_produce_exactly_the_pinned_bytes() {
    let generated = generate();
    if std::env::var_os("QUOTAD_BLESS").is_some() {
        // Write then rename: the other test may be reading the file.
        let tmp = format!("{PATH}.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(&generated).unwrap() + "\n",
        )
        .unwrap();
        std::fs::rename(tmp, PATH).unwrap();
        return;
    }
    assert_eq!(
        generated,
        pinned(),
        "the wire encoding changed; if intended, rerun with QUOTAD_BLESS=1"
    );
}

#[test]
fn decoders_read_the_pinned_bytes_back() {
    let pinned = pinned();
    let frames = pinned["frames"].as_array().unwrap();
    let body = |name: &str| {
        let f = frames.iter().find(|f| f["name"] == name).unwrap();
        let bytes = unhex(f["hex"].as_str().unwrap());
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4, "{name}: length prefix");
        bytes[4..].to_vec()
    };
    let limits = Config::builtin().limits();
    for (name, req) in requests() {
        assert_eq!(
            protocol::decode(&body(name), &limits).unwrap(),
            req,
            "{name}"
        );
    }
    for (name, reply) in replies() {
        let fields = ReplyFields::from_slice(&body(name)).unwrap();
        assert_eq!(
            (fields.id, fields.ok),
            (reply.id, reply.body.is_ok()),
            "{name}"
        );
        match reply.body {
            Ok(Body::Decision(d)) => assert_eq!(fields.decision(), Some(Ok(d)), "{name}"),
            Ok(Body::Lookup(l)) => assert_eq!(fields.lookup(), Some(l), "{name}"),
            Ok(Body::CheckLookup(d, l)) => {
                assert_eq!(fields.decision(), Some(Ok(d)), "{name}");
                assert_eq!(fields.lookup(), l, "{name}");
            }
            Ok(Body::Stored { degraded }) => assert_eq!(fields.degraded, Some(degraded)),
            Ok(Body::Deleted { deleted, degraded }) => {
                assert_eq!(
                    (fields.deleted, fields.degraded),
                    (Some(deleted), Some(degraded))
                )
            }
            Ok(Body::Hello(h)) => {
                assert_eq!(fields.protocol, Some(1));
                assert_eq!(fields.backend.as_deref(), Some(h.backend));
                assert_eq!(fields.ops.unwrap(), protocol::OPS);
            }
            Ok(Body::Tenant { source, record }) => {
                assert_eq!(fields.source.as_deref(), Some(source));
                assert_eq!(fields.known, Some(record.is_some()));
                assert_eq!(fields.plan, record.as_ref().map(|r| r.plan.clone()));
                assert_eq!(fields.limits, record.map(|r| r.limits));
            }
            Ok(Body::Done) => assert!(fields.error.is_none()),
            Ok(Body::Released { released, degraded }) => assert_eq!(
                (fields.released, fields.degraded),
                (Some(released), Some(degraded)),
                "{name}"
            ),
            Ok(Body::Removed(existed)) => assert_eq!(fields.deleted, Some(u64::from(existed))),
            Ok(Body::Tenants(all)) => {
                let got: Vec<(String, String)> = fields
                    .tenants
                    .unwrap()
                    .into_iter()
                    .map(|t| (t.tenant, t.plan))
                    .collect();
                let want: Vec<(String, String)> =
                    all.into_iter().map(|(t, r)| (t, r.plan)).collect();
                assert_eq!(got, want);
            }
            Ok(Body::Usage(rules)) => assert_eq!(fields.usage(), Some(rules), "{name}"),
            Ok(Body::Stats(s)) => {
                assert_eq!(fields.uptime_ms, Some(s.uptime_ms));
                assert_eq!(fields.counters.unwrap().len(), s.counters.len());
                let shadow: Vec<(String, u64)> =
                    fields.shadow_denials.unwrap().into_iter().collect();
                assert_eq!(shadow, s.shadow_denials);
            }
            Err(e) => {
                let w = fields.error.unwrap();
                assert_eq!(
                    (w.code.as_str(), w.message),
                    (e.code(), e.to_string()),
                    "{name}"
                );
            }
        }
    }
}
