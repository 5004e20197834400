//! `hermes`: the one binary. Parses the command line and hands over to the library crates.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod controller_cmd;
mod index_cmd;
mod kube_cmd;
mod layer_cmd;
mod modules_cmd;
mod node_cmd;
mod pull;
mod pull_cmd;
mod size;
mod status_cmd;
mod ztoc_cmd;

/// Hermes: containers from unmodified OCI images start in seconds by loading their layers lazily.
#[derive(Debug, Parser)]
#[command(name = "hermes", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build, inspect and read through zTOCs (SOCI-compatible layer indexes).
    #[command(subcommand)]
    Ztoc(ztoc_cmd::ZtocCommand),
    /// Index images from their registry and push SOCI artifacts.
    #[command(subcommand)]
    Index(index_cmd::IndexCommand),
    /// Mount an indexed layer lazily from its registry (FUSE), for inspection.
    #[command(subcommand)]
    Layer(layer_cmd::LayerCommand),
    /// Run the node daemon: containerd's remote snapshotter with lazy layers.
    ///
    /// Serves containerd's snapshots API (`proxy_plugins.hermes`). When containerd prepares a
    /// layer with CRI labels, the daemon looks up its zTOC (local store, the controller, SOCI
    /// indexes in the registry) and mounts it lazily; otherwise, or on any error, containerd
    /// pulls the layer normally. Lazy layers are served by separate processes, so they stay
    /// mounted across daemon restarts; `--unmount-all` takes them down.
    Node(node_cmd::NodeArgs),
    /// The controller in a Kubernetes cluster (HermesPolicy CRDs, pod watch, leader election).
    #[command(subcommand)]
    Kube(kube_cmd::KubeCommand),
    /// Pull an image into containerd through the Hermes snapshotter, with the labels CRI sets.
    ///
    /// Layers the snapshotter can load lazily are not downloaded; the others are fetched and
    /// unpacked by containerd as usual. Afterwards `ctr run --snapshotter hermes IMAGE …` works.
    Pull(pull_cmd::PullArgs),
    /// Memory sidecar modules: resolve which load (runtime script or static config), run them.
    #[command(subcommand)]
    Modules(modules_cmd::ModulesCommand),
    /// The controller: indexes running images that a HermesPolicy selects and serves the
    /// indexes to nodes (`--standalone`: policies from a directory, a local containerd).
    Controller(controller_cmd::ControllerArgs),
    /// What the controller knows: images (phase, layers, build time, errors) and policies.
    Status(status_cmd::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ztoc(cmd) => ztoc_cmd::run(cmd),
        Command::Index(cmd) => index_cmd::run(cmd),
        Command::Layer(cmd) => layer_cmd::run(cmd),
        Command::Node(args) => node_cmd::run(args),
        Command::Kube(cmd) => kube_cmd::run(cmd),
        Command::Pull(args) => pull_cmd::run(args),
        Command::Modules(cmd) => modules_cmd::run(cmd),
        Command::Controller(args) => controller_cmd::run(args),
        Command::Status(args) => status_cmd::run(args),
    }
}

/// Output piped into `head` and closed early is not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
