//! The proxy's answer to a denied Kafka request: a well-formed response of the request's own API
//! key and version, with its correlation id, saying it was not authorized — error 29
//! `TOPIC_AUTHORIZATION_FAILED` per topic and partition where the API carries topics, the group,
//! transactional-id or cluster authorization error where it carries those. The client's connection
//! stays usable; the request never reaches the broker.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiVersionsResponse, CreateTopicsResponse, DeleteTopicsResponse, DescribeGroupsResponse, FetchResponse,
    FindCoordinatorResponse, HeartbeatResponse, InitProducerIdResponse, JoinGroupResponse, LeaveGroupResponse,
    ListGroupsResponse, ListOffsetsResponse, MetadataResponse, OffsetCommitResponse, OffsetFetchResponse,
    ProduceResponse, RequestKind, ResponseHeader, ResponseKind, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::{Encodable as _, StrBytes};

use super::request::Request;

use policy_engine::kafka::{
    CLUSTER_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED, TOPIC_AUTHORIZATION_FAILED,
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
};

/// The response to a denied request (a frame, without its length) and its error code, or none
/// for an API the proxy has no answer for (the connection is then closed: never left hanging).
pub fn denial(req: &Request) -> Option<(Bytes, i16)> {
    let (body, code) = body(req)?;
    let version = req.version();
    let mut header = ResponseHeader::default();
    header.correlation_id = req.correlation_id();
    let mut buf = BytesMut::with_capacity(64);
    header.encode(&mut buf, req.api_key.response_header_version(version)).ok()?;
    body.encode(&mut buf, version).ok()?;
    Some((buf.freeze(), code))
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

/// Kafka's `FETCH_SESSION_ID_NOT_FOUND`: the client starts a new session with a full fetch.
pub const FETCH_SESSION_ID_NOT_FOUND: i16 = 70;

/// The answer to an incremental Fetch in a session the proxy cannot vouch for (not begun on this
/// connection, or begun under another policy): the session is unknown, the client starts a new one
/// with a full fetch, which is judged on every topic it names. `None` for a request that is not a
/// Fetch or whose version has no sessions.
pub fn fetch_session_not_found(req: &Request) -> Option<Bytes> {
    if req.api_key != kafka_protocol::messages::ApiKey::Fetch || req.version() < 7 {
        return None;
    }
    let mut resp = FetchResponse::default();
    resp.error_code = FETCH_SESSION_ID_NOT_FOUND;
    let mut header = ResponseHeader::default();
    header.correlation_id = req.correlation_id();
    let mut buf = BytesMut::with_capacity(32);
    header.encode(&mut buf, req.api_key.response_header_version(req.version())).ok()?;
    resp.encode(&mut buf, req.version()).ok()?;
    Some(buf.freeze())
}

/// A denial's topics, each answering every partition its request named.
fn per_partition<T, P, R, Q>(
    topics: &[T],
    partitions: impl Fn(&T) -> &Vec<P>,
    topic: impl Fn(&T, Vec<Q>) -> R,
    partition: impl Fn(&P) -> Q,
) -> Vec<R> {
    topics.iter().map(|t| topic(t, partitions(t).iter().map(&partition).collect())).collect()
}

/// The response body of a denial.
fn body(req: &Request) -> Option<(ResponseKind, i16)> {
    use kafka_protocol::messages::{
        create_topics_response as ct, delete_topics_response as dt, describe_groups_response as dg,
        fetch_response as f, find_coordinator_response as fc, list_offsets_response as lo, metadata_response as md,
        offset_commit_response as oc, offset_fetch_response as of, produce_response as pr,
    };
    const T: i16 = TOPIC_AUTHORIZATION_FAILED;
    const G: i16 = GROUP_AUTHORIZATION_FAILED;
    Some(match &req.body {
        RequestKind::Produce(r) => {
            let mut resp = ProduceResponse::default();
            resp.responses = per_partition(
                &r.topic_data,
                |t| &t.partition_data,
                |t, ps| {
                    pr::TopicProduceResponse::default()
                        .with_name(t.name.clone())
                        .with_topic_id(t.topic_id)
                        .with_partition_responses(ps)
                },
                |p| {
                    pr::PartitionProduceResponse::default()
                        .with_index(p.index)
                        .with_error_code(T)
                        .with_base_offset(-1)
                        .with_log_append_time_ms(-1)
                        .with_log_start_offset(-1)
                },
            );
            (ResponseKind::Produce(resp), T)
        }
        RequestKind::Fetch(r) => {
            let mut resp = FetchResponse::default();
            resp.session_id = r.session_id;
            resp.responses = per_partition(
                &r.topics,
                |t| &t.partitions,
                |t, ps| {
                    f::FetchableTopicResponse::default()
                        .with_topic(t.topic.clone())
                        .with_topic_id(t.topic_id)
                        .with_partitions(ps)
                },
                |p| {
                    f::PartitionData::default()
                        .with_partition_index(p.partition)
                        .with_error_code(T)
                        .with_high_watermark(-1)
                        .with_last_stable_offset(-1)
                        .with_log_start_offset(-1)
                },
            );
            (ResponseKind::Fetch(resp), T)
        }
        RequestKind::ListOffsets(r) => {
            let mut resp = ListOffsetsResponse::default();
            resp.topics = per_partition(
                &r.topics,
                |t| &t.partitions,
                |t, ps| lo::ListOffsetsTopicResponse::default().with_name(t.name.clone()).with_partitions(ps),
                |p| {
                    lo::ListOffsetsPartitionResponse::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(T)
                        .with_timestamp(-1)
                        .with_offset(-1)
                },
            );
            (ResponseKind::ListOffsets(resp), T)
        }
        RequestKind::Metadata(r) => {
            let mut resp = MetadataResponse::default();
            resp.controller_id = kafka_protocol::messages::BrokerId(-1);
            resp.topics = r
                .topics
                .iter()
                .flatten()
                .map(|t| {
                    let mut tr = md::MetadataResponseTopic::default();
                    tr.error_code = T;
                    tr.name = t.name.clone().or_else(|| Some(name("")));
                    tr.topic_id = t.topic_id;
                    tr
                })
                .collect();
            (ResponseKind::Metadata(resp), T)
        }
        RequestKind::OffsetCommit(r) => {
            let mut resp = OffsetCommitResponse::default();
            resp.topics = per_partition(
                &r.topics,
                |t| &t.partitions,
                |t, ps| {
                    oc::OffsetCommitResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_topic_id(t.topic_id)
                        .with_partitions(ps)
                },
                |p| {
                    oc::OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(T)
                },
            );
            (ResponseKind::OffsetCommit(resp), T)
        }
        RequestKind::OffsetFetch(r) => {
            let mut resp = OffsetFetchResponse::default();
            resp.topics = r
                .topics
                .iter()
                .flatten()
                .map(|t| {
                    let mut tr = of::OffsetFetchResponseTopic::default();
                    tr.name = t.name.clone();
                    tr.partitions = t
                        .partition_indexes
                        .iter()
                        .map(|i| {
                            let mut pp = of::OffsetFetchResponsePartition::default();
                            pp.partition_index = *i;
                            pp.committed_offset = -1;
                            pp.committed_leader_epoch = -1;
                            pp.error_code = T;
                            pp
                        })
                        .collect();
                    tr
                })
                .collect();
            resp.groups = r
                .groups
                .iter()
                .map(|g| {
                    let mut gr = of::OffsetFetchResponseGroup::default();
                    gr.group_id = g.group_id.clone();
                    gr.error_code = T;
                    gr.topics = g
                        .topics
                        .iter()
                        .flatten()
                        .map(|t| {
                            let mut tr = of::OffsetFetchResponseTopics::default();
                            tr.name = t.name.clone();
                            tr.topic_id = t.topic_id;
                            tr.partitions = t
                                .partition_indexes
                                .iter()
                                .map(|i| {
                                    let mut pp = of::OffsetFetchResponsePartitions::default();
                                    pp.partition_index = *i;
                                    pp.committed_offset = -1;
                                    pp.committed_leader_epoch = -1;
                                    pp.error_code = T;
                                    pp
                                })
                                .collect();
                            tr
                        })
                        .collect();
                    gr
                })
                .collect();
            (ResponseKind::OffsetFetch(resp), T)
        }
        RequestKind::FindCoordinator(r) => {
            // Key type 1 is a transactional id, 0 a group. Up to v3 one key and the answer at the
            // top level; from v4 a list of keys, each answered (the top-level fields must stay unset).
            let code = if r.key_type == 1 { TRANSACTIONAL_ID_AUTHORIZATION_FAILED } else { G };
            let mut resp = FindCoordinatorResponse::default();
            if req.version() <= 3 {
                resp.error_code = code;
                resp.node_id = kafka_protocol::messages::BrokerId(-1);
                resp.port = -1;
            }
            resp.coordinators = r
                .coordinator_keys
                .iter()
                .map(|k| {
                    let mut c = fc::Coordinator::default();
                    c.key = k.clone();
                    c.node_id = kafka_protocol::messages::BrokerId(-1);
                    c.port = -1;
                    c.error_code = code;
                    c
                })
                .collect();
            (ResponseKind::FindCoordinator(resp), code)
        }
        RequestKind::JoinGroup(r) => {
            let mut resp = JoinGroupResponse::default();
            resp.error_code = G;
            resp.generation_id = -1;
            resp.member_id = r.member_id.clone();
            (ResponseKind::JoinGroup(resp), G)
        }
        RequestKind::SyncGroup(_) => {
            let mut resp = SyncGroupResponse::default();
            resp.error_code = G;
            (ResponseKind::SyncGroup(resp), G)
        }
        RequestKind::Heartbeat(_) => {
            let mut resp = HeartbeatResponse::default();
            resp.error_code = G;
            (ResponseKind::Heartbeat(resp), G)
        }
        RequestKind::LeaveGroup(_) => {
            let mut resp = LeaveGroupResponse::default();
            resp.error_code = G;
            (ResponseKind::LeaveGroup(resp), G)
        }
        RequestKind::DescribeGroups(r) => {
            let mut resp = DescribeGroupsResponse::default();
            resp.groups = r
                .groups
                .iter()
                .map(|g| {
                    let mut d = dg::DescribedGroup::default();
                    d.group_id = g.clone();
                    d.error_code = G;
                    d
                })
                .collect();
            (ResponseKind::DescribeGroups(resp), G)
        }
        RequestKind::ListGroups(_) => {
            let mut resp = ListGroupsResponse::default();
            resp.error_code = CLUSTER_AUTHORIZATION_FAILED;
            (ResponseKind::ListGroups(resp), CLUSTER_AUTHORIZATION_FAILED)
        }
        RequestKind::ApiVersions(_) => {
            let mut resp = ApiVersionsResponse::default();
            resp.error_code = CLUSTER_AUTHORIZATION_FAILED;
            (ResponseKind::ApiVersions(resp), CLUSTER_AUTHORIZATION_FAILED)
        }
        RequestKind::CreateTopics(r) => {
            let mut resp = CreateTopicsResponse::default();
            resp.topics = r
                .topics
                .iter()
                .map(|t| {
                    let mut c = ct::CreatableTopicResult::default();
                    c.name = t.name.clone();
                    c.error_code = T;
                    c.num_partitions = -1;
                    c.replication_factor = -1;
                    c
                })
                .collect();
            (ResponseKind::CreateTopics(resp), T)
        }
        RequestKind::DeleteTopics(r) => {
            let mut resp = DeleteTopicsResponse::default();
            let names = r.topic_names.iter().map(|n| (Some(n.clone()), uuid::Uuid::nil()));
            let states = r.topics.iter().map(|t| (t.name.clone(), t.topic_id));
            resp.responses = names
                .chain(states)
                .map(|(n, id)| {
                    let mut d = dt::DeletableTopicResult::default();
                    d.name = n;
                    d.topic_id = id;
                    d.error_code = T;
                    d
                })
                .collect();
            (ResponseKind::DeleteTopics(resp), T)
        }
        RequestKind::InitProducerId(r) => {
            // As Kafka answers: an idempotent producer (no transactional id) lacks a cluster right,
            // a transactional one the right to its transactional id.
            let code = if r.transactional_id.is_none() {
                CLUSTER_AUTHORIZATION_FAILED
            } else {
                TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            };
            let mut resp = InitProducerIdResponse::default();
            resp.error_code = code;
            resp.producer_id = kafka_protocol::messages::ProducerId(-1);
            resp.producer_epoch = -1;
            (ResponseKind::InitProducerId(resp), code)
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            use kafka_protocol::messages::offset_for_leader_epoch_response as ofle;
            let mut resp = kafka_protocol::messages::OffsetForLeaderEpochResponse::default();
            resp.topics = per_partition(
                &r.topics,
                |t| &t.partitions,
                |t, ps| ofle::OffsetForLeaderTopicResult::default().with_topic(t.topic.clone()).with_partitions(ps),
                |p| {
                    ofle::EpochEndOffset::default()
                        .with_partition(p.partition)
                        .with_error_code(T)
                        .with_leader_epoch(-1)
                        .with_end_offset(-1)
                },
            );
            (ResponseKind::OffsetForLeaderEpoch(resp), T)
        }
        // Client telemetry (KIP-714): the client backs off and asks again later.
        RequestKind::GetTelemetrySubscriptions(_) => {
            let mut resp = kafka_protocol::messages::GetTelemetrySubscriptionsResponse::default();
            resp.error_code = CLUSTER_AUTHORIZATION_FAILED;
            (ResponseKind::GetTelemetrySubscriptions(resp), CLUSTER_AUTHORIZATION_FAILED)
        }
        RequestKind::PushTelemetry(_) => {
            let mut resp = kafka_protocol::messages::PushTelemetryResponse::default();
            resp.error_code = CLUSTER_AUTHORIZATION_FAILED;
            (ResponseKind::PushTelemetry(resp), CLUSTER_AUTHORIZATION_FAILED)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::request::tests::{frame, produce};
    use crate::kafka::request::{TopicIds, parse};
    use kafka_protocol::messages::{ApiKey, JoinGroupRequest, MetadataRequest, metadata_request::MetadataRequestTopic};
    use kafka_protocol::protocol::Decodable as _;

    fn decode<T: kafka_protocol::protocol::Decodable>(bytes: &Bytes, key: ApiKey, version: i16) -> (i32, T) {
        let mut b = bytes.clone();
        let h = ResponseHeader::decode(&mut b, key.response_header_version(version)).unwrap();
        let body = T::decode(&mut b, version).unwrap();
        assert!(b.is_empty(), "nothing left over");
        (h.correlation_id, body)
    }

    #[test]
    fn denied_produce_gets_topic_authorization_failed_per_partition_in_every_version() {
        let ids = TopicIds::default();
        for version in 3..=13 {
            let r = parse(frame(ApiKey::Produce, version, 77, &produce(&["payments"], 1)), &ids).unwrap();
            let (bytes, code) = denial(&r).unwrap();
            assert_eq!(code, TOPIC_AUTHORIZATION_FAILED);
            let (cid, resp): (i32, ProduceResponse) = decode(&bytes, ApiKey::Produce, version);
            assert_eq!(cid, 77);
            assert_eq!(resp.responses[0].partition_responses[0].error_code, 29, "v{version}");
        }
    }

    #[test]
    fn metadata_and_groups_get_their_errors() {
        let ids = TopicIds::default();
        let mut m = MetadataRequest::default();
        let mut t = MetadataRequestTopic::default();
        t.name = Some(name("payments"));
        m.topics = Some(vec![t]);
        for version in [4, 9, 12] {
            let r = parse(frame(ApiKey::Metadata, version, 5, &m), &ids).unwrap();
            let (bytes, _) = denial(&r).unwrap();
            let (cid, resp): (i32, MetadataResponse) = decode(&bytes, ApiKey::Metadata, version);
            assert_eq!((cid, resp.topics[0].error_code), (5, 29));
        }
        let mut j = JoinGroupRequest::default();
        j.group_id = kafka_protocol::messages::GroupId(StrBytes::from_static_str("g"));
        j.protocol_type = StrBytes::from_static_str("consumer");
        let r = parse(frame(ApiKey::JoinGroup, 5, 6, &j), &ids).unwrap();
        let (bytes, code) = denial(&r).unwrap();
        assert_eq!(code, GROUP_AUTHORIZATION_FAILED);
        let (_, resp): (i32, JoinGroupResponse) = decode(&bytes, ApiKey::JoinGroup, 5);
        assert_eq!(resp.error_code, 30);
    }

    /// A request of `key` naming topic `t` (partition 0) where the API carries topics.
    fn request_naming_t(key: ApiKey) -> Bytes {
        use kafka_protocol::messages::*;
        let t = || name("t");
        let version = key.valid_versions().max.min(9);
        match key {
            ApiKey::Produce => frame(key, version, 9, &produce(&["t"], 1)),
            ApiKey::Fetch => {
                let p = fetch_request::FetchPartition::default().with_partition(0);
                let topic = fetch_request::FetchTopic::default().with_topic(t()).with_partitions(vec![p]);
                frame(key, version, 9, &FetchRequest::default().with_topics(vec![topic]))
            }
            ApiKey::ListOffsets => {
                let p = list_offsets_request::ListOffsetsPartition::default();
                let topic = list_offsets_request::ListOffsetsTopic::default().with_name(t()).with_partitions(vec![p]);
                frame(key, version, 9, &ListOffsetsRequest::default().with_topics(vec![topic]))
            }
            ApiKey::Metadata => {
                let topic = metadata_request::MetadataRequestTopic::default().with_name(Some(t()));
                frame(key, version, 9, &MetadataRequest::default().with_topics(Some(vec![topic])))
            }
            ApiKey::OffsetCommit => {
                let p = offset_commit_request::OffsetCommitRequestPartition::default();
                let topic =
                    offset_commit_request::OffsetCommitRequestTopic::default().with_name(t()).with_partitions(vec![p]);
                frame(key, version, 9, &OffsetCommitRequest::default().with_topics(vec![topic]))
            }
            ApiKey::OffsetFetch => {
                let version = 7;
                let topic = offset_fetch_request::OffsetFetchRequestTopic::default()
                    .with_name(t())
                    .with_partition_indexes(vec![0]);
                frame(key, version, 9, &OffsetFetchRequest::default().with_topics(Some(vec![topic])))
            }
            ApiKey::FindCoordinator => {
                let r =
                    FindCoordinatorRequest::default().with_coordinator_keys(vec![StrBytes::from_static_str("group")]);
                frame(key, 6, 9, &r)
            }
            other => panic!("no request built for {other:?}"),
        }
    }

    /// Cilium's proxylib synthesises a denial for these keys (`kafka_semantics.yaml`,
    /// `deny_response_synthesized_for`): Porin does for each of them, well-formed at the request's
    /// version, for its correlation id, with 29 where the API carries topics. FindCoordinator carries a
    /// group, not a topic: it gets GROUP_AUTHORIZATION_FAILED (30), Kafka's own answer to a group the
    /// client may not use (Cilium sends 29; docs/semantics.md).
    #[test]
    fn every_key_cilium_answers_is_answered() {
        let v = porin_tests::load_vectors("kafka_semantics.yaml");
        let keys = v["topic_handling"]["deny_response_synthesized_for (CreateResponse)"].as_mapping().unwrap();
        assert_eq!(keys.len(), 7);
        let ids = TopicIds::default();
        for (key, what) in keys {
            let key: i16 = key.as_str().unwrap().parse().unwrap();
            let api_key = ApiKey::try_from(key).unwrap();
            let r = parse(request_naming_t(api_key), &ids).unwrap_or_else(|e| panic!("{what:?}: {e}"));
            let (bytes, code) = denial(&r).unwrap_or_else(|| panic!("{what:?}: no denial"));
            let want = if api_key == ApiKey::FindCoordinator { GROUP_AUTHORIZATION_FAILED } else { T_CODE };
            assert_eq!(code, want, "{what:?}");
            let answer = crate::kafka::response::inspect(bytes, api_key, r.version(), 9, &ids)
                .unwrap_or_else(|e| panic!("{what:?}: {e}"));
            assert_eq!(answer.error_code, want, "{what:?}: the response itself says it");
        }
    }

    const T_CODE: i16 = TOPIC_AUTHORIZATION_FAILED;

    #[test]
    fn find_coordinator_is_answered_in_every_version() {
        use kafka_protocol::messages::FindCoordinatorRequest;
        let ids = TopicIds::default();
        for version in 0..=6 {
            let g = StrBytes::from_static_str("g");
            let r = if version >= 4 {
                FindCoordinatorRequest::default().with_coordinator_keys(vec![g])
            } else {
                FindCoordinatorRequest::default().with_key(g)
            };
            let req = parse(frame(ApiKey::FindCoordinator, version, 4, &r), &ids).unwrap();
            let (bytes, code) = denial(&req).unwrap_or_else(|| panic!("v{version}: no answer"));
            assert_eq!(code, GROUP_AUTHORIZATION_FAILED);
            let answer = crate::kafka::response::inspect(bytes, ApiKey::FindCoordinator, version, 4, &ids).unwrap();
            assert_eq!(answer.error_code, GROUP_AUTHORIZATION_FAILED, "v{version}");
        }
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;
    use crate::kafka::request::tests::frame;
    use crate::kafka::request::{TopicIds, parse};
    use kafka_protocol::messages::{ApiKey, FetchRequest};

    #[test]
    fn an_unknown_fetch_session_is_answered_70() {
        let ids = TopicIds::default();
        for version in [7, 12, 16] {
            let f = FetchRequest::default().with_session_id(777).with_session_epoch(3);
            let req = parse(frame(ApiKey::Fetch, version, 21, &f), &ids).unwrap();
            let bytes = fetch_session_not_found(&req).unwrap();
            let answer = crate::kafka::response::inspect(bytes, ApiKey::Fetch, version, 21, &ids).unwrap();
            assert_eq!(answer.error_code, FETCH_SESSION_ID_NOT_FOUND, "v{version}");
        }
    }
}
