//! What the proxy reads in the broker's responses (everything else passes as it came):
//!
//! * the correlation id, which must be the one of the request it answers (else the connection is
//!   closed: a response out of order would be given to the wrong request);
//! * ApiVersions: the versions the broker offers, narrowed to those this proxy decodes, so that a
//!   client never sends a request the proxy must refuse as undecodable;
//! * Metadata: topic ids and names, for requests that name topics by id;
//! * the error code the flow record of the response carries ([`error_code`]).

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, MetadataResponse, ResponseHeader};
use kafka_protocol::protocol::{Decodable as _, Encodable as _};

use super::request::TopicIds;

/// Why a response cannot be given to the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    /// The header does not decode.
    #[error("the broker's response header does not decode: {0}")]
    Header(String),
    /// Not the answer to the request it should answer.
    #[error("the broker answered correlation id {got}, the request was {want}")]
    Correlation {
        /// The request's.
        want: i32,
        /// The response's.
        got: i32,
    },
}

/// A response the client is given: its frame and the error code it says (the first one that is
/// not 0, top level or per topic / partition; 0 for none).
#[derive(Debug)]
pub struct Inspected {
    /// The frame (narrowed for ApiVersions).
    pub frame: Bytes,
    /// The error code for the flow record.
    pub error_code: i16,
    /// A Fetch answer that opened or continued a fetch session (KIP-227): its id.
    pub fetch_session: Option<i32>,
}

/// Checks one response frame (without its length) to a request of `api_key` `version` with
/// `correlation_id`, learns from it, and returns what to give the client.
pub fn inspect(
    frame: Bytes,
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    ids: &TopicIds,
) -> Result<Inspected, BadResponse> {
    let mut body = frame.clone();
    let header_version = api_key.response_header_version(version);
    let header =
        ResponseHeader::decode(&mut body, header_version).map_err(|e| BadResponse::Header(format!("{e:#}")))?;
    if header.correlation_id != correlation_id {
        return Err(BadResponse::Correlation { want: correlation_id, got: header.correlation_id });
    }
    match api_key {
        ApiKey::Metadata => {
            let mut error_code = 0;
            if let Ok(m) = MetadataResponse::decode(&mut body, version) {
                ids.learn(m.topics.iter().filter_map(|t| t.name.as_ref().map(|n| (t.topic_id, n.to_string()))));
                error_code = first_error(m.topics.iter().map(|t| t.error_code));
            }
            Ok(Inspected { frame, error_code, fetch_session: None })
        }
        ApiKey::ApiVersions => {
            let error_code = peek_i16(&body);
            let frame = narrow_api_versions(&header, header_version, body, version).unwrap_or(frame);
            Ok(Inspected { frame, error_code, fetch_session: None })
        }
        _ => {
            let (error_code, fetch_session) = read_body(api_key, body, version);
            Ok(Inspected { frame, error_code, fetch_session })
        }
    }
}

fn first_error(codes: impl IntoIterator<Item = i16>) -> i16 {
    codes.into_iter().find(|c| *c != 0).unwrap_or(0)
}

fn peek_i16(body: &[u8]) -> i16 {
    body.first_chunk::<2>().map_or(0, |b| i16::from_be_bytes(*b))
}

/// The error a response body says, for the APIs Kafka rules are about (others: 0), and the fetch
/// session a Fetch answer opened or continued. Records are not copied: record batches stay slices of
/// the frame.
fn read_body(api_key: ApiKey, mut body: Bytes, version: i16) -> (i16, Option<i32>) {
    use kafka_protocol::messages::ResponseKind as R;
    let Ok(resp) = R::decode(api_key, &mut body, version) else { return (0, None) };
    let session = match &resp {
        R::Fetch(f) if f.error_code == 0 && f.session_id != 0 => Some(f.session_id),
        _ => None,
    };
    (error_code(&resp), session)
}

fn error_code(resp: &kafka_protocol::messages::ResponseKind) -> i16 {
    use kafka_protocol::messages::ResponseKind as R;
    match resp {
        R::Produce(r) => {
            first_error(r.responses.iter().flat_map(|t| t.partition_responses.iter().map(|p| p.error_code)))
        }
        R::Fetch(r) => first_error(
            std::iter::once(r.error_code)
                .chain(r.responses.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code))),
        ),
        R::ListOffsets(r) => first_error(r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code))),
        R::OffsetCommit(r) => first_error(r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code))),
        R::OffsetFetch(r) => first_error(
            std::iter::once(r.error_code)
                .chain(r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code)))
                .chain(r.groups.iter().map(|g| g.error_code)),
        ),
        R::FindCoordinator(r) => {
            first_error(std::iter::once(r.error_code).chain(r.coordinators.iter().map(|c| c.error_code)))
        }
        R::JoinGroup(r) => r.error_code,
        R::SyncGroup(r) => r.error_code,
        R::Heartbeat(r) => r.error_code,
        R::LeaveGroup(r) => r.error_code,
        _ => 0,
    }
}

/// An ApiVersions answer with each API's range cut to what `kafka-protocol` decodes, and APIs it
/// does not know left out. `None` when the body does not decode at this version (a broker that does
/// not support the client's ApiVersions version answers in v0; the client then asks again) or says
/// an error: it passes as it came.
fn narrow_api_versions(header: &ResponseHeader, header_version: i16, mut body: Bytes, version: i16) -> Option<Bytes> {
    let mut resp = ApiVersionsResponse::decode(&mut body, version).ok()?;
    if resp.error_code != 0 || !body.is_empty() {
        return None;
    }
    resp.api_keys.retain_mut(|a| {
        let Some((min, max)) = ApiKey::try_from(a.api_key).ok().and_then(super::request::decodable_versions) else {
            return false;
        };
        a.min_version = a.min_version.max(min);
        a.max_version = a.max_version.min(max);
        a.min_version <= a.max_version
    });
    let mut out = BytesMut::new();
    header.encode(&mut out, header_version).ok()?;
    resp.encode(&mut out, version).ok()?;
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::api_versions_response::ApiVersion;

    fn response(
        api_key: ApiKey,
        version: i16,
        correlation_id: i32,
        body: &impl kafka_protocol::protocol::Encodable,
    ) -> Bytes {
        let mut h = ResponseHeader::default();
        h.correlation_id = correlation_id;
        let mut buf = BytesMut::new();
        h.encode(&mut buf, api_key.response_header_version(version)).unwrap();
        body.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    fn range(key: i16, min: i16, max: i16) -> ApiVersion {
        let mut a = ApiVersion::default();
        a.api_key = key;
        a.min_version = min;
        a.max_version = max;
        a
    }

    #[test]
    fn api_versions_are_narrowed_to_what_the_proxy_decodes() {
        let mut r = ApiVersionsResponse::default();
        // Produce 0..=99 (beyond what is known), Fetch 4..=5, OffsetCommit 0..=10 (its request type
        // stops at 9), an unknown key 999.
        r.api_keys = vec![range(0, 0, 99), range(1, 4, 5), range(8, 0, 10), range(999, 0, 1)];
        let ids = TopicIds::default();
        for version in [0, 3] {
            let frame = response(ApiKey::ApiVersions, version, 7, &r);
            let out = inspect(frame, ApiKey::ApiVersions, version, 7, &ids).unwrap();
            assert_eq!(out.error_code, 0);
            let mut body = out.frame;
            let h = ResponseHeader::decode(&mut body, ApiKey::ApiVersions.response_header_version(version)).unwrap();
            assert_eq!(h.correlation_id, 7);
            let got = ApiVersionsResponse::decode(&mut body, version).unwrap();
            let keys: Vec<(i16, i16, i16)> =
                got.api_keys.iter().map(|a| (a.api_key, a.min_version, a.max_version)).collect();
            assert_eq!(keys, [(0, 3, 13), (1, 4, 5), (8, 2, 9)], "v{version}");
        }
    }

    #[test]
    fn a_response_to_another_request_is_refused() {
        let frame = response(ApiKey::Heartbeat, 4, 8, &kafka_protocol::messages::HeartbeatResponse::default());
        let err = inspect(frame, ApiKey::Heartbeat, 4, 9, &TopicIds::default()).unwrap_err();
        assert_eq!(err, BadResponse::Correlation { want: 9, got: 8 });
        assert!(inspect(Bytes::from_static(b"\x00"), ApiKey::Heartbeat, 4, 9, &TopicIds::default()).is_err());
    }

    #[test]
    fn metadata_teaches_topic_ids() {
        use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
        let id = uuid::Uuid::from_u128(77);
        let mut t = MetadataResponseTopic::default();
        t.name =
            Some(kafka_protocol::messages::TopicName(kafka_protocol::protocol::StrBytes::from_static_str("orders")));
        t.topic_id = id;
        let mut m = MetadataResponse::default();
        m.topics = vec![t];
        let ids = TopicIds::default();
        let out = inspect(response(ApiKey::Metadata, 12, 1, &m), ApiKey::Metadata, 12, 1, &ids).unwrap();
        assert_eq!(ids.name(&id).as_deref(), Some("orders"));
        assert_eq!(out.error_code, 0);
    }

    #[test]
    fn the_error_a_response_says_is_read() {
        use kafka_protocol::messages::ProduceResponse;
        use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
        let mut p = PartitionProduceResponse::default();
        p.error_code = 3;
        let mut t = TopicProduceResponse::default();
        t.partition_responses = vec![PartitionProduceResponse::default(), p];
        let mut r = ProduceResponse::default();
        r.responses = vec![t];
        let out = inspect(response(ApiKey::Produce, 9, 4, &r), ApiKey::Produce, 9, 4, &TopicIds::default()).unwrap();
        assert_eq!(out.error_code, 3);
        let hb = kafka_protocol::messages::HeartbeatResponse::default().with_error_code(27);
        let out =
            inspect(response(ApiKey::Heartbeat, 4, 5, &hb), ApiKey::Heartbeat, 4, 5, &TopicIds::default()).unwrap();
        assert_eq!(out.error_code, 27);
    }
}
