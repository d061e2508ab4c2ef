//! Conformance: Cilium's rule validation (`policy_validation.yaml`), through `api::rule_from_value`,
//! the same path every policy document takes.

use policy_engine::api::{LoadOptions, rule_from_value};
use policy_engine::model::PolicyKind;
use porin_tests::{cases, load_vectors, s};
use serde_yaml::Value;

/// Cilium's "combining X and Y" message names the pair in Go map order (random); compare as a set.
fn same_message(got: &str, want: &str) -> bool {
    if got == want {
        return true;
    }
    let pair = |m: &str| -> Option<(String, String)> {
        let rest = m.strip_prefix("combining ")?.strip_suffix(" is not supported yet")?;
        let (a, b) = rest.split_once(" and ")?;
        let mut v = [a.to_owned(), b.to_owned()];
        v.sort();
        let [a, b] = v;
        Some((a, b))
    };
    pair(got).is_some() && pair(got) == pair(want)
}

#[test]
fn policy_validation() {
    let v = load_vectors("policy_validation.yaml");
    let all = cases(&v, "cases");
    let mut failures = Vec::new();
    for c in all {
        let id = s(c, "id");
        let spec = c.get("spec").expect("spec");
        // Host policies (nodeSelector) only exist in clusterwide policies.
        let kind = if spec.get("nodeSelector").is_some() {
            PolicyKind::CiliumClusterwideNetworkPolicy
        } else {
            PolicyKind::CiliumNetworkPolicy
        };
        let ns = (kind == PolicyKind::CiliumNetworkPolicy).then_some("default");
        let result = rule_from_value(spec, kind, ns, &LoadOptions::default());
        match (s(c, "expect"), &result) {
            ("valid", Ok(_)) => {}
            ("invalid", Err(problems)) => {
                if let Some(Value::String(want)) = c.get("error")
                    && !problems.iter().any(|p| same_message(&p.message, want))
                {
                    failures.push(format!("{id}: expected error {want:?}, got {problems:?}"));
                }
            }
            (want, got) => failures.push(format!("{id}: expected {want}, got {got:?}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), all.len(), failures.join("\n"));
    assert_eq!(all.len(), 33, "every case of the file is evaluated");
}
