//! Test fixtures: real hyper backends on 127.0.0.1, the proxy in-process on real sockets, policy
//! inputs published to a private directory, and helpers for real clients (curl, h2load, raw TCP).
//! Everything is torn down on drop, also when a test panics.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]
#![allow(dead_code, reason = "each test binary uses a different part of the fixture")]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use policy_engine::inputs::{PolicyInputs, PolicyText};
use policy_engine::resolve::{Endpoint, Environment};
use proxy::Proxy;
use proxy::config::{Limits, ListenerConfig, PeerRef, ProxyConfig, UpstreamProtocol};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A private directory, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "porin-proxy-test-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a backend received.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: String,
    /// The request target exactly as received.
    pub(crate) target: String,
    pub(crate) version: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body_len: usize,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A real hyper server: answers `200` with `method target` (and the body's length), `/status/N`
/// with N, `/ws` upgrades with 101 and echoes bytes; records every request it sees.
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend_handle(
    seen: Arc<Mutex<Vec<Seen>>>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let target = req.uri().path_and_query().map_or_else(|| req.uri().to_string(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let is_connect = req.method() == hyper::Method::CONNECT;
    let upgrade = is_connect || (req.headers().contains_key(hyper::header::UPGRADE) && target.starts_with("/ws"));
    if upgrade {
        seen.lock().unwrap().push(Seen { method, target, version, headers, body_len: 0 });
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        if !is_connect {
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert(hyper::header::UPGRADE, "websocket".parse().unwrap());
            r.headers_mut().insert(hyper::header::CONNECTION, "upgrade".parse().unwrap());
        }
        return Ok(r);
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        method: method.clone(),
        target: target.clone(),
        version,
        headers,
        body_len: body.len(),
    });
    if let Some(code) = target.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        return Ok(r);
    }
    if target.starts_with("/slow") {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if target.starts_with("/big") {
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; 1 << 20]))));
    }
    Ok(Response::new(Full::new(Bytes::from(format!("{method} {target} {}\n", body.len())))))
}

impl Backend {
    /// HTTP/1.1 (`h2 = false`) or h2c prior knowledge.
    pub(crate) async fn start(h2: bool) -> Self {
        let sock = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = sock.accept().await else { continue };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| backend_handle(s.clone(), req));
                    let io = TokioIo::new(stream);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ =
                            hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades().await;
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    pub(crate) fn targets(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|s| s.target.clone()).collect()
    }

    pub(crate) fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }
}

/// An endpoint of the test world.
pub(crate) fn endpoint(name: &str, labels: &[(&str, &str)], ip: &str) -> Endpoint {
    Endpoint {
        name: name.into(),
        namespace: "default".into(),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ips: vec![ip.parse::<IpAddr>().unwrap()],
        named_ports: vec![],
        service_account: None,
        ..Endpoint::default()
    }
}

/// The star wars endpoints.
pub(crate) fn starwars() -> Vec<Endpoint> {
    vec![
        endpoint("deathstar", &[("org", "empire"), ("class", "deathstar")], "10.0.0.1"),
        endpoint("tiefighter", &[("org", "empire"), ("class", "tiefighter")], "10.0.0.2"),
        endpoint("xwing", &[("org", "alliance"), ("class", "xwing")], "10.0.0.3"),
    ]
}

/// Writes policy inputs where the proxy reads them, atomically (as the agent does).
pub(crate) fn publish(path: &Path, version: u64, policies: &[&str], endpoints: &[Endpoint], secrets: &[(&str, &str)]) {
    let inputs = PolicyInputs {
        version,
        policies: policies
            .iter()
            .enumerate()
            .map(|(i, t)| PolicyText { name: format!("policy-{i}.yaml"), text: (*t).to_owned() })
            .collect(),
        environment: Environment {
            endpoints: endpoints.to_vec(),
            secrets: secrets.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>(),
            ..Default::default()
        },
        node_ips: vec![],
        identities: vec![],
        prefixes: vec![],
        fqdn: Default::default(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&inputs).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A listener of the fixture.
pub(crate) struct L {
    pub(crate) name: &'static str,
    pub(crate) source: PeerRef,
    pub(crate) destination: PeerRef,
    pub(crate) port: u16,
    pub(crate) h2_upstream: bool,
}

pub(crate) fn pod(p: &str) -> PeerRef {
    PeerRef::Pod(format!("default/{p}"))
}

/// The proxy with backends and published policy.
pub(crate) struct Fixture {
    pub(crate) dir: TempDir,
    pub(crate) h1: Backend,
    pub(crate) h2: Backend,
    pub(crate) proxy: Proxy,
}

impl Fixture {
    pub(crate) async fn new(policies: &[&str], endpoints: &[Endpoint], listeners: &[L]) -> Self {
        Self::with_limits(policies, endpoints, listeners, Limits::default(), &[]).await
    }

    pub(crate) async fn with_limits(
        policies: &[&str],
        endpoints: &[Endpoint],
        listeners: &[L],
        limits: Limits,
        secrets: &[(&str, &str)],
    ) -> Self {
        Self::start(policies, endpoints, listeners, limits, secrets, None).await
    }

    /// `upstream` replaces the built-in backends as every listener's upstream.
    pub(crate) async fn start(
        policies: &[&str],
        endpoints: &[Endpoint],
        listeners: &[L],
        limits: Limits,
        secrets: &[(&str, &str)],
        upstream: Option<SocketAddr>,
    ) -> Self {
        let dir = TempDir::new();
        let (h1, h2) = (Backend::start(false).await, Backend::start(true).await);
        let snapshot = dir.0.join("snapshot.json");
        publish(&snapshot, 1, policies, endpoints, secrets);
        let cfg = ProxyConfig {
            snapshot,
            snapshot_poll_ms: 20,
            control_socket: Some(dir.0.join("proxy.sock")),
            flow_log: None,
            flow_records: true,
            metrics: None,
            dns: Default::default(),
            tunnel: None,
            listeners: listeners
                .iter()
                .map(|l| ListenerConfig {
                    name: l.name.into(),
                    listen: "127.0.0.1:0".parse().unwrap(),
                    upstream: Some(upstream.unwrap_or(if l.h2_upstream { h2.addr } else { h1.addr })),
                    transparent: None,
                    source: l.source.clone(),
                    destination: l.destination.clone(),
                    port: Some(l.port),
                    upstream_protocol: if l.h2_upstream { UpstreamProtocol::Http2 } else { UpstreamProtocol::Http1 },
                    authenticated: None,
                })
                .collect(),
            limits,
        };
        let proxy = Proxy::start(cfg).await.unwrap();
        Self { dir, h1, h2, proxy }
    }

    pub(crate) fn addr(&self, listener: &str) -> SocketAddr {
        self.proxy.addr(listener).unwrap()
    }

    pub(crate) fn snapshot_path(&self) -> PathBuf {
        self.dir.0.join("snapshot.json")
    }

    /// Flow records so far.
    pub(crate) fn flows(&self) -> Vec<porin_flow::flow::Flow> {
        self.proxy.info.shared.records.after(0, usize::MAX).0
    }

    /// Waits until the proxy enforces snapshot `version`.
    pub(crate) async fn wait_version(&self, version: u64) {
        for _ in 0..200 {
            if self.proxy.info.shared.policy.current().is_some_and(|s| s.version == version) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("snapshot {version} never came into force: {:?}", self.proxy.info.shared.policy.status());
    }
}

/// Runs a command to completion (off the runtime's threads); panics with its output if it
/// cannot start.
pub(crate) async fn run(cmd: &str, args: Vec<String>) -> std::process::Output {
    let c = cmd.to_owned();
    tokio::task::spawn_blocking(move || std::process::Command::new(&c).args(&args).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (scripts/setup.sh installs it)"))
}

/// What curl got: status, body and response headers.
#[derive(Debug)]
pub(crate) struct CurlResult {
    pub(crate) status: u16,
    pub(crate) body: String,
    pub(crate) headers: String,
}

/// curl against `addr`, with extra arguments (`--http2-prior-knowledge`, `-X PUT`, ...).
pub(crate) async fn curl(addr: SocketAddr, path: &str, extra: &[&str]) -> CurlResult {
    let dir = TempDir::new();
    let hdr = dir.0.join("h");
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "-o".into(),
        "-".into(),
        "-D".into(),
        hdr.display().to_string(),
        "-w".into(),
        "\n%{http_code}".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.push(format!("http://{addr}{path}"));
    let out = run("curl", args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    CurlResult {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
    }
}

/// Sends raw bytes, then reads until the server closes or goes quiet for `quiet`.
pub(crate) async fn raw(addr: SocketAddr, bytes: &[u8], quiet: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// Status codes of every HTTP/1 response in `bytes` (heads found by their status lines).
pub(crate) fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12).and_then(|c| c.parse().ok()))
        .filter(|c| (100..600).contains(c))
        .collect()
}
