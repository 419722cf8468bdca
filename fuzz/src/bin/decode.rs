//! Bytes -> request or error, as a connection's frame body goes through
//! `quotad::protocol::decode` (the length prefix is the codec's, not fuzzed
//! here). Never a panic; an error reply always encodes; a request decoded
//! from the bytes encodes into a frame that decodes to a request encoding
//! to the same bytes (bytes, not `==`: a NaN limit in `tenant_set` decodes,
//! and is refused later, when the record is validated); and the fast path
//! for flat maps answers exactly as the general reader does.

use quotad::config::Config;
use quotad::protocol::{DecodeError, Reply, decode, decode_general, encode_reply, encode_request};

fn main() {
    let limits = Config::builtin().limits();
    afl::fuzz!(|data: &[u8]| {
        let decoded = decode(data, &limits);
        let general = decode_general(data, &limits);
        assert_eq!(
            format!("{decoded:?}"),
            format!("{general:?}"),
            "fast and general readers"
        );
        match decoded {
            Ok(req) => {
                let mut frame = Vec::new();
                encode_request(&req, &mut frame);
                let again = decode(&frame, &limits).expect("an encoded request decodes");
                let mut frame_again = Vec::new();
                encode_request(&again, &mut frame_again);
                assert_eq!(frame, frame_again, "{req:?} -> {again:?}");
            }
            Err(DecodeError::Fatal(error)) => encode_reply(&Reply::err(0, error), &mut Vec::new()),
            Err(DecodeError::Request { id, error }) => {
                encode_reply(&Reply::err(id, error), &mut Vec::new())
            }
        }
    });
}
