//! The `porin` binary's library: command-line parsing and the user's tools.
//!
//! * [`cli`] — argument parsing and dispatch.
//! * [`policy_cmd`] — `porin policy validate | test | trace`, thin formatting over
//!   `policy_engine::policy_test` (the evaluation itself lives in the engine).

pub mod cli;
pub mod policy_cmd;
