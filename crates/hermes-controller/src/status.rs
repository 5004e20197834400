//! Image reports: the reconciler's [`ImageStatus`] plus what building the image cost (build
//! seconds, bytes read from the registry), its last error and its pods' starts as nodes
//! reported them ([`StartStats`]) — the content of a `HermesImage` status, of `GET /v1/images`
//! and of `hermes status`.
//!
//! [`ReportBook`] keeps them, and when given a directory keeps them durably there, one JSON file
//! per image (`<manifest hex>.json`, written atomically, only when the report changed), so a
//! restarted controller shows what it knew and keeps counting from there.
//!
//! Reports follow the statuses of running images. An image that stops running keeps its report
//! while its record is in the store (until garbage collection); other reports are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hermes_oci::Digest;
use serde::{Deserialize, Serialize};

use crate::reconcile::{ImageStatus, Phase, PolicyStatus};
use crate::starts::{PodStart, StartStats};
use crate::{Error, Result};

/// The reason given to an indexed image no container runs any more.
pub const NOT_RUNNING: &str =
    "no running container uses it; its artifacts stay until garbage collection";

/// One image: its status and build statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReport {
    /// The reconciler's status.
    #[serde(flatten)]
    pub status: ImageStatus,
    /// Seconds spent building the image's layers (every attempt, shared layers counted for
    /// each image that waited on them).
    pub build_seconds: f64,
    /// Layer bytes read from the registry for the image.
    pub bytes_read: u64,
    /// The last error seen while resolving or building the image; cleared when it is `Ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the report last changed (Unix seconds).
    pub updated_at_unix: u64,
    /// Its pods' starts: lazy starts, fallbacks and the last pods.
    #[serde(default, skip_serializing_if = "StartStats::is_empty")]
    pub starts: StartStats,
}

/// Most images whose starts [`ReportBook`] keeps before their report exists (a node may report
/// a pull before the controller has seen the pod run).
pub const MAX_EARLY_STARTS: usize = 256;

/// A policy's status with its name (for `GET /v1/policies` and `hermes status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    /// The policy's name.
    pub name: String,
    /// Its status.
    #[serde(flatten)]
    pub status: PolicyStatus,
}

/// A phase change, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseChange {
    /// The image.
    pub digest: Digest,
    /// Its reference.
    pub reference: String,
    /// The phase before (`None` for a new image).
    pub from: Option<Phase>,
    /// The phase now.
    pub to: Phase,
    /// The reason now.
    pub reason: Option<String>,
}

/// The reports (see the module docs).
#[derive(Debug, Default)]
pub struct ReportBook {
    dir: Option<PathBuf>,
    reports: BTreeMap<Digest, ImageReport>,
    /// Starts of images without a report yet (at most [`MAX_EARLY_STARTS`] images).
    early: BTreeMap<Digest, StartStats>,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl ReportBook {
    /// Reports kept in memory only.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Reports kept in `dir` (created if missing), loading those already there. Unreadable
    /// files are skipped with a warning (a report is rebuilt on the next pass anyway).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let mut reports = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let path = entry.map_err(io_err("list", &dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<ImageReport>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(report) => {
                    reports.insert(report.status.digest.clone(), report);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable image report")
                }
            }
        }
        Ok(Self {
            dir: Some(dir),
            reports,
            early: BTreeMap::new(),
        })
    }

    /// Every report, by digest.
    pub fn reports(&self) -> impl Iterator<Item = &ImageReport> {
        self.reports.values()
    }

    /// One report.
    pub fn get(&self, digest: &Digest) -> Option<&ImageReport> {
        self.reports.get(digest)
    }

    /// Count a layer build attempt for every image whose layers include `layer`.
    pub fn record_layer(
        &mut self,
        layer: &Digest,
        seconds: f64,
        bytes_read: u64,
        error: Option<&str>,
    ) {
        for report in self.reports.values_mut() {
            if report.status.layers.iter().any(|l| l.digest == *layer) {
                report.build_seconds += seconds;
                report.bytes_read += bytes_read;
                if let Some(e) = error {
                    report.last_error = Some(e.to_owned());
                }
            }
        }
    }

    /// Remember an error for an image (e.g. its manifest could not be resolved).
    pub fn note_error(&mut self, digest: &Digest, error: &str) {
        if let Some(report) = self.reports.get_mut(digest) {
            report.last_error = Some(error.to_owned());
        }
    }

    /// Count a pod's start of the image `manifest` and write its report. Starts of an image
    /// without a report yet are kept (at most [`MAX_EARLY_STARTS`] images; further ones are
    /// dropped) and folded into its report when it appears.
    pub fn record_start(&mut self, manifest: &Digest, start: PodStart) -> Result<()> {
        let Some(report) = self.reports.get_mut(manifest) else {
            if self.early.len() < MAX_EARLY_STARTS || self.early.contains_key(manifest) {
                self.early
                    .entry(manifest.clone())
                    .or_default()
                    .record(start);
            }
            return Ok(());
        };
        report.starts.record(start);
        let report = report.clone();
        self.write(&report)
    }

    /// Forget an image (its record was collected).
    pub fn remove(&mut self, digest: &Digest) -> Result<()> {
        self.reports.remove(digest);
        match &self.dir {
            Some(dir) => {
                let path = dir.join(format!("{}.json", digest.hex()));
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(io_err("delete", &path)(e))
                    }
                    _ => Ok(()),
                }
            }
            None => Ok(()),
        }
    }

    /// Take a reconcile pass's statuses: reports follow them, keeping their statistics;
    /// images that stopped running keep their report while `recorded` (the store) holds their
    /// record. Changed reports are written. Returns the phase changes.
    pub fn update(
        &mut self,
        statuses: Vec<ImageStatus>,
        recorded: &BTreeSet<Digest>,
        now: SystemTime,
    ) -> Result<Vec<PhaseChange>> {
        let mut changes = Vec::new();
        let mut next: BTreeMap<Digest, ImageReport> = BTreeMap::new();
        for status in statuses {
            let old = self.reports.get(&status.digest);
            let mut report = ImageReport {
                build_seconds: old.map_or(0.0, |o| o.build_seconds),
                bytes_read: old.map_or(0, |o| o.bytes_read),
                last_error: old.and_then(|o| o.last_error.clone()),
                updated_at_unix: old.map_or(0, |o| o.updated_at_unix),
                starts: old.map(|o| o.starts.clone()).unwrap_or_default(),
                status,
            };
            if let Some(early) = self.early.remove(&report.status.digest) {
                report.starts.lazy_starts += early.lazy_starts;
                report.starts.fallbacks += early.fallbacks;
                for start in early.last_pods.into_iter().rev() {
                    report.starts.last_pods.insert(0, start);
                }
                report.starts.last_pods.truncate(crate::starts::LAST_PODS);
            }
            match report.status.phase {
                Phase::Ready => report.last_error = None,
                Phase::Failed => report.last_error.clone_from(&report.status.reason),
                _ => {}
            }
            next.insert(report.status.digest.clone(), report);
        }
        for (digest, old) in &self.reports {
            if next.contains_key(digest) || !recorded.contains(digest) {
                continue;
            }
            let mut kept = old.clone();
            kept.status.pods = 0;
            kept.status.phase = Phase::Ready;
            kept.status.reason = Some(NOT_RUNNING.to_owned());
            next.insert(digest.clone(), kept);
        }
        let gone: Vec<Digest> = self
            .reports
            .keys()
            .filter(|d| !next.contains_key(*d))
            .cloned()
            .collect();
        for digest in gone {
            self.remove(&digest)?;
        }
        for (digest, mut report) in next {
            let old = self.reports.get(&digest);
            let unchanged = old.is_some_and(|o| {
                let mut o = o.clone();
                o.updated_at_unix = report.updated_at_unix;
                o == report
            });
            if unchanged {
                continue;
            }
            let from = old.map(|o| o.status.phase);
            if from != Some(report.status.phase) {
                changes.push(PhaseChange {
                    digest: digest.clone(),
                    reference: report.status.reference.clone(),
                    from,
                    to: report.status.phase,
                    reason: report.status.reason.clone(),
                });
            }
            report.updated_at_unix = unix(now);
            self.write(&report)?;
            self.reports.insert(digest, report);
        }
        Ok(changes)
    }

    fn write(&self, report: &ImageReport) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let path = dir.join(format!("{}.json", report.status.digest.hex()));
        let tmp = dir.join(format!(".{}.json.tmp", report.status.digest.hex()));
        let json = serde_json::to_vec_pretty(report).unwrap_or_default();
        let written = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io_err("write", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{LayerState, LayerStatus};
    use hermes_controller_core::testing::{at, digest};

    fn status(n: u8, phase: Phase, layers: &[u8]) -> ImageStatus {
        ImageStatus {
            digest: digest(n),
            reference: format!("registry.test/app{n}:v1"),
            policy: "p".into(),
            phase,
            reason: (phase == Phase::Failed).then(|| "registry unreachable".to_owned()),
            pods: 1,
            layers: layers
                .iter()
                .map(|&l| LayerStatus {
                    digest: digest(l),
                    size: 10,
                    state: LayerState::Queued,
                })
                .collect(),
        }
    }

    #[test]
    fn reports_keep_statistics_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = ReportBook::open(dir.path()).unwrap();
        let changes = book
            .update(
                vec![
                    status(1, Phase::Building, &[10, 11]),
                    status(2, Phase::Building, &[11]),
                ],
                &BTreeSet::new(),
                at(100),
            )
            .unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].from, None);
        book.record_layer(&digest(11), 2.5, 1000, Some("connection reset"));
        book.record_layer(&digest(10), 1.0, 500, None);
        let one = book.get(&digest(1)).unwrap();
        assert_eq!((one.build_seconds, one.bytes_read), (3.5, 1500));
        assert_eq!(one.last_error.as_deref(), Some("connection reset"));
        assert_eq!(book.get(&digest(2)).unwrap().bytes_read, 1000);

        // Statistics are written with the next change and read back after a restart.
        let changes = book
            .update(
                vec![
                    status(1, Phase::Ready, &[10, 11]),
                    status(2, Phase::Failed, &[11]),
                ],
                &BTreeSet::new(),
                at(200),
            )
            .unwrap();
        assert_eq!(
            changes.iter().map(|c| (c.from, c.to)).collect::<Vec<_>>(),
            vec![
                (Some(Phase::Building), Phase::Ready),
                (Some(Phase::Building), Phase::Failed)
            ]
        );
        let again = ReportBook::open(dir.path()).unwrap();
        let one = again.get(&digest(1)).unwrap();
        assert_eq!((one.build_seconds, one.bytes_read), (3.5, 1500));
        assert_eq!(one.last_error, None, "cleared once Ready");
        assert_eq!(one.updated_at_unix, 200);
        let two = again.get(&digest(2)).unwrap();
        assert_eq!(two.last_error.as_deref(), Some("registry unreachable"));
        let json = serde_json::to_value(two).unwrap();
        assert_eq!(json["phase"], "Failed");
        assert_eq!(json["bytesRead"], 1000);
    }

    fn start(name: &str, mode: crate::starts::StartMode) -> PodStart {
        PodStart {
            namespace: "default".into(),
            name: name.into(),
            node: "n1".into(),
            mode,
            bytes_fetched: 10,
            fully_local_seconds: None,
            reason: None,
            at_unix: 5,
        }
    }

    #[test]
    fn starts_are_counted_kept_across_passes_and_restarts_and_early_ones_wait_for_the_report() {
        use crate::starts::StartMode::{Fallback, Lazy};
        let dir = tempfile::tempdir().unwrap();
        let mut book = ReportBook::open(dir.path()).unwrap();
        // Reported before the controller saw the image run.
        book.record_start(&digest(1), start("early", Fallback))
            .unwrap();
        book.update(
            vec![status(1, Phase::Ready, &[10])],
            &BTreeSet::new(),
            at(100),
        )
        .unwrap();
        book.record_start(&digest(1), start("later", Lazy)).unwrap();
        book.update(
            vec![status(1, Phase::Ready, &[10])],
            &BTreeSet::new(),
            at(200),
        )
        .unwrap();
        let again = ReportBook::open(dir.path()).unwrap();
        let starts = &again.get(&digest(1)).unwrap().starts;
        assert_eq!((starts.lazy_starts, starts.fallbacks), (1, 1));
        let names: Vec<&str> = starts.last_pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["later", "early"]);
        let json = serde_json::to_value(again.get(&digest(1)).unwrap()).unwrap();
        assert_eq!(json["starts"]["lastPods"][0]["mode"], "Lazy");
    }

    #[test]
    fn unchanged_reports_are_not_rewritten_and_stopped_images_follow_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = ReportBook::open(dir.path()).unwrap();
        book.update(
            vec![
                status(1, Phase::Ready, &[10]),
                status(2, Phase::Building, &[11]),
            ],
            &BTreeSet::new(),
            at(100),
        )
        .unwrap();
        let changes = book
            .update(
                vec![
                    status(1, Phase::Ready, &[10]),
                    status(2, Phase::Building, &[11]),
                ],
                &BTreeSet::new(),
                at(200),
            )
            .unwrap();
        assert!(changes.is_empty());
        assert_eq!(
            book.get(&digest(1)).unwrap().updated_at_unix,
            100,
            "not rewritten"
        );

        // Both stop running; only image 1 has a record in the store.
        book.update(Vec::new(), &BTreeSet::from([digest(1)]), at(300))
            .unwrap();
        let kept = book.get(&digest(1)).unwrap();
        assert_eq!(
            (kept.status.pods, kept.status.reason.as_deref()),
            (0, Some(NOT_RUNNING))
        );
        assert!(book.get(&digest(2)).is_none());
        let files: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "image 2's file is gone, no temp files");

        book.remove(&digest(1)).unwrap();
        assert_eq!(ReportBook::open(dir.path()).unwrap().reports().count(), 0);
    }
}
