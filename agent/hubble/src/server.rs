//! The `observer.Observer` service over the node's [`FlowRing`], with gRPC reflection (v1 and
//! v1alpha) so generic clients (grpcurl, Python's reflection client) find it.
//!
//! `GetFlows` sends, in this order: the flows the request picks from the ring (the last
//! `number`, the first `number`, or those since `since`; all held when none is given and the
//! stream does not follow), then, with `follow`, every new flow as it arrives until the client
//! goes away or `until` passes. Each response is a flow that passed the filters, or a lost-events
//! message when the ring moved past flows before this stream read them. A slow client slows only
//! its own stream: the ring never waits for a reader.

use std::sync::Arc;

use porin_flow::flow::{Flow, rfc3339};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::filter::Filters;
use crate::pb::flow as fpb;
use crate::pb::observer::observer_server::{Observer, ObserverServer};
use crate::pb::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNodesRequest, GetNodesResponse, Node, ServerStatusRequest,
    ServerStatusResponse, Tls, get_flows_response::ResponseTypes,
};
use crate::pb::relay::NodeState;
use crate::ring::{FlowRing, Loss, LostSource};

/// How many flows a stream reads from the ring at a time.
const PAGE: usize = 1024;
/// Responses a stream holds for a slow client before it stops reading the ring (what the ring
/// lets go meanwhile is reported to that client as lost).
const STREAM_QUEUE: usize = 1024;

/// Asks whoever feeds the ring from elsewhere (the proxy's records) to bring it up to date now;
/// the answer comes when it has.
pub type Catchup = mpsc::Sender<tokio::sync::oneshot::Sender<()>>;

/// How long a request waits for the ring to catch up before it reads what is there.
const CATCHUP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The service.
#[derive(Debug, Clone)]
pub struct HubbleServer {
    ring: Arc<FlowRing>,
    node: Arc<str>,
    address: Arc<str>,
    catchup: Option<Catchup>,
}

impl HubbleServer {
    /// A server of `ring` for node `node`, which clients reach at `address`.
    pub fn new(ring: Arc<FlowRing>, node: &str, address: &str) -> Self {
        Self { ring, node: node.into(), address: address.into(), catchup: None }
    }

    /// Before each `GetFlows` reads the ring, ask `catchup` to bring it up to date (so a flow
    /// that already happened is in the answer, not only in the next one).
    pub fn with_catchup(mut self, catchup: Catchup) -> Self {
        self.catchup = Some(catchup);
        self
    }

    async fn catch_up(&self) {
        let Some(c) = &self.catchup else { return };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if c.send(tx).await.is_ok() && tokio::time::timeout(CATCHUP_WAIT, rx).await.is_err() {
            tracing::debug!("The ring did not catch up in time; answering with what it holds");
        }
    }
}

fn version() -> String {
    format!("porin v{}", env!("CARGO_PKG_VERSION"))
}

/// A request's window in time, as record times (RFC 3339, fixed width: compared as text).
#[derive(Debug, Default, Clone)]
struct Window {
    since: Option<String>,
    until: Option<String>,
}

fn record_time(t: &pbjson_types::Timestamp) -> String {
    rfc3339(u64::try_from(t.seconds).unwrap_or(0), u32::try_from(t.nanos).unwrap_or(0))
}

impl Window {
    fn before(&self, f: &Flow) -> bool {
        self.since.as_ref().is_some_and(|s| f.time < *s)
    }
    fn after(&self, f: &Flow) -> bool {
        self.until.as_ref().is_some_and(|u| f.time > *u)
    }
}

/// One stream's reader.
struct Stream {
    ring: Arc<FlowRing>,
    node: Arc<str>,
    filters: Filters,
    window: Window,
    tx: mpsc::Sender<Result<GetFlowsResponse, Status>>,
}

/// The client went away.
struct Gone;

impl Stream {
    fn admit(&self, n: u64, f: &Flow) -> Option<String> {
        let uuid = self.ring.uuid(n);
        (!self.window.before(f) && self.filters.admit(f, &uuid, &self.node)).then_some(uuid)
    }

    async fn send(&self, r: ResponseTypes, time: Option<pbjson_types::Timestamp>) -> Result<(), Gone> {
        let response = GetFlowsResponse { response_types: Some(r), node_name: self.node.to_string(), time };
        self.tx.send(Ok(response)).await.map_err(|_| Gone)
    }

    async fn flow(&self, uuid: String, f: &Flow) -> Result<(), Gone> {
        let pb = convert::to_pb(f, uuid, &self.node);
        let time = pb.time;
        self.send(ResponseTypes::Flow(pb), time).await
    }

    async fn lost(&self, source: fpb::LostEventSource, n: u64) -> Result<(), Gone> {
        let lost = fpb::LostEvent { source: source as i32, num_events_lost: n, cpu: None };
        self.send(ResponseTypes::LostEvents(lost), convert::timestamp(&porin_flow::flow::now_rfc3339())).await
    }

    /// Tells the client of the losses in `pending` noted before flow `before` (and moves `from`,
    /// the number of the next loss it has not heard of).
    async fn losses(
        &self,
        pending: &mut std::iter::Peekable<std::vec::IntoIter<Loss>>,
        from: &mut u64,
        before: u64,
    ) -> Result<(), Gone> {
        while let Some(l) = pending.next_if(|l| l.after < before) {
            let source = match l.source {
                LostSource::PerfEventRingBuffer => fpb::LostEventSource::PerfEventRingBuffer,
                LostSource::ObserverEventsQueue => fpb::LostEventSource::ObserverEventsQueue,
            };
            self.lost(source, l.count).await?;
            *from = l.id + 1;
        }
        Ok(())
    }

    /// Sends the flows after `cursor` up to `end` (or all there are when `end` is `None`), at most
    /// `limit` of them; returns the new cursor and whether the stream is done (`until` passed, or
    /// `limit` reached).
    /// Losses numbered `losses` or above are told as the cursor passes where they were noted.
    async fn pages(
        &self,
        mut cursor: u64,
        end: Option<u64>,
        mut limit: u64,
        losses: &mut u64,
    ) -> Result<(u64, bool), Gone> {
        loop {
            // Losses not told yet: each goes out before the first flow after it.
            let mut pending = self.ring.losses(*losses, u64::MAX).into_iter().peekable();
            let read = self.ring.after(cursor, PAGE);
            if read.missed > 0 {
                self.lost(fpb::LostEventSource::HubbleRingBuffer, read.missed).await?;
                // Losses among the flows the ring let go are not told again, one by one.
                let oldest = read.flows.first().map_or(read.last, |(n, _)| *n);
                while let Some(l) = pending.next_if(|l| l.after < oldest.saturating_sub(1)) {
                    *losses = l.id + 1;
                }
            }
            if read.flows.is_empty() {
                let cursor = read.last.max(cursor);
                self.losses(&mut pending, losses, cursor.saturating_add(1)).await?;
                return Ok((cursor, false));
            }
            for (n, f) in &read.flows {
                if end.is_some_and(|e| *n > e) {
                    return Ok((cursor, false));
                }
                if self.window.before(f) {
                    // Before the window: neither the flow nor the losses before it are asked for.
                    while let Some(l) = pending.next_if(|l| l.after < *n) {
                        *losses = l.id + 1;
                    }
                } else {
                    self.losses(&mut pending, losses, *n).await?;
                }
                cursor = *n;
                if self.window.after(f) {
                    return Ok((cursor, true));
                }
                if let Some(uuid) = self.admit(*n, f) {
                    self.flow(uuid, f).await?;
                    limit = limit.saturating_sub(1);
                    if limit == 0 {
                        return Ok((cursor, true));
                    }
                }
            }
        }
    }

    async fn run(self, req: GetFlowsRequest) -> Result<(), Gone> {
        let mut newest = self.ring.subscribe();
        let number = req.number;
        // Losses noted from now on (history walks also tell those noted among the flows they walk).
        let mut losses = self.ring.next_loss();
        let cursor = if req.first {
            let end = self.ring.last();
            let mut from = 1;
            self.pages(0, Some(end), if number == 0 { u64::MAX } else { number }, &mut from).await?;
            return Ok(());
        } else if number > 0 {
            // The last `number` matching flows: picked newest first under the ring's lock, sent
            // oldest first.
            let mut picked = Vec::new();
            let last = self.ring.newest_first(|n, f| {
                if self.window.before(f) {
                    return false;
                }
                if !self.window.after(f)
                    && let Some(uuid) = self.admit(n, f)
                {
                    picked.push((uuid, f.clone()));
                }
                (picked.len() as u64) < number
            });
            for (uuid, f) in picked.iter().rev() {
                self.flow(uuid.clone(), f).await?;
            }
            last
        } else if req.since.is_some() || !req.follow {
            let end = self.ring.last();
            losses = 1;
            let (cursor, done) = self.pages(0, Some(end), u64::MAX, &mut losses).await?;
            if done {
                return Ok(());
            }
            end.max(cursor)
        } else {
            self.ring.last()
        };
        if !req.follow {
            return Ok(());
        }
        let mut cursor = cursor;
        loop {
            let (next, done) = self.pages(cursor, None, u64::MAX, &mut losses).await?;
            cursor = next;
            if done {
                return Ok(());
            }
            tokio::select! {
                changed = newest.changed() => if changed.is_err() { return Ok(()) },
                () = self.tx.closed() => return Err(Gone),
            }
        }
    }
}

#[tonic::async_trait]
impl Observer for HubbleServer {
    type GetFlowsStream = ReceiverStream<Result<GetFlowsResponse, Status>>;

    async fn get_flows(&self, request: Request<GetFlowsRequest>) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = request.into_inner();
        if req.first && req.follow {
            return Err(Status::invalid_argument("first and follow cannot be combined"));
        }
        let filters =
            Filters::new(&req.whitelist, &req.blacklist).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let window = Window { since: req.since.as_ref().map(record_time), until: req.until.as_ref().map(record_time) };
        self.catch_up().await;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let stream = Stream { ring: self.ring.clone(), node: self.node.clone(), filters, window, tx };
        tokio::spawn(async move {
            // Gone: the client closed its stream; nothing is owed to it.
            let _gone = stream.run(req).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_nodes(&self, _: Request<GetNodesRequest>) -> Result<Response<GetNodesResponse>, Status> {
        let s = self.ring.status();
        let node = Node {
            name: self.node.to_string(),
            version: version(),
            address: self.address.to_string(),
            state: NodeState::NodeConnected as i32,
            tls: Some(Tls { enabled: false, server_name: String::new() }),
            uptime_ns: s.uptime_ns,
            num_flows: s.num_flows,
            max_flows: s.max_flows,
            seen_flows: s.seen_flows,
        };
        Ok(Response::new(GetNodesResponse { nodes: vec![node] }))
    }

    async fn server_status(&self, _: Request<ServerStatusRequest>) -> Result<Response<ServerStatusResponse>, Status> {
        let s = self.ring.status();
        Ok(Response::new(ServerStatusResponse {
            num_flows: s.num_flows,
            max_flows: s.max_flows,
            seen_flows: s.seen_flows,
            uptime_ns: s.uptime_ns,
            num_connected_nodes: Some(pbjson_types::UInt32Value { value: 1 }),
            num_unavailable_nodes: Some(pbjson_types::UInt32Value { value: 0 }),
            unavailable_nodes: vec![],
            version: version(),
        }))
    }
}

/// Where the API is served.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket.
    Unix(tokio::net::UnixListener),
    /// A TCP address.
    Tcp(tokio::net::TcpListener),
}

/// Serves the API (and reflection) on `listener` until the task is dropped.
pub async fn serve(server: HubbleServer, listener: Listener) -> Result<(), tonic::transport::Error> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::DESCRIPTOR_SET)
        .build_v1();
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::DESCRIPTOR_SET)
        .build_v1alpha();
    let (v1, v1alpha) = match (v1, v1alpha) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            // The descriptor set is built with the binary: a failure here is a build defect.
            tracing::error!(error = %e, "gRPC reflection unavailable");
            return Ok(());
        }
    };
    let router = tonic::transport::Server::builder()
        .add_service(ObserverServer::new(server))
        .add_service(v1)
        .add_service(v1alpha);
    match listener {
        Listener::Unix(l) => router.serve_with_incoming(UnixListenerStream::new(l)).await,
        Listener::Tcp(l) => router.serve_with_incoming(TcpListenerStream::new(l)).await,
    }
}
