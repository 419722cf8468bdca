//! Properties of the wire codec, over generated input: every valid request
//! survives `encode_request` → `decode` unchanged; any byte string given to
//! `decode` is a request or a documented error, never a panic; and the real
//! daemon answers any frame with a reply or a clean close, never a hang,
//! while another connection keeps being served.

mod common;

use std::cell::{Cell, RefCell};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Daemon, Raw};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use quotad::config::{Config, Limits, TenantRecord};
use quotad::limiter::Lease;
use quotad::protocol::{
    self, AdminOp, CacheDelArgs, CacheGetArgs, CacheSetArgs, CheckArgs, DecodeError, LocalOp, Op,
    OpKind, ReleaseArgs, Request, ShardOp,
};
use serde_json::json;

fn limits() -> Limits {
    Config::builtin().limits()
}

/// Any UTF-8 at all (controls, braces, non-ASCII), within `max` bytes.
fn text(max: usize) -> impl Strategy<Value = String> + Clone {
    "(?s).{1,24}".prop_filter("within the byte limit", move |s| s.len() <= max)
}

fn check_args(l: &Limits) -> impl Strategy<Value = CheckArgs> + use<> {
    (
        text(l.max_tenant_bytes),
        text(l.max_key_bytes),
        proptest::option::of("[a-z_]{1,16}"),
        any::<u64>(),
    )
        .prop_map(|(tenant, key, policy, cost)| CheckArgs {
            tenant,
            key,
            policy,
            cost,
        })
}

/// Distinct strings, in generated order: `decode` drops repeats.
fn strings(max_items: usize, max_bytes: usize) -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(text(max_bytes), 0..=max_items.min(8)).prop_map(|mut items| {
        let mut seen = std::collections::HashSet::new();
        items.retain(|s| seen.insert(s.clone()));
        items
    })
}

/// A request `decode` must accept: every op, fields within the limits.
fn valid_request() -> impl Strategy<Value = Request> {
    let l = limits();
    let tenant = text(l.max_tenant_bytes);
    let key = text(l.max_key_bytes);
    let get =
        (tenant.clone(), key.clone(), 0..=l.max_fill_ms).prop_map(|(tenant, key, fill_ms)| {
            CacheGetArgs {
                tenant,
                key,
                fill_ms,
            }
        });
    let set = (
        tenant.clone(),
        key.clone(),
        proptest::collection::vec(any::<u8>(), 0..64),
        1..=l.max_ttl_ms,
        0..=l.max_ttl_ms,
        strings(l.max_tags, l.max_key_bytes),
    )
        .prop_map(
            |(tenant, key, value, ttl_ms, stale_ms, tags)| CacheSetArgs {
                tenant,
                key,
                value: Bytes::from(value),
                ttl_ms,
                stale_ms,
                tags,
            },
        );
    let del = (
        tenant.clone(),
        strings(l.max_delete, l.max_key_bytes),
        strings(l.max_delete, l.max_key_bytes),
        any::<bool>(),
    )
        .prop_filter_map("something to delete", |(tenant, keys, tags, fill_only)| {
            let tags = if fill_only { Vec::new() } else { tags };
            (!keys.is_empty() || !tags.is_empty()).then_some(CacheDelArgs {
                tenant,
                keys,
                tags,
                fill_only,
            })
        });
    let record = (
        "[a-z]{1,64}",
        proptest::collection::btree_map("[a-z]{1,8}\\.[a-z]{1,8}\\.[a-z]{1,8}", -1e9..1e9f64, 0..4),
    )
        .prop_map(|(plan, limits)| TenantRecord { plan, limits });
    let op = prop_oneof![
        Just(Op::Local(LocalOp::Hello)),
        Just(Op::Local(LocalOp::Stats)),
        check_args(&l).prop_map(|c| Op::Shard(ShardOp::Check(c))),
        get.clone().prop_map(|g| Op::Shard(ShardOp::CacheGet(g))),
        set.prop_map(|s| Op::Shard(ShardOp::CacheSet(Box::new(s)))),
        del.prop_map(|d| Op::Shard(ShardOp::CacheDel(d))),
        (check_args(&l), get).prop_map(|(c, g)| {
            let g = CacheGetArgs {
                tenant: c.tenant.clone(),
                ..g
            };
            Op::Shard(ShardOp::CheckGet(c, Box::new(g)))
        }),
        tenant
            .clone()
            .prop_map(|t| Op::Admin(AdminOp::TenantGet(t))),
        (tenant.clone(), record).prop_map(|(t, r)| Op::Admin(AdminOp::TenantSet(t, r))),
        tenant.prop_map(|t| Op::Admin(AdminOp::TenantDelete(t))),
        Just(Op::Admin(AdminOp::TenantList)),
        (check_args(&l), any::<[u8; 16]>()).prop_map(|(c, bits)| {
            let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
            Op::Shard(ShardOp::Release(ReleaseArgs {
                tenant: c.tenant,
                key: c.key,
                policy: c.policy,
                lease: Lease::parse(&hex).unwrap(),
            }))
        }),
        // `usage` charges nothing: it decodes with cost 0 whatever is sent.
        check_args(&l).prop_map(|c| Op::Shard(ShardOp::Usage(CheckArgs { cost: 0, ..c }))),
    ];
    (any::<u64>(), op).prop_map(|(id, op)| Request { id, op })
}

fn encode(req: &Request) -> Vec<u8> {
    let mut body = Vec::new();
    protocol::encode_request(req, &mut body);
    body
}

/// A valid request's encoding with a few bytes overwritten, cut short or
/// extended: mostly well-formed maps with one bad field, which random
/// bytes alone seldom reach.
fn mutated_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        valid_request(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        prop_oneof![Just(None), any::<prop::sample::Index>().prop_map(Some)],
        proptest::collection::vec(any::<u8>(), 0..3),
    )
        .prop_map(|(req, writes, cut, tail)| {
            let mut body = encode(&req);
            for (at, byte) in writes {
                let i = at.index(body.len());
                body[i] = byte;
            }
            if let Some(cut) = cut {
                body.truncate(cut.index(body.len() + 1));
            }
            body.extend(tail);
            body
        })
}

fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        mutated_frame(),
    ]
}

/// Decoding gives a request, or one of the errors `decode` may give.
fn assert_decodes_or_refuses(body: &[u8], l: &Limits) -> Result<(), TestCaseError> {
    match protocol::decode(body, l) {
        // What decoded re-encodes to the same request. Compared as bytes,
        // as the fuzz harness does: a mutated `tenant_set` may decode with
        // a NaN limit, and NaN != NaN.
        Ok(req) => {
            let once = encode(&req);
            let again = protocol::decode(&once, l).map(|r| encode(&r));
            prop_assert_eq!(again.ok(), Some(once));
        }
        Err(DecodeError::Fatal(e)) => prop_assert_eq!(e.code(), "bad_request"),
        Err(DecodeError::Request { error, .. }) => prop_assert!(
            ["bad_request", "unknown_op", "too_large"].contains(&error.code()),
            "{error:?}"
        ),
    }
    Ok(())
}

/// The generator reaches every op the protocol has, so an op added to the
/// op table without a strategy here fails this test.
#[test]
fn valid_request_generates_every_op() {
    let mut runner = TestRunner::deterministic();
    let strategy = valid_request();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2000 {
        let req = strategy.new_tree(&mut runner).unwrap().current();
        seen.insert(req.op.name());
    }
    let missing: Vec<_> = (OpKind::ALL.iter())
        .map(|k| k.name())
        .filter(|name| !seen.contains(name))
        .collect();
    assert!(missing.is_empty(), "never generated: {missing:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn valid_requests_round_trip(req in valid_request()) {
        let l = limits();
        prop_assert_eq!(protocol::decode(&encode(&req), &l), Ok(req));
    }

    #[test]
    fn any_bytes_decode_or_are_refused(body in any_frame()) {
        assert_decodes_or_refuses(&body, &limits())?;
    }
}

/// What the daemon did with one frame.
enum Outcome {
    Replied,
    Closed,
}

/// Reads replies until one arrives or the daemon closes; a read that times
/// out is a hang. A fatal error (`id` 0) must be followed by a close.
fn answer(stream: &mut UnixStream) -> Result<Outcome, String> {
    let read = |stream: &mut UnixStream| -> Result<Option<Vec<u8>>, String> {
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(format!("no reply and no close: {e}")),
        }
        let mut body = vec![0; u32::from_be_bytes(len) as usize];
        stream
            .read_exact(&mut body)
            .map_err(|e| format!("a reply cut short: {e}"))?;
        Ok(Some(body))
    };
    let Some(body) = read(stream)? else {
        return Ok(Outcome::Closed);
    };
    let reply: serde_json::Value = rmp_serde::from_slice(&body)
        .map_err(|e| format!("a reply that is not MessagePack: {e}"))?;
    if reply["id"] == 0 && reply["ok"] == false {
        // id 0 is either fatal (then closed) or a request whose id was bad
        // (then still open): both are allowed, a hang after it is not.
        // Writing fails if it already closed: the read below then sees it.
        let _ = stream.write_all(&hello_frame());
        return match read(stream)? {
            None => Ok(Outcome::Closed),
            Some(_) => Ok(Outcome::Replied),
        };
    }
    Ok(Outcome::Replied)
}

fn hello_frame() -> Vec<u8> {
    let body = encode(&Request {
        id: 7,
        op: Op::Local(LocalOp::Hello),
    });
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    frame
}

/// Through the real daemon: each generated frame on a fresh connection gets
/// a reply or a clean close within 5 s, and a bystander connection opened
/// before them all is answered after each one.
#[test]
fn the_daemon_answers_or_closes_for_any_frame() {
    // Short fills, so a generated cache_get is never held for long.
    let d = Daemon::start(
        "[cache]\nmax_fill_ms = 50\n[policies.default]\nrules = [{ name = \"burst\", kind = \"token_bucket\", capacity = 1000, refill_per_sec = 1000 }]\n",
    );
    // The runner takes an `Fn`: hence the cells.
    let bystander = RefCell::new(Raw::connect(&d.socket()));
    let mut runner = TestRunner::new(RunnerConfig::with_cases(400));
    let (replied, closed) = (Cell::new(0), Cell::new(0));
    let panics = || {
        let log = d.stderr.lock().unwrap();
        log.iter().filter(|l| l.contains("panicked")).count()
    };
    runner
        .run(&any_frame(), |body| {
            let panics_before = panics();
            let mut stream = UnixStream::connect(d.socket()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend(&body);
            stream.write_all(&frame).unwrap();
            let start = Instant::now();
            match answer(&mut stream) {
                Ok(Outcome::Replied) => replied.set(replied.get() + 1),
                Ok(Outcome::Closed) => closed.set(closed.get() + 1),
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "{e} after {:?}",
                        start.elapsed()
                    )));
                }
            }
            // A check reaches a shard, so a shard that died on the frame
            // shows here, not only a dead connection task.
            let mut bystander = bystander.borrow_mut();
            bystander.send(json!({"id": 1, "op": "check", "tenant": "bystander", "key": "k"}));
            let reply = bystander.recv();
            prop_assert_eq!(reply.map(|r| r["ok"].clone()), Some(json!(true)));
            // A panicking task reads as a clean close from outside: the
            // panic hook's line in the log is what tells them apart. Only
            // this case's panics count, so shrinking finds the frame.
            if panics() > panics_before {
                let line = d.log_line("panicked").unwrap_or_default();
                return Err(TestCaseError::fail(format!("the daemon panicked: {line}")));
            }
            Ok(())
        })
        .unwrap();
    // The log is copied by a thread: give a last panic time to arrive.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(d.log_line("panicked"), None, "the daemon panicked");
    // Both outcomes were exercised, or the generator is not doing its job.
    let (replied, closed) = (replied.get(), closed.get());
    assert!(
        replied > 0 && closed > 0,
        "{replied} replied, {closed} closed"
    );
}
