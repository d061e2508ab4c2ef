//! The mesh's certificates (the mTLS tunnel between node proxies, `proxy::tunnel`).
//!
//! * The cluster's **root CA** (`root.pem`, `root.key`): made once for the cluster
//!   (`porin mesh ca init`); its certificate is the trust bundle every node gets. Its key stays
//!   with whoever makes node CAs (the lab's cluster directory; in a cluster, a secret only the
//!   control plane reads) and never reaches a node.
//! * A **node CA** per node (`node-ca.pem`, `node-ca.key`, and `bundle.pem`, the root): an
//!   intermediate (path length 0) whose common name is the node's name (`porin mesh ca node`).
//!   A node's agent holds only its own; a peer's certificate names the node that issued it, and
//!   the receiving proxy accepts a client only from the node the cluster state places it on — a
//!   node can speak for its own endpoints, never for another node's.
//! * The agent issues, from its node CA, the node's **tunnel certificate** (SPIFFE
//!   `spiffe://<td>/porin/node/<node>`, the node's addresses as IP SANs) and one **workload
//!   certificate** per identity with endpoints on the node (`spiffe://<td>/ns/<ns>/sa/<sa>`, the
//!   numeric identity as common name), short-lived (default 1 h), and renews each once half its
//!   life has passed; it writes them all to the credentials file the proxy follows
//!   (`proxy::tunnel::credentials`), mode 0600, replaced whole. Renewal never touches open tunnels:
//!   new connections use the new certificates, open ones finish their streams.
//!
//! Keys are ECDSA P-256; every key file is written 0600, in a directory only root reads.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use proxy::tunnel::credentials::{CredentialsFile, KeyedChain, WorkloadCredential};
use proxy::tunnel::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The root CA's certificate and key files in a cluster directory.
pub const ROOT_CERT: &str = "root.pem";
/// See [`ROOT_CERT`].
pub const ROOT_KEY: &str = "root.key";
/// A node directory's files.
pub const NODE_CA_CERT: &str = "node-ca.pem";
/// See [`NODE_CA_CERT`].
pub const NODE_CA_KEY: &str = "node-ca.key";
/// See [`NODE_CA_CERT`].
pub const BUNDLE: &str = "bundle.pem";
/// The trust domain file of a cluster directory.
pub const TRUST_DOMAIN: &str = "trust-domain";

/// Writes `text` to `path` (mode 0600), replacing it whole (a temporary file renamed over it).
pub fn write_private(path: &Path, text: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(text).and_then(|()| f.sync_all()).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn unix(t: time::OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "porin");
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(cn: &str, path_len: Option<u8>, years: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(path_len.map_or(BasicConstraints::Unconstrained, BasicConstraints::Constrained));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = now() - time::Duration::minutes(5);
    p.not_after = now() + time::Duration::days(365 * years);
    p
}

/// Makes a cluster's root CA in `dir` (created 0700): `root.pem`, `root.key`, `trust-domain`.
/// Refuses to replace an existing one.
pub fn init_root(dir: &Path, trust_domain: &str) -> anyhow::Result<()> {
    SpiffeId::parse(&format!("spiffe://{trust_domain}/ns/x/sa/x")).context("trust domain")?;
    if dir.join(ROOT_KEY).exists() {
        bail!("{} already holds a root CA", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let key = KeyPair::generate()?;
    let cert = ca_params(&format!("porin root CA ({trust_domain})"), Some(1), 10).self_signed(&key)?;
    write_private(&dir.join(ROOT_KEY), key.serialize_pem().as_bytes())?;
    write_private(&dir.join(ROOT_CERT), cert.pem().as_bytes())?;
    write_private(&dir.join(TRUST_DOMAIN), trust_domain.as_bytes())
}

/// Makes node `node`'s CA from the root in `root_dir`, into `out` (created 0700):
/// `node-ca.pem`, `node-ca.key`, `bundle.pem`, `trust-domain`.
pub fn issue_node_ca(root_dir: &Path, node: &str, out: &Path) -> anyhow::Result<()> {
    if node.is_empty() || !node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        bail!("node name {node:?}: letters, digits, '-' and '.' only");
    }
    let root_key = KeyPair::from_pem(&read(&root_dir.join(ROOT_KEY))?).context("root key")?;
    let root_pem = read(&root_dir.join(ROOT_CERT))?;
    let issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).context("root certificate")?;
    let key = KeyPair::generate()?;
    let cert = ca_params(node, Some(0), 2).signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    write_private(&out.join(NODE_CA_KEY), key.serialize_pem().as_bytes())?;
    write_private(&out.join(NODE_CA_CERT), cert.pem().as_bytes())?;
    write_private(&out.join(BUNDLE), root_pem.as_bytes())?;
    write_private(&out.join(TRUST_DOMAIN), read(&root_dir.join(TRUST_DOMAIN))?.trim().as_bytes())
}

/// A node's issuer: its CA, the trust bundle and the trust domain.
pub struct NodeIssuer {
    /// The node's name (its CA's common name).
    pub node: String,
    /// The trust domain.
    pub trust_domain: String,
    /// The trust bundle (PEM).
    pub bundle: String,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl NodeIssuer {
    /// Loads a node directory ([`issue_node_ca`]).
    pub fn load(dir: &Path, node: &str) -> anyhow::Result<Self> {
        let ca_pem = read(&dir.join(NODE_CA_CERT))?;
        let key = KeyPair::from_pem(&read(&dir.join(NODE_CA_KEY))?).context("node CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).context("node CA certificate")?;
        let cn = x509_common_name(&ca_pem)?;
        if cn != node {
            bail!("{} is node {cn:?}'s CA, not node {node:?}'s", dir.display());
        }
        Ok(Self {
            node: node.to_owned(),
            trust_domain: read(&dir.join(TRUST_DOMAIN))?.trim().to_owned(),
            bundle: read(&dir.join(BUNDLE))?,
            ca_pem,
            issuer,
        })
    }

    fn leaf(&self, p: CertificateParams, ttl: Duration) -> anyhow::Result<KeyedChain> {
        let start = now();
        let end = start + time::Duration::try_from(ttl).unwrap_or(time::Duration::HOUR);
        self.leaf_between(p, start - time::Duration::minutes(1), end)
    }

    fn leaf_between(
        &self,
        mut p: CertificateParams,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> anyhow::Result<KeyedChain> {
        let key = KeyPair::generate()?;
        p.not_before = not_before;
        p.not_after = not_after;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(KeyedChain {
            chain: format!("{}{}", cert.pem(), self.ca_pem),
            key: key.serialize_pem(),
            not_after: unix(p.not_after),
        })
    }

    /// The node's tunnel certificate (server and client authentication), for its addresses.
    pub fn node_cert(&self, ips: &[IpAddr], ttl: Duration) -> anyhow::Result<KeyedChain> {
        let mut p = CertificateParams::default();
        p.distinguished_name = name(&self.node);
        let id = SpiffeId::node(&self.trust_domain, &self.node).to_string();
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        p.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(p, ttl)
    }

    /// A workload certificate for `identity` (client authentication).
    pub fn workload_cert(&self, identity: u32, id: &SpiffeId, ttl: Duration) -> anyhow::Result<KeyedChain> {
        self.leaf(Self::workload_params(identity, id)?, ttl)
    }

    /// A workload certificate valid from `not_before` to `not_after` (Unix seconds; tests make
    /// expired ones).
    pub fn workload_cert_between(
        &self,
        identity: u32,
        id: &SpiffeId,
        not_before: i64,
        not_after: i64,
    ) -> anyhow::Result<KeyedChain> {
        let at = |t| time::OffsetDateTime::from_unix_timestamp(t).context("validity");
        self.leaf_between(Self::workload_params(identity, id)?, at(not_before)?, at(not_after)?)
    }

    fn workload_params(identity: u32, id: &SpiffeId) -> anyhow::Result<CertificateParams> {
        let mut p = CertificateParams::default();
        p.distinguished_name = name(&identity.to_string());
        p.subject_alt_names = vec![SanType::URI(id.to_string().as_str().try_into()?)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(p)
    }
}

fn x509_common_name(pem: &str) -> anyhow::Result<String> {
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).context("certificate PEM")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| anyhow::anyhow!("certificate: {e}"))?;
    Ok(cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default().to_owned())
}

/// What the agent needs to keep the node's credentials.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// The node directory ([`issue_node_ca`]).
    pub dir: PathBuf,
    /// Where the credentials file goes (for the proxy).
    pub credentials: PathBuf,
    /// Certificate lifetime.
    pub ttl: Duration,
}

/// Keeps the credentials file: issues what is missing, renews what is past half its life, drops
/// what no endpoint needs any more.
pub struct Keeper {
    issuer: NodeIssuer,
    settings: MeshSettings,
    node_cert: Option<(Vec<IpAddr>, KeyedChain, i64)>,
    /// identity → (SPIFFE ID, certificate, issued at).
    workloads: BTreeMap<u32, (SpiffeId, KeyedChain, i64)>,
}

impl Keeper {
    /// A keeper for node `node`.
    pub fn new(settings: MeshSettings, node: &str) -> anyhow::Result<Self> {
        let issuer = NodeIssuer::load(&settings.dir, node)?;
        Ok(Self { issuer, settings, node_cert: None, workloads: BTreeMap::new() })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.issuer.trust_domain
    }

    fn due(&self, issued: i64, cert: &KeyedChain, now: i64) -> bool {
        now >= issued + (cert.not_after - issued) / 2
    }

    /// Brings the credentials in line with the node's addresses and the identities `wanted`
    /// (identity → SPIFFE ID); writes the file when anything changed. Returns whether it did.
    pub fn refresh(&mut self, node_ips: &[IpAddr], wanted: &BTreeMap<u32, SpiffeId>) -> anyhow::Result<bool> {
        let now = unix(now());
        let ttl = self.settings.ttl;
        let mut changed = false;
        let node_due = match &self.node_cert {
            Some((ips, cert, issued)) => ips.as_slice() != node_ips || self.due(*issued, cert, now),
            None => true,
        };
        if node_due {
            self.node_cert = Some((node_ips.to_vec(), self.issuer.node_cert(node_ips, ttl)?, now));
            changed = true;
        }
        let before = self.workloads.len();
        self.workloads.retain(|id, (spiffe, _, _)| wanted.get(id) == Some(spiffe));
        changed |= self.workloads.len() != before;
        for (id, spiffe) in wanted {
            let due = self.workloads.get(id).is_none_or(|(_, cert, issued)| self.due(*issued, cert, now));
            if due {
                let cert = self.issuer.workload_cert(*id, spiffe, ttl)?;
                self.workloads.insert(*id, (spiffe.clone(), cert, now));
                changed = true;
            }
        }
        if changed {
            self.write()?;
        }
        Ok(changed)
    }

    fn write(&self) -> anyhow::Result<()> {
        let Some((_, node_cert, _)) = &self.node_cert else { return Ok(()) };
        let file = CredentialsFile {
            trust_domain: self.issuer.trust_domain.clone(),
            node: self.issuer.node.clone(),
            bundle: self.issuer.bundle.clone(),
            node_cert: node_cert.clone(),
            workloads: self
                .workloads
                .iter()
                .map(|(id, (spiffe, cert, _))| WorkloadCredential {
                    identity: *id,
                    spiffe: spiffe.to_string(),
                    cert: cert.clone(),
                })
                .collect(),
        };
        write_private(&self.settings.credentials, &serde_json::to_vec_pretty(&file)?)
    }
}

/// The identities of a snapshot's endpoints on this node, with their SPIFFE IDs.
pub fn local_identities(snap: &policy_engine::snapshot::Snapshot, trust_domain: &str) -> BTreeMap<u32, SpiffeId> {
    snap.endpoints()
        .iter()
        .filter(|e| e.local)
        .map(|e| (e.identity, SpiffeId::workload(trust_domain, &e.namespace, e.service_account())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy::tunnel::credentials::TlsState;
    use std::sync::Arc;

    /// A credentials file written after the proxy started (the agent's first write races the
    /// proxy's start) is loaded at the proxy's first look, not at the next renewal.
    #[tokio::test]
    async fn credentials_written_after_the_proxy_started_are_loaded() {
        struct Scratch(PathBuf);
        impl Drop for Scratch {
            fn drop(&mut self) {
                if let Err(e) = std::fs::remove_dir_all(&self.0) {
                    eprintln!("{}: {e}", self.0.display());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("porin-mesh-follow-{}", std::process::id()));
        let _scratch = Scratch(dir.clone());
        let (root, node) = (dir.join("root"), dir.join("node1"));
        std::fs::create_dir_all(&root).unwrap();
        init_root(&root, "cluster.local").unwrap();
        issue_node_ca(&root, "node1", &node).unwrap();
        let credentials = dir.join("credentials.json");
        // The proxy's tunnel found no file (nothing loaded)...
        let state = Arc::new(TlsState::default());
        // ...the agent writes it...
        let settings = MeshSettings { dir: node, credentials: credentials.clone(), ttl: Duration::from_secs(3600) };
        let mut keeper = Keeper::new(settings, "node1").unwrap();
        let wanted = BTreeMap::from([(1000, SpiffeId::workload("cluster.local", "default", "default"))]);
        assert!(keeper.refresh(&["10.0.0.1".parse().unwrap()], &wanted).unwrap());
        // ...and then the proxy's follower starts.
        let follower =
            tokio::spawn(proxy::tunnel::credentials::follow(state.clone(), credentials, Duration::from_millis(20)));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while state.current().is_none() {
            assert!(std::time::Instant::now() < deadline, "the credentials written were never loaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        follower.abort();
    }
}
