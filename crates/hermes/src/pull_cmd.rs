//! `hermes pull`: pull an image into containerd through a snapshotter with the labels CRI sets,
//! so that `ctr run --snapshotter hermes` starts from lazily loaded layers too.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use hermes_containerd::{Containerd, Platform};
use hermes_oci::Reference;

use crate::index_cmd::{RegistryArgs, client};
use crate::pull::{LayerOutcome, PullOptions};
use crate::size::human;

/// Flags of `hermes pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. registry.example.com/app:v1 or localhost:5000/app@sha256:….
    image: String,
    /// containerd's socket.
    #[arg(
        long,
        value_name = "SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: PathBuf,
    /// containerd namespace (`k8s.io` for images the kubelet should see).
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The snapshotter to unpack into (the name of the Hermes proxy plugin in containerd's config).
    #[arg(long, default_value = "hermes")]
    snapshotter: String,
    /// Platform to pick from a multi-platform image [default: this host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = parse_platform)]
    platform: Option<Platform>,
    #[command(flatten)]
    registry: RegistryArgs,
}

fn parse_platform(s: &str) -> Result<Platform, String> {
    Platform::parse(s).ok_or_else(|| format!("{s:?} is not OS/ARCH[/VARIANT], e.g. linux/amd64"))
}

pub fn run(args: PullArgs) -> anyhow::Result<ExitCode> {
    let reference = Reference::parse(&args.image)?;
    let registry = client(&args.registry)?;
    let options = PullOptions {
        snapshotter: args.snapshotter.clone(),
        platform: args.platform.clone().unwrap_or_else(Platform::host),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(async {
        let containerd = Containerd::connect(&args.address, &args.namespace).await?;
        println!(
            "pulling {reference} into containerd ({}, snapshotter {})",
            args.namespace, args.snapshotter
        );
        let report = crate::pull::pull(&containerd, &registry, &reference, &options, |layer| {
            println!(
                "  layer {:>2}  {}  {:>10}  {}",
                layer.index + 1,
                short(&layer.digest),
                human(layer.size),
                layer.outcome.as_str()
            );
        })
        .await
        .with_context(|| {
            format!(
                "cannot pull {reference} into containerd at {}",
                args.address.display()
            )
        })?;
        anyhow::Ok(report)
    })?;
    let count = |o: LayerOutcome| report.layers.iter().filter(|l| l.outcome == o).count();
    let downloaded: u64 = report
        .layers
        .iter()
        .filter(|l| l.outcome == LayerOutcome::Unpacked)
        .map(|l| l.size)
        .sum();
    println!(
        "{}: {} layers: {} lazy, {} unpacked ({} downloaded), {} already present",
        report.name,
        report.layers.len(),
        count(LayerOutcome::Lazy),
        count(LayerOutcome::Unpacked),
        human(downloaded),
        count(LayerOutcome::Present),
    );
    println!("manifest {}", report.manifest_digest);
    Ok(ExitCode::SUCCESS)
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}
