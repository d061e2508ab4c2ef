//! The control protocol: one JSON [`Request`] per line on a Unix socket, one JSON [`Reply`] per
//! line back. The agent and the proxy serve it with [`serve`]; the CLI, the lab and the tests call
//! it with [`call`]. A process answers what it knows and [`Reply::Error`] to the rest.
//!
//! ```text
//! {"cmd":"status"}                      {"reply":"status", ...}
//! {"cmd":"flows","after":12,"limit":100} {"reply":"flows","last":15,"missed":0,"flows":[...]}
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
}

/// Binds the socket at `path`, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Serves the socket until the task is dropped: one task per client, one reply per request line.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => drop(tokio::spawn(client(handler.clone(), stream))),
            Err(e) => {
                // Out of descriptors and the like: transient.
                tracing::warn!(error = %e, "Control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn client<H: Handler>(handler: Arc<H>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
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
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
