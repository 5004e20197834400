//! `hermes index …`: build SOCI-compatible indexes for images in a registry, and show them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use hermes_oci::manifest::Platform;
use hermes_oci::soci::SociVersion;
use hermes_oci::{
    Client, ClientOptions, Credentials, ImageRecord, IndexOptions, LayerOutcome, LayerRecord,
    Reference, RegistryHosts, Store,
};

use crate::size::{human, parse_size};

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Index an image straight from its registry: each eligible layer is streamed once and its
    /// zTOC stored by layer digest (layers indexed before are not read again).
    Build(BuildArgs),
    /// Show what is indexed: one image (by reference or digest) or everything in a store.
    Info(InfoArgs),
}

/// Where to find registry credentials and how to connect.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Use plain HTTP (for local registries without TLS).
    #[arg(long)]
    plain_http: bool,
    /// Docker config.json with `auths` [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json if present].
    #[arg(long, value_name = "FILE")]
    docker_config: Option<PathBuf>,
    /// A Kubernetes pull secret (kubernetes.io/dockerconfigjson, JSON) with credentials.
    #[arg(long, value_name = "FILE")]
    pull_secret: Option<PathBuf>,
    #[command(flatten)]
    registry_config: RegistryConfigArg,
}

/// `--registry-config-path`, shared by every command that reads blobs from registries.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryConfigArg {
    /// containerd's registry host configuration directory (its `config_path`): mirrors in
    /// `DIR/<registry>/hosts.toml` (or `DIR/_default/hosts.toml`) serve blob reads first, in
    /// order, the registry last; what they serve is verified. An empty value turns it off
    /// [default: /etc/containerd/certs.d when it exists].
    #[arg(
        long,
        value_name = "DIR",
        env = "HERMES_REGISTRY_CONFIG_PATH",
        value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from)
    )]
    pub(crate) registry_config_path: Option<PathBuf>,
}

impl RegistryConfigArg {
    /// The registry host configuration this names.
    pub fn registry_hosts(&self) -> RegistryHosts {
        registry_hosts(self.registry_config_path.as_deref())
    }
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Image reference, e.g. localhost:5000/ml/serve:v1 or registry/repo@sha256:….
    image: String,
    /// Platform to index from a multi-platform image [default: this machine's, e.g. linux/amd64].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Layers smaller than this (compressed) are not indexed; they are pulled whole.
    #[arg(long, default_value = "10MiB", value_parser = parse_size)]
    min_layer_size: u64,
    /// Smallest zTOC span size, the unit of lazy fetching: smaller spans fetch fewer bytes per
    /// read but make a larger zTOC (32 KiB per span). Layers over about 256 MiB (compressed) get
    /// larger spans, so a zTOC stays near 128 MiB or less. soci's default is 4MiB.
    #[arg(long, default_value = "512KiB", value_parser = parse_size)]
    span_size: u64,
    /// Local artifact store.
    #[arg(long, env = "HERMES_STORE", default_value = "/var/lib/hermes/store")]
    store: PathBuf,
    /// Push SOCI artifacts to the registry: v2 (an image index binding the image and its SOCI
    /// index, tagged TAG-soci unless --push-to says otherwise) or v1 (referrers of the image).
    #[arg(long, value_enum, default_value_t = PushMode::None)]
    push: PushMode,
    /// Where to push [default: the image's repository].
    #[arg(long, value_name = "REF")]
    push_to: Option<String>,
    /// Layers indexed in parallel.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Build tool identifier stored in zTOCs and the index.
    #[arg(long, default_value = hermes_ztoc::SOCI_BUILD_TOOL_IDENTIFIER)]
    build_tool_identifier: String,
    /// Print the image record as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PushMode {
    None,
    SociV2,
    SociV1,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// An image reference or manifest digest, or a store directory to list everything in it.
    target: String,
    /// Local artifact store.
    #[arg(long, env = "HERMES_STORE", default_value = "/var/lib/hermes/store")]
    store: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: IndexCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        IndexCommand::Build(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(build(args))
        }
        IndexCommand::Info(args) => info(args),
    }
}

fn credentials(args: &RegistryArgs) -> anyhow::Result<Credentials> {
    let mut creds = Credentials::none();
    let default_config = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
        .map(|d| d.join("config.json"));
    let config = match &args.docker_config {
        Some(p) => Some(p.clone()),
        None => default_config.filter(|p| p.exists()),
    };
    if let Some(path) = config {
        let bytes = std::fs::read(&path)
            .with_context(|| format!("cannot read docker config {}", path.display()))?;
        creds.merge(Credentials::from_docker_config(
            &bytes,
            &path.display().to_string(),
        )?);
    }
    if let Some(path) = &args.pull_secret {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read pull secret {}", path.display()))?;
        creds.merge(Credentials::from_pull_secret(
            &bytes,
            &path.display().to_string(),
        )?);
    }
    Ok(creds)
}

impl RegistryArgs {
    /// Settings from a config file rather than flags.
    pub fn from_settings(
        plain_http: bool,
        docker_config: Option<PathBuf>,
        registry_config_path: Option<PathBuf>,
    ) -> Self {
        Self {
            plain_http,
            docker_config,
            pull_secret: None,
            registry_config: RegistryConfigArg {
                registry_config_path,
            },
        }
    }

    /// `--registry-config-path`.
    pub fn registry_config_path(&self) -> Option<&std::path::Path> {
        self.registry_config.registry_config_path.as_deref()
    }

    /// The registry host configuration these settings name.
    pub fn registry_hosts(&self) -> RegistryHosts {
        self.registry_config.registry_hosts()
    }

    /// `--plain-http`.
    pub fn plain_http(&self) -> bool {
        self.plain_http
    }

    /// `--docker-config`.
    pub fn docker_config(&self) -> Option<&std::path::Path> {
        self.docker_config.as_deref()
    }
}

/// `dir` as containerd's `config_path`: none given is containerd's usual directory when it
/// exists, an empty one is none.
pub fn registry_hosts(dir: Option<&std::path::Path>) -> RegistryHosts {
    match dir {
        None => RegistryHosts::system_default(),
        Some(d) if d.as_os_str().is_empty() => RegistryHosts::none(),
        Some(d) => RegistryHosts::from_dir(d),
    }
}

pub fn client(args: &RegistryArgs) -> anyhow::Result<Client> {
    Ok(Client::new(ClientOptions {
        plain_http: args.plain_http,
        credentials: credentials(args)?,
        registry_hosts: args.registry_hosts(),
        ..ClientOptions::default()
    })?)
}

fn short(d: &hermes_oci::Digest) -> String {
    format!("{}…", &d.as_str()[..19])
}

fn layer_line(l: &LayerRecord) -> String {
    let kind = l.media_type.rsplit('.').next().unwrap_or(&l.media_type);
    match &l.outcome {
        LayerOutcome::Indexed {
            spans,
            entries,
            seconds,
            reused,
            soci_compatible,
            ..
        } => {
            let how = if *reused {
                "already indexed".to_owned()
            } else {
                format!("indexed in {seconds:.1}s")
            };
            let note = if *soci_compatible {
                ""
            } else {
                " (Hermes-only zTOC: zstd or sparse files)"
            };
            format!(
                "  {} {:>10} {kind:<10} {how}: {spans} spans, {entries} entries{note}",
                short(&l.digest),
                human(l.size)
            )
        }
        LayerOutcome::Skipped { reason } => format!(
            "  {} {:>10} {kind:<10} skipped: {reason}",
            short(&l.digest),
            human(l.size)
        ),
    }
}

async fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let reference = Reference::parse(&args.image)?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).with_context(|| {
            format!("--platform {p:?} is not OS/ARCH[/VARIANT], e.g. linux/amd64")
        })?,
        None => Platform::host(),
    };
    if args.span_size == 0 {
        bail!("--span-size must be at least 1 byte");
    }
    let push_target = match &args.push_to {
        Some(r) => Some(Reference::parse(r)?),
        None if args.push == PushMode::SociV2 => Some(reference.with_tag(&format!(
            "{}-soci",
            reference.tag.as_deref().unwrap_or("latest")
        ))),
        None => Some(Reference {
            tag: None,
            digest: None,
            ..reference.clone()
        }),
    };
    let client = client(&args.registry)?;
    let store = Store::open(&args.store)?;
    let options = IndexOptions {
        platform,
        min_layer_size: args.min_layer_size,
        span_size: args.span_size,
        build_tool_identifier: args.build_tool_identifier.clone(),
        concurrency: args.concurrency,
    };
    let started = Instant::now();
    eprintln!("indexing {reference} ({})", options.platform);
    let progress = |l: &LayerRecord| eprintln!("{}", layer_line(l));
    let result = hermes_oci::build_index(&client, &store, &reference, &options, &progress)
        .await
        .with_context(|| format!("cannot index {reference}"))?;
    let record = &result.record;
    let indexed = record
        .layers
        .iter()
        .filter(|l| matches!(l.outcome, LayerOutcome::Indexed { .. }))
        .count();
    let read: u64 = record
        .layers
        .iter()
        .filter(|l| matches!(l.outcome, LayerOutcome::Indexed { reused: false, .. }))
        .map(|l| l.size)
        .sum();
    eprintln!(
        "{indexed} of {} layers indexed, {} read from the registry, in {:.1}s; manifest {}",
        record.layers.len(),
        human(read),
        started.elapsed().as_secs_f64(),
        record.manifest_digest
    );
    match &record.soci_index {
        Some(d) => eprintln!("SOCI index {d} stored in {}", store.root().display()),
        None => eprintln!(
            "no layer could be indexed: containers from this image will be pulled normally"
        ),
    }
    if args.push != PushMode::None {
        let version = if args.push == PushMode::SociV1 {
            SociVersion::V1
        } else {
            SociVersion::V2
        };
        let target = push_target.unwrap_or_else(|| reference.clone());
        let pushed = hermes_oci::push_soci(
            &client,
            &store,
            &result,
            version,
            &target,
            &args.build_tool_identifier,
        )
        .await
        .with_context(|| format!("cannot push the SOCI index to {target}"))?;
        match &pushed.tagged {
            Some(t) => eprintln!(
                "pushed SOCI v2 image {t} (SOCI index {}, {} zTOCs)",
                pushed.soci_index, pushed.ztocs
            ),
            None => eprintln!(
                "pushed SOCI v1 index {} as a referrer of {} ({} zTOCs)",
                pushed.soci_index, record.manifest_digest, pushed.ztocs
            ),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(record)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_record(out: &mut impl Write, r: &ImageRecord) -> std::io::Result<()> {
    writeln!(out, "image:       {}", r.reference)?;
    for alias in &r.aliases {
        writeln!(out, "also:        {alias}")?;
    }
    writeln!(out, "manifest:    {}", r.manifest_digest)?;
    if let Some(p) = &r.platform {
        writeln!(out, "platform:    {p}")?;
    }
    writeln!(out, "span size:   {}", human(r.span_size))?;
    writeln!(
        out,
        "SOCI index:  {}",
        r.soci_index
            .as_ref()
            .map_or("none".to_owned(), ToString::to_string)
    )?;
    writeln!(out, "layers:")?;
    for l in &r.layers {
        writeln!(out, "{}", layer_line(l))?;
    }
    Ok(())
}

fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let (store_dir, filter) = if Path::new(&args.target).is_dir() {
        (PathBuf::from(&args.target), None)
    } else {
        (args.store.clone(), Some(args.target.clone()))
    };
    let store = Store::open(&store_dir)?;
    let records = store.images()?;
    let selected: Vec<&ImageRecord> = match &filter {
        None => records.iter().collect(),
        Some(target) => {
            let wanted = Reference::parse(target).ok();
            let found = records.iter().find(|r| {
                r.manifest_digest.as_str() == target
                    || r.is_named(target)
                    || wanted.as_ref().is_some_and(|w| {
                        r.is_named(&w.to_string()) || w.digest.as_ref() == Some(&r.manifest_digest)
                    })
            });
            match found {
                Some(r) => vec![r],
                None => bail!(
                    "no index for {target} in {}: run `hermes index build {target}` first",
                    store_dir.display()
                ),
            }
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = if filter.is_some() {
            serde_json::to_value(selected[0])?
        } else {
            serde_json::to_value(&selected)?
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else if selected.is_empty() {
        writeln!(out, "no images indexed in {}", store_dir.display())?;
    } else {
        for (i, r) in selected.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            print_record(&mut out, r)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
