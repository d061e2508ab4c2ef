//! Porin's Kubernetes mode.
//!
//! - [`crd`]: the custom resources Porin reads (`cilium.io/v2` CiliumNetworkPolicy,
//!   CiliumClusterwideNetworkPolicy, CiliumCIDRGroup), their CRDs generated from the policy
//!   engine's own types (kube's `CustomResource` derive over the types' schemars schemas), so what
//!   the API server accepts and what the engine reads are one definition.

pub mod crd;
