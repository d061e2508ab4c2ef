//! Cilium's HTTP scenarios (`../shared/conformance/scenarios_http.yaml`) through the running proxy:
//! real curl requests (HTTP/1.1, and h2c for the gRPC guide) against a real backend.
//!
//! Outcomes map as: `allowed` → the backend answered (200); `l7_denied` → 403 `Access denied` (for
//! gRPC: 200 with `grpc-status: 7`) and a flow record saying no HTTP rule allowed it;
//! `dropped_l3` → the datapath would have dropped the flow, so the proxy refuses every request of
//! the connection (403) and its flow record says the connection's policy drops it; `upstream_401`
//! → the request reached the backend untouched (without the header a rule would inject).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]

mod common;

use std::collections::BTreeMap;

use common::*;
use porin_tests::{cases, conformance_dir, load_vectors, s};
use serde_yaml::Value;

fn fill_template(text: &str) -> String {
    text.replace("{{.ClusterNameLocal}}", "default")
        .replace("{{.ClusterNameRemote}}", "remote")
        .replace("{{.TestNamespace}}", "default")
        .replace("{{trimSuffix .ExternalTarget \".\"}}", "one.one.one.one")
        .replace("{{.ExternalTarget}}", "one.one.one.one.")
}

fn labels_of(v: &Value) -> Vec<(String, String)> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (k.as_str().unwrap().to_owned(), v.as_str().unwrap().to_owned())).collect())
        .unwrap_or_default()
}

fn ep(name: &str, labels: &[(String, String)], ip: &str) -> policy_engine::resolve::Endpoint {
    let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    endpoint(name, &l, ip)
}

/// `"POST /v1/x (comment)"` → (`POST`, `/v1/x`).
fn method_path(req: &str) -> Option<(&str, &str)> {
    let req = req.split(" (").next()?;
    let (m, p) = req.split_once(' ')?;
    p.starts_with('/').then_some((m, p))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_http_through_the_proxy() {
    let v = load_vectors("scenarios_http.yaml");
    let mut failures = Vec::new();
    let mut steps = 0;
    for sc in cases(&v, "scenarios") {
        let id = s(sc, "id");
        let port = u16::try_from(sc["server"]["port"].as_u64().unwrap()).unwrap();
        let mut policy_files = vec![s(sc, "policy").to_owned()];
        if id == "cli-client-egress-l7-method" {
            // The step's "why": client-egress-only-dns also selects kind=client.
            policy_files.push("policies/dns/cilium-cli_client-egress-only-dns.yaml".into());
        }
        let texts: Vec<String> = policy_files
            .iter()
            .map(|p| fill_template(&std::fs::read_to_string(conformance_dir().join(p)).unwrap()))
            .collect();
        let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let client_labels = if id.starts_with("cli-") {
            // cilium-cli's client2 carries all three labels.
            vec![("kind".into(), "client".into()), ("name".into(), "client2".into()), ("other".into(), "client".into())]
        } else {
            match labels_of(&sc["client"]["labels"]) {
                l if l.is_empty() => vec![("app".into(), "anyclient".into())],
                l => l,
            }
        };
        let mut eps = vec![
            ep("server", &labels_of(&sc["server"]["labels"]), "10.0.0.1"),
            ep("client", &client_labels, "10.0.0.2"),
        ];
        let mut secrets: Vec<(String, String)> = Vec::new();
        // Listeners: one per (client, port) a step uses; gRPC steps over h2c.
        let mut listeners: BTreeMap<String, (String, u16)> = BTreeMap::new();
        for (i, step) in cases(sc, "steps").iter().enumerate() {
            let client = match step.get("client_labels") {
                Some(l) => {
                    let name = format!("client{i}");
                    eps.push(ep(&name, &labels_of(l), &format!("10.0.1.{i}")));
                    name
                }
                None => "client".into(),
            };
            let p = s(step, "request").strip_prefix("TCP ").map_or(port, |p| p.parse().unwrap());
            listeners.insert(format!("{client}-{p}"), (client, p));
            if let Some(sec) = step.get("secret").and_then(Value::as_mapping) {
                for (name, val) in sec {
                    secrets.push((format!("default/{}", name.as_str().unwrap()), s(val, "value").to_owned()));
                }
            }
        }
        let grpc = s(&sc["server"], "protocol").contains("gRPC");
        let ls: Vec<L> = listeners
            .iter()
            .map(|(name, (client, p))| L {
                name: Box::leak(name.clone().into_boxed_str()),
                source: pod(client),
                destination: pod("server"),
                port: *p,
                h2_upstream: grpc,
            })
            .collect();
        let sec: Vec<(&str, &str)> = secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let fx = Fixture::with_limits(&text_refs, &eps, &ls, proxy::config::Limits::default(), &sec).await;

        for (i, step) in cases(sc, "steps").iter().enumerate() {
            steps += 1;
            let client = if step.get("client_labels").is_some() { format!("client{i}") } else { "client".into() };
            let req = s(step, "request");
            let p = req.strip_prefix("TCP ").map_or(port, |p| p.parse().unwrap());
            let addr = fx.addr(&format!("{client}-{p}"));
            let (method, path) = if let Some(rpc) = req.strip_prefix("rpc ") {
                ("POST".to_owned(), format!("/cloudcity.DoorManager/{}", rpc.split('(').next().unwrap()))
            } else if let Some((m, p)) = method_path(req) {
                (m.to_owned(), p.to_owned())
            } else {
                ("GET".to_owned(), "/".to_owned())
            };
            let mut args: Vec<String> = vec!["-X".into(), method.clone()];
            if grpc {
                args.extend([
                    "--http2-prior-knowledge".into(),
                    "-H".into(),
                    "content-type: application/grpc".into(),
                    "-H".into(),
                    "te: trailers".into(),
                ]);
            }
            for (k, v) in labels_of(&step["headers"]) {
                args.extend(["-H".into(), format!("{k}: {v}")]);
            }
            let before = fx.flows().len();
            let seen_before = fx.h1.targets().len() + fx.h2.targets().len();
            let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = curl(addr, &path, &arg_refs).await;
            let flow = fx.flows().into_iter().nth(before);
            let summary = flow.as_ref().map(|f| f.summary.clone()).unwrap_or_default();
            let reached = fx.h1.targets().len() + fx.h2.targets().len() > seen_before;
            let outcome = s(&step["expect"], "outcome");
            let denied_reply = if grpc {
                r.status == 200 && r.headers.contains("grpc-status: 7")
            } else {
                r.status == 403 && r.body == "Access denied\r\n"
            };
            let ok = match outcome {
                "allowed" => r.status == 200 && reached && !r.headers.contains("grpc-status"),
                "l7_denied" => denied_reply && !reached && summary.contains("HTTP rule"),
                "dropped_l3" => denied_reply && !reached && summary.contains("drops the connection"),
                "upstream_401" => {
                    reached && {
                        let last = fx.h1.last().unwrap();
                        last.header("authorization").is_none()
                    }
                }
                other => panic!("unknown outcome {other}"),
            };
            if !ok {
                failures.push(format!(
                    "{id} step {i} ({req}): expected {outcome}, got {} {:?} reached={reached} flow={summary:?}",
                    r.status, r.body
                ));
            }
            // The REPLACE action injects the secret into what the backend receives.
            if id == "cli-client-egress-l7-set-header" && outcome == "allowed" {
                let auth = fx.h1.last().and_then(|l| l.header("authorization").map(str::to_owned));
                if auth.as_deref() != Some("Bearer 123456") {
                    failures.push(format!("{id} step {i}: Authorization forwarded {auth:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(steps, 26, "every step runs");
}
