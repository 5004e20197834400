//! The supervisor: runs each planned module on its own thread against the target processes,
//! restarts a failed or panicking module with exponential backoff (the others keep running),
//! serves `/metrics` and writes JSON reports (`REPORT_DIR/MODULE.json`, atomically).
//!
//! Stopping ([`Supervisor::stop`], or SIGTERM/SIGINT in `hermes modules run`) wakes every module, which
//! writes a final report and exits.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;

use crate::catalog::PlannedModule;
use crate::error::{Error, Result};
use crate::metrics::{self, Samples, families};
use crate::modules::{Module, instantiate};
use crate::plan::ModulePlan;
use crate::procfs;
use hermes_node_api::error_chain;

/// First restart delay; doubles per consecutive failure up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// Longest restart delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A module that ran this long before failing restarts with [`BASE_BACKOFF`] again.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Which processes the modules observe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One process.
    Pid(u32),
    /// The processes of a cgroup directory.
    Cgroup(PathBuf),
    /// Every process in `/proc` except the supervisor itself.
    All,
}

impl Target {
    /// The current target pids (a vanished pid or unreadable cgroup gives none).
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Self::Pid(p) => {
                if Path::new(&format!("/proc/{p}")).exists() {
                    vec![*p]
                } else {
                    Vec::new()
                }
            }
            Self::Cgroup(dir) => procfs::cgroup_pids(dir).unwrap_or_default(),
            Self::All => {
                let me = std::process::id();
                procfs::all_pids()
                    .into_iter()
                    .filter(|p| *p != me)
                    .collect()
            }
        }
    }
}

/// What the supervisor needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The plan (from the state file).
    pub plan: ModulePlan,
    /// The targets.
    pub target: Target,
    /// Where to serve `/metrics` (`None`: no endpoint).
    pub metrics_addr: Option<String>,
    /// Directory of the JSON reports.
    pub report_dir: PathBuf,
    /// Directory of the interposer's statistics files.
    pub memprof_dir: PathBuf,
}

/// The state of one supervised module.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleStatus {
    /// `module:config`.
    pub key: String,
    /// Module name.
    pub module: String,
    /// Whether the module's last sample succeeded.
    pub up: bool,
    /// Restarts after failures.
    pub restarts: u64,
    /// Samples taken over all incarnations.
    pub samples: u64,
    /// The last failure.
    pub last_error: Option<String>,
    #[serde(skip)]
    metrics: Samples,
}

#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn trigger(&self) {
        *self.lock() = true;
        self.cv.notify_all();
    }
    fn is_set(&self) -> bool {
        *self.lock()
    }
    /// Waits up to `d`; true if stopped.
    fn wait(&self, d: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |s| !*s)
            .unwrap_or_else(PoisonError::into_inner);
        *g
    }
}

type Statuses = Arc<Mutex<BTreeMap<String, ModuleStatus>>>;

fn lock(s: &Statuses) -> MutexGuard<'_, BTreeMap<String, ModuleStatus>> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Running modules.
#[derive(Debug)]
pub struct Supervisor {
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
    statuses: Statuses,
    metrics_addr: Option<SocketAddr>,
}

families! {
    /// 1 when the module's last sample succeeded.
    UP: gauge = "hermes_module_up";
    /// Restarts of a module after a failure.
    RESTARTS: counter = "hermes_module_restarts_total";
    /// Samples a module has taken.
    SAMPLES: counter = "hermes_module_samples_total";
}

fn render(statuses: &Statuses) -> String {
    let map = lock(statuses);
    let mut all = Samples::default();
    for st in map.values() {
        let l = vec![("module", st.module.clone())];
        all.push(UP, l.clone(), f64::from(u8::from(st.up)));
        all.push(RESTARTS, l.clone(), st.restarts as f64);
        all.push(SAMPLES, l, st.samples as f64);
        all.0.extend(st.metrics.0.iter().cloned());
    }
    metrics::render(&all.0)
}

impl Supervisor {
    /// Starts every planned module (each once) and the metrics endpoint.
    pub fn start(cfg: RunConfig) -> Result<Self> {
        let stop = Arc::new(Stop::default());
        let statuses: Statuses = Arc::default();
        let metrics_addr = match &cfg.metrics_addr {
            Some(a) => {
                let s = statuses.clone();
                Some(metrics::serve(a, Arc::new(move || render(&s)))?)
            }
            None => None,
        };
        let mut threads = Vec::new();
        for planned in &cfg.plan.modules {
            let key = planned.key();
            lock(&statuses).insert(
                key.clone(),
                ModuleStatus {
                    key: key.clone(),
                    module: planned.module.to_string(),
                    up: false,
                    restarts: 0,
                    samples: 0,
                    last_error: None,
                    metrics: Samples::default(),
                },
            );
            let (p, dir) = (planned.clone(), cfg.memprof_dir.clone());
            let ctx = ModuleCtx {
                make: Box::new(move || instantiate(&p, &dir)),
                planned: planned.clone(),
                target: cfg.target.clone(),
                report_dir: cfg.report_dir.clone(),
                stop: stop.clone(),
                statuses: statuses.clone(),
            };
            let h = thread::Builder::new()
                .name(key.clone())
                .spawn(move || ctx.supervise())
                .map_err(|source| Error::Thread { name: key, source })?;
            threads.push(h);
        }
        Ok(Self {
            stop,
            threads,
            statuses,
            metrics_addr,
        })
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A snapshot of the modules' states.
    pub fn status(&self) -> Vec<ModuleStatus> {
        lock(&self.statuses).values().cloned().collect()
    }

    /// The current `/metrics` text.
    pub fn metrics_text(&self) -> String {
        render(&self.statuses)
    }

    /// Stops every module (each writes its final report) and returns the final states.
    pub fn stop(self) -> Vec<ModuleStatus> {
        self.stop.trigger();
        for t in self.threads {
            let _ = t.join();
        }
        lock(&self.statuses).values().cloned().collect()
    }
}

/// Creates a fresh module instance (one per incarnation).
type Factory = Box<dyn Fn() -> Box<dyn Module> + Send>;

struct ModuleCtx {
    make: Factory,
    planned: PlannedModule,
    target: Target,
    report_dir: PathBuf,
    stop: Arc<Stop>,
    statuses: Statuses,
}

impl ModuleCtx {
    fn update(&self, f: impl FnOnce(&mut ModuleStatus)) {
        if let Some(s) = lock(&self.statuses).get_mut(&self.planned.key()) {
            f(s);
        }
    }

    fn supervise(self) {
        let mut backoff = BASE_BACKOFF;
        let origin = Instant::now();
        loop {
            if self.stop.is_set() {
                return;
            }
            let started = Instant::now();
            let mut module = (self.make)();
            let res = catch_unwind(AssertUnwindSafe(|| self.run_once(module.as_mut(), origin)));
            let error = match res {
                Ok(Ok(())) => return,
                Ok(Err(e)) => error_chain(&e),
                Err(p) => {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".to_owned());
                    format!("panicked: {msg}")
                }
            };
            if started.elapsed() > STABLE_AFTER {
                backoff = BASE_BACKOFF;
            }
            tracing::warn!(module = %self.planned.key(), %error, ?backoff, "module failed; restarting");
            self.update(|s| {
                s.up = false;
                s.restarts += 1;
                s.last_error = Some(error);
            });
            if self.stop.wait(backoff) {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn run_once(&self, module: &mut dyn Module, origin: Instant) -> Result<()> {
        let interval = Duration::from_millis(self.planned.settings.interval_ms);
        let report_every = Duration::from_millis(self.planned.settings.report_interval_ms);
        let mut next_report = Instant::now() + report_every;
        loop {
            let pids = self.target.pids();
            module.sample(&pids, origin.elapsed().as_secs_f64())?;
            let mut m = Samples::default();
            module.metrics(&mut m);
            self.update(|s| {
                s.up = true;
                s.samples += 1;
                s.metrics = m;
            });
            if Instant::now() >= next_report {
                self.write_report(module, &pids)?;
                next_report = Instant::now() + report_every;
            }
            if self.stop.wait(interval) {
                return self.write_report(module, &pids);
            }
        }
    }

    fn write_report(&self, module: &dyn Module, pids: &[u32]) -> Result<()> {
        let path = self.report_dir.join(format!("{}.json", module.kind()));
        let err = |source| Error::Report {
            path: path.clone(),
            source,
        };
        let status = lock(&self.statuses).get(&self.planned.key()).cloned();
        let body = json!({
            "module": module.kind(),
            "config": self.planned.config,
            "settings": self.planned.settings,
            "generated_at_unix_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "targets": pids,
            "status": status,
            "data": module.report(),
        });
        fs::create_dir_all(&self.report_dir).map_err(err)?;
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        fs::write(&tmp, serde_json::to_vec_pretty(&body).unwrap_or_default()).map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)
    }
}

/// Ensures one supervisor per state file, so each planned module is loaded once: an exclusive
/// `flock` on `STATE.run.lock`, which also holds the owner's pid for the error message. The
/// kernel drops the lock when its holder dies, so a crashed supervisor, or one whose pod sandbox
/// was killed, leaves nothing to take over. A pid alone would not do: a new sandbox starts a new
/// PID namespace, where the old supervisor's pid is soon some other process of the pod.
/// Released on drop (the file stays: removing it could let two supervisors lock two files).
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

impl RunLock {
    /// The lock file of a state file.
    pub fn path_for(state: &Path) -> PathBuf {
        let mut s = state.as_os_str().to_owned();
        s.push(".run.lock");
        PathBuf::from(s)
    }

    /// Takes the lock, or fails with [`Error::AlreadyRunning`].
    pub fn acquire(state: &Path) -> Result<Self> {
        let path = Self::path_for(state);
        let werr = |source| Error::StateWrite {
            path: path.clone(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(werr)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let pid = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                return Err(Error::AlreadyRunning {
                    state: state.to_path_buf(),
                    pid,
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(werr(e)),
        }
        file.set_len(0).map_err(werr)?;
        file.write_all(std::process::id().to_string().as_bytes())
            .map_err(werr)?;
        Ok(Self { _file: file })
    }
}

/// What `hermes modules run` supervises: a plan's state file, the targets and where the
/// metrics and reports go.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The state file written by `resolve` (its plan is run; its lock taken).
    pub state: PathBuf,
    /// Which processes the modules observe.
    pub target: Target,
    /// Address of the `/metrics` endpoint (port 0 picks one).
    pub metrics_addr: String,
    /// Directory for the JSON reports.
    pub report_dir: PathBuf,
    /// Where the LD_PRELOAD interposer writes its statistics.
    pub memprof_dir: PathBuf,
    /// Stop by itself after this long (`None`: until SIGTERM/SIGINT).
    pub duration: Option<Duration>,
}

/// `hermes modules run`: loads the plan, takes its lock and supervises until SIGTERM/SIGINT
/// (or [`RunOptions::duration`]). Writes `metrics on http://ADDR/metrics; modules: …` to `out`
/// once the modules run and `stopped: …` at the end; returns the final statuses.
pub fn run(opts: RunOptions, out: &mut impl Write) -> Result<Vec<ModuleStatus>> {
    let plan = ModulePlan::load(&opts.state)?;
    let _lock = RunLock::acquire(&opts.state)?;
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone())
            .map_err(|source| Error::Signals { source })?;
    }
    let sup = Supervisor::start(RunConfig {
        plan,
        target: opts.target,
        metrics_addr: Some(opts.metrics_addr),
        report_dir: opts.report_dir,
        memprof_dir: opts.memprof_dir,
    })?;
    let modules: Vec<String> = sup.status().into_iter().map(|s| s.key).collect();
    if let Some(addr) = sup.metrics_addr() {
        write_out(
            out,
            &format!(
                "metrics on http://{addr}/metrics; modules: {}\n",
                modules.join(", ")
            ),
        )?;
    }
    let started = Instant::now();
    while !term.load(Ordering::Relaxed) && opts.duration.is_none_or(|d| started.elapsed() < d) {
        thread::sleep(Duration::from_millis(20));
    }
    let fin = sup.stop();
    let summary: Vec<String> = fin
        .iter()
        .map(|s| format!("{} samples={} restarts={}", s.key, s.samples, s.restarts))
        .collect();
    write_out(out, &format!("stopped: {}\n", summary.join("; ")))?;
    Ok(fin)
}

/// Writes a line for whoever started the supervisor; a closed pipe (`| head`) is not an error.
fn write_out(out: &mut impl Write, s: &str) -> Result<()> {
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|source| Error::Stdout { source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ModuleCatalog, ModuleKind};
    use std::sync::atomic::AtomicUsize;

    /// Panics in its first two incarnations' first sample, then works.
    struct Flaky(Arc<AtomicUsize>);

    impl Module for Flaky {
        fn kind(&self) -> ModuleKind {
            ModuleKind::MemLogger
        }
        fn sample(&mut self, _: &[u32], _: f64) -> Result<()> {
            if self.0.fetch_add(1, Ordering::SeqCst) < 2 {
                panic!("boom");
            }
            Ok(())
        }
        fn metrics(&self, _: &mut Samples) {}
        fn report(&self) -> serde_json::Value {
            json!({})
        }
    }

    #[test]
    fn a_panicking_module_is_isolated_and_restarted_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = ModuleCatalog::builtin()
            .profile("dev-tunings")
            .unwrap()
            .clone();
        settings.interval_ms = 10;
        let planned = PlannedModule {
            module: ModuleKind::MemLogger,
            config: "dev-tunings".into(),
            overrides: Default::default(),
            settings,
        };
        let statuses: Statuses = Arc::default();
        lock(&statuses).insert(
            planned.key(),
            ModuleStatus {
                key: planned.key(),
                module: "mem-logger".into(),
                up: false,
                restarts: 0,
                samples: 0,
                last_error: None,
                metrics: Samples::default(),
            },
        );
        let stop = Arc::new(Stop::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let ctx = ModuleCtx {
            make: Box::new(move || Box::new(Flaky(c.clone()))),
            planned: planned.clone(),
            target: Target::Pid(std::process::id()),
            report_dir: dir.path().to_path_buf(),
            stop: stop.clone(),
            statuses: statuses.clone(),
        };
        let started = Instant::now();
        let h = thread::spawn(move || ctx.supervise());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = lock(&statuses)[&planned.key()].clone();
            if st.up && st.samples >= 3 {
                assert_eq!(st.restarts, 2);
                assert_eq!(st.last_error.as_deref(), Some("panicked: boom"));
                break;
            }
            assert!(Instant::now() < deadline, "module never recovered: {st:?}");
            thread::sleep(Duration::from_millis(5));
        }
        // Two backoffs: 200 ms, then 400 ms.
        assert!(
            started.elapsed() >= BASE_BACKOFF * 3,
            "{:?}",
            started.elapsed()
        );
        stop.trigger();
        h.join().unwrap();
        assert!(
            dir.path().join("mem-logger.json").exists(),
            "final report on stop"
        );
    }
}
