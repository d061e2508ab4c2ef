//! The control protocol: one JSON [`Request`] per line on a Unix socket, one JSON [`Reply`] per
//! line back. The agent and the proxy serve it with [`serve`]; the CLI, the lab and the tests call
//! it with [`call`]. A process answers what it knows and [`Reply::Error`] to the rest.
//!
//! ```text
//! {"cmd":"status"}                      {"reply":"status", ...}
//! {"cmd":"flows","after":12,"limit":100} {"reply":"flows","last":15,"missed":0,"flows":[...]}
//! {"cmd":"flow_stream","after":12,"epoch":E} {"reply":"done"}, then frames      (proxy; see stream)
//! {"cmd":"reload"}                      {"reply":"reloaded","version":7,...}        (agent)
//! {"cmd":"counters"}                    {"reply":"counters","counters":{...}}       (agent)
//! {"cmd":"detach","ifname":"lxc1"}      {"reply":"done"}                            (agent)
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::flow::Flow;
use crate::stream::FlowSource;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The process's status.
    Status,
    /// Flow records numbered above `after`, at most `limit`.
    Flows {
        /// The last number the reader saw (0: from the oldest kept).
        #[serde(default)]
        after: u64,
        /// At most this many.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Flow records numbered above `after`, pushed as they come ([`crate::stream`]): after the
    /// reply the connection carries frames, not lines.
    FlowStream {
        /// The last number the reader saw (0: from the oldest kept).
        #[serde(default)]
        after: u64,
        /// The run `after` counts in (another run's, or 0: from the oldest kept).
        #[serde(default)]
        epoch: u64,
    },
    /// Read the inputs again and apply them (agent).
    Reload,
    /// The datapath's counters (agent).
    Counters,
    /// Take the datapath off an interface (agent).
    Detach {
        /// The interface.
        ifname: String,
    },
    /// What the DNS proxy learned (proxy).
    FqdnCache,
}

/// One learned address of a name (`porin fqdn cache list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnEntry {
    /// The name (fully qualified).
    pub name: String,
    /// An address of it.
    pub ip: std::net::IpAddr,
    /// Seconds until it expires (0 for a zombie).
    pub ttl_left: u64,
    /// Endpoints (`namespace/name`) whose lookups taught it.
    pub endpoints: Vec<String>,
    /// Kept past its expiry while a connection to it lives.
    pub zombie: bool,
}

/// A reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The status: what the process reports about itself (its own shape).
    Status(serde_json::Value),
    /// Flow records.
    Flows {
        /// Which run of the process numbered them: numbers start again when it changes (a
        /// restart), so a reader that kept a number asks from 0.
        #[serde(default)]
        epoch: u64,
        /// The newest number so far (ask with it next time).
        last: u64,
        /// Records after the reader's number that the backlog let go before it asked.
        missed: u64,
        /// The records, oldest first.
        flows: Vec<Flow>,
    },
    /// The inputs were applied.
    Reloaded {
        /// The policy version now in force.
        version: u64,
        /// What the apply did.
        stats: serde_json::Value,
        /// Policy files refused (their last good version keeps enforcing).
        policy_errors: Vec<String>,
    },
    /// Counters by name.
    Counters {
        /// The counters.
        counters: BTreeMap<String, u64>,
    },
    /// What the DNS proxy learned, by name then address.
    FqdnCache {
        /// The entries.
        entries: Vec<FqdnEntry>,
    },
    /// Done.
    Done,
    /// The request failed, or this process does not serve it.
    Error {
        /// Why.
        error: String,
    },
}

impl Reply {
    /// A failure.
    pub fn error(e: impl std::fmt::Display) -> Self {
        Self::Error { error: e.to_string() }
    }

    /// The reply, or its error.
    pub fn ok(self) -> Result<Self, ControlError> {
        match self {
            Self::Error { error } => Err(ControlError::Refused(error)),
            r => Ok(r),
        }
    }
}

/// What went wrong talking to a control socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Could not connect, write or read.
    #[error("{path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// What happened.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not a reply.
    #[error("{path}: bad reply {line:?}: {source}")]
    BadReply {
        /// The socket.
        path: String,
        /// What came back.
        line: String,
        /// Why it is not a reply.
        #[source]
        source: serde_json::Error,
    },
    /// The process refused the request.
    #[error("{0}")]
    Refused(String),
}

/// What a process does with requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: Request) -> impl Future<Output = Reply> + Send;

    /// What `flow_stream` streams from (none: refused).
    fn flow_source(&self) -> Option<Arc<dyn FlowSource>> {
        None
    }
}

/// Streams served at once; more are refused (each is a thread).
pub const MAX_STREAMS: usize = 8;
/// A reader that lets its socket fill up and takes nothing for this long loses its stream.
const STREAM_STALL: Duration = Duration::from_secs(10);

/// Binds the socket at `path`, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Serves the socket until the task is dropped: one task per client, one reply per request line
/// (a `flow_stream` request's connection then carries frames, written by a thread of its own).
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    let streams = Arc::new(AtomicUsize::new(0));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => drop(tokio::spawn(client(handler.clone(), stream, streams.clone()))),
            Err(e) => {
                // Out of descriptors and the like: transient.
                tracing::warn!(error = %e, "Control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn client<H: Handler>(handler: Arc<H>, stream: UnixStream, streams: Arc<AtomicUsize>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::FlowStream { after, epoch }) => match start_stream(handler.as_ref(), streams.clone()) {
                Ok((source, slot)) => {
                    let r = lines.into_inner().into_inner();
                    return hand_over(r, w, source, slot, after, epoch).await;
                }
                Err(refusal) => refusal,
            },
            Ok(req) => handler.handle(req).await,
            Err(e) => Reply::error(format!("bad request: {e}")),
        };
        let mut out = match serde_json::to_string(&reply) {
            Ok(s) => s,
            Err(e) => format!(r#"{{"reply":"error","error":"reply not serialisable: {e}"}}"#),
        };
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// A stream's place among the server's [`MAX_STREAMS`]; given back when dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn start_stream<H: Handler>(
    handler: &H,
    streams: Arc<AtomicUsize>,
) -> Result<(Arc<dyn FlowSource>, StreamSlot), Reply> {
    let source = handler.flow_source().ok_or_else(|| Reply::error("this process does not stream flows"))?;
    if streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        streams.fetch_sub(1, Ordering::Relaxed);
        return Err(Reply::error(format!("already streaming to {MAX_STREAMS} readers")));
    }
    Ok((source, StreamSlot(streams)))
}

/// Answers a `flow_stream` request and hands the connection to a thread of its own: encoding
/// frames never runs on the runtime that serves the data path.
async fn hand_over(
    r: tokio::net::unix::OwnedReadHalf,
    mut w: tokio::net::unix::OwnedWriteHalf,
    source: Arc<dyn FlowSource>,
    slot: StreamSlot,
    after: u64,
    epoch: u64,
) {
    let line = serde_json::to_string(&Reply::Done).unwrap_or_default() + "\n";
    if w.write_all(line.as_bytes()).await.is_err() {
        return;
    }
    let stream = match r.reunite(w).map_err(|e| std::io::Error::other(e.to_string())).and_then(UnixStream::into_std) {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "Control socket: a flow stream could not start"),
    };
    // The thread holds the records weakly: a process that lets go of them ends its streams.
    let source = Arc::downgrade(&source);
    let started = std::thread::Builder::new().name("flow-stream".into()).spawn(move || {
        let _slot = slot;
        let mut stream = stream;
        let ended = stream
            .set_nonblocking(false)
            .and_then(|()| crate::stream::write_stream(&source, &mut stream, after, epoch, STREAM_STALL));
        // A reader hanging up is how a stream ends; anything else is worth a line.
        if let Err(e) = ended
            && !matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
        {
            tracing::info!(error = %e, "A flow stream ended");
        }
    });
    if let Err(e) = started {
        tracing::warn!(error = %e, "Control socket: no thread for a flow stream");
    }
}

/// Sends one request and waits (at most 30 s) for the reply. Blocking: for the CLI and tests.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ControlError> {
    let io = |source| ControlError::Io { path: socket.display().to_string(), source };
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut resp = String::new();
    std::io::BufReader::new(&s).read_line(&mut resp).map_err(io)?;
    serde_json::from_str(&resp).map_err(|source| ControlError::BadReply {
        path: socket.display().to_string(),
        line: resp.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_shape() {
        let r: Request = serde_json::from_str(r#"{"cmd":"flows","after":3}"#).unwrap();
        assert_eq!(r, Request::Flows { after: 3, limit: None });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"events"}"#).is_err());
        let status = Reply::Status(serde_json::json!({"pid": 7, "version": 2}));
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json, serde_json::json!({"reply": "status", "pid": 7, "version": 2}));
        assert_eq!(serde_json::from_value::<Reply>(json).unwrap(), status);
        let flows = Reply::Flows { epoch: 1, last: 9, missed: 1, flows: vec![] };
        assert_eq!(serde_json::from_str::<Reply>(&serde_json::to_string(&flows).unwrap()).unwrap(), flows);
        assert!(matches!(Reply::error("no").ok(), Err(ControlError::Refused(e)) if e == "no"));
    }

    struct Echo;

    impl Handler for Echo {
        async fn handle(&self, request: Request) -> Reply {
            match request {
                Request::Status => Reply::Status(serde_json::json!({"ok": true})),
                other => Reply::error(format!("not served: {other:?}")),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn one_server_one_client() {
        let dir = std::env::temp_dir().join(format!("porin-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let listener = bind(&path).unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Echo)));
        let p = path.clone();
        let (status, counters) = tokio::task::spawn_blocking(move || {
            (call(&p, &Request::Status).unwrap(), call(&p, &Request::Counters).unwrap())
        })
        .await
        .unwrap();
        assert_eq!(status, Reply::Status(serde_json::json!({"ok": true})));
        assert!(counters.ok().is_err());
        // A process without a flow source refuses a stream, by name, as a reply line.
        let p = path.clone();
        let refused = tokio::task::spawn_blocking(move || crate::stream::StreamReader::connect(&p, 0, 0).unwrap_err())
            .await
            .unwrap();
        assert!(refused.to_string().contains("does not stream flows"), "{refused}");
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
