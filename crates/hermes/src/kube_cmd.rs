//! `hermes kube …`: the controller's Kubernetes mode (HermesPolicy objects, pod watch, leader
//! election, HermesImage statuses, pod Events) and the CRDs it needs.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use hermes_controller::engine::EngineOptions;
use hermes_controller::reconcile::ReconcileOptions;
use hermes_kube::controller::ControllerOptions;
use hermes_oci::ClientOptions;

use crate::index_cmd::{self, RegistryArgs};

#[derive(Debug, Subcommand)]
pub enum KubeCommand {
    /// Print the HermesPolicy and HermesImage CustomResourceDefinitions (YAML), generated from
    /// the Rust types: `hermes kube crds | kubectl apply -f -`.
    Crds,
    /// Run the controller against the cluster: replicas elect a leader through a Lease; the
    /// leader watches HermesPolicies and pods, indexes the running images policies want and
    /// writes HermesImage objects, policy conditions and pod Events. Every replica serves the
    /// node API from its artifact store.
    Controller(Box<ControllerArgs>),
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// This replica's identity in the Lease [default: $HOSTNAME, else the host name].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "hermes-system")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "hermes-controller")]
    lease_name: String,
    /// Seconds a lease stays valid after its last renewal (a crashed leader is replaced after this).
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Seconds before expiry at which the leader renews.
    #[arg(long, default_value_t = 5)]
    lease_grace: u64,
    /// Seconds between passes when nothing changes (retries are picked up then).
    #[arg(long, default_value_t = 30)]
    resync: u64,
    /// Seconds a failed image waits before it is built again.
    #[arg(long, default_value_t = 600)]
    retry_after: u64,
    /// Hours an artifact no running image needs is kept before it is collected.
    #[arg(long, default_value_t = 24)]
    gc_grace_hours: u64,
    /// Artifact store directory.
    #[arg(
        long,
        env = "HERMES_DATA",
        default_value = "/var/lib/hermes-controller"
    )]
    data: PathBuf,
    /// Address of the node API.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// File with the bearer token nodes must send to the node API (none: no auth).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve the node API over HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Talk plain HTTP to registries (in-cluster registries without TLS).
    #[arg(long, env = "HERMES_PLAIN_HTTP")]
    plain_http: bool,
    /// Keep the artifact store in this OCI repository (`registry/name`, e.g. the cluster's own
    /// registry) as well: the leader publishes what it builds, every replica copies it into its
    /// --data dir, so a failover loses and rebuilds nothing. Needed with more than one replica.
    /// Credentials: --docker-config.
    #[arg(long, value_name = "REPOSITORY", env = "HERMES_STORE_REPOSITORY")]
    store_repository: Option<String>,
    /// Seconds between copies of --store-repository by replicas that are not leading.
    #[arg(long, default_value_t = 15, value_name = "SECONDS")]
    store_sync: u64,
    /// Docker config.json with credentials for --store-repository [default:
    /// $DOCKER_CONFIG/config.json or ~/.docker/config.json when present].
    #[arg(long, value_name = "FILE")]
    docker_config: Option<PathBuf>,
    #[command(flatten)]
    registry_config: index_cmd::RegistryConfigArg,
}

pub fn run(cmd: KubeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KubeCommand::Crds => {
            let yaml = hermes_kube::crd::crds_yaml()?;
            std::io::stdout().write_all(yaml.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        KubeCommand::Controller(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(controller_main(*args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn controller_main(args: ControllerArgs) -> anyhow::Result<()> {
    let server = crate::controller_cmd::node_api_server(
        &args.listen.to_string(),
        args.token_file.as_deref(),
        args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
    )
    .await?;
    let mirror = match args.store_repository.as_deref().filter(|r| !r.is_empty()) {
        Some(repository) => {
            let settings = RegistryArgs::from_settings(
                args.plain_http,
                args.docker_config.clone(),
                args.registry_config.registry_config_path.clone(),
            );
            let registry = index_cmd::client(&settings)
                .context("cannot configure a registry client for the store repository")?;
            Some(store_mirror(repository, registry)?)
        }
        None => None,
    };
    let config = hermes_kube::Config {
        identity: args.identity,
        controller: ControllerOptions {
            lease_namespace: args.lease_namespace,
            lease_name: args.lease_name,
            lease_duration: Duration::from_secs(args.lease_duration),
            lease_grace: Duration::from_secs(args.lease_grace),
            resync: Duration::from_secs(args.resync),
            ..ControllerOptions::default()
        },
        engine: EngineOptions {
            reconcile: ReconcileOptions {
                gc_grace: Duration::from_secs(args.gc_grace_hours * 3600),
                retry_failed_after: Duration::from_secs(args.retry_after),
            },
            ..EngineOptions::default()
        },
        data: args.data,
        server,
        client: ClientOptions {
            plain_http: args.plain_http,
            registry_hosts: args.registry_config.registry_hosts(),
            ..ClientOptions::default()
        },
        mirror,
        sync_every: Duration::from_secs(args.store_sync.max(1)),
    };
    Ok(hermes_kube::run(config, shutdown_signal()).await?)
}

/// The store repository `repository` (`registry/name`, from `--store-repository`), reached with
/// `client`.
pub fn store_mirror(
    repository: &str,
    client: hermes_oci::Client,
) -> anyhow::Result<hermes_controller::mirror::Mirror> {
    let reference = hermes_oci::Reference::parse(repository).with_context(|| {
        format!("--store-repository {repository:?} is not a repository (registry/name)")
    })?;
    Ok(hermes_controller::mirror::Mirror::new(client, reference))
}

/// SIGTERM (the kubelet stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}
