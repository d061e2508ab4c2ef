//! JSON schemas for the fields the policy types keep as written (feature `schema`): what the
//! Kubernetes CRDs, generated from these types, declare for them.

use schemars::{Schema, SchemaGenerator, json_schema};

/// Any value, kept as written (Kubernetes: `x-kubernetes-preserve-unknown-fields`).
pub(crate) fn any(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// A list of any values, kept as written.
pub(crate) fn any_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "array", "items": { "x-kubernetes-preserve-unknown-fields": true } })
}

/// A number or a string (ports, Kafka API versions, ICMP types): Cilium's CRD types them as
/// strings; a YAML integer is accepted here as the policy files accept it.
pub(crate) fn int_or_string(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-int-or-string": true })
}
