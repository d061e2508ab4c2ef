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
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use policy_engine::kafka::{KafkaRequest, api_key_name};
use policy_engine::snapshot::Proto;
use porin_flow::flow::{DropReason, KafkaInfo, Verdict};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use self::frame::FrameError;
use self::request::Request;
use crate::config::ListenerConfig;
use crate::policy::{ConnPolicy, RequestVerdict};
use crate::records::{Counters, Detail, Record, Transport, now_ns};
use crate::service::Shared;

/// Requests in flight per connection before the proxy stops reading the client.
const PIPELINE: usize = 1024;

/// Accepts Kafka connections until the task is dropped.
pub async fn accept_loop(shared: Arc<Shared>, listener: Arc<ListenerConfig>, socket: TcpListener) {
    loop {
        let (stream, client) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                crate::log_limited!(warn, listener = %listener.name, error = %e, "Kafka accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        Counters::inc(&shared.counters.connections);
        let (shared, listener) = (shared.clone(), listener.clone());
        tokio::spawn(async move {
            let Ok(local) = stream.local_addr() else { return };
            serve(shared, listener, stream, client, local).await;
        });
    }
}

/// What the response half owes the client next.
enum Pending {
    /// The broker's next response, for this request.
    Forwarded {
        api_key: ApiKey,
        version: i16,
        correlation_id: i32,
        info: KafkaInfo,
        rule: Option<Arc<str>>,
        start: Instant,
    },
    /// The proxy's answer to a denied request.
    Injected(Bytes),
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
            self.current = Arc::new(ConnPolicy::decide(
                now,
                self.shared.lookup(),
                self.listener,
                self.client,
                self.local,
                Proto::Tcp,
            ));
        }
        self.current.clone()
    }
}

fn info(req: &Request, error_code: i16) -> KafkaInfo {
    let key = req.api_key as i16;
    KafkaInfo {
        error_code: i32::from(error_code),
        api_version: i32::from(req.version()),
        api_key: api_key_name(key).map_or_else(|| key.to_string(), str::to_owned),
        correlation_id: req.correlation_id(),
        topic: req.topics.join(","),
    }
}

#[expect(clippy::too_many_arguments, reason = "one record's fields, named at each call")]
fn emit(
    shared: &Shared,
    policy: &ConnPolicy,
    reply: bool,
    verdict: Verdict,
    reason: Option<DropReason>,
    info: KafkaInfo,
    latency_ns: u64,
    rule: Option<Arc<str>>,
    summary: String,
) {
    shared.records.emit(
        Record {
            time_ns: now_ns(),
            reply,
            verdict,
            reason,
            ends: policy.ends.clone(),
            transport: Transport::Tcp,
            detail: Detail::Kafka(Box::new(info)),
            latency_ns,
            policy: rule,
            summary,
        },
        &shared.counters,
    );
}

/// One client connection.
async fn serve(
    shared: Arc<Shared>,
    listener: Arc<ListenerConfig>,
    client_stream: TcpStream,
    client: SocketAddr,
    local: SocketAddr,
) {
    let mut policy = Policy::new(&shared, &listener, client, local);
    let upstream = match crate::transparent::connect_from(client.ip(), local, shared.limits.connect_timeout()).await {
        Ok(s) => s,
        Err(e) => {
            Counters::inc(&shared.counters.upstream_errors);
            let p = policy.get();
            let summary = format!("broker {local} unreachable: {e}");
            emit(&shared, &p, false, Verdict::Error, None, KafkaInfo::default(), 0, None, summary);
            return;
        }
    };
    let (client_r, client_w) = client_stream.into_split();
    let (up_r, mut up_w) = upstream.into_split();
    let mut client_r = frame::reader(client_r);
    let (tx, rx) = mpsc::channel::<Pending>(PIPELINE);
    let responses = tokio::spawn(respond(shared.clone(), policy.get(), rx, up_r, client_w));
    let ids = &shared.kafka_topic_ids;
    loop {
        let frame = match frame::next(&mut client_r).await {
            Ok(f) => f,
            Err(FrameError::Closed) => break,
            Err(e) => {
                let why = format!("{e}: connection closed");
                Counters::inc(&shared.counters.rejected);
                let p = policy.get();
                emit(
                    &shared,
                    &p,
                    false,
                    Verdict::Dropped,
                    Some(DropReason::MalformedRequest),
                    KafkaInfo::default(),
                    0,
                    None,
                    why,
                );
                break;
            }
        };
        Counters::inc(&shared.counters.requests);
        let req = match request::parse(frame.clone(), ids) {
            Ok(r) => r,
            Err(e) => {
                Counters::inc(&shared.counters.rejected);
                let p = policy.get();
                let summary = format!("{e}: connection closed");
                emit(
                    &shared,
                    &p,
                    false,
                    Verdict::Dropped,
                    Some(DropReason::MalformedRequest),
                    KafkaInfo::default(),
                    0,
                    None,
                    summary,
                );
                break;
            }
        };
        let p = policy.get();
        let topics: Vec<&str> = req.topics.iter().map(String::as_str).collect();
        let judged = p.check_kafka(&KafkaRequest {
            api_key: req.api_key as i16,
            api_version: Some(req.version()),
            client_id: req.client_id(),
            topics,
        });
        match judged {
            RequestVerdict::Allow(rule) => {
                if let Err(e) = frame::write(&mut up_w, &frame).await {
                    Counters::inc(&shared.counters.upstream_errors);
                    emit(
                        &shared,
                        &p,
                        false,
                        Verdict::Error,
                        None,
                        info(&req, 0),
                        0,
                        None,
                        format!("broker write: {e}"),
                    );
                    break;
                }
                Counters::inc(&shared.counters.forwarded);
                emit(&shared, &p, false, Verdict::Forwarded, None, info(&req, 0), 0, rule.clone(), String::new());
                if req.expects_response {
                    let pending = Pending::Forwarded {
                        api_key: req.api_key,
                        version: req.version(),
                        correlation_id: req.correlation_id(),
                        info: info(&req, 0),
                        rule,
                        start: Instant::now(),
                    };
                    if tx.send(pending).await.is_err() {
                        break;
                    }
                }
            }
            RequestVerdict::Deny { reason, summary, policy: deciding } => {
                Counters::inc(&shared.counters.denied);
                let answer = if req.expects_response { denial::denial(&req) } else { None };
                let code = answer.as_ref().map_or(0, |(_, c)| *c);
                let rule = deciding.map(Arc::from);
                emit(&shared, &p, false, Verdict::Dropped, Some(reason), info(&req, code), 0, rule, summary);
                match answer {
                    Some((bytes, _)) => {
                        if tx.send(Pending::Injected(bytes)).await.is_err() {
                            break;
                        }
                    }
                    // acks=0: the client waits for nothing.
                    None if !req.expects_response => {}
                    None => {
                        let summary = format!("no denial answer for {:?}: connection closed", req.api_key);
                        emit(&shared, &p, false, Verdict::Error, None, info(&req, 0), 0, None, summary);
                        break;
                    }
                }
            }
        }
    }
    // The client is done (or broke the protocol): what is owed still goes back, then both close.
    drop(tx);
    if let Err(e) = up_w.shutdown().await {
        crate::log_limited!(debug, error = %e, "Kafka upstream shutdown");
    }
    if let Err(e) = responses.await {
        crate::log_limited!(warn, error = %e, "Kafka response task failed");
    }
}

/// The response half: what is owed, in request order.
async fn respond(
    shared: Arc<Shared>,
    policy: Arc<ConnPolicy>,
    mut rx: mpsc::Receiver<Pending>,
    up_r: tokio::net::tcp::OwnedReadHalf,
    mut client_w: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut up_r = frame::reader(up_r);
    while let Some(p) = rx.recv().await {
        let bytes = match p {
            Pending::Injected(b) => b,
            Pending::Forwarded { api_key, version, correlation_id, mut info, rule, start } => {
                let frame = match frame::next(&mut up_r).await {
                    Ok(f) => f,
                    Err(_) => {
                        Counters::inc(&shared.counters.upstream_errors);
                        let summary = "the broker closed the connection before answering".to_owned();
                        emit(&shared, &policy, true, Verdict::Error, None, info, 0, None, summary);
                        break;
                    }
                };
                let answer = match response::inspect(frame, api_key, version, correlation_id, &shared.kafka_topic_ids) {
                    Ok(f) => f,
                    Err(e) => {
                        Counters::inc(&shared.counters.upstream_errors);
                        emit(
                            &shared,
                            &policy,
                            true,
                            Verdict::Error,
                            None,
                            info,
                            0,
                            None,
                            format!("{e}: connection closed"),
                        );
                        break;
                    }
                };
                info.error_code = i32::from(answer.error_code);
                let latency = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                emit(&shared, &policy, true, Verdict::Forwarded, None, info, latency, rule, String::new());
                answer.frame
            }
        };
        if frame::write(&mut client_w, &bytes).await.is_err() {
            Counters::inc(&shared.counters.downstream_errors);
            break;
        }
    }
    if let Err(e) = client_w.shutdown().await {
        crate::log_limited!(debug, error = %e, "Kafka client shutdown");
    }
}
