//! Prometheus metrics of flows, named and labelled as Hubble's (spec §9): one registry per process
//! ([`HubbleMetrics`]); the proxy counts its L7 records into it, the agent its kernel flows. Callers
//! say what a flow was through the typed methods; `/metrics` renders the registry
//! (`prometheus-client`, OpenMetrics text, or Prometheus' 0.0.4 text).
//!
//! Label cardinality is bounded: labels take values from closed sets (verdicts, drop reasons, HTTP
//! methods Hubble knows, status codes, DNS return codes, Kafka API keys), or from what policy names
//! (Kafka topics), capped at [`MAX_TOPICS`] distinct values, the rest counted under `topic="other"`.
//! DNS queries are not a label (Hubble's `dns` metric does not label names by default either).
//! `hubble_policy_verdicts_total` takes closed sets too (direction, match type, action).
//!
//! Porin's own figures carry the `porin_` prefix: `porin_policy_version` (both processes); the
//! agent's `porin_policy_apply_seconds`, `porin_policy_map_entries{map}`,
//! `porin_policy_publish_failures_total`; the proxy's `porin_proxy_connections`,
//! `porin_snapshot_age_seconds`.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::flow::TrafficDirection;

/// Distinct Kafka topics labelled; the rest count as `other`.
pub const MAX_TOPICS: usize = 1000;

/// `hubble_flows_processed_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    protocol: &'static str,
    r#type: &'static str,
    subtype: &'static str,
    verdict: &'static str,
}

/// `hubble_drop_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
    protocol: &'static str,
}

/// `hubble_http_requests_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpRequestLabels {
    method: &'static str,
    protocol: &'static str,
    reporter: &'static str,
}

/// `hubble_http_responses_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpResponseLabels {
    status: u16,
    method: &'static str,
    reporter: &'static str,
}

/// `hubble_http_request_duration_seconds` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpDurationLabels {
    method: &'static str,
    reporter: &'static str,
}

/// `hubble_dns_queries_total` / `hubble_dns_responses_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    rcode: String,
    qtypes: String,
    ips_returned: String,
}

/// `hubble_kafka_requests_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KafkaLabels {
    topic: String,
    api_key: String,
    error_code: String,
    reporter: &'static str,
}

/// `hubble_lost_events_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    source: &'static str,
}

/// `hubble_kafka_request_duration_seconds` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KafkaDurationLabels {
    topic: String,
    api_key: String,
    reporter: &'static str,
}

/// `hubble_policy_verdicts_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyVerdictLabels {
    direction: &'static str,
    r#match: &'static str,
    action: &'static str,
}

/// `porin_policy_map_entries` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

/// The metrics counted through the per-thread handle table.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum HotMetric {
    Flows,
    Drops,
    HttpRequests,
    HttpResponses,
    HttpDuration,
    PolicyVerdicts,
}

/// A label set of static names (and numbers) as a key: each name by its address and length. Two
/// copies of one name at different addresses are two keys for the same family child: harmless.
type HotLabels = [usize; 4];

fn key(s: &'static str) -> usize {
    s.as_ptr() as usize ^ (s.len() << 48)
}

/// A handle this thread took from a family: the family's own (counting through it counts in the
/// family).
#[derive(Debug)]
enum Handle {
    Counter(Counter),
    Histogram(Histogram),
}

thread_local! {
    /// Handles this thread has counted through, by metrics instance, metric and labels. Bounded by
    /// the families' label sets (closed sets: see the module's notes).
    static HOT: RefCell<rustc_hash::FxHashMap<(u64, HotMetric, HotLabels), Handle>> = RefCell::default();
}

/// Tells metrics instances apart in [`HOT`].
static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// Which process the metrics are of: each registers its own `porin_` figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// The agent: policy apply time, kernel map entries, publication failures.
    Agent,
    /// The L7 proxy: client connections, snapshot age.
    Proxy,
}

/// The metrics of one process.
#[derive(Debug)]
pub struct HubbleMetrics {
    /// This instance, for the per-thread handle table.
    id: u64,
    registry: Registry,
    flows: Family<FlowLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    http_requests: Family<HttpRequestLabels, Counter>,
    http_responses: Family<HttpResponseLabels, Counter>,
    http_duration: Family<HttpDurationLabels, Histogram>,
    dns_queries: Family<DnsLabels, Counter>,
    dns_responses: Family<DnsLabels, Counter>,
    kafka_requests: Family<KafkaLabels, Counter>,
    kafka_duration: Family<KafkaDurationLabels, Histogram>,
    lost: Family<LostLabels, Counter>,
    policy_verdicts: Family<PolicyVerdictLabels, Counter>,
    policy_version: Gauge,
    apply_seconds: Gauge<f64, AtomicU64>,
    map_entries: Family<MapLabels, Gauge>,
    publish_failures: Counter,
    connections: Gauge,
    snapshot_age: Gauge<f64, AtomicU64>,
    /// Kafka topics given a label of their own so far.
    topics: Mutex<HashSet<String>>,
}

fn latency_buckets() -> Histogram {
    // 100 µs to ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Default for HubbleMetrics {
    /// A proxy's.
    fn default() -> Self {
        Self::new(Process::Proxy)
    }
}

impl HubbleMetrics {
    /// The metrics of `process`.
    pub fn new(process: Process) -> Self {
        let mut registry = Registry::default();
        let flows = Family::default();
        registry.register("hubble_flows_processed", "Flows processed", flows.clone());
        let drops = Family::default();
        registry.register("hubble_drop", "Flows dropped, by reason", drops.clone());
        let http_requests = Family::default();
        registry.register(
            "hubble_http_requests",
            "HTTP requests (counted when the request is seen)",
            http_requests.clone(),
        );
        let http_responses = Family::default();
        registry.register("hubble_http_responses", "HTTP responses", http_responses.clone());
        let http_duration = Family::new_with_constructor(latency_buckets as fn() -> Histogram);
        registry.register("hubble_http_request_duration_seconds", "HTTP request to response", http_duration.clone());
        let dns_queries = Family::default();
        registry.register("hubble_dns_queries", "DNS queries", dns_queries.clone());
        let dns_responses = Family::default();
        registry.register("hubble_dns_responses", "DNS responses", dns_responses.clone());
        let kafka_requests = Family::default();
        registry.register("hubble_kafka_requests", "Kafka requests (and responses)", kafka_requests.clone());
        let kafka_duration = Family::new_with_constructor(latency_buckets as fn() -> Histogram);
        registry.register("hubble_kafka_request_duration_seconds", "Kafka request to response", kafka_duration.clone());
        let lost = Family::default();
        registry.register("hubble_lost_events", "Events lost before they became flows", lost.clone());
        let policy_verdicts = Family::default();
        registry.register(
            "hubble_policy_verdicts",
            "Policy verdicts on new flows (kernel) and requests (proxy)",
            policy_verdicts.clone(),
        );
        let policy_version = Gauge::default();
        registry.register("porin_policy_version", "The policy version in force", policy_version.clone());
        let (apply_seconds, map_entries, publish_failures) = (Gauge::default(), Family::default(), Counter::default());
        let (connections, snapshot_age) = (Gauge::default(), Gauge::default());
        match process {
            Process::Agent => {
                registry.register(
                    "porin_policy_apply_seconds",
                    "Time the last policy version took to reach the kernel maps",
                    apply_seconds.clone(),
                );
                registry.register(
                    "porin_policy_map_entries",
                    "Entries of the active generation, by kernel map",
                    map_entries.clone(),
                );
                registry.register(
                    "porin_policy_publish_failures",
                    "Policy versions that could not be published to the proxy",
                    publish_failures.clone(),
                );
            }
            Process::Proxy => {
                registry.register("porin_proxy_connections", "Client connections the proxy holds", connections.clone());
                registry.register(
                    "porin_snapshot_age_seconds",
                    "Time since the policy snapshot in force was loaded",
                    snapshot_age.clone(),
                );
            }
        }
        Self {
            id: INSTANCES.fetch_add(1, Ordering::Relaxed),
            registry,
            flows,
            drops,
            http_requests,
            http_responses,
            http_duration,
            dns_queries,
            dns_responses,
            kafka_requests,
            kafka_duration,
            lost,
            policy_verdicts,
            policy_version,
            apply_seconds,
            map_entries,
            publish_failures,
            connections,
            snapshot_age,
            topics: Mutex::new(HashSet::new()),
        }
    }
}

/// Hubble's `reporter`: the client's side judges egress, the server's ingress.
pub fn reporter(direction: TrafficDirection) -> &'static str {
    match direction {
        TrafficDirection::Egress => "client",
        _ => "server",
    }
}

/// A method as a label: the ones HTTP defines, else `other` (a client chooses methods).
pub fn method_label(m: &str) -> &'static str {
    const KNOWN: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
    KNOWN.iter().find(|k| **k == m).copied().unwrap_or("other")
}

impl HubbleMetrics {
    /// A flow processed: `protocol` (`http`, `dns`, `kafka`, `tcp`, `udp`, ...), `kind` (`L7`,
    /// `L3_L4`), `subtype` (`HTTP`, ... or empty), `verdict` (Hubble's name).
    pub fn flow(&self, protocol: &'static str, kind: &'static str, subtype: &'static str, verdict: &'static str) {
        self.count(HotMetric::Flows, [key(protocol), key(kind), key(subtype), key(verdict)], || {
            Handle::Counter(self.flows.get_or_create(&FlowLabels { protocol, r#type: kind, subtype, verdict }).clone())
        });
    }

    /// A drop: Hubble's reason name, the L4 protocol (`TCP`, `UDP`, `ICMPv4`, ...).
    pub fn drop(&self, reason: &'static str, protocol: &'static str) {
        self.count(HotMetric::Drops, [key(reason), key(protocol), 0, 0], || {
            Handle::Counter(self.drops.get_or_create(&DropLabels { reason, protocol }).clone())
        });
    }

    /// An HTTP request, counted when seen.
    pub fn http_request(&self, method: &str, protocol: &'static str, reporter: &'static str) {
        let method = method_label(method);
        self.count(HotMetric::HttpRequests, [key(method), key(protocol), key(reporter), 0], || {
            Handle::Counter(self.http_requests.get_or_create(&HttpRequestLabels { method, protocol, reporter }).clone())
        });
    }

    /// An HTTP response and its latency.
    pub fn http_response(&self, method: &str, status: u16, reporter: &'static str, seconds: f64) {
        let method = method_label(method);
        self.count(HotMetric::HttpResponses, [key(method), key(reporter), usize::from(status), 0], || {
            Handle::Counter(self.http_responses.get_or_create(&HttpResponseLabels { status, method, reporter }).clone())
        });
        self.observe(HotMetric::HttpDuration, [key(method), key(reporter), 0, 0], seconds, || {
            Handle::Histogram(self.http_duration.get_or_create(&HttpDurationLabels { method, reporter }).clone())
        });
    }

    /// A DNS query.
    pub fn dns_query(&self, qtypes: &[String]) {
        let labels = DnsLabels { rcode: String::new(), qtypes: qtypes.join(","), ips_returned: String::new() };
        self.dns_queries.get_or_create(&labels).inc();
    }

    /// A DNS response.
    pub fn dns_response(&self, rcode: u32, qtypes: &[String], ips: usize) {
        let labels = DnsLabels { rcode: rcode.to_string(), qtypes: qtypes.join(","), ips_returned: ips.to_string() };
        self.dns_responses.get_or_create(&labels).inc();
    }

    /// A Kafka request or response (`seconds`: the response's latency).
    pub fn kafka(&self, topic: &str, api_key: &str, error_code: i32, reporter: &'static str, seconds: Option<f64>) {
        let topic = self.topic_label(topic);
        let labels = KafkaLabels {
            topic: topic.clone(),
            api_key: api_key.to_owned(),
            error_code: error_code.to_string(),
            reporter,
        };
        self.kafka_requests.get_or_create(&labels).inc();
        if let Some(s) = seconds {
            let labels = KafkaDurationLabels { topic, api_key: api_key.to_owned(), reporter };
            self.kafka_duration.get_or_create(&labels).observe(s);
        }
    }

    /// Events lost at `source` so far (a running total read elsewhere, e.g. a kernel counter): the
    /// counter follows it up.
    pub fn lost_events(&self, source: &'static str, total: u64) {
        let c = self.lost.get_or_create(&LostLabels { source });
        let seen = c.get();
        if total > seen {
            c.inc_by(total - seen);
        }
    }

    /// The policy version in force.
    pub fn policy_version(&self, version: u64) {
        self.policy_version.set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// A policy verdict: `direction` (`ingress`, `egress`), `match` (`l3-l4`, `none`, `l7/http`,
    /// `l7/dns`, `l7/kafka`), `action` (`forwarded`, `dropped`, `redirected`, `audit`).
    pub fn policy_verdict(&self, direction: &'static str, r#match: &'static str, action: &'static str) {
        self.count(HotMetric::PolicyVerdicts, [key(direction), key(r#match), key(action), 0], || {
            Handle::Counter(
                self.policy_verdicts.get_or_create(&PolicyVerdictLabels { direction, r#match, action }).clone(),
            )
        });
    }

    /// The agent's last policy apply: its duration and the active generation's map entries.
    pub fn applied(&self, seconds: f64, policy_entries: usize, ipcache_entries: usize) {
        self.apply_seconds.set(seconds);
        let entries = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.map_entries.get_or_create(&MapLabels { map: "policy" }).set(entries(policy_entries));
        self.map_entries.get_or_create(&MapLabels { map: "ipcache" }).set(entries(ipcache_entries));
    }

    /// Publication failures so far (a running total): the counter follows it up.
    pub fn publish_failures(&self, total: u64) {
        let seen = self.publish_failures.get();
        if total > seen {
            self.publish_failures.inc_by(total - seen);
        }
    }

    /// The proxy's client connections and the age of its snapshot.
    pub fn proxy_state(&self, connections: usize, snapshot_age_seconds: f64) {
        self.connections.set(i64::try_from(connections).unwrap_or(i64::MAX));
        self.snapshot_age.set(snapshot_age_seconds);
    }

    /// Adds one to the counter of `labels`, through this thread's handle (taken by `get` once).
    fn count(&self, metric: HotMetric, labels: HotLabels, get: impl FnOnce() -> Handle) {
        self.with_handle(metric, labels, get, |h| {
            if let Handle::Counter(c) = h {
                c.inc();
            }
        });
    }

    /// Observes `value` in the histogram of `labels`, through this thread's handle.
    fn observe(&self, metric: HotMetric, labels: HotLabels, value: f64, get: impl FnOnce() -> Handle) {
        self.with_handle(metric, labels, get, |h| {
            if let Handle::Histogram(hist) = h {
                hist.observe(value);
            }
        });
    }

    fn with_handle(&self, metric: HotMetric, labels: HotLabels, get: impl FnOnce() -> Handle, f: impl FnOnce(&Handle)) {
        let mut job = Some((get, f));
        // A thread being torn down has no table (`try_with` fails, `job` is still there): it
        // counts through the family's handle directly.
        let in_table = HOT.try_with(|hot| {
            if let Some((get, f)) = job.take() {
                f(hot.borrow_mut().entry((self.id, metric, labels)).or_insert_with(get));
            }
        });
        if in_table.is_err()
            && let Some((get, f)) = job.take()
        {
            f(&get());
        }
    }

    /// A topic (list) as a label: itself while fewer than [`MAX_TOPICS`] have been seen, else `other`.
    fn topic_label(&self, topic: &str) -> String {
        let mut seen = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(topic) {
            return topic.to_owned();
        }
        if seen.len() < MAX_TOPICS {
            seen.insert(topic.to_owned());
            return topic.to_owned();
        }
        "other".to_owned()
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The same in Prometheus' older text format (0.0.4), for scrapers and tools that do not ask for
    /// OpenMetrics (`promtool check metrics`, curl): a counter's HELP and TYPE name its samples
    /// (`x_total`), and there is no `# EOF` or `# UNIT`.
    pub fn render_text(&self) -> String {
        openmetrics_to_text(&self.render())
    }
}

/// OpenMetrics text → Prometheus text format 0.0.4 (the only differences `prometheus-client`'s
/// output has: counter family names without `_total`, `# UNIT`, `# EOF`).
fn openmetrics_to_text(om: &str) -> String {
    let counters: HashSet<&str> =
        om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_older_text_format_names_counters_by_their_samples() {
        let om = "# HELP hubble_drop Dropped.\n# TYPE hubble_drop counter\nhubble_drop_total{reason=\"X\"} 2\n# HELP h Hist.\n# TYPE h histogram\nh_count 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP hubble_drop_total Dropped.\n# TYPE hubble_drop_total counter\nhubble_drop_total{reason=\"X\"} 2\n# HELP h Hist.\n# TYPE h histogram\nh_count 1\n"
        );
    }

    #[test]
    fn counts_through_per_thread_handles_reach_the_families() {
        let (a, b) = (HubbleMetrics::default(), HubbleMetrics::default());
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..3 {
                        a.http_request("GET", "HTTP/1.1", "server");
                        a.http_response("GET", 200, "server", 0.001);
                        a.http_response("GET", 404, "server", 0.001);
                        a.flow("http", "L7", "HTTP", "FORWARDED");
                    }
                    b.flow("http", "L7", "HTTP", "DROPPED");
                });
            }
        });
        let text = a.render_text();
        for line in [
            r#"hubble_http_requests_total{method="GET",protocol="HTTP/1.1",reporter="server"} 6"#,
            r#"hubble_http_responses_total{status="200",method="GET",reporter="server"} 6"#,
            r#"hubble_http_responses_total{status="404",method="GET",reporter="server"} 6"#,
            r#"hubble_http_request_duration_seconds_count{method="GET",reporter="server"} 12"#,
            r#"hubble_flows_processed_total{protocol="http",type="L7",subtype="HTTP",verdict="FORWARDED"} 6"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        // Another instance's counts stay its own.
        assert!(!text.contains("DROPPED"));
        assert!(b.render_text().contains(r#"verdict="DROPPED"} 2"#));
    }
}
