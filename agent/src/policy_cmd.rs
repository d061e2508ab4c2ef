//! `porin policy validate | test | trace`: formatting and exit codes around
//! `policy_engine::policy_test`, which does the evaluation with the agent's own resolver and matchers.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use policy_engine::api::{LoadOptions, OtherObject, load_file};
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

/// What a directory on the command line stands for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// Every YAML file.
    Yaml,
    /// The YAML files that are test files.
    TestFiles,
}

/// The files named on the command line, a directory standing for the YAML files under it
/// (recursively, sorted; hidden entries skipped). A file named directly is always taken.
fn expand(paths: &[PathBuf], wanted: Wanted) -> Result<Vec<PathBuf>, String> {
    fn walk(dir: &Path, wanted: Wanted, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: cannot read directory: {e}", dir.display()))?;
        let mut paths = Vec::new();
        for e in entries {
            let e = e.map_err(|e| format!("{}: cannot read directory: {e}", dir.display()))?;
            if !e.file_name().to_string_lossy().starts_with('.') {
                paths.push(e.path());
            }
        }
        paths.sort();
        for p in paths {
            if p.is_dir() {
                walk(&p, wanted, out)?;
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && (wanted == Wanted::Yaml || std::fs::read_to_string(&p).is_ok_and(|t| is_test_file(&t)))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let before = out.len();
            walk(p, wanted, &mut out)?;
            if out.len() == before {
                let what = if wanted == Wanted::Yaml { "YAML files" } else { "test files" };
                return Err(format!("{}: no {what} in this directory", p.display()));
            }
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// What `validate` found in one file.
struct FileReport {
    /// `N policies` or `test file, N cases`.
    summary: String,
    policies: usize,
    errors: Vec<String>,
    warnings: Vec<String>,
    skipped: Vec<String>,
}

/// Checks a file of policy documents.
fn check_policies(f: &Path, opts: &LoadOptions) -> FileReport {
    let loaded = load_file(f, opts);
    let mut errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    let skipped = if opts.skip_other_kinds {
        loaded.other_objects.iter().map(ToString::to_string).collect()
    } else {
        if !loaded.other_objects.is_empty() {
            errors.push(format!("{}: {}", f.display(), OtherObject::hint(loaded.other_objects.len())));
        }
        Vec::new()
    };
    FileReport {
        summary: format!("{} policies", loaded.policies.len()),
        policies: loaded.policies.len(),
        errors,
        warnings: loaded.warnings(),
        skipped,
    }
}

/// Checks a test file as `policy test` loads it (its policies valid, every case evaluable),
/// without running the cases.
fn check_test_file(f: &Path, opts: &LoadOptions) -> FileReport {
    match load_suite(f, opts) {
        Ok(suite) => FileReport {
            summary: format!("test file, {} cases", suite.cases.len()),
            policies: 0,
            errors: Vec::new(),
            warnings: suite.scenario.warnings.clone(),
            skipped: suite.scenario.skipped.iter().map(ToString::to_string).collect(),
        },
        Err(errors) => {
            FileReport { summary: String::new(), policies: 0, errors, warnings: Vec::new(), skipped: Vec::new() }
        }
    }
}

/// `porin policy validate`: policy files, and test files found among them.
pub fn validate(paths: &[PathBuf], opts: &LoadOptions, output: Output) -> ExitCode {
    let files = match expand(paths, Wanted::Yaml) {
        Ok(f) => f,
        Err(e) => {
            out_line(&format!("ERROR {e}"));
            return ExitCode::from(INVALID);
        }
    };
    let mut code = OK;
    for f in &files {
        let test_file = std::fs::read_to_string(f).is_ok_and(|t| is_test_file(&t));
        let r = if test_file { check_test_file(f, opts) } else { check_policies(f, opts) };
        if !r.errors.is_empty() {
            code = INVALID;
        }
        match output {
            Output::Json => out_line(
                &serde_json::json!({
                    "file": f.display().to_string(),
                    "valid": r.errors.is_empty(),
                    "test_file": test_file,
                    "policies": r.policies,
                    "errors": r.errors,
                    "warnings": r.warnings,
                    "skipped": r.skipped,
                })
                .to_string(),
            ),
            Output::Text => {
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
                for s in &r.skipped {
                    out_line(&format!("SKIP  {s}: not a policy"));
                }
                if r.errors.is_empty() {
                    out_line(&format!("OK    {} ({})", f.display(), r.summary));
                } else {
                    for e in &r.errors {
                        out_line(&format!("ERROR {e}"));
                    }
                }
            }
        }
    }
    ExitCode::from(code)
}

/// `porin policy test`.
pub fn test(paths: &[PathBuf], opts: &LoadOptions, output: Output) -> ExitCode {
    let files = match expand(paths, Wanted::TestFiles) {
        Ok(f) => f,
        Err(e) => {
            out_line(&format!("ERROR {e}"));
            return ExitCode::from(INVALID);
        }
    };
    let (mut passed, mut failed, mut invalid) = (0usize, 0usize, false);
    let many = files.len() > 1;
    for f in &files {
        let suite = match load_suite(f, opts) {
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
        for s in &suite.scenario.skipped {
            eprintln!("skipped: {s}: not a policy");
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
    let mut b = ScenarioBuilder::with_options(a.load.options());
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
    for s in &scenario.skipped {
        eprintln!("skipped: {s}: not a policy");
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
