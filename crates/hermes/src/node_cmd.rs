//! `hermes node`: the node daemon (containerd remote snapshotter with lazy layers).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use hermes_snapshotter::config::{ControllerConfig, NodeConfig};
use hermes_snapshotter::{Daemon, NodeLayers, ServerCommand};

use crate::index_cmd::{RegistryArgs, client};

/// Flags of `hermes node`; they override the config file.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Config file (TOML, or YAML by extension `.yaml`/`.yml`); every key is optional.
    #[arg(long, value_name = "FILE", env = "HERMES_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// State root: snapshots, zTOCs, span caches, mounts [default: /var/lib/hermes/node].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Snapshots API socket for containerd's `proxy_plugins.hermes` [default: /run/hermes/snapshotter.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The controller's node API, e.g. http://hermes-controller:8080.
    #[arg(long, value_name = "URL")]
    controller: Option<String>,
    /// File with the controller's bearer token.
    #[arg(long, value_name = "FILE", requires = "controller")]
    controller_token_file: Option<PathBuf>,
    /// Also use SOCI indexes found in the image's registry (v2 image indexes, v1 referrers).
    #[arg(long)]
    soci_from_registry: bool,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9465.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Span cache budget (uncompressed bytes of lazy layers), e.g. 50GiB; beyond it layers are
    /// pulled normally.
    #[arg(long, value_name = "SIZE", value_parser = hermes_snapshotter::config::parse_size)]
    cache_size: Option<u64>,
    /// Do not fetch the rest of each layer in the background.
    #[arg(long)]
    no_background_fetch: bool,
    /// Record-and-replay window: with a controller, record the spans read during this many
    /// seconds after each mount and send them; mounts prefetch the controller's merged profile.
    /// 0 turns both off [default: 10].
    #[arg(long, value_name = "SECS")]
    trace_window: Option<u64>,
    /// Stop every lazy layer server under the root, unmount their layers, and exit. Containers
    /// still using them lose their files: stop them first.
    #[arg(long)]
    unmount_all: bool,
    /// Serve the CRI image service on this socket, for the kubelet's `--image-service-endpoint`:
    /// pulls pass through to containerd and bring pods' `imagePullSecrets` to lazy layers
    /// (kept in memory only).
    #[arg(long, value_name = "PATH")]
    cri_proxy: Option<PathBuf>,
    /// containerd's socket, where the CRI proxy forwards [default: /run/containerd/containerd.sock].
    #[arg(long, value_name = "PATH")]
    containerd: Option<PathBuf>,
    /// This node's name in reports to the controller: the Kubernetes node name, which pull
    /// reports are attributed to pods by [default: the host name].
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Hidden: one lazy layer's server process, started by the node daemon.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// zTOC file.
    #[arg(long)]
    ztoc: PathBuf,
    /// An image with the layer.
    #[arg(long)]
    image: String,
    /// Layer digest.
    #[arg(long)]
    layer: String,
    /// Span cache dir.
    #[arg(long)]
    cache: PathBuf,
    /// Stats file.
    #[arg(long)]
    stats: PathBuf,
    /// Fetch the rest in the background.
    #[arg(long)]
    background: bool,
    /// Record the spans read during this many seconds after mount.
    #[arg(long, value_name = "SECS")]
    trace_window: Option<u64>,
    /// Prefetch this startup profile first.
    #[arg(long, value_name = "FILE")]
    prefetch: Option<PathBuf>,
    /// The policy's mode: Lazy, Prefetch or Eager.
    #[arg(long, default_value = "Lazy", value_parser = parse_mode)]
    mode: hermes_node_api::NodeMode,
    /// Be fully local within this many seconds of the mount.
    #[arg(long, value_name = "SECS")]
    fully_local_within: Option<u64>,
    /// Read the image's registry credential from stdin, one line now and one per change (the
    /// node daemon hands pods' pull secrets over this way; never on a command line or on disk).
    #[arg(long)]
    credential_stdin: bool,
    /// Mountpoint.
    mountpoint: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
}

fn config(args: &NodeArgs) -> anyhow::Result<NodeConfig> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
    if let Some(root) = &args.root {
        config.root = std::path::absolute(root)?;
    }
    if let Some(socket) = &args.socket {
        config.socket = socket.clone();
    }
    if let Some(url) = &args.controller {
        let mut c = ControllerConfig::new(url.clone());
        c.token_file = args.controller_token_file.clone();
        config.controller = Some(c);
    }
    config.soci_from_registry |= args.soci_from_registry;
    config.plain_http |= args.registry.plain_http();
    if let Some(p) = args.registry.docker_config() {
        config.docker_config = Some(p.to_owned());
    }
    if let Some(p) = args.registry.registry_config_path() {
        config.registry_config_path = Some(p.to_owned());
    }
    if args.metrics.is_some() {
        config.metrics = args.metrics;
    }
    if let Some(size) = args.cache_size {
        config.cache_size = size;
    }
    if args.no_background_fetch {
        config.background_fetch = false;
    }
    if let Some(secs) = args.trace_window {
        config.trace_window_secs = secs;
    }
    if let Some(socket) = &args.cri_proxy {
        config.cri_proxy = Some(socket.clone());
    }
    if let Some(socket) = &args.containerd {
        config.containerd = socket.clone();
    }
    if let Some(name) = &args.node_name {
        config.node_name = Some(name.clone());
    }
    Ok(config)
}

pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    // Everything the node and its layer servers write is for root only (see `private`).
    hermes_snapshotter::private::restrict_umask();
    let config = config(&args)?;
    if args.unmount_all {
        let n = NodeLayers::stop_all(&config.root.join("layers"));
        println!("stopped {n} lazy layer(s) under {}", config.root.display());
        return Ok(ExitCode::SUCCESS);
    }
    let registry = RegistryArgs::from_settings(
        config.plain_http,
        config.docker_config.clone(),
        config.registry_config_path.clone(),
    );
    let client = client(&registry)?;
    let mut server_args: Vec<std::ffi::OsString> = vec!["layer".into(), "serve".into()];
    if config.plain_http {
        server_args.push("--plain-http".into());
    }
    if let Some(p) = &config.docker_config {
        server_args.push("--docker-config".into());
        server_args.push(p.into());
    }
    // Layer servers read the blobs: they get the same mirrors (an empty path: none).
    server_args.push("--registry-config-path".into());
    server_args.push(
        registry
            .registry_hosts()
            .config_path()
            .map(|p| p.as_os_str().to_owned())
            .unwrap_or_default(),
    );
    let server = ServerCommand {
        program: std::env::current_exe().context("cannot find the hermes executable")?,
        args: server_args,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let daemon = Daemon::start(&config, server, client)
            .await
            .context("node daemon failed to start")?;
        let r = daemon.recovery();
        eprintln!(
            "hermes node: serving {} (root {}); lazy layers adopted {}, re-mounted {}, failed {}",
            config.socket.display(),
            config.root.display(),
            r.adopted,
            r.remounted,
            r.failed
        );
        if let Some(socket) = &config.cri_proxy {
            eprintln!(
                "hermes node: CRI image service on {} (forwarding to {})",
                socket.display(),
                config.containerd.display()
            );
        }
        if let Some(addr) = daemon.metrics_addr() {
            eprintln!("hermes node: metrics on http://{addr}/metrics");
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, stop.clone())
                .context("cannot install signal handlers")?;
        }
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        eprintln!("hermes node: stopping (lazy layers stay mounted)");
        daemon.shutdown().await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    hermes_snapshotter::private::restrict_umask();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = client(&args.registry)?;
    if args.credential_stdin {
        let image = hermes_oci::Reference::parse(&args.image)?;
        follow_credential_stdin(&image, &client.options().pull_credentials)?;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    let opts = hermes_snapshotter::ServeOptions {
        ztoc: args.ztoc,
        image: args.image,
        layer: args.layer,
        cache: args.cache,
        mountpoint: args.mountpoint,
        stats: args.stats,
        background: args.background,
        trace_window: args.trace_window.map(std::time::Duration::from_secs),
        prefetch: args.prefetch,
        mode: args.mode,
        fully_local_within: args.fully_local_within.map(std::time::Duration::from_secs),
    };
    hermes_snapshotter::serve_layer(&opts, client, runtime.handle().clone(), &stop)?;
    Ok(ExitCode::SUCCESS)
}

fn parse_mode(value: &str) -> Result<hermes_node_api::NodeMode, String> {
    hermes_node_api::NodeMode::parse(value)
        .ok_or_else(|| format!("{value:?} is not a mode (Lazy, Prefetch, Eager)"))
}

/// Reads credential lines the node daemon writes to a layer server's stdin: the first one now
/// (before the mount), later ones (a pod's rotated secret) on a thread, into `credentials`.
fn follow_credential_stdin(
    image: &hermes_oci::Reference,
    credentials: &hermes_oci::PullCredentials,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Read};
    let mut stdin = std::io::BufReader::new(std::io::stdin());
    let mut next = move || -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        // Bounded: a line longer than any credential is cut, and then fails to decode.
        Read::take(&mut stdin, hermes_oci::MAX_HANDOFF_SIZE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        Ok((!line.is_empty()).then_some(line))
    };
    let first = next()
        .context("cannot read the registry credential from stdin")?
        .context("stdin closed before the registry credential")?;
    // Messages name no detail: the input holds a secret. `{}` is "no credential".
    credentials.set(image, hermes_oci::decode_handoff(&first));
    let (image, credentials) = (image.clone(), credentials.clone());
    std::thread::spawn(move || {
        while let Ok(Some(line)) = next() {
            if let Some(c) = hermes_oci::decode_handoff(&line) {
                tracing::info!(image = %image, "registry credential refreshed");
                credentials.set(&image, Some(c));
            }
        }
    });
    Ok(())
}
