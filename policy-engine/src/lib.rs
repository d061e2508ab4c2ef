//! Porin's policy engine: CiliumNetworkPolicy semantics, exact and testable offline.
//!
//! Policy exists in three forms; this crate owns the first two:
//!
//! 1. **API form** ([`api`]): the CRDs users `kubectl apply` — CiliumNetworkPolicy,
//!    CiliumClusterwideNetworkPolicy, Kubernetes NetworkPolicy — parsed from multi-document YAML and
//!    validated with Cilium's rules into the [`model`]. Errors name the file, document and field path.
//! 2. **Resolved form** ([`resolve`] → [`snapshot`]): given the endpoints, every endpoint's ingress and
//!    egress policy as entries `(peer identities, protocol, ports) → deny | allow | redirect(L7 rules)`,
//!    with compiled HTTP ([`http`]), Kafka ([`kafka`]) and DNS ([`dns`]) rule sets. A snapshot is
//!    immutable and versioned; the proxy and the kernel map writer both consume it.
//!
//! [`pair`] composes the verdict of a flow's two sides (source egress, destination ingress) once,
//! for the proxy and [`policy_test`], which runs `porin policy test` files against the same
//! resolver and matchers.
//!
//! This crate does no network I/O and has no async runtime, sockets, Kubernetes client or eBPF: it is
//! pure policy logic, so it can run in a CI job, the agent and the proxy alike.

pub mod api;
pub mod dns;
pub mod fqdn;
pub mod http;
pub mod identity;
pub mod inputs;
pub mod kafka;
pub mod labels;
pub mod model;
pub mod pair;
pub mod policy_test;
pub mod resolve;
pub mod selector;
pub mod services;
pub mod snapshot;
pub mod visibility;
