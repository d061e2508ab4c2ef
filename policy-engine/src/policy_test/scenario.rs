//! Policies and endpoints resolved into a snapshot, and the parties a flow names.

use super::*;

// === scenario: policies + environment → snapshot ===

/// Policies and endpoints resolved into a snapshot, ready to evaluate flows.
#[derive(Debug)]
pub struct Scenario {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// The environment it was resolved from.
    pub env: Environment,
    names: BTreeMap<String, usize>,
    /// Warnings (features enforced fail-closed).
    pub warnings: Vec<String>,
    /// What the DNS proxy learned, as the test file says (names never expire).
    pub(super) fqdn: crate::fqdn::FqdnCache,
    /// Documents of other kinds that were skipped ([`LoadOptions::skip_other_kinds`]).
    pub skipped: Vec<api::OtherObject>,
}

/// Builds scenarios from policy files, test files and ad-hoc endpoints.
#[derive(Debug, Default)]
pub struct ScenarioBuilder {
    opts: LoadOptions,
    loaded: Loaded,
    env: Environment,
    names: BTreeMap<String, usize>,
    errors: Vec<String>,
}

impl ScenarioBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder that reads policy files with `opts`.
    pub fn with_options(opts: LoadOptions) -> Self {
        Self { opts, ..Self::default() }
    }

    /// Adds the policies of a YAML file.
    pub fn policy_file(&mut self, path: &Path) -> &mut Self {
        self.loaded.extend(api::load_file(path, &self.opts));
        self
    }

    /// Adds the policies in YAML text (`name` is used in error messages).
    pub fn policy_text(&mut self, name: &str, text: &str) -> &mut Self {
        self.loaded.extend(api::load_str(name, text, &self.opts));
        self
    }

    /// Sets a secret value (`namespace/name`).
    pub fn secret(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.secrets.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Records what the DNS proxy learned for a name.
    pub fn fqdn(&mut self, name: &str, ips: Vec<IpAddr>) -> &mut Self {
        self.env.fqdn_cache.insert(normalize_name(name), ips);
        self
    }

    /// Adds the policies and the environment of a parsed test file; `base` is its directory.
    pub fn test_file(&mut self, file_name: &str, tf: &TestFile, base: &Path) -> &mut Self {
        if tf.version != 1 {
            self.errors.push(format!("{file_name}: version: unsupported version {} (expected 1)", tf.version));
        }
        for (i, src) in tf.policies.iter().enumerate() {
            match (&src.file, &src.inline) {
                (Some(f), None) => {
                    self.loaded.extend(api::load_file(&base.join(f), &self.opts));
                }
                (None, Some(text)) => {
                    let name = format!("{file_name}: policies[{i}].inline");
                    self.loaded.extend(api::load_str(&name, text, &self.opts));
                }
                _ => self.errors.push(format!("{file_name}: policies[{i}]: exactly one of file or inline is required")),
            }
        }
        for (name, def) in &tf.endpoints {
            self.endpoint(
                name,
                Endpoint {
                    name: name.clone(),
                    namespace: def.namespace.clone().unwrap_or_else(|| "default".into()),
                    labels: def.labels.clone(),
                    ips: def.ip.into_iter().collect(),
                    ..Default::default()
                },
            );
        }
        for (ns, def) in &tf.namespaces {
            self.env.namespace_labels.insert(ns.clone(), def.labels.clone());
        }
        for (name, ips) in &tf.fqdn_cache {
            self.env.fqdn_cache.insert(normalize_name(name), ips.clone());
        }
        self.env.secrets.extend(tf.secrets.clone());
        self
    }

    /// Adds an endpoint known by `name` in cases.
    pub fn endpoint(&mut self, name: &str, ep: Endpoint) -> &mut Self {
        match self.names.get(name) {
            Some(_) => self.errors.push(format!("endpoint {name:?} is defined twice")),
            None => {
                self.names.insert(name.to_owned(), self.env.endpoints.len());
                self.env.endpoints.push(ep);
            }
        }
        self
    }

    /// Resolves. Fails with every error (invalid policies, conflicting L7 parsers, bad definitions).
    pub fn build(self) -> Result<Scenario, Vec<String>> {
        let mut errors = self.errors;
        errors.extend(self.loaded.errors.iter().map(ToString::to_string));
        if !self.opts.skip_other_kinds && !self.loaded.other_objects.is_empty() {
            errors.push(api::OtherObject::hint(self.loaded.other_objects.len()));
        }
        let snapshot = resolve(&self.loaded.policies, &self.loaded.cidr_groups, &self.env, &mut Default::default(), 1);
        errors.extend(snapshot.errors.iter().map(ToString::to_string));
        if !errors.is_empty() {
            return Err(errors);
        }
        let warnings = snapshot.warnings.clone();
        let skipped = self.loaded.other_objects;
        let fqdn = crate::fqdn::FqdnCache::fixed(&self.env.fqdn_cache);
        Ok(Scenario { snapshot, env: self.env, names: self.names, warnings, fqdn, skipped })
    }
}

/// One side of a flow.
#[derive(Debug, Clone)]
pub(super) enum Party {
    Endpoint(usize),
    Ip(IpAddr),
    Identity(IdentityId, String),
}

impl Scenario {
    pub(super) fn party(&self, s: &str) -> Result<Vec<Party>, String> {
        if let Some(ip) = s.strip_prefix("cidr:") {
            let ip: IpAddr =
                ip.split('/').next().unwrap_or("").parse().map_err(|e| format!("{s:?}: not an address: {e}"))?;
            return Ok(vec![Party::Ip(ip)]);
        }
        if let Some(name) = s.strip_prefix("entity:") {
            let id = reserved::by_name(name).ok_or_else(|| {
                format!("{s:?}: unknown entity (host, world, world-ipv4, world-ipv6, remote-node, kube-apiserver, health, init, unmanaged, ingress)")
            })?;
            return Ok(vec![Party::Identity(id, format!("entity:{name}"))]);
        }
        if let Some(name) = s.strip_prefix("fqdn:") {
            let ips = self
                .env
                .fqdn_cache
                .get(&normalize_name(name))
                .ok_or_else(|| format!("{s:?}: the name is not in fqdn_cache"))?;
            if ips.is_empty() {
                return Err(format!("{s:?}: fqdn_cache has no address for it"));
            }
            return Ok(ips.iter().map(|ip| Party::Ip(*ip)).collect());
        }
        match self.names.get(s) {
            Some(i) => Ok(vec![Party::Endpoint(*i)]),
            None => Err(format!("{s:?}: no such endpoint (use an endpoint name, cidr:IP, entity:NAME or fqdn:NAME)")),
        }
    }

    pub(super) fn endpoint_policy(&self, i: usize) -> Option<&EndpointPolicy> {
        let ep = self.env.endpoints.get(i)?;
        self.snapshot.endpoint(&ep.namespace, &ep.name)
    }

    /// The FQDN selector identities of a party's address (from the names in `fqdn_cache`).
    pub(super) fn fqdn_identities(&self, p: &Party) -> Vec<IdentityId> {
        match p {
            Party::Ip(ip) => self.snapshot.fqdn().identities_of(self.fqdn.names_of(*ip)),
            _ => Vec::new(),
        }
    }

    pub(super) fn identity(&self, p: &Party) -> IdentityId {
        match p {
            Party::Endpoint(i) => self.endpoint_policy(*i).map_or(reserved::UNKNOWN, |e| e.identity),
            Party::Ip(ip) => self.snapshot.identity_of(*ip),
            Party::Identity(id, _) => *id,
        }
    }

    pub(super) fn party_name(&self, p: &Party) -> String {
        match p {
            Party::Endpoint(i) => {
                self.env.endpoints.get(*i).map_or_else(String::new, |e| format!("{}/{}", e.namespace, e.name))
            }
            Party::Ip(ip) => {
                let fqdn = self.fqdn_identities(p);
                if fqdn.is_empty() {
                    format!("{ip} (identity {})", self.snapshot.identity_of(*ip))
                } else {
                    let names: Vec<String> = fqdn
                        .iter()
                        .filter_map(|id| self.snapshot.identity(*id))
                        .flat_map(|i| i.labels.iter().map(ToString::to_string).collect::<Vec<_>>())
                        .collect();
                    format!("{ip} (identity {}; FQDN selectors {})", self.snapshot.identity_of(*ip), names.join(", "))
                }
            }
            Party::Identity(id, n) => format!("{n} (identity {id})"),
        }
    }

    pub(super) fn origin_name(&self, o: OriginId) -> (String, String) {
        match self.snapshot.origin(o) {
            Some(origin) => (origin.policy.to_string(), format!("{} {}", origin.policy, origin.path)),
            None => (String::new(), String::new()),
        }
    }
}
