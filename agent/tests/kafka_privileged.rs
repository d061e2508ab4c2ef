//! Kafka L7 policy end to end: a real broker (tansu) in the `kafka` pod, real clients
//! (confluent-kafka / librdkafka and kafka-python, `scripts/kafka-client.py`) in the others, and raw
//! Kafka requests (encoded with `kafka-protocol`) where a test needs one exact request. The datapath
//! hands connections to the broker to the proxy's Kafka listener, which judges every request before
//! anything reaches the broker. Root only; in CI (`CI=true`) always.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{Lab, porin, privileged};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, FetchRequest, FetchResponse, MetadataRequest, MetadataResponse,
    ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TopicName, fetch_request, metadata_request,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType};
use serde_json::Value;

fn kafka_lab(tag: &str) -> Lab {
    let text = std::fs::read_to_string(common::repo().join("config/labs/kafka.yaml")).unwrap();
    Lab::up(tag, &text.replace("../examples/", "@REPO@/config/examples/"))
}

/// `scripts/kafka-client.py` in a pod: its JSON answer.
fn client(lab: &Lab, pod: &str, args: &[&str]) -> Value {
    let script = common::repo().join("scripts/kafka-client.py");
    let mut a = vec!["python3", script.to_str().unwrap()];
    a.extend_from_slice(args);
    let o = lab.exec(pod, &a);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{pod} {args:?}: {out}{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{pod} {args:?}: {e}: {out}"))
}

fn error_codes(v: &Value) -> Vec<i64> {
    v["errors"].as_array().unwrap().iter().map(|e| e["code"].as_i64().unwrap()).collect()
}

fn kafka_flows(lab: &Lab) -> Vec<Value> {
    let o = porin().args(["observe", "-o", "json", "--lab", &lab.name, "--protocol", "kafka"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"].clone())
        .collect()
}

/// A request frame with its length.
fn request(key: ApiKey, version: i16, correlation_id: i32, client_id: &str, body: &impl Encodable) -> Vec<u8> {
    let mut h = RequestHeader::default();
    h.request_api_key = key as i16;
    h.request_api_version = version;
    h.correlation_id = correlation_id;
    h.client_id = Some(StrBytes::from_string(client_id.to_owned()));
    let mut buf = BytesMut::new();
    h.encode(&mut buf, key.request_header_version(version)).unwrap();
    body.encode(&mut buf, version).unwrap();
    let mut out = u32::try_from(buf.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(&buf);
    out
}

/// Reads one response frame; `None` when the proxy closed the connection.
fn response(s: &mut TcpStream) -> Option<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    Some(Bytes::from(buf))
}

/// A response's correlation id and body.
fn decode<T: Decodable>(frame: Bytes, key: ApiKey, version: i16) -> (i32, T) {
    let mut b = frame;
    let h = ResponseHeader::decode(&mut b, key.response_header_version(version)).unwrap();
    (h.correlation_id, T::decode(&mut b, version).unwrap())
}

/// A record batch of one record with `value`.
fn batch(value: &[u8]) -> Bytes {
    let record = Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: 0,
        key: None,
        value: Some(Bytes::copy_from_slice(value)),
        headers: Default::default(),
    };
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        [&record],
        &RecordEncodeOptions { version: 2, compression: Compression::None },
    )
    .unwrap();
    buf.freeze()
}

fn produce(topics: &[&str], value: &[u8]) -> ProduceRequest {
    let mut p = ProduceRequest::default();
    p.acks = 1;
    p.timeout_ms = 5000;
    p.topic_data = topics
        .iter()
        .map(|t| {
            let mut d = TopicProduceData::default();
            d.name = TopicName(StrBytes::from_string((*t).to_owned()));
            let mut part = PartitionProduceData::default();
            part.index = 0;
            part.records = Some(batch(value));
            d.partition_data = vec![part];
            d
        })
        .collect();
    p
}

/// Per topic, the error code of each partition.
fn produce_errors(r: &ProduceResponse) -> Vec<(String, i16)> {
    r.responses
        .iter()
        .flat_map(|t| t.partition_responses.iter().map(move |p| (t.name.to_string(), p.error_code)))
        .collect()
}

fn metadata(topics: &[&str]) -> MetadataRequest {
    let mut m = MetadataRequest::default();
    m.topics = Some(
        topics
            .iter()
            .map(|t| {
                let mut mt = metadata_request::MetadataRequestTopic::default();
                mt.name = Some(TopicName(StrBytes::from_string((*t).to_owned())));
                mt
            })
            .collect(),
    );
    m
}

fn fetch(topic: &str) -> FetchRequest {
    let mut f = FetchRequest::default();
    f.max_wait_ms = 10;
    f.max_bytes = 1 << 20;
    let mut t = fetch_request::FetchTopic::default();
    t.topic = TopicName(StrBytes::from_string(topic.to_owned()));
    let mut p = fetch_request::FetchPartition::default();
    p.partition = 0;
    p.partition_max_bytes = 1 << 20;
    t.partitions = vec![p];
    f.topics = vec![t];
    f
}

fn connect(lab: &Lab, pod: &str) -> TcpStream {
    let kafka: SocketAddr = format!("{}:9092", lab.addr("kafka", false)).parse().unwrap();
    let s = lab.tcp(pod, kafka).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[test]
fn kafka_lab_with_two_real_clients_privileged() {
    if !privileged() {
        return;
    }
    let lab = kafka_lab("kafka");
    for lib in ["confluent", "python"] {
        // The producer produces to orders; payments is refused with TOPIC_AUTHORIZATION_FAILED.
        let v =
            client(&lab, "producer", &["produce", "--lib", lib, "--topic", "orders", "--count", "3", "--value", lib]);
        assert_eq!((v["delivered"].as_i64(), error_codes(&v)), (Some(3), vec![]), "{lib}: {v}");
        let v = client(&lab, "producer", &["produce", "--lib", lib, "--topic", "payments", "--timeout", "5"]);
        assert_eq!(v["delivered"], 0, "{lib}: {v}");
        assert!(!error_codes(&v).is_empty() && error_codes(&v).iter().all(|c| *c == 29), "{lib}: {v}");

        // The consumer reads what the producer wrote, in a consumer group (FindCoordinator, JoinGroup,
        // SyncGroup, Heartbeat, OffsetFetch, ListOffsets, Fetch, OffsetCommit), and commits.
        let group = format!("group-{lib}");
        let v = client(
            &lab,
            "consumer",
            &["consume", "--lib", lib, "--topic", "orders", "--count", "3", "--group", &group],
        );
        let msgs: Vec<&str> = v["messages"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(msgs.iter().filter(|m| m.starts_with(lib)).count() >= 3 || lib == "python", "{lib}: {v}");
        assert!(msgs.len() >= 3, "{lib}: {v}");
        assert_eq!((v["committed"].as_bool(), error_codes(&v)), (Some(true), vec![]), "{lib}: {v}");
        // ... and may not produce: librdkafka is refused the Produce (29); kafka-python, an
        // idempotent producer, already its producer id (31, as Kafka answers it).
        let v = client(&lab, "consumer", &["produce", "--lib", lib, "--topic", "orders", "--timeout", "5"]);
        assert_eq!(v["delivered"], 0, "{lib}: {v}");
        let want = if lib == "confluent" { 29 } else { 31 };
        assert!(!error_codes(&v).is_empty() && error_codes(&v).iter().all(|c| *c == want), "{lib}: {v}");
    }
    // The consumer's group read everything both clients produced.
    let v = client(&lab, "consumer", &["consume", "--topic", "orders", "--count", "6", "--group", "all"]);
    let msgs: Vec<&str> = v["messages"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(msgs, ["confluent-0", "confluent-1", "confluent-2", "python-0", "python-1", "python-2"], "{v}");

    // Bootstrapped over IPv6, the client goes where the Metadata answer points (the broker's IPv4
    // address): that connection is intercepted and judged too.
    let (kafka4, kafka6) = (lab.addr("kafka", false), lab.addr("kafka", true));
    let bootstrap = format!("[{kafka6}]:9092");
    let v = client(&lab, "producer", &["produce", "--topic", "orders", "--bootstrap", &bootstrap, "--value", "v6"]);
    assert_eq!(v["delivered"], 1, "{v}");
    let flows = kafka_flows(&lab);
    let to = |key: &str, ip: &str| {
        flows
            .iter()
            .any(|f| f["l7"]["kafka"]["api_key"] == key && f["IP"]["destination"] == ip && f["verdict"] == "FORWARDED")
    };
    assert!(to("metadata", &kafka6) && to("produce", &kafka4), "{flows:#?}");

    // The intruder never reaches the broker: dropped in the kernel.
    let seq = lab.last_seq();
    let v = client(&lab, "intruder", &["produce", "--topic", "orders", "--timeout", "3"]);
    assert_eq!(v["delivered"], 0, "{v}");
    let intruder = lab.identity("intruder");
    let drop = lab.wait_event(seq, |e| e["verdict"] == "DROPPED" && e["source"]["identity"] == intruder);
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED");

    // Every request is in the records: the denied Produce with its topic, error and rule.
    let flows = kafka_flows(&lab);
    let denied = flows
        .iter()
        .find(|f| {
            f["verdict"] == "DROPPED"
                && f["l7"]["kafka"]["topic"] == "payments"
                && f["l7"]["kafka"]["api_key"] == "produce"
        })
        .unwrap_or_else(|| panic!("no denied produce to payments: {flows:#?}"));
    assert_eq!(denied["l7"]["kafka"]["error_code"], 29);
    assert_eq!(denied["drop_reason_desc"], "POLICY_DENIED");
    assert!(flows.iter().any(|f| f["verdict"] == "FORWARDED"
        && f["l7"]["type"] == "RESPONSE"
        && f["l7"]["kafka"]["api_key"] == "fetch"
        && f["l7"]["kafka"]["topic"] == "orders"));

    // The same in the node's metrics, scraped from the machine (the lab reports where).
    let url = lab.status()["proxy"]["metrics"].as_str().expect("the lab reports its metrics URL").to_owned();
    let o = std::process::Command::new("curl").args(["-sS", "-m", "5", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let count = |prefix: &str| -> f64 {
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    assert!(
        count(r#"hubble_kafka_requests_total{topic="payments",api_key="produce",error_code="29",reporter="server"}"#)
            >= 1.0,
        "{text}"
    );
    assert!(count(r#"hubble_kafka_requests_total{topic="orders",api_key="fetch",error_code="0""#) >= 1.0, "{text}");
    assert!(count("hubble_kafka_request_duration_seconds_count") >= 1.0, "{text}");

    // The agent's metrics count the kernel's flows: the intruder's drops among them.
    let url = lab.status()["agent"]["metrics"].as_str().expect("the lab reports the agent's metrics URL").to_owned();
    let o = std::process::Command::new("curl").args(["-sS", "-m", "5", &url]).output().unwrap();
    let agent = String::from_utf8_lossy(&o.stdout);
    let sum = |prefix: &str| -> f64 {
        agent.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    assert!(sum(r#"hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"}"#) >= 1.0, "{agent}");
    assert!(
        sum(r#"hubble_flows_processed_total{protocol="tcp",type="L3_L4",subtype="",verdict="REDIRECTED"}"#) >= 1.0,
        "{agent}"
    );
    // What it follows from elsewhere (within a second): the kernel ring buffer's lost events and
    // the policy version.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut agent = agent.into_owned();
    while !agent.lines().any(|l| l.starts_with(r#"hubble_lost_events_total{source="perf_event_ring_buffer"} "#)) {
        assert!(std::time::Instant::now() < deadline, "{agent}");
        std::thread::sleep(Duration::from_millis(200));
        let o = std::process::Command::new("curl").args(["-sS", "-m", "5", &url]).output().unwrap();
        agent = String::from_utf8_lossy(&o.stdout).into_owned();
    }
    let version = agent.lines().find_map(|l| l.strip_prefix("porin_policy_version ")).unwrap_or("0");
    assert!(version.parse::<f64>().unwrap() >= 1.0, "{agent}");
}

#[test]
fn kafka_requests_are_judged_one_by_one_in_order_privileged() {
    if !privileged() {
        return;
    }
    let lab = kafka_lab("kafkaraw");
    // The producer also may produce to audit, with client id auditor and Produce v9 only.
    let policy = std::fs::read_to_string(common::repo().join("config/examples/kafka/lab-topics.yaml")).unwrap();
    let policy = policy.replace(
        "        - role: produce\n          topic: orders\n",
        "        - role: produce\n          topic: orders\n        - apiKey: produce\n          apiVersion: \"9\"\n          clientID: auditor\n          topic: audit\n",
    );
    lab.apply(&[&policy]);

    // Pipelined on one connection, allowed and denied mixed: the answers come in request order,
    // the denied ones from the proxy, the allowed ones from the broker.
    let mut s = connect(&lab, "producer");
    let mut burst = Vec::new();
    burst.extend(request(ApiKey::ApiVersions, 3, 1, "raw", &ApiVersionsRequest::default()));
    burst.extend(request(ApiKey::Metadata, 12, 2, "raw", &metadata(&["orders"])));
    burst.extend(request(ApiKey::Produce, 9, 3, "raw", &produce(&["orders", "payments"], b"both")));
    burst.extend(request(ApiKey::Produce, 9, 4, "raw", &produce(&["payments"], b"payments")));
    burst.extend(request(ApiKey::Produce, 9, 5, "raw", &produce(&["orders"], b"raw-allowed")));
    burst.extend(request(ApiKey::Fetch, 12, 6, "raw", &fetch("orders")));
    burst.extend(request(ApiKey::Produce, 9, 7, "raw", &produce(&["orders"], b"raw-after")));
    s.write_all(&burst).unwrap();

    let (cid, v): (i32, ApiVersionsResponse) = decode(response(&mut s).unwrap(), ApiKey::ApiVersions, 3);
    assert_eq!((cid, v.error_code), (1, 0));
    let produce_range = v.api_keys.iter().find(|a| a.api_key == 0).unwrap();
    assert!(produce_range.max_version <= ApiKey::Produce.valid_versions().max, "narrowed to what the proxy decodes");
    let (cid, m): (i32, MetadataResponse) = decode(response(&mut s).unwrap(), ApiKey::Metadata, 12);
    assert_eq!((cid, m.topics.len(), m.topics[0].error_code), (2, 1, 0));
    let (cid, p): (i32, ProduceResponse) = decode(response(&mut s).unwrap(), ApiKey::Produce, 9);
    assert_eq!(cid, 3);
    assert_eq!(produce_errors(&p), [("orders".into(), 29), ("payments".into(), 29)], "one denied topic denies all");
    let (cid, p): (i32, ProduceResponse) = decode(response(&mut s).unwrap(), ApiKey::Produce, 9);
    assert_eq!((cid, produce_errors(&p)), (4, vec![("payments".into(), 29)]));
    let (cid, p): (i32, ProduceResponse) = decode(response(&mut s).unwrap(), ApiKey::Produce, 9);
    assert_eq!((cid, produce_errors(&p)), (5, vec![("orders".into(), 0)]));
    let (cid, f): (i32, FetchResponse) = decode(response(&mut s).unwrap(), ApiKey::Fetch, 12);
    assert_eq!((cid, f.responses[0].partitions[0].error_code), (6, 29), "the producer may not fetch");
    let (cid, p): (i32, ProduceResponse) = decode(response(&mut s).unwrap(), ApiKey::Produce, 9);
    assert_eq!((cid, produce_errors(&p)), (7, vec![("orders".into(), 0)]), "the connection stays usable");

    // clientID and apiVersion rules: audit only from auditor, only at v9.
    s.write_all(&request(ApiKey::Produce, 9, 8, "auditor", &produce(&["audit"], b"audit"))).unwrap();
    let (_, p): (i32, ProduceResponse) = decode(response(&mut s).unwrap(), ApiKey::Produce, 9);
    assert_eq!(produce_errors(&p), [("audit".into(), 0)], "auditor, v9");
    s.write_all(&request(ApiKey::Produce, 9, 9, "someone", &produce(&["audit"], b"audit"))).unwrap();
    let (_, p): (i32, ProduceResponse) = decode(response(&mut s).unwrap(), ApiKey::Produce, 9);
    assert_eq!(produce_errors(&p), [("audit".into(), 29)], "another client id");
    s.write_all(&request(ApiKey::Produce, 8, 10, "auditor", &produce(&["audit"], b"audit"))).unwrap();
    let (_, p): (i32, ProduceResponse) = decode(response(&mut s).unwrap(), ApiKey::Produce, 8);
    assert_eq!(produce_errors(&p), [("audit".into(), 29)], "another version");

    // A 1 MiB record batch passes whole.
    let big = vec![b'k'; 1 << 20];
    s.write_all(&request(ApiKey::Produce, 9, 11, "raw", &produce(&["orders"], &big))).unwrap();
    let (cid, p): (i32, ProduceResponse) = decode(response(&mut s).unwrap(), ApiKey::Produce, 9);
    assert_eq!((cid, produce_errors(&p)), (11, vec![("orders".into(), 0)]), "1 MiB batch");
    drop(s);

    // An incremental fetch (KIP-227) names only what changed since the session began: in a session
    // the proxy did not see begin, under the policy in force, it is answered
    // FETCH_SESSION_ID_NOT_FOUND and the client must start over with a full fetch, judged whole.
    let mut c = connect(&lab, "consumer");
    let mut incremental = fetch("orders");
    incremental.session_id = 777;
    incremental.session_epoch = 3;
    incremental.topics.clear();
    c.write_all(&request(ApiKey::Fetch, 12, 21, "raw", &incremental)).unwrap();
    let (cid, f): (i32, FetchResponse) = decode(response(&mut c).unwrap(), ApiKey::Fetch, 12);
    assert_eq!((cid, f.error_code, f.responses.len()), (21, 70, 0));
    c.write_all(&request(ApiKey::Fetch, 12, 22, "raw", &fetch("orders"))).unwrap();
    // (the broker's answer: its header, then throttle time and the top-level error code)
    let mut b = response(&mut c).unwrap();
    let h = ResponseHeader::decode(&mut b, ApiKey::Fetch.response_header_version(12)).unwrap();
    let error = i16::from_be_bytes([b[4], b[5]]);
    assert_eq!((h.correlation_id, error), (22, 0), "a full fetch on the same connection is judged and served");
    drop(c);

    // What the broker holds: the allowed records, none of the denied ones.
    let v = client(
        &lab,
        "consumer",
        &["consume", "--topic", "orders", "--count", "4", "--group", "check", "--timeout", "8"],
    );
    let sizes: Vec<usize> = v["messages"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().len()).collect();
    let texts: Vec<&str> = v["messages"].as_array().unwrap().iter().filter_map(Value::as_str).take(2).collect();
    assert_eq!(texts, ["raw-allowed", "raw-after"], "{v}");
    assert_eq!(sizes.get(2), Some(&(1 << 20)), "the 1 MiB record");
    assert_eq!(sizes.len(), 3, "nothing else: the denied batches never reached the broker: {v}");
}

#[test]
fn kafka_frames_that_cannot_be_judged_close_the_connection_privileged() {
    if !privileged() {
        return;
    }
    let lab = kafka_lab("kafkabad");
    let seq_records = kafka_flows(&lab).len();
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("garbage body", {
            let mut f = request(ApiKey::Produce, 9, 1, "x", &produce(&["orders"], b"x"));
            let n = f.len();
            f.truncate(n - 5);
            let len = u32::try_from(f.len() - 4).unwrap().to_be_bytes();
            f[..4].copy_from_slice(&len);
            f
        }),
        ("unknown api key", [0, 0, 0, 8, 0x7f, 0x7f, 0, 0, 0, 0, 0, 1].to_vec()),
        ("unknown version", [0, 0, 0, 8, 0, 0, 0x7f, 0, 0, 0, 0, 1].to_vec()),
        ("oversized", [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 9].to_vec()),
        ("short", [0, 0, 0, 2, 0, 0].to_vec()),
        ("a topic count of 2^31 - 1", [0, 0, 0, 14, 0, 3, 0, 0, 0, 0, 0xff, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff].to_vec()),
        ("truncated", [0, 0, 0, 100, 0, 0, 0, 9, 0, 0, 0, 1].to_vec()),
        ("trailing bytes", {
            let mut f = request(ApiKey::Metadata, 12, 1, "x", &metadata(&["orders"]));
            f.extend_from_slice(b"junk");
            let len = u32::try_from(f.len() - 4).unwrap().to_be_bytes();
            f[..4].copy_from_slice(&len);
            f
        }),
    ];
    for (what, bytes) in &hostile {
        let mut s = connect(&lab, "producer");
        s.write_all(bytes).unwrap();
        if *what == "truncated" {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut rest = Vec::new();
        let n = s.read_to_end(&mut rest);
        assert!(
            matches!(n, Ok(0)) || n.is_err(),
            "{what}: the proxy closes the connection without an answer: {rest:?}"
        );
    }
    let flows = kafka_flows(&lab);
    let malformed: Vec<&Value> = flows[seq_records..]
        .iter()
        .filter(|f| f["drop_reason_desc"] == "MALFORMED_REQUEST" || f["verdict"] == "DROPPED")
        .collect();
    assert_eq!(malformed.len(), hostile.len(), "{flows:#?}");
    assert!(flows.iter().all(|f| f["verdict"] != "FORWARDED"), "nothing was forwarded: {flows:#?}");

    // The proxy keeps serving.
    let v = client(&lab, "producer", &["produce", "--topic", "orders", "--value", "after"]);
    assert_eq!(v["delivered"], 1, "{v}");

    // And across a proxy restart (killed): clients reconnect and are judged as before.
    let pid = lab.status()["proxy"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let o = porin().args(["lab", "restart-proxy", "--name", &lab.name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = client(&lab, "producer", &["produce", "--topic", "orders", "--value", "restarted"]);
    assert_eq!(v["delivered"], 1, "{v}");
    let v = client(&lab, "producer", &["produce", "--topic", "payments", "--timeout", "5"]);
    assert!(error_codes(&v).contains(&29), "{v}");
    let v = client(&lab, "consumer", &["consume", "--topic", "orders", "--count", "2", "--group", "r"]);
    assert_eq!(v["messages"], serde_json::json!(["after-0", "restarted-0"]), "{v}");
}

/// Everything the broker holds in `topic`, read from inside the broker's own pod (no policy between
/// a pod and itself): the truth about what got through.
fn broker_holds(lab: &Lab, topic: &str, group: &str) -> Vec<String> {
    let kafka = lab.addr("kafka", false);
    let bootstrap = format!("{kafka}:9092");
    let v = client(
        lab,
        "kafka",
        &[
            "consume",
            "--topic",
            topic,
            "--count",
            "1000000",
            "--group",
            group,
            "--timeout",
            "6",
            "--bootstrap",
            &bootstrap,
        ],
    );
    v["messages"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_owned()).collect()
}

/// One connection's burst: `n` Produce requests pipelined, even ones to orders (allowed), odd ones
/// to payments (denied); the answers read back in order. Returns how many orders were acknowledged
/// (0 when the connection broke off, e.g. the proxy was killed).
fn burst(lab: &Lab, tag: &str, n: i32) -> usize {
    let kafka: SocketAddr = format!("{}:9092", lab.addr("kafka", false)).parse().unwrap();
    let Ok(mut s) = lab.tcp("producer", kafka) else { return 0 };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let topic = if i % 2 == 0 { "orders" } else { "payments" };
        out.extend(request(ApiKey::Produce, 9, i, "load", &produce(&[topic], format!("{tag}-{i}").as_bytes())));
    }
    if s.write_all(&out).is_err() {
        return 0;
    }
    let mut acknowledged = 0;
    for i in 0..n {
        let Some(frame) = response(&mut s) else { return acknowledged };
        let (cid, p): (i32, ProduceResponse) = decode(frame, ApiKey::Produce, 9);
        let want = if i % 2 == 0 { 0 } else { 29 };
        let topic = if i % 2 == 0 { "orders" } else { "payments" };
        assert_eq!((cid, produce_errors(&p)), (i, vec![(topic.to_owned(), want)]), "{tag}: answers in order");
        acknowledged += usize::from(want == 0);
    }
    acknowledged
}

#[test]
fn kafka_under_load_policy_churn_and_a_proxy_kill_nothing_denied_reaches_the_broker_privileged() {
    if !privileged() {
        return;
    }
    let lab = std::sync::Arc::new(kafka_lab("kafkaload"));
    let policy = std::fs::read_to_string(common::repo().join("config/examples/kafka/lab-topics.yaml")).unwrap();

    // 32 connections at once, 100 pipelined requests each, half denied, while the policy is
    // re-published five times (each connection re-decides under every new snapshot).
    let workers: Vec<_> = (0..32)
        .map(|t| {
            let lab = lab.clone();
            std::thread::spawn(move || burst(&lab, &format!("load{t}"), 100))
        })
        .collect();
    for _ in 0..5 {
        lab.apply(&[&policy]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let acknowledged: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(acknowledged, 32 * 50);

    // The proxy killed in the middle of another 32 bursts, then restarted: connections break off,
    // nothing is let through while it is down or coming back.
    let workers: Vec<_> = (0..32)
        .map(|t| {
            let lab = lab.clone();
            std::thread::spawn(move || burst(&lab, &format!("kill{t}"), 2000))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    let pid = lab.status()["proxy"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let during: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let o = porin().args(["lab", "restart-proxy", "--name", &lab.name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(burst(&lab, "after", 10), 5, "serving again after the restart");

    // The broker holds no payment, and every order it holds was acknowledged or in flight.
    assert_eq!(broker_holds(&lab, "payments", "audit-p"), Vec::<String>::new(), "a denied request reached the broker");
    let orders = broker_holds(&lab, "orders", "audit-o");
    assert!(orders.iter().all(|m| {
        let i: i32 = m.rsplit('-').next().unwrap().parse().unwrap();
        i % 2 == 0
    }));
    eprintln!("orders held: {}, acknowledged during the kill: {during}", orders.len());
    assert!(
        orders.len() >= 32 * 50 + during + 5,
        "{} orders held, {during} acknowledged during the kill",
        orders.len()
    );
    assert!(during < 32 * 1000, "the kill happened mid-flow");
}
