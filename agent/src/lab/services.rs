//! The lab's services: the `Service` documents of its policy files get the EndpointSlices
//! Kubernetes' slice controller would write for them (one per service with a selector and address
//! family, from the pods it selects), and their names resolve in every pod (`/etc/hosts`) as pod
//! names do. Slices written by hand (for services without a selector) are used as they are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use policy_engine::api::{LoadOptions, Loaded, load_file};
use policy_engine::services::{SERVICE_NAME_LABEL, Service, TargetPort};

use super::{LabPaths, LabState, Pod};

/// The slices file the lab writes into the policy directory (read after the `NN-` files).
const SLICES_FILE: &str = "zz-endpointslices.yaml";
/// Who manages the generated slices (Kubernetes' `endpointslice.kubernetes.io/managed-by`).
const MANAGED_BY: &str = "porin-lab";

/// Whether `path` is the lab's generated slices file.
pub(super) fn is_generated(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == SLICES_FILE)
}

/// The services of the policy directory (documents that do not load are the agent's to report).
pub(super) fn services_in(dir: &Path) -> Vec<Service> {
    let mut loaded = Loaded::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .filter(|p| p.file_name().is_some_and(|n| n != SLICES_FILE))
        .collect();
    files.sort();
    for f in files {
        loaded.extend(load_file(&f, &LoadOptions::default()));
    }
    loaded.services().0
}

/// The EndpointSlices of the services with a selector, over `pods` (`node_name` names a pod's node
/// as its agent knows it).
pub(super) fn endpoint_slices(
    services: &[Service],
    pods: &[Pod],
    node_name: impl Fn(&Pod) -> String,
) -> Vec<discovery::EndpointSlice> {
    let mut out = Vec::new();
    for s in services {
        let Some(selector) = &s.selector else { continue };
        let selected: Vec<&Pod> = pods
            .iter()
            .filter(|p| !p.external && p.namespace == s.namespace)
            .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .collect();
        // Named target ports would need the pods' container ports, which lab pods do not declare.
        let ports: Vec<discovery::EndpointPort> = s
            .ports
            .iter()
            .filter_map(|p| match p.target {
                TargetPort::Number(n) => Some(discovery::EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(i32::from(n)),
                    protocol: Some(p.protocol.to_string()),
                    app_protocol: None,
                }),
                TargetPort::Name(_) => None,
            })
            .collect();
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let endpoints = selected
                .iter()
                .map(|p| discovery::Endpoint {
                    addresses: vec![if v4 { p.ipv4 } else { p.ipv6 }.to_string()],
                    conditions: Some(discovery::EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(node_name(p)),
                    ..Default::default()
                })
                .collect();
            out.push(discovery::EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{}-{}", s.name, family.to_ascii_lowercase())),
                    namespace: Some(s.namespace.clone()),
                    labels: Some(BTreeMap::from([
                        (SERVICE_NAME_LABEL.to_owned(), s.name.clone()),
                        ("endpointslice.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
                    ])),
                    ..Default::default()
                },
                address_type: family.into(),
                endpoints,
                ports: Some(ports.clone()),
            });
        }
    }
    out
}

/// Writes the generated slices into the lab's policy directory and the services' names into every
/// pod's `/etc/hosts`. Run after the policy files change (`up`, `apply`).
pub(super) fn refresh(st: &LabState) -> anyhow::Result<()> {
    let paths = LabPaths::new(&st.name);
    let services = services_in(&paths.policies());
    let netns_of = |p: &Pod| st.nodes.iter().find(|n| n.name == p.node).map_or_else(String::new, |n| n.netns.clone());
    let mut yaml = String::from("# Written by `porin lab` from the services' selectors and the pods they select.\n");
    for s in endpoint_slices(&services, &st.pods, netns_of) {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(&s).context("write an EndpointSlice")?);
    }
    // Whole or not at all: an agent reading the directory meanwhile sees the old slices or the new.
    let slices = paths.policies().join(SLICES_FILE);
    let tmp = paths.dir.join(format!("{SLICES_FILE}.tmp"));
    std::fs::write(&tmp, yaml).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &slices).with_context(|| format!("rename {} to {}", tmp.display(), slices.display()))?;
    let hosts = super::net::hosts_file(&st.pods, &services);
    for p in &st.pods {
        let file = Path::new("/etc/netns").join(&p.netns).join("hosts");
        std::fs::write(&file, &hosts).with_context(|| format!("write {}", file.display()))?;
    }
    Ok(())
}
