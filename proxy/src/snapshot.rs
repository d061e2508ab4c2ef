//! Policy snapshots from the agent.
//!
//! The channel is a file: the agent writes the [`PolicyInputs`] of every good policy version to a
//! temporary file and renames it over the published path, so a reader always sees a whole version.
//! The proxy checks the file's identity (inode, size, modification time) every poll interval,
//! resolves a new version with the same engine, and swaps it in atomically; requests already
//! decided keep their snapshot, the next request uses the new one. A missing, unreadable or
//! invalid file never replaces a good snapshot: the last good one keeps enforcing (also while the
//! agent is down), and a restarted proxy starts from the last version the agent published.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use policy_engine::inputs::PolicyInputs;
use policy_engine::snapshot::Snapshot;
use serde::Serialize;

use porin_flow::flow::now_rfc3339;

/// What the status command reports about the snapshot source.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SnapshotStatus {
    /// The published file.
    pub path: String,
    /// Version enforced (none: nothing loaded yet, every request is denied).
    pub version: Option<u64>,
    /// When it was loaded.
    pub loaded_at: Option<String>,
    /// Endpoints in it.
    pub endpoints: usize,
    /// Why the newest published file was not taken (the last good version keeps enforcing).
    pub last_error: Option<String>,
    /// Versions loaded since start.
    pub loads: u64,
}

/// The snapshot in force, shared by every connection: swapped atomically (`arc-swap`, no lock to
/// poison), read without blocking on every connection and after every swap.
#[derive(Debug, Default)]
pub struct PolicyState {
    current: ArcSwapOption<Snapshot>,
    status: Mutex<SnapshotStatus>,
    /// When the snapshot in force was installed.
    installed: Mutex<Option<std::time::Instant>>,
}

/// Identity of a published file version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// Polls a file every so often for a new version (its inode, size or modification time): what
/// follows the published snapshot and the mesh credentials.
pub(crate) struct FileWatch {
    path: PathBuf,
    seen: Option<Stamp>,
    tick: tokio::time::Interval,
}

impl FileWatch {
    /// Watches `path` every `every`; `loaded`: the version there now is already in force.
    pub(crate) fn new(path: PathBuf, every: Duration, loaded: bool) -> Self {
        let seen = if loaded { stamp(&path) } else { None };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { path, seen, tick }
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for a version not seen yet (a missing file is none).
    pub(crate) async fn changed(&mut self) {
        loop {
            self.tick.tick().await;
            let now = stamp(&self.path);
            if now.is_some() && now != self.seen {
                self.seen = now;
                return;
            }
        }
    }
}

/// Reads and resolves a published inputs file.
pub fn load(path: &Path) -> Result<Snapshot, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let inputs: PolicyInputs = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    inputs.resolve().map_err(|errs| format!("{}: {}", path.display(), errs.join("; ")))
}

impl PolicyState {
    /// An empty state: no snapshot, every request denied.
    pub fn new(path: &Path) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            status: Mutex::new(SnapshotStatus { path: path.display().to_string(), ..Default::default() }),
            installed: Mutex::new(None),
        }
    }

    /// The snapshot in force.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    fn status_mut(&self) -> MutexGuard<'_, SnapshotStatus> {
        // Plain values: a panic elsewhere cannot leave them half-written, so a poisoned lock is
        // taken as it is (the status must keep telling the truth).
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a snapshot in force; the status says so only once it is.
    pub fn install(&self, snap: Snapshot) {
        let (version, endpoints) = (snap.version, snap.endpoints().len());
        self.current.store(Some(Arc::new(snap)));
        let mut s = self.status_mut();
        s.version = Some(version);
        s.endpoints = endpoints;
        s.loaded_at = Some(now_rfc3339());
        s.last_error = None;
        s.loads += 1;
        drop(s);
        *self.installed.lock().unwrap_or_else(PoisonError::into_inner) = Some(std::time::Instant::now());
        tracing::info!(version, endpoints, "Policy snapshot in force");
    }

    /// Records why a published version was not taken.
    pub fn reject(&self, error: String) {
        tracing::warn!(%error, "Policy snapshot not taken; the last good one keeps enforcing");
        self.status_mut().last_error = Some(error);
    }

    /// How long the snapshot in force has been (none: nothing loaded yet).
    pub fn age(&self) -> Option<Duration> {
        self.installed.lock().unwrap_or_else(PoisonError::into_inner).map(|t| t.elapsed())
    }

    /// The status.
    pub fn status(&self) -> SnapshotStatus {
        self.status_mut().clone()
    }
}

/// Follows the published file until the task is dropped.
pub async fn follow(state: Arc<PolicyState>, path: PathBuf, every: Duration) {
    let mut watch = FileWatch::new(path, every, false);
    loop {
        watch.changed().await;
        let p = watch.path().to_owned();
        match tokio::task::spawn_blocking(move || load(&p)).await {
            Ok(Ok(snap)) => state.install(snap),
            Ok(Err(e)) => state.reject(e),
            Err(e) => state.reject(format!("loading {}: {e}", watch.path().display())),
        }
    }
}
