//! Phase one of a request: reading its head. What the request is ([`Kind`]: gRPC, a tunnel, held
//! by the framing guard), which authority it names and the one normalised target it is judged and
//! forwarded with ([`Target`]). A head that could be read two ways is refused with the reason
//! ([`Refused`]). No policy, no I/O.

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Version};
use porin_flow::flow::HttpProtocol;

use crate::normalize::normalize;
use crate::reply::is_grpc;

/// What a request is, before anything in it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// The version the client spoke.
    pub protocol: HttpProtocol,
    /// A gRPC call (answered with `grpc-status`).
    pub grpc: bool,
    /// A CONNECT.
    pub connect: bool,
    /// An HTTP/1 upgrade or CONNECT that becomes a tunnel if allowed and if the upstream switches.
    /// `Upgrade: h2c` never does: a tunnel to an upstream speaking HTTP/2 after the upgrade would
    /// carry requests the proxy never sees (the request goes on as HTTP/1.1).
    pub tunnel: bool,
    /// The HTTP/1 framing guard holds the connection's next bytes until this request's upgrade is
    /// decided (the guard's own test: CONNECT or any `Upgrade` header).
    pub held: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

fn tokens(h: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &[u8]> {
    h.get_all(name).into_iter().flat_map(|v| v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii))
}

impl Kind {
    /// Reads the kind of a request on an HTTP/2 (`http2`) or HTTP/1 connection.
    pub fn of(method: &Method, version: Version, headers: &HeaderMap, http2: bool) -> Self {
        let connect = method == Method::CONNECT;
        let upgrade = headers.contains_key(header::UPGRADE);
        let h2c = tokens(headers, header::UPGRADE).any(|t| t.to_ascii_lowercase().starts_with(b"h2c"));
        let connection_upgrade = tokens(headers, header::CONNECTION).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
        Self {
            protocol: match (http2, version) {
                (true, _) => HttpProtocol::Http2,
                (false, Version::HTTP_10) => HttpProtocol::Http10,
                _ => HttpProtocol::Http11,
            },
            grpc: is_grpc(headers),
            connect,
            tunnel: !http2 && (connect || (!h2c && upgrade && connection_upgrade)),
            held: !http2 && (connect || upgrade),
            expect_continue: headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")),
        }
    }
}

/// Where a request goes: the authority it names and its normalised path and query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The URI's authority (HTTP/2 `:authority`, HTTP/1 absolute-form), else `Host`.
    pub authority: Option<String>,
    /// Normalised path and query (empty for CONNECT): judged and forwarded in this one form.
    pub path_and_query: String,
}

impl Target {
    /// `http://authority/path?query`, as flow records show it.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority.as_deref().unwrap_or(""), self.path_and_query)
    }
}

/// Why a head was refused, and the URL as far as it could be read (for the record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub why: String,
    /// The URL as seen.
    pub url: String,
}

/// Reads the authority and the target of a request of `kind`.
pub fn target(parts: &Parts, kind: Kind) -> Result<Target, Refused> {
    let raw = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let refuse = |why: &str| Refused { why: why.to_owned(), url: raw.to_owned() };
    // Authority: the URI's wins over `Host`, as RFC 9112 §3.2.2 and RFC 9113 §8.3.1 say; an
    // HTTP/2 request whose `Host` disagrees with its `:authority` is refused (the upstream could
    // believe either).
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(h), None) => Some(h.to_str().map_err(|_| refuse("Host header is not visible ASCII"))?.to_owned()),
        _ => return Err(refuse("more than one Host header")),
    };
    let uri_authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    if kind.protocol == HttpProtocol::Http2
        && let (Some(a), Some(h)) = (&uri_authority, &host)
        && !a.eq_ignore_ascii_case(h)
    {
        return Err(refuse("Host header differs from :authority"));
    }
    let authority = uri_authority.or(host);
    // Checked before judging, so that an allowed request is never refused afterwards for a value
    // that could not be forwarded.
    if let Some(a) = &authority
        && (a.is_empty() || a.contains('@') || a.parse::<http::uri::Authority>().is_err())
    {
        return Err(refuse("invalid authority"));
    }
    let path_and_query = if kind.connect {
        String::new()
    } else {
        normalize(raw).map_err(|e| refuse(&format!("request target refused: {e}")))?.path_and_query
    };
    let target = Target { authority, path_and_query };
    if kind.protocol == HttpProtocol::Http2 && kind.connect {
        return Err(Refused { why: "CONNECT over HTTP/2 is not supported".into(), url: target.url() });
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn read(p: &Parts, http2: bool) -> (Kind, Result<Target, Refused>) {
        let kind = Kind::of(&p.method, p.version, &p.headers, http2);
        (kind, target(p, kind))
    }

    #[test]
    fn kinds() {
        let ws = parts("GET", "/ws", Version::HTTP_11, &[("upgrade", "websocket"), ("connection", "Upgrade")]);
        let k = Kind::of(&ws.method, ws.version, &ws.headers, false);
        assert!(k.tunnel && k.held && !k.connect);
        let h2c = parts("GET", "/", Version::HTTP_11, &[("upgrade", "h2c"), ("connection", "upgrade, http2-settings")]);
        let k = Kind::of(&h2c.method, h2c.version, &h2c.headers, false);
        assert!(!k.tunnel && k.held, "h2c is never tunnelled, but the guard holds it");
        let no_conn = parts("GET", "/", Version::HTTP_11, &[("upgrade", "websocket")]);
        assert!(!Kind::of(&no_conn.method, no_conn.version, &no_conn.headers, false).tunnel);
        let c = parts("CONNECT", "db:5432", Version::HTTP_11, &[]);
        let k = Kind::of(&c.method, c.version, &c.headers, false);
        assert!(k.connect && k.tunnel && k.held);
        let g = parts("POST", "/pkg.Svc/M", Version::HTTP_2, &[("content-type", "application/grpc+proto")]);
        let k = Kind::of(&g.method, g.version, &g.headers, true);
        assert!(k.grpc && !k.tunnel && !k.held && k.protocol == HttpProtocol::Http2);
        let old = parts("GET", "/", Version::HTTP_10, &[("expect", "100-Continue")]);
        let k = Kind::of(&old.method, old.version, &old.headers, false);
        assert!(k.expect_continue && k.protocol == HttpProtocol::Http10);
    }

    #[test]
    fn the_uri_authority_wins_and_targets_are_normalised() {
        let p = parts("GET", "http://api:8080/a/../b/./c?x=1", Version::HTTP_11, &[("host", "other")]);
        let t = read(&p, false).1.unwrap();
        assert_eq!(t, Target { authority: Some("api:8080".into()), path_and_query: "/b/c?x=1".into() });
        assert_eq!(t.url(), "http://api:8080/b/c?x=1");
        let p = parts("GET", "/x", Version::HTTP_11, &[("host", "svc")]);
        assert_eq!(read(&p, false).1.unwrap().authority.as_deref(), Some("svc"));
    }

    #[test]
    fn heads_that_read_two_ways_are_refused() {
        let why = |p: &Parts, h2: bool| read(p, h2).1.unwrap_err().why;
        assert_eq!(
            why(&parts("GET", "/", Version::HTTP_11, &[("host", "a"), ("host", "b")]), false),
            "more than one Host header"
        );
        assert_eq!(
            why(&parts("GET", "http://a/", Version::HTTP_2, &[("host", "b")]), true),
            "Host header differs from :authority"
        );
        assert_eq!(why(&parts("GET", "/", Version::HTTP_11, &[("host", "u@h")]), false), "invalid authority");
        let r = read(&parts("GET", "/a%2fb", Version::HTTP_11, &[]), false).1.unwrap_err();
        assert!(r.why.starts_with("request target refused") && r.url == "/a%2fb", "{r:?}");
        let r = read(&parts("CONNECT", "db:5432", Version::HTTP_2, &[]), true).1.unwrap_err();
        assert_eq!(r.why, "CONNECT over HTTP/2 is not supported");
    }
}
