//! The node's network interfaces as the datapath binds endpoints to them: each one's index, its
//! own MAC address, and the bridge it is a port of (`redirect_common::IfaceValue`: a frame handed
//! to the proxy from a bridge port goes to the bridge's own input, addressed to the bridge).
//! Read in one netlink dump (`RTM_GETLINK`) per call, in the calling thread's network namespace.

use std::collections::BTreeMap;

use anyhow::Context as _;
use netlink_packet_core::{NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// One interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Its index.
    pub index: u32,
    /// Its Ethernet address; `None` for an interface without one (loopback, a tunnel).
    pub mac: Option<[u8; 6]>,
    /// The Linux bridge it is a port of (`bridge` CNI plugin): `None` when it is none's.
    pub bridge: Option<Bridge>,
}

/// A bridge an endpoint's interface is a port of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bridge {
    /// The bridge's index.
    pub index: u32,
    /// The bridge's own MAC address (the node's, on the pods' segment).
    pub mac: [u8; 6],
}

/// What one link says of itself.
struct Link {
    name: String,
    index: u32,
    mac: Option<[u8; 6]>,
    controller: Option<u32>,
    is_bridge: bool,
}

/// Every interface of the current network namespace, by name.
///
/// # Errors
/// The dump failed, or stayed inconsistent (links changing under it) three times running.
pub fn by_name() -> anyhow::Result<BTreeMap<String, Interface>> {
    let mut tries = 0;
    let links = loop {
        tries += 1;
        match dump().context("netlink RTM_GETLINK dump")? {
            Dump::Complete(links) => break links,
            Dump::Interrupted if tries < 3 => {}
            Dump::Interrupted => anyhow::bail!("netlink RTM_GETLINK dump: interrupted by link changes {tries} times"),
        }
    };
    let bridges: BTreeMap<u32, [u8; 6]> =
        links.iter().filter(|l| l.is_bridge).filter_map(|l| Some((l.index, l.mac?))).collect();
    Ok(links
        .iter()
        .map(|l| {
            let bridge = l.controller.and_then(|c| Some(Bridge { index: c, mac: *bridges.get(&c)? }));
            // A port of another kind of controller (Open vSwitch, a bond, a VRF) is not one the
            // datapath knows how to reach the node from: its frames are left as they are.
            let mac = if l.controller.is_some() && bridge.is_none() { None } else { l.mac };
            (l.name.clone(), Interface { index: l.index, mac, bridge })
        })
        .collect())
}

/// What one dump gave.
enum Dump {
    Complete(Vec<Link>),
    /// The kernel says links changed while it dumped (`NLM_F_DUMP_INTR`, or an error in its
    /// closing message): some may be missing.
    Interrupted,
}

fn dump() -> anyhow::Result<Dump> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetLink(LinkMessage::default()));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut links = Vec::new();
    let mut interrupted = false;
    loop {
        let (bytes, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset + 4 <= bytes.len() {
            // Every message starts with its length (host order); one that does not decode (a link
            // attribute this crate does not read) is skipped, not fatal: the others still count.
            let len = u32::from_ne_bytes([bytes[offset], bytes[offset + 1], bytes[offset + 2], bytes[offset + 3]]);
            let len = usize::try_from(len).unwrap_or(0);
            if len < 16 {
                anyhow::bail!("a netlink message of {len} bytes");
            }
            if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..]) {
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::Done(d) => {
                        return Ok(if interrupted || d.code != 0 { Dump::Interrupted } else { Dump::Complete(links) });
                    }
                    NetlinkPayload::Error(e) => anyhow::bail!("the kernel refused the dump: {e}"),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => links.extend(link(&m)),
                    _ => {}
                }
            }
            // Messages are 4-byte aligned.
            offset += len.next_multiple_of(4);
        }
    }
}

fn link(m: &LinkMessage) -> Option<Link> {
    let mut l = Link { name: String::new(), index: m.header.index, mac: None, controller: None, is_bridge: false };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::Address(a) if m.header.link_layer_type == LinkLayerType::Ether => {
                l.mac = <[u8; 6]>::try_from(a.as_slice()).ok().filter(|m| *m != [0; 6]);
            }
            LinkAttribute::Controller(c) => l.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                l.is_bridge |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
            }
            _ => {}
        }
    }
    (!l.name.is_empty()).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_an_index_and_no_mac() {
        let all = by_name().unwrap();
        let lo = all.get("lo").expect("every namespace has lo");
        assert_eq!(lo.index, nix::net::if_::if_nametoindex("lo").unwrap());
        assert_eq!(lo.mac, None);
        assert_eq!(lo.bridge, None);
    }
}
