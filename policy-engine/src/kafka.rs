//! Kafka L7 rules: validation (Cilium's `kafka.PortRule.Sanitize`), role → API-key expansion, and the
//! request matcher of Cilium's proxylib (`kafkalib.Rule.Matches`).
//!
//! The proxy decodes requests with kafka-protocol and hands this module the API key, version, client id
//! and the topics; this module never sees bytes.

use std::collections::BTreeSet;
use std::fmt;

/// Cilium's API-key names (`kafka.go` `KafkaAPIKeyMap`), lower case.
pub const API_KEY_NAMES: &[(&str, i16)] = &[
    ("produce", 0),
    ("fetch", 1),
    ("offsets", 2),
    ("metadata", 3),
    ("leaderandisr", 4),
    ("stopreplica", 5),
    ("updatemetadata", 6),
    ("controlledshutdown", 7),
    ("offsetcommit", 8),
    ("offsetfetch", 9),
    ("findcoordinator", 10),
    ("joingroup", 11),
    ("heartbeat", 12),
    ("leavegroup", 13),
    ("syncgroup", 14),
    ("describegroups", 15),
    ("listgroups", 16),
    ("saslhandshake", 17),
    ("apiversions", 18),
    ("createtopics", 19),
    ("deletetopics", 20),
    ("deleterecords", 21),
    ("initproducerid", 22),
    ("offsetforleaderepoch", 23),
    ("addpartitionstotxn", 24),
    ("addoffsetstotxn", 25),
    ("endtxn", 26),
    ("writetxnmarkers", 27),
    ("txnoffsetcommit", 28),
    ("describeacls", 29),
    ("createacls", 30),
    ("deleteacls", 31),
    ("describeconfigs", 32),
    ("alterconfigs", 33),
];

/// API keys of `role: produce`.
pub const PRODUCE_KEYS: &[i16] = &[0, 3, 18];
/// API keys of `role: consume`.
pub const CONSUME_KEYS: &[i16] = &[1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18];
/// Keys whose requests carry topics (`isTopicAPIKey`): a topic rule is only checked for these.
pub const TOPIC_API_KEYS: &[i16] = &[0, 1, 2, 3, 4, 5, 6, 8, 9, 19, 20, 21, 23, 24, 27, 28, 34, 35, 37];
/// Keys past Cilium's table (which ends at 37) that carry no topic: delegation tokens (38–41),
/// DeleteGroups (42), SCRAM credentials (50, 51), DescribeCluster (60), client telemetry (71, 72).
pub const TOPIC_FREE_NEW_KEYS: &[i16] = &[38, 39, 40, 41, 42, 50, 51, 60, 71, 72];

/// Whether a rule's `topic` restricts requests of `key`. Cilium's `isTopicAPIKey` keys, plus what
/// Cilium's table left out and can name topics: DescribeConfigs / AlterConfigs (32, 33, whose
/// resources can be topics) and every key after 37 not known to be topic-free (ShareFetch,
/// IncrementalAlterConfigs, OffsetDelete, DescribeTopicPartitions, ...). Topics are extracted only
/// for [`TOPIC_EXTRACTED_KEYS`], so a topic rule never matches the others: fail closed.
pub fn topic_rules_apply(key: i16) -> bool {
    TOPIC_API_KEYS.contains(&key) || key == 32 || key == 33 || (key > 37 && !TOPIC_FREE_NEW_KEYS.contains(&key))
}

/// Keys whose topics the parser extracts (`setTopics`); other topic-carrying keys count as carrying none.
pub const TOPIC_EXTRACTED_KEYS: &[i16] = &[0, 1, 2, 3, 8, 9];
/// Maximum topic length.
pub const MAX_TOPIC_LEN: usize = 255;
/// Kafka error code sent for denied requests.
pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
/// Kafka error code `GROUP_AUTHORIZATION_FAILED`: a denied request about a consumer group.
pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
/// Kafka error code `CLUSTER_AUTHORIZATION_FAILED`: a denied request about the cluster.
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
/// Kafka error code `TRANSACTIONAL_ID_AUTHORIZATION_FAILED`: a denied transactional request.
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;

/// Looks up an API key by Cilium's name (case-insensitive).
pub fn api_key_by_name(name: &str) -> Option<i16> {
    let lower = name.to_ascii_lowercase();
    API_KEY_NAMES.iter().find(|(n, _)| *n == lower).map(|(_, k)| *k)
}

/// The name of an API key, if Cilium names it.
pub fn api_key_name(key: i16) -> Option<&'static str> {
    API_KEY_NAMES.iter().find(|(_, k)| *k == key).map(|(n, _)| *n)
}

/// A Kafka rule that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaRuleError {
    /// `role` and `apiKey` together.
    #[error("cannot set both Role {role:?} and APIKey {api_key:?} together")]
    RoleAndApiKey {
        /// The role given.
        role: String,
        /// The key given.
        api_key: String,
    },
    /// Unknown API key name.
    #[error("invalid Kafka APIKey {0:?}")]
    ApiKey(String),
    /// Unknown role.
    #[error("invalid Kafka Role {0:?}")]
    Role(String),
    /// Not a non-negative int16.
    #[error("invalid Kafka APIVersion {0:?}")]
    ApiVersion(String),
    /// Over 255 characters.
    #[error("kafka topic exceeds maximum len of {MAX_TOPIC_LEN}")]
    TopicTooLong,
    /// Characters outside `[a-zA-Z0-9._-]` (and `\`, a quirk of Cilium's regex kept for compatibility).
    #[error("invalid Kafka Topic name {0:?}")]
    TopicName(String),
}

/// One validated Kafka rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KafkaRule {
    /// Allowed API keys; empty allows every key.
    pub api_keys: BTreeSet<i16>,
    /// Exact API version, or any.
    pub api_version: Option<i16>,
    /// Exact client id, or any.
    pub client_id: Option<String>,
    /// Exact topic, or any.
    pub topic: Option<String>,
}

impl KafkaRule {
    /// Validates a rule from its CRD fields (empty strings mean unset, as in Cilium).
    ///
    /// ```
    /// use policy_engine::kafka::KafkaRule;
    /// let r = KafkaRule::from_crd("produce", "", "", "", "deathstar-plans").unwrap();
    /// assert_eq!(r.api_keys.into_iter().collect::<Vec<_>>(), vec![0, 3, 18]);
    /// ```
    pub fn from_crd(
        role: &str,
        api_key: &str,
        api_version: &str,
        client_id: &str,
        topic: &str,
    ) -> Result<Self, KafkaRuleError> {
        if !role.is_empty() && !api_key.is_empty() {
            return Err(KafkaRuleError::RoleAndApiKey { role: role.to_owned(), api_key: api_key.to_owned() });
        }
        let mut api_keys = BTreeSet::new();
        if !api_key.is_empty() {
            api_keys.insert(api_key_by_name(api_key).ok_or_else(|| KafkaRuleError::ApiKey(api_key.to_owned()))?);
        }
        if !role.is_empty() {
            let keys = match role.to_ascii_lowercase().as_str() {
                "produce" => PRODUCE_KEYS,
                "consume" => CONSUME_KEYS,
                _ => return Err(KafkaRuleError::Role(role.to_owned())),
            };
            api_keys.extend(keys.iter().copied());
        }
        let api_version = if api_version.is_empty() {
            None
        } else {
            match api_version.parse::<i16>() {
                Ok(v) if v >= 0 => Some(v),
                _ => return Err(KafkaRuleError::ApiVersion(api_version.to_owned())),
            }
        };
        let topic = if topic.is_empty() {
            None
        } else {
            if topic.len() > MAX_TOPIC_LEN {
                return Err(KafkaRuleError::TopicTooLong);
            }
            if !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '\\')) {
                return Err(KafkaRuleError::TopicName(topic.to_owned()));
            }
            Some(topic.to_owned())
        };
        let client_id = (!client_id.is_empty()).then(|| client_id.to_owned());
        Ok(Self { api_keys, api_version, client_id, topic })
    }

    /// A rule that allows every request.
    pub fn any() -> Self {
        Self { api_keys: BTreeSet::new(), api_version: None, client_id: None, topic: None }
    }

    /// Checks key, version and client id (everything but the topic).
    fn header_matches(&self, req: &KafkaRequest<'_>) -> bool {
        (self.api_keys.is_empty() || self.api_keys.contains(&req.api_key))
            && self.api_version.is_none_or(|v| req.api_version == Some(v))
            && self.client_id.as_deref().is_none_or(|c| req.client_id == Some(c))
    }
}

impl fmt::Display for KafkaRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.api_keys.is_empty() {
            let keys: Vec<String> =
                self.api_keys.iter().map(|k| api_key_name(*k).map_or_else(|| k.to_string(), str::to_owned)).collect();
            parts.push(format!("apiKeys=[{}]", keys.join(",")));
        }
        if let Some(v) = self.api_version {
            parts.push(format!("apiVersion={v}"));
        }
        if let Some(c) = &self.client_id {
            parts.push(format!("clientID={c}"));
        }
        if let Some(t) = &self.topic {
            parts.push(format!("topic={t}"));
        }
        if parts.is_empty() { f.write_str("{}") } else { f.write_str(&parts.join(" ")) }
    }
}

/// The parts of a Kafka request that policy looks at.
#[derive(Clone, Debug)]
pub struct KafkaRequest<'a> {
    /// API key.
    pub api_key: i16,
    /// API version; `None` only in offline tests that leave it out.
    pub api_version: Option<i16>,
    /// Client id, if the request has one.
    pub client_id: Option<&'a str>,
    /// Topics named by the request.
    pub topics: Vec<&'a str>,
    /// The request names no topic and needs none judged: a Metadata request (v1+) with an empty
    /// topic list wants the brokers and the cluster only (how clients bootstrap); an incremental
    /// Fetch naming nothing new continues a session whose topics were judged when it began (the
    /// proxy vouches for that). Topic rules do not restrict it (key, version and client id still
    /// must match); a null Metadata list (every topic) is not this.
    pub cluster_only: bool,
}

impl<'a> KafkaRequest<'a> {
    /// How an InitProducerId request *without* a transactional id is judged: as the right to produce
    /// to some topic (key Produce, any topic, no version), so that `role: produce` (or an `apiKey:
    /// produce` rule) admits the idempotent producers today's clients default to. Kafka's own ACLs
    /// do the same since 2.8 (idempotent writes need WRITE on any topic). A rule pinning `apiVersion`
    /// does not grant it; a transactional InitProducerId is judged as itself (key 22).
    pub fn idempotent_producer_id(client_id: Option<&'a str>) -> Self {
        Self { api_key: 0, api_version: None, client_id, topics: Vec::new(), cluster_only: true }
    }
}

/// The rules of one L7 Kafka entry.
#[derive(Clone, Debug, Default)]
pub struct KafkaRuleSet {
    rules: Vec<KafkaRule>,
}

impl KafkaRuleSet {
    /// A rule set; an empty list allows every request.
    pub fn new(rules: Vec<KafkaRule>) -> Self {
        Self { rules }
    }

    /// The rules.
    pub fn rules(&self) -> &[KafkaRule] {
        &self.rules
    }

    /// Whether the request is allowed; returns the index of the rule that completed the match.
    /// Every topic of the request must be covered by some rule (Cilium's topic consumption).
    pub fn allows(&self, req: &KafkaRequest<'_>) -> Option<usize> {
        if self.rules.is_empty() {
            return Some(0);
        }
        let mut remaining: BTreeSet<&str> = if TOPIC_EXTRACTED_KEYS.contains(&req.api_key) {
            req.topics.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        let topic_key = topic_rules_apply(req.api_key) && !req.cluster_only;
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.header_matches(req) {
                continue;
            }
            match &rule.topic {
                None => return Some(i),
                Some(_) if !topic_key => return Some(i),
                Some(t) => {
                    if remaining.remove(t.as_str()) && remaining.is_empty() {
                        return Some(i);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(keys: &[i16], topic: &str) -> KafkaRule {
        KafkaRule {
            api_keys: keys.iter().copied().collect(),
            api_version: None,
            client_id: None,
            topic: (!topic.is_empty()).then(|| topic.to_owned()),
        }
    }

    fn req(key: i16, topics: &[&'static str]) -> KafkaRequest<'static> {
        KafkaRequest {
            api_key: key,
            api_version: Some(0),
            client_id: None,
            topics: topics.to_vec(),
            cluster_only: false,
        }
    }

    #[test]
    fn every_topic_must_be_covered() {
        let set = KafkaRuleSet::new(vec![rule(&[0], "a")]);
        assert!(set.allows(&req(0, &["a"])).is_some());
        assert!(set.allows(&req(0, &["a", "b"])).is_none());
        let both = KafkaRuleSet::new(vec![rule(&[0], "a"), rule(&[0], "b")]);
        assert!(both.allows(&req(0, &["b", "a"])).is_some());
    }

    #[test]
    fn topic_rules_ignore_non_topic_keys_and_never_match_unextracted_ones() {
        let set = KafkaRuleSet::new(vec![rule(PRODUCE_KEYS, "a")]);
        assert!(set.allows(&req(18, &[])).is_some(), "ApiVersions carries no topic");
        assert!(set.allows(&req(3, &[])).is_none(), "Metadata for all topics");
        let brokers_only = KafkaRequest { cluster_only: true, ..req(3, &[]) };
        assert!(set.allows(&brokers_only).is_some(), "Metadata for no topic: brokers and cluster only");
        assert!(set.allows(&KafkaRequest::idempotent_producer_id(None)).is_some(), "a producer id for produce");
        assert!(set.allows(&req(22, &[])).is_none(), "InitProducerId judged as itself is not produce");
        let fetch_rules = KafkaRuleSet::new(vec![rule(&[1], "a")]);
        assert!(
            fetch_rules.allows(&KafkaRequest::idempotent_producer_id(None)).is_none(),
            "no producer id for consume"
        );
        assert!(fetch_rules.allows(&KafkaRequest { cluster_only: true, ..req(3, &[]) }).is_none(), "still the key");
        // A rule with a topic and no key: it never grants what Cilium's table left out.
        let any_key = KafkaRuleSet::new(vec![rule(&[], "public")]);
        for key in [32, 33, 44, 47, 61, 68, 75, 78, 79] {
            assert!(any_key.allows(&req(key, &[])).is_none(), "key {key} can name topics");
        }
        for key in [10, 11, 18, 22, 42, 60, 71] {
            assert!(any_key.allows(&req(key, &[])).is_some(), "key {key} carries no topic");
        }
        let create = KafkaRuleSet::new(vec![rule(&[19], "a")]);
        assert!(create.allows(&req(19, &["a"])).is_none(), "CreateTopics topics are not extracted");
    }

    #[test]
    fn sanitize_messages() {
        let e = |r: &str, k: &str, v: &str, t: &str| KafkaRule::from_crd(r, k, v, "", t).unwrap_err().to_string();
        assert_eq!(e("produce", "produce", "", ""), "cannot set both Role \"produce\" and APIKey \"produce\" together");
        assert_eq!(e("", "createtopic", "", ""), "invalid Kafka APIKey \"createtopic\"");
        assert_eq!(e("admin", "", "", ""), "invalid Kafka Role \"admin\"");
        assert_eq!(e("", "", "-1", ""), "invalid Kafka APIVersion \"-1\"");
        assert_eq!(e("", "", "40000", ""), "invalid Kafka APIVersion \"40000\"");
        assert_eq!(e("", "", "", "deathstar/plans"), "invalid Kafka Topic name \"deathstar/plans\"");
        assert!(KafkaRule::from_crd("", "Produce", "3", "", "empire-announce.v1_x").is_ok());
    }
}
