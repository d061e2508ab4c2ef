//! Security and fairness under load, on the real datapath and proxy (root; in CI always):
//!
//! * after thousands of concurrent connections, a denied request sent from every source port of
//!   the client, IPv4 and IPv6, is never served, and conntrack holds no non-proxied entry for the
//!   L7 flow (the bypass the state machine in `redirect_common::datapath` closes);
//! * 10,000 concurrent keep-alive clients of one pod never exhaust the ports of its address, and the
//!   proxy's memory comes back after the load;
//! * a pod holding 10,000 idle connections does not starve another pod;
//! * a flood of drops and refusals leaves the logs bounded.
//!
//! The tests take turns (one lock): each loads the whole machine.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Lab, control_json, porin, privileged, repo};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, setsockopt, sockopt};
use redirect_common::{CtKey, CtValue, ct_flag, family};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn starwars(tag: &str, settings: &str) -> Lab {
    let text = std::fs::read_to_string(repo().join("config/labs/starwars.yaml")).unwrap();
    Lab::up(tag, &format!("{}{settings}", text.replace("../examples/", "@REPO@/config/examples/")))
}

/// One `PUT /v1/exhaust-port` from `port` of the pod's address; the status line and whether the
/// deathstar itself answered (its body).
fn put_from_port(local: IpAddr, port: u16, to: SocketAddr) -> Result<(String, bool), String> {
    let fam = if local.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd: OwnedFd =
        nix::sys::socket::socket(fam, SockType::Stream, SockFlag::empty(), None).map_err(|e| e.to_string())?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| e.to_string())?;
    // A blocking connect honours the send timeout.
    let t = nix::sys::time::TimeVal::new(1, 0);
    setsockopt(&fd, sockopt::SendTimeout, &t).map_err(|e| e.to_string())?;
    let bind: SockaddrStorage = SocketAddr::new(local, port).into();
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &bind).map_err(|e| format!("bind: {e}"))?;
    let dst: SockaddrStorage = to.into();
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &dst).map_err(|e| format!("connect: {e}"))?;
    let mut s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    s.write_all(b"PUT /v1/exhaust-port HTTP/1.1\r\nHost: deathstar\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    Ok((text.lines().next().unwrap_or("").to_owned(), text.contains("Panic")))
}

/// The sweep: a denied request from every source port of the ephemeral range, 64 at a time.
/// Returns (answered 403, served by the deathstar, failures).
fn sweep(lab: &Lab, pod: &str, v6: bool, to: SocketAddr) -> (usize, usize, usize) {
    let local: IpAddr = lab.addr(pod, v6).parse().unwrap();
    lab.in_pod(pod, move || {
        let next = AtomicUsize::new(32768);
        let (denied, served, failed) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..64 {
                s.spawn(|| {
                    loop {
                        let p = next.fetch_add(1, Ordering::Relaxed);
                        if p > 60999 {
                            break;
                        }
                        let tally = match put_from_port(local, u16::try_from(p).unwrap(), to) {
                            Ok((_, true)) => &served,
                            Ok((status, false)) if status.contains(" 403 ") => &denied,
                            _ => &failed,
                        };
                        tally.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        (denied.into_inner(), served.into_inner(), failed.into_inner())
    })
}

/// Conntrack entries of the L7 flow (client → server:80, or the other way round) without PROXIED.
fn direct_l7_entries(lab: &Lab, client: &str, server: &str) -> (usize, usize) {
    let data = aya::maps::MapData::from_pin(lab.pinned_map(redirect_common::names::CONNTRACK)).unwrap();
    let ct: aya::maps::HashMap<_, CtKey, CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
    let ips = |pod: &str| -> Vec<[u8; 16]> {
        [false, true]
            .into_iter()
            .map(|v6| match lab.addr(pod, v6).parse::<IpAddr>().unwrap() {
                IpAddr::V4(a) => {
                    let mut b = [0; 16];
                    b[..4].copy_from_slice(&a.octets());
                    b
                }
                IpAddr::V6(a) => a.octets(),
            })
            .collect()
    };
    let (c, s) = (ips(client), ips(server));
    let (mut total, mut direct) = (0, 0);
    for (k, v) in ct.iter().filter_map(Result::ok) {
        total += 1;
        let out = c.contains(&k.saddr) && s.contains(&k.daddr) && u16::from_be_bytes(k.dport) == 80;
        let back = s.contains(&k.saddr) && c.contains(&k.daddr) && u16::from_be_bytes(k.sport) == 80;
        assert!(k.family == family::V4 || k.family == family::V6);
        if (out || back) && v.flags & ct_flag::PROXIED == 0 {
            direct += 1;
        }
    }
    (total, direct)
}

/// The lab proxy's status.
fn proxy_status(lab: &Lab) -> Value {
    control_json(&std::path::PathBuf::from(format!("/run/porin/labs/{}/proxy.sock", lab.name)), r#"{"cmd":"status"}"#)
}

fn rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
}

#[test]
fn no_denied_request_reaches_the_server_after_heavy_load_privileged() {
    if !privileged() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = starwars("bypass", "");
    for v6 in [false, true] {
        let server = lab.addr("deathstar", v6);
        let url = if v6 { format!("http://[{server}]") } else { format!("http://{server}") };
        let load = lab.wrk("tiefighter", &url, 4000, 8);
        assert!(load.requests > 10_000, "the load ran: {}", load.output);
        let to = SocketAddr::new(server.parse().unwrap(), 80);
        let start = Instant::now();
        let (denied, served, failed) = sweep(&lab, "tiefighter", v6, to);
        eprintln!(
            "v6={v6}: {load:?}\nsweep in {:?}: {denied} denied, {served} served, {failed} failed",
            start.elapsed()
        );
        assert_eq!(served, 0, "denied requests reached the deathstar (IPv6: {v6})");
        assert!(denied >= 28_232 * 8 / 10, "the sweep was answered by the proxy: {denied} denied, {failed} failed");
        let (total, direct) = direct_l7_entries(&lab, "tiefighter", "deathstar");
        assert_eq!(direct, 0, "non-proxied conntrack entries for the L7 flow ({total} entries in all)");
    }
    let c = lab.counters();
    assert_eq!(c["drop_not_proxied"], 0, "{c}");
}

#[test]
fn ten_thousand_keep_alive_clients_exhaust_no_ports_and_memory_comes_back_privileged() {
    if !privileged() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = starwars("tenk", "settings:\n  proxy_limits: {max_connections_per_source: 12000}\n");
    let pid = proxy_status(&lab)["pid"].as_u64().unwrap();
    // Idle, after a few requests: a proxy that has served something (its code paged in).
    lab.exec(
        "tiefighter",
        &["bash", "-c", "for i in $(seq 20); do curl -s -o /dev/null -XPOST http://deathstar/v1/request-landing; done"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(pid);
    let load = lab.wrk("tiefighter", "http://deathstar", 10_000, 10);
    let during = rss_kib(pid);
    let st = proxy_status(&lab);
    eprintln!("{load:?}\nproxy: {st}\nRSS idle {idle} KiB, after load {during} KiB");
    let c = &st["counters"];
    assert_eq!(c["upstream_address_exhausted"], 0, "{c}");
    assert_eq!(c["upstream_errors"], 0, "{c}");
    assert_eq!(c["connections_refused"], 0, "{c}");
    assert!(c["connections"].as_u64().unwrap() >= 10_000, "10,000 clients were served: {c}");
    assert_eq!((load.connect_errors, load.non_2xx), (0, 0), "{}", load.output);
    // Memory is given back within a minute of the load's end.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = rss_kib(pid);
    while now > 2 * idle && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        now = rss_kib(pid);
    }
    eprintln!("RSS {now} KiB after load (idle {idle} KiB)");
    assert!(now <= 2 * idle, "RSS {now} KiB a minute after the load, idle {idle} KiB");
}

#[test]
fn a_pod_holding_ten_thousand_idle_connections_starves_no_one_privileged() {
    if !privileged() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Room for exactly the attacker's connections: everyone else needs the proxy to make room.
    let text = std::fs::read_to_string(repo().join("config/labs/starwars.yaml")).unwrap();
    let text = text.replace("../examples/", "@REPO@/config/examples/").replace(
        "  - name: xwing\n",
        "  - name: shuttle\n    labels: {org: empire, class: shuttle}\n  - name: xwing\n",
    );
    let lab = Lab::up(
        "fair",
        &format!("{text}settings:\n  proxy_limits: {{max_connections: 10000, max_connections_per_source: 10000}}\n"),
    );
    let to = SocketAddr::new(lab.addr("deathstar", false).parse().unwrap(), 80);
    let held = lab.in_pod("tiefighter", move || {
        (0..10_000)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok())
            .collect::<Vec<_>>()
    });
    assert!(held.len() >= 9_900, "the attacker got its connections: {}", held.len());
    // The proxy takes them off its accept queue: the table fills. (Near the limit its head timeouts
    // shrink towards a second, so silent connections do not stay long: the check is on what it
    // accepted, and the other pod's requests start at once.)
    let accepted = |st: &Value| st["counters"]["connections"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted(&proxy_status(&lab)) < 9_900 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = proxy_status(&lab);
    assert!(accepted(&st) >= 9_900, "the proxy took the attacker's connections: {st}");
    eprintln!("table when the other pod starts: {} connections", st["connections"]);
    let o = lab.exec(
        "shuttle",
        &[
            "bash",
            "-c",
            "ok=0; for i in $(seq 200); do c=$(curl -s -m 5 -o /dev/null -w '%{http_code}' -XPOST http://deathstar/v1/request-landing); [ \"$c\" = 200 ] && ok=$((ok+1)); done; echo $ok",
        ],
    );
    let ok: u32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let st = proxy_status(&lab);
    eprintln!("shuttle: {ok}/200; proxy: {st}");
    assert!(ok >= 198, "the other pod's requests: {ok}/200 succeeded");
    assert!(st["counters"]["connections_shed"].as_u64().unwrap() >= 190, "the attacker's idle connections made room");
    drop(held);
}

#[test]
fn a_flood_of_drops_and_refusals_leaves_the_logs_bounded_privileged() {
    if !privileged() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = starwars("flood", "");
    let dir = std::path::PathBuf::from(format!("/run/porin/labs/{}", lab.name));
    let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len());
    let (agent0, proxy0) = (size("agent.log"), size("proxy.log"));
    let before = lab.counters()["drop_policy_denied"].as_u64().unwrap();
    // 5,000 connection attempts from the xwing: every SYN is dropped in the kernel.
    let to = SocketAddr::new(lab.addr("deathstar", false).parse().unwrap(), 80);
    lab.in_pod("xwing", move || {
        let socks: Vec<OwnedFd> = (0..5000)
            .filter_map(|_| {
                let fd = nix::sys::socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_NONBLOCK, None)
                    .ok()?;
                let dst: SockaddrStorage = to.into();
                let _ = nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &dst);
                Some(fd)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        drop(socks);
    });
    // 2,000 malformed requests from the tiefighter: every one refused by the proxy.
    lab.exec(
        "tiefighter",
        &["bash", "-c", "for i in $(seq 20); do curl -s -o /dev/null --path-as-is $(printf 'http://deathstar/a%%2fb?%s ' $(seq 100)); done"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let dropped = lab.counters()["drop_policy_denied"].as_u64().unwrap() - before;
    let rejected = proxy_status(&lab)["counters"]["rejected"].as_u64().unwrap();
    let (agent, proxy) = (size("agent.log") - agent0, size("proxy.log") - proxy0);
    eprintln!(
        "{dropped} packets dropped, {rejected} requests refused; logs grew by {agent} (agent) and {proxy} (proxy) bytes"
    );
    assert!(dropped >= 5000, "every SYN was dropped and counted: {dropped}");
    assert!(rejected >= 2000, "every malformed request was refused and counted: {rejected}");
    assert!(agent < 16 * 1024 && proxy < 16 * 1024, "logs grew by {agent} and {proxy} bytes");
    // The drops are in the flow records.
    let flows = porin().args(["observe", "--lab", &lab.name, "-o", "json", "--verdict", "DROPPED"]).output().unwrap();
    let n = String::from_utf8_lossy(&flows.stdout).lines().count();
    assert!(n >= 1000, "drop records: {n}");
}
