//! Flow records shaped like Hubble's `Flow` (`api/v1/flow/flow.proto`, JSON field names as
//! `hubble observe -o json` prints them). The agent turns datapath events into these; the proxy
//! writes one per HTTP request (`l7.type = REQUEST`) and one per response (`RESPONSE`, with status
//! and latency). `porin observe` reads both kinds and filters them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Static or owned text: records are built without allocating for the fixed words and still
/// deserialise (for `porin observe`).
pub type Text = Cow<'static, str>;

/// A peer of a flow.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowEndpoint {
    /// Security identity.
    pub identity: u32,
    /// Namespace (endpoints only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Pod name (endpoints only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    /// Identity labels (`source:key=value`).
    #[serde(default)]
    pub labels: Vec<String>,
}

/// IP part.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowIp {
    /// Source address.
    pub source: String,
    /// Destination address.
    pub destination: String,
    /// `IPv4` / `IPv6`.
    #[serde(rename = "ipVersion")]
    pub ip_version: Text,
}

/// The HTTP part of an L7 record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HttpInfo {
    /// Response status (0 on requests).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub code: u16,
    /// Method.
    pub method: String,
    /// `http://authority/path?query`, with the path as the proxy judged and forwarded it.
    pub url: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: Text,
}

/// The L7 part of a record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layer7 {
    /// `REQUEST` or `RESPONSE`.
    #[serde(rename = "type")]
    pub kind: Text,
    /// Request to response headers (responses only).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub latency_ns: u64,
    /// HTTP details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpInfo>,
}

/// A flow record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flow {
    /// Wall-clock time, RFC 3339 (UTC, nanoseconds).
    pub time: String,
    /// Sequence number, per emitter.
    #[serde(default)]
    pub seq: u64,
    /// `datapath` (agent) or `proxy`.
    #[serde(default)]
    pub emitter: Text,
    /// `FORWARDED`, `DROPPED`, `REDIRECTED`, `ERROR`.
    pub verdict: Text,
    /// Drop reason code (0 when not dropped, or for L7 drops).
    #[serde(default, skip_serializing_if = "is_zero_u8")]
    pub drop_reason: u8,
    /// Drop reason name.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub drop_reason_desc: Text,
    /// `L3_L4` or `L7`.
    #[serde(rename = "Type")]
    pub flow_type: Text,
    /// `policy-verdict`, `drop` (datapath) or `access-log` (proxy).
    pub event_type: Text,
    /// `INGRESS`, `EGRESS` or `TRAFFIC_DIRECTION_UNKNOWN`.
    pub traffic_direction: Text,
    /// Responses travel from the server back to the client.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_reply: bool,
    /// Addresses.
    #[serde(rename = "IP")]
    pub ip: FlowIp,
    /// Transport: `{"TCP": {"source_port": .., "destination_port": ..}}` and the like.
    pub l4: BTreeMap<Text, BTreeMap<Text, u16>>,
    /// Source.
    pub source: FlowEndpoint,
    /// Destination.
    pub destination: FlowEndpoint,
    /// L7 details (proxy records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<Layer7>,
    /// The policy rule that decided (`namespace/name path`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Interface index the packet was seen on (datapath records).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub ifindex: u32,
    /// One line for humans: why a request was refused, what failed upstream.
    #[serde(rename = "Summary", default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}
fn is_zero_u8(v: &u8) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

impl Flow {
    /// The pod a filter names (`namespace/name` or just `name`) is this flow's source or destination.
    pub fn involves_pod(&self, pod: &str) -> bool {
        let is = |e: &FlowEndpoint| match pod.split_once('/') {
            Some((ns, name)) => e.namespace == ns && e.pod_name == name,
            None => e.pod_name == pod,
        };
        is(&self.source) || is(&self.destination)
    }

    /// The protocol a filter names: `tcp`, `udp`, `icmp`, `http`, `http/1.1`, `http/2`, `l7`.
    pub fn has_protocol(&self, proto: &str) -> bool {
        let p = proto.to_ascii_lowercase();
        match p.as_str() {
            "http" | "l7" => self.l7.as_ref().is_some_and(|l| l.http.is_some()),
            "http/1.1" | "http/2" => {
                self.l7.as_ref().and_then(|l| l.http.as_ref()).is_some_and(|h| h.protocol.eq_ignore_ascii_case(&p))
            }
            "icmp" => self.l4.keys().any(|k| k.to_ascii_lowercase().starts_with("icmp")),
            _ => self.l4.keys().any(|k| k.eq_ignore_ascii_case(&p)),
        }
    }

    /// One line for humans (`porin observe`, `porin lab events`):
    /// `VERDICT DIRECTION source -> destination transport [L7] [reason] [policy]: summary`.
    pub fn to_text(&self) -> String {
        if self.event_type == "policy-error" {
            return format!("{:<10} {:<8} {}", self.verdict, "POLICY", self.summary);
        }
        let peer = |e: &FlowEndpoint, ip: &str| {
            if e.pod_name.is_empty() {
                format!("{ip} (identity {})", e.identity)
            } else {
                format!("{}/{} ({ip})", e.namespace, e.pod_name)
            }
        };
        let l4 = self
            .l4
            .iter()
            .next()
            .map(|(proto, f)| match (f.get("destination_port"), f.get("type")) {
                (Some(p), _) => format!("{proto}/{p}"),
                (None, Some(t)) => format!("{proto} type {t}"),
                _ => proto.to_string(),
            })
            .unwrap_or_default();
        let mut line = format!(
            "{:<10} {:<8} {} -> {} {l4}",
            self.verdict,
            self.traffic_direction,
            peer(&self.source, &self.ip.source),
            peer(&self.destination, &self.ip.destination)
        );
        if let Some((l7, h)) = self.l7.as_ref().and_then(|l| l.http.as_ref().map(|h| (l, h))) {
            if l7.kind == "RESPONSE" {
                let ms = l7.latency_ns as f64 / 1e6;
                line.push_str(&format!(" http-response {} {} {} {} ({ms:.3} ms)", h.protocol, h.code, h.method, h.url));
            } else {
                line.push_str(&format!(" http-request {} {} {}", h.protocol, h.method, h.url));
            }
        }
        if !self.drop_reason_desc.is_empty() {
            line.push(' ');
            line.push_str(&self.drop_reason_desc);
        }
        if let Some(p) = &self.policy {
            line.push_str(&format!(" [{p}]"));
        }
        if !self.summary.is_empty() {
            line.push_str(": ");
            line.push_str(&self.summary);
        }
        line
    }
}

impl Flow {
    /// The header of [`Flow::to_row`]'s table.
    pub const TABLE_HEADER: &'static str =
        "TIME          SOURCE         DESTINATION       WHAT                                  VERDICT      WHY / RULE";

    /// One row of a live table (`porin observe -o table`): time of day, the two ends, what was
    /// asked, what happened and why.
    pub fn to_row(&self) -> String {
        let time = self.time.get(11..23).unwrap_or(&self.time);
        if self.event_type == "policy-error" {
            return format!("{time}  {:<14} {:<17} {:<37} {:<12} {}", "-", "-", "policy file", "REFUSED", self.summary);
        }
        let who = |e: &FlowEndpoint, ip: &str| if e.pod_name.is_empty() { ip.to_owned() } else { e.pod_name.clone() };
        let l4 = self
            .l4
            .iter()
            .next()
            .map(|(proto, f)| match f.get("destination_port") {
                Some(p) => format!("{proto}/{p}"),
                None => proto.to_string(),
            })
            .unwrap_or_default();
        let http = self.l7.as_ref().and_then(|l| l.http.as_ref().map(|h| (l, h)));
        let path = |url: &str| {
            let p = url.strip_prefix("http://").and_then(|u| u.find('/').map(|i| u[i..].to_owned()));
            p.unwrap_or_else(|| url.to_owned())
        };
        let (what, verdict, why) = match http {
            Some((l7, h)) if l7.kind == "RESPONSE" => (
                format!("{} {} {}", h.protocol, h.method, path(&h.url)),
                format!("{} {}", h.code, if self.verdict == "FORWARDED" { "OK" } else { &self.verdict }),
                format!(
                    "{:.2} ms{}",
                    l7.latency_ns as f64 / 1e6,
                    if self.summary.is_empty() { String::new() } else { format!(": {}", self.summary) }
                ),
            ),
            Some((_, h)) => (
                format!("{} {} {}", h.protocol, h.method, path(&h.url)),
                match self.verdict.as_ref() {
                    "FORWARDED" => "ALLOWED".to_owned(),
                    "DROPPED" if self.drop_reason_desc == "MALFORMED_REQUEST" => "REFUSED 400".to_owned(),
                    "DROPPED" => "DENIED 403".to_owned(),
                    v => v.to_owned(),
                },
                match (&self.policy, self.summary.is_empty()) {
                    (Some(p), _) => p.clone(),
                    (None, false) => self.summary.clone(),
                    (None, true) => String::new(),
                },
            ),
            None => (
                format!("{l4} (kernel)"),
                match self.verdict.as_ref() {
                    "REDIRECTED" => "TO PROXY".to_owned(),
                    "DROPPED" => "DROPPED".to_owned(),
                    v => v.to_owned(),
                },
                match (&self.policy, self.drop_reason_desc.is_empty()) {
                    (Some(p), true) => p.clone(),
                    (Some(p), false) => format!("{} [{p}]", self.drop_reason_desc),
                    (None, _) => self.drop_reason_desc.to_string(),
                },
            ),
        };
        let (src, dst) = (who(&self.source, &self.ip.source), who(&self.destination, &self.ip.destination));
        format!("{time}  {src:<14} {dst:<17} {what:<37} {verdict:<12} {why}")
    }
}

/// Now, RFC 3339 UTC with nanoseconds.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_nanos())
}

/// Formats seconds since the Unix epoch (UTC) as RFC 3339 with nanoseconds.
pub fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_795_650_000, 0), "2026-11-25T23:40:00.000000000Z");
        assert_eq!(rfc3339(4_107_542_399, 0), "2100-02-28T23:59:59.000000000Z");
    }

    #[test]
    fn records_round_trip_through_json() {
        let f = Flow {
            time: now_rfc3339(),
            verdict: "DROPPED".into(),
            flow_type: "L7".into(),
            event_type: "access-log".into(),
            traffic_direction: "INGRESS".into(),
            l4: BTreeMap::from([("TCP".into(), BTreeMap::from([("destination_port".into(), 80)]))]),
            l7: Some(Layer7 {
                kind: "REQUEST".into(),
                http: Some(HttpInfo {
                    method: "PUT".into(),
                    url: "http://d/x".into(),
                    protocol: "HTTP/1.1".into(),
                    code: 0,
                }),
                latency_ns: 0,
            }),
            ..Default::default()
        };
        let back: Flow = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        assert!(back.has_protocol("http") && back.has_protocol("HTTP/1.1") && back.has_protocol("tcp"));
        assert!(!back.has_protocol("http/2") && !back.has_protocol("udp"));
    }
}
