//! Conformance: cilium-envoy's HTTP policy tests (`http_envoy_policy_match.yaml`).
//!
//! The vectors are written against Envoy's NPDS resources (`cilium.NetworkPolicy`). Each is translated
//! into the engine's resolved form — a [`DirectionPolicy`] of entries `(peers, TCP, ports) → deny |
//! allow | redirect(HTTP rules)` — and judged by the engine's own L4 and L7 evaluation:
//! * `remote_policies` → the entry's peer identities (none = every peer);
//! * `deny: true` → a deny entry; a rule without `http_rules` → an L4-only allow;
//! * `proxy_id` scopes a rule to one listener: a rule for another listener is not part of this one's
//!   policy and is left out;
//! * `:path` / `:method` / `:authority` header matchers → the rule's path / method / host, other
//!   matchers → header requirements, `header_matches` → header matches with their actions, secrets
//!   read from the vector's SDS secret.

use std::sync::Arc;

use policy_engine::http::{
    HeaderLog, HeaderMap, HeaderMatch, HeaderMatcher, HeaderMatcherKind, HttpRequestInfo, HttpRule, HttpRuleSet,
    MatchAction, MismatchAction, SimpleHeaders, StrMatch,
};
use policy_engine::snapshot::{
    DirectionPolicy, EntryAction, L4Verdict, L7Set, L7Verdict, OriginId, PeerSet, PolicyEntry, Proto, ProtoMatch,
};
use porin_tests::{cases, load_vectors, s};
use serde_yaml::Value;

/// The listener port used in place of `{0}` when a case gives none.
const LISTENER_PORT: u16 = 80;

fn npds_policy(v: &Value, name: &str, port: u16) -> Value {
    let key = name.trim_end_matches(" (egress section)");
    let text =
        v.get("policies").and_then(|p| p.get(key)).and_then(Value::as_str).unwrap_or_else(|| panic!("policy {key}"));
    let text = text
        .replace("{0}", &port.to_string())
        .replace("{{}}", "{}")
        .replace("{{ ntop_ip_loopback_address }}", "127.0.0.1");
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    doc.get("resources").and_then(|r| r.get(0)).cloned().unwrap_or(Value::Null)
}

fn secret(v: &Value, name: &str) -> String {
    let text = v.get("policies").and_then(|p| p.get(format!("SECRET {name} (SDS)"))).and_then(Value::as_str).unwrap();
    let doc: Value = serde_yaml::from_str(text).unwrap();
    let res = &doc["resources"][0];
    s(&res["generic_secret"]["secret"], "inline_string").to_owned()
}

fn str_match(h: &Value) -> StrMatch {
    if let Some(e) = h.get("exact_match").and_then(Value::as_str) {
        StrMatch::Exact(e.to_owned())
    } else {
        StrMatch::Regex(s(&h["safe_regex_match"], "regex").to_owned())
    }
}

fn http_rule(v: &Value, r: &Value) -> HttpRule {
    let mut rule = HttpRule::default();
    for h in cases(r, "headers") {
        match s(h, "name") {
            ":path" => rule.path = Some(str_match(h)),
            ":method" => rule.method = Some(str_match(h)),
            ":authority" => rule.host = Some(str_match(h)),
            name => rule.headers.push(HeaderMatcher {
                name: name.to_ascii_lowercase(),
                kind: match str_match(h) {
                    StrMatch::Exact(e) => HeaderMatcherKind::Exact(e),
                    StrMatch::Regex(re) => HeaderMatcherKind::Regex(re),
                },
            }),
        }
    }
    for m in cases(r, "header_matches") {
        let sds = s(m, "value_sds_secret");
        rule.header_matches.push(HeaderMatch {
            name: s(m, "name").to_ascii_lowercase(),
            value: if sds.is_empty() { s(m, "value").to_owned() } else { secret(v, sds) },
            secret: !sds.is_empty(),
            match_action: match s(m, "match_action") {
                "" | "CONTINUE_ON_MATCH" => MatchAction::Continue,
                "FAIL_ON_MATCH" => MatchAction::Fail,
                "DELETE_ON_MATCH" => MatchAction::Delete,
                other => panic!("match_action {other}"),
            },
            mismatch_action: match s(m, "mismatch_action") {
                "" | "FAIL_ON_MISMATCH" => MismatchAction::Fail,
                "CONTINUE_ON_MISMATCH" => MismatchAction::Continue,
                "ADD_ON_MISMATCH" => MismatchAction::Add,
                "DELETE_ON_MISMATCH" => MismatchAction::Delete,
                "REPLACE_ON_MISMATCH" => MismatchAction::Replace,
                other => panic!("mismatch_action {other}"),
            },
        });
    }
    rule
}

/// NPDS per-port policies of one direction → the engine's direction policy.
fn translate(v: &Value, policy: &Value, direction: &str, proxy_id: u64) -> DirectionPolicy {
    let key = format!("{direction}_per_port_policies");
    let mut entries = Vec::new();
    for pp in cases(policy, &key) {
        let port = u16::try_from(pp.get("port").and_then(Value::as_u64).unwrap_or(0)).unwrap();
        let end = pp.get("end_port").and_then(Value::as_u64).map_or(port, |e| u16::try_from(e).unwrap());
        let (start, end) = if port == 0 { (0, u16::MAX) } else { (port, end.max(port)) };
        for rule in cases(pp, "rules") {
            let rule_proxy = rule.get("proxy_id").and_then(Value::as_u64).unwrap_or(0);
            if rule_proxy != 0 && rule_proxy != proxy_id {
                continue;
            }
            let remotes: Vec<u32> =
                cases(rule, "remote_policies").iter().map(|r| u32::try_from(r.as_u64().unwrap()).unwrap()).collect();
            let peers = if remotes.is_empty() { PeerSet::All } else { PeerSet::Ids(Arc::from(remotes)) };
            let deny = rule.get("deny").and_then(Value::as_bool).unwrap_or(false);
            let action = match (deny, rule.get("http_rules")) {
                (true, _) => EntryAction::Deny,
                (false, None) => EntryAction::Allow,
                (false, Some(hr)) => {
                    let rules: Vec<HttpRule> = cases(hr, "http_rules").iter().map(|r| http_rule(v, r)).collect();
                    let n = rules.len();
                    EntryAction::Redirect {
                        rules: L7Set::Http(Arc::new(HttpRuleSet::compile(rules).unwrap())),
                        rule_origins: vec![OriginId(0); n].into(),
                    }
                }
            };
            entries.push(PolicyEntry {
                peers,
                proto: ProtoMatch::Only(Proto::Tcp),
                port_start: start,
                port_end: end,
                action,
                origins: vec![OriginId(0)],
                auth: false,
            });
        }
    }
    DirectionPolicy { enforced: true, entries, ..Default::default() }
}

fn log_entries(pairs: &[(String, String)]) -> Vec<String> {
    pairs.iter().map(|(n, v)| if v.is_empty() { n.clone() } else { format!("{n}: {v}") }).collect()
}

#[test]
fn http_envoy_policy_match() {
    let v = load_vectors("http_envoy_policy_match.yaml");
    let all = cases(&v, "cases");
    let mut failures = Vec::new();
    for c in all {
        let id = s(c, "id");
        let port = c.get("port").and_then(Value::as_u64).map_or(LISTENER_PORT, |p| u16::try_from(p).unwrap());
        let proxy_id = c.get("proxy_id").and_then(Value::as_u64).unwrap_or(0);
        let policy = npds_policy(&v, s(c, "policy"), port);
        let dir = translate(&v, &policy, s(c, "direction"), proxy_id);
        let remote = u32::try_from(c.get("remote_identity").and_then(Value::as_u64).unwrap()).unwrap();
        let hdrs = c.get("request_headers").and_then(Value::as_mapping).unwrap();
        let get = |k: &str| hdrs.get(k).and_then(Value::as_str);
        let mut headers = SimpleHeaders::from_pairs(
            hdrs.iter().map(|(k, v)| (k.as_str().unwrap(), v.as_str().unwrap())).filter(|(k, _)| !k.starts_with(':')),
        );
        let req = HttpRequestInfo {
            method: get(":method").unwrap_or("GET").as_bytes(),
            path: get(":path").unwrap_or("/").as_bytes(),
            authority: get(":authority").map(str::as_bytes),
        };
        let mut log = HeaderLog::default();
        let allowed = match dir.l4_verdict(remote, Proto::Tcp, port) {
            L4Verdict::Drop(_) => false,
            L4Verdict::Allow { .. } => true,
            L4Verdict::Redirect(l7) => matches!(l7.check_http(&req, &mut headers, &mut log), L7Verdict::Allow(_)),
        };
        let expect = c.get("expect").unwrap();
        let want = s(expect, "verdict") == "allow";
        if allowed != want {
            failures.push(format!("{id}: expected {}, got allowed={allowed}", s(expect, "verdict")));
            continue;
        }
        let strings =
            |k: &str| -> Vec<String> { cases(expect, k).iter().map(|x| x.as_str().unwrap().to_owned()).collect() };
        let rejected = log_entries(&log.rejected);
        for want in strings("log_rejected_headers") {
            if !rejected.contains(&want) {
                failures.push(format!("{id}: rejected-header log {rejected:?} lacks {want:?}"));
            }
        }
        let missing = log_entries(&log.missing);
        for want in strings("log_missing_headers") {
            if !missing.contains(&want) {
                failures.push(format!("{id}: missing-header log {missing:?} lacks {want:?}"));
            }
        }
        for name in strings("forwarded_headers_absent") {
            if headers.get(&name.to_ascii_lowercase()).is_some() {
                failures.push(format!("{id}: header {name} should have been removed: {headers:?}"));
            }
        }
        if let Some(m) = expect.get("forwarded_headers_contain").and_then(Value::as_mapping) {
            for (k, val) in m {
                let got = headers.get(k.as_str().unwrap()).map(|v| String::from_utf8_lossy(&v).into_owned());
                if got.as_deref() != val.as_str() {
                    failures.push(format!("{id}: header {k:?} = {got:?}, expected {val:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), all.len(), failures.join("\n"));
    assert_eq!(all.len(), 25, "every case of the file is evaluated");
}
