//! Flow records for humans: one text line (`porin observe`, `porin lab events`) or a row of a live
//! table (`porin observe -o table`). JSON is the record itself (`porin_flow::flow::Flow`).

use porin_flow::flow::{
    DnsInfo, DropReason, EventType, Flow, FlowEndpoint, FlowService, KafkaInfo, L7Type, Layer4, Verdict,
};

/// The header of [`row`]'s table.
pub const TABLE_HEADER: &str =
    "TIME          SOURCE         DESTINATION       WHAT                                  VERDICT      WHY / RULE";

fn transport(l4: Option<&Layer4>, types: bool) -> String {
    match l4 {
        Some(l @ (Layer4::Tcp(_) | Layer4::Udp(_) | Layer4::Sctp(_))) => {
            format!("{}/{}", l.name(), l.destination_port().unwrap_or(0))
        }
        Some(l @ (Layer4::Icmpv4(t) | Layer4::Icmpv6(t))) if types => format!("{} type {}", l.name(), t.kind),
        Some(l) => l.name().to_owned(),
        None => String::new(),
    }
}

/// DNS response code names (RFC 1035, 2136).
fn rcode_name(rcode: u32) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

/// `A api.example.com.` for a query; with the answer's addresses for a response.
fn dns_what(kind: L7Type, d: &DnsInfo) -> String {
    let q = format!("{} {}", d.qtypes.join(","), d.query);
    if kind == L7Type::Response {
        let mut s = format!("{q} {}", rcode_name(d.rcode));
        if !d.cnames.is_empty() {
            s.push_str(&format!(" via {}", d.cnames.join(" ")));
        }
        if !d.ips.is_empty() {
            s.push_str(&format!(" {} TTL {}", d.ips.join(","), d.ttl));
        }
        s
    } else {
        q
    }
}

/// `produce v10 orders` (the topics, when the request names any).
fn kafka_what(k: &KafkaInfo) -> String {
    let mut s = format!("{} v{}", k.api_key, k.api_version);
    if !k.topic.is_empty() {
        s.push(' ');
        s.push_str(&k.topic);
    }
    s
}

fn addresses(f: &Flow) -> (&str, &str) {
    f.ip.as_ref().map_or(("", ""), |ip| (ip.source.as_str(), ip.destination.as_str()))
}

/// One line: `VERDICT DIRECTION source -> destination transport [L7] [reason] [policy]: summary`.
pub fn text(f: &Flow) -> String {
    if f.event_type == EventType::PolicyError {
        return format!("{:<10} {:<8} {}", f.verdict, "POLICY", f.summary);
    }
    let peer = |e: &FlowEndpoint, ip: &str| {
        if e.pod_name.is_empty() {
            format!("{ip} (identity {})", e.identity)
        } else {
            format!("{}/{} ({ip})", e.namespace, e.pod_name)
        }
    };
    // The service a balanced request went to (a response came from).
    let service = |s: &Option<FlowService>| {
        s.as_ref().map(|s| format!(" service {}/{}", s.namespace, s.name)).unwrap_or_default()
    };
    let (src, dst) = addresses(f);
    let mut line = format!(
        "{:<10} {:<8} {}{} -> {}{} {}",
        f.verdict,
        f.traffic_direction.to_string(),
        peer(&f.source, src),
        service(&f.source_service),
        peer(&f.destination, dst),
        service(&f.destination_service),
        transport(f.l4.as_ref(), true)
    );
    if let Some((l7, h)) = f.l7.as_ref().and_then(|l| l.http.as_ref().map(|h| (l, h))) {
        let proto = h.protocol.name();
        if l7.kind == L7Type::Response {
            let ms = l7.latency_ns as f64 / 1e6;
            line.push_str(&format!(" http-response {proto} {} {} {} ({ms:.3} ms)", h.code, h.method, h.url));
        } else {
            line.push_str(&format!(" http-request {proto} {} {}", h.method, h.url));
        }
    }
    if let Some((l7, d)) = f.l7.as_ref().and_then(|l| l.dns.as_ref().map(|d| (l, d))) {
        let kind = if l7.kind == L7Type::Response { "dns-response" } else { "dns-request" };
        line.push_str(&format!(" {kind} {}", dns_what(l7.kind, d)));
    }
    if let Some((l7, k)) = f.l7.as_ref().and_then(|l| l.kafka.as_ref().map(|k| (l, k))) {
        if l7.kind == L7Type::Response {
            let ms = l7.latency_ns as f64 / 1e6;
            line.push_str(&format!(" kafka-response {} error {} ({ms:.3} ms)", kafka_what(k), k.error_code));
        } else {
            line.push_str(&format!(" kafka-request {} correlation {}", kafka_what(k), k.correlation_id));
            if k.error_code != 0 {
                line.push_str(&format!(" answered error {}", k.error_code));
            }
        }
    }
    if let Some(r) = f.drop_reason {
        line.push(' ');
        line.push_str(r.name());
    }
    // Came through the mTLS tunnel: who the client's certificate names.
    if let Some(id) = &f.spiffe_id {
        line.push_str(&format!(" mTLS {id}"));
    }
    if let Some(p) = &f.policy {
        line.push_str(&format!(" [{p}]"));
    }
    if !f.summary.is_empty() {
        line.push_str(": ");
        line.push_str(&f.summary);
    }
    line
}

/// One row of a live table: time of day, the two ends, what was asked, what happened and why.
pub fn row(f: &Flow) -> String {
    let time = f.time.get(11..23).unwrap_or(&f.time);
    if f.event_type == EventType::PolicyError {
        return format!("{time}  {:<14} {:<17} {:<37} {:<12} {}", "-", "-", "policy file", "REFUSED", f.summary);
    }
    let who = |e: &FlowEndpoint, ip: &str| if e.pod_name.is_empty() { ip.to_owned() } else { e.pod_name.clone() };
    let http = f.l7.as_ref().and_then(|l| l.http.as_ref().map(|h| (l, h)));
    let path = |url: &str| {
        let p = url.strip_prefix("http://").and_then(|u| u.find('/').and_then(|i| u.get(i..)).map(str::to_owned));
        p.unwrap_or_else(|| url.to_owned())
    };
    let reason = f.drop_reason.map_or("", DropReason::name);
    if let Some((l7, d)) = f.l7.as_ref().and_then(|l| l.dns.as_ref().map(|d| (l, d))) {
        let what = format!("DNS {}", dns_what(l7.kind, d));
        let verdict = match (l7.kind, f.verdict) {
            (L7Type::Request, Verdict::Forwarded) => "ALLOWED".to_owned(),
            (L7Type::Request, Verdict::Dropped) if f.drop_reason == Some(DropReason::MalformedRequest) => {
                "REFUSED".to_owned()
            }
            (L7Type::Request, Verdict::Dropped) => "DENIED".to_owned(),
            (L7Type::Response, Verdict::Forwarded) => rcode_name(d.rcode),
            (_, v) => v.name().to_owned(),
        };
        let why = match (&f.policy, f.summary.is_empty()) {
            (Some(p), true) => p.clone(),
            (Some(p), false) => format!("{} [{p}]", f.summary),
            (None, _) => f.summary.clone(),
        };
        let (src, dst) = addresses(f);
        let (src, dst) = (who(&f.source, src), who(&f.destination, dst));
        return format!("{time}  {src:<14} {dst:<17} {what:<37} {verdict:<12} {why}");
    }
    if let Some((l7, k)) = f.l7.as_ref().and_then(|l| l.kafka.as_ref().map(|k| (l, k))) {
        let what = format!("Kafka {}", kafka_what(k));
        let verdict = match (l7.kind, f.verdict) {
            (L7Type::Request, Verdict::Forwarded) => "ALLOWED".to_owned(),
            (L7Type::Request, Verdict::Dropped) if f.drop_reason == Some(DropReason::MalformedRequest) => {
                "REFUSED".to_owned()
            }
            (L7Type::Request, Verdict::Dropped) if k.error_code != 0 => format!("DENIED {}", k.error_code),
            (L7Type::Request, Verdict::Dropped) => "DENIED".to_owned(),
            (L7Type::Response, Verdict::Forwarded) if k.error_code == 0 => "OK".to_owned(),
            (L7Type::Response, Verdict::Forwarded) => format!("ERROR {}", k.error_code),
            (_, v) => v.name().to_owned(),
        };
        let latency =
            if l7.kind == L7Type::Response { format!("{:.2} ms", l7.latency_ns as f64 / 1e6) } else { String::new() };
        let why = [latency, f.summary.clone(), f.policy.clone().unwrap_or_default()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let (src, dst) = addresses(f);
        let (src, dst) = (who(&f.source, src), who(&f.destination, dst));
        return format!("{time}  {src:<14} {dst:<17} {what:<37} {verdict:<12} {why}");
    }
    let (what, verdict, why) = match http {
        Some((l7, h)) if l7.kind == L7Type::Response => (
            format!("{} {} {}", h.protocol.name(), h.method, path(&h.url)),
            format!("{} {}", h.code, if f.verdict == Verdict::Forwarded { "OK" } else { f.verdict.name() }),
            format!(
                "{:.2} ms{}",
                l7.latency_ns as f64 / 1e6,
                if f.summary.is_empty() { String::new() } else { format!(": {}", f.summary) }
            ),
        ),
        Some((_, h)) => (
            format!("{} {} {}", h.protocol.name(), h.method, path(&h.url)),
            match (f.verdict, f.drop_reason) {
                (Verdict::Forwarded, _) => "ALLOWED".to_owned(),
                (Verdict::Dropped, Some(DropReason::MalformedRequest)) => "REFUSED 400".to_owned(),
                (Verdict::Dropped, _) => "DENIED 403".to_owned(),
                (v, _) => v.name().to_owned(),
            },
            match (&f.policy, f.summary.is_empty()) {
                (Some(p), _) => p.clone(),
                (None, false) => f.summary.clone(),
                (None, true) => String::new(),
            },
        ),
        None => (
            format!("{} (kernel)", transport(f.l4.as_ref(), false)),
            match f.verdict {
                Verdict::Redirected => "TO PROXY".to_owned(),
                v => v.name().to_owned(),
            },
            match (&f.policy, reason.is_empty()) {
                (Some(p), true) => p.clone(),
                (Some(p), false) => format!("{reason} [{p}]"),
                (None, _) => reason.to_owned(),
            },
        ),
    };
    let (src, dst) = addresses(f);
    let (src, dst) = (who(&f.source, src), who(&f.destination, dst));
    format!("{time}  {src:<14} {dst:<17} {what:<37} {verdict:<12} {why}")
}

#[cfg(test)]
mod tests {
    use porin_flow::flow::{FlowIp, HttpInfo, HttpProtocol, Layer7, Ports, TrafficDirection};

    use super::*;

    #[test]
    fn a_denied_request_reads_well() {
        let f = Flow {
            time: "2026-12-01T12:00:00.123456789Z".into(),
            verdict: Verdict::Dropped,
            drop_reason: Some(DropReason::PolicyDenied),
            traffic_direction: TrafficDirection::Ingress,
            ip: Some(FlowIp { source: "10.0.0.1".into(), destination: "10.0.0.2".into(), ..FlowIp::default() }),
            l4: Some(Layer4::Tcp(Ports { source_port: 4000, destination_port: 80 })),
            source: FlowEndpoint { pod_name: "tiefighter".into(), namespace: "default".into(), ..Default::default() }
                .into(),
            l7: Some(Layer7 {
                kind: L7Type::Request,
                latency_ns: 0,
                http: Some(HttpInfo {
                    code: 0,
                    method: "PUT".into(),
                    url: "http://deathstar/v1/exhaust-port".into(),
                    protocol: HttpProtocol::Http11,
                }),
                dns: None,
                kafka: None,
            }),
            ..Flow::default()
        };
        assert_eq!(
            text(&f),
            "DROPPED    INGRESS  default/tiefighter (10.0.0.1) -> 10.0.0.2 (identity 0) TCP/80 http-request HTTP/1.1 PUT http://deathstar/v1/exhaust-port POLICY_DENIED"
        );
        let r = row(&f);
        assert!(r.starts_with("12:00:00.123  tiefighter     10.0.0.2"), "{r}");
        assert!(r.contains("HTTP/1.1 PUT /v1/exhaust-port") && r.contains("DENIED 403"), "{r}");
        // A request that came through the mTLS tunnel says whom the certificate named.
        let tunnelled = Flow { spiffe_id: Some("spiffe://cluster.local/ns/default/sa/tiefighter".into()), ..f.clone() };
        assert!(
            text(&tunnelled).ends_with("POLICY_DENIED mTLS spiffe://cluster.local/ns/default/sa/tiefighter"),
            "{}",
            text(&tunnelled)
        );
        // A request the proxy balanced within a service names it.
        let balanced = Flow {
            destination_service: Some(FlowService { name: "deathstar".into(), namespace: "default".into() }),
            ..f
        };
        assert!(
            text(&balanced).contains("-> 10.0.0.2 (identity 0) service default/deathstar TCP/80"),
            "{}",
            text(&balanced)
        );
    }
}
