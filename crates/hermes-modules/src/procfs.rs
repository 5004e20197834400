//! Reading memory figures of real processes from `/proc` and cgroup v1/v2 files.
//!
//! Parsers are pure functions over the file text; the readers only add the paths. Nothing here
//! keeps state or decides anything.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Proc {
        path: path.to_path_buf(),
        source,
    })
}

/// `KEY:   VALUE kB` lines of `/proc/PID/status` and `smaps*` into a map of KiB values.
pub fn parse_kib_fields(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let mut it = rest.split_whitespace();
            let v = it.next()?.parse().ok()?;
            (it.next() == Some("kB")).then_some((k.trim(), v))
        })
        .collect()
}

/// Memory of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    /// The process.
    pub pid: u32,
    /// Resident set size (`VmRSS`), bytes.
    pub rss_bytes: u64,
    /// Proportional set size (`Pss` of `smaps_rollup`), bytes; `None` if unreadable.
    pub pss_bytes: Option<u64>,
    /// Swapped out (`VmSwap`), bytes.
    pub swap_bytes: u64,
}

/// Reads `/proc/PID/status` and, when readable, `/proc/PID/smaps_rollup`. Kernel threads (no
/// `VmRSS`) are an error of kind [`Error::ProcFormat`].
pub fn process_memory(pid: u32) -> Result<ProcessMemory> {
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = read(&status_path)?;
    let f = parse_kib_fields(&status);
    let rss = *f.get("VmRSS").ok_or_else(|| Error::ProcFormat {
        path: status_path.clone(),
        what: "no VmRSS (kernel thread?)".to_owned(),
    })?;
    let swap = f.get("VmSwap").copied().unwrap_or(0);
    let pss = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| parse_kib_fields(&t).get("Pss").copied());
    Ok(ProcessMemory {
        pid,
        rss_bytes: rss * 1024,
        pss_bytes: pss.map(|k| k * 1024),
        swap_bytes: swap * 1024,
    })
}

/// Every numeric entry of `/proc`, sorted (kernel threads are skipped by the readers).
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The pids listed in a cgroup's `cgroup.procs`.
pub fn cgroup_pids(cgroup: &Path) -> Result<Vec<u32>> {
    let p = cgroup.join("cgroup.procs");
    Ok(read(&p)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// A process's memory cgroup directory, from `/proc/PID/cgroup` text: the v2 unified entry
/// (`0::/path`) or the v1 `memory` controller's. `root` is the cgroup mount (`/sys/fs/cgroup`).
pub fn parse_cgroup_file(text: &str, root: &Path) -> Option<PathBuf> {
    let rel = |p: &str| p.trim_start_matches('/').to_owned();
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if ctrls.split(',').any(|c| c == "memory") {
            return Some(root.join("memory").join(rel(path)));
        }
        if id == "0" && ctrls.is_empty() {
            v2 = Some(root.join(rel(path)));
        }
    }
    v2
}

/// Memory usage and limit of a cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupMemory {
    /// The cgroup directory.
    pub path: PathBuf,
    /// Current usage, bytes (`memory.current` or `memory.usage_in_bytes`).
    pub usage_bytes: u64,
    /// The limit, bytes; `None` when unlimited (`max`, or v1's huge sentinel).
    pub limit_bytes: Option<u64>,
}

/// Parses a limit file: `max` or a v1 value ≥ 2^62 means unlimited.
pub fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|v| *v < (1 << 62))
}

/// Reads a cgroup's memory usage and limit (v2 files first, then v1).
pub fn cgroup_memory(dir: &Path) -> Result<CgroupMemory> {
    let (usage, limit) = if dir.join("memory.current").exists() {
        ("memory.current", "memory.max")
    } else {
        ("memory.usage_in_bytes", "memory.limit_in_bytes")
    };
    let up = dir.join(usage);
    let usage_bytes = read(&up)?.trim().parse().map_err(|_| Error::ProcFormat {
        path: up.clone(),
        what: "not a byte count".to_owned(),
    })?;
    let limit_bytes = fs::read_to_string(dir.join(limit))
        .ok()
        .and_then(|t| parse_limit(&t));
    Ok(CgroupMemory {
        path: dir.to_path_buf(),
        usage_bytes,
        limit_bytes,
    })
}

/// The memory cgroup of a process, when cgroup files are readable.
pub fn process_cgroup(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let dir = parse_cgroup_file(&text, Path::new("/sys/fs/cgroup"))?;
    // Inside a container the process's path is relative to a namespaced root: fall back to
    // the mount root when the full path is not visible.
    if dir.exists() {
        Some(dir)
    } else {
        let root = Path::new("/sys/fs/cgroup");
        [root.to_path_buf(), root.join("memory")]
            .into_iter()
            .find(|d| d.join("memory.current").exists() || d.join("memory.usage_in_bytes").exists())
    }
}

/// Kinds of mappings in the smaps breakdown (a bounded set, usable as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingKind {
    /// `[heap]`.
    Heap,
    /// `[stack]` and thread stacks.
    Stack,
    /// Anonymous mappings (malloc arenas, mmap'd chunks).
    Anon,
    /// File-backed mappings (binaries, libraries, data files).
    File,
    /// `[vdso]`, `[vvar]` and other special mappings.
    Special,
}

impl MappingKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Heap => "heap",
            Self::Stack => "stack",
            Self::Anon => "anon",
            Self::File => "file",
            Self::Special => "special",
        }
    }
}

/// One mapping (or merged same-name mappings) of the breakdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mapping {
    /// The name (`[heap]`, a path, or `[anon]`).
    pub name: String,
    /// Its kind.
    pub kind: MappingKind,
    /// Resident bytes.
    pub rss_bytes: u64,
    /// Proportional bytes.
    pub pss_bytes: u64,
    /// Swapped bytes.
    pub swap_bytes: u64,
}

/// Parses `/proc/PID/smaps` text into mappings merged by name, largest RSS first.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut by_name: BTreeMap<String, Mapping> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        // Header lines start with `start-end` addresses.
        if first.contains('-') && !first.ends_with(':') {
            let name = line.split_whitespace().nth(5).unwrap_or("").to_owned();
            let (name, kind) = match name.as_str() {
                "" => ("[anon]".to_owned(), MappingKind::Anon),
                "[heap]" => (name, MappingKind::Heap),
                n if n.starts_with("[stack") => (name, MappingKind::Stack),
                n if n.starts_with("[anon") => (name, MappingKind::Anon),
                n if n.starts_with('[') => (name, MappingKind::Special),
                _ => (name, MappingKind::File),
            };
            by_name.entry(name.clone()).or_insert(Mapping {
                name: name.clone(),
                kind,
                rss_bytes: 0,
                pss_bytes: 0,
                swap_bytes: 0,
            });
            current = Some(name);
            continue;
        }
        let Some(m) = current.as_ref().and_then(|n| by_name.get_mut(n)) else {
            continue;
        };
        let fields = parse_kib_fields(line);
        for (k, v) in fields {
            match k {
                "Rss" => m.rss_bytes += v * 1024,
                "Pss" => m.pss_bytes += v * 1024,
                "Swap" => m.swap_bytes += v * 1024,
                _ => {}
            }
        }
    }
    let mut v: Vec<Mapping> = by_name.into_values().collect();
    v.sort_by(|a, b| b.rss_bytes.cmp(&a.rss_bytes).then(a.name.cmp(&b.name)));
    v
}

/// Reads and parses `/proc/PID/smaps`.
pub fn smaps(pid: u32) -> Result<Vec<Mapping>> {
    Ok(parse_smaps(&read(Path::new(&format!(
        "/proc/{pid}/smaps"
    )))?))
}

/// Resident bytes per mapping kind.
pub fn rss_by_kind(maps: &[Mapping]) -> BTreeMap<MappingKind, u64> {
    let mut out = BTreeMap::new();
    for m in maps {
        *out.entry(m.kind).or_insert(0) += m.rss_bytes;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields() {
        let f = parse_kib_fields(
            "Name:\tbash\nVmRSS:\t    3456 kB\nVmSwap:\t       0 kB\nThreads:\t1\n",
        );
        assert_eq!(f.get("VmRSS"), Some(&3456));
        assert_eq!(f.get("VmSwap"), Some(&0));
        assert_eq!(f.get("Threads"), None);
    }

    #[test]
    fn cgroup_v1_and_v2_paths() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            parse_cgroup_file("0::/kubepods/pod1/c1\n", root),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods/pod1/c1"))
        );
        assert_eq!(
            parse_cgroup_file("12:cpu,cpuacct:/x\n4:memory:/kubepods/p\n0::/\n", root),
            Some(PathBuf::from("/sys/fs/cgroup/memory/kubepods/p"))
        );
        assert_eq!(parse_cgroup_file("3:cpu:/x\n", root), None);
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("536870912\n"), Some(536_870_912));
    }

    #[test]
    fn cgroup_files_v2_and_v1() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("memory.current"), "1048576\n").unwrap();
        fs::write(d.path().join("memory.max"), "max\n").unwrap();
        let m = cgroup_memory(d.path()).unwrap();
        assert_eq!((m.usage_bytes, m.limit_bytes), (1_048_576, None));
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("memory.usage_in_bytes"), "4096\n").unwrap();
        fs::write(d.path().join("memory.limit_in_bytes"), "8192\n").unwrap();
        let m = cgroup_memory(d.path()).unwrap();
        assert_eq!((m.usage_bytes, m.limit_bytes), (4096, Some(8192)));
    }

    #[test]
    fn smaps_breakdown_merges_by_name_and_sorts() {
        let text = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
Pss:                  50 kB
Swap:                  0 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Rss:                 400 kB
Pss:                 400 kB
7f1000000000-7f1000010000 r-xp 00000000 08:01 1234                       /usr/lib/libc.so.6
Rss:                  60 kB
Pss:                  10 kB
7f1000010000-7f1000020000 r--p 00010000 08:01 1234                       /usr/lib/libc.so.6
Rss:                  40 kB
Pss:                   5 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
Pss:                  12 kB
VmFlags: rd wr mr mw me gd ac
";
        let m = parse_smaps(text);
        assert_eq!(
            m.iter()
                .map(|m| (m.name.as_str(), m.rss_bytes / 1024))
                .collect::<Vec<_>>(),
            [
                ("[anon]", 400),
                ("/usr/lib/libc.so.6", 100),
                ("[heap]", 100),
                ("[stack]", 12)
            ]
        );
        let k = rss_by_kind(&m);
        assert_eq!(k[&MappingKind::File], 100 * 1024);
        assert_eq!(k[&MappingKind::Anon], 400 * 1024);
    }
}
