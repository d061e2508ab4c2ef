//! The transparent Kafka proxy: the datapath hands it the TCP flows whose policy has
//! `rules.kafka`; each request is judged before anything reaches the broker.
//!
//! Per connection, two halves:
//!
//! * **requests** (client → broker): read a frame ([`frame`]: a 4-byte length, at most 64 MiB) → parse
//!   ([`request::parse`], `kafka-protocol`) → judge (the pair verdict of the flow, then the Kafka
//!   rules: role, key, version, client id, every topic) → allowed: forwarded as it came; denied:
//!   its answer ([`denial::denial`]) is queued in its place. A frame that cannot be judged (too
//!   large, truncated, unknown, trailing bytes) closes the connection with a record: nothing
//!   unjudged reaches the broker.
//! * **responses** (broker → client), in request order: a forwarded request takes the broker's next
//!   response (its correlation id must match), a denied one its queued answer. Pipelined requests
//!   keep their order whatever mix of verdicts ([`response::inspect`]: the correlation id must
//!   match; ApiVersions answers are narrowed to the versions this proxy decodes; Metadata answers
//!   teach topic ids for requests that name topics by id).
//!
//! Brokers the Metadata answers point clients at are connected to like any broker: their flows carry
//! the same policy, so the datapath hands them to the proxy too.

pub mod denial;
pub mod frame;
pub mod request;
pub mod response;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use policy_engine::kafka::{KafkaRequest, api_key_name};
use policy_engine::snapshot::Proto;
use porin_flow::flow::{DropReason, KafkaInfo, Verdict};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use self::frame::FrameError;
use self::request::Request;
use crate::admission::{ConnKind, ConnState};
use crate::config::ListenerConfig;
use crate::policy::{ConnPolicy, Denial, Pass, RequestVerdict};
use crate::records::{Counters, Detail, Record, Transport, now_ns};
use crate::service::Shared;

/// Requests owed an answer per connection before the proxy stops reading the client.
const PIPELINE: usize = 1024;
/// Bytes of the proxy's own answers owed per connection before it stops reading the client (a
/// client that pipelines denied requests and never reads cannot make the proxy hold more).
const OWED_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// What the response half owes the client next.
#[derive(Debug)]
enum Pending {
    /// The broker's next response, for this request.
    Forwarded(Owed),
    /// The proxy's answer to a denied request, holding its share of [`OWED_ANSWER_BYTES`].
    Injected(Bytes, OwedBytes),
}

/// A share of [`OWED_ANSWER_BYTES`], given back when the answer is written.
#[derive(Debug)]
struct OwedBytes(
    #[expect(dead_code, reason = "held, not read: dropping it gives the bytes back")] OwnedSemaphorePermit,
);

/// Fetch sessions (KIP-227) begun on this connection: session id → the snapshot version its full
/// fetch was judged under. An incremental fetch names only what changed, so the proxy lets one
/// through only in a session it saw begin under the policy in force; any other is answered
/// `FETCH_SESSION_ID_NOT_FOUND` and the client starts over with a full fetch, judged whole.
#[derive(Debug, Default)]
struct Sessions(std::sync::Mutex<std::collections::HashMap<i32, u64>>);

/// At most this many sessions per connection (a client uses one per broker).
const MAX_SESSIONS: usize = 64;

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<i32, u64>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self, id: i32, version: u64) -> bool {
        self.lock().get(&id) == Some(&version)
    }

    fn begun(&self, id: i32, version: u64) {
        let mut m = self.lock();
        if m.len() < MAX_SESSIONS || m.contains_key(&id) {
            m.insert(id, version);
        }
    }

    fn end(&self, id: i32) {
        self.lock().remove(&id);
    }
}

/// A forwarded request whose answer the broker owes.
#[derive(Debug)]
struct Owed {
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    info: KafkaInfo,
    /// How the request passed (allowed, or audited).
    pass: Pass,
    start: Instant,
    /// A full Fetch asking for a session: the snapshot version it was judged under.
    session: Option<u64>,
}

/// What one request frame comes to (parse → judge; the records are written, no I/O is done).
#[derive(Debug)]
enum Step {
    /// Write the frame to the broker; the client is owed its answer (none for `acks: 0`).
    Forward(Option<Owed>),
    /// Nothing goes to the broker; the client is owed this answer.
    Answer(Bytes),
    /// Nothing goes anywhere (a denied `acks: 0` Produce).
    Nothing,
    /// The connection closes (after what is owed).
    Close,
}

/// The connection's policy, taken again when a new snapshot is in force.
struct Policy<'a> {
    shared: &'a Shared,
    listener: &'a ListenerConfig,
    client: SocketAddr,
    local: SocketAddr,
    current: Arc<ConnPolicy>,
}

impl<'a> Policy<'a> {
    fn new(shared: &'a Shared, listener: &'a ListenerConfig, client: SocketAddr, local: SocketAddr) -> Self {
        let current =
            Arc::new(ConnPolicy::decide(shared.policy.current(), shared.lookup(), listener, client, local, Proto::Tcp));
        Self { shared, listener, client, local, current }
    }

    fn get(&mut self) -> Arc<ConnPolicy> {
        let now = self.shared.policy.current();
        let same = match (&self.current.snapshot, &now) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            let (l, c, s) = (self.listener, self.client, self.local);
            self.current = Arc::new(ConnPolicy::decide(now, self.shared.lookup(), l, c, s, Proto::Tcp));
        }
        self.current.clone()
    }
}

fn info(req: &Request, error_code: i16) -> KafkaInfo {
    let key = req.api_key as i16;
    KafkaInfo {
        error_code: i32::from(error_code),
        api_version: i32::from(req.version()),
        // Cilium's names where it has one (keys 0–33), else the protocol's own, lower-cased.
        api_key: api_key_name(key).map_or_else(|| format!("{:?}", req.api_key).to_lowercase(), str::to_owned),
        correlation_id: req.correlation_id(),
        topic: record_topics(&req.topics),
    }
}

/// Topics as a record shows them: at most [`RECORD_TOPICS`] names of at most 255 bytes each, then how
/// many more (a request may name millions: records are kept, their size must not follow it).
fn record_topics(topics: &[String]) -> String {
    let mut out: Vec<&str> =
        topics.iter().take(RECORD_TOPICS).map(|t| t.get(..t.floor_char_boundary(255)).unwrap_or_default()).collect();
    let more;
    if topics.len() > RECORD_TOPICS {
        more = format!("(+{} more)", topics.len() - RECORD_TOPICS);
        out.push(&more);
    }
    out.join(",")
}

/// Topic names a flow record lists.
const RECORD_TOPICS: usize = 16;

/// One flow record of this connection.
struct Emit<'a> {
    shared: &'a Shared,
    policy: &'a ConnPolicy,
}

impl Emit<'_> {
    fn record(&self, reply: bool, verdict: Verdict, reason: Option<DropReason>, info: KafkaInfo) -> RecordBuilder<'_> {
        RecordBuilder { emit: self, reply, verdict, reason, info, latency_ns: 0, rule: None, summary: String::new() }
    }
}

/// A record being filled in; written by [`RecordBuilder::send`].
struct RecordBuilder<'a> {
    emit: &'a Emit<'a>,
    reply: bool,
    verdict: Verdict,
    reason: Option<DropReason>,
    info: KafkaInfo,
    latency_ns: u64,
    rule: Option<Arc<str>>,
    summary: String,
}

impl RecordBuilder<'_> {
    fn rule(mut self, rule: Option<Arc<str>>) -> Self {
        self.rule = rule;
        self
    }

    fn summary(mut self, summary: impl Into<String>) -> Self {
        self.summary = summary.into();
        self
    }

    fn latency(mut self, since: Instant) -> Self {
        self.latency_ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self
    }

    fn send(self) {
        let shared = self.emit.shared;
        shared.records.emit(Record {
            time_ns: now_ns(),
            reply: self.reply,
            verdict: self.verdict,
            reason: self.reason,
            ends: self.emit.policy.ends.clone(),
            transport: Transport::Tcp,
            detail: Detail::Kafka(Box::new(self.info)),
            latency_ns: self.latency_ns,
            policy: self.rule,
            summary: self.summary,
            service: None,
        });
    }
}

/// Parse and judge one request frame.
fn step(shared: &Shared, policy: &ConnPolicy, sessions: &Sessions, frame: Bytes) -> Step {
    let emit = Emit { shared, policy };
    Counters::inc(&shared.counters.requests);
    let req = match request::parse(frame, &shared.kafka_topic_ids) {
        Ok(r) => r,
        Err(e) => {
            Counters::inc(&shared.counters.rejected);
            let record = emit.record(false, Verdict::Dropped, Some(DropReason::MalformedRequest), KafkaInfo::default());
            record.summary(format!("{e}: connection closed")).send();
            return Step::Close;
        }
    };
    let version = policy.snapshot.as_ref().map_or(0, |s| s.version);
    let mut new_session = None;
    let mut in_session = false;
    match req.fetch_session() {
        Some((id, epoch)) if epoch > 0 => {
            if !sessions.current(id, version) {
                sessions.end(id);
                let Some(bytes) = denial::fetch_session_not_found(&req) else { return Step::Close };
                let record = emit.record(false, Verdict::Dropped, None, info(&req, denial::FETCH_SESSION_ID_NOT_FOUND));
                record
                    .summary("an incremental fetch in a session not begun on this connection under the policy in force: the client starts a new one")
                    .send();
                return Step::Answer(bytes);
            }
            in_session = true;
        }
        Some((id, epoch)) => {
            if id != 0 {
                sessions.end(id);
            }
            // Epoch 0 asks for a session (-1: none).
            if epoch == 0 {
                new_session = Some(version);
            }
        }
        None => {}
    }
    let judged = policy.check_kafka(&if req.idempotent_producer_id() {
        KafkaRequest::idempotent_producer_id(req.client_id())
    } else {
        KafkaRequest {
            api_key: req.api_key as i16,
            api_version: Some(req.version()),
            client_id: req.client_id(),
            topics: req.topics.iter().map(String::as_str).collect(),
            // An incremental fetch naming nothing new: its topics were judged when the session began.
            cluster_only: req.cluster_only || (in_session && req.topics.is_empty()),
        }
    });
    match judged {
        RequestVerdict::Pass(pass) => {
            Counters::inc(&shared.counters.forwarded);
            emit.record(false, pass.verdict(), pass.reason(), info(&req, 0))
                .rule(pass.rule())
                .summary(pass.summary().to_owned())
                .send();
            Step::Forward(req.expects_response.then(|| Owed {
                api_key: req.api_key,
                version: req.version(),
                correlation_id: req.correlation_id(),
                info: info(&req, 0),
                pass,
                start: Instant::now(),
                session: new_session,
            }))
        }
        RequestVerdict::Deny(Denial { reason, summary, policy: deciding }) => {
            Counters::inc(&shared.counters.denied);
            let answer = if req.expects_response { denial::denial(&req) } else { None };
            let code = answer.as_ref().map_or(0, |(_, c)| *c);
            let record = emit.record(false, Verdict::Dropped, Some(reason), info(&req, code));
            match answer {
                Some((bytes, _)) => {
                    record.rule(deciding.map(Arc::from)).summary(summary).send();
                    Step::Answer(bytes)
                }
                None if !req.expects_response => {
                    record.rule(deciding.map(Arc::from)).summary(summary).send();
                    Step::Nothing
                }
                None => {
                    let why = format!("{summary}; no answer for {:?} in its place: connection closed", req.api_key);
                    record.rule(deciding.map(Arc::from)).summary(why).send();
                    Step::Close
                }
            }
        }
    }
}

/// One client connection, admitted by the listener's accept loop (`state`: its entry in the
/// connection table; requests owed an answer make it busy). Both halves run in this task, so a
/// connection the table lets go of stops whole.
pub async fn serve(
    shared: Arc<Shared>,
    listener: Arc<ListenerConfig>,
    client_stream: TcpStream,
    client: SocketAddr,
    state: Arc<ConnState>,
) {
    state.set_kind(ConnKind::Kafka);
    let Ok(local) = client_stream.local_addr() else { return };
    serve_io(shared, listener, client_stream, client, local, state).await;
}

/// Serves one client connection over any byte stream (a TCP connection; a tunnel stream, whose
/// `listener` says it came authenticated) from `client` to the broker at `local`.
pub async fn serve_io<S>(
    shared: Arc<Shared>,
    listener: Arc<ListenerConfig>,
    client_stream: S,
    client: SocketAddr,
    local: SocketAddr,
    state: Arc<ConnState>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut policy = Policy::new(&shared, &listener, client, local);
    // To a broker on another node that wants its clients authenticated: through the tunnel (whose
    // far end refuses a stream to Kafka rules it cannot enforce yet).
    let via =
        crate::upstream::Via::of(shared.policy.current().as_deref(), shared.tunnel.as_ref(), local, Some(client.ip()));
    let upstream = match via.connect(local, Some(client.ip()), false, shared.limits.connect_timeout()).await {
        Ok(s) => s,
        Err(e) => {
            Counters::inc(&shared.counters.upstream_errors);
            let p = policy.get();
            let emit = Emit { shared: &shared, policy: &p };
            emit.record(false, Verdict::Error, None, KafkaInfo::default())
                .summary(format!("broker {local} unreachable: {e}"))
                .send();
            return;
        }
    };
    let (client_r, client_w) = tokio::io::split(client_stream);
    let (up_r, up_w) = tokio::io::split(upstream);
    let (tx, rx) = mpsc::channel::<Pending>(PIPELINE);
    let first = policy.get();
    let sessions = Sessions::default();
    let requests = requests(&shared, &mut policy, &state, frame::reader(client_r), up_w, tx, &sessions);
    let responses = respond(&shared, &first, &state, rx, frame::reader(up_r), client_w, &sessions);
    tokio::pin!(requests, responses);
    tokio::select! {
        // The response half ended on its own (the broker or the client broke off): the connection
        // is over, the request half stops with it.
        () = &mut responses => {}
        // The client is done: what is owed still goes back.
        () = &mut requests => responses.await,
    }
}

/// The request half: frames from the client, each judged; allowed ones to the broker.
async fn requests<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    shared: &Shared,
    policy: &mut Policy<'_>,
    state: &ConnState,
    mut client: BufReader<R>,
    mut broker: W,
    owed: mpsc::Sender<Pending>,
    sessions: &Sessions,
) {
    let budget = Arc::new(Semaphore::new(OWED_ANSWER_BYTES));
    loop {
        let frame = match frame::next(&mut client).await {
            Ok(f) => f,
            Err(FrameError::Closed) => break,
            Err(e) => {
                Counters::inc(&shared.counters.rejected);
                let p = policy.get();
                let emit = Emit { shared, policy: &p };
                let record =
                    emit.record(false, Verdict::Dropped, Some(DropReason::MalformedRequest), KafkaInfo::default());
                record.summary(format!("{e}: connection closed")).send();
                break;
            }
        };
        state.touch();
        let p = policy.get();
        let pending = match step(shared, &p, sessions, frame.clone()) {
            Step::Forward(owes) => {
                if let Err(e) = frame::write(&mut broker, &frame).await {
                    Counters::inc(&shared.counters.upstream_errors);
                    let emit = Emit { shared, policy: &p };
                    emit.record(false, Verdict::Error, None, KafkaInfo::default())
                        .summary(format!("broker write: {e}"))
                        .send();
                    break;
                }
                owes.map(Pending::Forwarded)
            }
            Step::Answer(bytes) => {
                let share = u32::try_from(bytes.len().min(OWED_ANSWER_BYTES)).unwrap_or(u32::MAX);
                let Ok(permit) = budget.clone().acquire_many_owned(share).await else { break };
                Some(Pending::Injected(bytes, OwedBytes(permit)))
            }
            Step::Nothing => None,
            Step::Close => break,
        };
        if let Some(pending) = pending {
            state.inflight.fetch_add(1, Ordering::Relaxed);
            if owed.send(pending).await.is_err() {
                break;
            }
        }
    }
    // The client is done (or broke the protocol): what is owed still goes back, then both close.
    drop(owed);
    if let Err(e) = broker.shutdown().await {
        crate::log_limited!(debug, error = %e, "Kafka upstream shutdown");
    }
}

/// The response half: what is owed, in request order.
async fn respond<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    shared: &Shared,
    policy: &ConnPolicy,
    state: &ConnState,
    mut owed: mpsc::Receiver<Pending>,
    mut broker: BufReader<R>,
    mut client: W,
    sessions: &Sessions,
) {
    let emit = Emit { shared, policy };
    // A client that stops reading is let go after this long without progress.
    let stalled = shared.limits.request_timeout();
    while let Some(p) = owed.recv().await {
        let (bytes, _share) = match p {
            Pending::Injected(b, share) => (b, Some(share)),
            Pending::Forwarded(o) => match answer(shared, &emit, &mut broker, o, sessions).await {
                Some(b) => (b, None),
                None => break,
            },
        };
        match tokio::time::timeout(stalled, frame::write(&mut client, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                Counters::inc(&shared.counters.downstream_errors);
                break;
            }
            Err(_) => {
                Counters::inc(&shared.counters.downstream_errors);
                crate::log_limited!(info, "Kafka client read nothing for {stalled:?}: connection closed");
                break;
            }
        }
        state.inflight.fetch_sub(1, Ordering::Relaxed);
        state.touch();
    }
    // Closing the receiver stops the request half at its next request.
    owed.close();
    if let Err(e) = client.shutdown().await {
        crate::log_limited!(debug, error = %e, "Kafka client shutdown");
    }
}

/// The broker's answer to one forwarded request, checked; `None` closes the connection.
async fn answer<R: AsyncRead + Unpin>(
    shared: &Shared,
    emit: &Emit<'_>,
    broker: &mut BufReader<R>,
    o: Owed,
    sessions: &Sessions,
) -> Option<Bytes> {
    let Owed { api_key, version, correlation_id, mut info, pass, start, session } = o;
    let frame = match frame::next(broker).await {
        Ok(f) => f,
        Err(e) => {
            Counters::inc(&shared.counters.upstream_errors);
            let why = format!("no answer from the broker ({e}): connection closed");
            emit.record(true, Verdict::Error, None, info).summary(why).send();
            return None;
        }
    };
    match response::inspect(frame, api_key, version, correlation_id, &shared.kafka_topic_ids) {
        Ok(answer) => {
            info.error_code = i32::from(answer.error_code);
            if let (Some(judged_under), Some(id)) = (session, answer.fetch_session) {
                sessions.begun(id, judged_under);
            }
            emit.record(true, pass.verdict(), pass.reason(), info)
                .rule(pass.rule())
                .summary(pass.summary().to_owned())
                .latency(start)
                .send();
            Some(answer.frame)
        }
        Err(e) => {
            Counters::inc(&shared.counters.upstream_errors);
            emit.record(true, Verdict::Error, None, info).summary(format!("{e}: connection closed")).send();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_list_a_bounded_number_of_topics() {
        let many: Vec<String> = (0..1000).map(|i| format!("t{i}")).collect();
        let shown = record_topics(&many);
        assert!(shown.starts_with("t0,t1,") && shown.ends_with(",t15,(+984 more)"), "{shown}");
        assert_eq!(record_topics(&["x".repeat(300)]).len(), 255);
        assert_eq!(record_topics(&["é".repeat(200)]).len(), 254, "cut on a character boundary");
        assert_eq!(record_topics(&["a".into(), "b".into()]), "a,b");
    }
}
