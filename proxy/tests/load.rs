//! Snapshot swaps under load (h2load, HTTP/1.1 and h2c), the last good snapshot, and limits that
//! keep slow or greedy clients from pinning the proxy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use proxy::config::{Limits, PeerRef};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn policy(paths: &str) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: api}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - {{method: GET, path: "{paths}"}}
"#
    )
}

fn eps() -> Vec<policy_engine::resolve::Endpoint> {
    vec![endpoint("server", &[("app", "server")], "10.0.0.1")]
}

fn listeners() -> Vec<L> {
    vec![
        L { name: "h1", source: PeerRef::Identity(2), destination: pod("server"), port: 80, h2_upstream: false },
        L { name: "h2", source: PeerRef::Identity(2), destination: pod("server"), port: 80, h2_upstream: true },
    ]
}

/// `requests: N total, N started, N done, N succeeded, N failed, N errored` and the 2xx count.
fn h2load_counts(out: &str) -> (u64, u64, u64) {
    let line = out.lines().find_map(|l| l.strip_prefix("requests:")).unwrap_or_else(|| panic!("h2load said: {out}"));
    let num = |word: &str| {
        line.split(',')
            .find(|p| p.trim().ends_with(word))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    let codes = out.lines().find(|l| l.starts_with("status codes:")).unwrap();
    let ok: u64 =
        codes.split(':').nth(1).unwrap().split(',').next().unwrap().split_whitespace().next().unwrap().parse().unwrap();
    (num("total"), num("succeeded"), ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_swaps_under_load_fail_no_request() {
    let fx = Fixture::new(&[&policy("/api/.*")], &eps(), &listeners()).await;
    let path = fx.snapshot_path();
    let loads_before = fx.proxy.info.shared.policy.status().loads;
    // Publish a new version every 5 ms while h2load runs: alternately the same rule and a rule set
    // with one more path, both allowing what the load asks for.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (stop, path) = (stop.clone(), path.clone());
        tokio::spawn(async move {
            let mut v = 2;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = if v % 2 == 0 { policy("/api/.*") } else { policy("/api/.*|/other") };
                publish(&path, v, &[&p], &eps(), &[]);
                v += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            v
        })
    };
    for (listener, extra) in [("h2", vec![]), ("h1", vec!["--h1".to_owned()])] {
        let mut args = vec!["-n".into(), "6000".into(), "-c".into(), "8".into(), "-m".into(), "4".into()];
        args.extend(extra);
        args.push(format!("http://{}/api/x", fx.addr(listener)));
        let out = run("h2load", args).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (total, succeeded, ok) = h2load_counts(&text);
        assert_eq!((total, succeeded, ok), (6000, 6000, 6000), "{listener}: {text}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = publisher.await.unwrap();
    let loads = fx.proxy.info.shared.policy.status().loads - loads_before;
    assert!(
        published > 20 && loads >= 10,
        "{published} versions published, {loads} loaded: the load did not overlap the swaps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_snapshot_applies_to_open_connections_and_bad_ones_are_refused() {
    let fx = Fixture::new(&[&policy("/a")], &eps(), &listeners()).await;
    let mut s = tokio::net::TcpStream::connect(fx.addr("h1")).await.unwrap();
    let mut ask = async |path: &str| {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: server\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        statuses(&buf[..n])
    };
    assert_eq!(ask("/a").await, vec![200]);
    assert_eq!(ask("/b").await, vec![403]);
    publish(&fx.snapshot_path(), 2, &[&policy("/b")], &eps(), &[]);
    fx.wait_version(2).await;
    // Same connection, new policy.
    assert_eq!(ask("/a").await, vec![403]);
    assert_eq!(ask("/b").await, vec![200]);
    // A corrupt file and an invalid policy are refused; version 2 keeps enforcing.
    std::fs::write(fx.snapshot_path(), b"{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let st = fx.proxy.info.shared.policy.status();
    assert_eq!(st.version, Some(2));
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("snapshot.json")), "{st:?}");
    publish(
        &fx.snapshot_path(),
        3,
        &[
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: \"99999\"}]}]}]\n",
        ],
        &eps(),
        &[],
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let st = fx.proxy.info.shared.policy.status();
    assert_eq!(st.version, Some(2));
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("port")), "{st:?}");
    assert_eq!(ask("/b").await, vec![200]);
    // The control socket reports it.
    let status = control(&fx.dir.0.join("proxy.sock"), r#"{"cmd":"status"}"#).await;
    assert_eq!(status["snapshot"]["version"], 2);
    assert!(status["snapshot"]["last_error"].is_string());
    assert_eq!(status["counters"]["denied"], 2);
}

async fn control(path: &std::path::Path, req: &str) -> serde_json::Value {
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    s.write_all(format!("{req}\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while !out.ends_with(b"\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        out.extend_from_slice(&buf[..n]);
    }
    serde_json::from_slice(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_snapshot_everything_is_denied() {
    let fx = Fixture::new(&[&policy("/a")], &eps(), &listeners()).await;
    // Simulate a proxy that starts before the agent ever published: a fresh proxy on a missing file.
    let dir = TempDir::new();
    let cfg = proxy::config::ProxyConfig::parse(&format!(
        "snapshot: {}/missing.json\nlisteners:\n- {{name: l, listen: \"127.0.0.1:0\", upstream: \"{}\", source: {{identity: 2}}, destination: {{pod: default/server}}, port: 80}}\n",
        dir.0.display(),
        fx.h1.addr
    ))
    .unwrap();
    let p = proxy::Proxy::start(cfg).await.unwrap();
    let r = curl(p.addr("l").unwrap(), "/a", &[]).await;
    assert_eq!(r.status, 403);
    let flows = p.info.shared.records.after(0, 10).0;
    assert!(flows[0].summary.contains("no policy snapshot"), "{:?}", flows[0]);
    // It appears: enforced from then on.
    publish(&dir.0.join("missing.json"), 1, &[&policy("/a")], &eps(), &[]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(curl(p.addr("l").unwrap(), "/a", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_greedy_clients_cannot_pin_the_proxy() {
    let limits = Limits {
        header_read_timeout_ms: 300,
        idle_timeout_ms: 300,
        request_timeout_ms: 150,
        max_connections: 4,
        ..Limits::default()
    };
    let fx = Fixture::with_limits(&[&policy("/.*")], &eps(), &listeners(), limits, &[]).await;
    let a = fx.addr("h1");
    // Slowloris: half a head, then nothing. Closed after the header timeout.
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("slow client was not cut off")
        .unwrap_or(0);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let _ = n;
    // A client that connects and says nothing at all: the same.
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("silent client was not cut off")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t.elapsed() < Duration::from_secs(3));
    // An idle h2c connection (no streams) is closed after the idle timeout.
    let mut s = tokio::net::TcpStream::connect(fx.addr("h2")).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let t = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle h2 connection kept open");
    assert!(t.elapsed() >= Duration::from_millis(250), "{:?}", t.elapsed());
    // More connections than allowed: the newcomer is served, the oldest idle connection makes room.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = tokio::net::TcpStream::connect(a).await.unwrap();
        c.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let n = c.read(&mut buf).await.unwrap();
        assert_eq!(statuses(&buf[..n]), vec![200]);
        held.push(c);
    }
    let mut extra = tokio::net::TcpStream::connect(a).await.unwrap();
    extra.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(statuses(&buf[..n]), vec![200], "the newcomer is served");
    let n = tokio::time::timeout(Duration::from_secs(2), held[0].read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "the oldest idle connection was let go");
    let counters = || serde_json::to_value(fx.proxy.info.counters()).unwrap();
    assert!(counters()["connections_shed"].as_u64().unwrap() >= 1);
    // Every connection busy (slow requests in flight): a newcomer is refused at once.
    held.remove(0);
    held.push(extra);
    for c in &mut held {
        c.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut refused = tokio::net::TcpStream::connect(a).await.unwrap();
    let _ = refused.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let n = tokio::time::timeout(Duration::from_secs(2), refused.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "a connection over the limit was served while every other was busy");
    assert!(counters()["connections_refused"].as_u64().unwrap() >= 1);
    drop(held);
    // Their slow requests end (504) and free the table.
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A slow upstream: 504 after the request timeout, and the connection goes on.
    let r = curl(a, "/slow", &[]).await;
    assert_eq!(r.status, 504, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_breaks_off_its_body_is_blamed_not_the_upstream() {
    let fx = Fixture::new(&[&policy("/.*")], &eps(), &listeners()).await;
    let counters = || serde_json::to_value(fx.proxy.info.counters()).unwrap();
    // Promise 100 kB, send 10 bytes, stop sending.
    let mut s = tokio::net::TcpStream::connect(fx.addr("h1")).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789").await.unwrap();
    s.shutdown().await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while counters()["downstream_errors"] == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = counters();
    assert_eq!(c["downstream_errors"], 1, "{c}");
    assert_eq!(c["upstream_errors"], 0, "{c}");
    let f = fx.flows().into_iter().find(|f| f.verdict == porin_flow::flow::Verdict::Error).expect("an error record");
    assert!(f.summary.contains("client request body failed"), "{}", f.summary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_upstream_is_slow_gets_a_504_and_a_record() {
    let limits = Limits { request_timeout_ms: 150, ..Limits::default() };
    let fx = Fixture::with_limits(&[&policy("/.*")], &eps(), &listeners(), limits, &[]).await;
    let out = raw(
        fx.addr("h1"),
        b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        Duration::from_millis(600),
    )
    .await;
    assert_eq!(statuses(&out), vec![504], "{}", String::from_utf8_lossy(&out));
    let f = fx.flows().into_iter().find(|f| f.verdict == porin_flow::flow::Verdict::Error).expect("an error record");
    assert_eq!(f.l7.unwrap().http.unwrap().code, 504);
    assert!(f.summary.contains("did not answer"), "{}", f.summary);
}

/// The record stream under load: a follower connected before the load gets every record once, in
/// order, the same as the `flows` answer; one that comes back with an old run's number (a
/// restart it did not see) reads from the oldest; the stream outlives no reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_stream_delivers_every_record_under_load() {
    use porin_flow::stream::StreamReader;
    let fx = Fixture::new(&[&policy("/api/.*")], &eps(), &listeners()).await;
    let socket = fx.dir.0.join("proxy.sock");
    const N: u64 = 3000;
    // Requests and responses: two records each, some denied (one record each).
    let expected = 2 * N + 200;
    let follower = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || {
            let mut r = StreamReader::connect(&socket, 0, 0).unwrap();
            let mut flows = Vec::new();
            let mut missed = 0;
            while u64::try_from(flows.len()).unwrap() + missed < expected {
                let b = r.next_batch().unwrap();
                missed += b.missed;
                let (f, errors) = b.into_flows();
                assert!(errors.is_empty(), "{errors:?}");
                flows.extend(f);
            }
            (flows, missed)
        })
    };
    let args = |n: u64, path: &str| {
        ["-n", &n.to_string(), "-c", "8", "-m", "4", "--h1", &format!("http://{}{path}", fx.addr("h1"))]
            .map(str::to_owned)
            .to_vec()
    };
    let out = String::from_utf8_lossy(&run("h2load", args(N, "/api/x")).await.stdout).into_owned();
    assert_eq!(h2load_counts(&out), (N, N, N), "{out}");
    let out = String::from_utf8_lossy(&run("h2load", args(200, "/denied")).await.stdout).into_owned();
    assert_eq!(h2load_counts(&out).0, 200, "{out}");
    let (streamed, missed) = tokio::time::timeout(Duration::from_secs(30), follower).await.unwrap().unwrap();
    assert_eq!(missed, 0, "the backlog holds 8192: nothing should have been let go");
    let seqs: Vec<u64> = streamed.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, (1..=expected).collect::<Vec<_>>(), "every record once, in order");
    assert_eq!(streamed, fx.flows(), "the stream says what the flows answer says");
    let denied = streamed.iter().filter(|f| f.verdict == porin_flow::flow::Verdict::Dropped).count();
    assert_eq!(denied, 200);
    // Another run's number: read from the oldest, not from "after 5000".
    let mut r = StreamReader::connect(&socket, 5000, 1).unwrap();
    let b = tokio::task::spawn_blocking(move || r.next_batch().unwrap()).await.unwrap();
    assert_eq!(b.records.first().map(|r| r.seq), Some(1));
    // More readers than the proxy serves at once are refused, by name.
    let held: Vec<_> = (0..porin_flow::control::MAX_STREAMS).map(|_| StreamReader::connect(&socket, 0, 0)).collect();
    let refused = StreamReader::connect(&socket, 0, 0).unwrap_err().to_string();
    assert!(refused.contains("already streaming"), "{refused}");
    drop(held);
    // Their threads notice the hang-up at their next write (a heartbeat at the latest).
    tokio::time::sleep(porin_flow::stream::HEARTBEAT * 2).await;
    assert!(StreamReader::connect(&socket, 0, 0).is_ok());
}

/// Long URLs make long records: frames stay within their byte budget, every record still arrives,
/// and a proxy that goes away ends its streams instead of feeding heartbeats forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_stream_splits_long_records_and_ends_with_its_proxy() {
    use porin_flow::stream::{FRAME_BYTES, StreamReader};
    let fx = Fixture::new(&[&policy("/api/.*")], &eps(), &listeners()).await;
    let socket = fx.dir.0.join("proxy.sock");
    // 300 records of ~50 KB: ~15 MB, within the backlog's 16 MiB for long records (more would
    // let the first go before this reader, which connects afterwards, asks).
    const N: u64 = 150;
    let long = format!("/api/{}", "x".repeat(50_000));
    let args = ["-n", &N.to_string(), "-c", "4", "--h1", &format!("http://{}{long}", fx.addr("h1"))].map(str::to_owned);
    let out = String::from_utf8_lossy(&run("h2load", args.to_vec()).await.stdout).into_owned();
    assert_eq!(h2load_counts(&out), (N, N, N), "{out}");
    let read = tokio::task::spawn_blocking(move || {
        let mut r = StreamReader::connect(&socket, 0, 0).unwrap();
        let (mut frames, mut seqs, mut missed) = (0, Vec::new(), 0);
        while seqs.len() + missed < usize::try_from(2 * N).unwrap() {
            let b = r.next_batch().unwrap();
            missed += usize::try_from(b.missed).unwrap();
            let size = prost::Message::encoded_len(&b);
            assert!(size <= FRAME_BYTES + 200_000, "a frame of {size} bytes");
            frames += 1;
            let (flows, errors) = b.into_flows();
            assert!(errors.is_empty(), "{errors:?}");
            assert!(flows.iter().all(|f| f.l7.as_ref().unwrap().http.as_ref().unwrap().url.ends_with(&long)));
            seqs.extend(flows.iter().map(|f| f.seq));
        }
        (frames, (seqs, r))
    });
    let (frames, seqs) = tokio::time::timeout(Duration::from_secs(60), read).await.unwrap().unwrap();
    let (seqs, mut r) = seqs;
    assert_eq!(seqs, (1..=2 * N).collect::<Vec<_>>());
    assert!(frames >= 3, "{} records of ~50 KB in {frames} frames", 2 * N);
    // The proxy goes away: its stream ends (at the next tick), it does not heartbeat on.
    drop(fx);
    let ended = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        while r.next_batch().is_ok() {
            assert!(t.elapsed() < Duration::from_secs(5), "the stream outlived its proxy");
        }
    });
    tokio::time::timeout(Duration::from_secs(15), ended).await.unwrap().unwrap();
}
