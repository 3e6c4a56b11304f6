//! What the fuzzers feed arbitrary bytes: the decoders every client reaches before it is
//! trusted. `fuzz/` runs each function under libFuzzer, and the corpus replay test
//! (`tests/fuzz_corpus.rs`) runs every saved input through it on every `cargo test`.
//!
//! Each function must return for any input without panicking; where a decoder accepts an
//! input, it also checks what must hold of the result (a frame within the size limit, a
//! decoded frame that survives being encoded and decoded again). Nothing here serves a
//! request.

use axum::extract::Query;
use bytes::BytesMut;
use imgate_proto::{decode, encode, ClientFrame, Encoding, FrameCodec};
use tokio_util::codec::Decoder;

/// The frame size limit the codec target runs with: small, so the limit is often hit.
const MAX_FRAME: usize = 1024;

/// The TCP length-prefixed codec, fed `data` in pieces whose size the first byte picks (a
/// frame split across reads is the common case on a socket). Frames it yields are within
/// the limit; after an error it yields nothing more (the connection is closed).
pub fn tcp_codec(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let piece = 1 + usize::from(first % 64);
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => assert!(frame.len() <= MAX_FRAME, "{} bytes", frame.len()),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// A client frame in msgpack (TCP, WebSocket binary).
pub fn frame_msgpack(data: &[u8]) {
    frame(data, Encoding::Msgpack);
}

/// A client frame in JSON (WebSocket text).
pub fn frame_json(data: &[u8]) {
    frame(data, Encoding::Json);
}

fn frame(data: &[u8], enc: Encoding) {
    if let Ok(f) = decode::<ClientFrame>(data, enc) {
        let again = encode(&f, enc).expect("a decoded frame encodes");
        let back: ClientFrame = decode(&again, enc).expect("an encoded frame decodes");
        assert_eq!(back, f);
    }
}

/// The query string of `GET /v1/messages` (polls and history) and `GET /v1/events`, as
/// axum's `Query` extractor reads it.
pub fn http_query(data: &[u8]) {
    let Ok(q) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(uri) = format!("/v1/messages?{q}").parse::<axum::http::Uri>() else {
        return;
    };
    let _ = Query::<crate::transport::http::messages::PollQuery>::try_from_uri(&uri);
    let _ = Query::<crate::transport::sse::EventsQuery>::try_from_uri(&uri);
}

/// An SSE `Last-Event-ID` (or `?after=`): `<epoch>:<seq>` or a bare seq. An epoch it
/// accepts is a valid id.
pub fn last_event_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((Some(epoch), _)) = crate::transport::sse::event_id(s) {
        assert!(imgate_proto::ids::is_valid_id(&epoch), "{epoch:?}");
    }
}

/// A fuzz target: any bytes in, a panic only for a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory under `fuzz/corpus/`.
pub const TARGETS: [(&str, Target); 5] = [
    ("tcp_codec", tcp_codec),
    ("frame_msgpack", frame_msgpack),
    ("frame_json", frame_json),
    ("http_query", http_query),
    ("last_event_id", last_event_id),
];
