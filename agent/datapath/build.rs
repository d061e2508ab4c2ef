//! Builds the eBPF programs (`redirect-ebpf`) for the BPF target with aya-build (nightly +
//! `build-std=core` + bpf-linker); `loader.rs` embeds the object.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "redirect-ebpf")
        .ok_or_else(|| anyhow!("redirect-ebpf package not found"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // aya-build watches the eBPF package; the programs also compile `redirect-common` (the
    // decisions, the map layouts), which must rebuild them too.
    let common = root.parent().ok_or_else(|| anyhow!("no parent for {root}"))?.join("redirect-common");
    println!("cargo:rerun-if-changed={}", common.join("src"));
    println!("cargo:rerun-if-changed={}", common.join("Cargo.toml"));
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: root.as_str(), ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
