//! The container runtime's side of CNI, for tests: the real Debian `containernetworking-plugins`
//! (`ptp`, `bridge`, with `host-local` addresses) and `porin-cni`, each run exactly as a runtime
//! runs a plugin list (by type from `CNI_PATH`, `CNI_*` in the environment, the configuration
//! with the previous result on standard input; DEL in reverse order), in a node network namespace
//! the test makes. Namespaces and files are removed on drop, also on panic.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::Dir;

/// Where Debian installs the reference plugins.
const PLUGINS: &str = "/usr/lib/cni";

/// A named network namespace, removed on drop.
pub(crate) struct Netns(pub(crate) String);

impl Netns {
    pub(crate) fn new(name: String) -> Self {
        let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name}");
        Self(name)
    }

    pub(crate) fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The runtime's side: runs one plugin of the list in the node namespace.
pub(crate) struct Runtime {
    pub(crate) node: Netns,
    /// `CNI_PATH`: the reference plugins and a `porin-cni` link to the binary under test.
    cni_path: String,
    pub(crate) dir: Dir,
    /// A network configuration list to run (as `porin kubernetes install-cni` left it) instead of
    /// the built-in one.
    pub(crate) conflist: Option<PathBuf>,
}

impl Runtime {
    pub(crate) fn new(tag: &str) -> Self {
        let id = format!("{}-{}", std::process::id(), tag);
        let dir = Dir::new("cni");
        std::fs::create_dir_all(dir.0.join("bin")).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_porin"), dir.0.join("bin/porin-cni")).unwrap();
        let node = Netns::new(format!("pcni-node-{id}"));
        Command::new("ip").args(["netns", "exec", &node.0, "ip", "link", "set", "lo", "up"]).status().unwrap();
        let cni_path = format!("{PLUGINS}:{}", dir.0.join("bin").display());
        Self { node, cni_path, dir, conflist: None }
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.0.join("state")
    }

    /// Runs plugin `ty` with `command` for container `id` (interface eth0 in `netns`): its exit
    /// status and what it printed.
    pub(crate) fn plugin(
        &self,
        ty: &str,
        command: &str,
        id: &str,
        netns: &str,
        pod: &str,
        conf: &Value,
    ) -> (bool, Value) {
        let bin = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(ty))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no {ty} plugin in {} (Debian: containernetworking-plugins)", self.cni_path));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node.0])
            .arg(bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={id}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{ty} {command} printed {stdout:?}: {e}"))
        };
        (out.status.success(), json)
    }

    /// The list's configurations: the cluster's plugin (`ptp` or `bridge`, host-local addresses
    /// kept in the test's directory), then porin-cni; or those of `conflist` (two plugins, the
    /// list's version and name given to each, as libcni does).
    pub(crate) fn list(&self, main: &str) -> (Value, Value) {
        if let Some(path) = &self.conflist {
            let list: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let plugins = list["plugins"].as_array().unwrap();
            assert_eq!(plugins.len(), 2, "{list:#}");
            let conf = |p: &Value| {
                let mut p = p.clone();
                p["cniVersion"] = list["cniVersion"].clone();
                p["name"] = list["name"].clone();
                p
            };
            assert_eq!(plugins[0]["type"], main, "{list:#}");
            return (conf(&plugins[0]), conf(&plugins[1]));
        }
        let ipam = json!({"type": "host-local", "subnet": "10.99.0.0/24", "dataDir": self.dir.0.join("ipam")});
        let first = match main {
            "bridge" => {
                json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni-test0", "isGateway": true, "ipam": ipam})
            }
            _ => json!({"cniVersion": "1.0.0", "name": "podnet", "type": "ptp", "ipam": ipam}),
        };
        let porin = json!({"cniVersion": "1.0.0", "name": "podnet", "type": "porin-cni", "stateDir": self.state_dir()});
        (first, porin)
    }

    /// ADD through the list, as a runtime does: the result of each plugin is the next one's
    /// `prevResult`; returns (the cluster plugin's result, porin-cni's).
    pub(crate) fn add(&self, main: &str, id: &str, pod: &Netns, name: &str) -> (Value, Value) {
        let (mut first, mut porin) = self.list(main);
        let (ok, result) = self.plugin(main, "ADD", id, &pod.path(), name, &first);
        assert!(ok, "{main} ADD: {result}");
        porin["prevResult"] = result.clone();
        let (ok, chained) = self.plugin("porin-cni", "ADD", id, &pod.path(), name, &porin);
        assert!(ok, "porin-cni ADD: {chained}");
        first["prevResult"] = chained.clone();
        (result, chained)
    }

    pub(crate) fn del(&self, main: &str, id: &str, pod: &str, name: &str, prev: &Value) {
        let (mut first, mut porin) = self.list(main);
        porin["prevResult"] = prev.clone();
        let (ok, out) = self.plugin("porin-cni", "DEL", id, pod, name, &porin);
        assert!(ok, "porin-cni DEL: {out}");
        first["prevResult"] = prev.clone();
        let (ok, out) = self.plugin(main, "DEL", id, pod, name, &first);
        assert!(ok, "{main} DEL: {out}");
    }

    pub(crate) fn record(&self, id: &str) -> Option<Value> {
        std::fs::read(self.state_dir().join(format!("{id}.eth0.json")))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    pub(crate) fn in_node(&self, args: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.node.0]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
