//! Kafka's framing: a 4-byte big-endian length, then that many bytes (`tokio_util`'s
//! length-delimited codec, bounded by [`MAX_FRAME`]).

use bytes::{Buf as _, Bytes};
use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec, LengthDelimitedCodecError};

/// The largest request or response frame (a record batch up to this size passes).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// The codec: 4-byte length, at most [`MAX_FRAME`].
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(MAX_FRAME).new_codec()
}

/// Frames read off `r`.
pub fn reader<R: AsyncRead>(r: R) -> FramedRead<R, LengthDelimitedCodec> {
    FramedRead::with_capacity(r, codec(), 64 * 1024)
}

/// Why no frame came.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly between frames.
    #[error("the connection ended")]
    Closed,
    /// Over [`MAX_FRAME`].
    #[error("a frame over the limit of {MAX_FRAME} bytes")]
    Oversized,
    /// The stream broke off inside a frame, or failed.
    #[error("{0}")]
    Broken(String),
}

/// The next frame (without its length).
pub async fn next<R: AsyncRead + Unpin>(r: &mut FramedRead<R, LengthDelimitedCodec>) -> Result<Bytes, FrameError> {
    match r.next().await {
        None => Err(FrameError::Closed),
        Some(Ok(f)) => Ok(f.freeze()),
        Some(Err(e)) if e.get_ref().is_some_and(|i| i.is::<LengthDelimitedCodecError>()) => Err(FrameError::Oversized),
        Some(Err(e)) => Err(FrameError::Broken(e.to_string())),
    }
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
        assert_eq!(next(&mut reader(&big[..])).await, Err(FrameError::Oversized));
        let cut = [0, 0, 0, 9, b'x'];
        assert!(matches!(next(&mut reader(&cut[..])).await, Err(FrameError::Broken(_))));

        let mut out = Vec::new();
        write(&mut out, &Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(out, [0, 0, 0, 3, b'a', b'b', b'c']);
    }
}
