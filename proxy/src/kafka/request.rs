//! Kafka requests as the proxy judges them: the frame read off the wire, decoded with the
//! `kafka-protocol` crate (every API and version it knows, flexible versions included), and the
//! topics of the keys Cilium's rules look at (Produce, Fetch, ListOffsets, Metadata, OffsetCommit,
//! OffsetFetch; `policy_engine::kafka`).
//!
//! Topics named by id (Produce v13+, Fetch v13+, OffsetCommit v10+, Metadata, OffsetFetch v10+)
//! are named through the ids the broker's Metadata answers taught ([`TopicIds`]); an id not yet
//! seen stands for no topic a rule names, so the request is denied (fail closed).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind};
use kafka_protocol::protocol::Decodable as _;

/// Topic ids → names, from the brokers' Metadata answers (one map per node proxy).
///
/// Only names Kafka could have (at most 249 of `[a-zA-Z0-9._-]`) are learned. An id once named
/// keeps its name: an answer naming it otherwise poisons it (it then names no topic a rule allows,
/// fail closed), so a broker that lies about ids cannot relabel one the proxy already knows. When
/// full, new ids are not learned (requests naming them are denied) rather than forgetting others.
#[derive(Debug, Default)]
pub struct TopicIds(Mutex<HashMap<[u8; 16], Option<String>>>);

/// Most ids remembered (~30 MB at most).
const MAX_TOPIC_IDS: usize = 100_000;

/// Whether Kafka could have a topic of this name.
pub fn valid_topic_name(name: &str) -> bool {
    (1..=249).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl TopicIds {
    /// The name of a topic id (none for an unknown or poisoned one).
    pub fn name(&self, id: &uuid::Uuid) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(id.as_bytes()).cloned().flatten()
    }

    /// Remembers what a Metadata answer says.
    pub fn learn(&self, pairs: impl IntoIterator<Item = (uuid::Uuid, String)>) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, name) in pairs {
            if id.is_nil() || !valid_topic_name(&name) {
                continue;
            }
            let len = m.len();
            match m.entry(*id.as_bytes()) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if e.get().as_deref() != Some(name.as_str()) {
                        e.insert(None);
                    }
                }
                std::collections::hash_map::Entry::Vacant(e) if len < MAX_TOPIC_IDS => {
                    e.insert(Some(name));
                }
                std::collections::hash_map::Entry::Vacant(_) => {}
            }
        }
    }
}

/// A request the proxy can judge.
#[derive(Debug)]
pub struct Request {
    /// The header.
    pub header: RequestHeader,
    /// The API.
    pub api_key: ApiKey,
    /// The body.
    pub body: RequestKind,
    /// Topics of the keys Cilium's rules look at (named; ids named through [`TopicIds`]).
    pub topics: Vec<String>,
    /// Whether the broker answers it (a Produce with `acks: 0` gets no answer).
    pub expects_response: bool,
    /// A Metadata request (v1+) with an empty topic list: it asks for brokers and the cluster only
    /// (null asks for every topic; so does an empty list in v0).
    pub cluster_only: bool,
}

impl Request {
    /// The correlation id.
    pub fn correlation_id(&self) -> i32 {
        self.header.correlation_id
    }

    /// The API version.
    pub fn version(&self) -> i16 {
        self.header.request_api_version
    }

    /// The client id.
    pub fn client_id(&self) -> Option<&str> {
        self.header.client_id.as_deref()
    }

    /// A Fetch's session (KIP-227): `(session id, epoch)`; epoch > 0 is an incremental fetch that names
    /// only what changed since the last one.
    pub fn fetch_session(&self) -> Option<(i32, i32)> {
        match &self.body {
            RequestKind::Fetch(f) if self.version() >= 7 => Some((f.session_id, f.session_epoch)),
            _ => None,
        }
    }

    /// An InitProducerId without a transactional id: an idempotent producer asking for its id
    /// (judged by [`policy_engine::kafka::KafkaRequest::idempotent_producer_id`]).
    pub fn idempotent_producer_id(&self) -> bool {
        matches!(&self.body, RequestKind::InitProducerId(r) if r.transactional_id.is_none())
    }
}

/// Why a frame cannot be judged (the connection is closed: nothing unjudged reaches the broker).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unparseable {
    /// Shorter than a request header's fixed part.
    #[error("{0} bytes: shorter than a request header")]
    Short(usize),
    /// An API key `kafka-protocol` does not know.
    #[error("unknown API key {0}")]
    UnknownKey(i16),
    /// A version of the API outside what `kafka-protocol` decodes.
    #[error("API key {key} version {version}: not a version this proxy decodes ({min}..={max})")]
    Version {
        /// Key.
        key: i16,
        /// Version.
        version: i16,
        /// Lowest known.
        min: i16,
        /// Highest known.
        max: i16,
    },
    /// The header or the body does not decode, or bytes are left over.
    #[error("{0}")]
    Malformed(String),
    /// More topics, partitions or groups than [`MAX_ENTRIES`].
    #[error("{0} topics, partitions or groups in one request: over the limit of {MAX_ENTRIES}")]
    TooMany(usize),
}

/// The most topics, partitions and groups one request may name (the proxy's answer to a denied one
/// holds an entry for each, and no client needs more in one request).
pub const MAX_ENTRIES: usize = 100_000;

/// How many entries a request names (what a denial answers, per partition where there are any).
fn entries(body: &RequestKind) -> usize {
    let parts = |n: usize, sum: usize| n.saturating_add(sum);
    match body {
        RequestKind::Produce(r) => r.topic_data.iter().fold(0, |a, t| parts(a, t.partition_data.len().max(1))),
        RequestKind::Fetch(r) => r
            .topics
            .iter()
            .map(|t| t.partitions.len().max(1))
            .chain(r.forgotten_topics_data.iter().map(|t| t.partitions.len().max(1)))
            .fold(0, parts),
        RequestKind::ListOffsets(r) => r.topics.iter().fold(0, |a, t| parts(a, t.partitions.len().max(1))),
        RequestKind::OffsetCommit(r) => r.topics.iter().fold(0, |a, t| parts(a, t.partitions.len().max(1))),
        RequestKind::OffsetFetch(r) => r
            .topics
            .iter()
            .flatten()
            .map(|t| t.partition_indexes.len().max(1))
            .chain(r.groups.iter().flat_map(|g| g.topics.iter().flatten()).map(|t| t.partition_indexes.len().max(1)))
            .fold(r.groups.len(), parts),
        RequestKind::Metadata(r) => r.topics.as_ref().map_or(0, Vec::len),
        RequestKind::FindCoordinator(r) => r.coordinator_keys.len(),
        RequestKind::DescribeGroups(r) => r.groups.len(),
        RequestKind::CreateTopics(r) => r.topics.len(),
        RequestKind::DeleteTopics(r) => r.topics.len().max(r.topic_names.len()),
        RequestKind::OffsetForLeaderEpoch(r) => r.topics.iter().fold(0, |a, t| parts(a, t.partitions.len().max(1))),
        _ => 0,
    }
}

/// The versions of `key` whose requests `kafka-protocol` decodes: its request type's own range
/// (`ApiKey::valid_versions` can be wider: OffsetCommit says 10, its request stops at 9). Found
/// once per key by asking the decoder, which refuses a version it does not know before reading.
pub fn decodable_versions(key: ApiKey) -> Option<(i16, i16)> {
    static RANGES: OnceLock<HashMap<i16, (i16, i16)>> = OnceLock::new();
    let ranges = RANGES.get_or_init(|| {
        let mut out = HashMap::new();
        for k in (0..=i16::from(u8::MAX)).filter_map(|k| ApiKey::try_from(k).ok()) {
            let range = k.valid_versions();
            let known = (range.min..=range.max)
                .filter(|v| {
                    let err = RequestKind::decode(k, &mut Bytes::new(), *v).err().map(|e| format!("{e:#}"));
                    !err.is_some_and(|e| e.contains("version not supported"))
                })
                .collect::<Vec<_>>();
            if let (Some(lo), Some(hi)) = (known.first(), known.last()) {
                out.insert(k as i16, (*lo, *hi));
            }
        }
        out
    });
    ranges.get(&(key as i16)).copied()
}

/// Decodes one request frame (the bytes after the 4-byte length).
pub fn parse(frame: Bytes, ids: &TopicIds) -> Result<Request, Unparseable> {
    let (Some(&[k0, k1, v0, v1]), true) = (frame.first_chunk::<4>(), frame.len() >= 8) else {
        return Err(Unparseable::Short(frame.len()));
    };
    let key = i16::from_be_bytes([k0, k1]);
    let version = i16::from_be_bytes([v0, v1]);
    let api_key = ApiKey::try_from(key).map_err(|()| Unparseable::UnknownKey(key))?;
    let (min, max) = decodable_versions(api_key).unwrap_or((0, -1));
    if version < min || version > max {
        return Err(Unparseable::Version { key, version, min, max });
    }
    let mut buf = frame;
    let header = RequestHeader::decode(&mut buf, api_key.request_header_version(version))
        .map_err(|e| Unparseable::Malformed(format!("request header: {e:#}")))?;
    let body = RequestKind::decode(api_key, &mut buf, version)
        .map_err(|e| Unparseable::Malformed(format!("{api_key:?} v{version}: {e:#}")))?;
    if !buf.is_empty() {
        return Err(Unparseable::Malformed(format!("{api_key:?} v{version}: {} bytes after the request", buf.len())));
    }
    let n = entries(&body);
    if n > MAX_ENTRIES {
        return Err(Unparseable::TooMany(n));
    }
    let expects_response = !matches!(&body, RequestKind::Produce(p) if p.acks == 0);
    let topics = topics(&body, ids);
    let cluster_only =
        matches!(&body, RequestKind::Metadata(m) if version >= 1 && m.topics.as_ref().is_some_and(Vec::is_empty));
    Ok(Request { header, api_key, body, topics, expects_response, cluster_only })
}

/// The names a topic entry stands for: its name, and the name of its id when it has one (a broker
/// resolves by id when one is set, so both are judged). An id the proxy has not learned (or that is
/// poisoned) names `<topic id ...>`, which no rule allows.
fn named(name: &str, id: &uuid::Uuid, ids: &TopicIds) -> impl Iterator<Item = String> {
    let by_name = (!name.is_empty() || id.is_nil()).then(|| name.to_owned());
    let by_id = (!id.is_nil()).then(|| ids.name(id).unwrap_or_else(|| format!("<topic id {id}>")));
    by_name.into_iter().chain(by_id)
}

/// The topics Cilium's Kafka parser extracts (`setTopics`: keys 0, 1, 2, 3, 8, 9); other keys carry
/// none as far as rules are concerned.
fn topics(body: &RequestKind, ids: &TopicIds) -> Vec<String> {
    let mut out: Vec<String> = match body {
        RequestKind::Produce(r) => r.topic_data.iter().flat_map(|t| named(&t.name, &t.topic_id, ids)).collect(),
        RequestKind::Fetch(r) => r
            .topics
            .iter()
            .flat_map(|t| named(&t.topic, &t.topic_id, ids))
            .chain(r.forgotten_topics_data.iter().flat_map(|t| named(&t.topic, &t.topic_id, ids)))
            .collect(),
        RequestKind::ListOffsets(r) => r.topics.iter().map(|t| t.name.to_string()).collect(),
        // No list (or an empty one) asks about every topic: no topic a rule could consume.
        RequestKind::Metadata(r) => r
            .topics
            .iter()
            .flatten()
            .flat_map(|t| named(t.name.as_deref().map_or("", |n| n.as_str()), &t.topic_id, ids))
            .collect(),
        RequestKind::OffsetCommit(r) => r.topics.iter().flat_map(|t| named(&t.name, &t.topic_id, ids)).collect(),
        RequestKind::OffsetFetch(r) => r
            .topics
            .iter()
            .flatten()
            .map(|t| t.name.to_string())
            .chain(
                r.groups.iter().flat_map(|g| g.topics.iter().flatten()).flat_map(|t| named(&t.name, &t.topic_id, ids)),
            )
            .collect(),
        _ => Vec::new(),
    };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{MetadataRequest, ProduceRequest, TopicName};
    use kafka_protocol::protocol::{Encodable as _, StrBytes};

    /// A request frame as a client sends it (without the length).
    pub(crate) fn frame(
        key: ApiKey,
        version: i16,
        correlation_id: i32,
        body: &impl kafka_protocol::protocol::Encodable,
    ) -> Bytes {
        let mut h = RequestHeader::default();
        h.request_api_key = key as i16;
        h.request_api_version = version;
        h.correlation_id = correlation_id;
        h.client_id = Some(StrBytes::from_static_str("test-client"));
        let mut buf = BytesMut::new();
        h.encode(&mut buf, key.request_header_version(version)).unwrap();
        body.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    pub(crate) fn produce(topics: &[&str], acks: i16) -> ProduceRequest {
        let mut p = ProduceRequest::default();
        p.acks = acks;
        p.timeout_ms = 1000;
        p.topic_data = topics
            .iter()
            .map(|t| {
                let mut d = TopicProduceData::default();
                d.name = TopicName(StrBytes::from_string((*t).to_owned()));
                let mut part = PartitionProduceData::default();
                part.index = 0;
                d.partition_data = vec![part];
                d
            })
            .collect();
        p
    }

    #[test]
    fn requests_decode_with_their_topics() {
        let ids = TopicIds::default();
        for version in [3, 7, 9, 12] {
            let r = parse(frame(ApiKey::Produce, version, 42, &produce(&["payments", "orders", "orders"], 1)), &ids)
                .unwrap();
            assert_eq!((r.api_key, r.version(), r.correlation_id()), (ApiKey::Produce, version, 42));
            assert_eq!(r.client_id(), Some("test-client"));
            assert_eq!(r.topics, ["orders", "payments"], "v{version}");
            assert!(r.expects_response);
        }
        let r = parse(frame(ApiKey::Produce, 9, 1, &produce(&["orders"], 0)), &ids).unwrap();
        assert!(!r.expects_response, "acks=0 gets no answer");
        // Metadata for every topic (null) names none; for no topic (empty, v1+) asks for the cluster only.
        let mut every = MetadataRequest::default();
        every.topics = None;
        let r = parse(frame(ApiKey::Metadata, 12, 2, &every), &ids).unwrap();
        assert!(r.topics.is_empty() && !r.cluster_only);
        let mut none = MetadataRequest::default();
        none.topics = Some(Vec::new());
        assert!(parse(frame(ApiKey::Metadata, 12, 2, &none), &ids).unwrap().cluster_only);
        assert!(!parse(frame(ApiKey::Metadata, 0, 2, &none), &ids).unwrap().cluster_only, "v0: empty is every topic");
    }

    #[test]
    fn topics_named_by_id_are_named_from_metadata_or_by_no_rule() {
        let ids = TopicIds::default();
        let id = uuid::Uuid::from_u128(0x1234);
        let mut p = produce(&[""], 1);
        p.topic_data[0].topic_id = id;
        let r = parse(frame(ApiKey::Produce, 13, 3, &p), &ids).unwrap();
        assert!(r.topics[0].starts_with("<topic id"), "{:?}", r.topics);
        ids.learn([(id, "orders".to_owned())]);
        let r = parse(frame(ApiKey::Produce, 13, 3, &p), &ids).unwrap();
        assert_eq!(r.topics, ["orders"]);
        // A second answer naming the id otherwise poisons it; names Kafka cannot have are not learned.
        ids.learn([(id, "payments".to_owned())]);
        assert_eq!(ids.name(&id), None);
        let other = uuid::Uuid::from_u128(0x99);
        ids.learn([(other, "a/b".to_owned()), (other, "x".repeat(250))]);
        assert_eq!(ids.name(&other), None);
        // A Metadata topic with a name and an id stands for both.
        let known = uuid::Uuid::from_u128(0x42);
        ids.learn([(known, "secret".to_owned())]);
        let t = MetadataRequestTopic::default()
            .with_name(Some(TopicName(StrBytes::from_static_str("public"))))
            .with_topic_id(known);
        let r = parse(frame(ApiKey::Metadata, 12, 4, &MetadataRequest::default().with_topics(Some(vec![t]))), &ids)
            .unwrap();
        assert_eq!(r.topics, ["public", "secret"]);
    }

    #[test]
    fn what_cannot_be_judged_is_named() {
        let ids = TopicIds::default();
        assert_eq!(parse(Bytes::from_static(b"\0\0"), &ids).unwrap_err(), Unparseable::Short(2));
        assert!(matches!(
            parse(Bytes::from_static(&[0x7f, 0, 0, 0, 0, 0, 0, 1]), &ids),
            Err(Unparseable::UnknownKey(_))
        ));
        assert!(matches!(
            parse(Bytes::from_static(&[0, 0, 0x7f, 0, 0, 0, 0, 1]), &ids),
            Err(Unparseable::Version { .. })
        ));
        // A truncated body.
        let f = frame(ApiKey::Produce, 9, 1, &produce(&["orders"], 1));
        assert!(matches!(parse(f.slice(..f.len() - 3), &ids), Err(Unparseable::Malformed(_))));
        // A count of 2^31 - 1 topics in 14 bytes: refused before any memory is reserved for it
        // (proxy/vendor/kafka-protocol/PORIN-PATCH.md).
        let huge = Bytes::from_static(&[0, 3, 0, 0, 0, 0, 0xff, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]);
        assert!(matches!(parse(huge, &ids), Err(Unparseable::Malformed(m)) if m.contains("exceeds")));
        // The decoder's own ranges: OffsetCommit's request stops at 9 whatever the key table says.
        assert_eq!(decodable_versions(ApiKey::OffsetCommit), Some((2, 9)));
        assert_eq!(decodable_versions(ApiKey::Produce), Some((3, 13)));
        assert!(parse(frame(ApiKey::Produce, 9, 1, &produce(&["o"], 1)), &ids).is_ok());
        // Too many partitions for one request.
        let mut p = produce(&["orders"], 1);
        p.topic_data[0].partition_data = vec![PartitionProduceData::default(); MAX_ENTRIES + 1];
        assert_eq!(parse(frame(ApiKey::Produce, 9, 1, &p), &ids).unwrap_err(), Unparseable::TooMany(MAX_ENTRIES + 1));
        // Trailing bytes.
        let mut long = BytesMut::from(&f[..]);
        long.extend_from_slice(b"xx");
        assert!(matches!(parse(long.freeze(), &ids), Err(Unparseable::Malformed(_))));
    }
}
