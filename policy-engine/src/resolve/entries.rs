//! One endpoint's policy in one direction: the elements that select it, expanded into entries
//! (peers × protocol × ports → deny / allow / redirect), merged, with their L7 rules compiled.

use super::*;

impl Resolver<'_> {
    pub(super) fn direction(
        &mut self,
        policies: &[Policy],
        ep: &Endpoint,
        id_labels: &Labels,
        dir: Direction,
    ) -> DirectionPolicy {
        let mut out = DirectionPolicy::default();
        let mut merged: BTreeMap<EntryKey, Merged> = BTreeMap::new();
        for (pi, policy) in policies.iter().enumerate() {
            for rule in &policy.rules {
                let Subject::Endpoints(subject) = &rule.subject else { continue };
                if !subject.matches(id_labels) {
                    continue;
                }
                let rule_origin = self.origin(pi, policy, &rule.path);
                out.selected_by.push(rule_origin);
                if rule.default_deny(dir) {
                    out.enforced = true;
                    out.enforced_by.push(rule_origin);
                }
                for el in rule.elements(dir) {
                    let origin = self.origin(pi, policy, &el.path);
                    self.expand(el, ep, dir, rule.default_deny(dir), origin, &mut merged);
                }
            }
        }
        out.entries = self.finish(merged);
        out
    }

    /// Expands one element into raw entries, merged per (protocol, ports, selector, action).
    pub(super) fn expand(
        &mut self,
        el: &Element,
        ep: &Endpoint,
        dir: Direction,
        rule_default_deny: bool,
        origin: OriginId,
        merged: &mut BTreeMap<EntryKey, Merged>,
    ) {
        if el.action == Action::Allow && el.unsupported.is_some() {
            return;
        }
        let peers: Vec<(PeerKey, PeerSet)> = match &el.peers {
            Peers::All => vec![(PeerKey::All, PeerSet::All)],
            Peers::List(list) => list.iter().map(|p| (PeerKey::Peer(p.clone()), self.peer_set(p))).collect(),
        };
        // (proto, start, end, l7, named-port restriction)
        let mut l4: Vec<L4Item> = Vec::new();
        match &el.l4 {
            L4Spec::Any => l4.push((ProtoMatch::Any, 0, u16::MAX, L7Spec::None, None)),
            L4Spec::Icmp(types) => {
                for t in types {
                    let p = if t.family == IcmpFamily::V4 { Proto::Icmp } else { Proto::Icmpv6 };
                    l4.push((ProtoMatch::Only(p), u16::from(t.icmp_type), u16::from(t.icmp_type), L7Spec::None, None));
                }
            }
            L4Spec::Ports(rules) => {
                for pr in rules {
                    if el.action == Action::Allow && pr.unsupported.is_some() {
                        continue;
                    }
                    for pp in &pr.ports {
                        let extended;
                        let protos: &[Proto] = match pp.protocol {
                            Protocol::Tcp => &[Proto::Tcp],
                            Protocol::Udp => &[Proto::Udp],
                            Protocol::Sctp => &[Proto::Sctp],
                            Protocol::Any => &[Proto::Tcp, Proto::Udp, Proto::Sctp],
                            Protocol::Extended(e) => {
                                extended = [Proto::Other(e.number())];
                                &extended
                            }
                        };
                        for proto in protos {
                            match &pp.port {
                                PortSel::All => l4.push((ProtoMatch::Only(*proto), 0, u16::MAX, pr.l7.clone(), None)),
                                PortSel::Range(a, b) => {
                                    l4.push((ProtoMatch::Only(*proto), *a, *b, pr.l7.clone(), None))
                                }
                                PortSel::Named(name) => {
                                    l4.push((
                                        ProtoMatch::Only(*proto),
                                        0,
                                        0,
                                        pr.l7.clone(),
                                        Some((name.clone(), pp.protocol)),
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
        for (proto, start, end, l7, named) in l4 {
            let kinds: Vec<(ActionKind, &L7Spec)> = match (el.action, l7.parser()) {
                (Action::Deny, _) => vec![(ActionKind::Deny, &l7)],
                (Action::Allow, None) => vec![(ActionKind::Allow, &l7)],
                (Action::Allow, Some(p)) if rule_default_deny => vec![(ActionKind::Redirect(p), &l7)],
                // Cilium's ensureWildcard: L7 rules of a rule without default deny only add visibility.
                (Action::Allow, Some(p)) => vec![(ActionKind::Redirect(p), &l7), (ActionKind::Allow, &L7Spec::None)],
            };
            for (pkey, pset) in &peers {
                let targets: Vec<(PeerKey, PeerSet, u16, u16)> = match (&named, dir) {
                    (None, _) => vec![(pkey.clone(), pset.clone(), start, end)],
                    // Ingress: the port is the selected endpoint's own.
                    (Some((name, _)), Direction::Ingress) => ep
                        .named_ports
                        .iter()
                        .filter(|np| &np.name == name && proto.matches(np.protocol))
                        .map(|np| (pkey.clone(), pset.clone(), np.port, np.port))
                        .collect(),
                    (Some((name, _)), Direction::Egress) => self.egress_named_ports(name, proto, pset),
                };
                for (key, set, s, e) in targets {
                    for (kind, spec) in &kinds {
                        let m = merged.entry((proto, s, e, key.clone(), *kind)).or_default();
                        m.peers.get_or_insert_with(|| set.clone());
                        if !m.origins.contains(&origin) {
                            m.origins.push(origin);
                        }
                        m.auth |= el.auth_required;
                        match spec {
                            L7Spec::None => {}
                            L7Spec::Http(rules) if rules.is_empty() => m.http.push((HttpRuleSpec::default(), origin)),
                            L7Spec::Http(rules) => m.http.extend(rules.iter().map(|r| (r.clone(), origin))),
                            L7Spec::Kafka(rules) if rules.is_empty() => m.kafka.push((KafkaRule::any(), origin)),
                            L7Spec::Kafka(rules) => m.kafka.extend(rules.iter().map(|r| (r.clone(), origin))),
                            L7Spec::Dns(rules) if rules.is_empty() => {
                                m.dns.push((NamePattern::pattern_unchecked("*"), origin))
                            }
                            L7Spec::Dns(rules) => m.dns.extend(rules.iter().map(|r| (r.clone(), origin))),
                        }
                    }
                }
            }
        }
    }

    /// Resolves a named egress port against every peer endpoint (one entry per peer identity and port).
    pub(super) fn egress_named_ports(
        &self,
        name: &str,
        proto: ProtoMatch,
        peers: &PeerSet,
    ) -> Vec<(PeerKey, PeerSet, u16, u16)> {
        let mut out = Vec::new();
        for peer in &self.env.endpoints {
            let Some(id) = peer.ips.first().and_then(|ip| self.ip_identity.get(ip)).copied() else { continue };
            if !peers.contains(id) {
                continue;
            }
            for np in peer.named_ports.iter().filter(|np| np.name == name && proto.matches(np.protocol)) {
                let item = (PeerKey::Identity(id), ids(vec![id]), np.port, np.port);
                if !out.contains(&item) {
                    out.push(item);
                }
            }
        }
        out
    }

    pub(super) fn finish(&mut self, merged: BTreeMap<EntryKey, Merged>) -> Vec<PolicyEntry> {
        // Different parsers for the same selector and port cannot be merged (Cilium errors out).
        let mut parsers: BTreeMap<(ProtoMatch, u16, u16, PeerKey), BTreeSet<L7Parser>> = BTreeMap::new();
        for (proto, s, e, key, kind) in merged.keys() {
            if let ActionKind::Redirect(p) = kind {
                parsers.entry((*proto, *s, *e, key.clone())).or_default().insert(*p);
            }
        }
        let mut entries = Vec::with_capacity(merged.len());
        for ((proto, start, end, key, kind), m) in merged {
            let Some(peers) = m.peers.clone() else { continue };
            let action = match kind {
                ActionKind::Deny => EntryAction::Deny,
                ActionKind::Allow => EntryAction::Allow,
                ActionKind::Redirect(parser) => {
                    if parsers.get(&(proto, start, end, key.clone())).is_some_and(|set| set.len() > 1) {
                        let origins =
                            m.origins.iter().filter_map(|o| self.origins.get(o.0 as usize).cloned()).collect();
                        self.errors.push(ResolveError {
                            message: format!("cannot merge conflicting L7 parsers on port {start}-{end}/{proto:?}: the port rule allows nothing"),
                            origins,
                        });
                        continue;
                    }
                    match self.compile(parser, &m) {
                        Some(a) => a,
                        None => continue,
                    }
                }
            };
            entries.push(PolicyEntry {
                peers,
                proto,
                port_start: start,
                port_end: end,
                action,
                origins: m.origins,
                auth: m.auth,
            });
        }
        entries
    }

    pub(super) fn compile(&mut self, parser: L7Parser, m: &Merged) -> Option<EntryAction> {
        let (rules, rule_origins): (L7Set, Vec<OriginId>) = match parser {
            L7Parser::Http => {
                let specs: Vec<HttpRule> = m.http.iter().map(|(s, _)| s.to_rule(self.env)).collect();
                let set = match self.http_cache.get(&specs) {
                    Some(s) => s.clone(),
                    None => {
                        let compiled = match HttpRuleSet::compile(specs.clone()) {
                            Ok(s) => Some(Arc::new(s)),
                            Err(e) => {
                                let origins =
                                    m.origins.iter().filter_map(|o| self.origins.get(o.0 as usize).cloned()).collect();
                                self.errors.push(ResolveError {
                                    message: format!("{e}: the port rule allows nothing"),
                                    origins,
                                });
                                None
                            }
                        };
                        self.http_cache.insert(specs, compiled.clone());
                        compiled
                    }
                };
                (L7Set::Http(set?), m.http.iter().map(|(_, o)| *o).collect())
            }
            L7Parser::Kafka => {
                let set = KafkaRuleSet::new(m.kafka.iter().map(|(r, _)| r.clone()).collect());
                (L7Set::Kafka(Arc::new(set)), m.kafka.iter().map(|(_, o)| *o).collect())
            }
            L7Parser::Dns => {
                let set = DnsRuleSet::new(m.dns.iter().map(|(r, _)| r.clone()).collect());
                (L7Set::Dns(Arc::new(set)), m.dns.iter().map(|(_, o)| *o).collect())
            }
        };
        Some(EntryAction::Redirect { rules, rule_origins: rule_origins.into() })
    }
}
