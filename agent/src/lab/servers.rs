//! Built-in servers for lab pods: an HTTP responder with canned routes (hyper), a UDP echo and a TCP
//! echo server. They run inside a pod's network namespace (`porin lab serve`), listen on both IPv4
//! and IPv6, and write a ready file once every socket is bound.

use std::convert::Infallible;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UdpSocket};

/// One canned HTTP route.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Method (exact).
    pub method: String,
    /// Path (exact, without the query).
    pub path: String,
    /// Status code (default 200).
    #[serde(default)]
    pub status: Option<u16>,
    /// Response body; `{client}` is replaced with the address the request came from.
    #[serde(default)]
    pub body: String,
}

/// The servers of one pod.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// HTTP responder.
    #[serde(default)]
    pub http: Option<HttpSpec>,
    /// UDP echo port.
    #[serde(default)]
    pub udp_echo: Option<u16>,
    /// TCP echo port.
    #[serde(default)]
    pub tcp_echo: Option<u16>,
}

/// HTTP responder settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Port.
    pub port: u16,
    /// Routes; anything else is 404.
    #[serde(default)]
    pub routes: Vec<Route>,
}

fn any_addr(port: u16) -> SocketAddr {
    // Dual-stack: an IPv6 wildcard socket also accepts IPv4 (bindv6only = 0).
    SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
}

async fn respond(
    routes: Arc<Vec<Route>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let found = routes.iter().find(|r| r.method == req.method().as_str() && r.path == req.uri().path());
    let resp = match found {
        Some(r) => {
            // An IPv4 client of the dual-stack socket shows as ::ffff:a.b.c.d.
            let ip = match peer.ip() {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
                v4 => v4,
            };
            Response::builder()
                .status(StatusCode::from_u16(r.status.unwrap_or(200)).unwrap_or(StatusCode::OK))
                .body(Full::new(Bytes::from(r.body.replace("{client}", &ip.to_string()))))
        }
        None => Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::from_static(b"Not found\n"))),
    };
    Ok(resp.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// Runs the servers until killed; writes `ready` once all sockets are bound.
pub fn run(spec: ServerSpec, ready: Option<PathBuf>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        if let Some(h) = spec.http {
            let listener =
                TcpListener::bind(any_addr(h.port)).await.with_context(|| format!("bind HTTP port {}", h.port))?;
            let routes = Arc::new(h.routes);
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, peer)) = listener.accept().await else { continue };
                    let routes = routes.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| respond(routes.clone(), peer, req));
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                    });
                }
            }));
        }
        if let Some(port) = spec.udp_echo {
            let sock = UdpSocket::bind(any_addr(port)).await.with_context(|| format!("bind UDP port {port}"))?;
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                        let _ = sock.send_to(buf.get(..n).unwrap_or_default(), peer).await;
                    }
                }
            }));
        }
        if let Some(port) = spec.tcp_echo {
            let listener = TcpListener::bind(any_addr(port)).await.with_context(|| format!("bind TCP port {port}"))?;
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else { continue };
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16384];
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 || stream.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }));
        }
        if let Some(r) = ready {
            std::fs::write(&r, b"ready").with_context(|| format!("write {}", r.display()))?;
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}
