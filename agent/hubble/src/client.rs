//! Connecting to a node's Hubble API: `unix:/path` (the default, a Unix socket) or `host:port`.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::pb::observer::observer_client::ObserverClient;

/// Connects to `address` (`unix:PATH`, a path starting with `/`, or `HOST:PORT`).
pub async fn connect(address: &str) -> Result<ObserverClient<Channel>, tonic::transport::Error> {
    let unix = address.strip_prefix("unix:").or_else(|| address.starts_with('/').then_some(address));
    let channel = match unix {
        Some(path) => {
            let path = PathBuf::from(path);
            // The URI is required by the API and unused: the connector dials the socket.
            Endpoint::from_static("http://porin.invalid")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await?
        }
        None => Endpoint::from_shared(format!("http://{address}"))?.connect().await?,
    };
    Ok(ObserverClient::new(channel))
}
