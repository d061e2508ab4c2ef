//! Phase three of a request: an allowed request on its way upstream. Hop-by-hop headers go, the
//! normalised target and the authority become the upstream request's URI (`Host` for HTTP/1.1,
//! `:authority` for h2c); an upgrade or CONNECT that the upstream accepts is spliced into a tunnel.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::h1guard::GuardShared;
use crate::head::{Kind, Target};

/// Headers that belong to one hop (RFC 9110 §7.6.1) and are never forwarded, plus `Expect`
/// (this proxy answers `100 Continue` itself, when the request is allowed and its body is read).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "trailer", "expect"];

/// Which message's hop-by-hop headers are stripped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// A request: `TE: trailers` stays (gRPC needs it end to end); a tunnel request keeps
    /// `Connection: upgrade` + `Upgrade`.
    Request {
        /// The request becomes a tunnel if allowed.
        tunnel: bool,
    },
    /// A response.
    Response,
}

/// Removes hop-by-hop headers, and those the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap, hop: Hop) {
    let (keep_upgrade, keep_te_trailers) = match hop {
        Hop::Request { tunnel } => (tunnel, true),
        Hop::Response => (false, false),
    };
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    let te_trailers = keep_te_trailers
        && h.get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers")));
    let upgrade = keep_upgrade.then(|| h.get(header::UPGRADE).cloned()).flatten();
    for n in named {
        h.remove(n);
    }
    // Most messages carry none of them: look once, remove only what is there.
    let present: Vec<HeaderName> = h.keys().filter(|k| HOP_BY_HOP.contains(&k.as_str())).cloned().collect();
    for n in present {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(u) = upgrade {
        h.insert(header::UPGRADE, u);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The upstream request: the judged target, the authority (`fallback` when the client named
/// none), HTTP/1.1 or h2c (`h2`). Errors say why the values cannot be forwarded.
pub fn upstream_request(
    mut parts: Parts,
    body: Incoming,
    kind: Kind,
    target: &Target,
    h2: bool,
    fallback: &str,
) -> Result<Request<Incoming>, String> {
    let authority = target.authority.as_deref().unwrap_or(fallback);
    parts.uri = if kind.connect {
        parts.uri
    } else if h2 {
        parts.headers.remove(header::HOST);
        Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(target.path_and_query.as_str())
            .build()
            .map_err(|e| format!("invalid authority: {e}"))?
    } else {
        let host = HeaderValue::from_str(authority).map_err(|e| format!("invalid authority: {e}"))?;
        parts.headers.insert(header::HOST, host);
        Uri::try_from(target.path_and_query.as_str()).map_err(|e| format!("request target refused: {e}"))?
    };
    parts.version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    if !h2 {
        parts.headers.remove(header::TE);
    }
    Ok(Request::from_parts(parts, body))
}

/// Tells the HTTP/1 guard what became of an upgrade / CONNECT request: refused unless
/// [`UpgradeDecision::accept`] was called, also when the request ends early.
pub struct UpgradeDecision(Option<Arc<GuardShared>>);

impl UpgradeDecision {
    /// The decision the guard waits for on a request of `kind` (none unless it holds bytes).
    pub fn for_request(kind: Kind, guard: Option<&Arc<GuardShared>>) -> Self {
        Self(if kind.held { guard.cloned() } else { None })
    }

    /// The tunnel is open: the guard lets the bytes through.
    pub fn accept(mut self) {
        if let Some(g) = self.0.take() {
            g.decide_upgrade(true);
        }
    }
}

impl Drop for UpgradeDecision {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.decide_upgrade(false);
        }
    }
}

/// hyper's handle on the connection of a request that carries `Upgrade` (or is a CONNECT). When
/// the request is not tunnelled and the connection ends right after it, hyper hands the connection
/// over through this handle instead of shutting it down; shutting it down here lets the framing
/// guard send its pending refusal. Dropping the holder without [`PendingUpgrade::take`] arranges that.
pub struct PendingUpgrade(Option<hyper::upgrade::OnUpgrade>);

impl PendingUpgrade {
    /// Takes hyper's handle from a request the guard holds.
    pub fn of(req: &mut Request<Incoming>, kind: Kind) -> Self {
        Self(kind.held.then(|| hyper::upgrade::on(req)))
    }

    /// The client side of the connection, for the tunnel.
    pub fn take(&mut self) -> Option<hyper::upgrade::OnUpgrade> {
        self.0.take()
    }
}

impl Drop for PendingUpgrade {
    fn drop(&mut self) {
        if let Some(on) = self.0.take() {
            tokio::spawn(async move {
                if let Ok(upgraded) = on.await {
                    use tokio::io::AsyncWriteExt as _;
                    if let Err(e) = TokioIo::new(upgraded).shutdown().await {
                        tracing::debug!(error = %e, "Connection not shut down after a refused upgrade");
                    }
                }
            });
        }
    }
}

/// Splices the two sides of an accepted tunnel until either ends.
pub fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(error = %e, "Tunnel ended");
                }
            }
            Err(e) => crate::log_limited!(info, error = %e, "Upgrade failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("te", "trailers, gzip"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        let mut resp = h.clone();
        strip_hop_by_hop(&mut h, Hop::Request { tunnel: false });
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!((&h["x-kept"], &h["te"]), (&HeaderValue::from_static("yes"), &HeaderValue::from_static("trailers")));
        strip_hop_by_hop(&mut resp, Hop::Response);
        assert_eq!(resp.keys().map(HeaderName::as_str).collect::<Vec<_>>(), vec!["x-kept"]);
        let mut ws = headers(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("expect", "100-continue")]);
        strip_hop_by_hop(&mut ws, Hop::Request { tunnel: true });
        assert_eq!(
            (&ws["upgrade"], &ws["connection"]),
            (&HeaderValue::from_static("websocket"), &HeaderValue::from_static("upgrade"))
        );
        assert!(ws.get("expect").is_none());
    }
}
