//! Untrusted DNS bytes, both ways: whatever a client sends is parsed as a query (and, when it
//! reads one way, answered); whatever a server sends is read as the answer to a fixed query. No
//! input may panic, and an answer the proxy builds must parse back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::dns::message::{Unjudgeable, answer, parse_query, read_answer};

/// `api.example.com. A`, id 0x1234.
const QUERY: &[u8] = &[
    0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'p', b'i', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3,
    b'c', b'o', b'm', 0, 0, 1, 0, 1,
];

fuzz_target!(|data: &[u8]| {
    match parse_query(data) {
        Ok(q) => {
            let refusal = answer(&q, hickory_proto_rcode());
            assert!(parse_query(&refusal).is_err(), "an answer is never taken for a query");
            assert!(!q.name.is_empty());
        }
        Err(Unjudgeable::Answer { reply, .. }) => assert!(reply.len() >= 12),
        Err(Unjudgeable::Drop(_)) => {}
    }
    if let Ok(q) = parse_query(QUERY) {
        if let Ok(a) = read_answer(data, &q) {
            assert_eq!(a.names.first().map(String::as_str), Some("api.example.com."));
        }
    }
});

fn hickory_proto_rcode() -> proxy::dns::message::ResponseCode {
    proxy::dns::message::ResponseCode::Refused
}
