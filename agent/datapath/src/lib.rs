//! Porin's eBPF datapath, from userspace: everything that knows the kernel's maps.
//!
//! * [`loader`]: the embedded programs (built by `build.rs` from `redirect-ebpf`), loading them with
//!   maps pinned under bpffs, attaching them through pinned TCX links, writing a snapshot's kernel
//!   form into the inactive generation and flipping it, counters;
//! * [`mapstate`]: what the maps must hold for a snapshot (pure; a property test holds the kernel's
//!   lookup equal to the engine's verdict);
//! * [`interfaces`]: the node's interfaces by name (index, MAC), which endpoints bind to;
//! * [`events`]: kernel events turned into flow records (`porin_flow::flow::Flow`);
//! * [`sockmap`]: putting a proxy listener into the pinned SOCKMAP the programs hand flows to;
//! * [`fqdn`]: the FQDN map the DNS proxy writes (and conntrack, which it asks);
//! * [`translations`]: the socket load balancer's translated connections, which the L7 one asks.
//!
//! The agent drives the first three; `porin proxy` uses [`sockmap`], [`fqdn`] and [`translations`]. The programs' decisions are
//! `redirect_common::datapath`'s; the map layouts and the numbers (reasons, listener ids,
//! reserved identities) are `redirect-common`'s.

pub mod events;
pub mod fqdn;
pub mod interfaces;
pub mod loader;
pub mod mapstate;
pub mod sockmap;
pub mod translations;
