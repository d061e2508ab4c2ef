//! Which identities a policy peer selects: endpoints by labels, CIDRs (with except) and CIDR
//! groups, entities, services, and the prefixes that need identities of their own.

use super::*;

impl Resolver<'_> {
    pub(super) fn collect_prefixes(&mut self, policies: &[Policy]) -> Vec<IpNet> {
        let mut out = BTreeSet::new();
        for p in policies {
            for rule in &p.rules {
                for el in rule.ingress.iter().chain(&rule.egress) {
                    let Peers::List(peers) = &el.peers else { continue };
                    for peer in peers {
                        match peer {
                            Peer::Cidr { prefix, except } => {
                                out.insert(*prefix);
                                out.extend(except.iter().copied());
                            }
                            Peer::CidrGroup { group, except } => {
                                out.extend(self.groups(group).into_iter().flat_map(|g| g.cidrs.iter().copied()));
                                out.extend(except.iter().copied());
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        for svc in &self.env.services {
            out.extend(svc.backends.iter().map(|b| b.ip).filter(|ip| !self.endpoint_ips.contains(ip)).map(host_prefix));
        }
        // A /0 selects the world identities themselves; it needs no CIDR identity of its own.
        out.into_iter().filter(|p| p.prefix_len() > 0).collect()
    }

    pub(super) fn groups(&self, group: &CidrGroupRef) -> Vec<&CidrGroup> {
        self.cidr_groups
            .iter()
            .filter(|g| match group {
                CidrGroupRef::Name(n) => &g.name == n,
                CidrGroupRef::Selector(s) => s.matches(&g.labels),
            })
            .collect()
    }

    pub(super) fn origin(&mut self, policy_idx: usize, policy: &Policy, path: &str) -> OriginId {
        if let Some(id) = self.origin_ids.get(&(policy_idx, path.to_owned())) {
            return *id;
        }
        let id = OriginId(u32::try_from(self.origins.len()).unwrap_or(u32::MAX));
        self.origins.push(Origin { policy: policy.id.clone(), path: path.to_owned(), source: policy.source.clone() });
        self.origin_ids.insert((policy_idx, path.to_owned()), id);
        id
    }

    pub(super) fn select(&self, pred: impl Fn(&Identity) -> bool) -> PeerSet {
        PeerSet::Ids(self.identities.values().filter(|i| pred(i)).map(|i| i.id).collect::<Vec<_>>().into())
    }

    pub(super) fn select_labels(&self, sels: &[Selector]) -> PeerSet {
        self.select(|i| sels.iter().any(|s| s.matches(&i.labels)))
    }

    pub(super) fn cidr_set(&self, prefix: &IpNet, except: &[IpNet]) -> Vec<IdentityId> {
        let mut ids: Vec<IdentityId> = self
            .identities
            .values()
            .filter(|i| match &i.kind {
                IdentityKind::Cidr(p) => within(p, prefix) && !except.iter().any(|e| within(p, e)),
                _ => false,
            })
            .map(|i| i.id)
            .collect();
        if prefix.prefix_len() == 0 {
            ids.push(reserved::WORLD);
            ids.push(if prefix.addr().is_ipv4() { reserved::WORLD_IPV4 } else { reserved::WORLD_IPV6 });
        }
        ids
    }

    pub(super) fn peer_set(&mut self, peer: &Peer) -> PeerSet {
        if let Some(s) = self.peer_cache.get(peer) {
            return s.clone();
        }
        let set = match peer {
            Peer::Endpoints(sel) => self.select_labels(std::slice::from_ref(sel)),
            Peer::Entity(e) => self.entity_set(*e),
            Peer::Cidr { prefix, except } => ids(self.cidr_set(prefix, except)),
            Peer::CidrGroup { group, except } => {
                let groups = self.groups(group);
                let found = !groups.is_empty();
                let prefixes: Vec<IpNet> = groups.iter().flat_map(|g| g.cidrs.iter().copied()).collect();
                if !found {
                    self.warnings.insert(format!("CIDR group {group} is not defined: it selects nothing"));
                }
                ids(prefixes.iter().flat_map(|p| self.cidr_set(p, except)).collect())
            }
            // The selector's own identity: addresses the DNS proxy learns carry it (`crate::fqdn`).
            Peer::Fqdn(pattern) => ids(self.fqdn_ids.get(pattern).copied().into_iter().collect()),
            Peer::Service(svc) => self.service_set(svc),
        };
        self.peer_cache.insert(peer.clone(), set.clone());
        set
    }

    pub(super) fn cidr_identity(&self, p: &IpNet) -> Option<IdentityId> {
        self.identities.values().find(|i| i.kind == IdentityKind::Cidr(*p)).map(|i| i.id)
    }

    pub(super) fn entity_set(&self, e: Entity) -> PeerSet {
        let r = |names: &[&str]| names.iter().map(|n| Selector::reserved(n)).collect::<Vec<_>>();
        match e {
            Entity::All => PeerSet::All,
            Entity::None => PeerSet::Ids(Arc::from([])),
            Entity::World => self.select_labels(&r(&["world", "world-ipv4", "world-ipv6"])),
            Entity::WorldIpv4 => self.select_labels(&r(&["world-ipv4"])),
            Entity::WorldIpv6 => self.select_labels(&r(&["world-ipv6"])),
            Entity::Cluster | Entity::ClusterMesh => {
                let mut sels = r(&["host", "remote-node", "init", "ingress", "health", "unmanaged", "kube-apiserver"]);
                let cluster = LabelKey::k8s(labels::CLUSTER);
                sels.push(if e == Entity::Cluster {
                    Selector::new(vec![crate::selector::Requirement::In(cluster, vec![self.env.cluster.clone()])])
                } else {
                    Selector::new(vec![crate::selector::Requirement::Exists(cluster)])
                });
                self.select_labels(&sels)
            }
            Entity::Host => self.select_labels(&r(&["host"])),
            Entity::RemoteNode => self.select_labels(&r(&["remote-node"])),
            Entity::KubeApiserver => self.select_labels(&r(&["kube-apiserver"])),
            Entity::Health => self.select_labels(&r(&["health"])),
            Entity::Init => self.select_labels(&r(&["init"])),
            Entity::Unmanaged => self.select_labels(&r(&["unmanaged"])),
            Entity::Ingress => self.select_labels(&r(&["ingress"])),
        }
    }

    pub(super) fn service_set(&mut self, svc: &ServiceRef) -> PeerSet {
        let services: Vec<&Service> = self
            .env
            .services
            .iter()
            .filter(|s| match svc {
                ServiceRef::Name { namespace, name } => &s.namespace == namespace && &s.name == name,
                ServiceRef::Selector { namespace, selector } => {
                    namespace.as_ref().is_none_or(|ns| ns == &s.namespace)
                        && selector.matches(&Labels::new(
                            s.labels.iter().map(|(k, v)| Label::new(LabelKey::k8s(k.clone()), v.clone())),
                        ))
                }
            })
            .collect();
        if services.is_empty() {
            self.warnings.insert(format!("toServices: no service matches {svc}: it selects nothing"));
        }
        let mut out = Vec::new();
        for s in services {
            match &s.selector {
                Some(sel) => {
                    for ep in self.env.endpoints.iter().filter(|ep| ep.namespace == s.namespace) {
                        if sel.iter().all(|(k, v)| ep.labels.get(k) == Some(v)) {
                            out.extend(ep.ips.first().and_then(|ip| self.ip_identity.get(ip)).copied());
                        }
                    }
                }
                None => {
                    for ip in s.backends.iter().map(|b| b.ip).filter(|ip| !self.endpoint_ips.contains(ip)) {
                        out.extend(self.cidr_identity(&host_prefix(ip)));
                    }
                }
            }
        }
        ids(out)
    }
}
