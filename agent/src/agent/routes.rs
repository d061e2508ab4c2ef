//! The node's policy routing for the proxy: a packet the datapath assigned to a proxy socket
//! (marked [`mark::TO_PROXY`]) must be delivered locally, whatever its destination, or the kernel
//! drops it on the forwarding path (an assigned socket is never forwarded). One rule per family
//! (`fwmark 0x200/0xf00 lookup 2004 pref 9`) and one route per family in that table
//! (`local default dev lo`). The agent ensures both at start; they outlive it (the proxy keeps
//! serving across agent restarts) and adding them again is a no-op. A node with IPv6 off gets the
//! IPv4 ones only.

use anyhow::Context;
use redirect_common::mark;
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Ensures the rule and the local route of both families in the current network namespace.
pub(super) async fn ensure() -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("open a netlink socket")?;
    let conn = tokio::spawn(conn);
    let done = ensure_with(&handle).await;
    conn.abort();
    done
}

async fn ensure_with(handle: &Handle) -> anyhow::Result<()> {
    let lo = loopback_index().context("the loopback interface")?;
    // A node booted with IPv6 off (`ipv6.disable=1`) has no IPv6 routing to set up.
    let v6_on = std::path::Path::new("/proc/sys/net/ipv6").exists();
    if !v6_on {
        tracing::info!("IPv6 is off on this node: IPv4 policy routing only");
    }
    for v6 in [false, true].into_iter().filter(|v6| !v6 || v6_on) {
        let family = if v6 { "IPv6" } else { "IPv4" };
        let rule = handle
            .rule()
            .add()
            .action(RuleAction::ToTable)
            .table_id(mark::PROXY_TABLE)
            .priority(mark::PROXY_RULE_PRIORITY)
            .fw_mark(mark::TO_PROXY);
        let added = if v6 {
            let mut r = rule.v6();
            r.message_mut().attributes.push(RuleAttribute::FwMask(mark::MASK));
            r.execute().await
        } else {
            let mut r = rule.v4();
            r.message_mut().attributes.push(RuleAttribute::FwMask(mark::MASK));
            r.execute().await
        };
        tolerate_exists(added).with_context(|| {
            format!(
                "{family} rule fwmark {:#x}/{:#x} lookup {} pref {}",
                mark::TO_PROXY,
                mark::MASK,
                mark::PROXY_TABLE,
                mark::PROXY_RULE_PRIORITY
            )
        })?;
        let route = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(mark::PROXY_TABLE)
                .output_interface(lo)
                .build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(mark::PROXY_TABLE)
                .output_interface(lo)
                .build()
        };
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .with_context(|| format!("{family} route local default dev lo table {}", mark::PROXY_TABLE))?;
    }
    Ok(())
}

/// A rule the kernel already has (an earlier agent added it) is what we want.
fn tolerate_exists(r: Result<(), rtnetlink::Error>) -> anyhow::Result<()> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => Ok(other?),
    }
}

fn loopback_index() -> anyhow::Result<u32> {
    Ok(nix::net::if_::if_nametoindex("lo")?)
}
