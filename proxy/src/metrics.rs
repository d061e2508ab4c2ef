//! The proxy's flow records counted into the process's Hubble-named metrics
//! ([`porin_flow::metrics::HubbleMetrics`]): every record passes [`observe`] once, on the path that
//! numbers it.

use porin_flow::flow::Verdict;
use porin_flow::metrics::{HubbleMetrics, reporter};

use crate::records::{Detail, Record, Transport};

/// Counts one record.
pub fn observe(m: &HubbleMetrics, r: &Record) {
    let (protocol, layer, subtype) = match &r.detail {
        Detail::Http { .. } => ("http", "L7", "HTTP"),
        Detail::Dns(_) => ("dns", "L7", "DNS"),
        Detail::Kafka(_) => ("kafka", "L7", "Kafka"),
        // A flow that came through the mTLS tunnel (authenticated), relayed at L3/L4.
        Detail::Tunnel => ("TCP", "L3_L4", "mTLS"),
    };
    m.flow(protocol, layer, subtype, r.verdict.name());
    if r.verdict == Verdict::Dropped {
        let l4 = if r.transport == Transport::Udp { "UDP" } else { "TCP" };
        m.drop(r.reason.map_or("UNKNOWN_REASON", |d| d.name()), l4);
    }
    // Policy verdicts: each request judged at L7 (answers are not judged again).
    if !r.reply && r.reason != Some(porin_flow::flow::DropReason::MalformedRequest) {
        let direction = match r.ends.direction {
            porin_flow::flow::TrafficDirection::Egress => "egress",
            _ => "ingress",
        };
        let action = match r.verdict {
            Verdict::Dropped => "dropped",
            Verdict::Audit => "audit",
            _ => "forwarded",
        };
        m.policy_verdict(direction, protocol_match(&r.detail), action);
    }
    let reporter = reporter(r.ends.direction);
    let seconds = r.latency_ns as f64 / 1e9;
    match &r.detail {
        Detail::Http { method, code, .. } if r.reply => m.http_response(method.as_str(), *code, reporter, seconds),
        Detail::Http { method, protocol, .. } => m.http_request(method.as_str(), protocol.name(), reporter),
        Detail::Dns(d) if r.reply => m.dns_response(d.rcode, &d.qtypes, d.ips.len()),
        Detail::Dns(d) => m.dns_query(&d.qtypes),
        Detail::Kafka(k) => m.kafka(&k.topic, &k.api_key, k.error_code, reporter, r.reply.then_some(seconds)),
        Detail::Tunnel => {}
    }
}

/// The `match` label of an L7 verdict.
fn protocol_match(d: &Detail) -> &'static str {
    match d {
        Detail::Http { .. } => "l7/http",
        Detail::Dns(_) => "l7/dns",
        Detail::Kafka(_) => "l7/kafka",
        Detail::Tunnel => "l3-l4",
    }
}
