//! A lab in Kubernetes mode (`kubernetes:` in the lab file): the node's agent runs as on a
//! cluster's node (`porin agent --kubernetes`), reading policies, pods and identities from an API
//! server; the lab plays the rest of the cluster:
//!
//! - the API server: the lab file's command, run in the node's namespace (where the agent reaches
//!   it, as a node reaches its API server), given a directory for its files as its last argument; it
//!   prints the path of a kubeconfig for it as its first line (the test API server,
//!   `cargo build -p porin-tests --example apiserver`, does);
//! - the container runtime: each pod's sandbox namespace wired through the node's CNI
//!   configuration list, the cluster's plugin (the reference `ptp` or `bridge`, with `host-local`
//!   addresses) with `porin-cni` chained after it as `porin kubernetes install-cni` chains it, each
//!   plugin run as the CNI spec says a runtime runs it (by type from `CNI_PATH`, `CNI_*` in the
//!   environment, the configuration and the previous plugin's result on standard input; DEL in
//!   reverse order);
//! - kubelet and the user: the pods as objects in the API (labels, node), the CRDs, and the lab's
//!   policy files applied to it; from then on `kubectl` against the lab's kubeconfig changes them.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{LabFile, LabPaths, Pod};

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The pod-side interface the runtime asks the plugins for.
const POD_IFNAME: &str = "eth0";
/// The CNI configuration list's name (the network's).
const NETWORK: &str = "podnet";
/// The pod CIDRs `host-local` hands addresses out of (as the lab's other nodes' pods have).
const POD_CIDRS: [&str; 2] = ["10.244.0.0/24", "fd00:244::/64"];

/// `kubernetes:` of a lab file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesLab {
    /// The cluster's CNI plugin, which `porin-cni` is chained after.
    pub cni: ClusterCni,
    /// The API server's command (a relative program path is relative to the lab file): run in
    /// the node's namespace with a directory for its files as one more argument, it prints the path
    /// of a kubeconfig for it as its first line and serves until killed.
    pub apiserver: Vec<String>,
}

/// The cluster's CNI plugin (a reference plugin, `host-local` addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterCni {
    /// Each pod routed by the node through its own veth.
    Ptp,
    /// Every pod's veth a port of one bridge (`cni0`, the gateway): pods switched to each other.
    Bridge,
}

impl ClusterCni {
    fn plugin(self, ipam_dir: &Path) -> Value {
        let ranges: Vec<Value> = POD_CIDRS.iter().map(|c| json!([{"subnet": c}])).collect();
        let ipam = json!({"type": "host-local", "ranges": ranges, "dataDir": ipam_dir});
        match self {
            Self::Ptp => json!({"type": "ptp", "ipam": ipam}),
            Self::Bridge => json!({"type": "bridge", "bridge": "cni0", "isGateway": true, "ipam": ipam}),
        }
    }
}

/// The files of a Kubernetes-mode lab, in the lab's directory.
impl LabPaths {
    /// The kubeconfig for the lab's API server (in the node's namespace: `ip netns exec`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// The API server's own directory (its last argument).
    fn apiserver_dir(&self) -> PathBuf {
        self.dir.join("apiserver")
    }
    /// The node's CNI configuration directory (`--cni-conf-dir`).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }
    /// Where `porin-cni` records the pods it wires (`--cni-state-dir`).
    pub fn cni_state_dir(&self) -> PathBuf {
        self.dir.join("cni-state")
    }
    /// `CNI_PATH`'s own entry: `porin-cni`.
    fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni-bin")
    }
}

/// The lab's container runtime: runs the node's configuration list.
struct Runtime {
    node_netns: String,
    cni_path: String,
    conflist: PathBuf,
}

impl Runtime {
    /// Writes the cluster's configuration and chains `porin-cni` after it.
    fn install(paths: &LabPaths, node_netns: &str, cni: ClusterCni) -> anyhow::Result<Self> {
        let (conf_dir, bin_dir) = (paths.cni_conf_dir(), paths.cni_bin_dir());
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::create_dir_all(&bin_dir)?;
        let exe = std::env::current_exe().context("locate the porin binary")?;
        let link = bin_dir.join(crate::cni::PLUGIN_NAME);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link).with_context(|| format!("link {}", link.display()))?;
        let conflist = conf_dir.join("10-podnet.conflist");
        let list = json!({"cniVersion": "1.0.0", "name": NETWORK, "plugins": [cni.plugin(&paths.dir.join("ipam"))]});
        std::fs::write(&conflist, serde_json::to_string_pretty(&list)?)?;
        let chained = crate::cni::chain(&conf_dir, &paths.cni_state_dir())?;
        tracing::debug!(%chained, "porin-cni chained");
        let reference = Path::new(REFERENCE_PLUGINS);
        let main = match cni {
            ClusterCni::Ptp => "ptp",
            ClusterCni::Bridge => "bridge",
        };
        if !reference.join(main).exists() || !reference.join("host-local").exists() {
            bail!("no {main} or host-local plugin in {REFERENCE_PLUGINS} (Debian package containernetworking-plugins)");
        }
        let cni_path = format!("{}:{}", reference.display(), bin_dir.display());
        Ok(Self { node_netns: node_netns.to_owned(), cni_path, conflist })
    }

    fn open(paths: &LabPaths, node_netns: &str) -> Self {
        Self {
            node_netns: node_netns.to_owned(),
            cni_path: format!("{REFERENCE_PLUGINS}:{}", paths.cni_bin_dir().display()),
            conflist: paths.cni_conf_dir().join("10-podnet.conflist"),
        }
    }

    /// Each plugin's configuration, as libcni gives it: the list's version and name in each.
    fn plugins(&self) -> anyhow::Result<Vec<Value>> {
        let text =
            std::fs::read_to_string(&self.conflist).with_context(|| format!("read {}", self.conflist.display()))?;
        let list: Value = serde_json::from_str(&text).with_context(|| format!("parse {}", self.conflist.display()))?;
        let plugins = list["plugins"].as_array().ok_or_else(|| anyhow!("{}: no plugins", self.conflist.display()))?;
        Ok(plugins
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p["cniVersion"] = list["cniVersion"].clone();
                p["name"] = list["name"].clone();
                p
            })
            .collect())
    }

    /// Runs one plugin (in the node's namespace): what it printed (its result), or its error.
    fn exec(&self, conf: &Value, command: &str, pod: &Pod) -> anyhow::Result<Value> {
        let ty = conf["type"].as_str().ok_or_else(|| anyhow!("a plugin without a type: {conf}"))?;
        let bin = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(ty))
            .find(|p| p.exists())
            .ok_or_else(|| anyhow!("no CNI plugin {ty:?} in {}", self.cni_path))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_netns])
            .arg(bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.netns)
            .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
            .env("CNI_IFNAME", POD_IFNAME)
            .env("CNI_PATH", &self.cni_path)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                    pod.namespace, pod.name, pod.netns
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run ip netns exec")?;
        // A plugin that exits without reading its configuration says why on stderr: read it first.
        let written = child.stdin.take().context("the plugin's stdin")?.write_all(conf.to_string().as_bytes());
        let out = child.wait_with_output()?;
        if let Err(e) = written
            && out.status.success()
        {
            bail!("{ty} {command} for pod {}: its configuration could not be written: {e}", pod.name);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{ty} {command} for pod {}: {} {}",
                pod.name,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).with_context(|| format!("{ty} {command} printed {stdout:?}"))
    }

    /// ADD through the list: each plugin's result is the next one's `prevResult`; the last one's
    /// is the pod's.
    fn add(&self, pod: &Pod) -> anyhow::Result<Value> {
        let mut prev: Option<Value> = None;
        for mut conf in self.plugins()? {
            if let Some(p) = prev.take() {
                conf["prevResult"] = p;
            }
            prev = Some(self.exec(&conf, "ADD", pod)?);
        }
        prev.ok_or_else(|| anyhow!("{}: an empty list", self.conflist.display()))
    }

    /// DEL through the list, in reverse order, each given the pod's result.
    fn del(&self, pod: &Pod, result: &Value) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        for mut conf in self.plugins()?.into_iter().rev() {
            conf["prevResult"] = result.clone();
            if let Err(e) = self.exec(&conf, "DEL", pod) {
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() { Ok(()) } else { bail!("{}", errors.join("; ")) }
    }
}

/// The host side of a pod's wiring, from the list's result: the node-side interface (`ptp`'s veth,
/// or with `bridge` the veth that is the bridge's port) and the pod's addresses.
fn wiring(result: &Value) -> anyhow::Result<(String, IpAddr, IpAddr)> {
    let interfaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let host = interfaces
        .iter()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .filter_map(|i| i["name"].as_str())
        .rfind(|n| *n != "cni0")
        .ok_or_else(|| anyhow!("no host-side interface in the CNI result {result}"))?;
    let ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    let v4 = ips.iter().find(|a| a.is_ipv4()).copied().ok_or_else(|| anyhow!("no IPv4 address in {result}"))?;
    let v6 = ips.iter().find(|a| a.is_ipv6()).copied().ok_or_else(|| anyhow!("no IPv6 address in {result}"))?;
    Ok((host.to_owned(), v4, v6))
}

/// Checks what a Kubernetes-mode lab cannot have.
pub(super) fn check(lab: &LabFile, k: &KubernetesLab) -> anyhow::Result<()> {
    if !lab.nodes.is_empty() {
        bail!("kubernetes: a Kubernetes-mode lab has one node (no `nodes:`)");
    }
    if lab.settings.mesh.is_some() {
        bail!("kubernetes: settings.mesh is for labs with nodes");
    }
    if let Some(p) = lab.pods.iter().find(|p| p.external) {
        bail!("kubernetes: pod {}: external pods are not supported in Kubernetes mode", p.name);
    }
    if k.apiserver.is_empty() {
        bail!("kubernetes.apiserver: the API server's command is empty");
    }
    Ok(())
}

/// Starts the API server in the node's namespace; returns once its kubeconfig is in the lab's
/// directory.
pub(super) fn start_apiserver(
    k: &KubernetesLab,
    base: &Path,
    node_netns: &str,
    paths: &LabPaths,
) -> anyhow::Result<()> {
    let dir = paths.apiserver_dir();
    std::fs::create_dir_all(&dir)?;
    let mut program = PathBuf::from(&k.apiserver[0]);
    if program.components().count() > 1 && program.is_relative() {
        program = base.join(program);
    }
    if program.components().count() > 1 && !program.exists() {
        bail!(
            "kubernetes.apiserver: {} does not exist (the test API server: cargo build --release --locked -p porin-tests --example apiserver)",
            program.display()
        );
    }
    let out_path = dir.join("out");
    let out = std::fs::File::create(&out_path)?;
    let log = std::fs::File::create(dir.join("log"))?;
    let mut child = Command::new("setsid")
        .args(["ip", "netns", "exec", node_netns])
        .arg(&program)
        .args(&k.apiserver[1..])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start the API server {}", program.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let printed = std::fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(line) = printed.lines().next().filter(|_| printed.contains('\n')) {
            let config = Path::new(line.trim());
            std::fs::copy(config, paths.kubeconfig())
                .with_context(|| format!("the API server printed {line:?}: not a kubeconfig to copy"))?;
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            bail!("the API server exited ({status}): {log}");
        }
        if Instant::now() > deadline {
            bail!("the API server printed no kubeconfig in 20 s ({})", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wires each pod as the runtime would (its sandbox namespace, ADD through the list); returns
/// them, each with its host-side interface, addresses and CNI result.
pub(super) fn wire_pods(
    lab: &LabFile,
    k: &KubernetesLab,
    name: &str,
    node: &super::LabNode,
    paths: &LabPaths,
) -> anyhow::Result<Vec<Pod>> {
    let rt = Runtime::install(paths, &node.netns, k.cni)?;
    let mut pods = Vec::new();
    for def in &lab.pods {
        let netns = format!("porin-{name}-{}", def.name);
        super::net::ip(&["netns", "add", &netns])?;
        super::net::ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let mut pod = Pod {
            name: def.name.clone(),
            namespace: def.namespace.clone(),
            labels: def.labels.clone(),
            annotations: def.annotations.clone(),
            policy_audit_mode: def.policy_audit_mode,
            netns,
            ifname: String::new(),
            ipv4: IpAddr::from([0, 0, 0, 0]),
            ipv6: IpAddr::from([0u16; 8]),
            endpoint: 0,
            external: false,
            pid: None,
            node: node.name.clone(),
            cni_result: None,
        };
        let result = match rt.add(&pod) {
            Ok(r) => r,
            Err(e) => {
                // As a runtime does after a failed ADD: DEL, so the plugins release what they took.
                let cleanup = rt.del(&pod, &Value::Null).err().map(|d| format!(" (DEL after it: {d:#})"));
                return Err(e.context(format!(
                    "wire pod {} through {}{}",
                    pod.name,
                    rt.conflist.display(),
                    cleanup.unwrap_or_default()
                )));
            }
        };
        (pod.ifname, pod.ipv4, pod.ipv6) = wiring(&result)?;
        pod.cni_result = Some(result);
        pods.push(pod);
    }
    Ok(pods)
}

/// DEL through the list for every pod that was wired (`porin lab down`): the plugins release
/// their addresses and `porin-cni` forgets the pod. Errors are returned, after every pod was tried.
pub(super) fn unwire_pods(name: &str, node_netns: &str, pods: &[Pod]) -> anyhow::Result<()> {
    let rt = Runtime::open(&LabPaths::new(name), node_netns);
    let errors: Vec<String> = pods
        .iter()
        .filter_map(|p| Some((p, p.cni_result.as_ref()?)))
        .filter_map(|(p, r)| rt.del(p, r).err().map(|e| format!("{e:#}")))
        .collect();
    if errors.is_empty() { Ok(()) } else { bail!("CNI DEL: {}", errors.join("; ")) }
}

/// Fills the API server as the cluster would: the CRDs, the pods' namespaces, the node, the pods
/// (labels, node name; their addresses as kubelet reports them), then the lab's policy files.
pub(super) fn populate(
    paths: &LabPaths,
    node_netns: &str,
    node_name: &str,
    pods: &[Pod],
    policies: &[PathBuf],
) -> anyhow::Result<()> {
    let kubeconfig = paths.kubeconfig();
    let mut docs: Vec<Value> = Vec::new();
    for crd in yaml_documents(&porin_kubernetes::crd::crds_yaml()?, "the CRDs")? {
        docs.push(crd);
    }
    let namespaces: BTreeSet<&str> = pods.iter().map(|p| p.namespace.as_str()).chain(["default"]).collect();
    docs.extend(namespaces.iter().map(|ns| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})));
    docs.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name}}));
    for p in pods {
        docs.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels, "annotations": p.annotations},
            "spec": {"nodeName": node_name, "containers": [{"name": "main", "image": format!("example.invalid/{}", p.name)}]},
        }));
    }
    for f in policies {
        let text = std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
        docs.extend(yaml_documents(&text, &f.display().to_string())?);
    }
    let statuses: Vec<(String, String, Value)> = pods
        .iter()
        .map(|p| {
            let status =
                json!({"status": {"phase": "Running", "podIP": p.ipv4, "podIPs": [{"ip": p.ipv4}, {"ip": p.ipv6}]}});
            (p.namespace.clone(), p.name.clone(), status)
        })
        .collect();
    in_netns(node_netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let (_, client) = crate::agent::kube_client(Some(&kubeconfig)).await?;
            for doc in docs {
                create(&client, doc).await?;
            }
            for (ns, name, status) in statuses {
                let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), &ns);
                api.patch_status(&name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status))
                    .await
                    .with_context(|| format!("pod {ns}/{name}'s status"))?;
            }
            anyhow::Ok(())
        })
    })
}

/// The documents of a YAML stream (empty ones skipped), as JSON.
fn yaml_documents(text: &str, what: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(d).with_context(|| format!("{what}: document {}", i + 1))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Creates one object, finding its resource (and whether it is namespaced) by discovery; a
/// namespace that exists already is fine.
async fn create(client: &kube::Client, doc: Value) -> anyhow::Result<()> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let what = format!("{kind} {}", doc["metadata"]["name"].as_str().unwrap_or("?"));
    let gvk = match api_version.split_once('/') {
        Some((g, v)) => kube::api::GroupVersionKind::gvk(g, v, &kind),
        None => kube::api::GroupVersionKind::gvk("", &api_version, &kind),
    };
    let (resource, caps) =
        kube::discovery::pinned_kind(client, &gvk).await.with_context(|| format!("{what}: discovery"))?;
    let obj: kube::api::DynamicObject = serde_json::from_value(doc).with_context(|| what.clone())?;
    let api: kube::Api<kube::api::DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
        let ns = obj.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        kube::Api::namespaced_with(client.clone(), &ns, &resource)
    } else {
        kube::Api::all_with(client.clone(), &resource)
    };
    match api.create(&kube::api::PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 && kind == "Namespace" => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("create {what}"))),
    }
}

/// Runs `f` on a thread in network namespace `netns` (what it connects to is there).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let path = Path::new("/run/netns").join(netns);
            let ns = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("enter {netns}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("the thread in {netns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_side_comes_from_the_result() {
        let ptp = json!({"interfaces": [
            {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.244.0.2/24", "interface": 1}, {"address": "fd00:244::2/64", "interface": 1}]});
        let (host, v4, v6) = wiring(&ptp).unwrap();
        assert_eq!(
            (host.as_str(), v4.to_string(), v6.to_string()),
            ("veth1234", "10.244.0.2".into(), "fd00:244::2".into())
        );
        // bridge: the bridge first, then the pod's port of it.
        let bridge = json!({"interfaces": [
            {"name": "cni0"}, {"name": "vethabcd"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.244.0.3/24"}, {"address": "fd00:244::3/64"}]});
        assert_eq!(wiring(&bridge).unwrap().0, "vethabcd");
        let v4_only = json!({"interfaces": [{"name": "veth1"}], "ips": [{"address": "10.244.0.3/24"}]});
        assert!(wiring(&v4_only).unwrap_err().to_string().contains("IPv6"));
        assert!(wiring(&json!({})).is_err());
    }

    #[test]
    fn the_cluster_plugin_hands_out_both_families() {
        let p = ClusterCni::Bridge.plugin(Path::new("/x"));
        assert_eq!(p["type"], "bridge");
        assert_eq!(p["ipam"]["ranges"].as_array().unwrap().len(), 2);
        let lab: KubernetesLab = serde_yaml::from_str("cni: ptp\napiserver: [a, b]\n").unwrap();
        assert_eq!(lab.cni, ClusterCni::Ptp);
        assert!(serde_yaml::from_str::<KubernetesLab>("cni: calico\napiserver: [a]\n").is_err());
    }
}
