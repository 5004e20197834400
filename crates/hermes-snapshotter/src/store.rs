//! Snapshot metadata in an embedded transactional store (redb): one table of records keyed by
//! snapshot key (active and view keys and committed names share one namespace, as in
//! containerd), and a counter for directory ids. Every operation is one transaction.
//!
//! Children are found by scanning; a parent index is not worth it at the few thousand
//! snapshots a node holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadOnlyTable, ReadableTable, Table, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{Error, Kind, Result};

const SNAPSHOTS: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("snapshots");
const META: TableDefinition<'static, &'static str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// One snapshot as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub created_ns: u128,
    pub updated_ns: u128,
    /// Disk usage frozen at commit time (committed snapshots only).
    pub size: u64,
    pub inodes: u64,
    /// For a remote layer: the mounted directory used as its `fs` (read-only lower).
    pub remote_dir: Option<PathBuf>,
}

pub(crate) type SnapTable<'t> = Table<'t, &'static str, &'static [u8]>;
pub(crate) type MetaTable<'t> = Table<'t, &'static str, u64>;

#[derive(Debug)]
pub(crate) struct Store {
    db: Database,
    path: PathBuf,
}

pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(|e| store_err(path, e))?;
        let store = Store {
            db,
            path: path.to_owned(),
        };
        store.write(|_, _| Ok(()))?;
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> Error {
        store_err(&self.path, e)
    }

    /// Runs `f` in one write transaction, committed only if `f` succeeds.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut SnapTable<'_>, &mut MetaTable<'_>) -> Result<T>,
    ) -> Result<T> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = {
            let mut snaps = txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            f(&mut snaps, &mut meta)?
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Runs `f` over a consistent read snapshot.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&ReadOnlyTable<&'static str, &'static [u8]>) -> Result<T>,
    ) -> Result<T> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let snaps = txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        f(&snaps)
    }

    pub fn get(
        &self,
        t: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &str,
    ) -> Result<Option<Record>> {
        match t.get(key).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => decode(key, v.value()).map(Some),
        }
    }

    pub fn all(
        &self,
        t: &impl ReadableTable<&'static str, &'static [u8]>,
    ) -> Result<Vec<(String, Record)>> {
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let key = k.value().to_owned();
            let rec = decode(&key, v.value())?;
            out.push((key, rec));
        }
        Ok(out)
    }

    pub fn put(&self, t: &mut SnapTable<'_>, key: &str, rec: &Record) -> Result<()> {
        let bytes = serde_json::to_vec(rec).map_err(|source| Error::Corrupt {
            key: key.to_owned(),
            source,
        })?;
        t.insert(key, bytes.as_slice()).map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn delete(&self, t: &mut SnapTable<'_>, key: &str) -> Result<()> {
        t.remove(key).map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn next_id(&self, meta: &mut MetaTable<'_>) -> Result<u64> {
        let id = meta
            .get(NEXT_ID)
            .map_err(|e| self.err(e))?
            .map(|v| v.value())
            .unwrap_or(1);
        meta.insert(NEXT_ID, id + 1).map_err(|e| self.err(e))?;
        Ok(id)
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt {
        key: key.to_owned(),
        source,
    })
}

fn store_err(path: &Path, e: impl Into<redb::Error>) -> Error {
    Error::Store {
        path: path.to_owned(),
        source: Box::new(e.into()),
    }
}
