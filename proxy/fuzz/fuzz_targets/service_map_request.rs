//! Untrusted request targets for the service map (`GET /api/flows?after=..&limit=..`, any path,
//! any query) through the router and the query parser, over a ring holding a flow: no panic, and
//! every answer is a complete response.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use porin_flow::flow::Flow;
use porin_hubble::ring::FlowRing;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = hyper::Uri::try_from(data) else { return };
    let ring = FlowRing::new(4);
    ring.push_numbered(|seq| Flow { seq, ..Flow::default() });
    let node: Arc<str> = Arc::from("node");
    let resp = porin_hubble::ui::answer(&ring, &node, &hyper::Method::GET, &uri);
    assert!(resp.status().as_u16() >= 200);
});
