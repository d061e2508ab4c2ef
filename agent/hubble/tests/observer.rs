//! The Observer service end to end over a real Unix socket, with tonic's own client: last-N,
//! first-N, filters, follow, lost events when a follower falls behind the ring, status and nodes.

use std::sync::Arc;
use std::time::Duration;

use porin_flow::flow::{Flow, FlowEndpoint, Verdict, now_rfc3339};
use porin_hubble::pb::flow::{FlowFilter, LostEventSource};
use porin_hubble::pb::observer::get_flows_response::ResponseTypes;
use porin_hubble::pb::observer::{GetFlowsRequest, GetNodesRequest, ServerStatusRequest};
use porin_hubble::ring::FlowRing;
use porin_hubble::server::{HubbleServer, Listener, serve};

/// A socket path of this test alone, removed when dropped.
struct Socket(std::path::PathBuf);
impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap_or(&self.0));
    }
}

fn socket(name: &str) -> Socket {
    let dir = std::env::temp_dir().join(format!("porin-hubble-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Socket(dir.join("hubble.sock"))
}

fn flow(pod: &str, verdict: Verdict) -> Flow {
    Flow {
        time: now_rfc3339(),
        verdict,
        source: FlowEndpoint { pod_name: pod.into(), namespace: "default".into(), ..FlowEndpoint::default() }.into(),
        ..Flow::default()
    }
}

async fn start(name: &str, capacity: usize) -> (Arc<FlowRing>, Socket, tokio::task::JoinHandle<()>) {
    let ring = Arc::new(FlowRing::new(capacity));
    let sock = socket(name);
    let l = tokio::net::UnixListener::bind(&sock.0).unwrap();
    let server = HubbleServer::new(ring.clone(), "test-node", &format!("unix:{}", sock.0.display()));
    let task = tokio::spawn(async move {
        serve(server, Listener::Unix(l)).await.unwrap();
    });
    (ring, sock, task)
}

fn pods(responses: &[ResponseTypes]) -> Vec<String> {
    responses
        .iter()
        .filter_map(|r| match r {
            ResponseTypes::Flow(f) => f.source.as_ref().map(|s| s.pod_name.clone()),
            _ => None,
        })
        .collect()
}

async fn collect(mut s: tonic::Streaming<porin_hubble::pb::observer::GetFlowsResponse>) -> Vec<ResponseTypes> {
    let mut out = vec![];
    while let Some(r) = s.message().await.unwrap() {
        assert_eq!(r.node_name, "test-node");
        out.extend(r.response_types);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_flows_picks_filters_and_follows() {
    let (ring, sock, task) = start("follow", 100).await;
    for i in 0..10 {
        ring.push_numbered(|_| {
            flow(&format!("pod{i}"), if i % 2 == 0 { Verdict::Forwarded } else { Verdict::Dropped })
        });
    }
    let mut c = porin_hubble::client::connect(&format!("unix:{}", sock.0.display())).await.unwrap();

    let last3 = GetFlowsRequest { number: 3, ..Default::default() };
    assert_eq!(pods(&collect(c.get_flows(last3).await.unwrap().into_inner()).await), ["pod7", "pod8", "pod9"]);
    let first2 = GetFlowsRequest { number: 2, first: true, ..Default::default() };
    assert_eq!(pods(&collect(c.get_flows(first2).await.unwrap().into_inner()).await), ["pod0", "pod1"]);
    let dropped = FlowFilter { verdict: vec![porin_hubble::pb::flow::Verdict::Dropped as i32], ..Default::default() };
    let not_pod9 = FlowFilter { source_pod: vec!["default/pod9".into()], ..Default::default() };
    let req = GetFlowsRequest { number: 2, whitelist: vec![dropped], blacklist: vec![not_pod9], ..Default::default() };
    assert_eq!(pods(&collect(c.get_flows(req).await.unwrap().into_inner()).await), ["pod5", "pod7"]);

    // A bad filter is refused by name.
    let bad = FlowFilter { http_path: vec!["(".into()], ..Default::default() };
    let err = c.get_flows(GetFlowsRequest { whitelist: vec![bad], ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("http_path"), "{err}");

    // Follow: the last one, then what comes.
    let mut s =
        c.get_flows(GetFlowsRequest { number: 1, follow: true, ..Default::default() }).await.unwrap().into_inner();
    let first = s.message().await.unwrap().unwrap().response_types.unwrap();
    assert_eq!(pods(&[first]), ["pod9"]);
    ring.push_numbered(|_| flow("late", Verdict::Forwarded));
    let next = tokio::time::timeout(Duration::from_secs(5), s.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(pods(&[next.response_types.unwrap()]), ["late"]);

    let st = c.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.num_flows, st.max_flows, st.seen_flows), (11, 100, 11));
    assert!(st.uptime_ns > 0 && st.version.starts_with("porin"));
    let nodes = c.get_nodes(GetNodesRequest {}).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.len(), 1);
    assert_eq!((nodes[0].name.as_str(), nodes[0].seen_flows), ("test-node", 11));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_the_ring_outran_is_told_how_many_it_lost() {
    let (ring, sock, task) = start("lost", 4).await;
    for i in 0..10 {
        ring.push_numbered(|_| flow(&format!("p{i}"), Verdict::Forwarded));
    }
    let mut c = porin_hubble::client::connect(&format!("unix:{}", sock.0.display())).await.unwrap();
    // From the start of a ring that let six go: six lost, then the four it holds.
    let all = collect(
        c.get_flows(GetFlowsRequest { since: Some(Default::default()), ..Default::default() })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    match all.first() {
        Some(ResponseTypes::LostEvents(l)) => {
            assert_eq!((l.source, l.num_events_lost), (LostEventSource::HubbleRingBuffer as i32, 6));
        }
        other => panic!("expected lost events first, got {other:?}"),
    }
    assert_eq!(pods(&all), ["p6", "p7", "p8", "p9"]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losses_before_flows_are_told_where_they_happened() {
    use porin_hubble::ring::LostSource;
    let (ring, sock, task) = start("losses", 100).await;
    ring.push_numbered(|_| flow("before", Verdict::Forwarded));
    let mut c = porin_hubble::client::connect(&format!("unix:{}", sock.0.display())).await.unwrap();
    let mut follow = c.get_flows(GetFlowsRequest { follow: true, ..Default::default() }).await.unwrap().into_inner();
    // The follower starts at the end: nothing old is told, then a flow, a kernel loss, a flow, a
    // proxy loss.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    ring.push_numbered(|_| flow("a", Verdict::Forwarded));
    ring.lost(LostSource::PerfEventRingBuffer, 3);
    ring.lost(LostSource::PerfEventRingBuffer, 0);
    ring.push_numbered(|_| flow("b", Verdict::Forwarded));
    ring.lost(LostSource::ObserverEventsQueue, 2);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let r =
            tokio::time::timeout(std::time::Duration::from_secs(5), follow.message()).await.unwrap().unwrap().unwrap();
        seen.push(match r.response_types.unwrap() {
            ResponseTypes::Flow(f) => f.source.unwrap().pod_name,
            ResponseTypes::LostEvents(l) => format!("lost {} from {}", l.num_events_lost, l.source),
            other => panic!("{other:?}"),
        });
    }
    let (perf, queue) = (LostEventSource::PerfEventRingBuffer as i32, LostEventSource::ObserverEventsQueue as i32);
    assert_eq!(seen, ["a".to_owned(), format!("lost 3 from {perf}"), "b".to_owned(), format!("lost 2 from {queue}")]);
    // A walk through the history tells them in place too.
    let all = collect(c.get_flows(GetFlowsRequest::default()).await.unwrap().into_inner()).await;
    let told: Vec<String> = all
        .iter()
        .map(|r| match r {
            ResponseTypes::Flow(f) => f.source.as_ref().unwrap().pod_name.clone(),
            ResponseTypes::LostEvents(l) => format!("lost {}", l.num_events_lost),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(told, ["before", "a", "lost 3", "b", "lost 2"]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losses_among_flows_the_ring_let_go_are_not_told_one_by_one() {
    use porin_hubble::ring::LostSource;
    let (ring, sock, task) = start("evicted-losses", 2).await;
    ring.push_numbered(|_| flow("a", Verdict::Forwarded));
    ring.lost(LostSource::PerfEventRingBuffer, 4);
    for p in ["b", "c", "d"] {
        ring.push_numbered(|_| flow(p, Verdict::Forwarded));
    }
    let mut c = porin_hubble::client::connect(&format!("unix:{}", sock.0.display())).await.unwrap();
    let all = collect(c.get_flows(GetFlowsRequest::default()).await.unwrap().into_inner()).await;
    let told: Vec<String> = all
        .iter()
        .map(|r| match r {
            ResponseTypes::Flow(f) => f.source.as_ref().unwrap().pod_name.clone(),
            ResponseTypes::LostEvents(l) => format!("lost {} from {}", l.num_events_lost, l.source),
            other => panic!("{other:?}"),
        })
        .collect();
    // "a" and "b" are gone: the ring's own loss says so; the kernel's, noted among them, is not
    // told again.
    assert_eq!(told, [format!("lost 2 from {}", LostEventSource::HubbleRingBuffer as i32), "c".into(), "d".into()]);
    task.abort();
}
