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
    // The manifests example holds a Deployment and a Service next to its policy.
    let mut args = vec!["policy", "test", "--skip-other-kinds"];
    args.extend(files.iter().map(String::as_str));
    let o = porin(&args);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).lines().last().unwrap().ends_with(" passed, 0 failed"));

    // `validate` on the directory checks the policies and the test files next to them.
    let examples = root().join("config/examples").display().to_string();
    let o = porin(&["policy", "validate", "--skip-other-kinds", &examples]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(stdout(&o).lines().filter(|l| l.ends_with(" cases)")).count(), files.len(), "{}", stdout(&o));
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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The envelope of a policy written slightly wrong: each document gets the message that says how to
/// fix it, whether or not other kinds are skipped (a near miss is never "another kind").
#[test]
fn near_misses_of_a_policy_say_how_to_fix_them() {
    let s = Scratch::new("near-miss");
    let f = s.write(
        "bad.yaml",
        "apiversion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\n\
         ---\napiVersion: cilium.io/v2\nKind: CiliumNetworkPolicy\nmetadata: {name: b}\n\
         ---\napiVersion: cilium.io/v2\nkind: ciliumnetworkpolicy\nmetadata: {name: c}\n\
         ---\napiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: d}\nspec: {podSelector: {}}\n\
         ---\napiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: e}\n\
         ---\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: f}\n\
         ---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: g}\nSpec: {endpointSelector: {}}\n",
    );
    let want = [
        format!("ERROR {f}: document 1: found `apiversion`; keys are case-sensitive: `apiVersion`"),
        format!("ERROR {f}: document 2: found `Kind`; keys are case-sensitive: `kind`"),
        format!(
            "ERROR {f}: document 3: kind: found `ciliumnetworkpolicy`; kinds are case-sensitive: `CiliumNetworkPolicy`"
        ),
        format!(
            "ERROR {f}: document 4: apiVersion: `extensions/v1beta1` is not a version of NetworkPolicy: use \
             `apiVersion: networking.k8s.io/v1` (the old version was removed in Kubernetes 1.16; the spec is unchanged)"
        ),
        format!(
            "ERROR {f}: document 5: apiVersion: `cilium.io/v1` is not a version of CiliumNetworkPolicy: use \
             `apiVersion: cilium.io/v2` (cilium.io/v1 is obsolete and no longer served)"
        ),
        format!(
            "ERROR {f}: document 6: apiVersion: required: `apiVersion: cilium.io/v2` for CiliumClusterwideNetworkPolicy"
        ),
        format!("ERROR {f}: document 7 (CiliumNetworkPolicy default/g): found `Spec`; keys are case-sensitive: `spec`"),
    ];
    for args in [vec!["policy", "validate", &f], vec!["policy", "validate", "--skip-other-kinds", &f]] {
        let o = porin(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), want, "{args:?}");
    }
}

/// `metadata` is checked like the rest of a policy: a misspelt or wrongly-cased `namespace` must
/// not silently put the policy into `default`; the fields `kubectl get -o yaml` prints are accepted.
#[test]
fn metadata_is_checked_like_every_other_field() {
    let s = Scratch::new("metadata");
    let doc = |meta: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {meta}\nspec: {{endpointSelector: {{}}, ingress: [{{}}]}}\n"
        )
    };
    let f = s.write(
        "meta.yaml",
        &[
            doc("{name: a, namepsace: prod}"),
            doc("{name: b, Namespace: prod}"),
            doc("{name: c, namespace: prod, uid: 5f1c, resourceVersion: \"42\", generation: 3, creationTimestamp: \"2026-01-01T00:00:00Z\", annotations: {a: b}, managedFields: [], finalizers: []}"),
        ]
        .join("---\n"),
    );
    let o = porin(&["policy", "validate", &f]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stdout(&o).lines().collect::<Vec<_>>(),
        [
            format!(
                "ERROR {f}: document 1 (CiliumNetworkPolicy default/a): metadata: unknown field `namepsace`, expected one \
                 of `name`, `namespace`, `labels`, `annotations`, `generateName`, `uid`, `resourceVersion`, `generation`, \
                 `creationTimestamp`, `deletionTimestamp`, `deletionGracePeriodSeconds`, `selfLink`, `ownerReferences`, \
                 `finalizers`, `managedFields`"
            ),
            format!(
                "ERROR {f}: document 2 (CiliumNetworkPolicy default/b): metadata: found `Namespace`; keys are \
                 case-sensitive: `namespace`"
            ),
        ]
    );
    let ok = s.write("ok.yaml", &doc("{name: c, namespace: prod, uid: 5f1c, annotations: {a: b}}"));
    let o = porin(&["policy", "validate", &ok]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

/// A real manifests directory: policies next to Deployments and Services, in subdirectories, with
/// a hidden file. Without the flag the other kinds are errors with a hint; with it they are listed
/// as skipped and the policies validated.
#[test]
fn a_manifests_directory_with_other_kinds_validates_with_skip_other_kinds() {
    let s = Scratch::new("manifests");
    std::fs::create_dir_all(s.0.join("k8s/db")).unwrap();
    let app = s.write(
        "k8s/app.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 2}\n---\n\
         apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n",
    );
    let db = s.write(
        "k8s/db/db.yml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {ports: [{port: 5432}]}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: db-config}\ndata: {a: b}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db}\nspec: {podSelector: {}}\n",
    );
    s.write("k8s/.editor.yaml", "this: is not read\n");
    s.write("k8s/README.md", "not YAML\n");
    let dir = s.0.join("k8s").display().to_string();

    let o = porin(&["policy", "validate", &dir]);
    assert_eq!(o.status.code(), Some(2));
    // Services (and EndpointSlices) are read beside policies; the rest is another kind.
    let expected = "expected cilium.io/v2 CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or CiliumCIDRGroup, \
                    networking.k8s.io/v1 NetworkPolicy, v1 Service or discovery.k8s.io/v1 EndpointSlice";
    assert_eq!(
        stdout(&o).lines().collect::<Vec<_>>(),
        [
            format!("ERROR {app}: document 1: unsupported kind \"Deployment\" (apiVersion \"apps/v1\"): {expected}"),
            format!("ERROR {app}: 1 document is not a policy; with `--skip-other-kinds` it is skipped instead"),
            format!("ERROR {db}: document 2: unsupported kind \"ConfigMap\" (apiVersion \"v1\"): {expected}"),
            format!("ERROR {db}: 1 document is not a policy; with `--skip-other-kinds` it is skipped instead"),
        ]
    );

    let o = porin(&["policy", "validate", "--skip-other-kinds", &dir]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(
        stdout(&o).lines().collect::<Vec<_>>(),
        [
            format!("SKIP  {app}: document 1 (apps/v1 Deployment web): not a policy"),
            format!("OK    {app} (1 policies)"),
            format!("SKIP  {db}: document 2 (v1 ConfigMap db-config): not a policy"),
            format!("OK    {db} (1 policies)"),
        ]
    );
    let o = porin(&["policy", "validate", "--skip-other-kinds", "-o", "json", &dir]);
    let first: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert_eq!(first["skipped"], serde_json::json!([format!("{app}: document 1 (apps/v1 Deployment web)")]));
    assert_eq!(first["valid"], true);

    // `policy test` on a directory runs its test files; the policies they name may hold other kinds.
    s.write(
        "k8s/web.test.yaml",
        "version: 1\npolicies: [{file: app.yaml}]\nendpoints:\n  web: {labels: {app: web}}\n  client: {labels: {app: client}}\n  other: {labels: {app: other}}\ncases:\n- {name: client reaches web, from: client, to: web, port: 80, expect: allow}\n- {name: others do not, from: other, to: web, port: 80, expect: drop}\n",
    );
    let o = porin(&["policy", "test", &dir]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("ERROR 1 document is not a policy; with `--skip-other-kinds` it is skipped instead"),
        "{}",
        stdout(&o)
    );
    let o = porin(&["policy", "test", "--skip-other-kinds", &dir]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let t = s.0.join("k8s/web.test.yaml").display().to_string();
    assert!(stdout(&o).ends_with("2 passed, 0 failed\n"), "{}", stdout(&o));
    assert_eq!(stderr(&o), format!("skipped: {app}: document 1 (apps/v1 Deployment web): not a policy\n"));
    // `validate` checks the test file too, as `test` loads it.
    let o = porin(&["policy", "validate", "--skip-other-kinds", &dir]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains(&format!("OK    {t} (test file, 2 cases)")), "{}", stdout(&o));
    let x = s.write("k8s/x.yaml", "replicas: 2\n");
    let o = porin(&["policy", "validate", "--skip-other-kinds", &x]);
    assert_eq!(
        stdout(&o),
        format!("SKIP  {x}: document 1 (not a Kubernetes object): not a policy\nOK    {x} (0 policies)\n")
    );
    let o = porin(&["policy", "validate", &x]);
    assert!(
        stdout(&o).contains("document 1: not a Kubernetes object (no apiVersion and kind): expected cilium.io/v2"),
        "{}",
        stdout(&o)
    );

    let empty = s.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = porin(&["policy", "validate", &empty.display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stdout(&o), format!("ERROR {}: no YAML files in this directory\n", empty.display()));
}

/// `toServices` entries as Cilium reads them (which services they select is tested in the engine).
#[test]
fn to_services_entries_follow_cilium() {
    let s = Scratch::new("services");
    let f = s.write(
        "svc.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: svc}\nspec:\n  endpointSelector: {}\n  egress:\n  - toServices: [{}]\n  - toServices:\n    - k8sService: {serviceName: db}\n      k8sServiceSelector: {selector: {matchLabels: {tier: db}}}\n",
    );
    let o = porin(&["policy", "validate", &f]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(stdout(&o), format!("OK    {f} (1 policies)\n"));
    assert_eq!(
        stderr(&o).lines().collect::<Vec<_>>(),
        [
            format!(
                "warning: {f}: document 1 (CiliumNetworkPolicy default/svc): spec.egress[0].toServices[0]: empty entry \
                 (neither k8sService nor k8sServiceSelector) selects no service"
            ),
            format!(
                "warning: {f}: document 1 (CiliumNetworkPolicy default/svc): spec.egress[1].toServices[0]: both \
                 k8sService and k8sServiceSelector are set: k8sServiceSelector is used, as in Cilium"
            ),
        ]
    );
}

/// Extended IP protocols (Cilium's `--enable-extended-ip-protocols`, always on in Porin): accepted
/// with no port or port 0; another port is refused with the rule; an unknown protocol lists them.
#[test]
fn extended_ip_protocols_are_accepted_without_ports() {
    let s = Scratch::new("extended");
    let doc = |ports: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: vrrp}}\nspec:\n  endpointSelector: {{matchLabels: {{role: router}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{role: router}}}}]\n    toPorts: [{{ports: [{ports}]}}]\n"
        )
    };
    let ok = s.write("ok.yaml", &doc("{protocol: VRRP}, {protocol: IGMP, port: \"0\"}"));
    let o = porin(&["policy", "validate", &ok]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let bad = s.write("bad.yaml", &doc("{protocol: VRRP, port: \"112\"}"));
    let o = porin(&["policy", "validate", &bad]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stdout(&o),
        format!(
            "ERROR {bad}: document 1 (CiliumNetworkPolicy default/vrrp): spec.ingress[0].toPorts[0].ports[0].port: port must be empty or 0\n"
        )
    );
    let unknown = s.write("unknown.yaml", &doc("{protocol: OSPF, port: \"0\"}"));
    let o = porin(&["policy", "validate", &unknown]);
    assert_eq!(
        stdout(&o),
        format!(
            "ERROR {unknown}: document 1 (CiliumNetworkPolicy default/vrrp): spec.ingress[0].toPorts[0].ports[0].protocol: \
             invalid protocol \"OSPF\", supported protocols are [TCP, UDP, SCTP, ANY, VRRP, IGMP, GRE, IPIP, IPV6, ESP, AH]\n"
        )
    );
}
