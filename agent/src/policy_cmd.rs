//! `porin policy validate | test | trace`: formatting and exit codes around
//! `policy_engine::policy_test`, which does the evaluation with the agent's own resolver and matchers.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use policy_engine::api::{LoadOptions, load_file};
use policy_engine::policy_test::{
    ApiKey, DnsCase, Flow, HttpCase, KafkaCase, Outcome, ScenarioBuilder, load_suite, parse_test_file,
};
use policy_engine::resolve::Endpoint;

use crate::cli::{Output, TraceArgs};

/// Exit code: every check passed.
const OK: u8 = 0;
/// Exit code: a test case failed.
const FAILED: u8 = 1;
/// Exit code: a file or policy is invalid.
const INVALID: u8 = 2;

fn out_line(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = writeln!(out, "{line}");
}

/// `porin policy validate`.
pub fn validate(files: &[PathBuf], output: Output) -> ExitCode {
    let mut code = OK;
    for f in files {
        let loaded = load_file(f, &LoadOptions::default());
        let warnings = loaded.warnings();
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        if !errors.is_empty() {
            code = INVALID;
        }
        match output {
            Output::Json => out_line(
                &serde_json::json!({
                    "file": f.display().to_string(),
                    "valid": errors.is_empty(),
                    "policies": loaded.policies.len(),
                    "errors": errors,
                    "warnings": warnings,
                })
                .to_string(),
            ),
            Output::Text => {
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                if errors.is_empty() {
                    out_line(&format!("OK    {} ({} policies)", f.display(), loaded.policies.len()));
                } else {
                    for e in &errors {
                        out_line(&format!("ERROR {e}"));
                    }
                }
            }
        }
    }
    ExitCode::from(code)
}

/// `porin policy test`.
pub fn test(files: &[PathBuf], output: Output) -> ExitCode {
    let (mut passed, mut failed, mut invalid) = (0usize, 0usize, false);
    let many = files.len() > 1;
    for f in files {
        let suite = match load_suite(f) {
            Ok(s) => s,
            Err(errors) => {
                invalid = true;
                match output {
                    Output::Json => out_line(
                        &serde_json::json!({"file": f.display().to_string(), "error": errors.join("\n")}).to_string(),
                    ),
                    Output::Text => {
                        for e in errors {
                            out_line(&format!("ERROR {e}"));
                        }
                    }
                }
                continue;
            }
        };
        for w in &suite.scenario.warnings {
            eprintln!("warning: {w}");
        }
        for r in suite.run() {
            if r.pass {
                passed += 1;
            } else {
                failed += 1;
            }
            match output {
                Output::Json => out_line(&serde_json::to_string(&r).unwrap_or_default()),
                Output::Text => {
                    let name = if many { format!("{}: {}", r.file, r.name) } else { r.name.clone() };
                    let rule = r.rule.as_deref().unwrap_or("-");
                    out_line(&format!(
                        "{}  {name}: expected {}, actual {}, rule {rule} ({})",
                        if r.pass { "PASS" } else { "FAIL" },
                        r.expected,
                        r.actual,
                        r.reason
                    ));
                }
            }
        }
    }
    let summary = format!("{passed} passed, {failed} failed");
    match output {
        Output::Json => eprintln!("{summary}"),
        Output::Text => out_line(&summary),
    }
    ExitCode::from(if invalid {
        INVALID
    } else if failed > 0 {
        FAILED
    } else {
        OK
    })
}

/// Whether a YAML file is a policy test file (rather than policy documents).
fn is_test_file(text: &str) -> bool {
    let Ok(serde_yaml::Value::Mapping(m)) = serde_yaml::from_str::<serde_yaml::Value>(text) else { return false };
    m.contains_key("version") && !m.contains_key("apiVersion")
}

/// `labels:k=v,k=v[@namespace]` → an ad-hoc endpoint.
fn adhoc_endpoint(spec: &str) -> Option<Endpoint> {
    let rest = spec.strip_prefix("labels:")?;
    let (labels, ns) = match rest.rsplit_once('@') {
        Some((l, ns)) => (l, ns),
        None => (rest, "default"),
    };
    let labels: BTreeMap<String, String> = labels
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    Some(Endpoint { name: spec.to_owned(), namespace: ns.to_owned(), labels, ..Default::default() })
}

fn build_flow(a: &TraceArgs) -> Result<Flow, String> {
    let http = (a.http_method.is_some() || a.http_path.is_some() || a.http_host.is_some() || !a.http_header.is_empty())
        .then(|| -> Result<HttpCase, String> {
            let mut headers = BTreeMap::new();
            for h in &a.http_header {
                let (k, v) = h.split_once(':').ok_or_else(|| format!("--http-header {h:?}: expected 'Name: value'"))?;
                headers.insert(k.trim().to_owned(), v.trim_start().to_owned());
            }
            Ok(HttpCase {
                method: a.http_method.clone(),
                path: a.http_path.clone(),
                host: a.http_host.clone(),
                headers,
            })
        })
        .transpose()?;
    let kafka = a.kafka_api_key.as_ref().map(|k| KafkaCase {
        api_key: k.parse::<i16>().map_or_else(|_| ApiKey::Name(k.clone()), ApiKey::Number),
        api_version: a.kafka_api_version,
        client_id: a.kafka_client_id.clone(),
        topics: a.kafka_topic.clone(),
    });
    let dns = a.dns_query.as_ref().map(|q| DnsCase { query: q.clone(), qtype: a.dns_type.clone() });
    Ok(Flow { from: a.from.clone(), to: a.to.clone(), port: a.port, protocol: a.protocol.clone(), http, kafka, dns })
}

/// `porin policy trace`.
pub fn trace(a: &TraceArgs) -> ExitCode {
    let mut b = ScenarioBuilder::new();
    for f in &a.files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                out_line(&format!("ERROR {}: cannot read file: {e}", f.display()));
                return ExitCode::from(INVALID);
            }
        };
        if is_test_file(&text) {
            match parse_test_file(&f.display().to_string(), &text) {
                Ok(tf) => {
                    b.test_file(&f.display().to_string(), &tf, f.parent().unwrap_or(Path::new(".")));
                }
                Err(e) => {
                    out_line(&format!("ERROR {e}"));
                    return ExitCode::from(INVALID);
                }
            }
        } else {
            b.policy_file(f);
        }
    }
    for spec in [&a.from, &a.to] {
        if let Some(ep) = adhoc_endpoint(spec) {
            b.endpoint(spec, ep);
        }
    }
    let scenario = match b.build() {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                out_line(&format!("ERROR {e}"));
            }
            return ExitCode::from(INVALID);
        }
    };
    for w in &scenario.warnings {
        eprintln!("warning: {w}");
    }
    let flow = match build_flow(a) {
        Ok(f) => f,
        Err(e) => {
            out_line(&format!("ERROR {e}"));
            return ExitCode::from(INVALID);
        }
    };
    match scenario.evaluate(&flow, true) {
        Ok(ev) => {
            for line in &ev.explanation {
                out_line(line);
            }
            let verdict = match ev.outcome {
                Outcome::Allow => "ALLOW",
                Outcome::Drop => "DROP (L3/L4)",
                Outcome::Deny => "DENY (L7)",
            };
            out_line(&format!("verdict: {verdict}: {}", ev.reason));
            ExitCode::from(OK)
        }
        Err(e) => {
            out_line(&format!("ERROR {e}"));
            ExitCode::from(INVALID)
        }
    }
}
