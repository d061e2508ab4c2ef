//! Kubernetes mode, end to end, without a real cluster: `porin agent --kubernetes` (kube-rs)
//! against the test API server (`porin_tests::apiserver`, proven with the real kubectl in
//! `tests/tests/apiserver_kubectl.rs`), pods wired by the real Debian CNI plugins (`ptp` or `bridge` with
//! `host-local`, then `porin-cni`, run exactly as a container runtime runs a plugin list), and
//! everything applied with the real kubectl. Traffic is real (curl to the lab's HTTP server, through
//! the kernel and the node's proxy, run with the shipped ConfigMap) in
//! network namespaces the test makes; everything is removed on drop, also on panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cni::{Netns, Runtime};
use common::{Dir, porin, privileged, repo};
use porin_tests::apiserver::ApiServer;
use serde_json::Value;

/// Runs `f` on a thread in network namespace `netns`: what it binds is there (the test API
/// server listens in the node's namespace, where the agent runs, as a node reaches its API server).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// kubectl against the test API server (in the node's namespace), with a private cache.
struct Kubectl {
    kubeconfig: PathBuf,
    home: PathBuf,
    netns: String,
}

impl Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "kubectl"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HOME", &self.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl (Debian/Google package `kubectl`; scripts/setup.sh installs it)");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            std::io::Write::write_all(&mut input, text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// Runs kubectl; fails the test when it fails.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let o = self.run(args, stdin);
        assert!(o.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        self.ok(&["apply", "-f", "-"], Some(yaml));
    }

    fn get(&self, what: &[&str]) -> Value {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&args, None)).unwrap()
    }
}

/// A background process, killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent's bpffs (the agent mounts it), unmounted on drop: its pins go with it (the agent
/// leaves them, as in production, where the datapath outlives the agent).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// One pod: its network namespace, the CNI result, its address.
struct Pod {
    ns: Netns,
    id: String,
    name: String,
    ip: String,
    result: Value,
}

/// The node: a network namespace with pods wired by the CNI plugins, and its agent.
struct Node {
    rt: Runtime,
    /// The cluster's CNI plugin: `ptp` (each pod routed through its own veth) or `bridge` (every
    /// pod's veth a port of one bridge: pods of the node's subnet reach each other switched).
    plugin: &'static str,
    pods: Vec<Pod>,
}

impl Node {
    /// Wires a pod as the runtime would: its sandbox namespace, then ADD through the plugin list.
    fn add_pod(&mut self, name: &str, n: usize) -> String {
        let tag = format!("{}-{}-{name}-{n}", std::process::id(), self.plugin);
        let ns = Netns::new(format!("pk8s-{tag}"));
        Command::new("ip").args(["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"]).status().unwrap();
        let id = format!("k8s{n}{name}");
        let (result, _) = self.rt.add(self.plugin, &id, &ns, name);
        let ip = result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_owned();
        self.pods.push(Pod { ns, id, name: name.to_owned(), ip: ip.clone(), result });
        ip
    }

    /// DEL through the list, then the sandbox goes.
    fn remove_pod(&mut self, name: &str) {
        let i = self.pods.iter().position(|p| p.name == name).unwrap();
        let p = self.pods.remove(i);
        self.rt.del(self.plugin, &p.id, &p.ns.path(), &p.name, &p.result);
    }

    /// The wiring is what the plugin makes: with `bridge`, every pod's host-side veth is a port of
    /// the bridge and the tiefighter reaches the deathstar on-link (switched, no gateway); with
    /// `ptp`, through its gateway (routed by the node).
    fn check_wiring(&self, deathstar: &str) {
        let route = Command::new("ip")
            .args(["netns", "exec", &self.pod("tiefighter").ns.0, "ip", "route", "get", deathstar])
            .output()
            .unwrap();
        let route = String::from_utf8_lossy(&route.stdout);
        let ports = self.rt.in_node(&["ip", "-o", "link", "show", "master", "cni-test0"]);
        if self.plugin == "bridge" {
            assert!(!route.contains(" via "), "on a bridge, pods of the subnet are on-link: {route}");
            assert_eq!(ports.lines().count(), self.pods.len(), "every pod's veth a bridge port: {ports}");
        } else {
            assert!(route.contains(" via "), "ptp routes through the node: {route}");
            assert!(ports.trim().is_empty(), "{ports}");
        }
    }

    fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap()
    }

    /// `curl` from a pod to `http://ip/`: (exit code, HTTP status).
    fn curl(&self, from: &str, ip: &str) -> (i32, String) {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.pod(from).ns.0])
            .args(["curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{ip}/")])
            .output()
            .unwrap();
        (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// An HTTP request from a pod: (curl's exit code, HTTP status, body).
    fn http(&self, from: &str, method: &str, url: &str) -> (i32, String, String) {
        self.http_with(from, &[], method, url)
    }

    /// [`Node::http`] with more of curl's options.
    fn http_with(&self, from: &str, options: &[&str], method: &str, url: &str) -> (i32, String, String) {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.pod(from).ns.0])
            .args(["curl", "-s", "-m", "1"])
            .args(options)
            .args(["-X", method, "-w", "\n%{http_code}", url])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
        (o.status.code().unwrap_or(-1), status.to_owned(), body.to_owned())
    }

    /// Whether `from` reaches `ip` (an HTTP answer) — or is dropped (curl times out).
    fn reaches(&self, from: &str, ip: &str) -> bool {
        match self.curl(from, ip) {
            (0, code) => {
                assert_eq!(code, "200", "{from} → {ip}");
                true
            }
            (28, _) => false,
            other => panic!("{from} → {ip}: unexpected {other:?}"),
        }
    }
}

fn pod_yaml(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: String = labels.iter().map(|(k, v)| format!("    {k}: {v}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n{labels}spec:\n  nodeName: n1\n  containers:\n  - name: main\n    image: example.invalid/{name}\n    ports:\n    - name: http\n      containerPort: 80\n"
    )
}

const SHIPS: [(&str, &[(&str, &str)]); 3] = [
    ("deathstar", &[("org", "empire"), ("class", "deathstar")]),
    ("tiefighter", &[("org", "empire"), ("class", "tiefighter")]),
    ("xwing", &[("org", "alliance"), ("class", "xwing")]),
];

/// Waits (up to `within`) for `cond` on the agent's status; returns how long it took.
fn wait_status(socket: &Path, within: Duration, what: &str, cond: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let st = porin_status(socket);
        if cond(&st) {
            return start.elapsed();
        }
        if start.elapsed() >= within {
            let log = std::fs::read_to_string(socket.with_file_name("agent.log")).unwrap_or_default();
            panic!("{what}: not within {within:?}; agent status: {st:#}\nagent log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn porin_status(socket: &Path) -> Value {
    porin::agent::status_of(socket).unwrap_or(Value::Null)
}

/// The policy document of an object in the agent's status.
fn doc<'a>(st: &'a Value, source: &str) -> Option<&'a Value> {
    st["policy_files"].as_array()?.iter().find(|f| f["file"] == source)
}

/// One scenario at a time: the 1 s the issue gives a policy edit is measured on a quiet node.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn kubectl_applied_policy_is_enforced_on_ptp_wired_pods_privileged() {
    scenario("ptp");
}

/// The same on a bridge: the L7 flows between pods of one bridge are handed to the proxy, not
/// switched past it.
#[test]
fn kubectl_applied_policy_is_enforced_on_bridge_wired_pods_privileged() {
    scenario("bridge");
}

fn scenario(plugin: &'static str) {
    if !privileged() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = Dir::new(&format!("k8s-{plugin}"));
    // The node and its pods, wired by the CNI plugins; the pods created through the API.
    let mut node = Node { rt: Runtime::new(&format!("k8s-{plugin}")), plugin, pods: vec![] };
    let netns = node.rt.node.0.clone();
    install_cni(&mut node.rt, plugin);
    let mut api = in_netns(&netns, ApiServer::start);
    let kubectl = Kubectl { kubeconfig: api.kubeconfig(&dir.0), home: dir.0.clone(), netns: netns.clone() };
    kubectl.ok(&["apply", "-f", repo().join("config/kubernetes/crds.yaml").to_str().unwrap()], None);
    kubectl.ok(&["wait", "--for", "condition=established", "crd/ciliumnetworkpolicies.cilium.io"], None);
    kubectl.ok(&["create", "namespace", "default"], None);
    kubectl.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n");
    node.rt.in_node(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    kube_proxy_rules(&node.rt);
    if plugin == "bridge" {
        // As Kubernetes nodes run (kubeadm requires it): bridged IP traffic passes netfilter,
        // whose bridge hook drops a socket assigned to a frame that crosses the bridge.
        for family in ["iptables", "ip6tables"] {
            let key = format!("net.bridge.bridge-nf-call-{family}");
            node.rt.in_node(&["sysctl", "-qw", &format!("{key}=1")]);
            let value = node.rt.in_node(&["sysctl", "-n", &key]);
            assert_eq!(value.trim(), "1", "{key} (br_netfilter: `modprobe br_netfilter`)");
        }
    }
    for (n, (name, labels)) in SHIPS.iter().enumerate() {
        node.add_pod(name, n);
        kubectl.apply(&pod_yaml(name, labels));
    }
    let deathstar = node.pod("deathstar").ip.clone();
    node.check_wiring(&deathstar);
    let _server = deathstar_server(&dir.0, &node.pod("deathstar").ns.0);

    // The agent, in the node's namespace, reading the API and the CNI records.
    let pins = Pins(dir.0.join("bpf"));
    let control = dir.0.join("agent.sock");
    let (cni_state, node_netns) = (node.rt.state_dir(), node.rt.node.0.clone());
    let cni_conf = node.rt.conflist.clone().unwrap().parent().unwrap().to_owned();
    let start_agent = || {
        // Appended to: a restarted agent's log follows the first one's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.0.join("agent.log")).unwrap();
        Process(
            porin()
                .arg("agent")
                .arg("--kubernetes")
                .arg("--kubeconfig")
                .arg(&kubectl.kubeconfig)
                .arg("--cni-state-dir")
                .arg(&cni_state)
                .arg("--cni-conf-dir")
                .arg(&cni_conf)
                .args(["--identity-gc-secs", "1"])
                .args(["--netns", &node_netns, "--node-name", "n1", "--cgroup", "none"])
                .arg("--bpffs")
                .arg(&pins.0)
                .arg("--control")
                .arg(&control)
                .arg("--publish")
                .arg(dir.0.join("snapshot.json"))
                .arg("--hubble")
                .arg(dir.0.join("hubble.sock"))
                .arg("--proxy-control")
                .arg(dir.0.join("proxy.sock"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let mut agent = start_agent();
    let attached = |st: &Value| {
        st["endpoints"].as_array().is_some_and(|e| e.len() == 3 && e.iter().all(|e| e["attached"] == true))
    };
    wait_status(&control, Duration::from_secs(30), "every pod attached", attached);
    // The node's proxy, with the shipped configuration (its paths moved into the test's directory).
    let proxy_control = dir.0.join("proxy.sock");
    let _proxy = start_proxy(&dir.0, &netns, &pins.0);
    // Identities: each pod's number is the one its labels give (every node computes the same),
    // and this node claimed it in the API as a CiliumIdentity.
    let ids = endpoint_identities(&control);
    eprintln!("identities: {ids:?}");
    let claimed = wait_identities(&kubectl, |objs| ids.values().all(|id| objs.contains_key(id)));
    for (ship, id) in &ids {
        let labels = &claimed[id];
        assert!(labels.contains(&format!("k8s:class={ship}")), "{id}: {labels:?}");
        assert_eq!(policy_engine::identity::derived_identity(&parse_labels(labels)), *id, "{ship}");
    }
    // A pod of another node: the number its node claimed (here, one its labels do not give:
    // that node had a collision, say) is the one this node uses too, once the object exists.
    kubectl.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: n2\n");
    kubectl
        .apply(&pod_yaml("bwing", &[("org", "alliance"), ("class", "bwing")]).replace("nodeName: n1", "nodeName: n2"));
    api.store()
        .merge_patch(
            "v1",
            "Pod",
            Some("default"),
            "bwing",
            &serde_json::json!({"status": {"podIPs": [{"ip": "10.244.9.9"}]}}),
        )
        .unwrap();
    let published = dir.0.join("snapshot.json");
    let (bwing, derived) = wait_published_identity(&published, "k8s:class=bwing", |_| true);
    assert_eq!(policy_engine::identity::derived_identity(&parse_labels(&bwing)), derived);
    kubectl.apply(
        &identity_yaml(4242, &bwing)
            .replace("metadata:\n", "metadata:\n  labels: {app.kubernetes.io/managed-by: porin}\n"),
    );
    wait_published_identity(&published, "k8s:class=bwing", |id| id == 4242);
    eprintln!("the remote bwing: {derived} from its labels, then 4242 as its node claimed");
    let objs = wait_identities(&kubectl, |_| true);
    assert_eq!(
        objs.iter().filter(|(_, l)| l.contains(&"k8s:class=bwing".to_owned())).count(),
        1,
        "this node claims only its own pods' identities: {objs:?}"
    );

    // Until a policy selects it, the deathstar takes anyone.
    let (tie, xwing) = ("tiefighter", "xwing");
    assert!(node.reaches(tie, &deathstar) && node.reaches(xwing, &deathstar));

    // Star wars step 1, applied with kubectl: only the empire lands, enforced within 1 s.
    let rule1 = std::fs::read_to_string(repo().join("config/examples/starwars/l3-l4.yaml")).unwrap();
    kubectl.apply(&rule1);
    let took = wait_status(&control, Duration::from_secs(1), "rule1 in force", |st| {
        doc(st, "CiliumNetworkPolicy default/rule1").is_some_and(|d| d["ok"] == true)
    });
    eprintln!("rule1 applied {took:?} after kubectl returned");
    assert!(node.reaches(tie, &deathstar), "the empire lands");
    assert!(!node.reaches(xwing, &deathstar), "the alliance is dropped");
    // The node says so on the object.
    let wait_object = |name: &str, cond: &dyn Fn(&Value) -> bool| {
        let start = Instant::now();
        loop {
            let o = kubectl.get(&["cnp", name, "-n", "default"]);
            if cond(&o) {
                return o;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "cnp {name}: {o:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_object("rule1", &|o| {
        o["status"]["nodes"]["n1"]["ok"] == true && o["status"]["nodes"]["n1"]["enforcing"] == true
    });

    // An invalid policy is reported on its object (status and a Warning Event); the rest keeps
    // enforcing.
    kubectl.apply(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: broken\n  namespace: default\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEntities: [galaxy-far-far-away]\n",
    );
    let broken = wait_object("broken", &|o| o["status"]["nodes"]["n1"]["ok"] == false);
    let error = broken["status"]["nodes"]["n1"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("galaxy-far-far-away"), "{broken:#}");
    assert_eq!(broken["status"]["nodes"]["n1"]["enforcing"], false);
    let events = kubectl.get(&["events.v1.events.k8s.io", "-n", "default"]);
    let warned = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["reason"] == "PolicyInvalid" && e["regarding"]["name"] == "broken" && e["type"] == "Warning");
    assert!(warned, "a Warning Event on the broken policy: {events:#}");
    assert!(node.reaches(tie, &deathstar) && !node.reaches(xwing, &deathstar), "rule1 still enforces");

    // An edit: the alliance in, the empire out, within 1 s.
    let edited = rule1.replace("      org: empire\n    toPorts", "      org: alliance\n    toPorts");
    assert_ne!(edited, rule1);
    let version = porin_status(&control)["version"].as_u64().unwrap();
    kubectl.apply(&edited);
    let took = wait_status(&control, Duration::from_secs(1), "the edit in force", |st| {
        st["version"].as_u64().is_some_and(|v| v > version)
    });
    eprintln!("edit applied {took:?} after kubectl returned");
    assert!(!node.reaches(tie, &deathstar) && node.reaches(xwing, &deathstar), "the edit enforces");

    // A pod deleted and created again (new sandbox, new address) gets its policy back. Meanwhile
    // its identity is collected (no pod uses it for the agent's grace period, 1 s here) and its
    // number given to another label set: the new xwing gets the next free number, claims it, and
    // is still the alliance's.
    kubectl.ok(&["delete", "pod", "xwing", "-n", "default"], None);
    node.remove_pod("xwing");
    // Meanwhile the cluster's plugin writes its configuration again, without porin-cni (Calico's
    // and Flannel's installers do): the agent chains it again, and the new xwing is wired through
    // porin-cni (`Runtime::add` runs the list the file holds, and wants both plugins).
    let conflist = node.rt.conflist.clone().unwrap();
    let mut list: Value = serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    list["plugins"].as_array_mut().unwrap().retain(|p| p["type"] != "porin-cni");
    let tmp = conflist.with_extension("tmp");
    std::fs::write(&tmp, list.to_string()).unwrap();
    std::fs::rename(&tmp, &conflist).unwrap();
    let start = Instant::now();
    let chained = || {
        let now: Value = serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
        now["plugins"].as_array().unwrap().iter().any(|p| p["type"] == "porin-cni")
    };
    while !chained() {
        assert!(start.elapsed() < Duration::from_secs(5), "porin-cni not chained again: {list:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("porin-cni chained again {:?} after the configuration was rewritten", start.elapsed());
    wait_status(&control, Duration::from_secs(5), "the xwing forgotten", |st| {
        st["endpoints"].as_array().is_some_and(|e| e.len() == 2)
    });
    let old = ids["xwing"];
    let collected = Instant::now();
    let objs = wait_identities(&kubectl, |objs| !objs.contains_key(&old));
    eprintln!("the xwing's identity {old} collected {:?} after its pod was forgotten", collected.elapsed());
    for ship in [tie, "deathstar"] {
        assert!(objs.contains_key(&ids[ship]), "{ship}'s identity, in use, is kept: {objs:?}");
    }
    assert!(objs.contains_key(&4242), "the bwing's identity, in use on another node, is kept: {objs:?}");
    kubectl.apply(&identity_yaml(old, &["k8s:app=squatter".to_owned()]));
    let squatted = Instant::now();
    // And the next number is held by an object without labels, which no node reads as a set:
    // still, nobody can claim that number, so the new xwing moves past it too.
    kubectl.apply(&identity_yaml(old + 1, &[]));
    node.add_pod("xwing", 7);
    kubectl.apply(&pod_yaml("xwing", SHIPS[2].1));
    wait_status(&control, Duration::from_secs(5), "the new xwing attached", attached);
    // The agent may see the pod before the objects: its number settles once it sees both.
    wait_status(&control, Duration::from_secs(5), "the new xwing past the held numbers", |st| {
        st["endpoints"].as_array().into_iter().flatten().any(|e| e["name"] == "xwing" && e["identity"] == old + 2)
    });
    let new = old + 2;
    eprintln!("the xwing's identity: {old}, taken meanwhile, then {new}");
    let claimed = wait_identities(&kubectl, |objs| objs.contains_key(&new));
    assert!(claimed[&new].contains(&"k8s:class=xwing".to_owned()), "{claimed:?}");
    assert_eq!(claimed[&old], vec!["k8s:app=squatter".to_owned()]);
    assert!(claimed[&(old + 1)].is_empty(), "{claimed:?}");
    assert!(node.reaches(xwing, &deathstar), "the new xwing is the alliance's again");
    assert!(!node.reaches(tie, &deathstar));

    // The API server goes away: enforcement unchanged. A change made meanwhile is applied once it
    // is back, as the watches resume.
    api.stop();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!node.reaches(tie, &deathstar) && node.reaches(xwing, &deathstar), "enforcing without the API");
    assert!(porin_status(&control)["endpoints"].as_array().is_some_and(|e| e.len() == 3));
    api.store().delete("cilium.io/v2", "CiliumNetworkPolicy", Some("default"), "rule1").unwrap();
    in_netns(&netns, || api.restart());
    wait_status(&control, Duration::from_secs(15), "rule1's deletion applied after the restart", |st| {
        doc(st, "CiliumNetworkPolicy default/rule1").is_none()
    });
    assert!(node.reaches(tie, &deathstar) && node.reaches(xwing, &deathstar), "no policy selects the deathstar");

    // Star wars step 2, L7, applied with kubectl: the datapath hands the empire's flows to the
    // node's proxy, which lets a landing request through and refuses the exhaust port.
    let rule1 = std::fs::read_to_string(repo().join("config/examples/starwars/l3-l4-l7.yaml")).unwrap();
    kubectl.apply(&rule1);
    wait_status(&control, Duration::from_secs(1), "the L7 rule1 in force", |st| {
        doc(st, "CiliumNetworkPolicy default/rule1").is_some_and(|d| d["ok"] == true)
    });
    let version = porin_status(&control)["version"].as_u64().unwrap();
    wait_proxy(&proxy_control, version);
    let url = |path: &str| format!("http://{deathstar}{path}");
    // The proxy connects upstream from the client's address, from a port of the node's ephemeral
    // range: here the one port the client uses too, so both connections have one 5-tuple and one
    // conntrack entry, under kube-proxy's rule that drops what conntrack calls INVALID.
    let port = "47001";
    node.rt.in_node(&["sysctl", "-qw", &format!("net.ipv4.ip_local_port_range={port} {port}")]);
    let tie_ip = node.pod(tie).ip.clone();
    let (code, status, body) = node.http_with(tie, &["--local-port", port], "POST", &url("/v1/request-landing"));
    let upstream =
        node.rt.in_node(&["ss", "-tanH", "src", &format!("{tie_ip}:{port}"), "dst", &format!("{deathstar}:80")]);
    node.rt.in_node(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 60999"]);
    assert_eq!((code, status.as_str(), body.as_str()), (0, "200", "Ship landed\n"), "the empire may land");
    assert_eq!(upstream.lines().count(), 1, "the proxy's upstream has the client's 5-tuple: {upstream}");
    let ct = node.rt.in_node(&["cat", "/proc/net/nf_conntrack"]);
    let entry = format!("src={tie_ip} dst={deathstar} sport={port} dport=80 ");
    assert_eq!(ct.matches(&entry).count(), 1, "one conntrack entry for both connections: {ct}");
    assert_eq!(invalid_drops(&node.rt), 0, "conntrack found nothing INVALID");
    assert_eq!(
        node.http(tie, "PUT", &url("/v1/exhaust-port")),
        (0, "403".into(), "Access denied\r\n".into()),
        "the proxy refuses the exhaust port"
    );
    assert_eq!(node.http(xwing, "POST", &url("/v1/request-landing")).0, 28, "the alliance is dropped in the kernel");

    // A running pod renumbered: its set claimed under a lower number too (two nodes raced, say),
    // the lowest wins on every node. The tiefighter switches to it while it runs, in the kernel
    // (ipcache, policy) and the proxy alike, and is enforced as before.
    let tie_before = endpoint_identities(&control)[tie];
    let lower = 300;
    assert!(tie_before > lower, "{tie_before}");
    let tie_labels = wait_identities(&kubectl, |o| o.contains_key(&tie_before))[&tie_before].clone();
    kubectl.apply(&identity_yaml(lower, &tie_labels));
    let took = wait_status(&control, Duration::from_secs(5), "the tiefighter renumbered", |st| {
        st["endpoints"].as_array().into_iter().flatten().any(|e| e["name"] == tie && e["identity"] == lower)
    });
    eprintln!("the running tiefighter renumbered {tie_before} -> {lower} in {took:?}");
    let version = porin_status(&control)["version"].as_u64().unwrap();
    wait_proxy(&proxy_control, version);
    assert_eq!(node.http(tie, "POST", &url("/v1/request-landing")).1, "200", "still the empire's");
    assert_eq!(node.http(tie, "PUT", &url("/v1/exhaust-port")).1, "403");
    assert_eq!(node.http(xwing, "POST", &url("/v1/request-landing")).0, 28);

    // The agent restarts: the kernel and the proxy enforce meanwhile; the new agent re-discovers
    // every endpoint from the API and the CNI records, with the same identities, and enforces the
    // same policy.
    let before = endpoint_identities(&control);
    drop(agent);
    assert_eq!(node.http(tie, "PUT", &url("/v1/exhaust-port")).1, "403", "L7 enforced without the agent");
    assert_eq!(node.http(xwing, "POST", &url("/v1/request-landing")).0, 28, "L3/L4 enforced without the agent");
    agent = start_agent();
    wait_status(&control, Duration::from_secs(30), "every pod attached again", attached);
    assert_eq!(endpoint_identities(&control), before, "the same identities after a restart");
    let version = porin_status(&control)["version"].as_u64().unwrap();
    wait_proxy(&proxy_control, version);
    assert_eq!(node.http(tie, "POST", &url("/v1/request-landing")).1, "200");
    assert_eq!(node.http(tie, "PUT", &url("/v1/exhaust-port")).1, "403");
    assert_eq!(node.http(xwing, "POST", &url("/v1/request-landing")).0, 28);
    // Seconds after the squatter's objects were made, unused all along: not Porin's, not collected.
    assert!(squatted.elapsed() > Duration::from_secs(3), "{:?}: more than the grace period", squatted.elapsed());
    let objs = wait_identities(&kubectl, |_| true);
    assert!(objs.contains_key(&old) && objs.contains_key(&(old + 1)), "{objs:?}");
    drop(agent);
    assert_eq!(invalid_drops(&node.rt), 0, "kube-proxy's rules dropped nothing of the scenario's traffic");
}

/// kube-proxy's netfilter rules on the node, IPv4 and IPv6, as iptables mode installs them on a
/// kubeadm node (the hooks that turn conntrack on; the masquerade of what it marks 0x4000; FORWARD
/// dropping what conntrack calls INVALID), and stricter than kube-proxy: INVALID also dropped on
/// INPUT and OUTPUT, which the proxy's connections pass. Bridged frames pass them too
/// (br_netfilter).
fn kube_proxy_rules(rt: &Runtime) {
    const RULES: &str = "*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
COMMIT
*filter
:KUBE-FORWARD - [0:0]
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
";
    for restore in ["iptables-restore", "ip6tables-restore"] {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &rt.node.0, restore, "--noflush"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("iptables (Debian package `iptables`; scripts/setup.sh installs it)");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), RULES.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "{restore}");
    }
}

/// Packets the node's rules dropped as conntrack-INVALID (IPv4 and IPv6).
fn invalid_drops(rt: &Runtime) -> u64 {
    ["iptables-save", "ip6tables-save"]
        .iter()
        .flat_map(|save| {
            let out = rt.in_node(&[save, "-c"]);
            assert!(out.contains("KUBE-FORWARD"), "{save}: {out}");
            let drops: Vec<u64> = out
                .lines()
                .filter(|l| l.contains("--ctstate INVALID -j DROP"))
                .map(|l| {
                    let counters = l.strip_prefix('[').and_then(|l| l.split_once(':')).expect(l);
                    counters.0.parse::<u64>().unwrap()
                })
                .collect();
            assert_eq!(drops.len(), 3, "{save}: INPUT, OUTPUT, KUBE-FORWARD: {out}");
            drops
        })
        .sum()
}

/// What the DaemonSet's init container does on a node (`porin kubernetes install-cni`): the
/// binary as `porin-cni` in the runtime's CNI directory, and the plugin chained in the cluster's
/// network configuration (here `ptp` or `bridge` with `host-local`), which the runtime then runs.
fn install_cni(rt: &mut Runtime, main: &str) {
    let (bin, conf_dir) = (rt.dir.0.join("installed-bin"), rt.dir.0.join("net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let (mut plugin, _) = rt.list(main);
    plugin.as_object_mut().unwrap().retain(|k, _| k != "cniVersion" && k != "name");
    let cluster = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [plugin]});
    let conflist = conf_dir.join("10-podnet.conflist");
    std::fs::write(&conflist, cluster.to_string()).unwrap();
    let install = |expect: &str| {
        let out = porin()
            .args(["kubernetes", "install-cni"])
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf_dir)
            .arg("--state-dir")
            .arg(rt.state_dir())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && said.contains(expect), "{said}{}", String::from_utf8_lossy(&out.stderr));
    };
    install("porin-cni chained in");
    install("porin-cni already chained in");
    // The installed plugin answers as porin-cni (VERSION reads the runtime's version on stdin).
    let mut child = Command::new(bin.join("porin-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), br#"{"cniVersion": "1.0.0"}"#).unwrap();
    let version: Value = serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap();
    assert!(version["supportedVersions"].as_array().unwrap().iter().any(|v| v == "1.0.0"), "{version}");
    rt.conflist = Some(conflist);
}

/// Each local pod's identity, as the agent's status gives it.
fn endpoint_identities(control: &Path) -> std::collections::BTreeMap<String, u32> {
    porin_status(control)["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), u32::try_from(e["identity"].as_u64().unwrap()).unwrap()))
        .collect()
}

/// Waits (up to 10 s) until the CiliumIdentity objects (number → labels as `source:key=value`)
/// satisfy `cond`; returns them.
fn wait_identities(
    kubectl: &Kubectl,
    cond: impl Fn(&std::collections::BTreeMap<u32, Vec<String>>) -> bool,
) -> std::collections::BTreeMap<u32, Vec<String>> {
    let start = Instant::now();
    loop {
        let list = kubectl.get(&["ciliumidentities"]);
        let objs = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let id = o["metadata"]["name"].as_str().unwrap().parse().unwrap();
                let labels = o["security-labels"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| match v.as_str().unwrap() {
                        "" => k.clone(),
                        v => format!("{k}={v}"),
                    })
                    .collect();
                (id, labels)
            })
            .collect();
        if cond(&objs) {
            return objs;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "CiliumIdentities: {objs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to 10 s) until the agent's publication numbers the label set with `label` as `cond`
/// wants; returns the set and its number.
fn wait_published_identity(published: &Path, label: &str, cond: impl Fn(u32) -> bool) -> (Vec<String>, u32) {
    let start = Instant::now();
    loop {
        let inputs: Value =
            std::fs::read_to_string(published).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        let found = inputs["identities"].as_array().into_iter().flatten().find_map(|a| {
            let labels: Vec<String> =
                a[0].as_array()?.iter().map(|l| l.as_str().unwrap_or_default().to_owned()).collect();
            labels.iter().any(|l| l == label).then(|| (labels, a[1].as_u64().and_then(|id| u32::try_from(id).ok())))
        });
        if let Some((labels, Some(id))) = found
            && cond(id)
        {
            return (labels, id);
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no published identity for {label} as wanted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn parse_labels(labels: &[String]) -> policy_engine::labels::Labels {
    use policy_engine::labels::{Label, LabelSource};
    policy_engine::labels::Labels::new(labels.iter().map(|l| Label::parse(l, LabelSource::Any)))
}

/// A CiliumIdentity, as a node claims one.
fn identity_yaml(id: u32, labels: &[String]) -> String {
    let labels: String = labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => format!("  \"{k}\": \"{v}\"\n"),
            None => format!("  \"{l}\": \"\"\n"),
        })
        .collect();
    let labels = if labels.is_empty() { " {}\n".to_owned() } else { format!("\n{labels}") };
    format!("apiVersion: cilium.io/v2\nkind: CiliumIdentity\nmetadata:\n  name: \"{id}\"\nsecurity-labels:{labels}")
}

/// The deathstar's HTTP server (`porin lab serve`: canned answers, as in the lab), ready when it
/// returns.
fn deathstar_server(dir: &Path, netns: &str) -> Process {
    let spec = dir.join("deathstar.json");
    let routes = serde_json::json!({"http": {"port": 80, "routes": [
        {"method": "GET", "path": "/", "body": "Death Star\n"},
        {"method": "POST", "path": "/v1/request-landing", "body": "Ship landed\n"},
        {"method": "PUT", "path": "/v1/exhaust-port", "body": "Panic: deathstar exploded\n"},
    ]}});
    std::fs::write(&spec, routes.to_string()).unwrap();
    let ready = dir.join("deathstar.ready");
    let server = Process(
        porin()
            .args(["lab", "serve", "--netns", netns, "--spec"])
            .arg(&spec)
            .arg("--ready")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_file(&ready, "the deathstar's server");
    server
}

/// The node's proxy, run with the ConfigMap's `proxy.yaml` from `config/kubernetes/porin.yaml`: the
/// host paths it names (`/run/porin`, the bpffs) moved into the test's directory, metrics on any
/// free port.
fn start_proxy(dir: &Path, netns: &str, bpffs: &Path) -> Process {
    let manifests = std::fs::read_to_string(repo().join("config/kubernetes/porin.yaml")).unwrap();
    let config = serde_yaml::Deserializer::from_str(&manifests)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["data"]["proxy.yaml"].as_str().map(str::to_owned))
        .expect("the ConfigMap's proxy.yaml");
    let config = config
        .replace("/run/porin/", &format!("{}/", dir.display()))
        .replace("/sys/fs/bpf/porin/", &format!("{}/", bpffs.display()))
        .replace("127.0.0.1:9964", "127.0.0.1:0");
    assert!(!config.contains("/run/porin") && !config.contains("/sys/fs/bpf"), "{config}");
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, config).unwrap();
    let ready = dir.join("proxy.ready");
    let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
    let proxy = Process(
        porin()
            .args(["proxy", "--netns", netns, "--config"])
            .arg(&path)
            .arg("--ready")
            .arg(&ready)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_file(&ready, "the proxy");
    proxy
}

fn wait_file(path: &Path, what: &str) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what} not ready in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the proxy enforces policy version `version` (or newer).
fn wait_proxy(socket: &Path, version: u64) {
    let start = Instant::now();
    loop {
        let v = porin::agent::status_of(socket).ok().and_then(|s| s["snapshot"]["version"].as_u64());
        if v.is_some_and(|v| v >= version) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the proxy has version {v:?}, not {version}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
