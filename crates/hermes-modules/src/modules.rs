//! The built-in memory modules: `mem-logger`, `mem-tracer` and `mem-profiler`.
//!
//! Each module is a state machine fed one sample at a time ([`Module::sample`]) with the current
//! target pids; it renders metrics and a JSON report. Scheduling, restarts and I/O of reports
//! belong to [`crate::supervisor`]. A target that vanishes between listing and reading is
//! skipped, not an error; a module only fails for problems of its own.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::catalog::{ModuleKind, PlannedModule, Profile};
use crate::error::Result;
use crate::metrics::{Samples, families};
use crate::procfs::{self, CgroupMemory, Mapping, MappingKind, ProcessMemory};
use crate::trend::{self, Trend};

/// A running module instance.
pub trait Module: Send {
    /// Which module this is.
    fn kind(&self) -> ModuleKind;
    /// Takes one sample of `pids` at `t` seconds (monotonic, any origin).
    fn sample(&mut self, pids: &[u32], t: f64) -> Result<()>;
    /// Adds the current metrics.
    fn metrics(&self, out: &mut Samples);
    /// The current JSON report.
    fn report(&self) -> Value;
}

/// Creates the module a plan entry names.
pub fn instantiate(planned: &PlannedModule, memprof_dir: &Path) -> Box<dyn Module> {
    let s = planned.settings.clone();
    match planned.module {
        ModuleKind::MemLogger => Box::new(MemLogger::new(s)),
        ModuleKind::MemTracer => Box::new(MemTracer::new(s)),
        ModuleKind::MemProfiler => Box::new(MemProfiler::new(s, memprof_dir.to_path_buf())),
    }
}

fn pid_label(pid: u32) -> Vec<(&'static str, String)> {
    vec![("pid", pid.to_string())]
}

families! {
    /// Resident set size of a target process.
    RSS: gauge = "hermes_mem_rss_bytes";
    /// Proportional set size of a target process.
    PSS: gauge = "hermes_mem_pss_bytes";
    /// Swapped-out memory of a target process.
    SWAP: gauge = "hermes_mem_swap_bytes";
    /// Memory usage of a target's cgroup.
    CG_USAGE: gauge = "hermes_cgroup_memory_usage_bytes";
    /// Memory limit of a target's cgroup (absent when unlimited).
    CG_LIMIT: gauge = "hermes_cgroup_memory_limit_bytes";
}

/// `mem-logger`: RSS, PSS and swap per target, and memory usage/limit of their cgroups, with a
/// bounded series (the profile's window) per target for the report.
#[derive(Debug)]
pub struct MemLogger {
    settings: Profile,
    latest: BTreeMap<u32, ProcessMemory>,
    series: BTreeMap<u32, VecDeque<(f64, u64)>>,
    cgroups: BTreeMap<PathBuf, CgroupMemory>,
}

impl MemLogger {
    /// A logger with these settings.
    pub fn new(settings: Profile) -> Self {
        Self {
            settings,
            latest: BTreeMap::new(),
            series: BTreeMap::new(),
            cgroups: BTreeMap::new(),
        }
    }

    /// The latest reading of a target.
    pub fn latest(&self, pid: u32) -> Option<&ProcessMemory> {
        self.latest.get(&pid)
    }

    /// The latest cgroup readings.
    pub fn cgroups(&self) -> impl Iterator<Item = &CgroupMemory> {
        self.cgroups.values()
    }
}

impl Module for MemLogger {
    fn kind(&self) -> ModuleKind {
        ModuleKind::MemLogger
    }

    fn sample(&mut self, pids: &[u32], t: f64) -> Result<()> {
        let mut seen_cgroups = BTreeSet::new();
        self.latest.clear();
        for &pid in pids {
            let Ok(m) = procfs::process_memory(pid) else {
                continue;
            };
            self.latest.insert(pid, m);
            let s = self.series.entry(pid).or_default();
            s.push_back((t, m.rss_bytes));
            while s.len() > self.settings.window as usize {
                s.pop_front();
            }
            if let Some(cg) = procfs::process_cgroup(pid) {
                seen_cgroups.insert(cg);
            }
        }
        self.series.retain(|pid, _| self.latest.contains_key(pid));
        self.cgroups = seen_cgroups
            .into_iter()
            .filter_map(|cg| procfs::cgroup_memory(&cg).ok().map(|m| (cg, m)))
            .collect();
        Ok(())
    }

    fn metrics(&self, out: &mut Samples) {
        for (pid, m) in &self.latest {
            out.push(RSS, pid_label(*pid), m.rss_bytes as f64);
            if let Some(p) = m.pss_bytes {
                out.push(PSS, pid_label(*pid), p as f64);
            }
            out.push(SWAP, pid_label(*pid), m.swap_bytes as f64);
        }
        for (path, c) in &self.cgroups {
            let l = vec![("cgroup", path.display().to_string())];
            out.push(CG_USAGE, l.clone(), c.usage_bytes as f64);
            if let Some(lim) = c.limit_bytes {
                out.push(CG_LIMIT, l, lim as f64);
            }
        }
    }

    fn report(&self) -> Value {
        json!({
            "processes": self.latest.values().map(|m| json!({
                "pid": m.pid,
                "rss_bytes": m.rss_bytes,
                "pss_bytes": m.pss_bytes,
                "swap_bytes": m.swap_bytes,
                "rss_series": self.series.get(&m.pid).map(|s| s.iter().map(|(t, v)| json!([t, v])).collect::<Vec<_>>()),
            })).collect::<Vec<_>>(),
            "cgroups": self.cgroups.values().collect::<Vec<_>>(),
        })
    }
}

families! {
    /// Robust (Theil-Sen) growth trend of a target's RSS+swap over the window.
    GROWTH: gauge = "hermes_mem_growth_kib_per_minute";
    /// 1 when both the trend and the floor of the window grow faster than the threshold.
    LEAK: gauge = "hermes_mem_leak_suspected";
    /// Times a target started to be suspected of leaking.
    ALERTS: counter = "hermes_mem_leak_alerts_total";
}

/// Per-target state of the tracer.
#[derive(Debug, Default)]
struct Traced {
    window: VecDeque<(f64, f64)>,
    trend: Option<Trend>,
    alerts: u64,
}

/// `mem-tracer`: leak detection on the growth trend of RSS+swap over the profile's window
/// (see [`crate::trend`]); alerts (a warning log and a counter) when a target starts to look
/// like a leak.
#[derive(Debug)]
pub struct MemTracer {
    settings: Profile,
    targets: BTreeMap<u32, Traced>,
}

impl MemTracer {
    /// A tracer with these settings.
    pub fn new(settings: Profile) -> Self {
        Self {
            settings,
            targets: BTreeMap::new(),
        }
    }

    /// The latest verdict on a target (`None` until its window is full).
    pub fn trend(&self, pid: u32) -> Option<Trend> {
        self.targets.get(&pid).and_then(|t| t.trend)
    }

    /// How many times a target started to be suspected.
    pub fn alerts(&self, pid: u32) -> u64 {
        self.targets.get(&pid).map_or(0, |t| t.alerts)
    }
}

impl Module for MemTracer {
    fn kind(&self) -> ModuleKind {
        ModuleKind::MemTracer
    }

    fn sample(&mut self, pids: &[u32], t: f64) -> Result<()> {
        let live: BTreeSet<u32> = pids.iter().copied().collect();
        self.targets.retain(|pid, _| live.contains(pid));
        for &pid in pids {
            let Ok(m) = procfs::process_memory(pid) else {
                continue;
            };
            let tr = self.targets.entry(pid).or_default();
            tr.window
                .push_back((t, (m.rss_bytes + m.swap_bytes) as f64));
            while tr.window.len() > self.settings.window as usize {
                tr.window.pop_front();
            }
            if tr.window.len() < self.settings.window as usize {
                continue;
            }
            let samples: Vec<(f64, f64)> = tr.window.iter().copied().collect();
            let was = tr.trend.is_some_and(|t| t.leak_suspected);
            tr.trend = trend::analyze(&samples, self.settings.growth_threshold_kib_per_min);
            if let Some(now) = tr.trend.filter(|t| t.leak_suspected && !was) {
                tr.alerts += 1;
                tracing::warn!(
                    pid,
                    growth_kib_per_min = now.slope_kib_per_min,
                    threshold = self.settings.growth_threshold_kib_per_min,
                    "memory leak suspected"
                );
            }
        }
        Ok(())
    }

    fn metrics(&self, out: &mut Samples) {
        for (pid, t) in &self.targets {
            if let Some(tr) = t.trend {
                out.push(GROWTH, pid_label(*pid), tr.slope_kib_per_min);
                out.push(
                    LEAK,
                    pid_label(*pid),
                    f64::from(u8::from(tr.leak_suspected)),
                );
            }
            out.push(ALERTS, pid_label(*pid), t.alerts as f64);
        }
    }

    fn report(&self) -> Value {
        json!({
            "threshold_kib_per_min": self.settings.growth_threshold_kib_per_min,
            "window": self.settings.window,
            "targets": self.targets.iter().map(|(pid, t)| json!({
                "pid": pid,
                "samples": t.window.len(),
                "trend": t.trend,
                "alerts": t.alerts,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The statistics file the `hermes-memprof` interposer writes (`HERMES_MEMPROF_OUT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemprofStats {
    /// The process.
    pub pid: u32,
    /// Successful allocations (malloc, calloc, realloc of NULL, aligned variants).
    pub allocs: u64,
    /// Frees of non-null pointers (including realloc to size 0).
    pub frees: u64,
    /// Reallocations of an existing block.
    pub reallocs: u64,
    /// Bytes requested by all allocations.
    pub alloc_bytes: u64,
    /// Usable bytes currently allocated.
    pub live_bytes: u64,
    /// Highest `live_bytes` seen.
    pub peak_live_bytes: u64,
    /// Histogram sampling: 1 in N allocations recorded.
    pub sample_every: u64,
    /// `hist[k]` counts sampled requests of size in (2^(k-1), 2^k]; the last bucket is open.
    pub hist: Vec<u64>,
    /// Written at process exit (the last word), not periodically.
    #[serde(rename = "final")]
    pub is_final: bool,
}

impl MemprofStats {
    /// Reads one statistics file.
    pub fn load(path: &Path) -> Option<Self> {
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }
}

families! {
    /// Bytes currently allocated through malloc (LD_PRELOAD interposer).
    LIVE: gauge = "hermes_alloc_live_bytes";
    /// Allocations counted by the interposer.
    ALLOCS: counter = "hermes_alloc_total";
    /// Frees counted by the interposer.
    FREES: counter = "hermes_free_total";
    /// Allocations per second between the last two samples.
    RATE: gauge = "hermes_alloc_rate_per_second";
    /// Sampled allocation sizes (cumulative buckets).
    HIST: counter = "hermes_alloc_size_bytes_bucket";
    /// Resident bytes of a target by mapping kind (smaps).
    MAPPING: gauge = "hermes_mapping_rss_bytes";
}

#[derive(Debug, Default)]
struct Profiled {
    stats: Option<MemprofStats>,
    prev: Option<(f64, u64)>,
    rate: Option<f64>,
    mappings: Vec<Mapping>,
    by_kind: BTreeMap<MappingKind, u64>,
}

/// `mem-profiler`: allocation tracking from the interposer's statistics files in a directory,
/// plus an smaps breakdown by mapping of each target.
#[derive(Debug)]
pub struct MemProfiler {
    settings: Profile,
    dir: PathBuf,
    targets: BTreeMap<u32, Profiled>,
}

impl MemProfiler {
    /// A profiler reading interposer files from `dir`.
    pub fn new(settings: Profile, dir: PathBuf) -> Self {
        Self {
            settings,
            dir,
            targets: BTreeMap::new(),
        }
    }

    /// The latest interposer statistics of a target.
    pub fn stats(&self, pid: u32) -> Option<&MemprofStats> {
        self.targets.get(&pid).and_then(|t| t.stats.as_ref())
    }

    /// The latest smaps breakdown of a target (largest first, at most `top_mappings`).
    pub fn mappings(&self, pid: u32) -> &[Mapping] {
        self.targets.get(&pid).map_or(&[], |t| &t.mappings)
    }

    fn stats_files(&self) -> BTreeMap<u32, MemprofStats> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return BTreeMap::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| MemprofStats::load(&e.path()))
            .map(|s| (s.pid, s))
            .collect()
    }
}

impl Module for MemProfiler {
    fn kind(&self) -> ModuleKind {
        ModuleKind::MemProfiler
    }

    fn sample(&mut self, pids: &[u32], t: f64) -> Result<()> {
        let mut files = self.stats_files();
        let live: BTreeSet<u32> = pids.iter().copied().collect();
        self.targets.retain(|pid, _| live.contains(pid));
        for &pid in pids {
            let stats = files.remove(&pid);
            let maps = if self.settings.top_mappings > 0 {
                procfs::smaps(pid).unwrap_or_default()
            } else {
                Vec::new()
            };
            if stats.is_none() && maps.is_empty() {
                continue;
            }
            let p = self.targets.entry(pid).or_default();
            if let Some(s) = &stats {
                if let Some((t0, a0)) = p.prev
                    && t > t0
                {
                    p.rate = Some(s.allocs.saturating_sub(a0) as f64 / (t - t0));
                }
                p.prev = Some((t, s.allocs));
            }
            p.stats = stats.or(p.stats.take());
            p.by_kind = procfs::rss_by_kind(&maps);
            p.mappings = maps;
            p.mappings.truncate(self.settings.top_mappings as usize);
        }
        Ok(())
    }

    fn metrics(&self, out: &mut Samples) {
        for (pid, p) in &self.targets {
            if let Some(s) = &p.stats {
                out.push(LIVE, pid_label(*pid), s.live_bytes as f64);
                out.push(ALLOCS, pid_label(*pid), s.allocs as f64);
                out.push(FREES, pid_label(*pid), s.frees as f64);
                let mut cum = 0u64;
                for (k, n) in s.hist.iter().enumerate() {
                    cum += n;
                    let le = if k + 1 == s.hist.len() {
                        "+Inf".to_owned()
                    } else {
                        (1u64 << k).to_string()
                    };
                    out.push(HIST, vec![("pid", pid.to_string()), ("le", le)], cum as f64);
                }
            }
            if let Some(r) = p.rate {
                out.push(RATE, pid_label(*pid), r);
            }
            for (kind, bytes) in &p.by_kind {
                out.push(
                    MAPPING,
                    vec![("pid", pid.to_string()), ("kind", kind.as_str().to_owned())],
                    *bytes as f64,
                );
            }
        }
    }

    fn report(&self) -> Value {
        json!({
            "memprof_dir": self.dir,
            "targets": self.targets.iter().map(|(pid, p)| json!({
                "pid": pid,
                "interposer": p.stats,
                "alloc_rate_per_second": p.rate,
                "rss_by_mapping_kind": p.by_kind.iter().map(|(k, v)| (k.as_str(), *v)).collect::<BTreeMap<_, _>>(),
                "top_mappings": p.mappings,
            })).collect::<Vec<_>>(),
        })
    }
}
