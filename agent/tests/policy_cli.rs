//! The `porin policy` command line as users run it in CI: output shape and exit codes
//! (0 pass / valid, 1 a case failed, 2 invalid input), run against the real binary.

use std::path::PathBuf;
use std::process::{Command, Output};

fn porin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_porin")).args(args).output().expect("run porin")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(rel: &str) -> String {
    root().join("config/examples").join(rel).display().to_string()
}

/// A scratch directory removed on drop (also when the test panics).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("porin-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_example_test_file_passes() {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(root().join("config/examples")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.to_string_lossy().ends_with(".test.yaml") {
                files.push(p.display().to_string());
            }
        }
    }
    assert!(files.len() >= 8, "examples: {files:?}");
    let mut args = vec!["policy", "test"];
    args.extend(files.iter().map(String::as_str));
    let o = porin(&args);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).lines().last().unwrap().ends_with(" passed, 0 failed"));
}

#[test]
fn test_reports_failures_with_exit_1_and_json_lines() {
    let s = Scratch::new("fail");
    let policy = std::fs::read_to_string(example("starwars/l3-l4-l7.yaml")).unwrap();
    s.write("p.yaml", &policy);
    let t = s.write(
        "t.test.yaml",
        "version: 1\npolicies: [{file: p.yaml}]\nendpoints:\n  ds: {labels: {org: empire, class: deathstar}}\n  tf: {labels: {org: empire, class: tiefighter}}\ncases:\n- {name: lands, from: tf, to: ds, port: 80, http: {method: POST, path: /v1/request-landing}, expect: allow, expect_rule: rule1}\n- {name: wrong, from: tf, to: ds, port: 80, http: {method: PUT, path: /v1/exhaust-port}, expect: allow}\n- {name: wrong rule, from: tf, to: ds, port: 80, http: {method: POST, path: /v1/request-landing}, expect: allow, expect_rule: other}\n",
    );
    let o = porin(&["policy", "test", &t]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("PASS  lands: expected allow, actual allow, rule default/rule1"), "{out}");
    assert!(out.contains("FAIL  wrong: expected allow, actual deny"), "{out}");
    assert!(out.contains("FAIL  wrong rule"), "{out}");
    assert!(out.ends_with("1 passed, 2 failed\n"), "{out}");

    let o = porin(&["policy", "test", "-o", "json", &t]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim(), "1 passed, 2 failed");
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    for key in ["\"file\":", "\"name\":", "\"expected\":", "\"actual\":", "\"pass\":", "\"reason\":", "\"rule\":"] {
        assert!(lines.iter().all(|l| l.contains(key)), "{key} in {lines:?}");
    }
    assert!(lines[1].contains("\"actual\":\"deny\"") && lines[1].contains("\"pass\":false"), "{}", lines[1]);
}

#[test]
fn invalid_files_exit_2_and_other_files_still_run() {
    let s = Scratch::new("invalid");
    s.write(
        "bad.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: UDP}], rules: {http: [{method: GET}]}}]\n",
    );
    let bad_test = s.write("bad.test.yaml", "version: 1\npolicies: [{file: bad.yaml}]\ncases: []\n");
    let good = example("starwars/l3-l4.test.yaml");
    let o = porin(&["policy", "test", "-o", "json", &bad_test, &good]);
    assert_eq!(o.status.code(), Some(2));
    let out = stdout(&o);
    let first = out.lines().next().unwrap();
    assert!(first.starts_with("{\"error\":") || first.contains("\"error\""), "{first}");
    assert!(first.contains("bad.yaml: document 1 (CiliumNetworkPolicy default/bad): spec.ingress[0].toPorts[0].ports[0]: L7 rules can only apply to TCP (not UDP) except for DNS rules"), "{first}");
    assert!(out.lines().count() > 1, "the good file still ran: {out}");

    let o = porin(&["policy", "validate", &s.0.join("bad.yaml").display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    let o = porin(&["policy", "validate", &example("deny/deny.yaml")]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));

    // A case naming an unknown endpoint makes the file invalid, not a failed case.
    let t = s.write(
        "unknown.test.yaml",
        "version: 1\ncases:\n- {name: x, from: nobody, to: entity:world, port: 1, expect: allow}\n",
    );
    let o = porin(&["policy", "test", &t]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stdout(&o).contains("\"nobody\": no such endpoint"), "{}", stdout(&o));

    let t = s.write("typo.test.yaml", "version: 1\ncases:\n- {name: x, from: a, to: b, prot: 1, expect: allow}\n");
    let o = porin(&["policy", "test", &t]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stdout(&o).contains("cases[0]: unknown field `prot`"), "{}", stdout(&o));
}

#[test]
fn trace_explains_the_rules_considered() {
    let o = porin(&[
        "policy",
        "trace",
        &example("starwars/l3-l4-l7.test.yaml"),
        "--from",
        "tiefighter",
        "--to",
        "deathstar",
        "--port",
        "80",
        "--http-method",
        "PUT",
        "--http-path",
        "/v1/exhaust-port",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.contains("ingress of default/deathstar: default deny (selected by: default/rule1 spec)"), "{out}");
    assert!(out.contains("redirect to http proxy TCP/80"), "{out}");
    assert!(out.contains("path=//v1/request-landing/ (default/rule1 spec.ingress[0]): no match"), "{out}");
    assert!(
        out.trim_end()
            .ends_with("verdict: DENY (L7): ingress of default/deathstar: PUT /v1/exhaust-port matches no http rule"),
        "{out}"
    );

    // Ad-hoc endpoints by labels.
    let o = porin(&[
        "policy",
        "trace",
        &example("starwars/l3-l4.yaml"),
        "--from",
        "labels:org=alliance,class=xwing",
        "--to",
        "labels:org=empire,class=deathstar",
        "--port",
        "80",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("verdict: DROP (L3/L4)"), "{}", stdout(&o));
}

#[test]
fn the_blog_example_without_a_protocol_is_refused_with_the_fix() {
    let s = Scratch::new("seed");
    let seed = s.write(
        "seed.yaml",
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: seed}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - ports: [{port: "8080"}]
      rules:
        http: [{method: GET, path: "/public"}]
"#,
    );
    let o = porin(&["policy", "validate", &seed]);
    let out = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(2), "{out}");
    // Cilium's words, then the fix.
    assert!(out.contains("L7 rules can only apply to TCP (not ANY) except for DNS rules"), "{out}");
    assert!(out.contains("add `protocol: TCP`"), "{out}");
    assert!(out.contains("ports[0]"), "the message names the field: {out}");
}
