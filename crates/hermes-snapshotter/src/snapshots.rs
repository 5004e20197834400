//! The snapshot core: containerd's overlay snapshotter semantics over the metadata store and a
//! root directory, with no gRPC types. Snapshot contents live in `root/snapshots/<id>/fs` (the
//! upper dir, and later a committed layer) and `root/snapshots/<id>/work` (overlayfs' workdir);
//! a remote layer's `fs` is the directory its [`RemoteLayers`] source mounted.
//!
//! This module does not mount anything: it answers with the mounts containerd performs.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::filter::Filter;
use crate::remote::{FallbackCounters, NotRemote};
use crate::store::{Record, Store, now_ns};
use crate::{Error, FallbackReason, RemoteLayer, RemoteLayers, Result};

/// Snapshot labels.
pub type Labels = BTreeMap<String, String>;

/// The kind of a snapshot, as in containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only view of a committed parent; cannot be committed.
    View,
    /// Writable snapshot that can be committed.
    Active,
    /// Immutable snapshot, usable as a parent.
    Committed,
}

impl Kind {
    /// containerd's name for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "View",
            Kind::Active => "Active",
            Kind::Committed => "Committed",
        }
    }
}

/// What containerd knows about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Key (active, view) or name (committed).
    pub name: String,
    /// Name of the committed parent, if any.
    pub parent: Option<String>,
    /// Kind.
    pub kind: Kind,
    /// Creation time.
    pub created: SystemTime,
    /// Last change of the labels (or creation).
    pub updated: SystemTime,
    /// Labels.
    pub labels: Labels,
}

/// A mount containerd performs to use a snapshot, in the shape of containerd's `Mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `bind` or `overlay`.
    pub fs_type: String,
    /// Source path (or `overlay`).
    pub source: String,
    /// fstab-style options.
    pub options: Vec<String>,
}

/// Disk usage of a snapshot's own layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of allocated blocks.
    pub size: u64,
    /// Number of inodes (hard links counted once).
    pub inodes: u64,
}

/// The snapshotter: overlay snapshots plus the remote-prepare decision.
#[derive(Debug)]
pub struct Snapshots {
    root: PathBuf,
    store: Store,
    remote: Arc<dyn RemoteLayers>,
    fallbacks: FallbackCounters,
    index_off: bool,
}

/// A parent chain resolved inside a transaction: the layer dirs, nearest parent first.
struct Chain {
    dirs: Vec<PathBuf>,
}

impl Snapshots {
    /// Opens (or creates) a snapshotter rooted at `root`, with its metadata in `root/metadata.redb`.
    pub fn open(root: impl Into<PathBuf>, remote: Arc<dyn RemoteLayers>) -> Result<Self> {
        let root = root.into();
        let snaps = root.join("snapshots");
        fs::create_dir_all(&snaps).map_err(Error::io("create snapshot dir", &snaps))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        Ok(Snapshots {
            root,
            store,
            remote,
            fallbacks: FallbackCounters::default(),
            // As containerd: disable the overlay index when the kernel has the option, so
            // layers can be mounted again after their upper dir was copied or moved.
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How often a remote prepare fell back for `reason` since start.
    pub fn fallback_count(&self, reason: FallbackReason) -> u64 {
        self.fallbacks.get(reason)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs_dir(&self, rec: &Record) -> PathBuf {
        rec.remote_dir
            .clone()
            .unwrap_or_else(|| self.dir(rec.id).join("fs"))
    }

    /// Creates an active snapshot `key` on `parent` (empty: none) and returns its mounts.
    ///
    /// With the `containerd.io/snapshot.ref` and CRI layer labels it first asks the
    /// [`RemoteLayers`] source; if that provides the layer, a committed snapshot named by the
    /// ref is recorded and [`Error::AlreadyExists`] returned (containerd then skips the unpack).
    /// Any failure on that path falls back to a normal active snapshot.
    pub fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let parent = non_empty(parent);
        match RemoteLayer::from_labels(parent, &labels) {
            Ok(layer) => {
                self.check_new(key, parent)?;
                if self.stat(&layer.target).is_ok() {
                    return Err(Error::AlreadyExists { key: layer.target });
                }
                match self.try_remote(&layer) {
                    Ok(()) => return Err(Error::AlreadyExists { key: layer.target }),
                    Err(reason) => self.fallback(&layer, reason),
                }
            }
            Err(NotRemote::NoLayerDigest) => {
                self.fallbacks.count(FallbackReason::NoLayerDigest);
                warn!(key, reason = %FallbackReason::NoLayerDigest, "remote prepare fell back");
            }
            Err(NotRemote::NoTarget) => {}
        }
        self.create(key, parent, labels, Kind::Active)
    }

    /// Creates a read-only view `key` of `parent` and returns its mounts.
    pub fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(key, non_empty(parent), labels, Kind::View)
    }

    fn fallback(&self, layer: &RemoteLayer, reason: FallbackReason) {
        self.fallbacks.count(reason);
        warn!(target_ref = %layer.target, layer = %layer.layer_digest, %reason,
            "remote prepare fell back to a normal snapshot");
    }

    /// Asks the remote source and, if it has the layer, records the committed snapshot.
    fn try_remote(&self, layer: &RemoteLayer) -> Result<(), FallbackReason> {
        let answer = catch_unwind(AssertUnwindSafe(|| self.remote.prepare(layer)))
            .map_err(|_| FallbackReason::RemotePanic)?;
        let dir = match answer {
            Ok(Some(dir)) => dir,
            Ok(None) => return Err(FallbackReason::NotAvailable),
            Err(e) => {
                warn!(target_ref = %layer.target, error = %hermes_node_api::error_chain(&*e), "remote layer source failed");
                return Err(FallbackReason::RemoteError);
            }
        };
        if !dir.is_dir() {
            warn!(target_ref = %layer.target, dir = %dir.display(), "remote layer is not a directory");
            return Err(FallbackReason::InvalidDir);
        }
        let now = now_ns();
        let committed = self.store.write(|snaps, meta| {
            if self.store.get(snaps, &layer.target)?.is_some() {
                return Err(Error::AlreadyExists {
                    key: layer.target.clone(),
                });
            }
            if let Some(p) = &layer.parent {
                self.committed_parent(snaps, p)?;
            }
            let rec = Record {
                id: self.store.next_id(meta)?,
                kind: Kind::Committed,
                parent: layer.parent.clone(),
                labels: layer.labels.clone(),
                created_ns: now,
                updated_ns: now,
                size: 0,
                inodes: 0,
                remote_dir: Some(dir.clone()),
            };
            self.store.put(snaps, &layer.target, &rec)
        });
        match committed {
            // Another prepare of the same layer won the race: the layer is there all the same.
            Ok(()) | Err(Error::AlreadyExists { .. }) => {
                info!(target_ref = %layer.target, layer = %layer.layer_digest, dir = %dir.display(),
                    "remote layer committed");
                Ok(())
            }
            Err(e) => {
                warn!(target_ref = %layer.target, error = %e, "recording remote layer failed");
                Err(FallbackReason::Store)
            }
        }
    }

    /// The checks a new snapshot must pass, outside a write transaction.
    fn check_new(&self, key: &str, parent: Option<&str>) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidArgument {
                what: "key",
                value: key.into(),
            });
        }
        self.store.read(|snaps| {
            if self.store.get(snaps, key)?.is_some() {
                return Err(Error::AlreadyExists { key: key.into() });
            }
            if let Some(p) = parent {
                self.committed_parent(snaps, p)?;
            }
            Ok(())
        })
    }

    fn committed_parent(
        &self,
        snaps: &impl redb::ReadableTable<&'static str, &'static [u8]>,
        parent: &str,
    ) -> Result<Record> {
        let rec = self
            .store
            .get(snaps, parent)?
            .ok_or_else(|| Error::NotFound { key: parent.into() })?;
        if rec.kind != Kind::Committed {
            return Err(Error::ParentNotCommitted {
                parent: parent.into(),
            });
        }
        Ok(rec)
    }

    /// The layer dirs of `parent` and its ancestors, nearest first.
    fn chain(
        &self,
        snaps: &impl redb::ReadableTable<&'static str, &'static [u8]>,
        parent: Option<&str>,
    ) -> Result<Chain> {
        let mut dirs = Vec::new();
        let mut next = parent.map(str::to_owned);
        while let Some(name) = next {
            let rec = self
                .store
                .get(snaps, &name)?
                .ok_or(Error::NotFound { key: name })?;
            dirs.push(self.fs_dir(&rec));
            next = rec.parent;
        }
        Ok(Chain { dirs })
    }

    fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        kind: Kind,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument {
                what: "key",
                value: key.into(),
            });
        }
        let now = now_ns();
        let mut made = None;
        let result = self.store.write(|snaps, meta| {
            if self.store.get(snaps, key)?.is_some() {
                return Err(Error::AlreadyExists { key: key.into() });
            }
            if let Some(p) = parent {
                self.committed_parent(snaps, p)?;
            }
            let chain = self.chain(snaps, parent)?;
            let rec = Record {
                id: self.store.next_id(meta)?,
                kind,
                parent: parent.map(str::to_owned),
                labels,
                created_ns: now,
                updated_ns: now,
                size: 0,
                inodes: 0,
                remote_dir: None,
            };
            let dir = self.dir(rec.id);
            made = Some(dir.clone());
            create_layer_dirs(&dir, kind)?;
            self.store.put(snaps, key, &rec)?;
            Ok(self.mounts_of(&rec, &chain))
        });
        if result.is_err()
            && let Some(dir) = made
        {
            // The transaction did not commit: the directory belongs to no snapshot.
            let _ = fs::remove_dir_all(dir);
        }
        result
    }

    /// containerd's overlay mount rules.
    fn mounts_of(&self, rec: &Record, chain: &Chain) -> Vec<Mount> {
        let fs_dir = self.fs_dir(rec);
        let bind = |src: &Path, ro: bool| Mount {
            fs_type: "bind".into(),
            source: src.display().to_string(),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        if chain.dirs.is_empty() {
            return vec![bind(&fs_dir, rec.kind == Kind::View)];
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_owned());
        }
        if rec.kind == Kind::Active {
            let work = self.dir(rec.id).join("work");
            options.push(format!("workdir={}", work.display()));
            options.push(format!("upperdir={}", fs_dir.display()));
        } else if chain.dirs.len() == 1 {
            return vec![bind(&chain.dirs[0], true)];
        }
        let lower: Vec<String> = chain.dirs.iter().map(|d| d.display().to_string()).collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.store.read(|snaps| {
            let rec = self
                .store
                .get(snaps, key)?
                .ok_or_else(|| Error::NotFound { key: key.into() })?;
            if rec.kind == Kind::Committed {
                return Err(Error::WrongKind {
                    key: key.into(),
                    actual: rec.kind,
                    expected: "Active or View",
                });
            }
            let chain = self.chain(snaps, rec.parent.as_deref())?;
            Ok(self.mounts_of(&rec, &chain))
        })
    }

    /// Commits the active snapshot `key` as `name`, freezing its disk usage.
    pub fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument {
                what: "name",
                value: name.into(),
            });
        }
        self.store.write(|snaps, _| {
            let mut rec = self
                .store
                .get(snaps, key)?
                .ok_or_else(|| Error::NotFound { key: key.into() })?;
            if rec.kind != Kind::Active {
                return Err(Error::WrongKind {
                    key: key.into(),
                    actual: rec.kind,
                    expected: "Active",
                });
            }
            if self.store.get(snaps, name)?.is_some() {
                return Err(Error::AlreadyExists { key: name.into() });
            }
            let usage = disk_usage(&self.fs_dir(&rec))?;
            rec.kind = Kind::Committed;
            rec.labels = labels;
            rec.size = usage.size;
            rec.inodes = usage.inodes;
            let now = now_ns();
            rec.created_ns = now;
            rec.updated_ns = now;
            self.store.delete(snaps, key)?;
            self.store.put(snaps, name, &rec)
        })?;
        // The work dir only matters while the snapshot is an overlay upper layer.
        let _ = fs::remove_dir_all(self.dir_of_committed(name)?.join("work"));
        Ok(())
    }

    fn dir_of_committed(&self, name: &str) -> Result<PathBuf> {
        self.store.read(|snaps| {
            let rec = self
                .store
                .get(snaps, name)?
                .ok_or_else(|| Error::NotFound { key: name.into() })?;
            Ok(self.dir(rec.id))
        })
    }

    /// Removes a snapshot that has no children, and its directory.
    pub fn remove(&self, key: &str) -> Result<()> {
        let rec = self.store.write(|snaps, _| {
            let rec = self
                .store
                .get(snaps, key)?
                .ok_or_else(|| Error::NotFound { key: key.into() })?;
            let has_child = self
                .store
                .all(snaps)?
                .iter()
                .any(|(_, r)| r.parent.as_deref() == Some(key));
            if has_child {
                return Err(Error::HasChildren { key: key.into() });
            }
            self.store.delete(snaps, key)?;
            let last_user = rec.remote_dir.as_ref().filter(|dir| {
                !self
                    .store
                    .all(snaps)
                    .map(|all| all.iter().any(|(_, r)| r.remote_dir.as_ref() == Some(*dir)))
                    .unwrap_or(true)
            });
            Ok((rec.clone(), last_user.cloned()))
        })?;
        let (rec, released) = rec;
        if let Some(dir) = released {
            let remote = &self.remote;
            if catch_unwind(AssertUnwindSafe(|| remote.release(&dir))).is_err() {
                warn!(dir = %dir.display(), "releasing a remote layer panicked");
            }
        }
        // A remote layer's directory belongs to its source; ours is ours. A failure here leaves
        // an orphan that `cleanup` removes.
        let dir = self.dir(rec.id);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dir = %dir.display(), error = %e, "removing snapshot dir failed; cleanup will retry");
        }
        Ok(())
    }

    /// The directories of every remote (lazy) layer that a snapshot refers to, for restart
    /// recovery.
    pub fn remote_dirs(&self) -> Result<Vec<PathBuf>> {
        self.store.read(|snaps| {
            let mut dirs: Vec<PathBuf> = self
                .store
                .all(snaps)?
                .into_iter()
                .filter_map(|(_, r)| r.remote_dir)
                .collect();
            dirs.sort();
            dirs.dedup();
            Ok(dirs)
        })
    }

    /// Information about one snapshot.
    pub fn stat(&self, key: &str) -> Result<Info> {
        self.store.read(|snaps| {
            let rec = self
                .store
                .get(snaps, key)?
                .ok_or_else(|| Error::NotFound { key: key.into() })?;
            Ok(info_of(key, &rec))
        })
    }

    /// Updates labels. `fieldpaths` empty or `labels` replaces all labels; `labels.KEY` sets or
    /// (when absent from `info`) deletes one label. Other fields are immutable.
    pub fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        self.store.write(|snaps, _| {
            let mut rec = self
                .store
                .get(snaps, &info.name)?
                .ok_or_else(|| Error::NotFound {
                    key: info.name.clone(),
                })?;
            if fieldpaths.is_empty() {
                rec.labels = info.labels.clone();
            }
            for path in fieldpaths {
                if path == "labels" {
                    rec.labels = info.labels.clone();
                } else if let Some(k) = path.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => rec.labels.insert(k.to_owned(), v.clone()),
                        None => rec.labels.remove(k),
                    };
                } else {
                    return Err(Error::ImmutableField {
                        field: path.clone(),
                    });
                }
            }
            rec.updated_ns = now_ns();
            self.store.put(snaps, &info.name, &rec)?;
            Ok(info_of(&info.name, &rec))
        })
    }

    /// Disk usage: measured now for active snapshots, as frozen at commit for committed ones.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.store.read(|snaps| {
            self.store
                .get(snaps, key)?
                .ok_or_else(|| Error::NotFound { key: key.into() })
        })?;
        match rec.kind {
            Kind::Active => disk_usage(&self.fs_dir(&rec)),
            Kind::Committed | Kind::View => Ok(Usage {
                size: rec.size,
                inodes: rec.inodes,
            }),
        }
    }

    /// All snapshots matching any of `filters` (all when empty); see the `filter` module for the
    /// supported syntax.
    pub fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>>>()?;
        let all = self.store.read(|snaps| self.store.all(snaps))?;
        Ok(all
            .iter()
            .map(|(k, r)| info_of(k, r))
            .filter(|i| filters.is_empty() || filters.iter().any(|f| f.matches(i)))
            .collect())
    }

    /// Removes snapshot directories that no snapshot refers to (left by crashes or failed
    /// removals). Returns how many were removed.
    pub fn cleanup(&self) -> Result<usize> {
        let live: HashSet<String> = self
            .store
            .read(|snaps| self.store.all(snaps))?
            .into_iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        let snaps = self.root.join("snapshots");
        let mut removed = 0;
        for entry in fs::read_dir(&snaps).map_err(Error::io("read snapshot dir", &snaps))? {
            let entry = entry.map_err(Error::io("read snapshot dir", &snaps))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) {
                let path = entry.path();
                fs::remove_dir_all(&path)
                    .map_err(Error::io("remove orphan snapshot dir", &path))?;
                info!(dir = %path.display(), "removed orphan snapshot dir");
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn create_layer_dirs(dir: &Path, kind: Kind) -> Result<()> {
    let fs_dir = dir.join("fs");
    fs::create_dir_all(&fs_dir).map_err(Error::io("create snapshot dir", &fs_dir))?;
    if kind == Kind::Active {
        let work = dir.join("work");
        fs::create_dir(&work).map_err(Error::io("create snapshot work dir", &work))?;
    }
    Ok(())
}

fn time_of(ns: u128) -> SystemTime {
    let ns = u64::try_from(ns).unwrap_or(u64::MAX);
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn info_of(key: &str, rec: &Record) -> Info {
    Info {
        name: key.to_owned(),
        parent: rec.parent.clone(),
        kind: rec.kind,
        created: time_of(rec.created_ns),
        updated: time_of(rec.updated_ns),
        labels: rec.labels.clone(),
    }
}

/// Allocated bytes and inodes under `dir`, hard links counted once (like containerd's `du`).
fn disk_usage(dir: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let md = fs::symlink_metadata(&path).map_err(Error::io("stat for usage", &path))?;
        if seen.insert((md.dev(), md.ino())) {
            usage.size += md.blocks() * 512;
            usage.inodes += 1;
        }
        if md.is_dir() {
            for entry in fs::read_dir(&path).map_err(Error::io("read dir for usage", &path))? {
                stack.push(
                    entry
                        .map_err(Error::io("read dir for usage", &path))?
                        .path(),
                );
            }
        }
    }
    Ok(usage)
}
