use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// Runs `input` through a guard; returns what hyper would see and the violation, if any.
async fn pass(input: &[u8]) -> (Vec<u8>, Option<Violation>) {
    pass_chunks(&[input]).await
}

/// Same, with the input arriving in several reads.
async fn pass_chunks(chunks: &[&[u8]]) -> (Vec<u8>, Option<Violation>) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    for c in chunks {
        client.write_all(c).await.unwrap();
    }
    drop(client);
    let mut g = H1Guard::new(server, 1024);
    let shared = g.shared();
    let mut out = Vec::new();
    g.read_to_end(&mut out).await.unwrap();
    (out, shared.violation())
}

async fn rejected(input: &[u8]) -> Violation {
    let (out, v) = pass(input).await;
    let v = v.unwrap_or_else(|| panic!("accepted: {:?}", String::from_utf8_lossy(input)));
    // Nothing of the rejected head reaches hyper.
    assert!(!out.windows(4).any(|w| w == b"EVIL"), "rejected bytes leaked: {:?}", String::from_utf8_lossy(&out));
    v
}

#[tokio::test]
async fn passes_valid_requests_byte_for_byte() {
    let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /z HTTP/1.1\r\n\r\n";
    let (out, v) = pass(input).await;
    assert_eq!(v, None);
    assert_eq!(out, input.to_vec());
}

#[tokio::test]
async fn split_at_every_byte_is_the_same() {
    let input: &[u8] =
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let chunks: Vec<&[u8]> = input.chunks(1).collect();
    let (out, v) = pass_chunks(&chunks).await;
    assert_eq!(v, None);
    assert_eq!(out, input.to_vec());
}

#[tokio::test]
async fn body_bytes_that_look_like_requests_are_body() {
    let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 19\r\n\r\nGET /x HTTP/1.1\r\n\r\n";
    let (out, v) = pass(input).await;
    assert_eq!(v, None);
    assert_eq!(out, input.to_vec());
}

#[tokio::test]
async fn smuggling_shapes_are_rejected() {
    let cases: &[(&[u8], &str)] = &[
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nEVIL", "both"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nEVIL",
            "more than one Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nEVIL",
            "more than one Content-Length",
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\nEVIL", "invalid Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nEVIL", "invalid Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\nEVIL", "other than chunked"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\nEVIL", "other than chunked"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\nEVIL",
            "more than one Transfer-Encoding",
        ),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nEVIL", "HTTP/1.0"),
        (b"GET / HTTP/1.1\nHost: a\r\n\r\nEVIL", "bare LF"),
        (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\nEVIL", "bare CR"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n continued\r\n\r\nEVIL", "malformed"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\nEVIL", "more than one Host"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\nEVIL", "malformed"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nz\r\nEVIL\r\n0\r\n\r\n",
            "invalid chunk size",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcdEVIL\r\n0\r\n\r\n",
            "not followed by CRLF",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x4\r\nEVIL\r\n0\r\n\r\n",
            "invalid chunk size",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nEVIL",
            "invalid chunk size",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\nEVIL",
            "malformed trailers",
        ),
        (b"GET / HTTP/1.1\r\nUpgrade: x\r\nContent-Length: 4\r\n\r\nEVIL", "upgrade"),
    ];
    for (input, want) in cases {
        let v = rejected(input).await;
        assert_eq!(v.status, 400, "{:?}", String::from_utf8_lossy(input));
        assert!(v.reason.contains(want), "{:?}: {} does not mention {want}", String::from_utf8_lossy(input), v.reason);
    }
}

#[tokio::test]
async fn oversized_heads_are_431() {
    let mut input = b"GET / HTTP/1.1\r\nX: ".to_vec();
    input.extend(std::iter::repeat_n(b'a', 2000));
    input.extend_from_slice(b"\r\n\r\n");
    assert_eq!(rejected(&input).await.status, 431);
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let (_, v) = pass_chunks(&[&many]).await;
    // 150 short headers fit in 1 KiB? No: the size limit or the count limit refuses it.
    assert!(matches!(v, Some(Violation { status: 431, .. })), "{v:?}");
}

#[tokio::test]
async fn earlier_valid_requests_still_reach_hyper() {
    let (out, v) = pass(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /bad HTTP/1.1\nEVIL\r\n\r\n").await;
    assert!(v.is_some());
    assert_eq!(out, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n".to_vec());
}

#[tokio::test]
async fn rejection_response_is_written_on_shutdown() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client.write_all(b"GET / HTTP/1.1\r\nA: 1\r\nA\r\n\r\n").await.unwrap();
    let mut g = H1Guard::new(server, 1024);
    let mut sink = Vec::new();
    g.read_to_end(&mut sink).await.unwrap();
    g.shutdown().await.unwrap();
    let mut resp = String::new();
    client.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{resp}");
    assert!(resp.contains("connection: close"));
}

#[tokio::test]
async fn upgrade_holds_bytes_until_decided() {
    for accepted in [true, false] {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let head: &[u8] = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        client.write_all(head).await.unwrap();
        client.write_all(b"GET /next HTTP/1.1\r\n\r\n").await.unwrap();
        let mut g = H1Guard::new(server, 1024);
        let shared = g.shared();
        let mut buf = vec![0u8; 4096];
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], head);
        // Nothing more until the service decides.
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), g.read(&mut buf)).await;
        assert!(early.is_err(), "bytes passed before the upgrade was decided");
        shared.decide_upgrade(accepted);
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /next HTTP/1.1\r\n\r\n");
        drop(client);
    }
}
