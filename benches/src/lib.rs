//! Workload generators shared by Porin's benchmarks (kept out of the timed code).

use std::collections::BTreeMap;
use std::fmt::Write;

use policy_engine::http::{HttpRule, StrMatch};
use policy_engine::resolve::{Endpoint, Environment};

/// `n` method/path rules of an API allow-list: half literal paths, half regexes with a parameter.
pub fn http_rules(n: usize) -> Vec<HttpRule> {
    (0..n)
        .map(|i| HttpRule {
            method: Some(StrMatch::Regex(if i % 3 == 0 { "POST".into() } else { "GET|HEAD".into() })),
            path: Some(StrMatch::Regex(if i % 2 == 0 {
                format!("/api/v1/service{i}/items")
            } else {
                format!("/api/v1/service{i}/items/[0-9]+(\\?.*)?")
            })),
            ..Default::default()
        })
        .collect()
}

/// 100 endpoints in 5 namespaces.
pub fn environment(endpoints: usize) -> Environment {
    let mut env = Environment::default();
    for i in 0..endpoints {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), format!("svc{}", i % 50));
        labels.insert("tier".to_owned(), ["web", "api", "db"][i % 3].to_owned());
        env.endpoints.push(Endpoint {
            name: format!("pod{i}"),
            namespace: format!("ns{}", i % 5),
            labels,
            ips: vec![
                format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256 + 1).parse().unwrap_or([10, 0, 0, 1].into()),
            ],
            ..Default::default()
        });
    }
    env.fqdn_cache.insert("api.example.com.".into(), vec![[192, 0, 2, 10].into()]);
    env
}

/// `n` CiliumNetworkPolicies of mixed shapes (L3/L4, HTTP L7, CIDR, deny, toFQDNs with DNS), as YAML.
pub fn policies_yaml(n: usize) -> String {
    let mut out = String::new();
    for j in 0..n {
        let ns = j % 5;
        let app = j % 50;
        let peer = (j + 1) % 50;
        let port = 8000 + j % 100;
        let _ = write!(
            out,
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{j}, namespace: ns{ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: svc{app}}}}}\n"
        );
        match j % 4 {
            0 => {
                let _ = write!(
                    out,
                    "  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: svc{peer}}}}}]\n    toPorts:\n    - ports: [{{port: \"{port}\", protocol: TCP}}]\n      rules:\n        http:\n        - {{method: GET, path: \"/api/v1/items/[0-9]+\"}}\n        - {{method: POST, path: /api/v1/items}}\n        - {{method: GET, path: /healthz, headers: [\"X-Probe: true\"]}}\n"
                );
            }
            1 => {
                let _ = write!(
                    out,
                    "  ingress:\n  - fromEndpoints: [{{matchLabels: {{tier: web}}, matchExpressions: [{{key: app, operator: NotIn, values: [svc{peer}]}}]}}]\n    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}, {{port: \"9000\", endPort: 9100, protocol: ANY}}]}}]\n  ingressDeny:\n  - fromEntities: [world]\n"
                );
            }
            2 => {
                let _ = write!(
                    out,
                    "  egress:\n  - toCIDRSet: [{{cidr: 172.{}.0.0/16, except: [172.{}.1.0/24]}}]\n    toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n  - toEndpoints: [{{matchLabels: {{app: svc{peer}}}}}]\n",
                    16 + j % 16,
                    16 + j % 16
                );
            }
            _ => {
                let _ = write!(
                    out,
                    "  egress:\n  - toFQDNs: [{{matchPattern: \"*.example.com\"}}]\n    toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n  - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}}}]\n    toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      rules: {{dns: [{{matchPattern: \"*.example.com\"}}, {{matchName: svc{app}.internal}}]}}\n"
                );
            }
        }
    }
    out
}
