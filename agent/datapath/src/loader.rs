//! The eBPF datapath from userspace: the embedded object, loading it with maps pinned under bpffs,
//! attaching its tc programs through pinned TCX links, and writing map contents.
//!
//! Persistence: maps and links are pinned, so enforcement continues while the agent is down; a
//! restarted agent reopens the same maps and swaps its freshly loaded programs into the pinned links
//! atomically (`BPF_LINK_UPDATE`), never leaving an interface without a program. A pinned map whose
//! layout is not the object's (an upgrade changed its key, value or size) is replaced, not reopened
//! ([`retire_changed_maps`]): its entries are rebuilt (conntrack's flows are judged again).
//!
//! The TIME_WAIT listener lookup (`sk_lookup`) attaches to the agent's network namespace the same
//! way (pinned, replaced new-before-old).
//!
//! Services: the socket load balancer's programs attach to a cgroup (v2) through pinned links too;
//! a restarted agent attaches its new programs first, then lets the old links go, so connects are
//! never left untranslated. Service frontends and backend slots are generational like policy.
//!
//! Updates: [`Datapath::apply`] writes a snapshot's [`Desired`] contents into the *inactive*
//! generation as a diff against what that generation holds, then flips the generation word; new flows
//! see either the old policy or the new one. Established flows pass through conntrack throughout.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, SkLookup, SockOps, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use redirect_common::{
    IfaceValue, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, config, counter, lb, names, programs,
};

use crate::mapstate::{Desired, IpcacheSlot, LbService, PolicySlot};

/// The eBPF object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Conntrack and event settings written into the config map.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Established TCP idle timeout.
    pub ct_tcp: Duration,
    /// TCP timeout before the reply and while closing.
    pub ct_tcp_close: Duration,
    /// UDP and other protocols.
    pub ct_udp: Duration,
    /// ICMP echo.
    pub ct_icmp: Duration,
    /// Emit an event for every new allowed flow.
    pub verdict_events: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ct_tcp: Duration::from_secs(21_600),
            ct_tcp_close: Duration::from_secs(10),
            ct_udp: Duration::from_secs(60),
            ct_icmp: Duration::from_secs(30),
            verdict_events: true,
        }
    }
}

/// What an apply did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ApplyStats {
    /// Generation now active.
    pub generation: u32,
    /// Entries written (inserted or changed).
    pub written: usize,
    /// Entries removed.
    pub removed: usize,
    /// Policy entries in the active generation.
    pub policy_entries: usize,
    /// ipcache entries in the active generation.
    pub ipcache_entries: usize,
    /// Service frontends in the active generation.
    pub lb_frontends: usize,
    /// Time taken.
    pub micros: u128,
}

/// A loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    links_dir: PathBuf,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    ifaces: HashMap<MapData, u32, IfaceValue>,
    config: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    lb_services: HashMap<MapData, lb::ServiceKey, lb::ServiceValue>,
    lb_backends: HashMap<MapData, lb::BackendKey, lb::Addr>,
    lb_members: HashMap<MapData, lb::MemberKey, u8>,
}

fn take<T: TryFrom<aya::maps::Map>>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

/// Whether `dir` is a bpffs mount.
pub fn is_bpffs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC).unwrap_or(false)
}

/// Mounts bpffs on `dir` unless it already is one.
pub fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if is_bpffs(dir) {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), dir, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mount bpffs on {}", dir.display()))?;
    Ok(())
}

/// Removes the maps pinned in `maps_dir` whose type, key size, value size or capacity is not the
/// embedded object's: aya reopens a pinned map as it is, and programs built for another layout
/// would not verify against it (or, worse, read it wrongly). Returns what it removed and why.
pub fn retire_changed_maps(maps_dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).context("parse the eBPF object")?;
    let mut retired = Vec::new();
    let mut names: Vec<&String> = obj.maps.keys().collect();
    names.sort();
    for name in names {
        let def = &obj.maps[name];
        let pin = maps_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let why = match aya::maps::MapInfo::from_pin(&pin) {
            Ok(info) => {
                let kernel_type = info.map_type().map(|t| t as u32).ok();
                // The kernel rounds a ring buffer's size; aya sizes per-CPU event arrays itself.
                let sized =
                    !matches!(info.map_type(), Ok(aya::maps::MapType::RingBuf | aya::maps::MapType::PerfEventArray));
                let was = (kernel_type, info.key_size(), info.value_size(), info.max_entries());
                let now = (Some(def.map_type()), def.key_size(), def.value_size(), def.max_entries());
                let differs = was.0 != now.0 || was.1 != now.1 || was.2 != now.2 || (sized && was.3 != now.3);
                differs.then(|| {
                    format!(
                        "pinned: type {:?}, key {} B, value {} B, {} entries; the object's: type {}, key {} B, value {} B, {} entries",
                        was.0, was.1, was.2, was.3, def.map_type(), now.1, now.2, now.3
                    )
                })
            }
            Err(e) => Some(format!("unreadable ({e})")),
        };
        if let Some(why) = why {
            std::fs::remove_file(&pin).with_context(|| format!("remove {}", pin.display()))?;
            retired.push((name.clone(), why));
        }
    }
    Ok(retired)
}

impl Datapath {
    /// Loads the programs; maps are created under `bpffs/maps` or reopened when already pinned there.
    pub fn open(bpffs: &Path) -> anyhow::Result<Self> {
        if !is_bpffs(bpffs) {
            bail!("{} is not a bpffs mount (mount -t bpf bpf {})", bpffs.display(), bpffs.display());
        }
        let maps_dir = bpffs.join("maps");
        let links_dir = bpffs.join("links");
        for d in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        for (name, why) in retire_changed_maps(&maps_dir)? {
            tracing::warn!(map = %name, %why, "Pinned map replaced: its layout changed (its entries are rebuilt)");
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        // The whole verifier log, for working on the programs: PORIN_BPF_VERIFIER_LOG=1.
        if std::env::var_os("PORIN_BPF_VERIFIER_LOG").is_some() {
            loader.verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).context("load the eBPF object (needs root / CAP_BPF)")?;
        for name in [programs::FROM_ENDPOINT, programs::TO_ENDPOINT, programs::FROM_WORLD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()
                .with_context(|| format!("program {name}"))?;
            prog.load().with_context(|| format!("verify program {name}"))?;
        }
        for (name, _) in programs::SOCK {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()
                .with_context(|| format!("program {name}"))?;
            prog.load().with_context(|| format!("verify program {name}"))?;
        }
        let name = programs::SOCK_OPS;
        let prog: &mut SockOps = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()
            .with_context(|| format!("program {name}"))?;
        prog.load().with_context(|| format!("verify program {name}"))?;
        let name = programs::TIME_WAIT_LOOKUP;
        let prog: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()
            .with_context(|| format!("program {name}"))?;
        prog.load().with_context(|| format!("verify program {name}"))?;
        let ipcache = take(&mut ebpf, names::IPCACHE)?;
        let policy = take(&mut ebpf, names::POLICY)?;
        let ifaces = take(&mut ebpf, names::IFACES)?;
        let config = take(&mut ebpf, names::CONFIG)?;
        let counters = take(&mut ebpf, names::COUNTERS)?;
        let lb_services = take(&mut ebpf, names::LB_SERVICES)?;
        let lb_backends = take(&mut ebpf, names::LB_BACKENDS)?;
        let lb_members = take(&mut ebpf, names::LB_MEMBERS)?;
        Ok(Self { ebpf, links_dir, ipcache, policy, ifaces, config, counters, lb_services, lb_backends, lb_members })
    }

    /// The event ring buffer (call once).
    pub fn take_events(&mut self) -> anyhow::Result<crate::events::Events> {
        take(&mut self.ebpf, names::EVENTS).map(crate::events::Events)
    }

    fn link_pin(&self, ifname: &str, suffix: &str) -> PathBuf {
        // bpffs reserves names with dots.
        self.links_dir.join(format!("{ifname}_{suffix}"))
    }

    /// Attaches both programs to an endpoint's host-side interface. When links are already pinned for
    /// it (a previous agent), the new programs replace the old ones atomically.
    pub fn attach(&mut self, ifname: &str) -> anyhow::Result<()> {
        for (prog_name, attach, suffix) in [
            (programs::FROM_ENDPOINT, TcAttachType::Ingress, "in"),
            (programs::TO_ENDPOINT, TcAttachType::Egress, "out"),
        ] {
            self.attach_one(ifname, prog_name, attach, suffix)?;
        }
        Ok(())
    }

    /// Attaches the uplink program to the node's uplink interface (tc ingress): what comes from
    /// outside the node for the proxy reaches it there.
    pub fn attach_uplink(&mut self, ifname: &str) -> anyhow::Result<()> {
        self.attach_one(ifname, programs::FROM_WORLD, TcAttachType::Ingress, "world")
    }

    fn attach_one(&mut self, ifname: &str, prog_name: &str, attach: TcAttachType, suffix: &str) -> anyhow::Result<()> {
        let pin = self.link_pin(ifname, suffix);
        let prog: &mut SchedClassifier =
            self.ebpf.program_mut(prog_name).ok_or_else(|| anyhow!("program {prog_name}"))?.try_into()?;
        match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link: SchedClassifierLink = FdLink::from(old).try_into().context("pinned link is not TCX")?;
                match prog.attach_to_link(link) {
                    // Still pinned; the program now runs on it.
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        // The interface behind the pin is gone (re-created): start over.
                        tracing::debug!(%ifname, error = %e, "Stale link pin replaced");
                        let _ = std::fs::remove_file(&pin);
                    }
                }
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("open pinned link {}", pin.display())),
        }
        let id = prog
            .attach_with_options(ifname, attach, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .with_context(|| format!("attach {prog_name} to {ifname}"))?;
        let link: FdLink = prog.take_link(id)?.try_into().context("TCX link")?;
        link.pin(&pin).with_context(|| format!("pin {}", pin.display()))?;
        Ok(())
    }

    /// Attaches the socket load balancer to the cgroup (v2) directory `cgroup`: every process in it
    /// or below has its connects and sends to service frontends balanced. A link pinned by an
    /// earlier agent (on this or another cgroup) is let go only once the new one is attached.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        let dir = std::fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
        for (name, point) in programs::SOCK {
            self.replace_pinned(&format!("cgroup_{point}"), |ebpf| {
                let prog: &mut CgroupSockAddr =
                    ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name}"))?.try_into()?;
                // A link (kernels from 5.7) shares the cgroup with other programs whatever the
                // mode; the kernel refuses link flags, which `Single` leaves empty.
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
                prog.take_link(id)?.try_into().context("cgroup link")
            })?;
        }
        let name = programs::SOCK_OPS;
        self.replace_pinned("cgroup_sock_ops", |ebpf| {
            let prog: &mut SockOps = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name}"))?.try_into()?;
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
            prog.take_link(id)?.try_into().context("cgroup link")
        })?;
        Ok(())
    }

    /// Takes the socket load balancer off whatever cgroup it is attached to (removes its pinned
    /// links).
    pub fn detach_cgroup(&mut self) -> anyhow::Result<()> {
        for (_, point) in programs::SOCK {
            self.unpin_pair(&format!("cgroup_{point}"))?;
        }
        self.unpin_pair("cgroup_sock_ops")
    }

    /// Attaches the TIME_WAIT listener lookup (`sk_lookup`) to the agent's network namespace (the
    /// node's, where the proxy listens). The tc programs count on it: without it a SYN they hand
    /// to a TIME_WAIT socket would find no listener, or another one on its port.
    pub fn attach_time_wait_lookup(&mut self) -> anyhow::Result<()> {
        let netns = std::fs::File::open("/proc/self/ns/net").context("open /proc/self/ns/net")?;
        let name = programs::TIME_WAIT_LOOKUP;
        self.replace_pinned("netns_tw_lookup", |ebpf| {
            let prog: &mut SkLookup = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name}"))?.try_into()?;
            let id = prog.attach(&netns).with_context(|| format!("attach {name} to the network namespace"))?;
            Ok(prog.take_link(id)?.into())
        })
    }

    /// Attaches through one of two pinned links, `{stem}_a` and `{stem}_b`, taken in turn: the new
    /// link is pinned before the old one (an earlier agent's) is let go, so a failure or a crash in
    /// between leaves one attached, never none.
    fn replace_pinned(
        &mut self,
        stem: &str,
        attach: impl FnOnce(&mut Ebpf) -> anyhow::Result<FdLink>,
    ) -> anyhow::Result<()> {
        let pins = [self.links_dir.join(format!("{stem}_a")), self.links_dir.join(format!("{stem}_b"))];
        let (mut old, mut pin) = (None, pins[0].clone());
        for (p, other) in [(&pins[0], &pins[1]), (&pins[1], &pins[0])] {
            match PinnedLink::from_pin(p) {
                Ok(l) => {
                    old = Some(l);
                    pin = other.clone();
                }
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("open pinned link {}", p.display())),
            }
        }
        let link = attach(&mut self.ebpf)?;
        link.pin(&pin).with_context(|| format!("pin {}", pin.display()))?;
        if let Some(old) = old {
            // Unpinned and dropped: the old program leaves now that the new one runs.
            drop(old.unpin().with_context(|| format!("unpin the previous {stem} link"))?);
        }
        Ok(())
    }

    /// Removes the pinned links `{stem}_a` and `{stem}_b` (those there are).
    fn unpin_pair(&self, stem: &str) -> anyhow::Result<()> {
        for suffix in ["a", "b"] {
            let pin = self.links_dir.join(format!("{stem}_{suffix}"));
            match PinnedLink::from_pin(&pin) {
                Ok(link) => drop(link.unpin().with_context(|| format!("unpin {}", pin.display()))?),
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("open {}", pin.display())),
            }
        }
        Ok(())
    }

    /// Detaches from an interface (removes the pinned links).
    pub fn detach(&mut self, ifname: &str) -> anyhow::Result<()> {
        for suffix in ["in", "out", "world"] {
            let pin = self.link_pin(ifname, suffix);
            match PinnedLink::from_pin(&pin) {
                Ok(link) => drop(link.unpin().with_context(|| format!("unpin {}", pin.display()))?),
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("open {}", pin.display())),
            }
        }
        Ok(())
    }

    /// Interfaces with pinned links.
    pub fn attached(&self) -> Vec<String> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        if let Ok(dir) = std::fs::read_dir(&self.links_dir) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(ifname) = name
                    .strip_suffix("_in")
                    .or_else(|| name.strip_suffix("_out"))
                    .or_else(|| name.strip_suffix("_world"))
                {
                    out.insert(ifname.to_owned());
                }
            }
        }
        out.into_iter().collect()
    }

    /// Writes conntrack and event settings.
    pub fn configure(&mut self, s: &Settings) -> anyhow::Result<()> {
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        for (idx, v) in [
            (config::CT_TCP_SECS, secs(s.ct_tcp)),
            (config::CT_TCP_CLOSE_SECS, secs(s.ct_tcp_close)),
            (config::CT_UDP_SECS, secs(s.ct_udp)),
            (config::CT_ICMP_SECS, secs(s.ct_icmp)),
            (config::VERDICT_EVENTS, u32::from(s.verdict_events)),
        ] {
            self.config.set(idx, v, 0).with_context(|| format!("config[{idx}]"))?;
        }
        Ok(())
    }

    /// The active generation.
    pub fn generation(&self) -> anyhow::Result<u32> {
        Ok(self.config.get(&config::GENERATION, 0)?)
    }

    /// Applies desired contents: a diff into the inactive generation, then one flip.
    pub fn apply(&mut self, want: &Desired) -> anyhow::Result<ApplyStats> {
        let start = Instant::now();
        let active = self.generation()?;
        let target = if active == 0 { 1u8 } else { 0u8 };
        let mut stats = ApplyStats::default();

        // What the target generation holds now.
        let mut have_policy: BTreeMap<PolicySlot, PolicyValue> = BTreeMap::new();
        for item in self.policy.iter() {
            let (k, v) = item.context("read policy map")?;
            let d = k.data();
            if d.generation == target {
                let slot = PolicySlot {
                    prefix_len: k.prefix_len(),
                    direction: d.direction,
                    endpoint: d.endpoint,
                    identity: d.identity,
                    proto: d.proto,
                    port: u16::from_be_bytes(d.dport),
                };
                have_policy.insert(slot, v);
            }
        }
        let mut have_ipcache: BTreeMap<(u32, u8, [u8; 16]), IpcacheValue> = BTreeMap::new();
        for item in self.ipcache.iter() {
            let (k, v) = item.context("read ipcache map")?;
            let d = k.data();
            if d.generation == target {
                have_ipcache.insert((k.prefix_len(), d.family, d.addr), v);
            }
        }

        // Upserts (interfaces first: they are not generational and only ever added here).
        for (ifindex, v) in &want.ifaces {
            if self.ifaces.get(ifindex, 0).ok().as_ref() != Some(v) {
                self.ifaces.insert(ifindex, v, 0).context("write interface map")?;
                stats.written += 1;
            }
        }
        let want_ipcache: BTreeMap<(u32, u8, [u8; 16]), IpcacheValue> = want
            .ipcache
            .iter()
            .map(|(slot, v): (&IpcacheSlot, &IpcacheValue)| {
                let (fam, addr) = slot.family_addr();
                ((slot.prefix_len(), fam, addr), *v)
            })
            .collect();
        for (k, v) in &want_ipcache {
            if have_ipcache.get(k) != Some(v) {
                let key = Key::new(k.0, IpcacheKey { generation: target, family: k.1, _pad: [0; 2], addr: k.2 });
                self.ipcache.insert(&key, v, 0).context("write ipcache")?;
                stats.written += 1;
            }
        }
        for (slot, v) in &want.policy {
            if have_policy.get(slot) != Some(v) {
                self.policy.insert(&policy_key(slot, target), v, 0).context("write policy")?;
                stats.written += 1;
            }
        }
        // Stale entries of the target generation (shortest prefixes first: no transient exposure even
        // within the inactive generation).
        let mut stale: Vec<&PolicySlot> = have_policy.keys().filter(|s| !want.policy.contains_key(s)).collect();
        stale.sort_by_key(|s| s.prefix_len);
        for slot in stale {
            self.policy.remove(&policy_key(slot, target)).context("remove policy entry")?;
            stats.removed += 1;
        }
        for k in have_ipcache.keys().filter(|k| !want_ipcache.contains_key(k)) {
            let key = Key::new(k.0, IpcacheKey { generation: target, family: k.1, _pad: [0; 2], addr: k.2 });
            self.ipcache.remove(&key).context("remove ipcache entry")?;
            stats.removed += 1;
        }

        stats.lb_frontends = want.lb.len();
        self.write_lb(target, &want.lb, &mut stats)?;

        // The flip: one 4-byte write.
        self.config.set(config::GENERATION, u32::from(target), 0).context("flip generation")?;

        // Interfaces no endpoint owns any more: after the flip (their entries are already inactive).
        let stale_ifaces: Vec<u32> =
            self.ifaces.keys().filter_map(Result::ok).filter(|i| !want.ifaces.contains_key(i)).collect();
        for i in stale_ifaces {
            self.ifaces.remove(&i).context("remove interface")?;
            stats.removed += 1;
        }
        stats.generation = u32::from(target);
        stats.policy_entries = want.policy.len();
        stats.ipcache_entries = want_ipcache.len();
        stats.micros = start.elapsed().as_micros();
        Ok(stats)
    }

    /// Writes the service frontends, backend slots and memberships of generation `target` (inactive)
    /// as a diff against what it holds.
    fn write_lb(
        &mut self,
        target: u8,
        want: &BTreeMap<(u8, lb::Addr), LbService>,
        stats: &mut ApplyStats,
    ) -> anyhow::Result<()> {
        let mut want_svc = BTreeMap::new();
        let mut want_be = BTreeMap::new();
        let mut want_member = BTreeSet::new();
        for ((proto, frontend), s) in want {
            let key = lb::ServiceKey { generation: target, proto: *proto, _pad: [0; 2], frontend: *frontend };
            let count = u32::try_from(s.backends.len()).context("backend count")?;
            want_svc.insert(key, lb::ServiceValue { count, affinity_secs: s.affinity_secs });
            for (slot, b) in (0u32..).zip(&s.backends) {
                want_be.insert(lb::BackendKey { service: key, slot }, *b);
                want_member.insert(lb::MemberKey { service: key, backend: *b });
            }
        }
        let mut have_svc: BTreeMap<lb::ServiceKey, lb::ServiceValue> = BTreeMap::new();
        for item in self.lb_services.iter() {
            let (k, v) = item.context("read service map")?;
            if k.generation == target {
                have_svc.insert(k, v);
            }
        }
        let mut have_be: BTreeMap<lb::BackendKey, lb::Addr> = BTreeMap::new();
        for item in self.lb_backends.iter() {
            let (k, v) = item.context("read backend map")?;
            if k.service.generation == target {
                have_be.insert(k, v);
            }
        }
        let mut have_member: BTreeSet<lb::MemberKey> = BTreeSet::new();
        for k in self.lb_members.keys() {
            let k = k.context("read member map")?;
            if k.service.generation == target {
                have_member.insert(k);
            }
        }
        for (k, v) in &want_be {
            if have_be.get(k) != Some(v) {
                self.lb_backends.insert(k, v, 0).context("write service backend")?;
                stats.written += 1;
            }
        }
        for k in want_member.difference(&have_member) {
            self.lb_members.insert(k, 1, 0).context("write service member")?;
            stats.written += 1;
        }
        for (k, v) in &want_svc {
            if have_svc.get(k) != Some(v) {
                self.lb_services.insert(k, v, 0).context("write service")?;
                stats.written += 1;
            }
        }
        for k in have_svc.keys().filter(|k| !want_svc.contains_key(k)) {
            self.lb_services.remove(k).context("remove service")?;
            stats.removed += 1;
        }
        for k in have_be.keys().filter(|k| !want_be.contains_key(k)) {
            self.lb_backends.remove(k).context("remove service backend")?;
            stats.removed += 1;
        }
        for k in have_member.difference(&want_member) {
            self.lb_members.remove(k).context("remove service member")?;
            stats.removed += 1;
        }
        Ok(())
    }

    /// Counters summed over CPUs, indexed by `redirect_common::counter`.
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        (0..counter::LEN)
            .map(|i| Ok(self.counters.get(&i, 0).with_context(|| format!("counter {i}"))?.iter().sum()))
            .collect()
    }
}

fn policy_key(s: &PolicySlot, generation: u8) -> Key<PolicyKey> {
    Key::new(
        s.prefix_len,
        PolicyKey {
            generation,
            direction: s.direction,
            _pad: [0; 2],
            endpoint: s.endpoint,
            identity: s.identity,
            proto: s.proto,
            dport: s.port.to_be_bytes(),
            _pad2: 0,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bpffs of its own, unmounted and removed with what is pinned in it (also on panic).
    struct PinDir(PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("could not unmount {}: {e}", self.0.display());
            }
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!("could not remove {}: {e}", self.0.display());
            }
        }
    }

    fn bpftool_create(pin: &Path, kind: &str, def: &aya_obj::Map, value_size: u32) {
        let o = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(pin)
            .args(["type", kind, "key", &def.key_size().to_string(), "value", &value_size.to_string()])
            .args([
                "entries",
                &def.max_entries().to_string(),
                "name",
                "porin_test",
                "flags",
                &def.map_flags().to_string(),
            ])
            .output()
            .expect("bpftool (scripts/setup.sh installs it)");
        assert!(o.status.success(), "bpftool map create: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// An upgrade that changed a map's value size: the pinned map of the old layout is replaced;
    /// one of the object's layout is kept.
    #[test]
    fn pinned_maps_of_another_layout_are_replaced_privileged() {
        if !nix::unistd::Uid::effective().is_root() {
            assert!(!std::env::var("CI").is_ok_and(|v| v == "true"), "CI=true: needs root (bpffs, bpftool)");
            eprintln!("SKIPPED: needs root (bpffs, bpftool)");
            return;
        }
        let path = std::env::temp_dir().join(format!("porin-test-retire-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let dir = PinDir(path);
        ensure_bpffs(&dir.0).unwrap();
        let obj = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        let config = &obj.maps[names::CONFIG];
        let ifaces = &obj.maps[names::IFACES];
        bpftool_create(&dir.0.join(names::CONFIG), "array", config, config.value_size() * 2);
        bpftool_create(&dir.0.join(names::IFACES), "hash", ifaces, ifaces.value_size());
        let retired = retire_changed_maps(&dir.0).unwrap();
        assert_eq!(retired.len(), 1, "{retired:?}");
        assert_eq!(retired[0].0, names::CONFIG);
        assert!(retired[0].1.contains(&format!("value {} B", config.value_size() * 2)), "{}", retired[0].1);
        assert!(!dir.0.join(names::CONFIG).exists(), "the old layout's pin is gone");
        assert!(dir.0.join(names::IFACES).exists(), "a pin of the object's layout stays");
        assert!(retire_changed_maps(&dir.0).unwrap().is_empty(), "nothing more to replace");
    }
}
