//! The bypass suite: request smuggling, path and encoding tricks, protocol tricks. Every attack
//! is sent to the real proxy over a real socket (raw bytes for HTTP/1, curl and hyper's client for
//! HTTP/2) and must be denied (403) or refused (400 / 431); and the backend must never see a
//! request for anything the policy does not allow.

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
use proxy::config::PeerRef;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: public-only}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public(/.*)?"}
        - {method: POST, path: /public/submit}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: by-host}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/.*", host: "public\\.example"}
"#;

/// What an attack must end in.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    /// Denied by policy: 403.
    Denied,
    /// Refused as malformed or ambiguous: 400 (or 431), and the connection closed.
    Rejected,
    /// Refused because too large: 431.
    TooLarge,
    /// Exactly these statuses, in order (pipelines).
    Statuses(Vec<u16>),
}

struct Attack {
    name: &'static str,
    bytes: Vec<u8>,
    want: Want,
}

const H: &str = "Host: public.example\r\nConnection: close\r\n";

fn get(name: &'static str, target: &str, want: Want) -> Attack {
    Attack { name, bytes: format!("GET {target} HTTP/1.1\r\n{H}\r\n").into_bytes(), want }
}

fn bytes(name: &'static str, b: impl Into<Vec<u8>>, want: Want) -> Attack {
    Attack { name, bytes: b.into(), want }
}

/// A request smuggled inside another: it must never reach the backend.
const SMUGGLED: &str = "GET /private HTTP/1.1\r\nHost: public.example\r\n\r\n";

fn smuggle(name: &'static str, headers: &str, body: &str) -> Attack {
    let b = format!("POST /public/submit HTTP/1.1\r\nHost: public.example\r\n{headers}\r\n{body}{SMUGGLED}");
    Attack { name, bytes: b.into_bytes(), want: Want::Rejected }
}

fn http1_attacks() -> Vec<Attack> {
    use Want::*;
    let v = vec![
        // Path and encoding tricks.
        get("dot-dot", "/public/../private", Denied),
        get("encoded dot-dot", "/public/%2e%2e/private", Denied),
        get("encoded dot-dot, upper case", "/public/%2E%2E/private", Denied),
        get("half-encoded dot-dot", "/public/.%2e/private", Denied),
        get("half-encoded dot-dot, other half", "/public/%2e./private", Denied),
        get("dot then dot-dot", "/public/./../private", Denied),
        get("double slash then dot-dot", "/public//../private", Denied),
        get("leading double slash", "//private", Denied),
        get("path parameter then dot-dot", "/public;x/../private", Denied),
        get("dot-dot beyond the root", "/../../public/../private", Denied),
        get("encoded slash", "/public/..%2fprivate", Rejected),
        get("encoded slash, upper case", "/public/..%2Fprivate", Rejected),
        get("encoded backslash", "/public/..%5cprivate", Rejected),
        get("raw backslash", "/public/..\\private", Rejected),
        get("double-encoded dot-dot", "/public/%252e%252e/private", Rejected),
        get("double-encoded slash", "/public/..%252fprivate", Rejected),
        get("encoded NUL", "/public/%00/../private", Rejected),
        get("overlong UTF-8 dots", "/public/%c0%ae%c0%ae/private", Rejected),
        get("overlong UTF-8 dots, 3 bytes", "/public/%e0%80%ae%e0%80%ae/private", Rejected),
        get("overlong UTF-8 slash", "/public/..%c0%afprivate", Rejected),
        get("IIS %u escapes", "/public/%u002e%u002e/private", Rejected),
        get("bad escape", "/public/%zz", Rejected),
        get("truncated escape", "/public/%2", Rejected),
        get("dot-dot with path parameter", "/public/..;/private", Rejected),
        get("fragment", "/public/x#/../../private", Rejected),
        get("absolute-form to a denied path", "http://public.example/private", Denied),
        get("absolute-form with dot-dot", "http://public.example/public/../private", Denied),
        get("asterisk-form", "*", Denied),
        bytes("lower-case method", format!("get /public/x HTTP/1.1\r\n{H}\r\n"), Denied),
        bytes("raw NUL in the target", format!("GET /public/\0/../private HTTP/1.1\r\n{H}\r\n"), Rejected),
        bytes("tab in the target", format!("GET /public/\t/../private HTTP/1.1\r\n{H}\r\n"), Rejected),
        bytes("space in the target", format!("GET /public/ /private HTTP/1.1\r\n{H}\r\n"), Rejected),
        bytes(
            "raw overlong UTF-8 in the target",
            [b"GET /public/\xc0\xae\xc0\xae/private HTTP/1.1\r\n".as_slice(), H.as_bytes(), b"\r\n"].concat(),
            Rejected,
        ),
        bytes("HTTP/0.9 request", "GET /private\r\n\r\n", Rejected),
        bytes("CONNECT to another host", format!("CONNECT private.example:443 HTTP/1.1\r\n{H}\r\n"), Denied),
        // Request smuggling.
        smuggle("CL.TE", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
        smuggle("TE.CL", "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "0\r\n\r\n"),
        smuggle("two different Content-Lengths", "Content-Length: 0\r\nContent-Length: 45\r\n", ""),
        smuggle("two equal Content-Lengths", "Content-Length: 0\r\nContent-Length: 0\r\n", ""),
        smuggle("Content-Length list", "Content-Length: 0, 0\r\n", ""),
        smuggle("signed Content-Length", "Content-Length: +0\r\n", ""),
        smuggle("Transfer-Encoding chunked, identity", "Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
        smuggle("Transfer-Encoding identity", "Transfer-Encoding: identity\r\n", ""),
        smuggle("Transfer-Encoding folded", "Transfer-Encoding:\r\n chunked\r\n", "0\r\n\r\n"),
        smuggle("Transfer-Encoding xchunked", "Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
        smuggle("two Transfer-Encodings", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
        smuggle("space before the colon", "Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
        smuggle("negative chunk size", "Transfer-Encoding: chunked\r\n", "-1\r\n\r\n"),
        smuggle("hex-prefixed chunk size", "Transfer-Encoding: chunked\r\n", "0x0\r\n\r\n"),
        smuggle("chunk size overflow", "Transfer-Encoding: chunked\r\n", "10000000000000000\r\n\r\n"),
        smuggle("chunk longer than its size", "Transfer-Encoding: chunked\r\n", "1\r\nab\r\n0\r\n\r\n"),
        smuggle("bare LF after the chunk size", "Transfer-Encoding: chunked\r\n", "0\n\r\n"),
        smuggle("NUL in a header value", "X-A: a\0b\r\nContent-Length: 0\r\n", ""),
        bytes(
            "TE in HTTP/1.0",
            format!(
                "POST /public/submit HTTP/1.0\r\nHost: public.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            Rejected,
        ),
        bytes(
            "bare LF line ends",
            "GET /public/x HTTP/1.1\nHost: public.example\n\nGET /private HTTP/1.1\n\n",
            Rejected,
        ),
        bytes("bare CR in a header", "GET /public/x HTTP/1.1\r\nHost: public.example\rX: y\r\n\r\n", Rejected),
        bytes(
            "obs-fold in a header",
            "GET /public/x HTTP/1.1\r\nHost: public.example\r\nX-A: 1\r\n\t2\r\n\r\n",
            Rejected,
        ),
        bytes(
            "two Host headers",
            "GET /public/x HTTP/1.1\r\nHost: public.example\r\nHost: private.example\r\n\r\n",
            Rejected,
        ),
        bytes(
            "Host with userinfo",
            "GET /public/x HTTP/1.1\r\nHost: public.example@private.example\r\nConnection: close\r\n\r\n",
            Rejected,
        ),
        bytes(
            "body on an Upgrade request",
            format!(
                "GET /public/x HTTP/1.1\r\nHost: public.example\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            Rejected,
        ),
        bytes(
            "head over the size limit",
            format!("GET /public/x HTTP/1.1\r\nHost: public.example\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000)),
            TooLarge,
        ),
        bytes(
            "too many headers",
            format!(
                "GET /public/x HTTP/1.1\r\nHost: public.example\r\n{}\r\n",
                (0..150).map(|i| format!("X-{i}: v\r\n")).collect::<String>()
            ),
            TooLarge,
        ),
        // Pipelining: each request is judged on its own.
        bytes(
            "pipelined allowed then denied",
            "GET /public/a HTTP/1.1\r\nHost: public.example\r\n\r\nGET /private HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
            Statuses(vec![200, 403]),
        ),
        bytes(
            "denied request whose body looks like a request",
            format!(
                "POST /private HTTP/1.1\r\nHost: public.example\r\nContent-Length: {}\r\n\r\n{SMUGGLED}GET /public/b HTTP/1.1\r\n{H}\r\n",
                SMUGGLED.len()
            ),
            Statuses(vec![403, 200]),
        ),
        bytes(
            "h2c upgrade then HTTP/2 frames",
            "GET /public/c HTTP/1.1\r\nHost: public.example\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            Statuses(vec![200, 400]),
        ),
    ];
    v
}

/// Host tricks against the listener whose rule requires `Host: public.example`.
fn host_attacks() -> Vec<Attack> {
    use Want::*;
    vec![
        bytes(
            "absolute-form authority wins over Host",
            "GET http://private.example/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
            Denied,
        ),
        bytes("no Host at all", "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n", Denied),
        bytes(
            "Host with a trailing dot",
            "GET /x HTTP/1.1\r\nHost: public.example.\r\nConnection: close\r\n\r\n",
            Denied,
        ),
        bytes("Host with a port", "GET /x HTTP/1.1\r\nHost: public.example:80\r\nConnection: close\r\n\r\n", Denied),
        bytes(
            "allowed host (control)",
            "GET /x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
            Statuses(vec![200]),
        ),
    ]
}

fn check(a: &Attack, out: &[u8]) -> Result<(), String> {
    let got = statuses(out);
    let text = String::from_utf8_lossy(out);
    let ok = match &a.want {
        Want::Denied => got == vec![403] && text.contains("Access denied\r\n"),
        Want::Rejected => got == vec![400],
        Want::TooLarge => got == vec![431],
        Want::Statuses(s) => &got == s,
    };
    if ok { Ok(()) } else { Err(format!("{}: want {:?}, got {got:?}: {text:?}", a.name, a.want)) }
}

async fn run_all(addr: std::net::SocketAddr, attacks: Vec<Attack>) -> Vec<String> {
    let tasks: Vec<_> = attacks
        .into_iter()
        .map(|a| {
            tokio::spawn(async move {
                let out = raw(addr, &a.bytes, Duration::from_secs(3)).await;
                check(&a, &out)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    failures
}

fn fixture_listeners() -> Vec<L> {
    vec![
        L { name: "server", source: PeerRef::Identity(2), destination: pod("server"), port: 80, h2_upstream: false },
        L { name: "api", source: PeerRef::Identity(2), destination: pod("api"), port: 80, h2_upstream: false },
        L { name: "server-h2", source: PeerRef::Identity(2), destination: pod("server"), port: 80, h2_upstream: true },
        L { name: "api-h2", source: PeerRef::Identity(2), destination: pod("api"), port: 80, h2_upstream: true },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_bypass_attempts_are_denied_or_refused() {
    let eps = [endpoint("server", &[("app", "server")], "10.0.0.1"), endpoint("api", &[("app", "api")], "10.0.0.2")];
    let fx = Fixture::new(&[POLICY], &eps, &fixture_listeners()).await;
    let attacks = http1_attacks();
    let hosts = host_attacks();
    let total = attacks.len() + hosts.len();
    let mut failures = run_all(fx.addr("server"), attacks).await;
    failures.extend(run_all(fx.addr("api"), hosts).await);
    assert!(
        failures.is_empty(),
        "{} of {total} attacks got through or were answered wrongly:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(total >= 60, "{total}");
    // The backend only ever saw what the policy allows, in the form the proxy judged.
    for t in fx.h1.targets() {
        assert!(t.starts_with("/public/") || t == "/x", "the backend saw {t}");
        assert!(
            !t.contains("..") && !t.contains('%') && !t.contains("//"),
            "un-normalised target reached the backend: {t}"
        );
    }
    let forwarded = fx.h1.targets().len();
    assert_eq!(forwarded, 5, "{:?}", fx.h1.targets());
    // Every refusal left a flow record that says why.
    let flows = fx.flows();
    assert!(flows.iter().any(|f| f.drop_reason == Some(porin_flow::flow::DropReason::MalformedRequest)
        && f.summary.contains("encoded slash")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_bypass_attempts_are_denied_or_refused() {
    let eps = [endpoint("server", &[("app", "server")], "10.0.0.1"), endpoint("api", &[("app", "api")], "10.0.0.2")];
    let fx = Fixture::new(&[POLICY], &eps, &fixture_listeners()).await;
    let a = fx.addr("server-h2");
    let h2 = ["--http2-prior-knowledge", "--path-as-is"];
    let cases: &[(&str, u16)] = &[
        ("/public/../private", 403),
        ("/public/%2e%2e/private", 403),
        ("/public/%2E%2e/private", 403),
        ("/public//../private", 403),
        ("/public/..%2fprivate", 400),
        ("/public/%252e%252e/private", 400),
        ("/public/%c0%ae%c0%ae/private", 400),
        ("/public/..;/private", 400),
        ("/public/ok", 200),
    ];
    for (path, want) in cases {
        let r = curl(a, path, &h2).await;
        assert_eq!(r.status, *want, "h2 {path}: {r:?}");
    }
    // :authority decides; a Host header that disagrees with it is refused.
    let api = fx.addr("api-h2");
    assert_eq!(curl(api, "/x", &["--http2-prior-knowledge", "-H", "Host: public.example"]).await.status, 200);
    assert_eq!(curl(api, "/x", &["--http2-prior-knowledge", "-H", "Host: private.example"]).await.status, 403);
    let status = h2_request(api, "http://public.example/x", &[("host", "private.example")]).await;
    assert_eq!(status, 400);
    let status = h2_request(api, "http://private.example/x", &[("host", "public.example")]).await;
    assert_eq!(status, 400);
    for t in fx.h2.targets() {
        assert!(t.starts_with("/public/ok") || t == "/x", "the backend saw {t}");
    }
}

/// One request with hyper's HTTP/2 client (which, unlike curl, sends a `Host` header beside
/// `:authority` when asked to).
async fn h2_request(addr: std::net::SocketAddr, uri: &str, headers: &[(&str, &str)]) -> u16 {
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    send.send_request(req).await.unwrap().status().as_u16()
}
