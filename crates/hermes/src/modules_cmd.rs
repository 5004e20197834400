//! `hermes modules …`: the memory module installer's commands. The flags are parsed here and
//! mapped to the library's plain options (`hermes_modules::resolve::ResolveOptions`,
//! `hermes_modules::supervisor::RunOptions`, `hermes_kube::webhook::server::WebhookConfig`); the output for
//! people is written here too.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use hermes_kube::webhook::server::{self, DEFAULT_MAX_CONNECTIONS, WebhookConfig};
use hermes_kube::webhook::{InjectConfig, SidecarMode, review};
use hermes_modules::catalog::{ModuleCatalog, ModuleKind, ProfilesFile};
use hermes_modules::plan::{PlanSource, PlanStatus};
use hermes_modules::resolve::{
    DEFAULT_SCRIPT_PATH, ResolveOptions, pod_metadata_env, resolve_phase,
};
use hermes_modules::script::{DEFAULT_OUTPUT_LIMIT, ScriptOptions};
use hermes_modules::static_config::{DEFAULT_STATIC_PATH, OnScriptError};
use hermes_modules::supervisor::{RunOptions, Target};

/// Exit code of `resolve --fail-on-drift` when this phase's resolution differs from the plan.
pub const EXIT_DRIFT: u8 = 3;

/// Memory module installer: decide which memory sidecar modules load, and run them.
#[derive(Debug, Subcommand)]
pub enum ModulesCommand {
    /// Decide the module plan for this pod (an init phase) and record it in the state file.
    ///
    /// If the loader script exists it is run (with /bin/bash, else /bin/sh) and its output lines
    /// `module=NAME[,config=PROFILE][,KEY=VALUE…]` select the modules. Without a script the
    /// static configuration is used: --static FILE, else HERMES_MODULES
    /// (`mem-logger,mem-tracer:staging-tunings`), else /etc/hermes/modules.yaml.
    ///
    /// The first phase creates the state file; later phases, restarts and repeated runs converge
    /// on the same plan. A phase whose resolution differs reports the drift and keeps the plan.
    Resolve(ResolveArgs),
    /// Supervise the planned modules against target processes, serve /metrics, write reports.
    ///
    /// Each module runs isolated (a crash is restarted with exponential backoff); SIGTERM or
    /// SIGINT stops all modules, writes final reports and exits 0.
    Run(RunArgs),
    /// List the built-in modules and the tuning profiles (with a profiles file applied).
    Profiles(ProfilesArgs),
    /// Answer an AdmissionReview v1 request (JSON on stdin) with the injection patch (stdout).
    ///
    /// This is the admission webhook's logic without its HTTPS server: the response adds the
    /// installer init container, the supervisor (--sidecar-mode), shareProcessNamespace, the
    /// loader ConfigMap at /etc/hermes/ and a shared state volume; an injected pod is unchanged.
    Review(ReviewArgs),
    /// Serve the mutating admission webhook over HTTPS (POST /mutate, GET /healthz).
    ///
    /// Pods selected by a HermesPolicy's `memoryModules` (namespaces, podSelector) get the
    /// installer; everything else, and any failure, is allowed unchanged. Policies are re-read
    /// from --policies on every review. Prints the bound address on the first line of stdout.
    Webhook(WebhookArgs),
}

/// Arguments of `hermes modules webhook`.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
    listen: String,
    /// PEM certificate chain for TLS.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/hermes/webhook/tls.crt"
    )]
    tls_cert: PathBuf,
    /// PEM private key for TLS.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/hermes/webhook/tls.key"
    )]
    tls_key: PathBuf,
    /// Directory of HermesPolicy YAML (e.g. a mounted ConfigMap).
    #[arg(long, value_name = "DIR", default_value = "/etc/hermes/policies")]
    policies: PathBuf,
    /// The Hermes image for the injected containers.
    #[arg(long, value_name = "IMAGE", env = "HERMES_IMAGE")]
    image: String,
    /// The supervisor's metrics port in injected pods.
    #[arg(long, value_name = "PORT", default_value_t = 9477)]
    metrics_port: u16,
    /// How the supervisor runs beside the app: `native` (a native sidecar, Kubernetes 1.29+),
    /// `container` (a regular container, older clusters) or `auto` (from the API server's
    /// version, read once at startup with the in-cluster configuration or KUBECONFIG).
    #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
    sidecar_mode: SidecarModeArg,
    /// Time a client has for its TLS handshake and request head (and again for the body);
    /// slower or idle connections are closed.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    header_timeout: Duration,
    /// Connections served at once; when all are taken, a new one closes the oldest connection
    /// whose request has not arrived yet.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
}

/// Arguments of `hermes modules review`.
#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// The Hermes image for the injected containers.
    #[arg(long, value_name = "IMAGE", env = "HERMES_IMAGE")]
    image: String,
    /// The ConfigMap holding load-sidecars.sh (and optionally modules.yaml).
    #[arg(long, value_name = "NAME", default_value = "hermes-module-loader")]
    loader_config_map: String,
    /// The supervisor's metrics port.
    #[arg(long, value_name = "PORT", default_value_t = 9477)]
    metrics_port: u16,
    /// How the supervisor runs beside the app (see `hermes modules webhook --help`).
    #[arg(long, value_enum, value_name = "MODE", default_value = "native")]
    sidecar_mode: SidecarModeArg,
}

/// `--sidecar-mode`: a [`SidecarMode`], or `auto` to ask the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SidecarModeArg {
    /// From the API server's version: native on 1.29 and later.
    Auto,
    /// An init container with `restartPolicy: Always`.
    Native,
    /// A regular container beside the app.
    Container,
}

impl SidecarModeArg {
    /// The mode to inject with; `auto` reads the API server's version (once).
    fn resolve(self) -> anyhow::Result<SidecarMode> {
        match self {
            Self::Native => Ok(SidecarMode::Native),
            Self::Container => Ok(SidecarMode::Container),
            Self::Auto => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the async runtime")?;
                runtime.block_on(server::detect_sidecar_mode()).context(
                    "--sidecar-mode auto: cannot tell whether the cluster has native sidecars",
                )
            }
        }
    }
}

/// Arguments of `hermes modules resolve`.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// Loader script; run if it exists.
    #[arg(long, value_name = "PATH", env = "HERMES_MODULE_SCRIPT", default_value = DEFAULT_SCRIPT_PATH)]
    script: PathBuf,
    /// Static configuration file (YAML); used when there is no script, must exist if given.
    /// Without it, HERMES_MODULES and then /etc/hermes/modules.yaml are used.
    #[arg(long = "static", value_name = "FILE")]
    static_file: Option<PathBuf>,
    /// Static module list: comma-separated entries NAME or NAME:PROFILE.
    #[arg(long, value_name = "LIST", env = "HERMES_MODULES")]
    modules: Option<String>,
    /// Profiles file (YAML, `profiles: {NAME: {SETTING: VALUE}}`) over the built-in profiles.
    #[arg(long, value_name = "FILE", env = "HERMES_MODULE_PROFILES")]
    profiles: Option<PathBuf>,
    /// State file shared by all phases (written atomically; the plan in force).
    #[arg(long, value_name = "FILE", env = "HERMES_MODULE_STATE")]
    state: PathBuf,
    /// Name of this init phase, recorded in STATE.phases.
    #[arg(long, value_name = "NAME", default_value = "init")]
    phase: String,
    /// What to do when the script fails: fail, use the static configuration, or load nothing.
    /// Default: the static file's `onScriptError`, else `fail`.
    #[arg(long, value_enum, env = "HERMES_ON_SCRIPT_ERROR")]
    on_script_error: Option<OnScriptErrorArg>,
    /// Kill the script (and its process group) after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    script_timeout: Duration,
    /// Kill the script when its output exceeds this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_OUTPUT_LIMIT)]
    max_output: usize,
    /// Exit with code 3 when this phase's resolution differs from the stored plan.
    #[arg(long)]
    fail_on_drift: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

/// `--on-script-error`: the library's [`OnScriptError`] as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnScriptErrorArg {
    /// Fail the phase with the script's error (the default: a broken script is visible).
    Fail,
    /// Log the error and use the static configuration instead.
    Static,
    /// Log the error and load no modules.
    None,
}

impl From<OnScriptErrorArg> for OnScriptError {
    fn from(a: OnScriptErrorArg) -> Self {
        match a {
            OnScriptErrorArg::Fail => Self::Fail,
            OnScriptErrorArg::Static => Self::Static,
            OnScriptErrorArg::None => Self::None,
        }
    }
}

/// Which processes `run` observes.
#[derive(Debug, Clone, Args)]
#[group(required = false, multiple = false)]
pub struct TargetArgs {
    /// One process.
    #[arg(long, value_name = "PID")]
    target_pid: Option<u32>,
    /// Every process of a cgroup (a directory under /sys/fs/cgroup).
    #[arg(long, value_name = "PATH")]
    target_cgroup: Option<PathBuf>,
    /// Every process visible in /proc (the default; with shareProcessNamespace, the pod).
    #[arg(long)]
    all_processes: bool,
}

impl TargetArgs {
    fn target(self) -> Target {
        match (self.target_pid, self.target_cgroup) {
            (Some(p), _) => Target::Pid(p),
            (None, Some(c)) => Target::Cgroup(c),
            (None, None) => Target::All,
        }
    }
}

/// Arguments of `hermes modules run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// State file written by `resolve`.
    #[arg(long, value_name = "FILE", env = "HERMES_MODULE_STATE")]
    state: PathBuf,
    /// Target selection.
    #[command(flatten)]
    target: TargetArgs,
    /// Address of the Prometheus /metrics endpoint (port 0 picks one; printed on start).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9477")]
    metrics_addr: String,
    /// Directory for the JSON reports (one file per module).
    #[arg(long, value_name = "DIR", default_value = "/var/run/hermes/reports")]
    report_dir: PathBuf,
    /// Directory where the LD_PRELOAD interposer writes its statistics (HERMES_MEMPROF_OUT).
    #[arg(long, value_name = "DIR", default_value = "/var/run/hermes/memprof")]
    memprof_dir: PathBuf,
    /// Stop by itself after this many seconds (default: run until SIGTERM).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    duration: Option<Duration>,
}

/// Arguments of `hermes modules profiles`.
#[derive(Debug, Args)]
pub struct ProfilesArgs {
    /// Profiles file applied over the built-in table.
    #[arg(long, value_name = "FILE", env = "HERMES_MODULE_PROFILES")]
    profiles: Option<PathBuf>,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("`{s}` is not a positive number of seconds"))
}

/// Runs a `hermes modules` subcommand.
pub fn run(cmd: ModulesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModulesCommand::Resolve(a) => resolve_cmd(a),
        ModulesCommand::Run(a) => {
            hermes_modules::supervisor::run(
                RunOptions {
                    state: a.state,
                    target: a.target.target(),
                    metrics_addr: a.metrics_addr,
                    report_dir: a.report_dir,
                    memprof_dir: a.memprof_dir,
                    duration: a.duration,
                },
                &mut std::io::stdout().lock(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        ModulesCommand::Profiles(a) => profiles_cmd(a),
        ModulesCommand::Review(a) => review_cmd(a),
        ModulesCommand::Webhook(a) => webhook_cmd(a),
    }
}

fn resolve_cmd(a: ResolveArgs) -> anyhow::Result<ExitCode> {
    let opts = ResolveOptions {
        script: a.script,
        static_file: a.static_file,
        default_static_file: PathBuf::from(DEFAULT_STATIC_PATH),
        profiles_file: a.profiles,
        modules_env: a.modules,
        on_script_error: a.on_script_error.map(OnScriptError::from),
        script_options: ScriptOptions {
            timeout: a.script_timeout,
            output_limit: a.max_output,
            env: pod_metadata_env(|k| std::env::var(k).ok()),
            env_remove: Vec::new(),
            shell: None,
        },
    };
    let outcome = resolve_phase(&opts, &a.state, &a.phase)?;
    let drifted = matches!(outcome.status, PlanStatus::Drifted { .. });
    if let PlanStatus::Drifted { added, removed } = &outcome.status {
        tracing::warn!(phase = %outcome.phase, ?added, ?removed, "this phase resolved a different module set; keeping the stored plan");
    }
    let text = if a.json {
        serde_json::to_string_pretty(&outcome)? + "\n"
    } else {
        let mut s = format!(
            "phase {}: plan {} (created by phase {}, source: {})\n",
            outcome.phase,
            match &outcome.status {
                PlanStatus::Created => "created",
                PlanStatus::Unchanged => "unchanged",
                PlanStatus::Drifted { .. } => "kept despite drift",
                PlanStatus::Replaced { .. } => "replaced (state file was damaged)",
            },
            outcome.plan.created_by_phase,
            describe_source(&outcome.plan.source),
        );
        for m in &outcome.plan.modules {
            s.push_str(&format!("  {}\n", m.key()));
        }
        if let PlanStatus::Drifted { added, removed } = &outcome.status {
            s.push_str(&format!(
                "  drift: this phase would add [{}] and remove [{}]\n",
                added.join(", "),
                removed.join(", ")
            ));
        }
        s
    };
    write_stdout(&text)?;
    Ok(if drifted && a.fail_on_drift {
        ExitCode::from(EXIT_DRIFT)
    } else {
        ExitCode::SUCCESS
    })
}

fn describe_source(s: &PlanSource) -> String {
    match s {
        PlanSource::Script { path } => format!("script {}", path.display()),
        PlanSource::StaticFile { path } => format!("static file {}", path.display()),
        PlanSource::Env => "HERMES_MODULES".to_owned(),
        PlanSource::Nothing => "nothing configured".to_owned(),
        PlanSource::ScriptFailed { path, fallback, .. } => format!(
            "script {} failed, fell back to {}",
            path.display(),
            describe_source(fallback)
        ),
    }
}

fn profiles_cmd(a: ProfilesArgs) -> anyhow::Result<ExitCode> {
    let mut catalog = ModuleCatalog::builtin();
    if let Some(p) = &a.profiles {
        catalog = catalog.with_overrides(&ProfilesFile::load(p)?)?;
    }
    let mut s = String::from("modules:\n");
    for m in ModuleKind::ALL {
        s.push_str(&format!("  {m}\n"));
    }
    s.push_str("profiles:\n");
    for name in catalog.profile_names() {
        if let Some(p) = catalog.profile(name) {
            s.push_str(&format!(
                "  {name}: interval_ms={} window={} growth_threshold_kib_per_min={} report_interval_ms={} alloc_sample_every={} top_mappings={}\n",
                p.interval_ms,
                p.window,
                p.growth_threshold_kib_per_min,
                p.report_interval_ms,
                p.alloc_sample_every,
                p.top_mappings
            ));
        }
    }
    write_stdout(&s)?;
    Ok(ExitCode::SUCCESS)
}

fn webhook_cmd(a: WebhookArgs) -> anyhow::Result<ExitCode> {
    let server = server::start(WebhookConfig {
        listen: a.listen,
        cert: a.tls_cert,
        key: a.tls_key,
        policies: a.policies,
        image: a.image,
        metrics_port: a.metrics_port,
        sidecar: a.sidecar_mode.resolve()?,
        header_timeout: a.header_timeout,
        max_connections: a.max_connections,
    })?;
    write_stdout(&format!("{}\n", server.addr()))?;
    server.wait();
    Ok(ExitCode::SUCCESS)
}

fn review_cmd(a: ReviewArgs) -> anyhow::Result<ExitCode> {
    let what = "cannot read an AdmissionReview JSON document from stdin";
    let mut input = String::new();
    std::io::stdin()
        .lock()
        .read_to_string(&mut input)
        .context(what)?;
    let request: serde_json::Value = serde_json::from_str(&input).context(what)?;
    let cfg = InjectConfig {
        image: a.image,
        loader_config_map: a.loader_config_map,
        metrics_port: a.metrics_port,
        sidecar: a.sidecar_mode.resolve()?,
    };
    write_stdout(&(serde_json::to_string(&review(&request, &cfg))? + "\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout and flushes (a closed pipe is a clean exit in `main`).
fn write_stdout(s: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ModulesCommand,
    }

    #[test]
    fn resolve_flags_parse() {
        let c = Cli::try_parse_from([
            "m",
            "resolve",
            "--script",
            "/s.sh",
            "--static",
            "/m.yaml",
            "--state",
            "/st",
            "--phase",
            "p2",
            "--json",
            "--on-script-error",
            "static",
            "--script-timeout",
            "0.5",
        ])
        .unwrap();
        let ModulesCommand::Resolve(a) = c.cmd else {
            panic!("expected resolve")
        };
        assert_eq!(a.script, PathBuf::from("/s.sh"));
        assert_eq!(a.static_file, Some(PathBuf::from("/m.yaml")));
        assert_eq!(a.phase, "p2");
        assert!(a.json);
        assert_eq!(
            a.on_script_error.map(OnScriptError::from),
            Some(OnScriptError::Static)
        );
        assert_eq!(a.script_timeout, Duration::from_millis(500));
    }

    #[test]
    fn run_targets_are_mutually_exclusive() {
        let e = Cli::try_parse_from([
            "m",
            "run",
            "--state",
            "/s",
            "--target-pid",
            "1",
            "--all-processes",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let c = Cli::try_parse_from([
            "m",
            "run",
            "--state",
            "/s",
            "--target-cgroup",
            "/sys/fs/cgroup/x",
        ])
        .unwrap();
        let ModulesCommand::Run(a) = c.cmd else {
            panic!("expected run")
        };
        assert_eq!(
            a.target.target(),
            Target::Cgroup(PathBuf::from("/sys/fs/cgroup/x"))
        );
    }

    #[test]
    fn bad_timeout_is_rejected() {
        let e = Cli::try_parse_from(["m", "resolve", "--state", "/s", "--script-timeout=-1"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`-1` is not a positive number of seconds"),
            "{e}"
        );
    }
}
