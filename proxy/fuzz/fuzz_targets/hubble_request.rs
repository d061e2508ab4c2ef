//! Untrusted Hubble API requests (protobuf bytes, as a client sends them) through decoding and the
//! filter compiler (label selectors, name patterns, regexes, status prefixes, addresses): no panic,
//! and a compiled request judges a flow without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use porin_flow::flow::{Flow, FlowEndpoint, HttpInfo, Layer7};
use porin_hubble::filter::Filters;
use porin_hubble::pb::observer::GetFlowsRequest;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = GetFlowsRequest::decode(data) else { return };
    let Ok(filters) = Filters::new(&req.whitelist, &req.blacklist) else { return };
    let flow = Flow {
        source: FlowEndpoint { pod_name: "tiefighter".into(), labels: vec!["k8s:org=empire".into()], ..Default::default() }.into(),
        destination_names: vec!["api.example.com.".into()],
        l7: Some(Layer7 { http: Some(HttpInfo { code: 200, method: "GET".into(), url: "http://d/v1?x".into(), ..Default::default() }), ..Default::default() }),
        ..Flow::default()
    };
    let _ = filters.admit(&flow, "id", "node");
});
