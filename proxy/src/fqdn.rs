//! What the DNS proxy learned, kept in three places that must agree: the cache (names →
//! addresses, persisted across restarts), the in-memory view the proxy's own policy decisions read
//! (an address's names and FQDN selector identities), and the kernel's FQDN map (address →
//! selector identities), written through [`FqdnDatapath`] before an answer is released.
//!
//! The selector identities of an address depend on the snapshot (its `toFQDNs` selectors): a new
//! snapshot re-derives every address ([`FqdnState::resync`]). Expiry ([`FqdnState::expire`])
//! keeps addresses with live connections (the datapath's conntrack says which) until those end.
//!
//! Persistence: every answer that teaches a new address of a name is appended to a journal
//! (`<cache_file>.journal`, one JSON line, before the answer is released), and the whole cache is
//! written every second, emptying the journal. A proxy killed at any moment comes back with every
//! address it had released (refreshed expiries of the last second may come back shorter).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use policy_engine::fqdn::{CacheRow, FqdnCache, FqdnSelectors};
use policy_engine::identity::IdentityId;
use serde::Serialize;

/// The kernel side of learning: the datapath's FQDN map and conntrack. `porin proxy` implements
/// it over the pinned maps (`porin_datapath::fqdn`); this crate never links the eBPF loader.
pub trait FqdnDatapath: Send + Sync {
    /// Sets an address's selector identities (none: removes it).
    fn set(&self, ip: IpAddr, selectors: &[IdentityId]) -> io::Result<()>;
    /// Every address the map holds, with its selector identities.
    fn entries(&self) -> io::Result<Vec<(IpAddr, Vec<IdentityId>)>>;
    /// Destinations of the flows conntrack tracks (connections that keep an expired name's
    /// addresses alive).
    fn live_destinations(&self) -> io::Result<BTreeSet<IpAddr>>;
}

/// One learned address as the proxy's decisions see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnedAddr {
    /// The names it was learned under.
    pub names: Arc<[String]>,
    /// Their FQDN selector identities under the snapshot in force (sorted).
    pub selectors: Arc<[IdentityId]>,
}

/// Counters of learning.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FqdnStatus {
    /// Names in the cache.
    pub names: usize,
    /// Addresses known.
    pub addresses: usize,
    /// Kernel map writes that failed (the answer was not released: fail closed).
    pub datapath_errors: u64,
    /// Addresses with more selector identities than the kernel map holds (the rest do not
    /// apply in the kernel).
    pub selector_overflow: u64,
    /// Persisting the cache failed.
    pub persist_errors: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

struct Inner {
    cache: FqdnCache,
    selectors: Arc<FqdnSelectors>,
    /// The snapshot version the selectors come from.
    synced: Option<u64>,
    status: FqdnStatus,
    dirty: bool,
}

/// The learned state.
pub struct FqdnState {
    inner: Mutex<Inner>,
    view: ArcSwap<HashMap<IpAddr, Arc<LearnedAddr>>>,
    datapath: Option<Arc<dyn FqdnDatapath>>,
    persist: Option<PathBuf>,
    journal: Mutex<Option<std::fs::File>>,
}

/// One journal line: an answer learned.
#[derive(serde::Serialize, serde::Deserialize)]
struct Learned {
    names: Vec<String>,
    ips: Vec<IpAddr>,
    /// Unix seconds.
    expires: u64,
    endpoint: String,
}

fn journal_path(cache_file: &Path) -> PathBuf {
    let mut p = cache_file.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

fn open_journal(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

impl std::fmt::Debug for FqdnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FqdnState").field("persist", &self.persist).finish_non_exhaustive()
    }
}

/// Most selector identities the kernel map holds per address.
pub const KERNEL_MAX_SELECTORS: usize = redirect_common::FQDN_MAX_SELECTORS;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Plain values, each update whole: a panic elsewhere leaves nothing half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FqdnState {
    /// A state restored from `persist` (names that expired while the proxy was down are gone),
    /// writing the kernel through `datapath`.
    pub fn new(datapath: Option<Arc<dyn FqdnDatapath>>, persist: Option<PathBuf>) -> Self {
        let mut status = FqdnStatus::default();
        let mut cache = match persist.as_deref().map(read_cache) {
            Some(Ok(Some(c))) => c,
            Some(Err(e)) => {
                status.last_error = Some(e);
                FqdnCache::new()
            }
            _ => FqdnCache::new(),
        };
        let mut journal = None;
        let mut dirty = false;
        if let Some(file) = &persist {
            let jp = journal_path(file);
            let now = unix_now();
            if let Ok(text) = std::fs::read_to_string(&jp) {
                // A line cut short by a crash is the last one: the ones before it are whole.
                for l in text.lines().filter_map(|l| serde_json::from_str::<Learned>(l).ok()) {
                    if l.expires > now {
                        cache.learn(&l.names, &l.ips, l.expires - now, now, &l.endpoint);
                        dirty = true;
                    }
                }
            }
            match open_journal(&jp) {
                Ok(f) => journal = Some(f),
                Err(e) => {
                    status.persist_errors += 1;
                    status.last_error = Some(format!("{}: {e}", jp.display()));
                }
            }
        }
        Self {
            inner: Mutex::new(Inner { cache, selectors: Arc::default(), synced: None, status, dirty }),
            view: ArcSwap::from_pointee(HashMap::new()),
            datapath,
            persist,
            journal: Mutex::new(journal),
        }
    }

    /// What the proxy knows of an address.
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<LearnedAddr>> {
        self.view.load().get(&ip).cloned()
    }

    /// Makes the selectors those of `snap` (a no-op when they already are).
    pub fn sync_to(&self, snap: &policy_engine::snapshot::Snapshot) -> io::Result<()> {
        if lock(&self.inner).synced == Some(snap.version) {
            return Ok(());
        }
        self.resync(Arc::new(snap.fqdn().clone()), Some(snap.version))
    }

    /// The snapshot's selectors changed (or the proxy started): re-derive every address, and make
    /// the kernel map hold exactly that (stale entries of a previous run removed).
    pub fn resync(&self, selectors: Arc<FqdnSelectors>, version: Option<u64>) -> io::Result<()> {
        let mut inner = lock(&self.inner);
        inner.selectors = selectors;
        inner.synced = version;
        let now = unix_now();
        let live = std::cell::OnceCell::new();
        inner.cache.expire(now, |ip| live.get_or_init(|| self.live()).contains(&ip));
        let want: HashMap<IpAddr, Arc<LearnedAddr>> = inner
            .cache
            .ips()
            .into_iter()
            .map(|ip| (ip, Arc::new(derive(&inner.cache, &inner.selectors, ip))))
            .collect();
        let mut result = Ok(());
        if let Some(dp) = &self.datapath {
            let have: HashMap<IpAddr, Vec<IdentityId>> = match dp.entries() {
                Ok(e) => e.into_iter().collect(),
                Err(e) => {
                    result = Err(e);
                    HashMap::new()
                }
            };
            for ip in have.keys().filter(|ip| !want.contains_key(ip)) {
                if let Err(e) = dp.set(*ip, &[]) {
                    note_error(&mut inner.status, &e);
                    result = Err(e);
                }
            }
            for (ip, a) in &want {
                if have.get(ip).map(Vec::as_slice) != Some(kernel_part(&a.selectors))
                    && let Err(e) = self.write_kernel(dp.as_ref(), &mut inner.status, *ip, &a.selectors)
                {
                    result = Err(e);
                }
            }
        }
        inner.status.names = inner.cache.len();
        inner.status.addresses = want.len();
        self.view.store(Arc::new(want));
        result
    }

    /// Destinations of live connections (none known without the datapath).
    fn live(&self) -> BTreeSet<IpAddr> {
        self.datapath.as_ref().and_then(|d| d.live_destinations().ok()).unwrap_or_default()
    }

    fn write_kernel(
        &self,
        dp: &dyn FqdnDatapath,
        status: &mut FqdnStatus,
        ip: IpAddr,
        selectors: &[IdentityId],
    ) -> io::Result<()> {
        if selectors.len() > KERNEL_MAX_SELECTORS {
            status.selector_overflow += 1;
            crate::log_limited!(warn, %ip, selectors = selectors.len(), max = KERNEL_MAX_SELECTORS, "More FQDN selectors match an address than the kernel map holds: the rest do not apply in the kernel");
        }
        dp.set(ip, kernel_part(selectors)).inspect_err(|e| note_error(status, e))
    }

    /// Records an answer: `names` (the question and its CNAME chain) have `ips` for `ttl`
    /// seconds, learned from `endpoint`'s lookup. Every address whose selectors changed is in the
    /// kernel before this returns; an error means the answer must not be released.
    pub fn learn(&self, names: &[String], ips: &[IpAddr], ttl: u64, endpoint: &str) -> io::Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        let mut inner = lock(&self.inner);
        let now = unix_now();
        let changed = inner.cache.learn(names, ips, ttl, now, endpoint);
        inner.dirty = true;
        if changed.is_empty() {
            // A refresh of what is known: the cache file, written within a second, takes it (a
            // crash in between can only make the name expire earlier).
            return Ok(());
        }
        let line = Learned {
            names: names.to_vec(),
            ips: ips.to_vec(),
            expires: now.saturating_add(ttl),
            endpoint: endpoint.to_owned(),
        };
        self.append_journal(&mut inner.status, &line);
        let mut view: HashMap<IpAddr, Arc<LearnedAddr>> = HashMap::clone(&self.view.load());
        let mut result = Ok(());
        for ip in changed {
            let a = derive(&inner.cache, &inner.selectors, ip);
            let old = view.get(&ip).map(|o| o.selectors.clone());
            if let Some(dp) = &self.datapath
                && old.as_deref() != Some(&a.selectors[..])
                && let Err(e) = self.write_kernel(dp.as_ref(), &mut inner.status, ip, &a.selectors)
            {
                result = Err(e);
            }
            if a.names.is_empty() {
                view.remove(&ip);
            } else {
                view.insert(ip, Arc::new(a));
            }
        }
        inner.status.names = inner.cache.len();
        inner.status.addresses = view.len();
        self.view.store(Arc::new(view));
        result
    }

    /// Drops expired names; addresses with live connections stay until those end. Returns how
    /// many addresses changed.
    pub fn expire(&self) -> usize {
        let mut inner = lock(&self.inner);
        if inner.cache.next_expiry().is_none_or(|t| t > unix_now()) && !inner.cache.has_zombies() {
            return 0;
        }
        // Conntrack is read only when something expired (a scan of the whole table).
        let live = std::cell::OnceCell::new();
        let changed = inner.cache.expire(unix_now(), |ip| live.get_or_init(|| self.live()).contains(&ip));
        if changed.is_empty() {
            return 0;
        }
        inner.dirty = true;
        let mut view: HashMap<IpAddr, Arc<LearnedAddr>> = HashMap::clone(&self.view.load());
        for ip in &changed {
            let a = derive(&inner.cache, &inner.selectors, *ip);
            // A failed write is counted in the status; the next expiry or resync writes again.
            if let Some(dp) = &self.datapath
                && self.write_kernel(dp.as_ref(), &mut inner.status, *ip, &a.selectors).is_err()
            {
                inner.dirty = true;
            }
            if a.names.is_empty() {
                view.remove(ip);
            } else {
                view.insert(*ip, Arc::new(a));
            }
        }
        inner.status.names = inner.cache.len();
        inner.status.addresses = view.len();
        self.view.store(Arc::new(view));
        changed.len()
    }

    /// Appends a learned answer to the journal (a failure is counted; the cache file, written
    /// every second, still takes it).
    fn append_journal(&self, status: &mut FqdnStatus, line: &Learned) {
        use std::io::Write as _;
        let mut j = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(file) = j.as_mut() else { return };
        let written = serde_json::to_vec(line).map_err(io::Error::other).and_then(|mut bytes| {
            bytes.push(b'\n');
            file.write_all(&bytes)
        });
        if let Err(e) = written {
            status.persist_errors += 1;
            status.last_error = Some(format!("FQDN journal: {e}"));
        }
    }

    /// Writes the cache to its file if it changed (atomically: a temporary file renamed over it),
    /// then empties the journal (under the lock: no answer is learned in between).
    pub fn persist(&self) {
        let Some(path) = &self.persist else { return };
        let mut inner = lock(&self.inner);
        if !inner.dirty {
            return;
        }
        let written = serde_json::to_vec(&inner.cache)
            .map_err(io::Error::other)
            .and_then(|text| write_atomic(path, &text))
            .and_then(|()| {
                let j = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
                j.as_ref().map_or(Ok(()), |f| f.set_len(0))
            });
        match written {
            Ok(()) => inner.dirty = false,
            Err(e) => {
                inner.status.persist_errors += 1;
                inner.status.last_error = Some(format!("{}: {e}", path.display()));
            }
        }
    }

    /// `porin fqdn cache list`.
    pub fn rows(&self) -> Vec<CacheRow> {
        lock(&self.inner).cache.rows(unix_now())
    }

    /// The status.
    pub fn status(&self) -> FqdnStatus {
        lock(&self.inner).status.clone()
    }
}

/// The selector identities the kernel map holds of an address's.
fn kernel_part(selectors: &[IdentityId]) -> &[IdentityId] {
    selectors.get(..KERNEL_MAX_SELECTORS).unwrap_or(selectors)
}

fn note_error(status: &mut FqdnStatus, e: &io::Error) {
    status.datapath_errors += 1;
    status.last_error = Some(format!("FQDN map: {e}"));
}

fn derive(cache: &FqdnCache, selectors: &FqdnSelectors, ip: IpAddr) -> LearnedAddr {
    let names = cache.names_of(ip);
    LearnedAddr {
        selectors: selectors.identities_of(names.iter().copied()).into(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
    }
}

fn read_cache(path: &Path) -> Result<Option<FqdnCache>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| format!("{}: {e} (starting empty)", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e} (starting empty)", path.display())),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_engine::dns::NamePattern;

    /// The kernel map as a table (the real one is exercised by the privileged tests).
    #[derive(Default)]
    struct Table(Mutex<HashMap<IpAddr, Vec<IdentityId>>>, Mutex<BTreeSet<IpAddr>>);

    impl FqdnDatapath for Table {
        fn set(&self, ip: IpAddr, selectors: &[IdentityId]) -> io::Result<()> {
            let mut t = self.0.lock().unwrap();
            if selectors.is_empty() {
                t.remove(&ip);
            } else {
                t.insert(ip, selectors.to_vec());
            }
            Ok(())
        }
        fn entries(&self) -> io::Result<Vec<(IpAddr, Vec<IdentityId>)>> {
            Ok(self.0.lock().unwrap().iter().map(|(k, v)| (*k, v.clone())).collect())
        }
        fn live_destinations(&self) -> io::Result<BTreeSet<IpAddr>> {
            Ok(self.1.lock().unwrap().clone())
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn learning_writes_the_kernel_and_the_view_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("porin-fqdn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cache.json");
        let table = Arc::new(Table::default());
        // A stale entry from an earlier run.
        table.set(ip("192.0.2.99"), &[7]).unwrap();
        let sels = Arc::new(FqdnSelectors::new([(NamePattern::Name("api.example.com.".into()), 100)]));
        let s = FqdnState::new(Some(table.clone()), Some(file.clone()));
        s.resync(sels.clone(), None).unwrap();
        assert!(table.entries().unwrap().is_empty(), "stale entries removed");
        s.learn(&["alias.example.com.".into(), "api.example.com.".into()], &[ip("192.0.2.1")], 60, "default/client")
            .unwrap();
        assert_eq!(table.0.lock().unwrap().get(&ip("192.0.2.1")), Some(&vec![100]));
        let a = s.lookup(ip("192.0.2.1")).unwrap();
        assert_eq!(&a.names[..], ["alias.example.com.", "api.example.com."]);
        assert_eq!(&a.selectors[..], [100]);
        // A name no selector matches: in the cache, nothing in the kernel.
        s.persist();
        // Learned after the last write of the cache: only in the journal when the proxy dies.
        s.learn(&["other.test.".into()], &[ip("192.0.2.2")], 60, "default/client").unwrap();
        assert!(!table.0.lock().unwrap().contains_key(&ip("192.0.2.2")));
        drop(s);
        // A new proxy: restored from the file and the journal; a new snapshot selects more.
        let s2 = FqdnState::new(Some(table.clone()), Some(file));
        let more = Arc::new(FqdnSelectors::new([
            (NamePattern::Name("api.example.com.".into()), 100),
            (NamePattern::Pattern("*.test.".into()), 101),
        ]));
        s2.resync(more, None).unwrap();
        assert_eq!(table.0.lock().unwrap().get(&ip("192.0.2.2")), Some(&vec![101]));
        assert_eq!(s2.rows().len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
