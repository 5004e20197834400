//! The LD_PRELOAD interposer (hermes-memprof) on real C programs, and mem-profiler reading it.
//!
//! Tolerance: a C program's own calls are counted exactly; the C runtime may add a few
//! allocations of its own (none with glibc for these programs, but we allow up to 32 of each
//! kind, and usable-size slack of 32 bytes per live block for `live_bytes`).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use hermes_modules::catalog::ModuleCatalog;
use hermes_modules::modules::{MemProfiler, MemprofStats, Module};
use hermes_modules::procfs::MappingKind;

use crate::support::{Proc, compile_c, memprof_so, wait_for};

const SLACK: u64 = 32;

const PROGRAM: &str = r#"
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    void **keep = malloc(sizeof(void *) * n);             /* 1 alloc */
    for (int i = 0; i < n; i++) {                         /* n allocs, 3n/4 frees */
        char *p = malloc(100 + i % 28);                   /* 100..127 bytes: bucket 7 */
        memset(p, 1, 100);
        if (i % 4 == 0) keep[i] = p; else { keep[i] = 0; free(p); }
    }
    for (int i = 0; i < n / 10; i++) {                    /* n/10 allocs and frees */
        void *q = calloc(1, 3000);                        /* bucket 12 */
        free(q);
    }
    void *r = malloc(10);                                 /* 1 alloc, 1 realloc, 1 free */
    r = realloc(r, 20000);
    free(r);
    void *a;                                              /* 3 aligned allocs and frees */
    if (posix_memalign(&a, 64, 1000) == 0) free(a);
    free(aligned_alloc(64, 1024));
    free(memalign(64, 1000));
    if (argc > 2) {                                       /* hold: wait for stdin to close */
        write(1, "ready\n", 6);
        char c;
        while (read(0, &c, 1) > 0) {}
    }
    return 0;
}
"#;

fn expected(n: u64) -> (u64, u64) {
    (1 + n + n / 10 + 1 + 3, 3 * n / 4 + n / 10 + 1 + 3)
}

fn kept_bytes(n: u64) -> u64 {
    (0..n)
        .filter(|i| i % 4 == 0)
        .map(|i| 100 + i % 28)
        .sum::<u64>()
        + 8 * n
}

fn in_range(what: &str, actual: u64, lo: u64, hi: u64) {
    assert!(
        (lo..=hi).contains(&actual),
        "{what}: expected {lo}..={hi}, actual {actual}"
    );
}

#[test]
fn interposer_counts_match_what_the_program_did() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(dir.path(), "allocs", PROGRAM);
    let out = dir.path().join("out-%p.json");
    let n = 20_000u64;
    let st = Command::new(&bin)
        .arg(n.to_string())
        .env("LD_PRELOAD", memprof_so())
        .env("HERMES_MEMPROF_OUT", &out)
        .status()
        .unwrap();
    assert!(st.success());
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".json"))
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one statistics file, %p replaced: {files:?}"
    );
    let s = MemprofStats::load(&files[0]).expect("a valid statistics file");
    assert!(files[0].ends_with(format!("out-{}.json", s.pid)));
    assert!(s.is_final);
    let (allocs, frees) = expected(n);
    in_range("allocs", s.allocs, allocs, allocs + SLACK);
    in_range("frees", s.frees, frees, frees + SLACK);
    in_range("reallocs", s.reallocs, 1, 1 + SLACK);
    in_range("hist[7] (100..127 bytes)", s.hist[7], n, n + SLACK);
    in_range("hist[12] (3000 bytes)", s.hist[12], n / 10, n / 10 + SLACK);
    let kept = kept_bytes(n);
    in_range(
        "live_bytes",
        s.live_bytes,
        kept,
        kept + (n / 4 + SLACK) * 32 + 64 * 1024,
    );
    assert!(s.peak_live_bytes >= s.live_bytes);
}

#[test]
fn interposer_is_exact_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(
        dir.path(),
        "threads",
        r#"
#include <pthread.h>
#include <stdlib.h>
static void *work(void *arg) {
    for (int i = 0; i < 50000; i++) { void *p = malloc(16 + (i % 64)); free(p); }
    return 0;
}
int main(void) {
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], 0, work, 0);
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    return 0;
}
"#,
    );
    let out = dir.path().join("t.json");
    let st = Command::new(&bin)
        .env("LD_PRELOAD", memprof_so())
        .env("HERMES_MEMPROF_OUT", &out)
        .status()
        .unwrap();
    assert!(st.success());
    let s = MemprofStats::load(&out).unwrap();
    in_range("allocs", s.allocs, 200_000, 200_000 + SLACK);
    in_range("frees", s.frees, 200_000, 200_000 + SLACK);
    assert!(
        s.live_bytes < 64 * 1024,
        "everything the workers allocated was freed: {}",
        s.live_bytes
    );
}

#[test]
fn histogram_sampling_and_no_output_without_env() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(dir.path(), "allocs", PROGRAM);
    let out = dir.path().join("s.json");
    let st = Command::new(&bin)
        .arg("16000")
        .env("LD_PRELOAD", memprof_so())
        .env("HERMES_MEMPROF_OUT", &out)
        .env("HERMES_MEMPROF_SAMPLE_EVERY", "16")
        .status()
        .unwrap();
    assert!(st.success());
    let s = MemprofStats::load(&out).unwrap();
    assert_eq!(s.sample_every, 16);
    let sampled: u64 = s.hist.iter().sum();
    in_range(
        "sampled allocations",
        sampled,
        s.allocs / 16,
        s.allocs / 16 + 1,
    );
    // Without HERMES_MEMPROF_OUT the program runs and writes nothing.
    let st = Command::new(&bin)
        .arg("100")
        .current_dir(dir.path())
        .env("LD_PRELOAD", memprof_so())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        3,
        "allocs.c, allocs, s.json only"
    );
}

#[test]
fn mem_profiler_reads_live_and_final_statistics_and_smaps() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(dir.path(), "allocs", PROGRAM);
    let stats_dir = dir.path().join("memprof");
    std::fs::create_dir(&stats_dir).unwrap();
    let n = 40_000u64;
    let (mut p, _out) = Proc::spawn(
        Command::new(&bin)
            .args([&n.to_string(), "hold"])
            .env("LD_PRELOAD", memprof_so())
            .env("HERMES_MEMPROF_OUT", stats_dir.join("%p.json"))
            .env("HERMES_MEMPROF_INTERVAL_MS", "0")
            .stderr(Stdio::inherit()),
        Some("ready"),
    );
    let pid = p.pid();
    let mut settings = ModuleCatalog::builtin()
        .profile("dev-tunings")
        .unwrap()
        .clone();
    settings.top_mappings = 5;
    let mut prof = MemProfiler::new(settings, stats_dir.clone());

    // While it runs: no statistics yet (interval 0 = only at exit), but the smaps breakdown.
    prof.sample(&[pid], 0.0).unwrap();
    assert!(prof.stats(pid).is_none());
    let maps = prof.mappings(pid);
    assert!(!maps.is_empty() && maps.len() <= 5, "{maps:?}");
    assert!(
        maps.iter()
            .any(|m| matches!(m.kind, MappingKind::Heap | MappingKind::File)),
        "{maps:?}"
    );

    // Let it exit: the final statistics appear and the module reads them.
    p.0.stdin.take().unwrap().write_all(b"").unwrap();
    assert!(p.0.wait().unwrap().success());
    wait_for("the final statistics", Duration::from_secs(5), || {
        prof.sample(&[pid], 1.0).unwrap();
        prof.stats(pid).filter(|s| s.is_final).cloned()
    });
    let s = prof.stats(pid).unwrap();
    let (allocs, frees) = expected(n);
    in_range("allocs", s.allocs, allocs, allocs + SLACK);
    in_range("frees", s.frees, frees, frees + SLACK);
    let mut m = hermes_modules::metrics::Samples::default();
    prof.metrics(&mut m);
    let text = hermes_modules::metrics::render(&m.0);
    assert!(
        text.contains(&format!("hermes_alloc_total{{pid=\"{pid}\"}} {}", s.allocs)),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "hermes_alloc_size_bytes_bucket{{pid=\"{pid}\",le=\"+Inf\"}} {}",
            s.hist.iter().sum::<u64>()
        )),
        "{text}"
    );
}

#[test]
fn periodic_statistics_while_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(dir.path(), "allocs", PROGRAM);
    let out = dir.path().join("live.json");
    let (p, _o) = Proc::spawn(
        Command::new(&bin)
            .args(["200000", "hold"])
            .env("LD_PRELOAD", memprof_so())
            .env("HERMES_MEMPROF_OUT", &out)
            .env("HERMES_MEMPROF_INTERVAL_MS", "1"),
        Some("ready"),
    );
    // Written during the run (not final): a consistent snapshot of part of the work.
    let s = MemprofStats::load(&out).expect("a periodic statistics file while the program runs");
    assert!(!s.is_final);
    assert_eq!(s.pid, p.pid());
    let (allocs, _) = expected(200_000);
    in_range("allocs so far", s.allocs, 1024, allocs + SLACK);
    assert!(s.frees <= s.allocs, "{s:?}");
}

#[test]
fn forked_children_write_their_own_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(
        dir.path(),
        "forks",
        r#"
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    for (int i = 0; i < 1000; i++) free(malloc(64));
    pid_t c = fork();
    if (c == 0) {                       /* child: 5000 more pairs */
        for (int i = 0; i < 5000; i++) free(malloc(64));
        exit(0);
    }
    waitpid(c, 0, 0);
    for (int i = 0; i < 2000; i++) free(malloc(64));
    return 0;
}
"#,
    );
    let st = Command::new(&bin)
        .env("LD_PRELOAD", memprof_so())
        .env("HERMES_MEMPROF_OUT", dir.path().join("f-%p.json"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut stats: Vec<MemprofStats> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("f-"))
        .filter_map(|e| MemprofStats::load(&e.path()))
        .collect();
    stats.sort_by_key(|s| s.allocs);
    assert_eq!(stats.len(), 2, "one file per process");
    // Both inherit the 1000 pre-fork pairs; then 2000 (parent) and 5000 (child) more.
    in_range("parent allocs", stats[0].allocs, 3000, 3000 + SLACK);
    in_range("child allocs", stats[1].allocs, 6000, 6000 + SLACK);
    assert!(stats.iter().all(|s| s.is_final));
}

#[test]
fn mem_profiler_reports_allocation_rate_of_a_running_program() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(
        dir.path(),
        "steady",
        r#"
#include <stdlib.h>
#include <unistd.h>
int main(void) {
    write(1, "ready\n", 6);
    for (;;) {                          /* about 1000 pairs per millisecond, forever */
        for (int i = 0; i < 1000; i++) free(malloc(32));
        usleep(1000);
    }
}
"#,
    );
    let stats_dir = dir.path().join("memprof");
    std::fs::create_dir(&stats_dir).unwrap();
    let (p, _out) = Proc::spawn(
        Command::new(&bin)
            .env("LD_PRELOAD", memprof_so())
            .env("HERMES_MEMPROF_OUT", stats_dir.join("%p.json"))
            .env("HERMES_MEMPROF_INTERVAL_MS", "10"),
        Some("ready"),
    );
    let pid = p.pid();
    let mut prof = MemProfiler::new(
        ModuleCatalog::builtin()
            .profile("dev-tunings")
            .unwrap()
            .clone(),
        stats_dir,
    );
    let t0 = std::time::Instant::now();
    let first = wait_for("periodic statistics", Duration::from_secs(5), || {
        prof.sample(&[pid], t0.elapsed().as_secs_f64()).unwrap();
        prof.stats(pid).map(|s| s.allocs)
    });
    let t1 = t0.elapsed().as_secs_f64();
    let (t2, second) = wait_for("more allocations", Duration::from_secs(5), || {
        let t = t0.elapsed().as_secs_f64();
        prof.sample(&[pid], t).unwrap();
        let a = prof.stats(pid).unwrap().allocs;
        (a > first).then_some((t, a))
    });
    let mut m = hermes_modules::metrics::Samples::default();
    prof.metrics(&mut m);
    let rate =
        m.0.iter()
            .find(|s| s.family.name == "hermes_alloc_rate_per_second")
            .map(|s| s.value)
            .expect("a rate after two samples");
    assert!(
        (1e4..1e9).contains(&rate),
        "rate {rate}/s for about 1e6/s of allocations"
    );
    // The rate is over the last two samples (the last one saw new counts).
    assert!(t2 > t1 && second > first);
}
