//! The test API server (`porin_tests::apiserver`) against the real kubectl: CRDs from
//! `config/kubernetes/crds.yaml` register and are established, client-side and server-side apply of a
//! CiliumNetworkPolicy, `get --watch`, label and field selectors on pods, delete and NotFound, `410 Gone`
//! after compaction, a 422 for an invalid policy, and a stop/restart keeping the store.
//!
//! kubectl is `/usr/bin/kubectl` (or `PORIN_KUBECTL`). Without it the tests print `SKIPPED` and pass,
//! except under `CI=true`, where they fail.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use porin_tests::apiserver::ApiServer;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// kubectl, or `None` (the test is skipped) when it is missing outside CI.
fn kubectl_binary() -> Option<PathBuf> {
    let path =
        std::env::var_os("PORIN_KUBECTL").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/kubectl"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "kubectl not found at {} (CI=true: the kubectl fidelity test is required; install kubectl or set PORIN_KUBECTL)",
        path.display()
    );
    println!("SKIPPED: kubectl not found at {} (set PORIN_KUBECTL)", path.display());
    None
}

/// A scratch directory (kubeconfig, kubectl's HOME and cache, manifests), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("porin-apiserver-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write manifest");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A kubectl child killed (and reaped) on drop, also when the test panics.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Kubectl {
    fn new(bin: PathBuf, server: &ApiServer, scratch: &Scratch) -> Kubectl {
        Kubectl { bin, kubeconfig: server.kubeconfig(&scratch.0), home: scratch.0.clone() }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.home.join("cache"))
            .arg("--request-timeout=30s")
            .args(args)
            .env("HOME", &self.home)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap_or_else(|e| panic!("cannot run kubectl {args:?}: {e}"))
    }

    /// Runs kubectl and asserts success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl and asserts failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "kubectl {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("kubectl {args:?}: not JSON ({e}): {text}"))
    }

    /// Starts kubectl in the background; its stdout, a stream of JSON values, arrives on the channel.
    fn stream(&self, args: &[&str]) -> (ChildGuard, mpsc::Receiver<Value>) {
        let mut child = self.command(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn kubectl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for v in serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>() {
                let Ok(v) = v else { return };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        (ChildGuard(child), rx)
    }
}

fn next_event(rx: &mpsc::Receiver<Value>, what: &str) -> Value {
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|e| panic!("kubectl --watch: no event for {what}: {e}"))
}

fn http_path(v: &Value) -> &str {
    v["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["path"].as_str().unwrap_or("")
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).expect("metadata.resourceVersion")
}

fn crds() -> PathBuf {
    let path = root().join("config/kubernetes/crds.yaml");
    assert!(path.is_file(), "{} is missing (the CRDs Porin installs)", path.display());
    path
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn kubectl_crds_apply_watch_delete() {
    let Some(bin) = kubectl_binary() else { return };
    let scratch = Scratch::new("kubectl");
    let server = ApiServer::start();
    let k = Kubectl::new(bin, &server, &scratch);

    // 1. CRDs register, are established, and discovery lists them.
    let applied = k.ok(&["apply", "-f", p(&crds())]);
    for crd in
        ["ciliumnetworkpolicies.cilium.io", "ciliumclusterwidenetworkpolicies.cilium.io", "ciliumcidrgroups.cilium.io"]
    {
        assert!(applied.contains(&format!("customresourcedefinition.apiextensions.k8s.io/{crd} created")), "{applied}");
        k.ok(&["wait", "--for", "condition=established", "--timeout=20s", &format!("crd/{crd}")]);
    }
    let resources = k.ok(&["api-resources", "--api-group=cilium.io", "-o", "wide"]);
    let line = |name: &str| resources.lines().find(|l| l.split_whitespace().next() == Some(name)).map(str::to_string);
    let cnp = line("ciliumnetworkpolicies").unwrap_or_else(|| panic!("no CNP in api-resources:\n{resources}"));
    assert!(
        cnp.contains("cnp")
            && cnp.contains("cilium.io/v2")
            && cnp.contains("true")
            && cnp.contains("CiliumNetworkPolicy"),
        "{cnp}"
    );
    let ccnp = line("ciliumclusterwidenetworkpolicies").unwrap_or_else(|| panic!("no CCNP:\n{resources}"));
    assert!(ccnp.contains("ccnp") && ccnp.contains("false"), "{ccnp}");
    assert!(line("ciliumcidrgroups").is_some(), "no CiliumCIDRGroup:\n{resources}");

    // 2. A namespace, a CiliumNetworkPolicy created and edited by client-side apply, then server-side apply.
    assert!(k.ok(&["create", "namespace", "starwars"]).contains("namespace/starwars created"));
    assert_eq!(k.json(&["get", "namespace", "starwars", "-o", "json"])["status"]["phase"], "Active");
    let example = root().join("config/examples/starwars/l3-l4-l7.yaml");
    let out = k.ok(&["apply", "-f", p(&example), "-n", "default"]);
    assert!(out.contains("ciliumnetworkpolicy.cilium.io/rule1 created"), "{out}");
    let list = k.json(&["get", "cnp", "-n", "default", "-o", "json"]);
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{list}");
    let created = &items[0];
    assert_eq!(created["metadata"]["name"], "rule1");
    assert_eq!(created["spec"]["endpointSelector"]["matchLabels"]["class"], "deathstar");
    assert_eq!(http_path(created), "/v1/request-landing");
    assert_eq!(created["metadata"]["generation"], 1);
    assert!(created["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));

    let original = std::fs::read_to_string(&example).expect("example policy");
    let edited = scratch.write("edited.yaml", &original.replace("/v1/request-landing", "/v1/edited"));
    assert!(k.ok(&["apply", "-f", p(&edited)]).contains("ciliumnetworkpolicy.cilium.io/rule1 configured"));
    let after = k.json(&["get", "cnp", "rule1", "-o", "json"]);
    assert_eq!(http_path(&after), "/v1/edited");
    assert!(rv(&after) > rv(created));
    assert_eq!(after["metadata"]["generation"], 2);
    assert_eq!(after["metadata"]["uid"], created["metadata"]["uid"]);
    assert!(k.ok(&["apply", "-f", p(&edited)]).contains("unchanged"));

    let out = k.ok(&["apply", "--server-side", "-f", p(&example)]);
    assert!(out.contains("serverside-applied"), "{out}");
    let ssa = k.json(&["get", "cnp", "rule1", "-o", "json"]);
    assert_eq!(http_path(&ssa), "/v1/request-landing");
    assert!(rv(&ssa) > rv(&after));

    // 3. `get --watch` sees an edit made afterwards, then the delete.
    let (_watch, events) = k.stream(&["get", "cnp", "-n", "default", "--watch", "--output-watch-events", "-o", "json"]);
    let first = next_event(&events, "the existing policy");
    assert_eq!((first["type"].as_str(), first["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("rule1")));
    k.ok(&["apply", "-f", p(&edited)]);
    let modified = next_event(&events, "the edit");
    assert_eq!(modified["type"], "MODIFIED", "{modified}");
    assert_eq!(http_path(&modified["object"]), "/v1/edited");

    // 5. `delete -f` deletes; get then says NotFound.
    let out = k.ok(&["delete", "-f", p(&edited)]);
    assert!(out.contains("ciliumnetworkpolicy.cilium.io \"rule1\" deleted"), "{out}");
    let deleted = next_event(&events, "the delete");
    assert_eq!(deleted["type"], "DELETED", "{deleted}");
    assert_eq!(deleted["object"]["metadata"]["name"], "rule1");
    let err = k.fails(&["get", "cnp", "rule1"]);
    assert!(err.contains("Error from server (NotFound): ciliumnetworkpolicies.cilium.io \"rule1\" not found"), "{err}");

    // 6. After compaction, a watch from an old resourceVersion gets the ERROR event with 410 Expired.
    server.compact();
    let raw = k.ok(&[
        "get",
        "--raw",
        "/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies?watch=true&resourceVersion=1",
    ]);
    let event: Value = serde_json::from_str(raw.trim()).unwrap_or_else(|e| panic!("not one watch event ({e}): {raw}"));
    assert_eq!(event["type"], "ERROR", "{raw}");
    assert_eq!(event["object"]["kind"], "Status");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
    assert!(
        event["object"]["message"].as_str().is_some_and(|m| m.starts_with("too old resource version: 1 (")),
        "{raw}"
    );

    // 7. An invalid policy (endpointSelector is not an object) is refused with 422 Invalid.
    let bad = scratch.write(
        "bad.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: x\n  namespace: default\nspec:\n  endpointSelector: \"x\"\n",
    );
    let err = k.fails(&["apply", "-f", p(&bad)]);
    assert!(err.contains("The CiliumNetworkPolicy \"x\" is invalid"), "{err}");
    assert!(err.contains("spec.endpointSelector"), "{err}");
    k.fails(&["get", "cnp", "x"]);

    // Deleting the CRDs removes the kinds from discovery.
    k.ok(&["delete", "-f", p(&crds())]);
    // kubectl's cached discovery still maps `cnp`: the list itself is a 404.
    let err = k.fails(&["get", "cnp"]);
    assert!(
        err.contains("the server could not find the requested resource")
            || err.contains("the server doesn't have a resource type \"cnp\""),
        "{err}"
    );
    let resources = k.ok(&["api-resources"]);
    assert!(!resources.contains("cilium.io"), "{resources}");
}

#[test]
fn kubectl_pod_selectors() {
    let Some(bin) = kubectl_binary() else { return };
    let scratch = Scratch::new("kubectl-pods");
    let server = ApiServer::start();
    let k = Kubectl::new(bin, &server, &scratch);
    let pod = |name: &str, app: &str, node: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: {app}\n    tier: t-{name}\n\
             spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: busybox\n"
        )
    };
    let manifest = [pod("p1", "x", "n1"), pod("p2", "x", "n2"), pod("p3", "other", "n1")].join("---\n");
    let path = scratch.write("pods.yaml", &manifest);
    let out = k.ok(&["apply", "-f", p(&path)]);
    assert_eq!(out.matches("created").count(), 3, "{out}");
    let names = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["get", "pods", "-o", "name"];
        all.extend_from_slice(args);
        k.ok(&all).lines().map(String::from).collect()
    };
    assert_eq!(names(&["-l", "app=x"]), ["pod/p1", "pod/p2"]);
    assert_eq!(names(&["-l", "app!=x"]), ["pod/p3"]);
    assert_eq!(names(&["-l", "app in (x,other),tier notin (t-p1)"]), ["pod/p2", "pod/p3"]);
    assert_eq!(names(&["-l", "!app"]), Vec::<String>::new());
    assert_eq!(names(&["--field-selector", "spec.nodeName=n1"]), ["pod/p1", "pod/p3"]);
    assert_eq!(names(&["--field-selector", "spec.nodeName!=n1"]), ["pod/p2"]);
    assert_eq!(names(&["-l", "app=x", "--field-selector", "spec.nodeName=n1,metadata.name=p1"]), ["pod/p1"]);
    assert_eq!(names(&["-A", "--field-selector", "metadata.namespace=default", "-l", "app=other"]), ["pod/p3"]);
    let err = k.fails(&["get", "pods", "--field-selector", "spec.bogus=1"]);
    assert!(err.contains("field label not supported: spec.bogus"), "{err}");

    // Client-side apply of an edited pod: a strategic merge patch keyed on the container name.
    let edited = scratch.write("pods2.yaml", &manifest.replace("busybox", "alpine"));
    k.ok(&["apply", "-f", p(&edited)]);
    let p1 = k.json(&["get", "pod", "p1", "-o", "json"]);
    assert_eq!(p1["spec"]["containers"], serde_json::json!([{"name": "c", "image": "alpine"}]), "{p1}");
    k.ok(&["label", "pod", "p1", "extra=yes"]);
    assert_eq!(names(&["-l", "extra=yes"]), ["pod/p1"]);

    k.ok(&["delete", "-f", p(&path)]);
    assert_eq!(names(&[]), Vec::<String>::new());
    let err = k.fails(&["get", "pod", "p1"]);
    assert!(err.contains("Error from server (NotFound): pods \"p1\" not found"), "{err}");
}

#[test]
fn kubectl_across_restart() {
    let Some(bin) = kubectl_binary() else { return };
    let scratch = Scratch::new("kubectl-restart");
    let mut server = ApiServer::start();
    let k = Kubectl::new(bin, &server, &scratch);
    k.ok(&["create", "namespace", "kept"]);
    let port = server.port();
    server.stop();
    k.fails(&["get", "namespace", "kept"]);
    // Changed while stopped, through the in-process store.
    server
        .store()
        .create(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "made-while-down"}}))
        .expect("create while stopped");
    server.restart();
    assert_eq!(server.port(), port);
    let names = k.ok(&["get", "namespaces", "-o", "name"]);
    assert_eq!(names.lines().collect::<Vec<_>>(), ["namespace/kept", "namespace/made-while-down"]);
}
