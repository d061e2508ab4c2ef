//! `porin-ring-memory CAPACITY`: the memory a node's flow ring (the agent's
//! `porin_hubble::ring::FlowRing`, what Hubble's `GetFlows` serves) takes when it is full of HTTP
//! flows as the agent fills it: the proxy's records encoded as they go on the wire, framed 256 at a
//! time with their connections (50 clients of one server, star-wars-shaped endpoints, a distinct URL
//! per request), read back with the agent's own conversion and pushed into the ring, twice its
//! capacity (so it is full and has let flows go). Prints the resident memory it grew by, per flow.
//! The agent's allocator (jemalloc).

use porin_flow::flow::{FlowEndpoint, HttpProtocol, TrafficDirection, Verdict};
use porin_flow::stream::{self, DetailRef, RecordRef, WireEnd, WireEnds};
use porin_hubble::ring::FlowRing;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Records per frame (about what 20 ms of a busy proxy holds).
const FRAME: usize = 256;
/// Client connections.
const CONNS: u64 = 50;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages = statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0);
    pages * 4096
}

fn ends(id: u64) -> WireEnds {
    let end = |identity, pod: &str, app: &str, ip: [u8; 4], port| WireEnd {
        endpoint: Some(FlowEndpoint {
            identity,
            namespace: "default".into(),
            pod_name: pod.into(),
            labels: vec![
                format!("k8s:app.kubernetes.io/name={app}"),
                "k8s:class=spaceship".into(),
                "k8s:io.kubernetes.pod.namespace=default".into(),
                "k8s:org=empire".into(),
            ],
        }),
        ip: ip.to_vec(),
        port,
        names: vec![],
    };
    let client = u8::try_from(id % 200).unwrap_or(0);
    WireEnds {
        source: Some(end(1001, &format!("tiefighter-{id}"), "tiefighter", [10, 244, 1, client], 40000 + id as u32)),
        destination: Some(end(1002, "deathstar-6fb5694d48-5hmds", "deathstar", [10, 244, 2, 7], 80)),
        direction: TrafficDirection::Ingress.number(),
        id,
        spiffe_id: String::new(),
    }
}

fn main() -> Result<(), String> {
    let capacity: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(c)) => c,
        _ => return Err("usage: porin-ring-memory CAPACITY".into()),
    };
    let ring = FlowRing::new(capacity);
    let before = resident_bytes();
    let total = 2 * capacity as u64;
    let (mut seq, mut buf, mut bytes) = (0u64, Vec::new(), Vec::new());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    while seq < total {
        bytes.clear();
        let first = seq;
        let mut conns = std::collections::BTreeSet::new();
        while seq < total && seq - first < FRAME as u64 {
            let request = seq / 2;
            let conn = request % CONNS + 1;
            conns.insert(conn);
            let url = format!("http://deathstar.default.svc.cluster.local/v1/request-landing?ship={request}");
            let reply = seq % 2 == 1;
            seq += 1;
            RecordRef {
                seq,
                ends: conn,
                time_ns: now + seq * 1000,
                reply,
                verdict: Verdict::Forwarded,
                reason: None,
                udp: false,
                latency_ns: if reply { 250_000 } else { 0 },
                policy: Some("default/rule1 ingress"),
                summary: "",
                detail: DetailRef::Http {
                    method: "POST",
                    url: &url,
                    protocol: HttpProtocol::Http11,
                    code: if reply { 200 } else { 0 },
                },
                service: None,
            }
            .encode(&mut bytes);
        }
        let frame = stream::frame(1, seq, 0, conns.into_iter().map(ends).collect(), &bytes)
            .map_err(|e| format!("a frame: {e}"))?;
        let batch =
            stream::read_frame(&mut frame.as_slice(), &mut buf).map_err(|e| format!("reading a frame back: {e}"))?;
        let (flows, errors) = batch.into_flows();
        if let Some(e) = errors.first() {
            return Err(format!("a record did not convert: {e}"));
        }
        ring.extend(flows);
    }
    let grown = resident_bytes().saturating_sub(before);
    let kept = ring.status().num_flows;
    println!(
        "ring of {capacity} flows: {kept} kept of {total} pushed; resident memory grew {:.1} MiB ({} bytes per flow)",
        grown as f64 / (1024.0 * 1024.0),
        grown / kept.max(1)
    );
    Ok(())
}
