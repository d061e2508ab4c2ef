//! A flow record as Hubble's `Flow` ([`to_pb`]) and back ([`from_pb`], for `porin observe`'s text
//! and table). Verdicts, directions, event types and drop reasons map to Hubble's enum numbers;
//! Porin's own drop reasons (no Cilium equivalent) travel as `DROP_REASON_UNKNOWN` with Porin's
//! number in the deprecated numeric `drop_reason`, so nothing is lost on the way back.

use std::str::FromStr as _;

use pbjson_types::Timestamp;
use porin_flow::flow::{
    DnsInfo, DropReason, Emitter, EventType, Flow, FlowEndpoint, FlowIp, FlowService, FlowType, HttpInfo, HttpProtocol,
    IcmpType, IpVersion, KafkaInfo, L7Type, Layer4, Layer7, NoFields, Ports, TrafficDirection, Verdict,
};

use crate::pb::flow as pb;

/// Hubble's verdict number.
pub fn verdict(v: Verdict) -> pb::Verdict {
    match v {
        Verdict::Unknown => pb::Verdict::Unknown,
        Verdict::Forwarded => pb::Verdict::Forwarded,
        Verdict::Dropped => pb::Verdict::Dropped,
        Verdict::Redirected => pb::Verdict::Redirected,
        Verdict::Error => pb::Verdict::Error,
        Verdict::Audit => pb::Verdict::Audit,
    }
}

fn verdict_back(v: i32) -> Verdict {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Forwarded) => Verdict::Forwarded,
        Ok(pb::Verdict::Dropped) => Verdict::Dropped,
        Ok(pb::Verdict::Redirected) => Verdict::Redirected,
        Ok(pb::Verdict::Error) => Verdict::Error,
        Ok(pb::Verdict::Audit) => Verdict::Audit,
        _ => Verdict::Unknown,
    }
}

/// Hubble's drop reason (Cilium's number where Cilium has the reason).
pub fn drop_reason(r: DropReason) -> pb::DropReason {
    match r {
        DropReason::InvalidSourceIp => pb::DropReason::InvalidSourceIp,
        DropReason::PolicyDenied => pb::DropReason::PolicyDenied,
        DropReason::PolicyDeny => pb::DropReason::PolicyDeny,
        DropReason::AuthRequired => pb::DropReason::AuthRequired,
        DropReason::MalformedPacket => pb::DropReason::InvalidPacketDropped,
        DropReason::FragmentNotSupported => pb::DropReason::IpFragmentationNotSupported,
        DropReason::UnknownEndpoint
        | DropReason::ProxyUnavailable
        | DropReason::NoProxyConnection
        | DropReason::ProxyBypass
        | DropReason::MalformedRequest => pb::DropReason::Unknown,
    }
}

/// Hubble's direction number.
pub fn direction(d: TrafficDirection) -> pb::TrafficDirection {
    match d {
        TrafficDirection::Unknown => pb::TrafficDirection::Unknown,
        TrafficDirection::Ingress => pb::TrafficDirection::Ingress,
        TrafficDirection::Egress => pb::TrafficDirection::Egress,
    }
}

/// The time of a record (RFC 3339) as a protobuf timestamp.
pub fn timestamp(time: &str) -> Option<Timestamp> {
    prost_types::Timestamp::from_str(time).ok().map(|t| Timestamp { seconds: t.seconds, nanos: t.nanos })
}

fn endpoint(e: &FlowEndpoint) -> pb::Endpoint {
    pb::Endpoint {
        identity: e.identity,
        namespace: e.namespace.clone(),
        labels: e.labels.clone(),
        pod_name: e.pod_name.clone(),
        ..pb::Endpoint::default()
    }
}

fn endpoint_back(e: Option<pb::Endpoint>) -> FlowEndpoint {
    let e = e.unwrap_or_default();
    FlowEndpoint { identity: e.identity, namespace: e.namespace, pod_name: e.pod_name, labels: e.labels }
}

fn ports(p: Ports) -> (u32, u32) {
    (u32::from(p.source_port), u32::from(p.destination_port))
}

fn layer4(l: &Layer4) -> pb::Layer4 {
    use pb::layer4::Protocol;
    let protocol = match *l {
        Layer4::Tcp(p) => {
            let (source_port, destination_port) = ports(p);
            Protocol::Tcp(pb::Tcp { source_port, destination_port, flags: None })
        }
        Layer4::Udp(p) => {
            let (source_port, destination_port) = ports(p);
            Protocol::Udp(pb::Udp { source_port, destination_port })
        }
        Layer4::Sctp(p) => {
            let (source_port, destination_port) = ports(p);
            Protocol::Sctp(pb::Sctp { source_port, destination_port })
        }
        Layer4::Icmpv4(t) => Protocol::IcmPv4(pb::IcmPv4 { r#type: u32::from(t.kind), code: 0 }),
        Layer4::Icmpv6(t) => Protocol::IcmPv6(pb::IcmPv6 { r#type: u32::from(t.kind), code: 0 }),
        Layer4::Vrrp(_) => Protocol::Vrrp(pb::Vrrp::default()),
        Layer4::Igmp(_) => Protocol::Igmp(pb::Igmp::default()),
    };
    pb::Layer4 { protocol: Some(protocol) }
}

fn port(p: u32) -> u16 {
    u16::try_from(p).unwrap_or(0)
}

fn layer4_back(l: pb::Layer4) -> Option<Layer4> {
    use pb::layer4::Protocol;
    let ports = |s: u32, d: u32| Ports { source_port: port(s), destination_port: port(d) };
    let icmp = |t: u32| IcmpType { kind: u16::try_from(t).unwrap_or(u16::MAX) };
    Some(match l.protocol? {
        Protocol::Tcp(t) => Layer4::Tcp(ports(t.source_port, t.destination_port)),
        Protocol::Udp(u) => Layer4::Udp(ports(u.source_port, u.destination_port)),
        Protocol::Sctp(s) => Layer4::Sctp(ports(s.source_port, s.destination_port)),
        Protocol::IcmPv4(i) => Layer4::Icmpv4(icmp(i.r#type)),
        Protocol::IcmPv6(i) => Layer4::Icmpv6(icmp(i.r#type)),
        Protocol::Vrrp(_) => Layer4::Vrrp(NoFields {}),
        Protocol::Igmp(_) => Layer4::Igmp(NoFields {}),
    })
}

fn layer7(l: &Layer7) -> pb::Layer7 {
    use pb::layer7::Record;
    let record = if let Some(h) = &l.http {
        Some(Record::Http(pb::Http {
            code: u32::from(h.code),
            method: h.method.clone(),
            url: h.url.clone(),
            protocol: h.protocol.name().to_owned(),
            headers: vec![],
        }))
    } else if let Some(d) = &l.dns {
        Some(Record::Dns(pb::Dns {
            query: d.query.clone(),
            ips: d.ips.clone(),
            ttl: d.ttl,
            cnames: d.cnames.clone(),
            observation_source: d.observation_source.clone(),
            rcode: d.rcode,
            qtypes: d.qtypes.clone(),
            rrtypes: d.rrtypes.clone(),
        }))
    } else {
        l.kafka.as_ref().map(|k| {
            Record::Kafka(pb::Kafka {
                error_code: k.error_code,
                api_version: k.api_version,
                api_key: k.api_key.clone(),
                correlation_id: k.correlation_id,
                topic: k.topic.clone(),
            })
        })
    };
    let kind = match l.kind {
        L7Type::Request => pb::L7FlowType::Request,
        L7Type::Response => pb::L7FlowType::Response,
    };
    pb::Layer7 { r#type: kind as i32, latency_ns: l.latency_ns, record }
}

fn layer7_back(l: pb::Layer7) -> Layer7 {
    use pb::layer7::Record;
    let mut out = Layer7 {
        kind: if l.r#type == pb::L7FlowType::Response as i32 { L7Type::Response } else { L7Type::Request },
        latency_ns: l.latency_ns,
        ..Layer7::default()
    };
    match l.record {
        Some(Record::Http(h)) => {
            out.http = Some(HttpInfo {
                code: u16::try_from(h.code).unwrap_or(0),
                method: h.method,
                url: h.url,
                protocol: match h.protocol.as_str() {
                    "HTTP/1.0" => HttpProtocol::Http10,
                    "HTTP/2" => HttpProtocol::Http2,
                    _ => HttpProtocol::Http11,
                },
            });
        }
        Some(Record::Dns(d)) => {
            out.dns = Some(DnsInfo {
                query: d.query,
                ips: d.ips,
                ttl: d.ttl,
                cnames: d.cnames,
                observation_source: d.observation_source,
                rcode: d.rcode,
                qtypes: d.qtypes,
                rrtypes: d.rrtypes,
            });
        }
        Some(Record::Kafka(k)) => {
            out.kafka = Some(KafkaInfo {
                error_code: k.error_code,
                api_version: k.api_version,
                api_key: k.api_key,
                correlation_id: k.correlation_id,
                topic: k.topic,
            });
        }
        None => {}
    }
    out
}

/// The label Porin puts the rule's path in (`spec.ingress[0]`), beside Cilium's policy labels.
const RULE_LABEL: &str = "porin:rule=";

/// A rule name as the record has it (`namespace/name path`) as Hubble's `Policy`.
fn policy(rule: &str) -> pb::Policy {
    let (id, path) = rule.split_once(' ').unwrap_or((rule, ""));
    let (namespace, name) = id.split_once('/').unwrap_or(("", id));
    pb::Policy {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        labels: vec![
            format!("k8s:io.cilium.k8s.policy.name={name}"),
            format!("k8s:io.cilium.k8s.policy.namespace={namespace}"),
            format!("{RULE_LABEL}{path}"),
        ],
        revision: 0,
        kind: "CiliumNetworkPolicy".to_owned(),
    }
}

fn policy_back(p: &pb::Policy) -> String {
    let path = p.labels.iter().find_map(|l| l.strip_prefix(RULE_LABEL)).unwrap_or("");
    let id = if p.namespace.is_empty() { p.name.clone() } else { format!("{}/{}", p.namespace, p.name) };
    if path.is_empty() { id } else { format!("{id} {path}") }
}

fn emitter_name(e: Emitter) -> &'static str {
    match e {
        Emitter::Datapath => "porin-datapath",
        Emitter::Proxy => "porin-proxy",
        Emitter::Agent => "porin-agent",
    }
}

/// The record as Hubble's `Flow`, with its id and the node's name.
#[expect(deprecated, reason = "Hubble still fills `drop_reason`, `reply` and `Summary` for its clients")]
pub fn to_pb(f: &Flow, uuid: String, node_name: &str) -> pb::Flow {
    let mut out = pb::Flow {
        time: timestamp(&f.time),
        uuid,
        verdict: verdict(f.verdict) as i32,
        drop_reason: f.drop_reason.map_or(0, |r| u32::from(r.code())),
        drop_reason_desc: f.drop_reason.map_or(pb::DropReason::Unknown, drop_reason) as i32,
        ip: f.ip.as_ref().map(|ip| pb::Ip {
            source: ip.source.clone(),
            destination: ip.destination.clone(),
            ip_version: match ip.ip_version {
                IpVersion::IPv4 => pb::IpVersion::IPv4,
                IpVersion::IPv6 => pb::IpVersion::IPv6,
            } as i32,
            encrypted: false,
        }),
        l4: f.l4.as_ref().map(layer4),
        source: Some(endpoint(&f.source)),
        destination: Some(endpoint(&f.destination)),
        r#type: match f.flow_type {
            FlowType::Unknown => pb::FlowType::UnknownType,
            FlowType::L3L4 => pb::FlowType::L3L4,
            FlowType::L7 => pb::FlowType::L7,
        } as i32,
        node_name: node_name.to_owned(),
        destination_names: f.destination_names.clone(),
        source_service: f.source_service.as_ref().map(service),
        destination_service: f.destination_service.as_ref().map(service),
        l7: f.l7.as_ref().map(layer7),
        event_type: Some(pb::CiliumEventType {
            r#type: i32::try_from(f.event_type.cilium_type()).unwrap_or(0),
            sub_type: 0,
        }),
        traffic_direction: direction(f.traffic_direction) as i32,
        interface: (f.ifindex != 0).then(|| pb::NetworkInterface { index: f.ifindex, name: String::new() }),
        emitter: Some(pb::Emitter {
            name: emitter_name(f.emitter).to_owned(),
            version: env!("CARGO_PKG_VERSION").into(),
        }),
        summary: f.summary.clone(),
        auth_type: f.auth_type.number(),
        spiffe_id: f.spiffe_id.clone().unwrap_or_default(),
        ..pb::Flow::default()
    };
    out.reply = f.is_reply;
    // Datapath records know the direction of the packet, not of the connection: no `is_reply`.
    if f.flow_type == FlowType::L7 {
        out.is_reply = Some(pbjson_types::BoolValue { value: f.is_reply });
    }
    if let Some(rule) = &f.policy {
        let p = vec![policy(rule)];
        let denied = matches!(f.verdict, Verdict::Dropped | Verdict::Audit);
        match (f.traffic_direction, denied) {
            (TrafficDirection::Egress, false) => out.egress_allowed_by = p,
            (TrafficDirection::Egress, true) => out.egress_denied_by = p,
            (_, false) => out.ingress_allowed_by = p,
            (_, true) => out.ingress_denied_by = p,
        }
    }
    out
}

fn service(s: &FlowService) -> pb::Service {
    pb::Service { name: s.name.clone(), namespace: s.namespace.clone() }
}

fn service_back(s: pb::Service) -> FlowService {
    FlowService { name: s.name, namespace: s.namespace }
}

/// A Hubble `Flow` as a record (for rendering).
#[expect(deprecated, reason = "Porin's own drop reasons travel in `drop_reason`; the summary in `Summary`")]
pub fn from_pb(f: pb::Flow) -> Flow {
    let code = f.drop_reason;
    let drop_reason = u8::try_from(code).ok().and_then(DropReason::from_code);
    let time =
        f.time.map(|t| prost_types::Timestamp { seconds: t.seconds, nanos: t.nanos }.to_string()).unwrap_or_default();
    let rule = [&f.ingress_allowed_by, &f.ingress_denied_by, &f.egress_allowed_by, &f.egress_denied_by]
        .into_iter()
        .flatten()
        .next()
        .map(policy_back);
    let event = f.event_type.map_or(0, |e| e.r#type);
    Flow {
        time,
        seq: 0,
        emitter: match f.emitter.as_ref().map(|e| e.name.as_str()) {
            Some("porin-proxy") => Emitter::Proxy,
            Some("porin-agent") => Emitter::Agent,
            _ => Emitter::Datapath,
        },
        verdict: verdict_back(f.verdict),
        drop_reason,
        flow_type: match pb::FlowType::try_from(f.r#type) {
            Ok(pb::FlowType::L3L4) => FlowType::L3L4,
            Ok(pb::FlowType::L7) => FlowType::L7,
            _ => FlowType::Unknown,
        },
        event_type: match event {
            1 => EventType::Drop,
            129 => EventType::AccessLog,
            5 => EventType::PolicyVerdict,
            _ => EventType::PolicyError,
        },
        traffic_direction: match pb::TrafficDirection::try_from(f.traffic_direction) {
            Ok(pb::TrafficDirection::Ingress) => TrafficDirection::Ingress,
            Ok(pb::TrafficDirection::Egress) => TrafficDirection::Egress,
            _ => TrafficDirection::Unknown,
        },
        is_reply: f.is_reply.is_some_and(|r| r.value),
        ip: f.ip.map(|ip| FlowIp {
            source: ip.source,
            destination: ip.destination,
            ip_version: if ip.ip_version == pb::IpVersion::IPv6 as i32 { IpVersion::IPv6 } else { IpVersion::IPv4 },
        }),
        l4: f.l4.and_then(layer4_back),
        source: endpoint_back(f.source).into(),
        destination: endpoint_back(f.destination).into(),
        destination_names: f.destination_names,
        source_service: f.source_service.map(service_back),
        destination_service: f.destination_service.map(service_back),
        l7: f.l7.map(layer7_back),
        policy: rule,
        ifindex: f.interface.map_or(0, |i| i.index),
        summary: f.summary,
        auth_type: if f.auth_type == pb::AuthType::Spire as i32 {
            porin_flow::flow::AuthType::Spire
        } else {
            porin_flow::flow::AuthType::Disabled
        },
        spiffe_id: (!f.spiffe_id.is_empty()).then_some(f.spiffe_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Flow {
        Flow {
            time: "2026-12-01T10:00:00.123456789Z".into(),
            seq: 0,
            emitter: Emitter::Proxy,
            verdict: Verdict::Dropped,
            drop_reason: Some(DropReason::PolicyDenied),
            flow_type: FlowType::L7,
            event_type: EventType::AccessLog,
            traffic_direction: TrafficDirection::Ingress,
            is_reply: false,
            ip: Some(FlowIp { source: "10.0.0.1".into(), destination: "10.0.0.2".into(), ip_version: IpVersion::IPv4 }),
            l4: Some(Layer4::Tcp(Ports { source_port: 40000, destination_port: 80 })),
            source: FlowEndpoint {
                identity: 1000,
                namespace: "default".into(),
                pod_name: "xwing".into(),
                labels: vec!["k8s:org=alliance".into()],
            }
            .into(),
            destination: FlowEndpoint {
                identity: 1001,
                namespace: "default".into(),
                pod_name: "deathstar".into(),
                labels: vec![],
            }
            .into(),
            destination_names: vec![],
            source_service: None,
            destination_service: Some(FlowService { name: "deathstar".into(), namespace: "default".into() }),
            l7: Some(Layer7 {
                kind: L7Type::Request,
                latency_ns: 0,
                http: Some(HttpInfo {
                    code: 0,
                    method: "PUT".into(),
                    url: "http://d/v1/exhaust-port".into(),
                    protocol: HttpProtocol::Http11,
                }),
                dns: None,
                kafka: None,
            }),
            policy: Some("default/rule1 spec.ingress[0]".into()),
            ifindex: 0,
            summary: "denied".into(),
            auth_type: porin_flow::flow::AuthType::Spire,
            spiffe_id: Some("spiffe://cluster.local/ns/default/sa/tiefighter".into()),
        }
    }

    #[test]
    fn a_record_survives_the_trip_through_hubbles_flow() {
        let f = sample();
        let pb = to_pb(&f, "id".into(), "node-a");
        assert_eq!(pb.verdict, pb::Verdict::Dropped as i32);
        assert_eq!(pb.drop_reason_desc, pb::DropReason::PolicyDenied as i32);
        assert_eq!(pb.time.as_ref().map(|t| (t.seconds, t.nanos)), Some((1_796_119_200, 123_456_789)));
        assert_eq!(pb.event_type.as_ref().map(|e| e.r#type), Some(129));
        assert_eq!(
            pb.ingress_denied_by.first().map(|p| (p.namespace.as_str(), p.name.as_str())),
            Some(("default", "rule1"))
        );
        assert_eq!(pb.is_reply, Some(pbjson_types::BoolValue { value: false }));
        // Hubble's JSON (protobuf's JSON mapping with the proto field names).
        let json = serde_json::to_value(&pb).unwrap();
        // RFC 3339 (pbjson-types writes the UTC offset as +00:00 where Go writes Z).
        assert!(json["time"].as_str().unwrap().starts_with("2026-12-01T10:00:00.123456789"), "{json}");
        assert_eq!(json["verdict"], "DROPPED");
        assert_eq!(json["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(json["Type"], "L7");
        assert_eq!(json["traffic_direction"], "INGRESS");
        assert_eq!(json["event_type"]["type"], 129);
        assert_eq!(json["is_reply"], false);
        assert_eq!(json["IP"]["ipVersion"], "IPv4");
        assert_eq!(json["l4"]["TCP"]["destination_port"], 80);
        assert_eq!(json["source"]["pod_name"], "xwing");
        assert_eq!(json["l7"]["type"], "REQUEST");
        assert_eq!(json["l7"]["http"]["method"], "PUT");
        assert_eq!(json["node_name"], "node-a");
        assert_eq!(serde_json::from_value::<pb::Flow>(json).unwrap(), pb);
        assert_eq!(from_pb(pb), f);
        // Porin's own reasons come back by their number.
        let f = Flow { drop_reason: Some(DropReason::ProxyBypass), ..sample() };
        let pb = to_pb(&f, String::new(), "");
        assert_eq!(pb.drop_reason_desc, 0);
        assert_eq!(from_pb(pb).drop_reason, Some(DropReason::ProxyBypass));
    }
}
