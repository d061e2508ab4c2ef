//! The proxy's side of the control protocol (`porin_flow::control`): `status` (snapshot version
//! and source, listeners, connections, counters) and `flows` (records numbered above N; `porin
//! observe` without `-f` reads them), `flow_stream` (the same records pushed as they come, in
//! frames: how the agent and `porin observe -f` follow), `fqdn_cache` (what the DNS proxy
//! learned). Anything else is refused.

use porin_flow::control::{FqdnEntry, Handler, Reply, Request};

use crate::ProxyInfo;
use crate::records::BACKLOG;

/// Status of a running proxy, as the control socket reports it.
pub fn status(p: &ProxyInfo) -> serde_json::Value {
    serde_json::json!({
        "pid": std::process::id(),
        "snapshot": p.shared.policy.status(),
        "listeners": p.listeners.iter().map(|(l, addr)| serde_json::json!({
            "name": l.name, "listen": addr.to_string(), "upstream": l.upstream.map_or_else(|| "original destination".to_owned(), |u| u.to_string()),
            "transparent": l.transparent.is_some(),
        })).collect::<Vec<_>>(),
        "counters": p.counters(),
        "connections": p.shared.conns.len(),
        "records": p.shared.records.status(),
        "fqdn": p.shared.fqdn.status(),
        "balancing": p.shared.backends.status(),
        "tunnel": p.shared.tunnel.as_ref().map(|t| t.status()),
    })
}

impl Handler for ProxyInfo {
    async fn handle(&self, request: Request) -> Reply {
        match request {
            Request::Status => Reply::Status(status(self)),
            Request::Flows { after, limit } => {
                let (flows, last, missed) = self.shared.records.after(after, limit.unwrap_or(BACKLOG));
                Reply::Flows { epoch: self.shared.records.epoch(), last, missed, flows }
            }
            Request::FqdnCache => Reply::FqdnCache {
                entries: self
                    .shared
                    .fqdn
                    .rows()
                    .into_iter()
                    .map(|r| FqdnEntry {
                        name: r.name,
                        ip: r.ip,
                        ttl_left: r.ttl_left,
                        endpoints: r.endpoints,
                        zombie: r.zombie,
                    })
                    .collect(),
            },
            other => Reply::error(format!("the proxy does not serve {other:?}")),
        }
    }

    fn flow_source(&self) -> Option<std::sync::Arc<dyn porin_flow::stream::FlowSource>> {
        Some(self.shared.records.clone())
    }
}
