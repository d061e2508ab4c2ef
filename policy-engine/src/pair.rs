//! The L3/L4 verdict on a flow between two peers, composed once for user space: the source
//! endpoint's egress policy (when the source is a local endpoint) and the destination endpoint's
//! ingress policy (when the destination is one) each judge the flow; a drop on either side is
//! final (egress is asked first); otherwise every side that redirects judges each request with its
//! L7 rules, and a side that allows at L3/L4 allows every request.
//!
//! The proxy ([`PairVerdict`] per connection) and `porin policy test` both take the verdict from
//! here. The kernel composes the same rule in `redirect_common::datapath` (it must: it runs there),
//! from the map form `agent::mapstate` writes, which a property test holds equal to
//! [`crate::snapshot::DirectionPolicy::l4_verdict`].

use crate::identity::IdentityId;
use crate::model::Direction;
use crate::snapshot::{DropReason, EndpointPolicy, L4Verdict, L7Policy, Proto};

/// One side's say on a flow.
#[derive(Clone, Debug)]
pub struct SideVerdict<'s> {
    /// Egress (the source's policy) or ingress (the destination's).
    pub direction: Direction,
    /// The endpoint whose policy it is.
    pub endpoint: &'s EndpointPolicy,
    /// The identity at the other end, as this side sees it.
    pub peer: IdentityId,
    /// The verdict of its policy.
    pub verdict: L4Verdict,
    /// What it allows must come authenticated (`authentication: {mode: required}`).
    pub auth_required: bool,
}

/// Both sides' verdicts on one flow.
#[derive(Clone, Debug)]
pub struct PairVerdict<'s> {
    /// The source endpoint's egress verdict (none when the source is no local endpoint).
    pub egress: Option<SideVerdict<'s>>,
    /// The destination endpoint's ingress verdict (none when the destination is no local endpoint).
    pub ingress: Option<SideVerdict<'s>>,
}

/// An end of a flow: its identity, and its endpoint's policy when it is a local endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'s> {
    /// Security identity.
    pub identity: IdentityId,
    /// FQDN selector identities of its address (the names the DNS proxy learned it under,
    /// [`crate::fqdn`]); empty for endpoints and unnamed addresses.
    pub fqdn: &'s [IdentityId],
    /// The endpoint's policy, for a local endpoint.
    pub endpoint: Option<&'s EndpointPolicy>,
}

impl<'s> Peer<'s> {
    /// A peer known by its identity alone.
    pub fn new(identity: IdentityId, endpoint: Option<&'s EndpointPolicy>) -> Self {
        Self { identity, fqdn: &[], endpoint }
    }
}

impl<'s> PairVerdict<'s> {
    /// Judges a flow from `src` to `dst` on `proto`/`port` (ICMP: the type).
    pub fn judge(src: Peer<'s>, dst: Peer<'s>, proto: Proto, port: u16) -> Self {
        let side = |direction: Direction, ep: Option<&'s EndpointPolicy>, peer: &Peer<'s>| {
            ep.map(|endpoint| {
                let mut ids = smallvec::SmallVec::<[IdentityId; 4]>::new();
                ids.push(peer.identity);
                ids.extend_from_slice(peer.fqdn);
                SideVerdict {
                    direction,
                    endpoint,
                    peer: peer.identity,
                    verdict: endpoint.direction(direction).l4_verdict_for(&ids, proto, port),
                    auth_required: endpoint.direction(direction).auth_required_for(&ids, proto, port),
                }
            })
        };
        Self {
            egress: side(Direction::Egress, src.endpoint, &dst),
            ingress: side(Direction::Ingress, dst.endpoint, &src),
        }
    }

    /// The sides that have a say, egress first.
    pub fn sides(&self) -> impl DoubleEndedIterator<Item = &SideVerdict<'s>> {
        self.egress.iter().chain(self.ingress.iter())
    }

    /// The side that drops the flow, and why (egress first); `None`: the flow passes L3/L4.
    pub fn drop(&self) -> Option<(&SideVerdict<'s>, &DropReason)> {
        self.sides().find_map(|s| match &s.verdict {
            L4Verdict::Drop(r) => Some((s, r)),
            _ => None,
        })
    }

    /// The L7 rules a side judges requests with (none: that side allows every request, or has no
    /// say, or drops).
    pub fn l7(&self, direction: Direction) -> Option<&L7Policy> {
        let side = match direction {
            Direction::Egress => self.egress.as_ref(),
            Direction::Ingress => self.ingress.as_ref(),
        }?;
        match &side.verdict {
            L4Verdict::Redirect(p) => Some(p),
            _ => None,
        }
    }

    /// Whether any side sends the flow to the proxy.
    pub fn redirected(&self) -> bool {
        self.l7(Direction::Egress).is_some() || self.l7(Direction::Ingress).is_some()
    }

    /// The direction the flow is reported under (as the kernel reports it): ingress when the
    /// destination redirects, or when it is an endpoint and the source does not redirect; else
    /// egress.
    pub fn reported_direction(&self) -> Direction {
        let ingress_redirects = self.l7(Direction::Ingress).is_some();
        let egress_redirects = self.l7(Direction::Egress).is_some();
        if ingress_redirects || (self.ingress.is_some() && !egress_redirects) {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LoadOptions, load_str};
    use crate::identity::IdentityAllocator;
    use crate::resolve::{Endpoint, Environment, resolve};

    fn snapshot(policy: &str) -> crate::snapshot::Snapshot {
        let loaded = load_str("p.yaml", policy, &LoadOptions::default());
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let ep = |name: &str, ip: &str| Endpoint {
            name: name.into(),
            namespace: "default".into(),
            labels: [("app".to_owned(), name.to_owned())].into_iter().collect(),
            ips: vec![ip.parse().unwrap()],
            ..Endpoint::default()
        };
        let env = Environment {
            endpoints: vec![ep("client", "10.0.0.1"), ep("server", "10.0.0.2")],
            ..Environment::default()
        };
        resolve(&loaded.policies, &loaded.cidr_groups, &env, &mut IdentityAllocator::new(), 1)
    }

    fn peers(s: &crate::snapshot::Snapshot) -> (Peer<'_>, Peer<'_>) {
        let c = s.endpoint("default", "client").unwrap();
        let d = s.endpoint("default", "server").unwrap();
        (Peer::new(c.identity, Some(c)), Peer::new(d.identity, Some(d)))
    }

    const INGRESS_L7: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
"#;

    #[test]
    fn ingress_redirects_and_is_reported() {
        let s = snapshot(INGRESS_L7);
        let (c, d) = peers(&s);
        let v = PairVerdict::judge(c, d, Proto::Tcp, 80);
        assert!(v.drop().is_none());
        assert!(v.l7(Direction::Ingress).is_some() && v.l7(Direction::Egress).is_none());
        assert!(v.redirected());
        assert_eq!(v.reported_direction(), Direction::Ingress);
        assert_eq!(v.sides().count(), 2);
        // Another port: the destination's default deny drops it, on the ingress side.
        let v = PairVerdict::judge(c, d, Proto::Tcp, 81);
        let (side, why) = v.drop().unwrap();
        assert_eq!(side.direction, Direction::Ingress);
        assert!(matches!(why, DropReason::NoAllow { .. }));
    }

    #[test]
    fn egress_drops_first_and_outsiders_have_no_say() {
        let deny = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egressDeny:
  - toEndpoints: [{matchLabels: {app: server}}]
"#;
        let s = snapshot(&format!("{INGRESS_L7}---{deny}"));
        let (c, d) = peers(&s);
        let v = PairVerdict::judge(c, d, Proto::Tcp, 81);
        let (side, why) = v.drop().unwrap();
        assert_eq!(side.direction, Direction::Egress, "egress is asked first");
        assert!(matches!(why, DropReason::Denied { .. }));
        // From the world: only the destination has a say.
        let world = Peer::new(crate::identity::reserved::WORLD, None);
        let v = PairVerdict::judge(world, d, Proto::Tcp, 80);
        assert!(v.egress.is_none());
        assert!(v.drop().is_some(), "the server only lets the client in");
    }
}
