//! A strict HTTP/1 framing guard in front of hyper's server, against request smuggling.
//!
//! hyper is tolerant where the RFCs allow tolerance (a bare LF ends a line; with both
//! `Transfer-Encoding` and `Content-Length`, chunked wins). A proxy in front of other parsers must
//! not be: this guard sees every byte the client sends before hyper does, and refuses the connection
//! at the first request that any two parsers could frame differently:
//!
//! * request heads: a bare LF or CR, obs-fold continuation lines, anything httparse rejects, more than
//!   100 headers or `max_head` bytes (431), `Content-Length` twice or with a non-digit, both
//!   `Content-Length` and `Transfer-Encoding`, `Transfer-Encoding` other than exactly `chunked`
//!   (or with HTTP/1.0), two `Host` headers;
//! * chunked bodies: chunk-size lines that are not `hex[;ext]CRLF` (httparse's chunk parser), chunk
//!   data not followed by CRLF, malformed trailers.
//!
//! Heads are held back until complete and valid, so hyper never sees a rejected one; body bytes pass
//! through unchanged. After an `Upgrade` or `CONNECT` request the guard holds further bytes until the
//! service says whether the tunnel was accepted (then they pass through untouched) or not (then they
//! are the next request). On a violation the guard ends the stream (hyper runs with half-close
//! on, so requests already read are still answered); when hyper shuts the connection down the guard
//! writes `400 Bad Request` (`431` for oversized heads) with `Connection: close`, unless the service
//! already answered it (a body that broke the framing mid-request).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest chunk-size line (with extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Most headers in a head.
const MAX_HEADERS: usize = 100;
/// Bytes read from the client at a time.
const READ_BUF: usize = 8 * 1024;

/// What the service decided about an upgrade or CONNECT request.
pub mod upgrade {
    /// No upgrade pending.
    pub const NONE: u8 = 0;
    /// The request is with the service.
    pub const PENDING: u8 = 1;
    /// The tunnel is open: pass everything through.
    pub const ACCEPTED: u8 = 2;
    /// Refused: further bytes are HTTP again.
    pub const REFUSED: u8 = 3;
}

/// State shared between a guard and the service of its connection.
#[derive(Debug, Default)]
pub struct GuardShared {
    upgrade: AtomicU8,
    /// The service answered the violation itself (a request whose body broke the framing).
    answered: std::sync::atomic::AtomicBool,
    waker: Mutex<Option<Waker>>,
    violation: Mutex<Option<Violation>>,
}

/// A framing violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// HTTP status sent (400 or 431).
    pub status: u16,
    /// What was wrong.
    pub reason: String,
}

impl GuardShared {
    /// Tells the guard what became of an upgrade / CONNECT request.
    pub fn decide_upgrade(&self, accepted: bool) {
        self.upgrade.store(if accepted { upgrade::ACCEPTED } else { upgrade::REFUSED }, Ordering::SeqCst);
        if let Ok(mut w) = self.waker.lock()
            && let Some(w) = w.take()
        {
            w.wake();
        }
    }

    /// The violation that closed the connection, if any.
    pub fn violation(&self) -> Option<Violation> {
        self.violation.lock().ok().and_then(|v| v.clone())
    }

    /// Takes the violation for the service to answer (a request body broke the framing while the
    /// request was being forwarded); the guard then writes no response of its own.
    pub fn answer_violation(&self) -> Option<Violation> {
        let v = self.violation()?;
        self.answered.store(true, Ordering::SeqCst);
        Some(v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    AwaitUpgrade,
    Passthrough,
    Rejected,
}

/// The guard: wraps the client side of one HTTP/1 connection.
pub struct H1Guard<I> {
    inner: I,
    state: State,
    /// Bytes of an incomplete head, chunk line or trailer section (held back).
    pending: BytesMut,
    /// Validated bytes waiting for hyper.
    ready: BytesMut,
    max_head: usize,
    shared: Arc<GuardShared>,
    reject_response: Option<BytesMut>,
    eof: bool,
}

thread_local! {
    /// The read buffer, one per worker thread (allocated and zeroed once): bytes are copied out
    /// into `pending` / `ready` before `poll_read` returns, so no connection holds one while idle.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl<I> H1Guard<I> {
    /// Wraps `inner`; heads longer than `max_head` bytes are refused with 431.
    pub fn new(inner: I, max_head: usize) -> Self {
        Self {
            inner,
            state: State::Head,
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            max_head,
            shared: Arc::new(GuardShared::default()),
            reject_response: None,
            eof: false,
        }
    }

    /// The state shared with the connection's service.
    pub fn shared(&self) -> Arc<GuardShared> {
        self.shared.clone()
    }

    fn reject(&mut self, status: u16, reason: String) {
        crate::log_limited!(info, status, %reason, "HTTP/1 request rejected: ambiguous or malformed framing");
        let text = if status == 431 { "Request Header Fields Too Large" } else { "Bad Request" };
        let body = format!("{text}: {reason}\r\n");
        let resp = format!(
            "HTTP/1.1 {status} {text}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        self.reject_response = Some(BytesMut::from(resp.as_bytes()));
        if let Ok(mut v) = self.shared.violation.lock() {
            *v = Some(Violation { status, reason });
        }
        self.pending.clear();
        self.state = State::Rejected;
    }

    /// Validates a complete request head (ending with CRLF CRLF) and returns the body state.
    fn check_head(head: &[u8]) -> Result<State, (u16, String)> {
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(head, &mut headers) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            Ok(_) => return Err((400, "incomplete request head".into())),
            Err(httparse::Error::TooManyHeaders) => return Err((431, format!("more than {MAX_HEADERS} headers"))),
            Err(e) => return Err((400, format!("malformed request head ({e})"))),
        }
        if req.path.is_some_and(|p| p.contains('#')) {
            return Err((400, "fragment in the request target".into()));
        }
        let mut content_length: Option<u64> = None;
        let mut te = false;
        let mut hosts = 0;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                if content_length.is_some() {
                    return Err((400, "more than one Content-Length".into()));
                }
                let v = std::str::from_utf8(h.value).unwrap_or("");
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err((400, "invalid Content-Length".into()));
                }
                content_length = Some(v.parse().map_err(|_| (400, "Content-Length out of range".to_owned()))?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                if te {
                    return Err((400, "more than one Transfer-Encoding".into()));
                }
                te = true;
                if !h.value.eq_ignore_ascii_case(b"chunked") {
                    return Err((400, "Transfer-Encoding other than chunked".into()));
                }
            } else if h.name.eq_ignore_ascii_case("host") {
                hosts += 1;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if hosts > 1 {
            return Err((400, "more than one Host".into()));
        }
        if te && content_length.is_some() {
            return Err((400, "both Content-Length and Transfer-Encoding".into()));
        }
        if te && req.version == Some(0) {
            return Err((400, "Transfer-Encoding in HTTP/1.0".into()));
        }
        if req.method == Some("CONNECT") || upgrade {
            return Ok(if te || content_length.unwrap_or(0) > 0 { State::Rejected } else { State::AwaitUpgrade });
        }
        Ok(match (te, content_length) {
            (true, _) => State::ChunkSize,
            (false, Some(n)) if n > 0 => State::Length(n),
            _ => State::Head,
        })
    }

    /// Runs new client bytes through the framing state machine into `ready`.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Rejected => return,
                State::Passthrough => {
                    self.ready.extend_from_slice(data);
                    return;
                }
                State::AwaitUpgrade => {
                    self.pending.extend_from_slice(data);
                    return;
                }
                State::Length(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    let (now, rest) = data.split_at(take);
                    self.ready.extend_from_slice(now);
                    data = rest;
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Head,
                        (State::Length(_), l) => State::Length(l),
                        (_, 0) => State::ChunkEnd,
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::Head | State::ChunkSize | State::Trailers if self.pending.last() != Some(&b'\r') => {
                    // Bytes before the next CR or LF cannot end a section or break line rules:
                    // take them in one go, and only look at line ends byte by byte.
                    let run = data.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(data.len());
                    if run == 0 {
                        let Some((&b, rest)) = data.split_first() else { return };
                        data = rest;
                        self.pending.extend_from_slice(&[b]);
                        self.line_byte(b);
                        continue;
                    }
                    let (now, rest) = data.split_at(run);
                    self.pending.extend_from_slice(now);
                    data = rest;
                    let len = self.pending.len();
                    match self.state {
                        State::Head if len > self.max_head => {
                            self.reject(431, format!("request head over {} bytes", self.max_head));
                        }
                        State::Trailers if len > self.max_head => self.reject(431, "trailers too large".into()),
                        State::ChunkSize if len > MAX_CHUNK_LINE => self.reject(400, "chunk-size line too long".into()),
                        _ => {}
                    }
                }
                State::Head | State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let Some((&b, rest)) = data.split_first() else { return };
                    data = rest;
                    self.pending.extend_from_slice(&[b]);
                    self.line_byte(b);
                }
            }
        }
    }

    /// One byte of a held-back section (head, chunk line, chunk end, trailers).
    fn line_byte(&mut self, b: u8) {
        let p = &self.pending;
        let len = p.len();
        let prev = if len >= 2 { p.get(len - 2).copied() } else { None };
        if b == b'\n' && prev != Some(b'\r') {
            return self.reject(400, "bare LF".into());
        }
        if prev == Some(b'\r') && b != b'\n' {
            return self.reject(400, "bare CR".into());
        }
        match self.state {
            State::Head => {
                if len > self.max_head {
                    return self.reject(431, format!("request head over {} bytes", self.max_head));
                }
                if p.as_ref() == b"\r\n" {
                    // An empty line before the request line is allowed (RFC 9112 §2.2).
                    let line = self.pending.split();
                    self.ready.extend_from_slice(&line);
                    return;
                }
                if p.ends_with(b"\r\n\r\n") {
                    match Self::check_head(p) {
                        Ok(State::Rejected) => self.reject(400, "a body on an upgrade or CONNECT request".into()),
                        Ok(next) => {
                            let head = self.pending.split();
                            if self.ready.is_empty() {
                                self.ready = head;
                            } else {
                                self.ready.extend_from_slice(&head);
                            }
                            if next == State::AwaitUpgrade {
                                self.shared.upgrade.store(upgrade::PENDING, Ordering::SeqCst);
                            }
                            self.state = next;
                        }
                        Err((status, reason)) => self.reject(status, reason),
                    }
                }
            }
            State::ChunkSize => {
                if len > MAX_CHUNK_LINE {
                    return self.reject(400, "chunk-size line too long".into());
                }
                if p.ends_with(b"\r\n") {
                    match httparse::parse_chunk_size(p) {
                        Ok(httparse::Status::Complete((n, size))) if n == len => {
                            let line = self.pending.split();
                            self.ready.extend_from_slice(&line);
                            self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                        }
                        _ => self.reject(400, "invalid chunk size".into()),
                    }
                }
            }
            State::ChunkEnd => {
                if !b"\r\n".starts_with(p) {
                    return self.reject(400, "chunk data not followed by CRLF".into());
                }
                if len == 2 {
                    let crlf = self.pending.split();
                    self.ready.extend_from_slice(&crlf);
                    self.state = State::ChunkSize;
                }
            }
            State::Trailers => {
                if len > self.max_head {
                    return self.reject(431, "trailers too large".into());
                }
                if p.as_ref() == b"\r\n" || p.ends_with(b"\r\n\r\n") {
                    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(p, &mut headers) {
                        Ok(httparse::Status::Complete((n, _))) if n == len => {
                            let t = self.pending.split();
                            self.ready.extend_from_slice(&t);
                            self.state = State::Head;
                        }
                        _ => self.reject(400, "malformed trailers".into()),
                    }
                }
            }
            _ => {}
        }
    }

    /// Applies the service's upgrade decision, if one arrived.
    fn settle_upgrade(&mut self, cx: &Context<'_>) -> bool {
        if self.state != State::AwaitUpgrade {
            return true;
        }
        match self.shared.upgrade.load(Ordering::SeqCst) {
            upgrade::ACCEPTED => {
                self.state = State::Passthrough;
                let held = self.pending.split();
                self.ready.extend_from_slice(&held);
                true
            }
            upgrade::REFUSED => {
                self.shared.upgrade.store(upgrade::NONE, Ordering::SeqCst);
                self.state = State::Head;
                let held = self.pending.split();
                self.feed(&held);
                true
            }
            _ => {
                if let Ok(mut w) = self.shared.waker.lock() {
                    *w = Some(cx.waker().clone());
                }
                false
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for H1Guard<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(this.ready.get(..n).unwrap_or_default());
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Rejected || this.eof {
                return Poll::Ready(Ok(()));
            }
            let settled = this.settle_upgrade(cx);
            if !this.ready.is_empty() {
                continue;
            }
            let mut scratch = SCRATCH.take();
            if scratch.is_empty() {
                scratch = vec![0u8; READ_BUF];
            }
            let mut rb = ReadBuf::new(&mut scratch);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            let result = match polled {
                Poll::Ready(Ok(())) if n == 0 => {
                    // End of stream: hand over what is held (an incomplete head fails in hyper).
                    this.eof = true;
                    if this.state != State::AwaitUpgrade {
                        let rest = this.pending.split();
                        this.ready.extend_from_slice(&rest);
                    }
                    None
                }
                Poll::Ready(Ok(())) => {
                    this.feed(scratch.get(..n).unwrap_or_default());
                    None
                }
                Poll::Ready(Err(e)) => Some(Poll::Ready(Err(e))),
                Poll::Pending => (settled || this.ready.is_empty()).then_some(Poll::Pending),
            };
            SCRATCH.set(scratch);
            if let Some(r) = result {
                return r;
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for H1Guard<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.shared.answered.load(Ordering::SeqCst) {
            this.reject_response = None;
        }
        while let Some(resp) = this.reject_response.as_mut() {
            if resp.is_empty() {
                this.reject_response = None;
                break;
            }
            match Pin::new(&mut this.inner).poll_write(cx, resp) {
                Poll::Ready(Ok(0)) => this.reject_response = None,
                Poll::Ready(Ok(n)) => resp.advance(n),
                Poll::Ready(Err(_)) => this.reject_response = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
