//! The node's service map: one static page (`ui/index.html`, embedded in the binary; no CDN, no
//! build step) and the JSON it polls, read-only over the node's flow ring.
//!
//! * `GET /` — the page: workloads as nodes, edges coloured by verdict, each edge's recent flows.
//! * `GET /api/flows?after=N&limit=M` — `{"node", "next", "lost", "flows"}`: the flows numbered
//!   above `N` (at most `M`, default and cap [`MAX_PAGE`]) as Hubble's `Flow` in protobuf JSON;
//!   `next` is the `after` of the next poll, `lost` how many the ring let go before this reader
//!   got them.
//!
//! Flow fields come from the network (URLs, DNS names): the page builds its DOM from text nodes
//! only, and the server sends a content security policy that allows no other origin.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::convert;
use crate::ring::FlowRing;

/// The page.
pub const INDEX_HTML: &str = include_str!("../ui/index.html");

/// Most flows one poll returns.
pub const MAX_PAGE: usize = 2000;

/// The page's content security policy: its own inline script and style, requests to its origin.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One poll's answer.
#[derive(Serialize)]
struct Page<'a> {
    node: &'a str,
    next: u64,
    lost: u64,
    flows: Vec<crate::pb::flow::Flow>,
}

/// Most connections served at once (more wait in the listen queue).
const MAX_CONNECTIONS: usize = 64;

/// Serves the page and its API on `listener` until the task is dropped. A request must name the
/// server by address or `localhost` (`Host`): a page elsewhere that rebinds a DNS name to this
/// address cannot read the node's flows.
pub async fn serve(ring: Arc<FlowRing>, node: Arc<str>, listener: tokio::net::TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "service map: accept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (ring, node) = (ring.clone(), node.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = if host_is_local(req.headers()) {
                    answer(&ring, &node, req.method(), req.uri())
                } else {
                    plain(StatusCode::MISDIRECTED_REQUEST, "Host must be an address or localhost\n")
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // A connection lives for a minute at most (the page polls with short requests).
            if let Ok(Err(e)) = tokio::time::timeout(std::time::Duration::from_secs(60), served).await {
                tracing::debug!(error = %e, "service map connection");
            }
        });
    }
}

/// Whether the request's `Host` names an address or `localhost` (not a DNS name that could have
/// been rebound to this address).
fn host_is_local(headers: &hyper::HeaderMap) -> bool {
    let Some(host) = headers.get(hyper::header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// The answer to one request.
pub fn answer(ring: &FlowRing, node: &Arc<str>, method: &Method, uri: &hyper::Uri) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match uri.path() {
        "/" | "/index.html" => {
            reply(StatusCode::OK, "text/html; charset=utf-8", Bytes::from_static(INDEX_HTML.as_bytes()))
        }
        "/api/flows" => match Query::parse(uri.query().unwrap_or("")) {
            Ok(q) => flows(ring, node, q),
            Err(why) => plain(StatusCode::BAD_REQUEST, &format!("{why}\n")),
        },
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn flows(ring: &FlowRing, node: &Arc<str>, q: Query) -> Response<Full<Bytes>> {
    // A cursor past the newest flow is from before the agent restarted (its ring starts over):
    // start over with it.
    let after = if q.after > ring.last() { 0 } else { q.after };
    let read = ring.after(after, q.limit);
    let next = read.flows.last().map_or(read.last.max(after), |(n, _)| *n);
    let flows = read.flows.iter().map(|(n, f)| convert::to_pb(f, ring.uuid(*n), node)).collect();
    let page = Page { node, next, lost: read.missed, flows };
    match serde_json::to_vec(&page) {
        Ok(body) => reply(StatusCode::OK, "application/json", Bytes::from(body)),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("encoding flows: {e}\n")),
    }
}

/// `after` and `limit`.
#[derive(Debug, PartialEq, Eq)]
struct Query {
    after: u64,
    limit: usize,
}

impl Query {
    fn parse(query: &str) -> Result<Self, String> {
        let mut q = Self { after: 0, limit: MAX_PAGE };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = |what: &str| value.parse::<u64>().map_err(|_| format!("{what}: {value:?} is not a number"));
            match key {
                "after" => q.after = number("after")?,
                "limit" => q.limit = usize::try_from(number("limit")?).unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE),
                _ => {}
            }
        }
        Ok(q)
    }
}

fn reply(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        h.insert(hyper::header::CONTENT_TYPE, v);
    }
    h.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    h.insert(hyper::header::X_CONTENT_TYPE_OPTIONS, hyper::header::HeaderValue::from_static("nosniff"));
    h.insert(hyper::header::CONTENT_SECURITY_POLICY, hyper::header::HeaderValue::from_static(CSP));
    resp
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", Bytes::from(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use porin_flow::flow::{Flow, Verdict};

    fn body(resp: Response<Full<Bytes>>) -> (StatusCode, String) {
        let status = resp.status();
        let bytes = futures_lite_block(resp.into_body().collect()).map(|c| c.to_bytes()).unwrap_or_default();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn only_addresses_and_localhost_are_hosts() {
        let h = |v: &str| {
            let mut m = hyper::HeaderMap::new();
            m.insert(hyper::header::HOST, v.parse().unwrap());
            host_is_local(&m)
        };
        assert!(h("127.0.0.1:8080") && h("[::1]:9") && h("localhost:1") && h("10.0.0.1"));
        assert!(!h("evil.example:8080") && !h("127.0.0.1.nip.io"));
        assert!(!host_is_local(&hyper::HeaderMap::new()));
    }

    #[test]
    fn query_parses_and_refuses_garbage() {
        assert_eq!(Query::parse("").unwrap(), Query { after: 0, limit: MAX_PAGE });
        assert_eq!(Query::parse("after=7&limit=3&x=y").unwrap(), Query { after: 7, limit: 3 });
        assert_eq!(Query::parse("limit=0").unwrap().limit, 1);
        assert_eq!(Query::parse("limit=99999999").unwrap().limit, MAX_PAGE);
        assert!(Query::parse("after=-1").unwrap_err().contains("after"));
    }

    #[test]
    fn pages_the_ring_as_hubble_json() {
        let ring = FlowRing::new(4);
        for i in 0..6u16 {
            ring.push_numbered(|seq| Flow {
                seq,
                verdict: Verdict::Forwarded,
                summary: format!("<b>{i}</b>"),
                ..Flow::default()
            });
        }
        let node: Arc<str> = Arc::from("n1");
        let get = |uri: &str| body(answer(&ring, &node, &Method::GET, &uri.parse().unwrap()));
        let (status, text) = get("/api/flows?after=0&limit=3");
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Capacity 4: the first two went before this reader asked.
        assert_eq!(v["lost"], 2);
        assert_eq!(v["flows"].as_array().unwrap().len(), 3);
        assert_eq!(v["next"], 5);
        assert_eq!(v["flows"][0]["verdict"], "FORWARDED");
        assert_eq!(v["flows"][0]["node_name"], "n1");
        let (_, text) = get("/api/flows?after=5");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (v["next"].as_u64(), v["flows"].as_array().map(Vec::len), v["lost"].as_u64()),
            (Some(6), Some(1), Some(0))
        );
        let (_, text) = get("/api/flows?after=6");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!((v["next"].as_u64(), v["flows"].as_array().map(Vec::len)), (Some(6), Some(0)));
        // A cursor from before a restart starts over (from what the ring still holds).
        let (_, text) = get("/api/flows?after=900");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!((v["next"].as_u64(), v["flows"].as_array().map(Vec::len)), (Some(6), Some(4)));

        let (status, page) = get("/");
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains("api/flows"));
        let resp = answer(&ring, &node, &Method::GET, &"/".parse().unwrap());
        assert!(
            resp.headers()[hyper::header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("default-src 'none'")
        );
        assert_eq!(get("/api/flows?after=x").0, StatusCode::BAD_REQUEST);
        assert_eq!(get("/nope").0, StatusCode::NOT_FOUND);
        assert_eq!(body(answer(&ring, &node, &Method::POST, &"/".parse().unwrap())).0, StatusCode::METHOD_NOT_ALLOWED);
    }
}
