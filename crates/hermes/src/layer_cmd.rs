//! `hermes layer mount`: one indexed layer of an image as a lazy, read-only filesystem, read
//! straight from the registry through its zTOC. For inspecting what the node daemon will serve.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hermes_lazyfs::{BackgroundFetcher, LayerDigest, LayerReader, SpanCache};
use hermes_oci::{LayerOutcome, Reference, RegistryRangeReader, Store};

use crate::index_cmd::{RegistryArgs, client};
use crate::size::human;

#[derive(Debug, Subcommand)]
pub enum LayerCommand {
    /// Mount an indexed layer lazily (read-only, FUSE) until Ctrl-C or SIGTERM.
    ///
    /// Files are fetched from the registry span by span as they are read, verified against the
    /// zTOC, and kept in the span cache. The image must have been indexed with `hermes index build`.
    Mount(MountArgs),
    /// One lazy layer's server process, started by `hermes node` (not for direct use).
    #[command(hide = true)]
    Serve(crate::node_cmd::ServeArgs),
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The image, as given to `hermes index build`.
    image: String,
    /// Where to mount (an existing empty directory).
    mountpoint: PathBuf,
    /// Layer digest [default: the image's largest indexed layer].
    #[arg(long, value_name = "DIGEST")]
    layer: Option<String>,
    /// Local artifact store holding the zTOCs.
    #[arg(long, env = "HERMES_STORE", default_value = "/var/lib/hermes/store")]
    store: PathBuf,
    /// Span cache directory.
    #[arg(long, env = "HERMES_CACHE", default_value = "/var/cache/hermes/layers")]
    cache: PathBuf,
    /// Also fetch the rest of the layer in the background and check its digest.
    #[arg(long)]
    background: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(cmd: LayerCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LayerCommand::Mount(args) => mount(args),
        LayerCommand::Serve(args) => crate::node_cmd::serve(args),
    }
}

fn mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    let reference = Reference::parse(&args.image)?;
    let store = Store::open(&args.store)?;
    let record = store
        .images()?
        .into_iter()
        .find(|r| {
            r.is_named(&reference.to_string())
                || reference.digest.as_ref() == Some(&r.manifest_digest)
        })
        .with_context(|| {
            format!(
                "{reference} is not indexed in {}: run `hermes index build {}` first",
                args.store.display(),
                args.image
            )
        })?;
    let indexed = record.layers.iter().filter_map(|l| match &l.outcome {
        LayerOutcome::Indexed { ztoc, .. } => Some((l, ztoc)),
        LayerOutcome::Skipped { .. } => None,
    });
    let (layer, ztoc_digest) = match &args.layer {
        Some(d) => indexed
            .clone()
            .find(|(l, _)| l.digest.as_str() == d)
            .with_context(|| {
                format!("layer {d} of {reference} has no zTOC (not in the image, or skipped)")
            })?,
        None => indexed
            .max_by_key(|(l, _)| l.size)
            .with_context(|| format!("no layer of {reference} was indexed"))?,
    };
    let bytes = store
        .get_blob(ztoc_digest)?
        .with_context(|| format!("zTOC {ztoc_digest} is missing from the store"))?;
    let ztoc = Arc::new(hermes_ztoc::Ztoc::from_bytes(&bytes)?);
    if !args.mountpoint.is_dir() {
        bail!(
            "mountpoint {} is not a directory",
            args.mountpoint.display()
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let source = RegistryRangeReader::new(
        client(&args.registry)?,
        reference.clone(),
        layer.digest.clone(),
        runtime.handle().clone(),
    )
    .with_span_check(ztoc.clone());
    let cache = SpanCache::open(&args.cache.join(layer.digest.hex()), &ztoc)?;
    let reader = Arc::new(LayerReader::new(ztoc.clone(), source, cache));
    if args.background {
        reader.keep_for_background();
    }
    let handle = hermes_lazyfs::mount(reader.clone(), &args.mountpoint)?;
    let background = if args.background {
        Some(BackgroundFetcher::start(
            reader.clone(),
            LayerDigest::parse(layer.digest.as_str())?,
            layer.size,
        )?)
    } else {
        None
    };
    println!(
        "mounted {} of {reference} at {} ({}, {} spans, {} entries); Ctrl-C to unmount",
        layer.digest,
        args.mountpoint.display(),
        human(layer.size),
        ztoc.span_count(),
        ztoc.entries().len()
    );

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(b) = background {
        eprintln!("background fetch: {:?}", b.stop());
    }
    let stats = reader.stats();
    handle.unmount()?;
    eprintln!(
        "unmounted; fetched {} in {} range request(s), {} span(s); state {:?}",
        human(stats.bytes_fetched + stats.background_bytes_fetched),
        stats.range_requests,
        stats.spans_fetched + stats.background_spans_fetched,
        reader.state()
    );
    Ok(ExitCode::SUCCESS)
}
