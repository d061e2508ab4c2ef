//! What the proxy answers itself — denials, refusals, upstream failures — in plain HTTP or, for a
//! gRPC request, as a trailers-only reply; and the response body that carries either these or the
//! upstream's. Nothing here decides anything.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};

use crate::upstream::UpstreamBody;

/// The body of the denial (Cilium's, byte for byte).
pub const ACCESS_DENIED: &str = "Access denied\r\n";
/// `grpc-message` of a gRPC denial: the same text, percent-encoded as gRPC requires.
pub const GRPC_ACCESS_DENIED: &str = "Access%20denied%0D%0A";

/// gRPC status codes the proxy answers with (`google.rpc.Code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum GrpcCode {
    /// The upstream did not answer in time.
    DeadlineExceeded = 4,
    /// Policy denies the call.
    PermissionDenied = 7,
    /// The request was malformed or ambiguous.
    Internal = 13,
    /// The upstream could not be reached or failed.
    Unavailable = 14,
}

/// Whether an HTTP/1 connection stays open after a local answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// The client may send its next request.
    KeepAlive,
    /// `Connection: close`: the connection may hold bytes the proxy will not read.
    Close,
}

/// A response body: from upstream, or made here.
pub enum ProxyBody {
    /// Streamed from the upstream.
    Upstream(UpstreamBody),
    /// Local (denials, errors); `None` is empty.
    Local(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Upstream(b) => Pin::new(b).poll_frame(cx),
            Self::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(b) => b.is_end_stream(),
            Self::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(b) => b.size_hint(),
            Self::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Whether a request is gRPC (its answers then carry `grpc-status`).
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: &str, connection: Connection) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Local(Some(Bytes::copy_from_slice(body.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if connection == Connection::Close {
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// A gRPC trailers-only reply (`:status 200` + `grpc-status` in one HEADERS frame).
pub fn grpc(code: GrpcCode, message: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Local(None));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code as u16));
    h.insert("grpc-message", HeaderValue::from_static(message));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let r = text(StatusCode::FORBIDDEN, ACCESS_DENIED, Connection::Close);
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["connection"], "close");
        assert!(
            text(StatusCode::FORBIDDEN, ACCESS_DENIED, Connection::KeepAlive).headers().get("connection").is_none()
        );
        let g = grpc(GrpcCode::PermissionDenied, GRPC_ACCESS_DENIED);
        assert_eq!((g.status(), &g.headers()["grpc-status"]), (StatusCode::OK, &HeaderValue::from_static("7")));
        assert!(g.body().is_end_stream(), "trailers-only: no body");
    }
}
