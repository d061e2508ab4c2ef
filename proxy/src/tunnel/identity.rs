//! Who a certificate names: SPIFFE IDs and what Porin puts in its certificates.
//!
//! * A workload certificate (one per security identity with endpoints on a node, issued by that
//!   node's CA) names `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` in its only
//!   URI SAN, and the numeric identity in its subject's common name.
//! * A node certificate (the server side of the node's tunnel listener) names
//!   `spiffe://<trust domain>/porin/node/<node>` and the node's addresses (IP SANs: clients
//!   verify the address they connect to).
//! * A node CA (an intermediate under the cluster's root) has the node's name as its common name:
//!   the issuer of a certificate names the node that issued it.

use std::fmt;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A SPIFFE ID Porin issues or accepts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// The trust domain (the cluster's).
    pub trust_domain: String,
    /// What it names.
    pub subject: Subject,
}

/// What a SPIFFE ID names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A workload: its namespace and service account.
    Workload {
        /// Namespace.
        namespace: String,
        /// Service account.
        service_account: String,
    },
    /// A node's proxy.
    Node(String),
}

/// Why a certificate or ID is not one Porin accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not a SPIFFE ID of a form Porin issues.
    #[error("{0:?} is not a SPIFFE ID of the form spiffe://<trust domain>/ns/<ns>/sa/<sa> or .../porin/node/<node>")]
    Malformed(String),
    /// The certificate does not parse.
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    /// The certificate has no URI SAN, or more than one.
    #[error("the certificate must carry exactly one SPIFFE ID (URI SAN); it has {0}")]
    UriCount(usize),
    /// A workload certificate whose common name is not a numeric identity.
    #[error("the certificate's common name {0:?} is not a numeric identity")]
    Identity(String),
    /// No certificate at all.
    #[error("no certificate")]
    Missing,
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl SpiffeId {
    /// A workload's ID.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            subject: Subject::Workload { namespace: namespace.to_owned(), service_account: service_account.to_owned() },
        }
    }

    /// A node's ID.
    pub fn node(trust_domain: &str, node: &str) -> Self {
        Self { trust_domain: trust_domain.to_owned(), subject: Subject::Node(node.to_owned()) }
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>` or `spiffe://<td>/porin/node/<node>` (segments of
    /// letters, digits, `-`, `.`, `_`; nothing else: no query, fragment, port or user).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::Malformed(s.chars().take(256).collect());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let td = parts.next().filter(|t| segment_ok(t)).ok_or_else(bad)?;
        let segs: Vec<&str> = parts.collect();
        if !segs.iter().all(|p| segment_ok(p)) {
            return Err(bad());
        }
        let subject = match segs.as_slice() {
            ["ns", ns, "sa", sa] => {
                Subject::Workload { namespace: (*ns).to_owned(), service_account: (*sa).to_owned() }
            }
            ["porin", "node", node] => Subject::Node((*node).to_owned()),
            _ => return Err(bad()),
        };
        Ok(Self { trust_domain: td.to_ascii_lowercase(), subject })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            Subject::Workload { namespace, service_account } => {
                write!(f, "spiffe://{}/ns/{namespace}/sa/{service_account}", self.trust_domain)
            }
            Subject::Node(n) => write!(f, "spiffe://{}/porin/node/{n}", self.trust_domain),
        }
    }
}

/// What a peer's (already verified) certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// The numeric identity (workload certificates).
    pub identity: Option<u32>,
    /// The common name of its issuer: the node whose CA issued it.
    pub issuer_node: String,
    /// When it expires (seconds since the Unix epoch): a connection opened with it carries no
    /// new stream after.
    pub not_after: i64,
}

/// Reads the end-entity certificate of a verified chain.
pub fn read_peer(chain: &[CertificateDer<'_>]) -> Result<PeerCert, IdError> {
    let leaf = chain.first().ok_or(IdError::Missing)?;
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| IdError::Certificate(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    let [uri] = uris.as_slice() else { return Err(IdError::UriCount(uris.len())) };
    let id = SpiffeId::parse(uri)?;
    let cn = |name: &x509_parser::x509::X509Name<'_>| {
        name.iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default().to_owned()
    };
    let identity = match id.subject {
        Subject::Workload { .. } => {
            let text = cn(cert.subject());
            Some(text.parse::<u32>().map_err(|_| IdError::Identity(text))?)
        }
        Subject::Node(_) => None,
    };
    Ok(PeerCert { id, identity, issuer_node: cn(cert.issuer()), not_after: cert.validity().not_after.timestamp() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_refuse_what_porin_does_not_issue() {
        for s in ["spiffe://cluster.local/ns/default/sa/tiefighter", "spiffe://cluster.local/porin/node/node-b"] {
            assert_eq!(SpiffeId::parse(s).unwrap().to_string(), s);
        }
        for s in [
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe://cluster.local/ns/default/sa/x/y",
            "spiffe://cluster.local/ns/../sa/x",
            "spiffe://cluster.local/ns/default/sa/a?b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8/ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/porin/node/",
            "",
        ] {
            assert!(SpiffeId::parse(s).is_err(), "{s}");
        }
    }
}
