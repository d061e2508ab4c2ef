//! `porin cni`: a chained CNI plugin (CNI spec 1.0: `ADD`, `DEL`, `CHECK`, `VERSION`). It runs
//! after the cluster's own CNI plugin (which made the pod's interface and gave it addresses), reads
//! the host side of the pod's interface and its addresses from `prevResult`, and records the
//! attachment for the node's agent (one file per container and interface in the state directory,
//! written whole: temporary file, then rename), with the pod it belongs to (`K8S_POD_NAMESPACE`,
//! `K8S_POD_NAME` from `CNI_ARGS`). `DEL` forgets it (and succeeds when there is nothing to forget,
//! as the spec asks); `CHECK` verifies the record and the interface. `ADD` passes the previous
//! result on unchanged, as a chained plugin must.
//!
//! The runtime runs plugins by their `type`: install the `porin` binary (or a link to it) as
//! `porin-cni` in the runtime's `CNI_PATH`; run under that name it is this plugin.
//!
//! Errors are the spec's: a JSON object with `code`, `msg` and `details` on standard output and a
//! non-zero exit status.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The versions of the spec this plugin speaks (those whose results carry `interfaces`).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Where attachments are recorded unless the network configuration says `stateDir`.
pub const DEFAULT_STATE_DIR: &str = "/run/porin/cni";

/// The name the runtime runs this plugin by (its `type`).
pub const PLUGIN_NAME: &str = "porin-cni";

/// A CNI error (the spec's well-known codes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    /// The code: 1 incompatible version, 4 invalid environment variables, 5 I/O failure,
    /// 6 failed to decode content, 7 invalid network configuration, 100+ this plugin's own.
    pub code: u32,
    /// What went wrong.
    pub msg: String,
    /// Where, or why.
    pub details: String,
}

/// The spec's error codes this plugin uses.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// The recorded attachment does not match the pod's interface (this plugin's own code).
    pub const MISMATCH: u32 = 100;
}

fn err(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError { code, msg: msg.into(), details: details.into() }
}

/// The network configuration the runtime gives on standard input (the fields this plugin reads;
/// the rest is kept only as far as `prevResult` goes).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The spec version the runtime speaks.
    pub cni_version: String,
    /// The network's name.
    #[serde(default)]
    pub name: String,
    /// Where attachments are recorded (default [`DEFAULT_STATE_DIR`]).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The result of the plugins before this one.
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
}

/// The parts of a previous result this plugin reads (spec 0.3.0 and later).
#[derive(Debug, Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Debug, Deserialize)]
struct Interface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IpConfig {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

/// What the runtime says in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (may be empty on `DEL`).
    pub netns: String,
    /// `CNI_IFNAME`: the interface's name inside the container.
    pub ifname: String,
    /// `CNI_ARGS`, split (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ...).
    pub args: BTreeMap<String, String>,
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach.
    Add,
    /// Detach.
    Del,
    /// Verify.
    Check,
    /// Which versions this plugin speaks.
    Version,
}

impl Env {
    /// Reads the environment through `var` (the process's, in use).
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => return Err(err(code::INVALID_ENV, "unknown CNI_COMMAND", other)),
            None => return Err(err(code::INVALID_ENV, "CNI_COMMAND is not set", "")),
        };
        let need = |name: &str| -> Result<String, CniError> {
            match var(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ if command == Command::Version => Ok(String::new()),
                _ => Err(err(code::INVALID_ENV, format!("{name} is not set"), "")),
            }
        };
        let container_id = need("CNI_CONTAINERID")?;
        let ifname = need("CNI_IFNAME")?;
        // The namespace may be gone by the time a DEL comes.
        let netns = if command == Command::Del { var("CNI_NETNS").unwrap_or_default() } else { need("CNI_NETNS")? };
        if !container_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || container_id.starts_with('.')
        {
            return Err(err(code::INVALID_ENV, "CNI_CONTAINERID is not a container id", container_id));
        }
        if ifname.contains('/') || ifname == "." || ifname == ".." {
            return Err(err(code::INVALID_ENV, "CNI_IFNAME is not an interface name", ifname));
        }
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        Ok(Self { command, container_id, netns, ifname, args })
    }
}

/// One pod interface the agent is to attach the datapath to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// The container (sandbox) id.
    pub container_id: String,
    /// The interface's name inside the container.
    pub ifname: String,
    /// The container's network namespace.
    pub netns: String,
    /// The host side of the pod's interface (in the node's namespace): where the datapath goes.
    pub host_ifname: String,
    /// The pod's addresses on this interface.
    pub ips: Vec<IpAddr>,
    /// `K8S_POD_NAMESPACE`, when the runtime said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`, when the runtime said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The network's name.
    pub network: String,
}

impl Attachment {
    /// Its file in `dir`.
    pub fn path(dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
        dir.join(format!("{container_id}.{ifname}.json"))
    }
}

/// Every attachment recorded in `dir` (the agent reads them at start and when told); a file that
/// does not read is reported by name, the rest are returned.
pub fn attachments(dir: &Path) -> std::io::Result<(Vec<Attachment>, Vec<String>)> {
    let mut found = Vec::new();
    let mut bad = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((found, bad)),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Attachment>(&b).map_err(|e| e.to_string()))
        {
            Ok(a) => found.push(a),
            Err(e) => bad.push(format!("{}: {e}", path.display())),
        }
    }
    found.sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
    Ok((found, bad))
}

/// Installs the running binary as `porin-cni` in `bin_dir` (a runtime's `CNI_PATH`): copied to a
/// temporary file there, made executable, then renamed over the old one, so a runtime never runs a
/// half-written plugin.
pub fn install(bin_dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;
    let exe = std::env::current_exe().context("locate the porin binary")?;
    std::fs::create_dir_all(bin_dir).with_context(|| format!("create {}", bin_dir.display()))?;
    let target = bin_dir.join("porin-cni");
    let tmp = bin_dir.join(format!(".porin-cni.{}", std::process::id()));
    std::fs::copy(&exe, &tmp).with_context(|| format!("copy {} to {}", exe.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("make {} executable", tmp.display()))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("rename {} to {}", tmp.display(), target.display()))?;
    println!("installed {}", target.display());
    Ok(())
}

/// What [`chain`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Chained {
    /// `porin-cni` was added to this configuration.
    Added(PathBuf),
    /// This configuration already chains it.
    Already(PathBuf),
}

impl std::fmt::Display for Chained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chained::Added(p) => write!(f, "porin-cni chained in {}", p.display()),
            Chained::Already(p) => write!(f, "porin-cni already chained in {}", p.display()),
        }
    }
}

/// Chains `porin-cni` after the cluster's plugins in the network configuration a runtime uses from
/// `conf_dir` (the first `*.conflist`, `*.conf` or `*.json` by name, as libcni picks it): appended
/// to its plugin list once (a single-plugin `.conf` becomes a `.conflist` of two). Written whole (a
/// temporary file, then renamed), so a runtime never reads half a configuration.
///
/// # Errors
/// No configuration yet (the cluster's CNI plugin has not written one), one that does not read, or
/// one of a CNI version `porin-cni` does not speak (chained, it would fail every pod).
pub fn chain(conf_dir: &Path, state_dir: &Path) -> anyhow::Result<Chained> {
    use anyhow::{Context as _, bail};
    let mut confs: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .with_context(|| format!("read {}", conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist" || x == "conf" || x == "json") && p.is_file())
        .collect();
    confs.sort();
    let Some(path) = confs.first() else {
        bail!("no CNI configuration in {} yet (the cluster's CNI plugin writes one): try again", conf_dir.display());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut conf: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not a CNI configuration (JSON)", path.display()))?;
    let ours = serde_json::json!({"type": "porin-cni", "stateDir": state_dir});
    let (target, list) = match conf.get("plugins") {
        Some(serde_json::Value::Array(_)) => (path.clone(), conf),
        Some(_) => bail!("{}: `plugins` is not a list", path.display()),
        None => {
            // One plugin: the list keeps its name and version, the plugin the rest.
            let Some(obj) = conf.as_object_mut() else { bail!("{}: not a CNI configuration", path.display()) };
            let mut list = serde_json::Map::new();
            for k in ["cniVersion", "name", "disableCheck"] {
                if let Some(v) = obj.remove(k) {
                    list.insert(k.to_owned(), v);
                }
            }
            list.insert("plugins".into(), serde_json::Value::Array(vec![conf]));
            (path.with_extension("conflist"), serde_json::Value::Object(list))
        }
    };
    let plugins = list["plugins"].as_array().map(Vec::as_slice).unwrap_or_default();
    if plugins.iter().any(|p| p["type"] == "porin-cni") {
        return Ok(Chained::Already(path.clone()));
    }
    // The runtime gives every plugin of the list the list's version: chained at one porin-cni does
    // not speak, it would fail every pod's ADD. Better unchained (pods start, reported unenforced).
    let version = list["cniVersion"].as_str().unwrap_or_default();
    if !SUPPORTED_VERSIONS.contains(&version) {
        bail!(
            "{}: cniVersion {version:?}: porin-cni speaks {}; not chained (every pod's ADD would fail)",
            path.display(),
            SUPPORTED_VERSIONS.join(", ")
        );
    }
    let mut list = list;
    if let Some(p) = list["plugins"].as_array_mut() {
        p.push(ours);
    }
    // A name no other writer uses (agents of two pods of a rollout both run as pid 1, say).
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = conf_dir.join(format!(".porin-cni-conf.{}.{nanos}", std::process::id()));
    let written = serde_json::to_string_pretty(&list)? + "\n";
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, written.as_bytes()))
        .with_context(|| format!("write {}", tmp.display()))?;
    // The cluster's plugin may have written the file meanwhile: its version wins, and is chained
    // on the next try.
    if std::fs::read_to_string(path).ok().as_deref() != Some(text.as_str()) {
        let _ = std::fs::remove_file(&tmp);
        bail!("{} changed while porin-cni was being chained in: try again", path.display());
    }
    std::fs::rename(&tmp, &target).with_context(|| format!("rename {} to {}", tmp.display(), target.display()))?;
    if &target != path {
        std::fs::remove_file(path).with_context(|| format!("remove {} (now {})", path.display(), target.display()))?;
    }
    Ok(Chained::Added(target))
}

/// Whether `name` (in this network namespace) is a bridge.
fn is_bridge(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("bridge").exists()
}

/// The attachment `prev` describes for the pod interface `env.ifname`: its host side is the
/// previous result's one interface outside any sandbox that is not a bridge (`ptp` and `bridge`
/// both list the host end of the pod's veth so); its addresses are those on the pod interface.
fn attachment(env: &Env, conf: &NetConf, prev: &serde_json::Value) -> Result<Attachment, CniError> {
    let prev: PrevResult = serde_json::from_value(prev.clone())
        .map_err(|e| err(code::DECODE, "prevResult does not read as a CNI result", e.to_string()))?;
    let pod_if = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
        .ok_or_else(|| {
            err(code::INVALID_CONFIG, "prevResult has no interface of the pod", format!("CNI_IFNAME {}", env.ifname))
        })?;
    let host: Vec<&str> = prev
        .interfaces
        .iter()
        .filter(|i| i.sandbox.as_deref().is_none_or(str::is_empty) && !is_bridge(&i.name))
        .map(|i| i.name.as_str())
        .collect();
    let host_ifname = match host.as_slice() {
        [one] => (*one).to_owned(),
        [] => {
            return Err(err(
                code::INVALID_CONFIG,
                "prevResult names no host-side interface of the pod",
                "the plugin before porin-cni must create a veth pair (ptp, bridge)",
            ));
        }
        many => {
            return Err(err(
                code::INVALID_CONFIG,
                "prevResult names more than one host-side interface",
                many.join(", "),
            ));
        }
    };
    let mut ips = Vec::new();
    for ip in &prev.ips {
        // An address without an interface index belongs to the pod's (older results).
        if ip.interface.is_none_or(|i| i == pod_if) {
            let addr = ip.address.split_once('/').map_or(ip.address.as_str(), |(a, _)| a);
            ips.push(addr.parse::<IpAddr>().map_err(|e| {
                err(code::DECODE, "an address in prevResult does not read", format!("{}: {e}", ip.address))
            })?);
        }
    }
    if ips.is_empty() {
        return Err(err(
            code::INVALID_CONFIG,
            "prevResult gives the pod no address",
            format!("interface {}", env.ifname),
        ));
    }
    Ok(Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        host_ifname,
        ips,
        pod_namespace: env.args.get("K8S_POD_NAMESPACE").cloned(),
        pod_name: env.args.get("K8S_POD_NAME").cloned(),
        network: conf.name.clone(),
    })
}

fn io(what: &str, path: &Path, e: std::io::Error) -> CniError {
    err(code::IO, what, format!("{}: {e}", path.display()))
}

fn write_attachment(dir: &Path, a: &Attachment) -> Result<(), CniError> {
    std::fs::create_dir_all(dir).map_err(|e| io("the state directory cannot be made", dir, e))?;
    let path = Attachment::path(dir, &a.container_id, &a.ifname);
    let tmp = path.with_extension("tmp");
    let bytes =
        serde_json::to_vec_pretty(a).map_err(|e| err(code::IO, "the attachment does not encode", e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        // What was half-written goes; the error is the write's.
        let _ = std::fs::remove_file(&tmp);
        io("the attachment cannot be recorded", &path, e)
    })
}

/// Runs one command: `stdin` is the network configuration; returns what goes to standard output.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<serde_json::Value>, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| err(code::DECODE, "the network configuration does not read", e.to_string()))?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) && env.command != Command::Version {
        return Err(err(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!("{} (porin-cni speaks {})", conf.cni_version, SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let dir = conf.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    match env.command {
        Command::Version => Ok(Some(serde_json::json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        }))),
        Command::Add => {
            let prev = conf.prev_result.as_ref().ok_or_else(|| {
                err(
                    code::INVALID_CONFIG,
                    "porin-cni is a chained plugin: prevResult is missing",
                    "list it after the cluster's CNI plugin",
                )
            })?;
            let a = attachment(env, &conf, prev)?;
            write_attachment(&dir, &a)?;
            // The previous result, passed on as it is, in the version the runtime speaks.
            let mut out = prev.clone();
            if let Some(o) = out.as_object_mut() {
                o.insert("cniVersion".into(), conf.cni_version.clone().into());
            }
            Ok(Some(out))
        }
        Command::Del => {
            let path = Attachment::path(&dir, &env.container_id, &env.ifname);
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io("the attachment cannot be forgotten", &path, e)),
            }
        }
        Command::Check => {
            let prev =
                conf.prev_result.as_ref().ok_or_else(|| err(code::INVALID_CONFIG, "CHECK needs prevResult", ""))?;
            let want = attachment(env, &conf, prev)?;
            let path = Attachment::path(&dir, &env.container_id, &env.ifname);
            let have: Attachment =
                std::fs::read(&path).map_err(|e| io("no attachment is recorded", &path, e)).and_then(|b| {
                    serde_json::from_slice(&b)
                        .map_err(|e| err(code::DECODE, "the recorded attachment does not read", e.to_string()))
                })?;
            if have != want {
                return Err(err(
                    code::MISMATCH,
                    "the recorded attachment is not the pod's",
                    format!("recorded {have:?}, prevResult says {want:?}"),
                ));
            }
            if !Path::new("/sys/class/net").join(&have.host_ifname).exists() {
                return Err(err(code::MISMATCH, "the pod's host-side interface is gone", have.host_ifname));
            }
            Ok(None)
        }
    }
}

/// The plugin's process: environment and standard input in, the result or the error out.
pub fn main() -> std::process::ExitCode {
    let mut stdin = Vec::new();
    let out = Env::read(|k| std::env::var(k).ok()).and_then(|env| {
        std::io::stdin()
            .read_to_end(&mut stdin)
            .map_err(|e| err(code::IO, "standard input cannot be read", e.to_string()))?;
        run(&env, &stdin)
    });
    let (json, status) = match out {
        Ok(Some(v)) => (Some(v), 0),
        Ok(None) => (None, 0),
        Err(e) => {
            // The error in the version the runtime speaks (1.0.0 when it cannot be read).
            let version = serde_json::from_slice::<serde_json::Value>(&stdin)
                .ok()
                .and_then(|v| v.get("cniVersion").and_then(|v| v.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "1.0.0".into());
            (Some(serde_json::json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})), 1)
        }
    };
    if let Some(json) = json {
        let mut stdout = std::io::stdout().lock();
        let written =
            serde_json::to_writer(&mut stdout, &json).map_err(std::io::Error::from).and_then(|()| stdout.flush());
        if written.is_err() {
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("porin-cni-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(p: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn chaining_appends_porin_cni_to_the_configuration_the_runtime_uses_once() {
        let d = Scratch::new("chain-list");
        let state = Path::new("/run/porin/cni");
        assert!(chain(&d.0, state).unwrap_err().to_string().contains("no CNI configuration"));
        let list = serde_json::json!({"cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": [
            {"type": "calico", "ipam": {"type": "calico-ipam"}}, {"type": "portmap", "capabilities": {"portMappings": true}}]});
        std::fs::write(d.0.join("10-calico.conflist"), list.to_string()).unwrap();
        // Not the first by name: left alone.
        std::fs::write(d.0.join("99-loopback.conf"), r#"{"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}"#)
            .unwrap();
        std::fs::write(d.0.join("README"), "not a configuration").unwrap();
        let path = d.0.join("10-calico.conflist");
        assert_eq!(chain(&d.0, state).unwrap(), Chained::Added(path.clone()));
        let mut want = list.clone();
        want["plugins"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "porin-cni", "stateDir": "/run/porin/cni"}));
        assert_eq!(read(&path), want);
        assert_eq!(chain(&d.0, state).unwrap(), Chained::Already(path.clone()));
        assert_eq!(read(&path), want);
        assert_eq!(read(&d.0.join("99-loopback.conf"))["type"], "loopback");
        let mut names: Vec<_> = std::fs::read_dir(&d.0).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["10-calico.conflist", "99-loopback.conf", "README"], "no temporary file left");
    }

    #[test]
    fn a_configuration_of_a_version_porin_cni_does_not_speak_is_left_unchained() {
        let d = Scratch::new("chain-version");
        let path = d.0.join("10-old.conflist");
        for version in [Some("0.2.0"), Some("2.0.0"), None] {
            let mut list = serde_json::json!({"name": "old", "plugins": [{"type": "bridge"}]});
            if let Some(v) = version {
                list["cniVersion"] = v.into();
            }
            std::fs::write(&path, list.to_string()).unwrap();
            let e = chain(&d.0, Path::new("/run/porin/cni")).unwrap_err().to_string();
            assert!(e.contains("porin-cni speaks") && e.contains("not chained"), "{e}");
            assert_eq!(read(&path), list, "left as it was");
        }
    }

    #[test]
    fn a_single_plugin_configuration_becomes_a_list_of_two() {
        let d = Scratch::new("chain-conf");
        std::fs::write(
            d.0.join("10-flannel.conf"),
            r#"{"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "delegate": {"hairpinMode": true}}"#,
        )
        .unwrap();
        let state = Path::new("/var/run/porin");
        let path = d.0.join("10-flannel.conflist");
        assert_eq!(chain(&d.0, state).unwrap(), Chained::Added(path.clone()));
        assert!(!d.0.join("10-flannel.conf").exists());
        assert_eq!(
            read(&path),
            serde_json::json!({"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
                {"type": "flannel", "delegate": {"hairpinMode": true}},
                {"type": "porin-cni", "stateDir": "/var/run/porin"}]})
        );
        assert_eq!(chain(&d.0, state).unwrap(), Chained::Already(path));
        // What does not read is said.
        let bad = Scratch::new("chain-bad");
        std::fs::write(bad.0.join("00-x.conflist"), "{not json").unwrap();
        assert!(format!("{:#}", chain(&bad.0, state).unwrap_err()).contains("00-x.conflist: not a CNI configuration"));
    }

    fn env(command: &str) -> impl Fn(&str) -> Option<String> {
        let command = command.to_owned();
        move |k| match k {
            "CNI_COMMAND" => Some(command.clone()),
            "CNI_CONTAINERID" => Some("abc123".into()),
            "CNI_NETNS" => Some("/run/netns/pod".into()),
            "CNI_IFNAME" => Some("eth0".into()),
            "CNI_ARGS" => Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=deathstar-1".into()),
            _ => None,
        }
    }

    #[test]
    fn the_environment_is_read_as_the_spec_gives_it() {
        let e = Env::read(env("ADD")).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args.get("K8S_POD_NAME").map(String::as_str), Some("deathstar-1"));
        assert_eq!(Env::read(env("NOPE")).unwrap_err().code, code::INVALID_ENV);
        let no_id = |k: &str| if k == "CNI_CONTAINERID" { None } else { env("ADD")(k) };
        assert_eq!(Env::read(no_id).unwrap_err().code, code::INVALID_ENV);
        let path_id = |k: &str| if k == "CNI_CONTAINERID" { Some("../../etc".into()) } else { env("ADD")(k) };
        assert_eq!(Env::read(path_id).unwrap_err().code, code::INVALID_ENV, "an id is never a path");
        let version_only = |k: &str| if k == "CNI_COMMAND" { Some("VERSION".into()) } else { None };
        assert_eq!(Env::read(version_only).unwrap().command, Command::Version);
    }

    #[test]
    fn bad_configurations_get_the_specs_codes() {
        let e = Env::read(env("ADD")).unwrap();
        assert_eq!(run(&e, b"{").unwrap_err().code, code::DECODE);
        assert_eq!(run(&e, br#"{"cniVersion": "0.2.0", "name": "n"}"#).unwrap_err().code, code::INCOMPATIBLE_VERSION);
        let missing = run(&e, br#"{"cniVersion": "1.0.0", "name": "n"}"#).unwrap_err();
        assert_eq!(missing.code, code::INVALID_CONFIG);
        assert!(missing.msg.contains("prevResult"), "{missing:?}");
        let no_pod_if = br#"{"cniVersion": "1.0.0", "name": "n", "prevResult":
            {"interfaces": [{"name": "veth1"}], "ips": [{"address": "10.1.0.2/24"}]}}"#;
        assert_eq!(run(&e, no_pod_if).unwrap_err().code, code::INVALID_CONFIG);
        let no_host_if = br#"{"cniVersion": "1.0.0", "name": "n", "prevResult":
            {"interfaces": [{"name": "eth0", "sandbox": "/run/netns/pod"}], "ips": [{"address": "10.1.0.2/24", "interface": 0}]}}"#;
        assert_eq!(run(&e, no_host_if).unwrap_err().code, code::INVALID_CONFIG);
        let bad_ip = br#"{"cniVersion": "1.0.0", "name": "n", "prevResult":
            {"interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/pod"}], "ips": [{"address": "10.1.0/24", "interface": 1}]}}"#;
        assert_eq!(run(&e, bad_ip).unwrap_err().code, code::DECODE);
    }

    #[test]
    fn version_lists_what_it_speaks() {
        let e = Env::read(|k| if k == "CNI_COMMAND" { Some("VERSION".into()) } else { None }).unwrap();
        let v = run(&e, br#"{"cniVersion": "1.0.0"}"#).unwrap().unwrap();
        assert_eq!(v["supportedVersions"], serde_json::json!(SUPPORTED_VERSIONS));
    }
}
