//! Conformance: end-to-end outcomes of Cilium's getting-started guides and docs
//! (`scenarios_{starwars,http,kafka,dns}.yaml`), judged offline by the engine exactly as
//! `porin policy test` judges them.
//!
//! The scenario files describe clients and requests in prose (`POST /v1/request-landing`,
//! `rpc GetName(1)`, `curl -I https://api.github.com`, `op: produce`). This file holds the glue that
//! turns them into flows: the pods of each guide with their labels, and a small interpreter for the
//! request strings. Outcomes map as `allowed` → allow, `l7_denied` → deny, `dropped_l3` → drop,
//! `upstream_401` → allow without header injection (the server itself refuses).

use std::collections::BTreeMap;
use std::net::IpAddr;

use policy_engine::http::{HeaderLog, HeaderMap, HttpRequestInfo, SimpleHeaders};
use policy_engine::policy_test::{ApiKey, DnsCase, Flow, HttpCase, KafkaCase, Outcome, Scenario, ScenarioBuilder};
use policy_engine::resolve::Endpoint;
use policy_engine::snapshot::{L4Verdict, Proto};
use porin_tests::{cases, conformance_dir, load_vectors, s};
use serde_yaml::Value;

/// cilium-cli's manifests are Go templates; these are the values our single-cluster test uses.
fn fill_template(text: &str) -> String {
    text.replace("{{.ClusterNameLocal}}", "default")
        .replace("{{.ClusterNameRemote}}", "remote")
        .replace("{{.TestNamespace}}", "default")
        .replace("{{trimSuffix .ExternalTarget \".\"}}", "one.one.one.one")
        .replace("{{.ExternalTarget}}", "one.one.one.one.")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (k.as_str().unwrap().to_owned(), v.as_str().unwrap().to_owned())).collect())
        .unwrap_or_default()
}

struct World {
    builder: ScenarioBuilder,
}

impl World {
    fn new(policies: &[&str]) -> Self {
        let mut builder = ScenarioBuilder::new();
        for p in policies {
            let path = conformance_dir().join(p);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            builder.policy_text(p, &fill_template(&text));
        }
        Self { builder }
    }

    fn pod(mut self, name: &str, ns: &str, l: BTreeMap<String, String>) -> Self {
        self.builder
            .endpoint(name, Endpoint { name: name.into(), namespace: ns.into(), labels: l, ..Default::default() });
        self
    }

    fn fqdn(mut self, name: &str, ip: &str) -> Self {
        let ip: IpAddr = ip.parse().unwrap();
        self.builder.fqdn(name, vec![ip]);
        self
    }

    fn secret(mut self, key: &str, value: &str) -> Self {
        self.builder.secret(key, value);
        self
    }

    fn build(self) -> Scenario {
        self.builder.build().unwrap_or_else(|e| panic!("scenario does not load: {e:?}"))
    }
}

fn outcome_of(expect: &Value) -> Outcome {
    match s(expect, "outcome") {
        "allowed" | "upstream_401" => Outcome::Allow,
        "l7_denied" => Outcome::Deny,
        "dropped_l3" => Outcome::Drop,
        other => panic!("unknown outcome {other}"),
    }
}

fn http(from: &str, to: &str, port: u16, method: &str, path: &str, headers: &Value) -> Flow {
    Flow {
        from: from.into(),
        to: to.into(),
        port: Some(port),
        http: Some(HttpCase {
            method: Some(method.into()),
            path: Some(path.into()),
            host: None,
            headers: labels_of(headers),
        }),
        ..Default::default()
    }
}

fn l4(from: &str, to: &str, port: u16) -> Flow {
    Flow { from: from.into(), to: to.into(), port: Some(port), ..Default::default() }
}

fn dns(from: &str, to: &str, q: &str) -> Flow {
    Flow {
        from: from.into(),
        to: to.into(),
        port: Some(53),
        protocol: Some("UDP".into()),
        dns: Some(DnsCase { query: q.into(), qtype: None }),
        ..Default::default()
    }
}

fn kafka(from: &str, key: i16, topic: Option<&str>) -> Flow {
    Flow {
        from: from.into(),
        to: "kafka".into(),
        port: Some(9092),
        kafka: Some(KafkaCase {
            api_key: ApiKey::Number(key),
            api_version: Some(3),
            client_id: Some(from.into()),
            topics: topic.map(|t| vec![t.to_owned()]).unwrap_or_default(),
        }),
        ..Default::default()
    }
}

/// Evaluates flows in order; the first that is not allowed decides (a client stops at its first error).
fn run(sc: &Scenario, flows: &[Flow]) -> (Outcome, String) {
    for f in flows {
        let ev = sc.evaluate(f, false).unwrap_or_else(|e| panic!("flow {f:?}: {e}"));
        if ev.outcome != Outcome::Allow {
            return (ev.outcome, ev.reason);
        }
    }
    (Outcome::Allow, "allowed".into())
}

/// `"POST /v1/x (comment)"` → (`POST`, `/v1/x`).
fn method_path(req: &str) -> Option<(&str, &str)> {
    let req = req.split(" (").next()?;
    let (m, p) = req.split_once(' ')?;
    p.starts_with('/').then_some((m, p))
}

struct Checked {
    steps: usize,
    failures: Vec<String>,
}

impl Checked {
    fn check(&mut self, id: &str, i: usize, want: Outcome, got: (Outcome, String)) {
        self.steps += 1;
        if want != got.0 {
            self.failures.push(format!("{id} step {i}: expected {want}, got {} ({})", got.0, got.1));
        }
    }
}

#[test]
fn scenarios_starwars() {
    let v = load_vectors("scenarios_starwars.yaml");
    let mut c = Checked { steps: 0, failures: vec![] };
    for sc in cases(&v, "scenarios") {
        let id = s(sc, "id");
        let policy: Vec<&str> = sc.get("policy").and_then(Value::as_str).into_iter().collect();
        let world = World::new(&policy)
            .pod("deathstar", "default", labels(&[("org", "empire"), ("class", "deathstar")]))
            .pod("tiefighter", "default", labels(&[("org", "empire"), ("class", "tiefighter")]));
        // The star-wars-demo repository's xwing is a spaceship of the alliance.
        let world = if id == "swdemo-l7-header" {
            world.pod("xwing", "default", labels(&[("org", "alliance"), ("class", "spaceship")])).pod(
                "spaceship",
                "default",
                labels(&[("org", "empire"), ("class", "spaceship")]),
            )
        } else {
            world.pod("xwing", "default", labels(&[("org", "alliance"), ("class", "xwing")]))
        };
        let scenario = world.build();
        for (i, step) in cases(sc, "steps").iter().enumerate() {
            let want = outcome_of(&step["expect"]);
            let req = s(step, "request");
            let client = s(step, "client").split_whitespace().next().unwrap_or("");
            if client == "any" {
                // "any ingress to org=empire": every client, every way in.
                for from in ["tiefighter", "xwing", "entity:world", "entity:host"] {
                    c.check(id, i, want, run(&scenario, &[l4(from, "deathstar", 80)]));
                }
                continue;
            }
            let (m, p) = method_path(req).unwrap_or_else(|| panic!("{id}: request {req:?}"));
            c.check(id, i, want, run(&scenario, &[http(client, "deathstar", 80, m, p, &step["headers"])]));
        }
    }
    assert!(c.failures.is_empty(), "{}", c.failures.join("\n"));
    assert_eq!(c.steps, 16, "every step is evaluated (the default-deny step for four clients)");
}

#[test]
fn scenarios_http() {
    let v = load_vectors("scenarios_http.yaml");
    let mut c = Checked { steps: 0, failures: vec![] };
    for sc in cases(&v, "scenarios") {
        let id = s(sc, "id");
        let policy = s(sc, "policy");
        let server = labels_of(&sc["server"]["labels"]);
        let port = u16::try_from(sc["server"]["port"].as_u64().unwrap()).unwrap();
        let client = match labels_of(&sc["client"]["labels"]) {
            l if l.is_empty() => labels(&[("app", "anyclient")]),
            l => l,
        };
        let mut policies = vec![policy];
        let mut world_client = client.clone();
        if id.starts_with("cli-") {
            // cilium-cli's client2 carries all three labels; its default client only kind/name.
            world_client = labels(&[("kind", "client"), ("name", "client2"), ("other", "client")]);
        }
        if id == "cli-client-egress-l7-method" {
            // The step's "why": client-egress-only-dns also selects kind=client.
            policies.push("policies/dns/cilium-cli_client-egress-only-dns.yaml");
        }
        let mut world =
            World::new(&policies).pod("server", "default", server.clone()).pod("client", "default", world_client);
        for step in cases(sc, "steps") {
            if let Some(l) = step.get("client_labels") {
                world =
                    world.pod(&format!("client-{}", serde_yaml::to_string(l).unwrap().trim()), "default", labels_of(l));
            }
            if let Some(sec) = step.get("secret").and_then(Value::as_mapping) {
                for (name, val) in sec {
                    world = world.secret(&format!("default/{}", name.as_str().unwrap()), s(val, "value"));
                }
            }
        }
        let scenario = world.build();
        for (i, step) in cases(sc, "steps").iter().enumerate() {
            let want = outcome_of(&step["expect"]);
            let from = match step.get("client_labels") {
                Some(l) => format!("client-{}", serde_yaml::to_string(l).unwrap().trim()),
                None => "client".into(),
            };
            let req = s(step, "request");
            let flow = if let Some(rpc) = req.strip_prefix("rpc ") {
                let method = rpc.split('(').next().unwrap();
                http(&from, "server", port, "POST", &format!("/cloudcity.DoorManager/{method}"), &Value::Null)
            } else if let Some(p) = req.strip_prefix("TCP ") {
                l4(&from, "server", p.parse().unwrap())
            } else if req.starts_with("any ") {
                l4(&from, "server", port)
            } else {
                let (m, p) = method_path(req).unwrap_or_else(|| panic!("{id}: request {req:?}"));
                http(&from, "server", port, m, p, &step["headers"])
            };
            c.check(id, i, want, run(&scenario, std::slice::from_ref(&flow)));
            // Header actions: REPLACE must inject the secret for client2; the plain client's request
            // reaches the server untouched (and the server answers 401).
            if id == "cli-client-egress-l7-set-header" {
                let (m, p) = method_path(req).unwrap();
                let injected = injected_authorization(&scenario, &from, "server", port, m, p);
                let want_header = (s(&step["expect"], "outcome") == "allowed").then(|| "Bearer 123456".to_owned());
                if injected != want_header {
                    c.failures
                        .push(format!("{id} step {i}: Authorization forwarded {injected:?}, expected {want_header:?}"));
                }
            }
        }
    }
    assert!(c.failures.is_empty(), "{}", c.failures.join("\n"));
    assert_eq!(c.steps, 26, "every step is evaluated");
}

/// The Authorization header the egress proxy forwards for a request (None when not redirected).
fn injected_authorization(sc: &Scenario, from: &str, to: &str, port: u16, method: &str, path: &str) -> Option<String> {
    let client = sc.snapshot.endpoints().iter().find(|e| e.name == from)?;
    let server = sc.snapshot.endpoints().iter().find(|e| e.name == to)?;
    let L4Verdict::Redirect(l7) = client.egress.l4_verdict(server.identity, Proto::Tcp, port) else { return None };
    let mut headers = SimpleHeaders::default();
    let req = HttpRequestInfo { method: method.as_bytes(), path: path.as_bytes(), authority: None };
    l7.check_http(&req, &mut headers, &mut HeaderLog::default());
    headers.get("authorization").map(|v| String::from_utf8_lossy(&v).into_owned())
}

#[test]
fn scenarios_kafka() {
    let v = load_vectors("scenarios_kafka.yaml");
    let mut c = Checked { steps: 0, failures: vec![] };
    for sc in cases(&v, "scenarios") {
        let id = s(sc, "id");
        // A list of policies is a list of equivalent alternatives: check each on its own.
        let alternatives: Vec<Vec<&str>> = match sc.get("policy") {
            Some(Value::String(p)) => vec![vec![p.as_str()]],
            Some(Value::Sequence(ps)) => ps.iter().map(|p| vec![p.as_str().unwrap()]).collect(),
            _ => vec![vec![]],
        };
        for policies in alternatives {
            let mut world = World::new(&policies).pod("kafka", "default", labels(&[("app", "kafka")]));
            for app in ["empire-hq", "empire-outpost", "empire-backup"] {
                world = world.pod(app, "default", labels(&[("app", app)]));
            }
            let scenario = world.build();
            for (i, step) in cases(sc, "steps").iter().enumerate() {
                let want = outcome_of(&step["expect"]);
                let (client, topic) = (s(step, "client"), s(step, "topic"));
                // What a real client sends: a producer asks for metadata then produces; a consumer
                // finds its coordinator, joins its group, lists offsets, fetches and commits.
                let flows: Vec<Flow> = match s(step, "op") {
                    "produce" => {
                        vec![kafka(client, 18, None), kafka(client, 3, Some(topic)), kafka(client, 0, Some(topic))]
                    }
                    "consume" => vec![
                        kafka(client, 18, None),
                        kafka(client, 3, Some(topic)),
                        kafka(client, 10, None),
                        kafka(client, 11, None),
                        kafka(client, 14, None),
                        kafka(client, 9, Some(topic)),
                        kafka(client, 2, Some(topic)),
                        kafka(client, 1, Some(topic)),
                        kafka(client, 8, Some(topic)),
                    ],
                    "fetch" => vec![kafka(client, 1, Some(topic))],
                    other => panic!("{id}: op {other}"),
                };
                c.check(&format!("{id} {policies:?}"), i, want, run(&scenario, &flows));
            }
        }
    }
    assert!(c.failures.is_empty(), "{}", c.failures.join("\n"));
    assert_eq!(c.steps, 6 + 7 + 2 * 4, "every step is evaluated (both equivalent policies of the last scenario)");
}

#[test]
fn scenarios_dns() {
    let v = load_vectors("scenarios_dns.yaml");
    let mut c = Checked { steps: 0, failures: vec![] };
    // Documentation addresses stand in for what the DNS proxy learned.
    let names = [
        ("api.github.com", "192.0.2.1"),
        ("support.github.com", "192.0.2.2"),
        ("gist.github.com", "192.0.2.3"),
        ("github.com", "192.0.2.4"),
        ("cilium.io", "198.51.100.1"),
        ("sub.cilium.io", "198.51.100.2"),
        ("service1.api.cilium.io", "198.51.100.3"),
        ("anothersub.cilium.io", "198.51.100.4"),
        ("special-region1-service.api.cilium.io", "198.51.100.5"),
        ("region1-service.api.cilium.io", "198.51.100.6"),
    ];
    for sc in cases(&v, "scenarios") {
        let id = s(sc, "id");
        // The Alpine/musl note has no policy of its own: it is about the layer7 doc's DNS policy.
        let policy = sc.get("policy").and_then(Value::as_str).unwrap_or("policies/dns/dns.yaml");
        let client = match sc.get("client_labels") {
            Some(l) => labels_of(l),
            None if id == "dns-doc-alpine" => labels(&[("org", "alliance")]),
            None => labels(&[("org", "empire"), ("class", "mediabot"), ("app", "mediabot")]),
        };
        let mut world = World::new(&[policy]).pod("client", "default", client).pod(
            "kube-dns",
            "kube-system",
            labels(&[("k8s-app", "kube-dns")]),
        );
        for (n, ip) in names {
            world = world.fqdn(n, ip);
        }
        let scenario = world.build();
        for (i, step) in cases(sc, "steps").iter().enumerate() {
            let want = outcome_of(&step["expect"]);
            let req = s(step, "request");
            let flows: Vec<Flow> = if let Some(url) = req.split_whitespace().find(|w| w.contains("://")) {
                let (scheme, host) = url.split_once("://").unwrap();
                let port = if scheme == "https" { 443 } else { 80 };
                vec![dns("client", "kube-dns", host), l4("client", &format!("fqdn:{host}"), port)]
            } else if let Some(q) = req.strip_prefix("DNS query ") {
                vec![dns("client", "kube-dns", q)]
            } else if let Some(host) = req.strip_prefix("TCP 80 to IPs of ") {
                vec![l4("client", &format!("fqdn:{host}"), 80)]
            } else if let Some((_, first)) = req.split_once("first attempt ") {
                let q = first.replace("<ns>", "default");
                vec![dns("client", "kube-dns", &q)]
            } else {
                panic!("{id}: request {req:?}");
            };
            c.check(id, i, want, run(&scenario, &flows));
        }
    }
    assert!(c.failures.is_empty(), "{}", c.failures.join("\n"));
    assert_eq!(c.steps, 16, "every step is evaluated");
}

/// Every vector file is covered by a test above; a new file makes this fail until it is.
#[test]
fn every_vector_file_is_covered() {
    let covered = [
        "dnsproxy_check_allowed.yaml",
        "fqdn_matchpattern.yaml",
        "fqdn_selector_validation.yaml",
        "http_envoy_policy_match.yaml",
        "kafka_rule_match.yaml",
        "kafka_semantics.yaml",
        "policy_validation.yaml",
        "scenarios_dns.yaml",
        "scenarios_http.yaml",
        "scenarios_kafka.yaml",
        "scenarios_starwars.yaml",
    ];
    let mut found: Vec<String> = std::fs::read_dir(conformance_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    found.sort();
    assert_eq!(found, covered);
}
