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
    /// Validate policy files (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy).
    /// Exit 0 when valid, 2 when any document is invalid.
    Validate {
        /// Policy files (multi-document YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Run policy test files. Exit 0 when every case passes, 1 when one fails, 2 when a file is invalid.
    Test {
        /// Test files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Answer one ad-hoc case and explain every rule considered.
    Trace(Box<TraceArgs>),
}

/// `porin policy trace` arguments.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Policy files and/or test files (a test file contributes its policies, endpoints, namespaces,
    /// fqdn_cache and secrets; its cases are ignored).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
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

/// Runs the command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(PolicyCommand::Validate { files, output }) => policy_cmd::validate(&files, output),
        Command::Policy(PolicyCommand::Test { files, output }) => policy_cmd::test(&files, output),
        Command::Policy(PolicyCommand::Trace(args)) => policy_cmd::trace(&args),
    }
}
