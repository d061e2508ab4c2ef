//! What a tunnel stream asks for: the head of an HTTP/2 `CONNECT` request (as Istio's HBONE).
//!
//! ```text
//! :method = CONNECT
//! :authority = <destination address>:<port>      (an IP literal: no names)
//! forwarded = for="<client address>:<port>"      (RFC 7239; IPv6 in brackets)
//! forwarded = for="<client address>"             (a pooled connection of the source proxy's:
//!                                                  no one client port; read as port 0)
//! ```
//!
//! Everything else is refused: another method, a name or a missing port in the authority, a
//! `:path` / `:scheme` (extended CONNECT), a missing, repeated or unparseable `forwarded`
//! header, a port 0. The parse is all that reads these bytes: the destination proxy judges what
//! it returns.

use std::net::SocketAddr;

use http::{HeaderMap, Method, Uri};

/// A stream's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The original destination (an endpoint on the receiving node).
    pub destination: SocketAddr,
    /// The original client (an endpoint on the sending node); port 0 when the stream carries
    /// a connection the source proxy pools for the client's address.
    pub client: SocketAddr,
}

/// Why a stream's head is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not `CONNECT`.
    #[error("method {0} (a tunnel stream is a CONNECT)")]
    Method(String),
    /// The authority is not `<ip>:<port>`.
    #[error("authority {0:?} is not an address and port")]
    Authority(String),
    /// A path or scheme: not a plain CONNECT.
    #[error("a CONNECT with a path or scheme (extended CONNECT) is not a tunnel stream")]
    Extended,
    /// The `forwarded` header is missing, repeated or not `for="<ip>:<port>"`.
    #[error("forwarded header: {0}")]
    Forwarded(String),
}

/// The header that names the client.
pub const FORWARDED: &str = "forwarded";

fn socket_addr(s: &str) -> Option<SocketAddr> {
    let a: SocketAddr = s.parse().ok()?;
    (a.port() != 0).then_some(a)
}

/// The client of a `forwarded: for="…"` value: an address and port, or an address alone (port 0).
fn client_addr(s: &str) -> Option<SocketAddr> {
    socket_addr(s).or_else(|| match s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().ok().map(|ip| SocketAddr::from((ip, 0))),
        None => s.parse::<std::net::Ipv4Addr>().ok().map(|ip| SocketAddr::from((ip, 0))),
    })
}

/// The value of the `forwarded` header for a client (port 0: its address alone).
pub fn forwarded_for(client: SocketAddr) -> String {
    match (client.port(), client.ip()) {
        (0, std::net::IpAddr::V4(ip)) => format!("for=\"{ip}\""),
        (0, std::net::IpAddr::V6(ip)) => format!("for=\"[{ip}]\""),
        _ => format!("for=\"{client}\""),
    }
}

impl Target {
    /// Reads a request's head.
    pub fn from_head(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Self, TargetError> {
        if method != Method::CONNECT {
            return Err(TargetError::Method(method.as_str().chars().take(32).collect()));
        }
        if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty()) {
            return Err(TargetError::Extended);
        }
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let destination =
            socket_addr(authority).ok_or_else(|| TargetError::Authority(authority.chars().take(128).collect()))?;
        let mut values = headers.get_all(FORWARDED).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(TargetError::Forwarded("exactly one is required".into()));
        };
        let text = value.to_str().map_err(|_| TargetError::Forwarded("not visible ASCII".into()))?;
        let client =
            text.strip_prefix("for=\"").and_then(|r| r.strip_suffix('"')).and_then(client_addr).ok_or_else(|| {
                TargetError::Forwarded(format!(
                    "{:?} is not for=\"<ip>:<port>\"",
                    text.chars().take(128).collect::<String>()
                ))
            })?;
        if client.is_ipv4() != destination.is_ipv4() {
            return Err(TargetError::Forwarded("client and destination of different families".into()));
        }
        Ok(Self { destination, client })
    }

    /// The request that asks for this target.
    pub fn request(&self) -> http::Request<()> {
        let mut req = http::Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = Uri::try_from(self.destination.to_string()).unwrap_or_default();
        if let Ok(v) = http::HeaderValue::try_from(forwarded_for(self.client)) {
            req.headers_mut().insert(FORWARDED, v);
        }
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str, fwd: &[&str]) -> Result<Target, TargetError> {
        let mut headers = HeaderMap::new();
        for f in fwd {
            headers.append(FORWARDED, f.parse().unwrap());
        }
        Target::from_head(&method.parse().unwrap(), &uri.parse().unwrap(), &headers)
    }

    #[test]
    fn a_stream_names_its_destination_and_client_by_address() {
        let t = head("CONNECT", "10.0.1.5:80", &["for=\"10.0.0.9:40000\""]).unwrap();
        assert_eq!(
            t,
            Target { destination: "10.0.1.5:80".parse().unwrap(), client: "10.0.0.9:40000".parse().unwrap() }
        );
        let t6 = head("CONNECT", "[fd00::5]:80", &["for=\"[fd00::9]:40000\""]).unwrap();
        assert_eq!(t6.client, "[fd00::9]:40000".parse().unwrap());
        // A pooled connection's client: the address alone.
        let pooled = head("CONNECT", "10.0.1.5:80", &["for=\"10.0.0.9\""]).unwrap();
        assert_eq!(pooled.client, "10.0.0.9:0".parse().unwrap());
        let pooled6 = head("CONNECT", "[fd00::5]:80", &["for=\"[fd00::9]\""]).unwrap();
        assert_eq!(pooled6.client, "[fd00::9]:0".parse().unwrap());
        // The request a source proxy sends reads back as the same target.
        for t in [t, t6, pooled, pooled6] {
            let req = t.request();
            assert_eq!(Target::from_head(req.method(), req.uri(), req.headers()).unwrap(), t);
        }
    }

    #[test]
    fn anything_else_is_refused() {
        let ok = ["for=\"10.0.0.9:40000\""];
        assert!(matches!(head("GET", "10.0.1.5:80", &ok), Err(TargetError::Method(_))));
        assert!(matches!(head("CONNECT", "deathstar:80", &ok), Err(TargetError::Authority(_))));
        assert!(matches!(head("CONNECT", "10.0.1.5", &ok), Err(TargetError::Authority(_))));
        assert!(matches!(head("CONNECT", "10.0.1.5:0", &ok), Err(TargetError::Authority(_))));
        assert!(matches!(head("CONNECT", "https://10.0.1.5:80/x", &ok), Err(TargetError::Extended)));
        assert!(matches!(head("CONNECT", "10.0.1.5:80", &[]), Err(TargetError::Forwarded(_))));
        assert!(matches!(head("CONNECT", "10.0.1.5:80", &[ok[0], ok[0]]), Err(TargetError::Forwarded(_))));
        for bad in [
            "for=10.0.0.9:40000",
            "for=\"10.0.0.9:0\"",
            "for=\"fd00::9\"",
            "for=\"[fd00::9\"",
            "for=\"x:1\"",
            "for=\"[fd00::9]:1\"",
            "by=\"10.0.0.9:1\"",
        ] {
            assert!(matches!(head("CONNECT", "10.0.1.5:80", &[bad]), Err(TargetError::Forwarded(_))), "{bad}");
        }
    }
}
