//! Untrusted Kafka bytes, both ways. As a client's stream: split into frames as the proxy reads them,
//! each frame decoded as a request; a request that decodes gets the denial the proxy would send,
//! which must read back as the response to that very request. As a request frame on its own. As a
//! broker's answer to a request of the key and version in the first four bytes. No input may panic.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use libfuzzer_sys::fuzz_target;
use proxy::kafka::{denial, frame, request, response};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("a runtime"))
}

fuzz_target!(|data: &[u8]| {
    let ids = request::TopicIds::default();
    let judge = |f: Bytes| {
        if let Ok(req) = request::parse(f, &ids) {
            if let Some((answer, code)) = denial::denial(&req) {
                assert!(code > 0);
                response::inspect(answer, req.api_key, req.version(), req.correlation_id(), &ids)
                    .expect("a denial is a response to its own request");
            }
        }
    };
    let frames = runtime().block_on(async {
        let mut r = frame::reader(data);
        let mut frames = Vec::new();
        while let Ok(f) = frame::next(&mut r).await {
            frames.push(f);
        }
        frames
    });
    for f in frames {
        judge(f);
    }
    judge(Bytes::copy_from_slice(data));
    if let (Some(head), Some(rest)) = (data.get(..4), data.get(4..)) {
        let key = i16::from_be_bytes([head[0], head[1]]);
        let version = i16::from_be_bytes([head[2], head[3]]);
        if let Ok(api_key) = ApiKey::try_from(key) {
            let range = api_key.valid_versions();
            if (range.min..=range.max).contains(&version) {
                let _ = response::inspect(Bytes::copy_from_slice(rest), api_key, version, 0, &ids);
            }
        }
    }
});
