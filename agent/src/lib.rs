//! The `porin` binary's library: command-line parsing and the user's tools.
//!
//! * [`cli`] — argument parsing and dispatch.
//! * [`policy_cmd`] — `porin policy validate | test | trace`, thin formatting over
//!   `policy_engine::policy_test` (the evaluation itself lives in the engine).
//! * [`agent`] — the node agent: inputs → snapshot → kernel maps; control socket.
//! * [`datapath`] — the eBPF object, pinned maps and links, the generation-flip map writer.
//! * [`mapstate`] — snapshot → exact map contents (pure, property-tested against the engine).
//! * [`flow`] — datapath events as Hubble-shaped flow records.
//! * [`proxy_cmd`] — `porin proxy`, `porin observe`, `porin policy publish`.
//! * [`lab`] / [`servers`] — `porin lab`: namespaces, veths, the agent and pod servers.

pub mod agent;
pub mod cli;
pub mod cni;
#[cfg(feature = "lab")]
pub mod lab;
pub mod mesh;
pub mod observe_cmd;
pub mod policy_cmd;
pub mod proxy_cmd;
pub mod render;
