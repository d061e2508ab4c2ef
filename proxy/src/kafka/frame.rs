//! Kafka's framing: a 4-byte big-endian length, then that many bytes, at most [`MAX_FRAME`].
//! Memory follows the bytes that arrive, not the length a peer announces: a 4-byte header saying
//! 64 MiB reserves [`FIRST_RESERVE`], and the frame's buffer grows as its bytes are read.

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader};

/// The largest request or response frame (a record batch up to this size passes).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// What a frame's buffer starts with before its bytes arrive.
pub const FIRST_RESERVE: usize = 64 * 1024;

/// Frames are read through a buffer (one read for many small frames).
pub fn reader<R: AsyncRead>(r: R) -> BufReader<R> {
    BufReader::with_capacity(64 * 1024, r)
}

/// Why no frame came.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly between frames.
    #[error("the connection ended")]
    Closed,
    /// Over [`MAX_FRAME`].
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME}")]
    Oversized(usize),
    /// The stream broke off inside a frame, or failed.
    #[error("{0}")]
    Broken(String),
}

/// The next frame (without its length).
pub async fn next<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<Bytes, FrameError> {
    let broken = |e: std::io::Error| FrameError::Broken(e.to_string());
    if r.fill_buf().await.map_err(broken)?.is_empty() {
        return Err(FrameError::Closed);
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(|e| FrameError::Broken(format!("frame length cut short: {e}")))?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::Oversized(n));
    }
    let mut buf = Vec::with_capacity(n.min(FIRST_RESERVE));
    let got = (&mut *r).take(n as u64).read_to_end(&mut buf).await.map_err(broken)?;
    if got < n {
        return Err(FrameError::Broken(format!("a frame of {n} bytes cut short after {got}")));
    }
    Ok(Bytes::from(buf))
}

/// Writes one frame with its length (one vectored write where the socket takes it).
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &Bytes) -> std::io::Result<()> {
    let len = u32::try_from(frame.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut buf = Bytes::copy_from_slice(&len.to_be_bytes()).chain(frame.clone());
    w.write_all_buf(&mut buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_split_and_bound() {
        let mut input = Vec::new();
        input.extend_from_slice(&3u32.to_be_bytes());
        input.extend_from_slice(b"abc");
        input.extend_from_slice(&0u32.to_be_bytes());
        let mut r = reader(&input[..]);
        assert_eq!(next(&mut r).await.unwrap(), Bytes::from_static(b"abc"));
        assert_eq!(next(&mut r).await.unwrap(), Bytes::new());
        assert_eq!(next(&mut r).await, Err(FrameError::Closed));

        let big = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
        assert_eq!(next(&mut reader(&big[..])).await, Err(FrameError::Oversized(MAX_FRAME + 1)));
        for cut in [&[0, 0, 0, 9, b'x'][..], &[0, 0][..]] {
            assert!(matches!(next(&mut reader(cut)).await, Err(FrameError::Broken(_))), "{cut:?}");
        }

        let mut out = Vec::new();
        write(&mut out, &Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(out, [0, 0, 0, 3, b'a', b'b', b'c']);
    }
}
