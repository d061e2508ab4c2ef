//! Porin's Kubernetes mode.
//!
//! - [`crd`]: the custom resources Porin reads (`cilium.io/v2` CiliumNetworkPolicy,
//!   CiliumClusterwideNetworkPolicy, CiliumCIDRGroup, CiliumIdentity), their CRDs generated from the policy
//!   engine's own types (kube's `CustomResource` derive over the types' schemars schemas), so what
//!   the API server accepts and what the engine reads are one definition.
//! - [`watch`]: the cluster as the agent reads it: watches into stores that outlive the API
//!   server's absences, and the policy objects as documents for the engine.
//! - [`report`]: what a node says on the objects: `status.nodes`, and an Event for a refusal.
//! - [`identity`]: the cluster's identities, hosted by the API as CiliumIdentity objects.

pub mod crd;
pub mod identity;
pub mod report;
pub mod watch;
