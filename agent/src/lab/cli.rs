//! `porin lab ...`: the lab's command line (a developer harness, behind the `lab` feature).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use porin_flow::control::{Reply, Request};

use crate::cli::Output;

/// `porin lab ...`
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the lab described by FILE and start its agent and servers.
    Up {
        /// Lab file.
        file: PathBuf,
        /// Lab name (labs side by side need different names).
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Remove everything a lab made (also after a crash).
    Down {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Pods (name, namespace, labels, addresses) and the agent's state.
    Status {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Run a command inside a pod; every pod's name resolves to its address.
    Exec {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
        /// Pod.
        pod: String,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Replace the lab's policies with FILEs and apply them.
    Apply {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Datapath flow records (drops and verdicts).
    Events {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The node (default: the lab's first).
        #[arg(long)]
        node: Option<String>,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Output format (`json`: one Hubble-shaped flow per line).
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Datapath counters (JSON).
    Counters {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The node (default: the lab's first).
        #[arg(long)]
        node: Option<String>,
    },
    /// Start the lab's agent again (after it stopped or was killed).
    RestartAgent {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The node (default: the lab's first).
        #[arg(long)]
        node: Option<String>,
    },
    /// Start the lab's L7 proxy again (after it stopped, was stopped or was killed).
    RestartProxy {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The node (default: the lab's first).
        #[arg(long)]
        node: Option<String>,
    },
    /// Stop the lab's L7 proxy: flows that need L7 policy are refused until it is back.
    StopProxy {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The node (default: the lab's first).
        #[arg(long)]
        node: Option<String>,
    },
    /// Take the datapath off every endpoint (benchmark baselines; `restart-agent` attaches again).
    Detach {
        /// Lab name.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// (internal) Run a pod's built-in servers inside its network namespace.
    #[command(hide = true)]
    Serve {
        /// Network namespace.
        #[arg(long)]
        netns: String,
        /// Server spec (JSON).
        #[arg(long)]
        spec: PathBuf,
        /// Join this cgroup first.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Ready file.
        #[arg(long)]
        ready: Option<PathBuf>,
    },
    /// (internal) Run a command inside a network namespace.
    #[command(hide = true)]
    RunIn {
        /// Network namespace.
        #[arg(long)]
        netns: String,
        /// Join this cgroup first.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Command.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

/// Runs one `porin lab` command.
pub fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    use crate::lab;
    match cmd {
        LabCommand::Up { file, name } => {
            let st = lab::up(&file, &name)?;
            print!("{}", lab::table(&st));
        }
        LabCommand::Down { name } => lab::down(&name)?,
        LabCommand::Status { name, output } => {
            let st = lab::status(&name)?;
            match output {
                Output::Json => print_json(&st),
                Output::Text => {
                    let state = lab::load_state(&name)?;
                    print!("{}", lab::table(&state));
                    for node in st["nodes"].as_array().into_iter().flatten() {
                        let running = node["agent"]["running"].as_bool().unwrap_or(false);
                        let agent = &node["agent"]["status"];
                        println!(
                            "agent of {}: {} (pid {}), policy version {}, generation {}",
                            node["name"].as_str().unwrap_or_default(),
                            if running { "running" } else { "NOT RUNNING (enforcement continues from pinned maps)" },
                            node["agent"]["pid"],
                            agent["version"],
                            agent["generation"]
                        );
                        for e in agent["errors"].as_array().into_iter().flatten() {
                            println!("error: {}", e.as_str().unwrap_or_default());
                        }
                    }
                }
            }
        }
        LabCommand::Exec { name, pod, cmd } => {
            let code = lab::exec(&name, &pod, &cmd)?;
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
        LabCommand::Apply { name, files } => {
            if let Ok(st) = lab::load_state(&name)
                && st.kubernetes.is_some()
            {
                let kubeconfig = lab::LabPaths::new(&name).kubeconfig();
                let node = st.nodes.first().map(|n| n.netns.clone()).unwrap_or_default();
                anyhow::bail!(
                    "lab {name} is in Kubernetes mode: its policies are objects in its API server; apply them with \
                     `ip netns exec {node} kubectl --kubeconfig {} apply -f FILE`",
                    kubeconfig.display()
                );
            }
            lab::install_policies(&name, &files)?;
            // Every node reloads; returns once every node's kernel and proxy enforce the new version.
            let st = lab::load_state(&name)?;
            let mut invalid = false;
            for n in &st.nodes {
                let r = crate::agent::control(&lab::LabPaths::node(&name, &n.name).control(), &Request::Reload)?;
                print_json(&serde_json::to_value(&r)?);
                if let Reply::Reloaded { version, policy_errors, .. } = r {
                    lab::wait_proxy_version(&name, &n.name, version)?;
                    invalid |= !policy_errors.is_empty();
                }
            }
            if invalid {
                return Ok(ExitCode::from(2));
            }
        }
        LabCommand::Events { name, node, after, output } => {
            let r = crate::agent::control(
                &lab::LabPaths::of(&name, node.as_deref())?.control(),
                &Request::Flows { after, limit: None },
            )?;
            if let Reply::Flows { flows, .. } = r {
                for f in &flows {
                    match output {
                        Output::Json => println!("{}", serde_json::to_string(f)?),
                        Output::Text => println!("{}", crate::render::text(f)),
                    }
                }
            }
        }
        LabCommand::Counters { name, node } => {
            if let Reply::Counters { counters } =
                crate::agent::control(&lab::LabPaths::of(&name, node.as_deref())?.control(), &Request::Counters)?
            {
                print_json(&serde_json::to_value(counters)?);
            }
        }
        LabCommand::RestartAgent { name, node } => {
            let pid = lab::restart_agent(&name, node.as_deref())?;
            println!("agent running (pid {pid})");
        }
        LabCommand::Detach { name } => lab::detach(&name)?,
        LabCommand::RestartProxy { name, node } => {
            let pid = lab::restart_proxy(&name, node.as_deref())?;
            println!("proxy running (pid {pid})");
        }
        LabCommand::StopProxy { name, node } => lab::stop_proxy(&name, node.as_deref())?,
        LabCommand::Serve { netns, spec, ready, cgroup } => {
            if let Some(cg) = &cgroup {
                lab::join_cgroup(cg)?;
            }
            crate::agent::enter_netns(&netns)?;
            let text = std::fs::read_to_string(&spec)?;
            let state = spec.with_extension("state");
            crate::lab::servers::run(serde_json::from_str(&text)?, ready, &state)?;
        }
        LabCommand::RunIn { netns, cgroup, cmd } => {
            use std::os::unix::process::CommandExt as _;
            if let Some(cg) = &cgroup {
                lab::join_cgroup(cg)?;
            }
            crate::agent::enter_netns(&netns)?;
            let (prog, args) = cmd.split_first().ok_or_else(|| anyhow::anyhow!("no command"))?;
            return Err(std::process::Command::new(prog).args(args).exec().into());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Pretty JSON on standard output.
fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}
