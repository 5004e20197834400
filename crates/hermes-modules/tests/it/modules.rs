//! mem-logger and mem-tracer on real processes.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use hermes_modules::catalog::{ModuleCatalog, Profile};
use hermes_modules::modules::{MemLogger, MemTracer, Module};
use hermes_modules::supervisor::Target;

use crate::support::{Proc, require};

fn profile(interval_ms: u64, window: u32, threshold: f64) -> Profile {
    let mut p = ModuleCatalog::builtin()
        .profile("dev-tunings")
        .unwrap()
        .clone();
    p.interval_ms = interval_ms;
    p.window = window;
    p.growth_threshold_kib_per_min = threshold;
    p
}

fn status_kib(pid: u32) -> BTreeMap<String, u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let v = v.trim().strip_suffix(" kB")?.trim().parse().ok()?;
            Some((k.to_owned(), v))
        })
        .collect()
}

/// A bash process holding ~20 MB in a variable, idle until stdin closes.
fn holder() -> Proc {
    Proc::spawn(
        Command::new("/bin/bash").args([
            "-c",
            "x=$(head -c 20000000 /dev/zero | tr '\\0' a); echo ready; read -r _",
        ]),
        Some("ready"),
    )
    .0
}

#[test]
fn mem_logger_agrees_with_proc_status() {
    let p = holder();
    let mut logger = MemLogger::new(profile(100, 10, 1024.0));
    logger.sample(&[p.pid()], 0.0).unwrap();
    let m = *logger.latest(p.pid()).expect("a reading of the target");
    let st = status_kib(p.pid());
    let rss = st["VmRSS"] * 1024;
    // The process is idle: allow a page or two of drift between the two reads.
    assert!(
        m.rss_bytes.abs_diff(rss) <= 64 * 1024,
        "logger {} vs /proc status {rss}",
        m.rss_bytes
    );
    assert!(
        m.rss_bytes > 20_000_000,
        "the holder keeps 20 MB resident: {}",
        m.rss_bytes
    );
    assert_eq!(m.swap_bytes, st.get("VmSwap").copied().unwrap_or(0) * 1024);
    let pss = m
        .pss_bytes
        .expect("smaps_rollup is readable for our own child");
    assert!(
        pss > 0 && pss <= m.rss_bytes + 64 * 1024,
        "pss {pss} rss {}",
        m.rss_bytes
    );

    // Its cgroup (v1 or v2) is found and read.
    let cg: Vec<_> = logger.cgroups().collect();
    assert_eq!(cg.len(), 1, "one memory cgroup for one target: {cg:?}");
    assert!(cg[0].usage_bytes >= m.rss_bytes / 2, "{cg:?}");
    let mut metrics = hermes_modules::metrics::Samples::default();
    logger.metrics(&mut metrics);
    let text = hermes_modules::metrics::render(&metrics.0);
    assert!(
        text.contains(&format!(
            "hermes_mem_rss_bytes{{pid=\"{}\"}} {}",
            p.pid(),
            m.rss_bytes
        )),
        "{text}"
    );
    assert!(
        text.contains("hermes_cgroup_memory_usage_bytes{cgroup="),
        "{text}"
    );
}

#[test]
fn cgroup_target_lists_its_processes() {
    let p = holder();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cgroup.procs"), format!("{}\n", p.pid())).unwrap();
    assert_eq!(Target::Cgroup(dir.path().to_path_buf()).pids(), [p.pid()]);
    assert_eq!(Target::Pid(p.pid()).pids(), [p.pid()]);
    assert!(Target::All.pids().contains(&p.pid()));
    assert!(
        !Target::All.pids().contains(&std::process::id()),
        "the supervisor excludes itself"
    );
}

/// Alert threshold of the tracer tests: 64 MiB/min.
const THRESHOLD: f64 = 64.0 * 1024.0;

fn python() -> std::path::PathBuf {
    require("python3", "python3 (apt-get install python3)")
}

/// A python3 process allocating 256 KiB every 20 ms (12.5 MiB/s), and dropping everything
/// every `reset_every` seconds when given (a GC-like sawtooth). Blocks of 256 KiB are mmap'd
/// (fixed threshold), so a drop really returns memory.
fn python_allocator(reset_every: Option<f64>) -> Proc {
    let reset = reset_every.map_or(String::new(), |s| {
        format!(
            "    if time.monotonic() - t >= {s}:\n        x = []\n        t = time.monotonic()\n"
        )
    });
    let code = format!(
        "import time\nx = []\nt = time.monotonic()\nprint('ready', flush=True)\nwhile True:\n    x.append(b'\\x01' * (256 * 1024))\n{reset}    time.sleep(0.02)\n"
    );
    Proc::spawn(
        Command::new(python())
            .env("MALLOC_MMAP_THRESHOLD_", "131072")
            .args(["-c", &code]),
        Some("ready"),
    )
    .0
}

/// Runs the tracer against `pid` every `interval` and returns (ever flagged, rss min, rss max).
fn trace(pid: u32, tracer: &mut MemTracer, samples: usize, interval: Duration) -> (bool, u64, u64) {
    let start = Instant::now();
    let (mut flagged, mut lo, mut hi) = (false, u64::MAX, 0);
    for i in 0..samples {
        tracer
            .sample(&[pid], start.elapsed().as_secs_f64())
            .unwrap();
        flagged |= tracer.trend(pid).is_some_and(|t| t.leak_suspected);
        let rss = status_kib(pid)["VmRSS"] * 1024;
        lo = lo.min(rss);
        hi = hi.max(rss);
        // Pace by the schedule, not by fixed sleeps after work.
        let next = interval * (i as u32 + 1);
        if let Some(d) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(d);
        }
    }
    (flagged, lo, hi)
}

#[test]
fn mem_tracer_flags_a_leaking_process() {
    let p = python_allocator(None);
    // Up to 12.5 MiB/s (750 MiB/min) of growth against the threshold.
    let mut tracer = MemTracer::new(profile(50, 16, THRESHOLD));
    let (flagged, lo, hi) = trace(p.pid(), &mut tracer, 24, Duration::from_millis(50));
    assert!(hi - lo > 8 << 20, "the leaker grew only {} bytes", hi - lo);
    assert!(flagged, "leak not flagged: {:?}", tracer.trend(p.pid()));
    assert_eq!(
        tracer.alerts(p.pid()),
        1,
        "one alert while it keeps leaking"
    );
    let t = tracer.trend(p.pid()).unwrap();
    assert!(t.slope_kib_per_min > 100.0 * 1024.0, "{t:?}");
}

#[test]
fn mem_tracer_does_not_flag_a_sawtooth() {
    let p = python_allocator(Some(0.4));
    // Teeth of 0.4 s growing at up to 12.5 MiB/s; a 60-sample window at 50 ms has halves of
    // 1.5 s, each with several troughs. The threshold sits far above the floor's sampling
    // noise (a trough is seen up to one interval late) and far below the leaker's growth.
    let mut tracer = MemTracer::new(profile(50, 60, THRESHOLD));
    let (flagged, lo, hi) = trace(p.pid(), &mut tracer, 80, Duration::from_millis(50));
    assert!(
        hi - lo > 4 << 20,
        "the process did not saw-tooth: range {} bytes",
        hi - lo
    );
    let t = tracer.trend(p.pid()).expect("a full window");
    assert!(!flagged, "sawtooth flagged as a leak: {t:?}");
    assert_eq!(tracer.alerts(p.pid()), 0);
}
