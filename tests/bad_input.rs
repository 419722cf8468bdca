//! Bad input gets the documented error and harms nothing: malformed and
//! oversized frames close only their own connection, bad fields only fail
//! their own request, and every other connection keeps being served.

mod common;

use common::{Daemon, Raw, Redis, code, redis_table};
use serde_json::json;

const CONFIG: &str = r#"max_frame_bytes = 4096
[cache]
max_value_bytes = 1024
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 10, refill_per_sec = 1 }]
"#;

fn check(id: u64, tenant: &str, key: &str) -> serde_json::Value {
    json!({"id": id, "op": "check", "tenant": tenant, "key": key})
}

/// Sends a frame that must be fatal: an error with `id` 0, then EOF.
fn assert_fatal(d: &Daemon, frame_or_bytes: impl FnOnce(&mut Raw), want: &str) {
    let mut raw = Raw::connect(&d.socket());
    frame_or_bytes(&mut raw);
    let reply = raw.recv().expect("an error reply before closing");
    assert_eq!(reply["id"], 0);
    assert_eq!(reply["ok"], false);
    assert_eq!(code(&reply), Some(want), "{reply}");
    assert!(raw.closed(), "the connection must be closed");
}

/// Malformed, oversized and cut-off frames each get a fatal error and
/// close their own connection only: a healthy one keeps being served.
#[test]
fn malformed_or_oversized_frames_close_only_their_connection() {
    let d = Daemon::start(CONFIG);
    // A healthy connection open through all of it.
    let mut good = Raw::connect(&d.socket());
    good.send(check(1, "acme", "k"));
    assert_eq!(good.recv().unwrap()["allowed"], true);

    assert_fatal(
        &d,
        |r| r.send_bytes(&1_000_000u32.to_be_bytes()),
        "too_large",
    );
    assert_fatal(
        &d,
        |r| r.send_frame(&[0x82, 0xa2, b'i', b'd']),
        "bad_request",
    ); // truncated
    assert_fatal(&d, |r| r.send(json!([1, "check"])), "bad_request"); // not a map
    assert_fatal(&d, |r| r.send(json!("hello")), "bad_request");
    assert_fatal(&d, |r| r.send_frame(&[0xc1, 0xff, 0x00]), "bad_request"); // reserved byte
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..50 {
        let body: Vec<u8> = (0..64)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Random bytes, never a map marker first.
                (seed as u8) | 0x01
            })
            .map(|b| {
                if (0x80..=0x8f).contains(&b) || b == 0xde || b == 0xdf {
                    0xc1
                } else {
                    b
                }
            })
            .collect();
        assert_fatal(&d, |r| r.send_frame(&body), "bad_request");
    }
    // Random garbage where a length should be: at worst a huge length.
    let mut junk = Raw::connect(&d.socket());
    junk.send_bytes(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
    assert_eq!(code(&junk.recv().unwrap()), Some("too_large"));
    // A peer that vanishes mid-frame.
    let mut gone = Raw::connect(&d.socket());
    gone.send_bytes(&[0, 0, 0, 100, 0x82]);
    drop(gone);

    good.send(check(2, "acme", "k"));
    let reply = good.recv().unwrap();
    assert_eq!(
        (reply["id"].as_u64(), reply["allowed"].as_bool()),
        (Some(2), Some(true))
    );
}

/// Each bad field fails its own request with the documented code and
/// message on a connection that stays served; values at the limits pass
/// and unknown fields are ignored.
#[test]
fn bad_fields_fail_only_their_request() {
    let d = Daemon::start(CONFIG);
    let mut c = Raw::connect(&d.socket());
    let long = "x".repeat(257);
    let huge_key = "k".repeat(1025);
    let cases = [
        (
            json!({"id": 1, "op": "check", "tenant": 7, "key": "k"}),
            "bad_request",
            "`tenant` must be a string",
        ),
        (
            json!({"id": 2, "op": "check", "tenant": "t"}),
            "bad_request",
            "missing field `key`",
        ),
        (
            json!({"id": 3, "op": "check", "tenant": "", "key": "k"}),
            "bad_request",
            "1 to 256 bytes, not 0",
        ),
        (
            json!({"id": 4, "op": "check", "tenant": long, "key": "k"}),
            "bad_request",
            "not 257",
        ),
        (
            json!({"id": 5, "op": "check", "tenant": "t", "key": huge_key}),
            "bad_request",
            "1 to 1024 bytes",
        ),
        (
            json!({"id": 6, "op": "check", "tenant": "t", "key": "k", "cost": -1}),
            "bad_request",
            "`cost`",
        ),
        (
            json!({"id": 7, "op": "check", "tenant": "t", "key": "k", "cost": 1.5}),
            "bad_request",
            "not a float",
        ),
        (
            json!({"id": 8, "op": "check", "tenant": "t", "key": "k", "cost": u64::MAX}),
            "bad_request",
            "exceeds rule `burst`",
        ),
        (
            json!({"id": 9, "op": "check", "tenant": "t", "key": "k", "cost": 11}),
            "bad_request",
            "at most 10",
        ),
        (
            json!({"id": 10, "op": "check", "tenant": "t", "key": "k", "policy": "nope"}),
            "unknown_policy",
            "`nope`",
        ),
        (
            json!({"id": 11, "op": "check", "tenant": "t", "key": "k", "policy": 3}),
            "bad_request",
            "`policy`",
        ),
        (json!({"id": 12, "op": "launch"}), "unknown_op", "`launch`"),
        (json!({"id": 13}), "bad_request", "missing field `op`"),
        (
            json!({"id": "14", "op": "hello"}),
            "bad_request",
            "`id` must be an unsigned integer",
        ),
        (json!({"id": -15, "op": "hello"}), "bad_request", "`id`"),
        (
            json!({"id": 16, "op": "cache_set", "tenant": "t", "key": "k", "value": "text", "ttl_ms": 5}),
            "bad_request",
            "`value` must be binary, not a string",
        ),
        (
            json!({"id": 17, "op": "cache_get", "tenant": "t"}),
            "bad_request",
            "missing field `key`",
        ),
        (
            json!({"id": 18, "op": "cache_get", "tenant": "t", "key": "k", "fill_ms": 99_999_999}),
            "bad_request",
            "`fill_ms` must be at most",
        ),
        (
            json!({"id": 19, "op": "cache_del", "tenant": "t"}),
            "bad_request",
            "needs `keys` or `tags`",
        ),
        (
            json!({"id": 20, "op": "cache_del", "tenant": "t", "keys": "k"}),
            "bad_request",
            "`keys` must be a list of strings",
        ),
        (
            json!({"id": 21, "op": "cache_del", "tenant": "t", "keys": ["k", 5]}),
            "bad_request",
            "`keys` must be a list of strings, not an integer",
        ),
        (
            json!({"id": 22, "op": "cache_del", "tenant": "t", "tags": [""]}),
            "bad_request",
            "1 to 1024 bytes, not 0",
        ),
        (
            json!({"id": 23, "op": "check_get", "tenant": "t", "key": "k"}),
            "bad_request",
            "missing field `cache_key`",
        ),
        (
            json!({"id": 25, "op": "cache_del", "tenant": "t", "keys": ["k"], "tags": ["x"], "fill_only": true}),
            "bad_request",
            "`fill_only` drops the fill locks of `keys`: no `tags`",
        ),
        (
            json!({"id": 26, "op": "cache_del", "tenant": "t", "keys": ["k"], "fill_only": 1}),
            "bad_request",
            "field `fill_only` must be a boolean, not an integer",
        ),
        (
            json!({"id": 24, "op": "check", "tenant": "t", "key": "k", "policy": "p".repeat(2000)}),
            "unknown_policy",
            // Echoed shortened: 64 characters, then an ellipsis.
            &format!("`{}…`", "p".repeat(64)),
        ),
    ];
    for (req, want, message) in &cases {
        c.send(req.clone());
        let reply = c.recv().expect("the connection stays open");
        let id = req["id"].as_u64().unwrap_or(0);
        assert_eq!(reply["id"], id, "{reply}");
        assert_eq!(code(&reply), Some(*want), "{req} -> {reply}");
        let got = reply["error"]["message"].as_str().unwrap();
        assert!(
            got.contains(message),
            "{req}: message {got:?} lacks {message:?}"
        );
    }
    // Binary fields need a real `bin`: build those frames by hand.
    let set = |id: u64, value: rmpv::Value, ttl: i64, tags: usize| {
        let mut fields = vec![
            ("id", rmpv::Value::from(id)),
            ("op", "cache_set".into()),
            ("tenant", "t".into()),
            ("key", "k".into()),
            ("value", value),
            ("ttl_ms", rmpv::Value::from(ttl)),
        ];
        if tags > 0 {
            let tags = (0..tags)
                .map(|i| rmpv::Value::from(format!("tag{i}")))
                .collect();
            fields.push(("tags", rmpv::Value::Array(tags)));
        }
        let map = fields
            .into_iter()
            .map(|(k, v)| (rmpv::Value::from(k), v))
            .collect();
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &rmpv::Value::Map(map)).unwrap();
        buf
    };
    let bin = |n: usize| rmpv::Value::Binary(vec![7; n]);
    for (frame, want, message) in [
        (
            set(30, bin(1025), 1000, 0),
            "too_large",
            "over the maximum of 1024",
        ),
        (
            set(31, bin(10), 0, 0),
            "bad_request",
            "`ttl_ms` must be greater than 0",
        ),
        (
            set(32, bin(10), -5, 0),
            "bad_request",
            "`ttl_ms` must be an unsigned integer",
        ),
        (
            set(33, bin(10), 1000, 17),
            "bad_request",
            "over the maximum of 16",
        ),
    ] {
        c.send_frame(&frame);
        let reply = c.recv().unwrap();
        assert_eq!(code(&reply), Some(want), "{reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{reply}"
        );
    }
    c.send_frame(&set(34, bin(1024), 1000, 16));
    assert_eq!(c.recv().unwrap()["ok"], true, "at the limits is fine");

    // Duplicate keys and non-string keys are refused too.
    c.send_frame(&[
        0x83, 0xa2, b'i', b'd', 0x10, 0xa2, b'o', b'p', 0xa5, b'h', b'e', b'l', b'l', b'o', 0xa2,
        b'i', b'd', 0x11,
    ]);
    assert!(
        c.recv().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("twice")
    );
    c.send_frame(&[
        0x83, 0xa2, b'i', b'd', 0x12, 0xa2, b'o', b'p', 0xa5, b'h', b'e', b'l', b'l', b'o', 0x01,
        0x02,
    ]);
    assert!(
        c.recv().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("keys must be strings")
    );
    // Unknown fields are ignored (newer clients may send them).
    c.send(json!({"id": 20, "op": "hello", "future_field": [1, {"a": 2}]}));
    assert_eq!(c.recv().unwrap()["ok"], true);
    let stats = {
        c.send(json!({"id": 21, "op": "stats"}));
        c.recv().unwrap()
    };
    assert!(stats["counters"]["errors_bad_request"].as_u64().unwrap() >= 12);
}

/// The request bodies of the golden frames (`tests/fixtures/frames.json`).
fn golden_requests() -> Vec<Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/frames.json");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["direction"] == "request")
        .map(|f| {
            let hex = f["hex"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            bytes[4..].to_vec()
        })
        .collect()
}

/// A request body with one field's value (`id` and `op` included) swapped
/// for a random value of a random type: huge, negative, fractional, empty,
/// hostile strings, binary, nested.
fn replace_a_field(body: &[u8], next: &mut impl FnMut() -> u64) -> Vec<u8> {
    use rmpv::Value as V;
    let mut map = match rmpv::decode::read_value(&mut &body[..]) {
        Ok(V::Map(map)) => map,
        _ => unreachable!("golden requests are maps"),
    };
    let text = |next: &mut dyn FnMut() -> u64| {
        let pieces = ["}", "{", ":", "\0", "é", "*", "\r\nFLUSHALL", "a", "%7D"];
        (0..next() % 300)
            .map(|_| pieces[next() as usize % pieces.len()])
            .collect::<String>()
    };
    let value = match next() % 10 {
        0 => V::from(u64::MAX - next() % 3),
        1 => V::from(-((next() % 1000) as i64) - 1),
        2 => V::from(0),
        3 => V::F64(1.5),
        4 => V::from(text(next)),
        5 => V::Binary(vec![0xc1; (next() % 2000) as usize]),
        6 => V::Nil,
        7 => V::Boolean(true),
        8 => V::Array(vec![V::from(text(next)); (next() % 300) as usize]),
        _ => V::Map(vec![(V::from("limit"), V::from(text(next)))]),
    };
    let i = next() as usize % map.len();
    map[i].1 = value;
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &V::Map(map)).unwrap();
    out
}

/// Valid requests of every op, mutated thousands of ways (bytes flipped,
/// cut short, spliced, fields replaced): each gets an answer (then, if it
/// was fatal, the connection closes),
/// none hangs, and the daemon keeps serving a healthy connection right.
#[test]
fn mutated_requests_never_hang_crash_or_spill_over() {
    let redis = Redis::start();
    // Short fills, so that a request mutated into a held cache_get is
    // answered within the read timeout.
    let config =
        |redis: &str| CONFIG.replace("[cache]\n", &format!("{redis}[cache]\nmax_fill_ms = 200\n"));
    for (backend, d) in [
        ("memory", Daemon::start(&config(""))),
        ("redis", Daemon::start(&config(&redis_table(&redis)))),
    ] {
        let valid = golden_requests();
        assert!(valid.len() >= 8, "the fixture has every op");
        let mut good = Raw::connect(&d.socket());
        let mut fuzz = Raw::connect(&d.socket());
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut closed = 0;
        let mut codes = std::collections::BTreeMap::new();
        for _ in 0..2000 {
            let mut body = valid[next() as usize % valid.len()].clone();
            match next() % 6 {
                0 => body.truncate(next() as usize % body.len()),
                1 => {
                    let other = &valid[next() as usize % valid.len()];
                    let at = next() as usize % other.len();
                    body.extend_from_slice(&other[at..]);
                }
                2 | 3 => body = replace_a_field(&body, &mut next),
                _ => {
                    for _ in 0..1 + next() % 3 {
                        let i = next() as usize % body.len();
                        body[i] = next() as u8;
                    }
                }
            }
            fuzz.send_frame(&body);
            let Some(reply) = fuzz.recv_body() else {
                panic!("{backend}: no answer to {body:02x?}");
            };
            // Replies may carry binary (a hit): read them as MessagePack.
            let reply = rmpv::decode::read_value(&mut &reply[..]).expect("a MessagePack reply");
            let field = |v: &rmpv::Value, name: &str| {
                v.as_map()
                    .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
                    .map(|(_, v)| v.clone())
            };
            let code = field(&reply, "error")
                .and_then(|e| field(&e, "code"))
                .map_or("ok".to_owned(), |c| c.as_str().unwrap().to_owned());
            let fatal_or_id_0 =
                field(&reply, "id").and_then(|i| i.as_u64()) == Some(0) && code != "ok";
            *codes.entry(code).or_insert(0) += 1;
            if fatal_or_id_0 {
                // Fatal (the connection is closed), or a request whose id
                // became 0: a probe tells which.
                fuzz.send(check(1 << 40, "probe", "k"));
                if fuzz.recv().is_none() {
                    closed += 1;
                    fuzz = Raw::connect(&d.socket());
                }
            }
        }
        // Some frames were fatal, and some mutated requests were served.
        assert!(
            closed > 0 && codes.get("ok") > Some(&50),
            "{backend}: {closed} fatal, {codes:?}"
        );
        good.send(check(7, "healthy", "k"));
        let reply = good.recv().unwrap();
        assert_eq!(
            (reply["id"].as_u64(), reply["allowed"].as_bool()),
            (Some(7), Some(true)),
            "{backend}: {reply}"
        );
    }
}

/// Tenants and keys made of separators, braces, globs or CRLF never share
/// state, and every Redis key they make has exactly one well-formed hash tag.
#[test]
fn hostile_tenants_and_keys_stay_in_their_own_namespace() {
    let redis = Redis::start();
    let d = Daemon::start(&format!(
        "{}\n[policies.default]\nrules = [{{ name = \"one\", kind = \"fixed_window\", limit = 1, window_ms = 60000 }}]\n",
        redis_table(&redis)
    ));
    let mut c = Raw::connect(&d.socket());
    // Each of these would collide with "a"/"k" if strings were pasted raw.
    let tenants = [
        "a",
        "a}",
        "{a}",
        "a}:l:default:one:k",
        "}{",
        "a%7D",
        "é",
        "a\u{0}b",
        "a b",
        "a\nb",
    ];
    for (i, t) in tenants.iter().enumerate() {
        c.send(check(i as u64, t, "k"));
        let r = c.recv().unwrap();
        assert_eq!(
            r["allowed"], true,
            "tenant {t:?} shares state with another: {r}"
        );
    }
    for (i, k) in ["k:x", "k}", "{k}", "*", "k\r\nFLUSHALL"]
        .iter()
        .enumerate()
    {
        c.send(check(100 + i as u64, "a", k));
        assert_eq!(c.recv().unwrap()["allowed"], true, "key {k:?}");
    }
    // Every key Redis holds has exactly one well-formed hash tag.
    let keys = redis.cli(&["KEYS", "*"]);
    assert_eq!(keys.lines().count(), tenants.len() + 5);
    for key in keys.lines() {
        assert!(key.starts_with("qd:{"), "{key}");
        let tag_end = key.find('}').unwrap();
        assert!(!key[4..tag_end].contains(['{', ':']), "{key}");
        assert!(key[tag_end..].starts_with("}:l:default:one:"), "{key}");
    }
}

/// A connection over `max_connections` is told `overloaded` and closed, and
/// a slot that frees up is given to the next one.
#[test]
fn connections_over_the_limit_are_told_overloaded() {
    let d = Daemon::start(&format!("max_connections = 2\n{CONFIG}"));
    let mut a = Raw::connect(&d.socket());
    let mut b = Raw::connect(&d.socket());
    a.send(json!({"id": 1, "op": "hello"}));
    b.send(json!({"id": 1, "op": "hello"}));
    assert_eq!(a.recv().unwrap()["ok"], true);
    assert_eq!(b.recv().unwrap()["ok"], true);
    let mut c = Raw::connect(&d.socket());
    assert_eq!(code(&c.recv().unwrap()), Some("overloaded"));
    assert!(c.closed());
    drop(a);
    common::wait_until_blocking("a connection slot", common::SOON, || {
        let mut n = Raw::connect(&d.socket());
        n.send(json!({"id": 1, "op": "hello"}));
        n.recv().is_some_and(|r| r["ok"] == true)
    });
}

/// A client that pipelines far more replies than its socket holds, and
/// reads none for a while, stalls only itself: quotad waits for room (the
/// one time its end of a connection asks to hear of writability, see
/// src/socket.rs), other connections are served meanwhile, and every reply
/// arrives once the client reads.
#[test]
fn a_client_that_stops_reading_stalls_only_itself() {
    use std::collections::BTreeSet;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    const N: u64 = 20_000; // ~2.6 MB of replies: many socket buffers' worth
    let d = Daemon::start(CONFIG);
    let mut slow = UnixStream::connect(d.socket()).unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut writer = slow.try_clone().unwrap();
    // Its writes block too once quotad, blocked on its replies, stops reading.
    let sender = std::thread::spawn(move || {
        for id in 1..=N {
            let body =
                rmp_serde::to_vec_named(&check(id, "acme", &format!("k{}", id % 50))).unwrap();
            writer
                .write_all(&(body.len() as u32).to_be_bytes())
                .unwrap();
            writer.write_all(&body).unwrap();
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut good = Raw::connect(&d.socket());
    good.send(check(1, "other", "k"));
    assert_eq!(good.recv().unwrap()["allowed"], true);

    let mut ids = BTreeSet::new();
    while (ids.len() as u64) < N {
        let mut len = [0u8; 4];
        slow.read_exact(&mut len)
            .expect("every reply, once the client reads");
        let mut body = vec![0; u32::from_be_bytes(len) as usize];
        slow.read_exact(&mut body).unwrap();
        let reply: serde_json::Value = rmp_serde::from_slice(&body).unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        assert!(
            ids.insert(reply["id"].as_u64().unwrap()),
            "one reply per id"
        );
    }
    sender.join().unwrap();
    assert_eq!(ids, (1..=N).collect());
    good.send(check(2, "other", "k"));
    assert_eq!(good.recv().unwrap()["allowed"], true);
}
