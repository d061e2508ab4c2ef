//! Shared helpers for Porin's integration tests, and the test Kubernetes API server ([`apiserver`]).
//!
//! Owns locating the shared Cilium conformance vectors (`../shared/conformance` beside the repository,
//! or `PORIN_CONFORMANCE_DIR`) and reading them. Tests never copy the vectors into the repository.

pub mod apiserver;

use std::path::PathBuf;

use serde_yaml::Value;

/// The conformance vector directory. Panics with a clear message when it is missing: the vectors are
/// required, a missing directory is a broken checkout, never a reason to skip.
pub fn conformance_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PORIN_CONFORMANCE_DIR") {
        return PathBuf::from(dir);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("../shared/conformance");
    assert!(
        dir.is_dir(),
        "conformance vectors not found at {} (set PORIN_CONFORMANCE_DIR to their directory)",
        dir.display()
    );
    dir
}

/// Reads one vector file as YAML.
pub fn load_vectors(name: &str) -> Value {
    let path = conformance_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
}

/// A string field of a mapping (empty when absent).
pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The `cases` (or `scenarios`) list of a vector file.
pub fn cases<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or(&[])
}

/// Replaces every string equal to `placeholder` inside `v` with `with`.
pub fn replace(v: &mut Value, placeholder: &str, with: &Value) {
    match v {
        Value::String(s) if s == placeholder => *v = with.clone(),
        Value::Sequence(items) => items.iter_mut().for_each(|i| replace(i, placeholder, with)),
        Value::Mapping(m) => m.iter_mut().for_each(|(_, i)| replace(i, placeholder, with)),
        _ => {}
    }
}
