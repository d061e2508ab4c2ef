//! Conformance: Kafka rule matching (`kafka_rule_match.yaml`) and the role / API-key / topic
//! semantics read from Cilium's code (`kafka_semantics.yaml`).

use std::collections::BTreeSet;

use policy_engine::kafka::{
    self, KafkaRequest, KafkaRule, KafkaRuleSet, TOPIC_API_KEYS, TOPIC_AUTHORIZATION_FAILED, TOPIC_EXTRACTED_KEYS,
};
use porin_tests::{cases, load_vectors, s};
use serde_yaml::Value;

fn int(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or_else(|| panic!("{key} missing in {v:?}"))
}

fn keys(v: &Value) -> Vec<i16> {
    v.as_sequence().map(|s| s.iter().map(|k| i16::try_from(k.as_i64().unwrap()).unwrap()).collect()).unwrap_or_default()
}

#[test]
fn kafka_rule_match() {
    let v = load_vectors("kafka_rule_match.yaml");
    let all = cases(&v, "cases");
    for c in all {
        let id = s(c, "id");
        let rules: Vec<KafkaRule> = cases(c, "rules")
            .iter()
            .map(|r| {
                let version = int(r, "api_version");
                KafkaRule {
                    api_keys: keys(r.get("api_keys").unwrap()).into_iter().collect(),
                    api_version: (version >= 0).then(|| i16::try_from(version).unwrap()),
                    client_id: Some(s(r, "client_id").to_owned()).filter(|x| !x.is_empty()),
                    topic: Some(s(r, "topic").to_owned()).filter(|x| !x.is_empty()),
                }
            })
            .collect();
        let req = c.get("request").unwrap();
        let topics: Vec<&str> = cases(req, "topics").iter().map(|t| t.as_str().unwrap()).collect();
        let request = KafkaRequest {
            api_key: i16::try_from(int(req, "api_key")).unwrap(),
            api_version: Some(i16::try_from(int(req, "api_version")).unwrap()),
            client_id: Some(s(req, "client_id")).filter(|x| !x.is_empty()),
            topics,
            cluster_only: false,
        };
        let want = c.get("expect").and_then(Value::as_bool).unwrap();
        assert_eq!(KafkaRuleSet::new(rules).allows(&request).is_some(), want, "{id}");
    }
    assert_eq!(all.len(), 4);
}

#[test]
fn kafka_semantics() {
    let v = load_vectors("kafka_semantics.yaml");
    // Roles expand to exactly these API keys, and the names map as Cilium spells them.
    for role in cases(&v, "roles") {
        let rule = KafkaRule::from_crd(s(role, "role"), "", "", "", "").unwrap();
        assert_eq!(
            rule.api_keys,
            keys(role.get("api_keys").unwrap()).into_iter().collect::<BTreeSet<_>>(),
            "{}",
            s(role, "id")
        );
        for name in cases(role, "names") {
            let key = kafka::api_key_by_name(name.as_str().unwrap()).unwrap();
            assert!(rule.api_keys.contains(&key), "{} contains {name:?}", s(role, "id"));
        }
    }
    let map = v.get("api_key_map").and_then(Value::as_mapping).unwrap();
    assert_eq!(map.len(), 34);
    for (name, key) in map {
        assert_eq!(kafka::api_key_by_name(name.as_str().unwrap()), Some(i16::try_from(key.as_i64().unwrap()).unwrap()));
    }
    let th = v.get("topic_handling").unwrap();
    assert_eq!(keys(th.get("topic_carrying_api_keys (isTopicAPIKey)").unwrap()), TOPIC_API_KEYS);
    let extracted: Vec<i16> = th
        .get("topics_actually_extracted_from (setTopics)")
        .and_then(Value::as_mapping)
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(extracted, TOPIC_EXTRACTED_KEYS);
    assert_eq!(i64::from(TOPIC_AUTHORIZATION_FAILED), int(v.get("deny_error_code").unwrap(), "value"));
    // Not applicable to the policy engine: which denied request kinds get a synthesised error reply
    // ("deny_response_synthesized_for") is the Kafka proxy's wire behaviour; the proxy's tests own it.
    assert!(th.get("deny_response_synthesized_for (CreateResponse)").is_some());

    let sanitize = cases(&v, "sanitize_cases");
    for c in sanitize {
        let r = c.get("rule").unwrap();
        let field = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
        let got =
            KafkaRule::from_crd(field("role"), field("apiKey"), field("apiVersion"), field("clientID"), field("topic"));
        match (s(c, "expect"), got) {
            ("valid", Ok(_)) => {}
            ("invalid", Err(e)) => assert_eq!(e.to_string(), s(c, "error"), "{}", s(c, "id")),
            (want, got) => panic!("{}: expected {want}, got {got:?}", s(c, "id")),
        }
    }
    assert_eq!(sanitize.len(), 10);
}
