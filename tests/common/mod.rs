//! Real processes for the integration tests, one harness per component:
//! Redis, Redis Cluster, Redis Sentinel, PostgreSQL and the quotad daemon,
//! plus a raw wire connection and the two `wait_until` helpers. The
//! servers speak TLS when given [`Certs`]. Each server is stopped when
//! its handle is dropped.

// Each test binary is a crate of its own that uses only some of the
// harnesses and of their methods.
#![allow(dead_code)]

mod cluster;
mod daemon;
mod postgres;
mod raw;
mod redis;
mod sentinel;
mod tls;
mod wait;

use std::path::{Path, PathBuf};

#[allow(unused_imports)] // likewise
pub use self::{
    cluster::Cluster,
    daemon::{Daemon, QUOTAD, counters},
    postgres::Postgres,
    raw::{Raw, code},
    redis::{Redis, redis_backend, redis_table},
    sentinel::{MASTER_NAME, SentinelSet},
    tls::Certs,
    wait::{SOON, wait_until, wait_until_blocking},
};

/// The path of an installed `program`.
fn require(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{program}` is not installed: run ./scripts/test.sh, which installs it")
        })
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True if anything (a socket file too) is at `p`.
pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// The body of `GET path` from the HTTP server at `addr` (`host:port`),
/// e.g. quotad's `/metrics`.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}
