//! The node's mesh credentials, as the agent writes them for the proxy: the trust bundle, the
//! node's certificate and one certificate per identity with endpoints on the node. The file is
//! JSON (mode 0600: it holds private keys), replaced whole (a temporary file renamed over it);
//! the proxy reads it again whenever it changes ([`follow`]) and keeps the last good version
//! when a new one does not load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// ALPN of the tunnel: HTTP/2.
pub const ALPN: &[u8] = b"h2";

/// A certificate chain (PEM: the certificate, then its issuers up to the root, root excluded) and
/// its private key (PEM, PKCS#8).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyedChain {
    /// The chain.
    pub chain: String,
    /// The key.
    pub key: String,
    /// When the certificate expires (seconds since the Unix epoch).
    pub not_after: i64,
}

/// One identity's certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadCredential {
    /// The numeric identity.
    pub identity: u32,
    /// Its SPIFFE ID.
    pub spiffe: String,
    /// Certificate and key.
    #[serde(flatten)]
    pub cert: KeyedChain,
}

/// The credentials file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    /// The cluster's trust domain.
    pub trust_domain: String,
    /// This node's name.
    pub node: String,
    /// The roots a peer's chain must lead to (PEM).
    pub bundle: String,
    /// The node's certificate (its tunnel listener's).
    pub node_cert: KeyedChain,
    /// A certificate per identity with endpoints on the node.
    pub workloads: Vec<WorkloadCredential>,
}

/// Why credentials do not load.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Reading the file.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// Its JSON.
    #[error("{path}: {error}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: serde_json::Error,
    },
    /// A certificate, key or bundle.
    #[error("{what}: {error}")]
    Tls {
        /// Which part.
        what: String,
        /// What failed.
        error: String,
    },
}

fn tls_err(what: impl Into<String>, error: impl std::fmt::Display) -> CredentialsError {
    CredentialsError::Tls { what: what.into(), error: error.to_string() }
}

/// The crypto Porin's tunnel uses (ring; TLS 1.3 only).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain_of(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(format!("{what} certificate"), e))?;
    if chain.is_empty() {
        return Err(tls_err(format!("{what} certificate"), "no certificate in the PEM text"));
    }
    Ok(chain)
}

fn key_of(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, CredentialsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| tls_err(format!("{what} key"), e))
}

/// The roots of a PEM bundle.
pub fn roots_of(bundle: &str) -> Result<Arc<RootCertStore>, CredentialsError> {
    let mut roots = RootCertStore::empty();
    for cert in chain_of("trust bundle", bundle)? {
        roots.add(cert).map_err(|e| tls_err("trust bundle", e))?;
    }
    Ok(Arc::new(roots))
}

/// A client configuration presenting `cert` and trusting `roots`.
pub fn client_config(
    roots: Arc<RootCertStore>,
    what: &str,
    cert: &KeyedChain,
) -> Result<Arc<ClientConfig>, CredentialsError> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(what, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain_of(what, &cert.chain)?, key_of(what, &cert.key)?)
        .map_err(|e| tls_err(what, e))?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(c))
}

/// A server configuration presenting `cert` and requiring a client certificate that leads to
/// `roots`.
pub fn server_config(roots: Arc<RootCertStore>, cert: &KeyedChain) -> Result<Arc<ServerConfig>, CredentialsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| tls_err("client verifier", e))?;
    let mut s = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("node certificate", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain_of("node", &cert.chain)?, key_of("node", &cert.key)?)
        .map_err(|e| tls_err("node certificate", e))?;
    s.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(s))
}

/// Credentials ready to use.
#[derive(Debug)]
pub struct Tls {
    /// The trust domain.
    pub trust_domain: String,
    /// This node.
    pub node: String,
    /// The tunnel listener's configuration.
    pub server: Arc<ServerConfig>,
    /// A client configuration per identity.
    pub clients: HashMap<u32, Arc<ClientConfig>>,
    /// Which load this is (a new one for every file that loaded): tunnels opened under an
    /// older one keep their streams; new streams go over connections of the newest.
    pub generation: u64,
    /// The earliest expiry of the certificates (seconds since the Unix epoch).
    pub not_after: i64,
}

impl Tls {
    /// Builds the configurations of a credentials file.
    pub fn build(file: &CredentialsFile, generation: u64) -> Result<Self, CredentialsError> {
        let roots = roots_of(&file.bundle)?;
        let server = server_config(roots.clone(), &file.node_cert)?;
        let mut clients = HashMap::new();
        let mut not_after = file.node_cert.not_after;
        for w in &file.workloads {
            let what = format!("identity {} ({})", w.identity, w.spiffe);
            clients.insert(w.identity, client_config(roots.clone(), &what, &w.cert)?);
            not_after = not_after.min(w.cert.not_after);
        }
        Ok(Self {
            trust_domain: file.trust_domain.clone(),
            node: file.node.clone(),
            server,
            clients,
            generation,
            not_after,
        })
    }
}

/// The credentials in force (none before a file loaded).
#[derive(Debug, Default)]
pub struct TlsState {
    current: ArcSwapOption<Tls>,
    last_error: std::sync::Mutex<Option<String>>,
}

impl TlsState {
    /// The credentials in force.
    pub fn current(&self) -> Option<Arc<Tls>> {
        self.current.load_full()
    }

    /// The last load's error (none after a good load).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map_or(None, |e| e.clone())
    }

    /// Loads `path`, keeping what is in force when it does not load.
    pub fn load(&self, path: &Path) -> Result<(), CredentialsError> {
        let generation = self.current().map_or(1, |t| t.generation + 1);
        let result = read(path).and_then(|f| Tls::build(&f, generation));
        let error = match result {
            Ok(tls) => {
                tracing::info!(generation, identities = tls.clients.len(), "mesh credentials loaded");
                self.current.store(Some(Arc::new(tls)));
                None
            }
            Err(e) => Some(e),
        };
        if let Ok(mut last) = self.last_error.lock() {
            *last = error.as_ref().map(ToString::to_string);
        }
        error.map_or(Ok(()), Err)
    }
}

/// Reads a credentials file.
pub fn read(path: &Path) -> Result<CredentialsFile, CredentialsError> {
    let text = std::fs::read(path).map_err(|error| CredentialsError::Read { path: path.to_owned(), error })?;
    serde_json::from_slice(&text).map_err(|error| CredentialsError::Json { path: path.to_owned(), error })
}

/// Reloads `path` whenever it changes (its inode, size or modification time), every `every`.
pub async fn follow(state: Arc<TlsState>, path: PathBuf, every: Duration) {
    // What is there now counts as loaded only if something was: a file that appeared between the
    // proxy's start and this task's is loaded on the first look (it used to wait for the next
    // renewal, half a certificate's life).
    let loaded = state.current().is_some();
    let mut watch = crate::snapshot::FileWatch::new(path, every, loaded);
    loop {
        watch.changed().await;
        if let Err(e) = state.load(watch.path()) {
            tracing::warn!(error = %e, "mesh credentials not loaded: the previous ones stay in force");
        }
    }
}
