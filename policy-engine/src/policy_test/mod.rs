//! `porin policy test` and `porin policy trace`: policy unit tests, evaluated offline with the same
//! resolver and matchers the agent and proxy use (there is no second implementation here).
//!
//! A test file (format version 1, see `docs/policy-test-format.md`) names policies, endpoints,
//! namespace labels, what the DNS proxy learned and secret values, then cases: a flow `from → to`
//! on a port and protocol, optionally with an HTTP, Kafka or DNS request, and the expected outcome
//! `allow`, `drop` (L3/L4) or `deny` (L7).
//!
//! This module reads the files a test names; it prints nothing (the binary formats results).
//!
//! `scenario` turns policies and endpoints into a snapshot and names the parties of a flow;
//! `evaluate` judges a flow with the engine's pair verdict and L7 matchers.

mod evaluate;
mod scenario;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::{self, LoadOptions, Loaded};
use crate::dns::normalize_name;
use crate::http::{HeaderLog, HttpRequestInfo, SimpleHeaders};
use crate::identity::{IdentityId, reserved};
use crate::kafka::{KafkaRequest, api_key_by_name};
use crate::pair::{PairVerdict, Peer, SideVerdict};
use crate::resolve::{Endpoint, Environment, resolve};
use crate::snapshot::{DropReason, EndpointPolicy, L4Verdict, L7Policy, L7Set, L7Verdict, OriginId, Proto, Snapshot};

pub use self::evaluate::Evaluation;
pub use self::scenario::{Scenario, ScenarioBuilder};

// === file format ===

/// A test file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// Must be 1.
    pub version: u32,
    /// Policies, evaluated together.
    #[serde(default)]
    pub policies: Vec<PolicySource>,
    /// Workloads by name.
    #[serde(default)]
    pub endpoints: BTreeMap<String, EndpointDef>,
    /// Namespace labels.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceDef>,
    /// What the DNS proxy learned: name → addresses.
    #[serde(default)]
    pub fqdn_cache: BTreeMap<String, Vec<IpAddr>>,
    /// Secret values by `namespace/name`.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// The cases.
    #[serde(default)]
    pub cases: Vec<Case>,
}

/// Where a policy comes from: a file relative to the test file, or inline YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySource {
    /// A file (multi-document YAML allowed).
    pub file: Option<String>,
    /// YAML text with one or more documents.
    pub inline: Option<String>,
}

/// An endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointDef {
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Namespace (default `default`).
    pub namespace: Option<String>,
    /// Address.
    pub ip: Option<IpAddr>,
}

/// Namespace labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceDef {
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Name.
    pub name: String,
    /// Endpoint name, `cidr:IP`, `entity:NAME`.
    pub from: String,
    /// Endpoint name, `cidr:IP`, `entity:NAME`, `fqdn:NAME`.
    pub to: String,
    /// Destination port (ICMP: type; default 8, echo request).
    pub port: Option<u16>,
    /// `TCP` (default), `UDP`, `SCTP`, `ICMP`.
    pub protocol: Option<String>,
    /// HTTP request.
    pub http: Option<HttpCase>,
    /// Kafka request.
    pub kafka: Option<KafkaCase>,
    /// DNS query.
    pub dns: Option<DnsCase>,
    /// Expected outcome.
    pub expect: Outcome,
    /// The policy expected to decide (`name` or `namespace/name`).
    pub expect_rule: Option<String>,
}

impl Case {
    /// The flow of this case.
    pub fn flow(&self) -> Flow {
        Flow {
            from: self.from.clone(),
            to: self.to.clone(),
            port: self.port,
            protocol: self.protocol.clone(),
            http: self.http.clone(),
            kafka: self.kafka.clone(),
            dns: self.dns.clone(),
        }
    }
}

/// A flow and optional L7 request.
#[derive(Debug, Clone, Default)]
pub struct Flow {
    /// Endpoint name, `cidr:IP`, `entity:NAME`.
    pub from: String,
    /// Endpoint name, `cidr:IP`, `entity:NAME`, `fqdn:NAME`.
    pub to: String,
    /// Destination port (ICMP: type; default 8, echo request).
    pub port: Option<u16>,
    /// `TCP` (default), `UDP`, `SCTP`, `ICMP`.
    pub protocol: Option<String>,
    /// HTTP request.
    pub http: Option<HttpCase>,
    /// Kafka request.
    pub kafka: Option<KafkaCase>,
    /// DNS query.
    pub dns: Option<DnsCase>,
}

/// An HTTP request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCase {
    /// Default GET.
    pub method: Option<String>,
    /// Default `/` (query included).
    pub path: Option<String>,
    /// Host / authority.
    pub host: Option<String>,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A Kafka API key: Cilium's name or a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ApiKey {
    /// Number.
    Number(i16),
    /// Name.
    Name(String),
}

/// A Kafka request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KafkaCase {
    /// API key.
    pub api_key: ApiKey,
    /// API version.
    pub api_version: Option<i16>,
    /// Client id.
    #[serde(rename = "clientID")]
    pub client_id: Option<String>,
    /// Topics.
    #[serde(default)]
    pub topics: Vec<String>,
}

/// A DNS query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsCase {
    /// Name (case-insensitive, trailing dot optional).
    pub query: String,
    /// Type (default A).
    #[serde(rename = "type")]
    pub qtype: Option<String>,
}

/// A case outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Allowed (L3/L4 and, with a request, L7).
    Allow,
    /// Dropped at L3/L4.
    Drop,
    /// Allowed at L3/L4, refused at L7.
    Deny,
}

impl Outcome {
    fn severity(self) -> u8 {
        match self {
            Self::Allow => 0,
            Self::Deny => 1,
            Self::Drop => 2,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Drop => "drop",
            Self::Deny => "deny",
        })
    }
}

/// The result of one case (`-o json` prints exactly these fields).
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Test file.
    pub file: String,
    /// Case name.
    pub name: String,
    /// Expected outcome.
    pub expected: Outcome,
    /// Actual outcome.
    pub actual: Outcome,
    /// Whether it passed.
    pub pass: bool,
    /// Why the outcome is what it is.
    pub reason: String,
    /// The deciding policy.
    pub rule: Option<String>,
}

// === running test files ===

/// A loaded test file, ready to run.
#[derive(Debug)]
pub struct TestSuite {
    /// File name as given.
    pub file: String,
    /// The resolved scenario.
    pub scenario: Scenario,
    /// The cases.
    pub cases: Vec<Case>,
}

/// Reads and parses a test file (without loading its policies).
pub fn read_test_file(path: &Path) -> Result<TestFile, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read file: {e}"))?;
    parse_test_file(&name, &text)
}

/// Parses test-file text.
pub fn parse_test_file(name: &str, text: &str) -> Result<TestFile, String> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| format!("{name}: invalid YAML: {e}"))?;
    crate::api::typed(&value, "").map_err(|e| format!("{name}: {e}"))
}

/// Loads a test file: parses it, loads its policies (with `opts`) and resolves. Errors make the
/// file invalid.
pub fn load_suite(path: &Path, opts: &LoadOptions) -> Result<TestSuite, Vec<String>> {
    let name = path.display().to_string();
    let tf = read_test_file(path).map_err(|e| vec![e])?;
    let base: PathBuf = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut b = ScenarioBuilder::with_options(opts.clone());
    b.test_file(&name, &tf, &base);
    let scenario = b.build()?;
    // Every case must be evaluable; a case naming an unknown endpoint makes the file invalid.
    let errors: Vec<String> = tf
        .cases
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            scenario.evaluate(&c.flow(), false).err().map(|e| format!("{name}: cases[{i}] ({}): {e}", c.name))
        })
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(TestSuite { file: name, scenario, cases: tf.cases })
}

impl TestSuite {
    /// Runs every case.
    pub fn run(&self) -> Vec<CaseResult> {
        self.cases
            .iter()
            .map(|c| {
                let (actual, reason, deciding) = match self.scenario.evaluate(&c.flow(), false) {
                    Ok(ev) => (ev.outcome, ev.reason, ev.deciding),
                    Err(e) => (Outcome::Drop, format!("cannot evaluate: {e}"), vec![]),
                };
                let rule_ok = c
                    .expect_rule
                    .as_deref()
                    .is_none_or(|want| deciding.iter().any(|d| d == want || d.rsplit('/').next() == Some(want)));
                let mut reason = reason;
                if !rule_ok {
                    reason = format!(
                        "expected rule {:?}, decided by [{}]; {reason}",
                        c.expect_rule.as_deref().unwrap_or(""),
                        deciding.join(", ")
                    );
                }
                CaseResult {
                    file: self.file.clone(),
                    name: c.name.clone(),
                    expected: c.expect,
                    actual,
                    pass: actual == c.expect && rule_ok,
                    reason,
                    rule: deciding.into_iter().find(|d| !d.is_empty()),
                }
            })
            .collect()
    }
}
