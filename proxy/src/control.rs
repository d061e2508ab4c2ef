//! The proxy's control socket: one JSON request per line, one JSON answer per line.
//!
//! * `{"cmd":"status"}` → snapshot version and source status, listeners, counters;
//! * `{"cmd":"flows","after":N,"limit":M}` → records numbered above N (`porin observe` follows
//!   by asking again with the last number it saw).

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::records::BACKLOG;

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
enum Command {
    Status,
    Flows {
        #[serde(default)]
        after: u64,
        #[serde(default)]
        limit: Option<usize>,
    },
}

/// Status of a running proxy, as the control socket reports it.
pub fn status(p: &crate::ProxyInfo) -> serde_json::Value {
    serde_json::json!({
        "ok": true,
        "pid": std::process::id(),
        "snapshot": p.shared.policy.status(),
        "listeners": p.listeners.iter().map(|(l, addr)| serde_json::json!({
            "name": l.name, "listen": addr.to_string(), "upstream": l.upstream.map_or_else(|| "original destination".to_owned(), |u| u.to_string()),
            "transparent": l.transparent.is_some(),
        })).collect::<Vec<_>>(),
        "counters": p.counters(),
        "connections": p.shared.conns.len(),
    })
}

fn answer(p: &crate::ProxyInfo, line: &str) -> serde_json::Value {
    match serde_json::from_str::<Command>(line) {
        Ok(Command::Status) => status(p),
        Ok(Command::Flows { after, limit }) => {
            let (flows, last) = p.shared.records.after(after, limit.unwrap_or(BACKLOG));
            serde_json::json!({"ok": true, "last": last, "flows": flows})
        }
        Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
    }
}

async fn client(p: Arc<crate::ProxyInfo>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut out = answer(&p, &line).to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// Binds the socket (replacing a stale one).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Serves the socket until the task is dropped.
pub async fn serve(p: Arc<crate::ProxyInfo>, sock: UnixListener) {
    while let Ok((s, _)) = sock.accept().await {
        tokio::spawn(client(p.clone(), s));
    }
}
