//! The image: `scripts/image.sh` builds `config/kubernetes/Containerfile` (FROM scratch) with the
//! real buildah from the binary under test; the image's file system, mounted, runs that binary
//! with only what the image holds (chroot): the shared libraries were staged right. The image and
//! its working container are removed on drop, also on panic.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{porin, privileged, repo};

fn buildah(args: &[&str]) -> String {
    let out = Command::new("buildah")
        .args(args)
        .output()
        .expect("buildah (Debian package buildah; scripts/setup.sh installs it)");
    assert!(out.status.success(), "buildah {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A built image, with a working container whose file system is mounted; all removed on drop.
struct Image {
    tag: String,
    container: Option<String>,
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = Command::new("buildah").args(["umount", c]).output();
            let _ = Command::new("buildah").args(["rm", c]).output();
        }
        let _ = Command::new("buildah").args(["rmi", "-f", &self.tag]).output();
    }
}

#[test]
fn the_containerfile_builds_an_image_that_runs_porin_privileged() {
    if !privileged() {
        return;
    }
    let tag = format!("localhost/porin-image-test-{}:dev", std::process::id());
    let mut image = Image { tag: tag.clone(), container: None };
    let out = Command::new("bash")
        .arg(repo().join("scripts/image.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_porin"), "--tag", &tag])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "image.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value = serde_json::from_str(&buildah(&["inspect", "--type", "image", &tag])).unwrap();
    assert_eq!(config["OCIv1"]["config"]["Entrypoint"], serde_json::json!(["/usr/bin/porin"]), "{config:#}");

    let container = buildah(&["from", "--pull-never", &tag]);
    image.container = Some(container.clone());
    let root = PathBuf::from(buildah(&["mount", &container]));
    // Nothing but the binary, the loader and its libraries.
    assert!(root.join("usr/bin/porin").is_file());
    assert!(!root.join("bin/sh").exists() && !root.join("usr/bin/sh").exists(), "no shell in the image");
    // It runs on what the image holds alone: the manifests' CRDs come out of it.
    let crds = Command::new("chroot").arg(&root).args(["/usr/bin/porin", "kubernetes", "crds"]).output().unwrap();
    assert!(crds.status.success(), "porin in the image: {}", String::from_utf8_lossy(&crds.stderr));
    let committed = std::fs::read_to_string(repo().join("config/kubernetes/crds.yaml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&crds.stdout), committed);
    let here = porin().arg("--version").output().unwrap();
    assert!(here.status.success() && here.stdout.starts_with(b"porin "), "{here:?}");
    let there = Command::new("chroot").arg(&root).args(["/usr/bin/porin", "--version"]).output().unwrap();
    assert_eq!(there.stdout, here.stdout, "the image's porin is the binary under test");
}
