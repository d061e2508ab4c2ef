//! Untrusted HTTP/1 bytes through the framing guard, in the chunks the fuzzer picks: it may refuse,
//! never panic, and never pass more bytes than it was given.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use proxy::h1guard::H1Guard;
use tokio::io::{AsyncRead, ReadBuf};

/// A reader that hands out its bytes in the given chunk sizes.
struct Chunks<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let want = self.sizes.first().map_or(usize::MAX, |s| usize::from(*s).max(1));
        if let Some((_, rest)) = self.sizes.split_first() {
            self.sizes = rest;
        }
        let n = want.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (data, sizes) = input;
    let mut guard = H1Guard::new(Chunks { data: &data, sizes: &sizes }, 8 * 1024);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = [0u8; 4096];
    let mut total = 0usize;
    for _ in 0..10_000 {
        let mut buf = ReadBuf::new(&mut out);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => total += buf.filled().len(),
            Poll::Ready(Err(_)) | Poll::Pending => break,
        }
    }
    assert!(total <= data.len());
});
