//! The proxy's listeners in the datapath's pinned SOCKMAP, at `proxy_index(listener id, v6)`: the
//! tc programs `bpf_sk_assign` new L7 flows to the socket found there. The kernel drops a closed
//! listener from the map by itself, so with the proxy gone the datapath finds no listener and
//! fails closed.

use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::maps::{Map, MapData, SockMap};
use redirect_common::proxy_index;

/// Puts a listening socket into the SOCKMAP pinned at `sockmap` (pinned: agent restarts keep it).
pub fn register(sockmap: &Path, listener_id: u8, v6: bool, listener: &impl AsRawFd) -> anyhow::Result<()> {
    let err = || format!("proxy SOCKMAP {}", sockmap.display());
    let data = MapData::from_pin(sockmap).with_context(err)?;
    let mut map: SockMap<MapData> = SockMap::try_from(Map::SockMap(data)).with_context(err)?;
    let index = proxy_index(listener_id, v6);
    map.set(index, listener, 0).map_err(|e| anyhow!("{}: index {index}: {e}", err()))?;
    tracing::info!(sockmap = %sockmap.display(), index, "Transparent listener registered with the datapath");
    Ok(())
}
