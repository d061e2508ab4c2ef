//! Conformance: DNS name patterns (`fqdn_matchpattern.yaml`) and FQDN selector validation
//! (`fqdn_selector_validation.yaml`), through the engine's real matcher and policy validation.

use policy_engine::api::{LoadOptions, rule_from_value};
use policy_engine::dns::NamePattern;
use policy_engine::model::PolicyKind;
use porin_tests::{cases, load_vectors, s};
use serde_yaml::Value;

#[test]
fn fqdn_matchpattern() {
    let v = load_vectors("fqdn_matchpattern.yaml");
    let all = cases(&v, "cases");
    let mut failures = Vec::new();
    let mut diverging = 0;
    for c in all {
        let (id, pattern, name) = (s(c, "id"), s(c, "pattern"), s(c, "name"));
        // The compatibility target is Cilium v1.20's implementation (`current_impl_match`); where an
        // older test file expected otherwise ('**' anywhere spanning labels), v1.20 wins.
        let want = c.get("current_impl_match").and_then(Value::as_bool).expect("current_impl_match");
        if c.get("expect_match").and_then(Value::as_bool) != Some(want) {
            diverging += 1;
        }
        let got = NamePattern::pattern_unchecked(pattern).to_regex().is_match(name);
        if got != want {
            failures.push(format!("{id}: pattern {pattern:?} name {name:?}: expected {want}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), all.len(), failures.join("\n"));
    assert_eq!(all.len(), 57, "every case of the file is evaluated");
    assert_eq!(diverging, 5, "cases where v1.20 differs from the older test file");
}

fn spec_for(context: &str, selector: &Value) -> Value {
    let text = match context {
        "toFQDNs" => "endpointSelector: {}\negress:\n- toFQDNs: [__SEL__]\n",
        "rules.dns" => {
            "endpointSelector: {}\negress:\n- toEndpoints: [{}]\n  toPorts:\n  - ports: [{port: '53', protocol: ANY}]\n    rules: {dns: [__SEL__]}\n"
        }
        other => panic!("unknown context {other}"),
    };
    let mut spec: Value = serde_yaml::from_str(text).unwrap();
    porin_tests::replace(&mut spec, "__SEL__", selector);
    spec
}

#[test]
fn fqdn_selector_validation() {
    let v = load_vectors("fqdn_selector_validation.yaml");
    let all = cases(&v, "cases");
    let mut failures = Vec::new();
    for c in all {
        let id = s(c, "id");
        let spec = spec_for(s(c, "context"), c.get("selector").unwrap());
        let result = rule_from_value(&spec, PolicyKind::CiliumNetworkPolicy, Some("default"), &LoadOptions::default());
        match (s(c, "expect"), &result) {
            ("valid", Ok(_)) => {}
            ("invalid", Err(problems)) => {
                if let Some(Value::String(msg)) = c.get("error")
                    && !problems.iter().any(|p| &p.message == msg)
                {
                    failures.push(format!("{id}: expected error {msg:?}, got {problems:?}"));
                }
            }
            (want, got) => failures.push(format!("{id}: expected {want}, got {got:?}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), all.len(), failures.join("\n"));
    assert_eq!(all.len(), 11);
}
