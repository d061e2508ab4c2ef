//! Porin's L7 proxy: per-request HTTP/1.1, HTTP/2 and gRPC policy on compiled snapshots.
//!
//! One proxy process runs per node, apart from the agent, so agent restarts never touch L7
//! traffic. It reads the policy inputs the agent publishes ([`snapshot`]), resolves them with the
//! same engine the agent uses, and keeps enforcing the last good snapshot when the agent is gone.
//!
//! Each listener knows (from its configuration now, from the socket's original addresses once the
//! transparent datapath hands flows over) who the client is and which destination it reaches. On
//! accept, the proxy computes the L3/L4 verdict of both ends (source egress, destination ingress)
//! and, per request, the L7 verdict on the normalised request ([`normalize`]). HTTP/1 framing is
//! checked strictly before hyper sees a byte ([`h1guard`]); HTTP/2 is h2c with prior knowledge.
//! Every request and response leaves a Hubble-shaped [`flow`] record.

pub mod h1guard;
pub mod normalize;
