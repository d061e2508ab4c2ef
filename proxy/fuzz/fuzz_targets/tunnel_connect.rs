//! Untrusted heads of tunnel streams (the HTTP/2 CONNECT a node proxy receives, as hyper hands it
//! over: method, URI, headers) through the one parse the destination proxy judges on: no panic;
//! what it accepts is an address pair whose own request reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::tunnel::target::{FORWARDED, Target};

fuzz_target!(|data: &[u8]| {
    // method \0 uri \0 forwarded values separated by \0 (any may be missing).
    let mut parts = data.split(|b| *b == 0);
    let (Some(method), Some(uri)) = (parts.next(), parts.next()) else { return };
    let Ok(method) = http::Method::from_bytes(method) else { return };
    let Ok(uri) = http::Uri::try_from(uri) else { return };
    let mut headers = http::HeaderMap::new();
    for value in parts.take(4) {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.append(FORWARDED, v);
        }
    }
    if let Ok(t) = Target::from_head(&method, &uri, &headers) {
        assert_ne!(t.destination.port(), 0);
        assert_ne!(t.client.port(), 0);
        assert_eq!(t.client.is_ipv4(), t.destination.is_ipv4());
        let req = t.request();
        assert_eq!(Target::from_head(req.method(), req.uri(), req.headers()), Ok(t), "a target's request reads back");
    }
});
