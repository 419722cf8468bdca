//! A raw Unix-socket connection for speaking (and abusing) the wire
//! protocol by hand, in blocking code; reads time out after 5 s. Dropping
//! it closes the connection.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

pub struct Raw {
    stream: UnixStream,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Raw { stream }
    }

    /// Connects if something listens at `path`.
    pub fn try_connect(path: &Path) -> Option<Raw> {
        UnixStream::connect(path).ok().map(|stream| Raw { stream })
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Sends one frame: a 4-byte big-endian length, then `body`.
    pub fn send_frame(&mut self, body: &[u8]) {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        self.send_bytes(&f);
    }

    /// Sends a JSON value encoded as MessagePack.
    pub fn send(&mut self, v: Value) {
        self.send_frame(&rmp_serde::to_vec_named(&v).unwrap());
    }

    /// The next reply decoded to JSON, or `None` at end of stream.
    pub fn recv(&mut self) -> Option<Value> {
        let body = self.recv_body()?;
        Some(rmp_serde::from_slice(&body).expect("replies are MessagePack"))
    }

    /// The next reply's body, or `None` at end of stream.
    pub fn recv_body(&mut self) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).ok()?;
        let mut body = vec![0; u32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut body).ok()?;
        Some(body)
    }

    /// True once the daemon has closed the connection.
    pub fn closed(&mut self) -> bool {
        self.recv().is_none()
    }

    /// The `stats` op's counters. Its reply must be the next one: use a
    /// connection with nothing else in flight.
    pub fn counters(&mut self) -> BTreeMap<String, u64> {
        self.send(json!({"id": 1, "op": "stats"}));
        let reply = self.recv().expect("a stats reply");
        serde_json::from_value(reply["counters"].clone()).expect("counters")
    }
}

/// The `error.code` of a reply, if it is an error.
pub fn code(reply: &Value) -> Option<&str> {
    reply["error"]["code"].as_str()
}
