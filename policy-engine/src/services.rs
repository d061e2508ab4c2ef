//! Kubernetes services: a `Service` (v1) and the `EndpointSlice`s (discovery.k8s.io/v1) that list
//! its backends, read as users `kubectl apply` them and joined into one [`Service`]. Policy reads it
//! (`toServices` selects the backends), the kernel balances connections to its cluster IPs, and the
//! proxy balances the requests of proxied flows over the same backends.
//!
//! What is read: `spec.clusterIP(s)` (`None`: headless, nothing to balance), `spec.ports` (`port`,
//! `protocol`, `name`, `targetPort`), `spec.selector`, `spec.sessionAffinity: ClientIP` with its
//! timeout (default 10800 s, as Kubernetes). From slices: the `kubernetes.io/service-name` label,
//! `addressType` (`FQDN` slices are not balanced), endpoints' first address, `conditions`
//! (`ready` absent = ready; a terminating endpoint gets no new connections) and `nodeName`, and the
//! slice's `ports`, matched to the service's ports by name.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use crate::snapshot::Proto;

/// The label naming an EndpointSlice's service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The annotation that opts a service into per-request balancing in the proxy (Cilium's).
pub const LB_L7_ANNOTATION: &str = "service.cilium.io/lb-l7";
/// ClientIP affinity's timeout when the service gives none (Kubernetes' default).
pub const DEFAULT_AFFINITY_SECS: u32 = 10_800;

/// A service with its backends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service labels (for `k8sServiceSelector`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Pod selector; none for services whose slices are written by hand (external backends).
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    /// Cluster IPs, at most one per family; none for a headless service.
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `ClientIP` session affinity: its timeout in seconds.
    #[serde(default)]
    pub affinity_secs: Option<u32>,
    /// Backends, from the service's EndpointSlices.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Requests of proxied flows to it are balanced per request ([`LB_L7_ANNOTATION`]`: enabled`).
    #[serde(default)]
    pub l7_balancing: bool,
}

/// A port of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Name (empty for the single unnamed port).
    pub name: String,
    /// Transport.
    pub protocol: Proto,
    /// The port on the cluster IPs.
    pub port: u16,
    /// The backends' port (what a slice controller writes into the slices).
    pub target: TargetPort,
}

/// A service port's `targetPort`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    /// A number.
    Number(u16),
    /// A named container port.
    Name(String),
}

/// A backend of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Address.
    pub ip: IpAddr,
    /// Its ports (from its slice), by service port name.
    pub ports: Vec<BackendPort>,
    /// Ready for new connections (ready and not terminating).
    pub ready: bool,
    /// The node it runs on.
    #[serde(default)]
    pub node: Option<String>,
}

/// A port of a backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendPort {
    /// The service port it serves (by name).
    pub name: String,
    /// Transport.
    pub protocol: Proto,
    /// Number.
    pub port: u16,
}

impl Service {
    /// The backends serving `port` that take new connections: address and backend port.
    pub fn backends_of<'a>(&'a self, port: &'a ServicePort) -> impl Iterator<Item = (IpAddr, u16)> + 'a {
        self.backends.iter().filter(|b| b.ready).filter_map(move |b| {
            b.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol).map(|p| (b.ip, p.port))
        })
    }
}

/// A `Service` document, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDef {
    /// The service (no backends yet).
    pub service: Service,
}

/// An `EndpointSlice` document, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceDef {
    /// Slice name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The service it belongs to.
    pub service: String,
    /// Its endpoints (with the slice's ports).
    pub backends: Vec<Backend>,
}

/// A problem in a document: the field path and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Field path (`spec.ports[0].port`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { path: path.into(), message: message.into() }
}

fn port_number(v: i32, path: &str) -> Result<u16, FieldError> {
    u16::try_from(v).ok().filter(|p| *p > 0).ok_or_else(|| err(path, format!("{v} is not a port (1-65535)")))
}

fn protocol(p: Option<&str>, path: &str) -> Result<Proto, FieldError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Proto::Tcp),
        "UDP" => Ok(Proto::Udp),
        "SCTP" => Ok(Proto::Sctp),
        other => Err(err(path, format!("unsupported protocol {other:?}: TCP, UDP or SCTP"))),
    }
}

/// Reads a `Service` in `namespace` (its own, or the default one).
pub fn service_def(svc: &core::Service, namespace: &str) -> Result<ServiceDef, FieldError> {
    let name = svc.metadata.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| err("metadata.name", "required"))?;
    let spec = svc.spec.clone().unwrap_or_default();
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(kind, "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") {
        return Err(err(
            "spec.type",
            format!("unknown type {kind:?}: ClusterIP, NodePort, LoadBalancer or ExternalName"),
        ));
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    let listed: Vec<(String, &str)> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => {
            ips.iter().enumerate().map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str())).collect()
        }
        (_, Some(ip)) => vec![("spec.clusterIP".to_owned(), ip.as_str())],
        _ => vec![],
    };
    if let (Some(ips), Some(ip)) = (&spec.cluster_ips, &spec.cluster_ip)
        && ips.first().is_some_and(|first| first != ip)
    {
        return Err(err("spec.clusterIPs[0]", format!("must equal spec.clusterIP ({ip})")));
    }
    for (path, text) in listed {
        if text == "None" || text.is_empty() {
            continue;
        }
        let ip: IpAddr = text.parse().map_err(|_| err(&path, format!("{text:?} is not an IP address")))?;
        if cluster_ips.iter().any(|have| have.is_ipv4() == ip.is_ipv4()) {
            return Err(err(&path, "at most one cluster IP per family"));
        }
        cluster_ips.push(ip);
    }
    if kind == "ExternalName" {
        cluster_ips.clear();
    }
    let mut ports = Vec::new();
    let all = spec.ports.as_deref().unwrap_or_default();
    for (i, p) in all.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let name = p.name.clone().unwrap_or_default();
        if all.len() > 1 && name.is_empty() {
            return Err(err(format!("{path}.name"), "required when a service has more than one port"));
        }
        let protocol = protocol(p.protocol.as_deref(), &format!("{path}.protocol"))?;
        let port = port_number(p.port, &format!("{path}.port"))?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n, &format!("{path}.targetPort"))?),
            Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
        };
        let new = ServicePort { name, protocol, port, target };
        if ports.iter().any(|q: &ServicePort| q.name == new.name) {
            return Err(err(format!("{path}.name"), format!("duplicate port name {:?}", new.name)));
        }
        if ports.iter().any(|q: &ServicePort| q.port == new.port && q.protocol == new.protocol) {
            return Err(err(format!("{path}.port"), format!("duplicate port {}/{}", new.port, new.protocol)));
        }
        ports.push(new);
    }
    let affinity_secs = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_SECS),
                Some(t @ 1..=86_400) => Some(t.unsigned_abs()),
                Some(t) => {
                    return Err(err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t}: must be 1-86400"),
                    ));
                }
            }
        }
        other => return Err(err("spec.sessionAffinity", format!("unknown affinity {other:?}: None or ClientIP"))),
    };
    Ok(ServiceDef {
        service: Service {
            name,
            namespace: svc.metadata.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
            labels: svc.metadata.labels.clone().unwrap_or_default(),
            selector: spec.selector.clone().filter(|s| !s.is_empty()),
            cluster_ips,
            ports,
            affinity_secs,
            backends: vec![],
            l7_balancing: svc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LB_L7_ANNOTATION))
                .is_some_and(|v| v == "enabled"),
        },
    })
}

/// Reads an `EndpointSlice` in `namespace` (its own, or the default one). `Ok(None)` for an FQDN
/// slice (nothing to balance to).
pub fn slice_def(slice: &discovery::EndpointSlice, namespace: &str) -> Result<Option<SliceDef>, FieldError> {
    let name = slice.metadata.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| err("metadata.name", "required"))?;
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| err("metadata.labels", format!("{SERVICE_NAME_LABEL} is required: it names the service")))?;
    let v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => return Ok(None),
        other => return Err(err("addressType", format!("unknown address type {other:?}: IPv4, IPv6 or FQDN"))),
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let path = format!("ports[{i}]");
        let Some(n) = p.port else { continue };
        ports.push(BackendPort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_deref(), &format!("{path}.protocol"))?,
            port: port_number(n, &format!("{path}.port"))?,
        });
    }
    let mut backends = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        let path = format!("endpoints[{i}].addresses[0]");
        let text = e.addresses.first().ok_or_else(|| err(&path, "required"))?;
        let ip: IpAddr = text.parse().map_err(|_| err(&path, format!("{text:?} is not an IP address")))?;
        if ip.is_ipv4() != v4 {
            return Err(err(&path, format!("{ip} is not of addressType {}", slice.address_type)));
        }
        let c = e.conditions.clone().unwrap_or_default();
        backends.push(Backend {
            ip,
            ports: ports.clone(),
            ready: c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false),
            node: e.node_name.clone(),
        });
    }
    Ok(Some(SliceDef {
        name,
        namespace: slice.metadata.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
        service,
        backends,
    }))
}

/// Joins services and their slices. Returns the services (in order, one per namespace/name: a
/// later definition replaces an earlier one) and a warning per slice whose service is not defined
/// and per frontend (cluster IP, port, protocol) a service shares with one before it (Kubernetes
/// never allocates one twice: the first, in namespace/name order, keeps it).
pub fn join(services: &[ServiceDef], slices: &[SliceDef]) -> (Vec<Service>, Vec<String>) {
    let mut by_name: BTreeMap<(&str, &str), Service> = BTreeMap::new();
    for d in services {
        by_name.insert((&d.service.namespace, &d.service.name), d.service.clone());
    }
    let mut warnings = Vec::new();
    for s in slices {
        match by_name.get_mut(&(s.namespace.as_str(), s.service.as_str())) {
            Some(svc) => {
                for b in &s.backends {
                    match svc.backends.iter_mut().find(|have| have.ip == b.ip) {
                        // One address in two slices (one per port set): its ports add up.
                        Some(have) => {
                            for p in &b.ports {
                                if !have.ports.contains(p) {
                                    have.ports.push(p.clone());
                                }
                            }
                            have.ready &= b.ready;
                        }
                        None => svc.backends.push(b.clone()),
                    }
                }
            }
            None => warnings.push(format!(
                "EndpointSlice {}/{}: service {}/{} is not defined: its endpoints are not used",
                s.namespace, s.name, s.namespace, s.service
            )),
        }
    }
    let services: Vec<Service> = by_name.into_values().collect();
    let mut frontends: BTreeMap<(Proto, IpAddr, u16), (&str, &str)> = BTreeMap::new();
    for s in &services {
        for ip in &s.cluster_ips {
            for p in &s.ports {
                let key = (p.protocol, *ip, p.port);
                match frontends.get(&key) {
                    Some((ns, name)) => warnings.push(format!(
                        "Service {}/{}: {} port {}/{} is already service {ns}/{name}'s: connects to it go to {ns}/{name}",
                        s.namespace, s.name, ip, p.port, p.protocol
                    )),
                    None => {
                        frontends.insert(key, (&s.namespace, &s.name));
                    }
                }
            }
        }
    }
    (services, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Result<ServiceDef, FieldError> {
        service_def(&serde_yaml::from_str(yaml).unwrap(), "default")
    }

    fn slice(yaml: &str) -> Result<Option<SliceDef>, FieldError> {
        slice_def(&serde_yaml::from_str(yaml).unwrap(), "default")
    }

    const DEATHSTAR: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: deathstar, labels: {app: ds}}\nspec:\n  clusterIPs: [10.96.0.10, 'fd00:96::10']\n  selector: {org: empire, class: deathstar}\n  sessionAffinity: ClientIP\n  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]\n";

    #[test]
    fn a_service_with_two_families_two_ports_and_affinity() {
        let s = service(DEATHSTAR).unwrap().service;
        assert_eq!(s.namespace, "default");
        assert_eq!(s.cluster_ips, ["10.96.0.10".parse::<IpAddr>().unwrap(), "fd00:96::10".parse().unwrap()]);
        assert_eq!(s.affinity_secs, Some(DEFAULT_AFFINITY_SECS));
        assert_eq!(
            s.ports[0],
            ServicePort { name: "http".into(), protocol: Proto::Tcp, port: 80, target: TargetPort::Number(8080) }
        );
        assert_eq!(s.ports[1].target, TargetPort::Number(53));
        assert_eq!(s.ports[1].protocol, Proto::Udp);
    }

    #[test]
    fn bad_services_name_the_field() {
        let e = |y: &str| service(y).map(|_| ()).unwrap_err();
        let base = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n";
        assert_eq!(e(&format!("{base}  ports: [{{port: 0}}]\n")).path, "spec.ports[0].port");
        assert_eq!(e(&format!("{base}  ports: [{{port: 1}}, {{port: 2}}]\n")).path, "spec.ports[0].name");
        assert_eq!(e(&format!("{base}  clusterIP: 10.0.0.300\n")).path, "spec.clusterIP");
        assert_eq!(e(&format!("{base}  clusterIPs: [10.0.0.1, 10.0.0.2]\n")).path, "spec.clusterIPs[1]");
        assert_eq!(e(&format!("{base}  ports: [{{port: 1, protocol: HTTP}}]\n")).path, "spec.ports[0].protocol");
        assert_eq!(
            e(&format!(
                "{base}  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 0}}}}\n"
            ))
            .path,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
        assert_eq!(e("apiVersion: v1\nkind: Service\nmetadata: {}\n").path, "metadata.name");
        let headless = service(&format!("{base}  clusterIP: None\n")).unwrap().service;
        assert!(headless.cluster_ips.is_empty());
    }

    #[test]
    fn slices_join_their_service_by_label_and_terminating_backends_take_nothing_new() {
        let svc = service(DEATHSTAR).unwrap();
        let v4 = slice("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ds-1, labels: {kubernetes.io/service-name: deathstar}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [10.244.0.10]\n  nodeName: node1\n- addresses: [10.244.1.10]\n  conditions: {ready: false, terminating: true}\n").unwrap().unwrap();
        let orphan = slice("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x-1, labels: {kubernetes.io/service-name: x}}\naddressType: IPv4\nendpoints: []\n").unwrap().unwrap();
        let (services, warnings) = join(&[svc], &[v4, orphan]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let s = &services[0];
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[0].node.as_deref(), Some("node1"));
        let http = s.ports[0].clone();
        assert_eq!(s.backends_of(&http).collect::<Vec<_>>(), [("10.244.0.10".parse().unwrap(), 8080)]);
        assert_eq!(s.backends_of(&s.ports[1]).count(), 0, "no slice port named dns");
    }

    #[test]
    fn a_cluster_ip_and_port_two_services_claim_stays_the_first_and_is_named() {
        let first = service(DEATHSTAR).unwrap();
        let second =
            service(&DEATHSTAR.replace("name: deathstar", "name: rebel-base").replace(", 'fd00:96::10'", "")).unwrap();
        let (services, warnings) = join(&[second, first], &[]);
        assert_eq!(services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["deathstar", "rebel-base"]);
        assert_eq!(
            warnings,
            [
                "Service default/rebel-base: 10.96.0.10 port 80/TCP is already service default/deathstar's: connects to it go to default/deathstar",
                "Service default/rebel-base: 10.96.0.10 port 53/UDP is already service default/deathstar's: connects to it go to default/deathstar",
            ]
        );
    }

    #[test]
    fn bad_slices_name_the_field() {
        let e = |y: &str| slice(y).map(|_| ()).unwrap_err();
        let meta = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, labels: {kubernetes.io/service-name: s}}\n";
        assert_eq!(
            e("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1}\naddressType: IPv4\nendpoints: []\n").path,
            "metadata.labels"
        );
        assert_eq!(
            e(&format!("{meta}addressType: IPv6\nendpoints: [{{addresses: [10.0.0.1]}}]\n")).path,
            "endpoints[0].addresses[0]"
        );
        assert_eq!(
            e(&format!("{meta}addressType: IPv4\nendpoints: [{{addresses: []}}]\n")).path,
            "endpoints[0].addresses[0]"
        );
        assert_eq!(
            e(&format!("{meta}addressType: IPv4\nports: [{{port: 70000}}]\nendpoints: []\n")).path,
            "ports[0].port"
        );
        assert!(
            slice(&format!("{meta}addressType: FQDN\nendpoints: [{{addresses: [a.example]}}]\n")).unwrap().is_none()
        );
    }

    /// Through the loader: services and slices beside policies, errors naming document and field,
    /// and `toServices` with `toPorts` (as current Cilium allows) judging the backends.
    #[test]
    fn services_load_beside_policies_and_to_services_takes_ports() {
        use crate::api::{LoadOptions, load_str};
        let text = format!(
            "{DEATHSTAR}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ds-1, labels: {{kubernetes.io/service-name: deathstar}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.244.0.10]}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: broken}}\nspec: {{ports: [{{port: 99999}}]}}\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toServices: [{{k8sService: {{serviceName: deathstar}}}}]\n    toPorts: [{{ports: [{{port: '8080'}}]}}]\n"
        );
        let loaded = load_str("s.yaml", &text, &LoadOptions::default());
        assert_eq!(loaded.policies.len(), 1);
        assert_eq!(
            loaded.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["s.yaml: document 3 (Service default/broken): spec.ports[0].port: 99999 is not a port (1-65535)"]
        );
        let (services, warnings) = loaded.services();
        assert!(warnings.is_empty());
        assert_eq!(services[0].backends[0].ip, "10.244.0.10".parse::<IpAddr>().unwrap());
    }
}
