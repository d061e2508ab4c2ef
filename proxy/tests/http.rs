//! The proxy with real clients (curl over HTTP/1.1 and h2c) and real hyper backends.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

mod common;

use std::time::Duration;

use common::*;
use porin_flow::flow::{DropReason, Flow, HttpProtocol, L7Type, TrafficDirection, Verdict};
use proxy::config::PeerRef;

const STARWARS_L7: &str = include_str!("../../config/examples/starwars/l3-l4-l7.yaml");

fn starwars_listeners() -> Vec<L> {
    vec![
        L {
            name: "tiefighter",
            source: pod("tiefighter"),
            destination: pod("deathstar"),
            port: 80,
            h2_upstream: false,
        },
        L {
            name: "tiefighter-h2",
            source: pod("tiefighter"),
            destination: pod("deathstar"),
            port: 80,
            h2_upstream: true,
        },
        L { name: "xwing", source: pod("xwing"), destination: pod("deathstar"), port: 80, h2_upstream: false },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starwars_l7_over_http1_and_h2c() {
    let fx = Fixture::new(&[STARWARS_L7], &starwars(), &starwars_listeners()).await;
    let tie = fx.addr("tiefighter");
    for (extra, h2) in [(vec![], false), (vec!["--http2-prior-knowledge"], true)] {
        let addr = if h2 { fx.addr("tiefighter-h2") } else { tie };
        let mut args = extra.clone();
        args.extend(["-X", "POST"]);
        let r = curl(addr, "/v1/request-landing", &args).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "POST /v1/request-landing 0\n");
        let mut args = extra.clone();
        args.extend(["-X", "PUT"]);
        let r = curl(addr, "/v1/exhaust-port", &args).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.body, "Access denied\r\n");
    }
    // The backends saw the allowed requests only, each over the protocol asked for.
    assert_eq!(fx.h1.targets(), vec!["/v1/request-landing"]);
    assert_eq!(fx.h2.targets(), vec!["/v1/request-landing"]);
    assert_eq!(fx.h2.last().unwrap().version, "HTTP/2.0");
    // The xwing is not allowed to the deathstar at all: every request is denied.
    let r = curl(fx.addr("xwing"), "/v1/request-landing", &["-X", "POST"]).await;
    assert_eq!(r.status, 403);
    assert_eq!(fx.h1.targets().len(), 1);

    // Flow records: request + response for the allowed, one DROPPED request for each denial.
    let flows = fx.flows();
    fn l7(f: &Flow) -> (Verdict, L7Type, &str, u16, HttpProtocol) {
        let l = f.l7.as_ref().unwrap();
        let h = l.http.as_ref().unwrap();
        (f.verdict, l.kind, h.method.as_str(), h.code, h.protocol)
    }
    let got: Vec<_> = flows.iter().map(l7).collect();
    let (fwd, drop) = (Verdict::Forwarded, Verdict::Dropped);
    let (req, resp) = (L7Type::Request, L7Type::Response);
    let (h1, h2) = (HttpProtocol::Http11, HttpProtocol::Http2);
    assert_eq!(
        got,
        vec![
            (fwd, req, "POST", 0, h1),
            (fwd, resp, "POST", 200, h1),
            (drop, req, "PUT", 0, h1),
            (fwd, req, "POST", 0, h2),
            (fwd, resp, "POST", 200, h2),
            (drop, req, "PUT", 0, h2),
            (drop, req, "POST", 0, h1),
        ]
    );
    let req = &flows[0];
    assert_eq!(req.source.pod_name, "tiefighter");
    assert_eq!(req.destination.pod_name, "deathstar");
    assert!(req.source.labels.contains(&"k8s:class=tiefighter".to_owned()), "{:?}", req.source.labels);
    assert_eq!(req.traffic_direction, TrafficDirection::Ingress);
    assert_eq!(req.policy.as_deref(), Some("default/rule1 spec.ingress[0]"));
    assert!(req.l7.as_ref().unwrap().http.as_ref().unwrap().url.ends_with("/v1/request-landing"));
    let resp = &flows[1];
    assert!(resp.is_reply && resp.source.pod_name == "deathstar" && resp.l7.as_ref().unwrap().latency_ns > 0);
    assert_eq!(flows[2].drop_reason, Some(DropReason::PolicyDenied));
    assert_eq!(flows[6].summary, "ingress policy drops the connection: no rule allows it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_survives_denials_and_bodies_stream() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: upload}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /upload}
        - {method: GET, path: "/(ok|big|status/.*)"}
"#;
    let eps =
        [endpoint("server", &[("app", "server")], "10.0.0.1"), endpoint("client", &[("app", "client")], "10.0.0.2")];
    let fx = Fixture::new(
        &[policy],
        &eps,
        &[L { name: "c", source: pod("client"), destination: pod("server"), port: 80, h2_upstream: false }],
    )
    .await;
    let a = fx.addr("c");
    // curl reuses one connection across URLs: denied requests (with bodies) in between do not break it.
    let out = run(
        "curl",
        vec![
            "-sS".into(),
            "--max-time".into(),
            "10".into(),
            "-w".into(),
            "%{http_code} %{num_connects}\n".into(),
            "-o".into(),
            "/dev/null".into(),
            format!("http://{a}/ok"),
            "--next".into(),
            "-sS".into(),
            "-w".into(),
            "%{http_code} %{num_connects}\n".into(),
            "-o".into(),
            "/dev/null".into(),
            "--data-binary".into(),
            "0123456789".into(),
            format!("http://{a}/denied"),
            "--next".into(),
            "-sS".into(),
            "-w".into(),
            "%{http_code} %{num_connects}\n".into(),
            "-o".into(),
            "/dev/null".into(),
            format!("http://{a}/ok"),
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, vec!["200 1", "403 0", "200 0"], "{text} {}", String::from_utf8_lossy(&out.stderr));

    // A 1 MiB chunked upload and a 1 MiB download stream through.
    let dir = TempDir::new();
    let f = dir.0.join("up");
    std::fs::write(&f, vec![b'a'; 1 << 20]).unwrap();
    let r =
        curl(a, "/upload", &["-H", "Transfer-Encoding: chunked", "--data-binary", &format!("@{}", f.display())]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "POST /upload 1048576\n"));
    let r = curl(a, "/big", &[]).await;
    assert_eq!((r.status, r.body.len()), (200, 1 << 20));

    // Expect: 100-continue: allowed → the body is sent after 100; denied → 403 before the body.
    let r = curl(a, "/upload", &["-H", "Expect: 100-continue", "--data-binary", &format!("@{}", f.display())]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "POST /upload 1048576\n"), "{}", r.headers);
    assert!(r.headers.contains("100 Continue"), "{}", r.headers);
    let r = curl(a, "/nope", &["-H", "Expect: 100-continue", "--data-binary", &format!("@{}", f.display())]).await;
    assert_eq!(r.status, 403);
    assert!(!r.headers.contains("100 Continue"), "{}", r.headers);
    // Expect never reaches the upstream (the proxy answered it).
    assert!(fx.h1.seen.lock().unwrap().iter().all(|s| s.header("expect").is_none()));
    // Upstream status codes pass through.
    assert_eq!(curl(a, "/status/404", &[]).await.status, 404);
    assert_eq!(curl(a, "/status/204", &[]).await.status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_judged_then_tunnelled() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ws}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /ws/chat, headers: ["Upgrade: websocket"]}
        - {method: GET, path: /plain}
"#;
    let eps = [endpoint("server", &[("app", "server")], "10.0.0.1")];
    let fx = Fixture::new(
        &[policy],
        &eps,
        &[L { name: "c", source: PeerRef::Identity(2), destination: pod("server"), port: 80, h2_upstream: false }],
    )
    .await;
    let a = fx.addr("c");
    let handshake = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: server\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    // Allowed: 101, then bytes flow both ways untouched (a masked WebSocket text frame, echoed).
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(handshake("/ws/chat").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let frame = [0x81u8, 0x85, 1, 2, 3, 4, b'h' ^ 1, b'e' ^ 2, b'l' ^ 3, b'l' ^ 4, b'o' ^ 1];
    s.write_all(&frame).await.unwrap();
    let mut echoed = vec![0u8; frame.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, frame);
    // Denied: 403, no tunnel, and what follows on the connection is parsed (and judged) as HTTP.
    let out = raw(
        a,
        format!("{}GET /plain HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n", handshake("/ws/admin"))
            .as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(statuses(&out), vec![403, 200], "{}", String::from_utf8_lossy(&out));
    assert_eq!(fx.h1.targets(), vec!["/ws/chat", "/plain"]);
    // h2c upgrade is never honoured: the request goes on as HTTP/1.1 without the Upgrade.
    let out = raw(a, b"GET /plain HTTP/1.1\r\nHost: server\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /plain HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n", Duration::from_secs(2)).await;
    assert_eq!(statuses(&out), vec![200, 200], "{}", String::from_utf8_lossy(&out));
    let last = fx.h1.seen.lock().unwrap()[2].clone();
    assert!(last.header("upgrade").is_none() && last.header("http2-settings").is_none(), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded_and_host_is_kept() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hosts}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/.*", host: "api\\.example\\.com"}
"#;
    let eps = [endpoint("server", &[("app", "server")], "10.0.0.1")];
    let fx = Fixture::new(
        &[policy],
        &eps,
        &[
            L { name: "h1", source: PeerRef::Identity(2), destination: pod("server"), port: 80, h2_upstream: false },
            L { name: "h2", source: PeerRef::Identity(2), destination: pod("server"), port: 80, h2_upstream: true },
        ],
    )
    .await;
    let r = curl(
        fx.addr("h1"),
        "/x",
        &[
            "-H",
            "Host: api.example.com",
            "-H",
            "Connection: keep-alive, X-Secret",
            "-H",
            "X-Secret: 1",
            "-H",
            "Keep-Alive: 5",
            "-H",
            "Proxy-Connection: x",
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let s = fx.h1.last().unwrap();
    assert_eq!(s.header("host"), Some("api.example.com"));
    for h in ["x-secret", "keep-alive", "proxy-connection"] {
        assert!(s.header(h).is_none(), "{h} forwarded: {s:?}");
    }
    assert_eq!(curl(fx.addr("h1"), "/x", &["-H", "Host: other.example.com"]).await.status, 403);
    // h2c: :authority is the host; a request from HTTP/2 to an HTTP/2 upstream keeps it.
    let r = curl(fx.addr("h2"), "/x", &["--http2-prior-knowledge", "-H", "Host: api.example.com"]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(curl(fx.addr("h2"), "/x", &["--http2-prior-knowledge"]).await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_judged_then_tunnelled() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: connect}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: CONNECT, host: "db\\.internal:5432"}
        - {method: GET, path: /plain}
"#;
    let eps = [endpoint("server", &[("app", "server")], "10.0.0.1")];
    let fx = Fixture::new(
        &[policy],
        &eps,
        &[L { name: "c", source: PeerRef::Identity(2), destination: pod("server"), port: 80, h2_upstream: false }],
    )
    .await;
    let a = fx.addr("c");
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(statuses(&buf[..n]), vec![200], "{}", String::from_utf8_lossy(&buf[..n]));
    s.write_all(b"\x00\x01raw tunnel bytes").await.unwrap();
    let mut echoed = vec![0u8; 18];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"\x00\x01raw tunnel bytes");
    // Another target: denied, and the bytes after it are HTTP again.
    let out = raw(a, b"CONNECT other.internal:22 HTTP/1.1\r\nHost: other.internal:22\r\n\r\nGET /plain HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n", Duration::from_secs(2)).await;
    assert_eq!(statuses(&out), vec![403, 200], "{}", String::from_utf8_lossy(&out));
    let targets = fx.h1.targets();
    assert_eq!(targets, vec!["db.internal:5432", "/plain"], "{targets:?}");
}

/// Audit mode is the judging side's: the deathstar's policy in audit mode lets through what it
/// would deny (recorded AUDIT, with the drop reason it would have had); the tiefighter's audit mode
/// does not loosen the deathstar's policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_forwards_what_the_audited_side_would_deny() {
    let audited = |who: &str| {
        starwars()
            .into_iter()
            .map(|mut e| {
                e.policy_audit_mode = e.name == who;
                e
            })
            .collect::<Vec<_>>()
    };
    let fx = Fixture::new(&[STARWARS_L7], &audited("deathstar"), &starwars_listeners()).await;
    let r = curl(fx.addr("tiefighter"), "/v1/exhaust-port", &["-X", "PUT"]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // The xwing has no L3/L4 allow: with the deathstar audited, it goes through too.
    let r = curl(fx.addr("xwing"), "/v1/request-landing", &["-X", "POST"]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(fx.addr("tiefighter"), "/v1/request-landing", &["-X", "POST"]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(fx.h1.targets(), vec!["/v1/exhaust-port", "/v1/request-landing", "/v1/request-landing"]);
    let flows = fx.flows();
    let got: Vec<_> = flows
        .iter()
        .map(|f| (f.verdict, f.drop_reason, f.l7.as_ref().unwrap().kind, f.source.pod_name.as_str()))
        .collect();
    let (audit, fwd) = (Verdict::Audit, Verdict::Forwarded);
    let denied = Some(DropReason::PolicyDenied);
    let (req, resp) = (L7Type::Request, L7Type::Response);
    assert_eq!(
        got,
        vec![
            (audit, denied, req, "tiefighter"),
            (audit, denied, resp, "deathstar"),
            (audit, denied, req, "xwing"),
            (audit, denied, resp, "deathstar"),
            (fwd, None, req, "tiefighter"),
            (fwd, None, resp, "deathstar"),
        ]
    );
    assert!(flows[0].summary.contains("HTTP rule"), "{:?}", flows[0].summary);
    assert!(flows[2].summary.contains("drops the connection"), "{:?}", flows[2].summary);

    // The client's audit mode is not the server's: the deathstar still denies the PUT.
    let fx = Fixture::new(&[STARWARS_L7], &audited("tiefighter"), &starwars_listeners()).await;
    let r = curl(fx.addr("tiefighter"), "/v1/exhaust-port", &["-X", "PUT"]).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(fx.h1.targets().is_empty());
    assert_eq!(fx.flows()[0].verdict, Verdict::Dropped);
}
