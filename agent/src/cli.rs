//! Command-line interface of `porin`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::policy_cmd;

/// Porin: a per-node, sidecar-less L7 policy mesh for CiliumNetworkPolicy.
#[derive(Debug, Parser)]
#[command(name = "porin", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check, test and explain policies offline.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the node agent: resolve policy, write the kernel maps, attach the datapath.
    Agent(Box<AgentArgs>),
    /// A local lab: a node and pods in network namespaces, with real traffic.
    #[cfg(feature = "lab")]
    #[command(subcommand)]
    Lab(crate::lab::cli::LabCommand),
    /// Run the L7 proxy (HTTP/1.1, HTTP/2, gRPC) on the agent's published policy.
    Proxy(crate::proxy_cmd::ProxyArgs),
    /// Print flow records from the agent (datapath) and the proxy (L7), with filters.
    Observe(Box<crate::observe_cmd::ObserveArgs>),
    /// What the DNS proxy learned (`toFQDNs`).
    #[command(subcommand)]
    Fqdn(FqdnCommand),
    /// Kubernetes mode: what an install on a cluster needs.
    #[command(subcommand)]
    Kubernetes(KubernetesCommand),
    /// The chained CNI plugin (CNI spec 1.0), as a container runtime runs it: `CNI_*` in the
    /// environment, the network configuration on standard input. Runtimes run it by its type,
    /// `porin-cni`: a link of that name to this binary is this command.
    Cni,
}

/// `porin kubernetes ...`
#[derive(Debug, Subcommand)]
pub enum KubernetesCommand {
    /// Print the CRDs Porin reads and writes (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
    /// CiliumCIDRGroup, CiliumIdentity), generated from the Rust types:
    /// `config/kubernetes/crds.yaml`.
    Crds,
    /// Install this binary as the chained CNI plugin `porin-cni` in a runtime's CNI binary
    /// directory (written whole: a temporary file, then renamed over the old one), and with
    /// `--conf-dir`, chain it after the cluster's CNI plugin in the node's network configuration.
    InstallCni {
        /// The runtime's CNI binary directory (its `CNI_PATH`), e.g. `/opt/cni/bin`.
        bin_dir: PathBuf,
        /// The runtime's CNI configuration directory, e.g. `/etc/cni/net.d`: `porin-cni` is added
        /// to the end of the plugin list of the configuration the runtime uses (the first by
        /// name), once. Fails while the directory has none (the cluster's plugin writes it).
        #[arg(long)]
        conf_dir: Option<PathBuf>,
        /// Where `porin-cni` records the pods it wired (`stateDir` in its configuration).
        #[arg(long, default_value = crate::cni::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

/// `porin fqdn ...`
#[derive(Debug, Subcommand)]
pub enum FqdnCommand {
    /// The learned names.
    #[command(subcommand)]
    Cache(FqdnCacheCommand),
}

/// `porin fqdn cache ...`
#[derive(Debug, Subcommand)]
pub enum FqdnCacheCommand {
    /// Every learned name and address, with the time left and the endpoints that asked.
    List(crate::proxy_cmd::FqdnListArgs),
}

/// `porin agent` arguments.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Enter this named network namespace (/run/netns/NAME) first.
    #[arg(long)]
    pub netns: Option<String>,
    /// bpffs directory for pinned maps and links (mounted if needed).
    #[arg(long, default_value = "/sys/fs/bpf/porin")]
    pub bpffs: PathBuf,
    /// Policy directory (*.yaml).
    #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    pub policies: Option<PathBuf>,
    /// Endpoints file (JSON).
    #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    pub endpoints: Option<PathBuf>,
    /// Kubernetes mode: read policies (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
    /// NetworkPolicy, CiliumCIDRGroup), services, pods, namespaces and nodes from the API server,
    /// and this node's pods' interfaces from the CNI plugin's records (`--cni-state-dir`).
    #[arg(long)]
    pub kubernetes: bool,
    /// The kubeconfig to reach the API server with (default: in-cluster, then `KUBECONFIG`, then
    /// `~/.kube/config`).
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Where `porin cni` records the pods it wires (its `stateDir`).
    #[arg(long, default_value = "/run/porin/cni")]
    pub cni_state_dir: PathBuf,
    /// Kubernetes mode: keep `porin-cni` chained in the node's CNI configuration in this
    /// directory (as `porin kubernetes install-cni --conf-dir` does), also after the cluster's
    /// plugin rewrites it without `porin-cni`.
    #[arg(long, requires = "kubernetes")]
    pub cni_conf_dir: Option<PathBuf>,
    /// Kubernetes mode: delete the CiliumIdentity objects Porin claimed once no pod of the
    /// cluster has used them for this many seconds (as Cilium's operator does); 0: never.
    #[arg(long, default_value_t = 900)]
    pub identity_gc_secs: u64,
    /// Control socket.
    #[arg(long, default_value = "/run/porin/agent.sock")]
    pub control: PathBuf,
    /// Where the policy inputs of every applied version are published for the L7 proxy.
    #[arg(long, default_value = "/run/porin/snapshot.json")]
    pub publish: PathBuf,
    /// Established TCP idle timeout, seconds.
    #[arg(long, default_value_t = 21600)]
    pub ct_tcp_secs: u64,
    /// TCP timeout before the reply and while closing, seconds.
    #[arg(long, default_value_t = 10)]
    pub ct_tcp_close_secs: u64,
    /// UDP idle timeout, seconds.
    #[arg(long, default_value_t = 60)]
    pub ct_udp_secs: u64,
    /// ICMP echo idle timeout, seconds.
    #[arg(long, default_value_t = 30)]
    pub ct_icmp_secs: u64,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, bound before `--netns` is entered.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Serve Hubble's Observer API (gRPC) on this Unix socket.
    #[arg(long, default_value = "/run/porin/hubble.sock")]
    pub hubble: PathBuf,
    /// Also serve Hubble's Observer API on this TCP address, bound before `--netns` is entered.
    #[arg(long)]
    pub hubble_listen: Option<std::net::SocketAddr>,
    /// Serve the service map (a web page of the node's flows) on this address, bound before
    /// `--netns` is entered.
    #[arg(long)]
    pub ui: Option<std::net::SocketAddr>,
    /// How many flow records the node's ring keeps (Hubble's default: 4095).
    #[arg(long, default_value_t = porin_hubble::ring::DEFAULT_CAPACITY)]
    pub flow_ring: usize,
    /// Balance services for the processes of this cgroup (v2) and below: `auto` is the root of the
    /// cgroup2 hierarchy (mounted at /run/porin/cgroupv2 when none is), `none` turns it off.
    #[arg(long, default_value = "auto")]
    pub cgroup: String,
    /// The node's name in flows and in Hubble's node list (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// The L7 proxy's control socket: its flow records join the node's (its record stream is
    /// followed; a proxy that is not there is waited for).
    #[arg(long, default_value = "/run/porin/proxy.sock")]
    pub proxy_control: PathBuf,
    /// Export the node's flows to this file as JSON lines (Hubble's exporter: `GetFlowsResponse`
    /// per line), rotated by size.
    #[arg(long)]
    pub hubble_export_file_path: Option<PathBuf>,
    /// Rotate the export file past this size, MB (at least 1).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub hubble_export_file_max_size_mb: u32,
    /// Rotated export files kept (`PATH.1` newest).
    #[arg(long, default_value_t = 5)]
    pub hubble_export_file_max_backups: usize,
    /// Export only flows matching one of these Hubble `FlowFilter`s (JSON objects, one per line,
    /// or a JSON array).
    #[arg(long)]
    pub hubble_export_allowlist: Option<String>,
    /// Export no flow matching one of these Hubble `FlowFilter`s.
    #[arg(long)]
    pub hubble_export_denylist: Option<String>,
    /// Export only these fields of each flow (comma-separated dotted paths: `time,verdict,source.pod_name`).
    #[arg(long, value_delimiter = ',')]
    pub hubble_export_fieldmask: Vec<String>,
    /// Policy audit mode (Cilium's `policy-audit-mode`): what policy would drop — in the kernel
    /// and in the proxy — is recorded with verdict AUDIT and let through. Other drops (spoofed
    /// sources, a missing proxy, bypasses, malformed requests) still drop.
    #[arg(long)]
    pub policy_audit_mode: bool,
    /// The node's mesh directory (`porin mesh ca node`: its CA, the trust bundle, the trust
    /// domain). With it the agent issues the node's tunnel certificate and a workload
    /// certificate per identity with endpoints on the node, renews them at half their life, and
    /// writes them to `--mesh-credentials` for the proxy's mTLS tunnel.
    #[arg(long)]
    pub mesh_dir: Option<PathBuf>,
    /// Where the agent writes the node's mesh credentials (0600).
    #[arg(long, default_value = "/run/porin/mesh-credentials.json")]
    pub mesh_credentials: PathBuf,
    /// Lifetime of the certificates the agent issues, seconds (renewed at half).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(10..))]
    pub mesh_cert_ttl_secs: u64,
}

/// How `porin policy` commands read policy files.
#[derive(Debug, Clone, Copy, Args)]
pub struct LoadArgs {
    /// Skip documents that are not policies (Deployments, Services, ConfigMaps, ...) and list them
    /// as skipped, so a directory of manifests can be checked as it is. Misspelt policy kinds and
    /// obsolete policy versions stay errors.
    #[arg(long)]
    pub skip_other_kinds: bool,
}

impl LoadArgs {
    /// The engine's load options.
    pub fn options(self) -> policy_engine::api::LoadOptions {
        policy_engine::api::LoadOptions { skip_other_kinds: self.skip_other_kinds, ..Default::default() }
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON Lines.
    Json,
}

/// `porin policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy,
    /// CiliumCIDRGroup). Exit 0 when valid, 2 when any document is invalid.
    Validate {
        /// Policy files (multi-document YAML), or directories: every `*.yaml`/`*.yml` under one.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// How documents are read.
        #[command(flatten)]
        load: LoadArgs,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Run policy test files. Exit 0 when every case passes, 1 when one fails, 2 when a file is invalid.
    Test {
        /// Test files, or directories: every test file under one (other YAML files there are
        /// policies the tests name).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// How the policies the tests name are read.
        #[command(flatten)]
        load: LoadArgs,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Answer one ad-hoc case and explain every rule considered.
    Trace(Box<TraceArgs>),
    /// Write the policy inputs file the proxy reads (what the agent publishes), for running
    /// `porin proxy` without an agent.
    Publish {
        /// Endpoints file (JSON, the agent's format).
        #[arg(long)]
        endpoints: PathBuf,
        /// Output file (replaced atomically).
        #[arg(short = 'o', long)]
        out: PathBuf,
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// `porin policy trace` arguments.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Policy files and/or test files (a test file contributes its policies, endpoints, namespaces,
    /// fqdn_cache and secrets; its cases are ignored).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// How policy files are read.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Source: an endpoint name, `cidr:IP`, `entity:NAME`, or `labels:k=v,k=v[@namespace]`.
    #[arg(long)]
    pub from: String,
    /// Destination: an endpoint name, `cidr:IP`, `entity:NAME`, `fqdn:NAME`, or `labels:k=v,...[@namespace]`.
    #[arg(long)]
    pub to: String,
    /// Destination port (ICMP: type).
    #[arg(long)]
    pub port: Option<u16>,
    /// TCP (default), UDP, SCTP, ICMP.
    #[arg(long)]
    pub protocol: Option<String>,
    /// HTTP method (default GET when any --http-* flag is given).
    #[arg(long)]
    pub http_method: Option<String>,
    /// HTTP path with query (default /).
    #[arg(long)]
    pub http_path: Option<String>,
    /// HTTP host.
    #[arg(long)]
    pub http_host: Option<String>,
    /// HTTP header `Name: value` (repeatable).
    #[arg(long)]
    pub http_header: Vec<String>,
    /// Kafka API key (name or number).
    #[arg(long)]
    pub kafka_api_key: Option<String>,
    /// Kafka API version.
    #[arg(long)]
    pub kafka_api_version: Option<i16>,
    /// Kafka client id.
    #[arg(long)]
    pub kafka_client_id: Option<String>,
    /// Kafka topic (repeatable).
    #[arg(long)]
    pub kafka_topic: Vec<String>,
    /// DNS query name.
    #[arg(long)]
    pub dns_query: Option<String>,
    /// DNS query type (default A).
    #[arg(long)]
    pub dns_type: Option<String>,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PORIN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("PORIN_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn agent(a: &AgentArgs) -> anyhow::Result<()> {
    // Metrics and Hubble's TCP address are bound where porin was started, so clients on the
    // machine reach them.
    let bind = |addr: Option<std::net::SocketAddr>, what: &str| -> anyhow::Result<_> {
        addr.map(|addr| {
            anyhow::Context::with_context(std::net::TcpListener::bind(addr), || format!("{what} on {addr}"))
        })
        .transpose()
    };
    let sockets = crate::agent::Sockets {
        metrics: bind(a.metrics, "metrics")?,
        hubble: bind(a.hubble_listen, "Hubble's API")?,
        ui: bind(a.ui, "the service map")?,
    };
    let node_name = match &a.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname().map_or_else(|_| "porin".into(), |h| h.to_string_lossy().into_owned()),
    };
    let cgroup = match a.cgroup.as_str() {
        "none" => None,
        "auto" => Some(crate::agent::cgroup2_root()?),
        path => Some(PathBuf::from(path)),
    };
    // The namespace first, while this process has one thread.
    if let Some(ns) = &a.netns {
        crate::agent::enter_netns(ns)?;
    }
    let _ = nix::unistd::setsid();
    let secs = std::time::Duration::from_secs;
    crate::agent::run(
        crate::agent::AgentConfig {
            bpffs: a.bpffs.clone(),
            inputs: match (&a.policies, &a.endpoints) {
                (Some(policies), Some(endpoints)) if !a.kubernetes => {
                    crate::agent::InputsConfig::Files { policies: policies.clone(), endpoints: endpoints.clone() }
                }
                _ => crate::agent::InputsConfig::Kubernetes {
                    kubeconfig: a.kubeconfig.clone(),
                    cni_state: a.cni_state_dir.clone(),
                    cni_conf: a.cni_conf_dir.clone(),
                    identity_gc: (a.identity_gc_secs > 0).then(|| std::time::Duration::from_secs(a.identity_gc_secs)),
                },
            },
            control: a.control.clone(),
            publish: Some(a.publish.clone()),
            settings: porin_datapath::loader::Settings {
                ct_tcp: secs(a.ct_tcp_secs),
                ct_tcp_close: secs(a.ct_tcp_close_secs),
                ct_udp: secs(a.ct_udp_secs),
                ct_icmp: secs(a.ct_icmp_secs),
                verdict_events: true,
            },
            node_name,
            flow_ring: a.flow_ring,
            proxy_control: Some(a.proxy_control.clone()),
            hubble: Some(a.hubble.clone()),
            policy_audit_mode: a.policy_audit_mode,
            export: export_config(a)?,
            cgroup,
            mesh: a.mesh_dir.as_ref().map(|dir| crate::mesh::MeshSettings {
                dir: dir.clone(),
                credentials: a.mesh_credentials.clone(),
                ttl: secs(a.mesh_cert_ttl_secs),
            }),
        },
        sockets,
    )
}

/// Runs the command line.
pub fn main() -> ExitCode {
    // Run by a container runtime as the `porin-cni` plugin: no arguments, only `CNI_*`.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name().is_some_and(|n| n == crate::cni::PLUGIN_NAME) {
        return crate::cni::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(PolicyCommand::Validate { files, load, output }) => {
            policy_cmd::validate(&files, &load.options(), output)
        }
        Command::Policy(PolicyCommand::Test { files, load, output }) => {
            policy_cmd::test(&files, &load.options(), output)
        }
        Command::Policy(PolicyCommand::Trace(args)) => policy_cmd::trace(&args),
        Command::Policy(PolicyCommand::Publish { endpoints, out, files }) => {
            report(crate::proxy_cmd::publish(&endpoints, &out, &files))
        }
        Command::Proxy(a) => {
            init_tracing();
            report(crate::proxy_cmd::run(&a))
        }
        Command::Fqdn(FqdnCommand::Cache(FqdnCacheCommand::List(a))) => report(crate::proxy_cmd::fqdn_cache_list(&a)),
        Command::Cni => crate::cni::main(),
        Command::Kubernetes(KubernetesCommand::InstallCni { bin_dir, conf_dir, state_dir }) => {
            report(crate::cni::install(&bin_dir).and_then(|()| match conf_dir {
                Some(dir) => crate::cni::chain(&dir, &state_dir).map(|done| println!("{done}")),
                None => Ok(()),
            }))
        }
        Command::Kubernetes(KubernetesCommand::Crds) => {
            report(porin_kubernetes::crd::crds_yaml().map(|y| print!("{y}")))
        }
        Command::Observe(a) => crate::observe_cmd::observe(&a).unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }),
        Command::Agent(a) => {
            init_tracing();
            report(agent(&a))
        }
        #[cfg(feature = "lab")]
        Command::Lab(cmd) => {
            init_tracing();
            crate::lab::cli::run(cmd).unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            })
        }
    }
}

/// The flow exporter's settings, checked (a filter that does not parse is an error naming it).
fn export_config(a: &AgentArgs) -> anyhow::Result<Option<porin_hubble::export::ExportConfig>> {
    use porin_hubble::export::ExportConfig;
    let Some(path) = &a.hubble_export_file_path else { return Ok(None) };
    let list = |flag: &str, v: &Option<String>| {
        v.as_deref().map_or(Ok(vec![]), ExportConfig::filters).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    let mut c = ExportConfig::new(path.clone());
    c.max_bytes = usize::try_from(a.hubble_export_file_max_size_mb).unwrap_or(usize::MAX).saturating_mul(1024 * 1024);
    c.max_backups = a.hubble_export_file_max_backups;
    c.allow = list("hubble-export-allowlist", &a.hubble_export_allowlist)?;
    c.deny = list("hubble-export-denylist", &a.hubble_export_denylist)?;
    c.fieldmask = a.hubble_export_fieldmask.clone();
    porin_hubble::filter::Filters::new(&c.allow, &c.deny).map_err(|e| anyhow::anyhow!("flow export filters: {e}"))?;
    Ok(Some(c))
}
