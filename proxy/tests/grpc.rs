//! gRPC through the proxy: a tonic server (raw-bytes codec, served by hyper over h2c) behind it,
//! Python grpcio as the client. The Cloud City guide's policy: listed methods pass with their
//! trailers, others get a trailers-only `PERMISSION_DENIED` with Cilium's message.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::{Buf as _, BufMut as _, Bytes};
use common::*;
use porin_tests::conformance_dir;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, UnaryService};
use tonic::{Request, Response, Status};

/// Messages are bytes as they are: no protobuf, no code generation.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// The Cloud City door manager: answers every method with its name and the request.
struct Door(String);

impl UnaryService<Bytes> for Door {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let method = self.0.clone();
        Box::pin(async move {
            if method == "Fail" {
                return Err(Status::not_found("no such door"));
            }
            let client = req.metadata().get("x-client").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let mut resp =
                Response::new(Bytes::from(format!("{method}: {} ({client})", String::from_utf8_lossy(req.get_ref()))));
            resp.metadata_mut().insert("x-door", "spaceport-1".parse().unwrap());
            Ok(resp)
        })
    }
}

async fn tonic_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let task = tokio::spawn(async move {
        // Connections live in this task's set: aborting the server closes them too.
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = sock.accept().await {
            conns.spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let method = req.uri().path().rsplit('/').next().unwrap_or("").to_owned();
                    Ok::<_, Infallible>(Grpc::new(RawCodec).unary(Door(method), req).await)
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

async fn call(addr: SocketAddr, method: &str) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_client.py");
    let out = run("python3", vec![script.display().to_string(), addr.to_string(), method.into(), "1".into()]).await;
    assert!(
        out.status.success(),
        "grpcio client failed (scripts/setup.sh installs grpcio): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_methods_are_judged_per_call() {
    let policy =
        std::fs::read_to_string(conformance_dir().join("policies/http/cc-door-ingress-security.yaml")).unwrap();
    let eps = [
        endpoint("cc-door-mgr", &[("app", "cc-door-mgr")], "10.0.0.1"),
        endpoint("terminal-87", &[("app", "public-terminal")], "10.0.0.2"),
    ];
    let (upstream, server) = tonic_server().await;
    let l = [L {
        name: "terminal",
        source: pod("terminal-87"),
        destination: pod("cc-door-mgr"),
        port: 50051,
        h2_upstream: true,
    }];
    let fx = Fixture::start(&[&policy], &eps, &l, proxy::config::Limits::default(), &[], Some(upstream)).await;
    let a = fx.addr("terminal");

    // Allowed: the answer and the server's trailers come through.
    let r = call(a, "/cloudcity.DoorManager/GetName").await;
    assert_eq!(r["code"], "OK", "{r}");
    assert_eq!(r["response"], "GetName: 1 (grpcio)");
    assert_eq!(r["headers"]["x-door"], "spaceport-1", "{r}");
    assert_eq!(call(a, "/cloudcity.DoorManager/GetLocation").await["code"], "OK");
    assert_eq!(call(a, "/cloudcity.DoorManager/RequestMaintenance").await["code"], "OK");
    // Denied: PERMISSION_DENIED with Cilium's message, never reaching the server.
    for m in ["SetAccessCode", "GetStatus"] {
        let r = call(a, &format!("/cloudcity.DoorManager/{m}")).await;
        assert_eq!(r["code"], "PERMISSION_DENIED", "{m}: {r}");
        assert_eq!(r["details"], "Access denied\r\n", "{m}: {r}");
    }
    // A denial is a trailers-only reply: :status 200 and grpc-status in one HEADERS frame.
    let c = curl(
        a,
        "/cloudcity.DoorManager/GetStatus",
        &["--http2-prior-knowledge", "-X", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers"],
    )
    .await;
    assert_eq!(c.status, 200);
    assert!(
        c.headers.contains("grpc-status: 7") && c.headers.contains("grpc-message: Access%20denied%0D%0A"),
        "{}",
        c.headers
    );
    assert!(c.body.is_empty());
    let flows = fx.flows();
    let denied: Vec<_> = flows
        .iter()
        .filter(|f| f.verdict == porin_flow::flow::Verdict::Dropped)
        .map(|f| f.l7.as_ref().unwrap().http.as_ref().unwrap().url.clone())
        .collect();
    assert_eq!(denied.len(), 3, "{denied:?}");
    assert!(denied.iter().all(
        |u| u.ends_with("/cloudcity.DoorManager/SetAccessCode") || u.ends_with("/cloudcity.DoorManager/GetStatus")
    ));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_from_the_server_pass_through() {
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: all-grpc}
spec:
  endpointSelector: {matchLabels: {app: door}}
  ingress:
  - toPorts:
    - ports: [{port: "50051", protocol: TCP}]
      rules:
        http: [{method: POST, path: "/cloudcity\\.DoorManager/.*"}]
"#;
    let eps = [endpoint("door", &[("app", "door")], "10.0.0.1")];
    let (upstream, server) = tonic_server().await;
    let l = [L {
        name: "any",
        source: proxy::config::PeerRef::Identity(2),
        destination: pod("door"),
        port: 50051,
        h2_upstream: true,
    }];
    let fx = Fixture::start(&[policy], &eps, &l, proxy::config::Limits::default(), &[], Some(upstream)).await;
    let r = call(fx.addr("any"), "/cloudcity.DoorManager/Fail").await;
    assert_eq!(r["code"], "NOT_FOUND", "{r}");
    assert_eq!(r["details"], "no such door");
    // Upstream gone: UNAVAILABLE, not a hang.
    server.abort();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = call(fx.addr("any"), "/cloudcity.DoorManager/GetName").await;
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
}
