//! Hubble's flow exporter: the node's flows written to a file as JSON lines
//! (`GetFlowsResponse`, as Hubble's exporter writes them), rotated by size, filtered by Hubble's
//! allow and deny lists, optionally cut down to a field mask.
//!
//! The exporter follows the ring like any reader: flows the ring let go before it wrote them are
//! not lost silently — a `lost_events` line says how many (`HUBBLE_RING_BUFFER`), and
//! [`Exporter::lost`] counts them. A write that fails is counted and logged (rate-limited by the
//! caller's log filter) and the exporter goes on with the next flow.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use serde_json::Value;

use crate::convert;
use crate::filter::{FilterError, Filters};
use crate::pb::flow::FlowFilter;
use crate::ring::FlowRing;

/// Most flows read from the ring at once.
const PAGE: usize = 1024;

/// What to export and where.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The file (its directory must exist).
    pub path: PathBuf,
    /// Rotate once the file passes this many bytes (Hubble's default: 10 MB).
    pub max_bytes: usize,
    /// Rotated files kept: `PATH.1` (newest) … `PATH.N` (Hubble's default: 5).
    pub max_backups: usize,
    /// Only flows any of these match (none: every flow), as Hubble's `--export-allowlist`.
    pub allow: Vec<FlowFilter>,
    /// No flow any of these match, as Hubble's `--export-denylist`.
    pub deny: Vec<FlowFilter>,
    /// Only these fields of each flow (dotted paths: `time`, `source.pod_name`); none: all.
    pub fieldmask: Vec<String>,
}

impl ExportConfig {
    /// A configuration with Hubble's defaults.
    pub fn new(path: PathBuf) -> Self {
        Self { path, max_bytes: 10 * 1024 * 1024, max_backups: 5, allow: vec![], deny: vec![], fieldmask: vec![] }
    }

    /// Parses a filter list as Hubble's exporter takes it: JSON `FlowFilter` objects, one per
    /// line or as a JSON array.
    pub fn filters(text: &str) -> Result<Vec<FlowFilter>, String> {
        let text = text.trim();
        if text.starts_with('[') {
            return serde_json::from_str(text).map_err(|e| format!("filter list: {e}"));
        }
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("filter {l:?}: {e}")))
            .collect()
    }
}

/// A running exporter's figures.
#[derive(Debug, Default)]
pub struct Exporter {
    written: AtomicU64,
    lost: AtomicU64,
    failed: AtomicU64,
}

impl Exporter {
    /// Flows written.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Flows the ring let go before the exporter wrote them.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Lines that could not be written.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Why the exporter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A filter does not compile.
    #[error("{0}")]
    Filter(#[from] FilterError),
    /// The file cannot be written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A size or count out of range.
    #[error("{0}")]
    Setting(&'static str),
}

/// Checks the configuration (filters, sizes, that the file can be opened for appending) and starts
/// exporting the flows that arrive from now on (the task runs until it is aborted).
pub fn start(
    ring: Arc<FlowRing>,
    node: Arc<str>,
    config: ExportConfig,
) -> Result<(Arc<Exporter>, tokio::task::JoinHandle<()>), ExportError> {
    let filters = Filters::new(&config.allow, &config.deny)?;
    if config.max_bytes == 0 {
        return Err(ExportError::Setting("the export file's maximum size must be above 0"));
    }
    // `file-rotate` creates what is missing and swallows an open failure (it then writes
    // nowhere): find out here, and after every rotation (`run`).
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.path)
        .map_err(|source| ExportError::File { path: config.path.clone(), source })?;
    let figures = Arc::new(Exporter::default());
    let out = FileRotate::new(
        &config.path,
        AppendCount::new(config.max_backups),
        ContentLimit::BytesSurpassed(config.max_bytes),
        Compression::None,
        None,
    );
    let task = tokio::spawn(run(ring, node, filters, config, out, figures.clone()));
    Ok((figures, task))
}

async fn run(
    ring: Arc<FlowRing>,
    node: Arc<str>,
    filters: Filters,
    config: ExportConfig,
    out: FileRotate<AppendCount>,
    figures: Arc<Exporter>,
) {
    let mut newest = ring.subscribe();
    let mut cursor = ring.last();
    let mut losses = ring.next_loss();
    let mut out = Some(out);
    loop {
        // Events lost before they became flows: a line each, before the first flow after them.
        let mut pending = ring.losses(losses, u64::MAX).into_iter().peekable();
        let read = ring.after(cursor, PAGE);
        let mut lines = Vec::new();
        if read.missed > 0 {
            figures.lost.fetch_add(read.missed, Ordering::Relaxed);
            lines.push(lost_line("HUBBLE_RING_BUFFER", read.missed, &node));
        }
        let mut told = |before: u64, lines: &mut Vec<Option<String>>| {
            while let Some(l) = pending.next_if(|l| l.after < before) {
                lines.push(lost_line(l.source.name(), l.count, &node));
                losses = l.id + 1;
            }
        };
        for (n, f) in &read.flows {
            told(*n, &mut lines);
            let uuid = ring.uuid(*n);
            if filters.admit(f, &uuid, &node) {
                lines.push(flow_line(convert::to_pb(f, uuid, &node), &node, &config.fieldmask));
            }
        }
        cursor = read.flows.last().map_or(read.last.max(cursor), |(n, _)| *n);
        told(cursor.saturating_add(1), &mut lines);
        let lines: Vec<String> = lines.into_iter().flatten().collect();
        // File I/O (and rotation's renames) off the runtime: the agent's event reader shares it.
        if let Some(file) = out.take_if(|_| !lines.is_empty()) {
            let (path, figures) = (config.path.clone(), figures.clone());
            match tokio::task::spawn_blocking(move || write_lines(file, &lines, &path, &figures)).await {
                Ok(file) => out = Some(file),
                Err(e) => {
                    tracing::error!(error = %e, "Flow export stopped");
                    return;
                }
            }
        }
        if read.flows.len() < PAGE && newest.changed().await.is_err() {
            return;
        }
    }
}

/// Writes `lines`, one write each (the file rotates between lines, never inside one); counts
/// what was and was not written. A file gone after a rotation (the rotator could not reopen it:
/// it then writes nowhere and says nothing) counts the batch as failed.
fn write_lines(
    mut out: FileRotate<AppendCount>,
    lines: &[String],
    path: &std::path::Path,
    figures: &Exporter,
) -> FileRotate<AppendCount> {
    let mut written = 0;
    for line in lines {
        match out.write_all(line.as_bytes()) {
            Ok(()) => written += 1,
            Err(e) => {
                tracing::warn!(error = %e, "Flow export: a line could not be written");
                figures.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if let Err(e) = out.flush() {
        tracing::warn!(error = %e, "Flow export: flush failed");
    }
    if path.exists() {
        figures.written.fetch_add(written, Ordering::Relaxed);
    } else {
        tracing::warn!(path = %path.display(), "Flow export: the file is gone (could not be reopened after rotating)");
        figures.failed.fetch_add(written, Ordering::Relaxed);
    }
    out
}

fn lost_line(source: &str, n: u64, node: &str) -> Option<String> {
    let v = serde_json::json!({
        "lost_events": {"source": source, "num_events_lost": n},
        "node_name": node,
        "time": porin_flow::flow::now_rfc3339(),
    });
    Some(format!("{v}\n"))
}

fn flow_line(flow: crate::pb::flow::Flow, node: &str, mask: &[String]) -> Option<String> {
    let time = flow.time;
    let mut flow = serde_json::to_value(&flow).ok()?;
    if !mask.is_empty() {
        flow = masked(&flow, mask);
    }
    let line = serde_json::json!({"flow": flow, "node_name": node, "time": time});
    Some(format!("{line}\n"))
}

/// The fields of `v` named by `mask` (dotted paths), and nothing else.
fn masked(v: &Value, mask: &[String]) -> Value {
    let mut out = Value::Object(serde_json::Map::new());
    for path in mask {
        let keys: Vec<&str> = path.split('.').collect();
        let Some(found) = keys.iter().try_fold(v, |at, k| at.get(*k)) else { continue };
        let mut at = &mut out;
        for (i, k) in keys.iter().enumerate() {
            let Value::Object(map) = at else { break };
            at = if i + 1 == keys.len() {
                map.insert((*k).to_owned(), found.clone());
                break;
            } else {
                map.entry((*k).to_owned()).or_insert_with(|| Value::Object(serde_json::Map::new()))
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use porin_flow::flow::{Flow, FlowEndpoint, Verdict};

    fn flow(pod: &str, verdict: Verdict) -> Flow {
        Flow {
            verdict,
            source: FlowEndpoint { namespace: "default".into(), pod_name: pod.into(), ..FlowEndpoint::default() }
                .into(),
            summary: "x".repeat(200),
            ..Flow::default()
        }
    }

    #[test]
    fn masks_keep_only_the_named_fields() {
        let v = serde_json::json!({"time": "t", "verdict": "DROPPED", "source": {"pod_name": "a", "namespace": "n"}});
        let m = masked(&v, &["verdict".into(), "source.pod_name".into(), "nope.x".into()]);
        assert_eq!(m, serde_json::json!({"verdict": "DROPPED", "source": {"pod_name": "a"}}));
    }

    #[test]
    fn filter_lists_parse_as_hubble_writes_them() {
        let lines = ExportConfig::filters("{\"source_pod\":[\"default/\"]}\n\n{\"verdict\":[\"DROPPED\"]}\n").unwrap();
        assert_eq!(lines.len(), 2);
        let array = ExportConfig::filters("[{\"verdict\":[\"DROPPED\"]}]").unwrap();
        assert_eq!(array.len(), 1);
        assert!(ExportConfig::filters("{\"nope\":1}").unwrap_err().contains("nope"));
    }

    #[tokio::test]
    async fn exports_filtered_lines_rotates_and_reports_losses() {
        struct Dir(PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ignored = std::fs::remove_dir_all(&self.0);
            }
        }
        let guard = Dir(std::env::temp_dir().join(format!("porin-export-test-{}", std::process::id())));
        let dir = guard.0.clone();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let ring = Arc::new(FlowRing::new(8));
        let mut config = ExportConfig::new(path.clone());
        config.max_bytes = 2000;
        config.max_backups = 2;
        config.deny = ExportConfig::filters("{\"source_pod\":[\"default/quiet\"]}").unwrap();
        config.fieldmask = vec!["verdict".into(), "source.pod_name".into(), "Summary".into()];
        let (figures, task) = start(ring.clone(), Arc::from("n1"), config).unwrap();
        tokio::task::yield_now().await;
        for i in 0..30 {
            let pod = if i % 3 == 0 { "quiet" } else { "loud" };
            ring.push_numbered(|seq| Flow { seq, ..flow(pod, Verdict::Dropped) });
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // Twenty flows pass the deny list; a burst past the ring's capacity is reported lost.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while figures.written() < 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(figures.written(), 20, "lost {} failed {}", figures.lost(), figures.failed());
        // The kernel lost five events: a line says so, in its place.
        ring.lost(crate::ring::LostSource::PerfEventRingBuffer, 5);
        ring.extend((0..20).map(|_| flow("loud", Verdict::Forwarded)));
        while figures.lost() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(figures.lost(), 12, "20 pushed at once into a ring of 8");
        task.abort();
        let mut lines = Vec::new();
        for p in [dir.join("flows.jsonl.2"), dir.join("flows.jsonl.1"), path.clone()] {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            assert!(text.len() < 2000 + 400, "{} rotated late: {} bytes", p.display(), text.len());
            lines.extend(text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
        }
        assert!(dir.join("flows.jsonl.1").exists() && !dir.join("flows.jsonl.3").exists(), "two backups kept");
        let flows: Vec<&Value> = lines.iter().filter_map(|l| l.get("flow")).collect();
        assert!(flows.iter().all(|f| f["source"]["pod_name"] == "loud" && f.get("time").is_none()), "{flows:?}");
        assert!(lines.iter().any(|l| l["lost_events"]["num_events_lost"] == 12), "{lines:?}");
        let perf = lines.iter().position(|l| l["lost_events"]["source"] == "PERF_EVENT_RING_BUFFER");
        assert!(perf.is_some_and(|i| lines[i]["lost_events"]["num_events_lost"] == 5), "{lines:?}");
    }
}
