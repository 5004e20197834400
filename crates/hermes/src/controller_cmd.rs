//! `hermes controller --standalone …`: the policy-driven index builder without Kubernetes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use hermes_controller::engine::EngineOptions;
use hermes_controller::policy::parse_duration;
use hermes_controller::queue::QueueOptions;
use hermes_controller::reconcile::ReconcileOptions;
use hermes_controller::server::NodeApiServer;
use hermes_oci::manifest::Platform;

use crate::index_cmd::{RegistryArgs, client};

/// The default address of the node API (and of `hermes status --controller`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text)
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Run without Kubernetes: policies from --policies, running containers from the local
    /// containerd, artifacts and statuses under --data, the node API on --listen.
    #[arg(long)]
    standalone: bool,
    /// Directory of HermesPolicy YAML files (*.yaml, *.yml; reread when they change).
    #[arg(long, value_name = "DIR", default_value = "/etc/hermes/policies")]
    policies: PathBuf,
    /// Data directory: the artifact store (store/) and image statuses (status/).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/hermes/controller")]
    data: PathBuf,
    /// Address of the node API (zTOCs, statuses, misses, traces, /metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: String,
    /// containerd socket whose running containers are watched.
    #[arg(
        long,
        value_name = "SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd: PathBuf,
    /// containerd namespaces to watch, comma-separated [default: all].
    #[arg(long, value_name = "NS,…", value_delimiter = ',')]
    namespace: Vec<String>,
    /// File holding the bearer token nodes must send to /v1/* [default: no token needed].
    #[arg(long, value_name = "FILE", env = "HERMES_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Serve the node API over HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Platform indexed from multi-platform images [default: this machine's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Layer builds running at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Attempts per layer before its images are Failed (they are retried after
    /// --retry-failed-after).
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Wait after a first failure (layer build, manifest resolve, record write); doubles after
    /// each further one.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    retry_backoff: Duration,
    /// Longest wait between attempts.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
    retry_backoff_max: Duration,
    /// How long a Failed image stays Failed before it is built again.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = duration)]
    retry_failed_after: Duration,
    /// How long artifacts stay after no running image needs them.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = duration)]
    gc_grace: Duration,
    /// How often policies and running containers are polled.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
    poll_interval: Duration,
    /// Build tool identifier stored in zTOCs and SOCI indexes.
    #[arg(long, default_value = hermes_ztoc::SOCI_BUILD_TOOL_IDENTIFIER)]
    build_tool_identifier: String,
    /// Also keep the artifact store in this OCI repository (`registry/name`): what is built
    /// is published there, and a controller starting with an empty --data copies it back
    /// instead of building again. Same credentials and --plain-http as the images.
    #[arg(long, value_name = "REPOSITORY")]
    store_repository: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    if !args.standalone {
        bail!("only the standalone mode is available here: add --standalone");
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).with_context(|| {
            format!("--platform {p:?} is not OS/ARCH[/VARIANT], e.g. linux/amd64")
        })?,
        None => Platform::host(),
    };
    if !args.policies.is_dir() {
        bail!(
            "the policy directory {} does not exist: create it (it may be empty) or pass --policies DIR",
            args.policies.display()
        );
    }
    let engine = EngineOptions {
        queue: QueueOptions {
            max_concurrent: args.concurrency,
            max_attempts: args.max_attempts.max(1),
            backoff_base: args.retry_backoff,
            backoff_cap: args.retry_backoff_max,
        },
        reconcile: ReconcileOptions {
            gc_grace: args.gc_grace,
            retry_failed_after: args.retry_failed_after,
        },
        ..EngineOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = node_api_server(
            &args.listen,
            args.token_file.as_deref(),
            args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
        )
        .await?;
        let config = hermes_standalone::Config {
            policies: args.policies,
            data: args.data,
            server,
            containerd: args.containerd,
            namespaces: args.namespace,
            client: client(&args.registry)?,
            platform,
            build_tool_identifier: args.build_tool_identifier,
            engine,
            poll_interval: args.poll_interval,
            mirror: match &args.store_repository {
                Some(repository) => Some(crate::kube_cmd::store_mirror(
                    repository,
                    client(&args.registry)?,
                )?),
                None => None,
            },
        };
        hermes_standalone::run(config, shutdown_signal()?).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The node API's socket, token and TLS from the command line, the same way in both controller
/// modes: the token file is read like the node reads its own (an empty file is refused).
pub async fn node_api_server(
    listen: &str,
    token_file: Option<&Path>,
    tls: Option<(&Path, &Path)>,
) -> anyhow::Result<NodeApiServer> {
    let token = token_file
        .map(hermes_snapshotter::config::read_token_file)
        .transpose()?;
    let server = NodeApiServer::bind(listen, token, tls).await?;
    // Tests and scripts start with port 0 and read the address from here.
    eprintln!("listening on {}", server.local_addr()?);
    Ok(server)
}

/// Completes on SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    Ok(async move {
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
