//! `hermes ztoc …`: build, inspect and read through zTOCs on local files.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use hermes_ztoc::{BuildOptions, Compression, CountingReader, EntryKind, Ztoc};
use sha2::{Digest, Sha256};

use crate::size::{human, parse_size};

#[derive(Debug, Subcommand)]
pub enum ZtocCommand {
    /// Build a zTOC from a layer blob (tar, tar+gzip or multi-frame tar+zstd).
    ///
    /// With the default build tool identifier the result is byte-identical to the zTOC soci
    /// builds for the same layer and span size.
    Build(BuildArgs),
    /// Show a zTOC's version, compression, sizes and span and entry counts.
    Info(InfoArgs),
    /// List a zTOC's entries like `tar tv`.
    Ls(LsArgs),
    /// Extract one file of a layer, reading only the compressed spans it needs.
    Extract(ExtractArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The layer blob.
    layer: PathBuf,
    /// Where to write the zTOC [default: LAYER.ztoc].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Uncompressed distance between checkpoints (e.g. 65536, 1MiB).
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    span_size: u64,
    /// Identifier stored in the zTOC; keep soci's to get soci's bytes.
    #[arg(long, default_value = hermes_ztoc::SOCI_BUILD_TOOL_IDENTIFIER)]
    build_tool_identifier: String,
    /// Layer encoding; `auto` looks at the magic bytes.
    #[arg(long, value_enum, default_value_t = CompressionArg::Auto)]
    compression: CompressionArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressionArg {
    Auto,
    Gzip,
    Zstd,
    Uncompressed,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The zTOC file.
    ztoc: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// The zTOC file.
    ztoc: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The zTOC file.
    ztoc: PathBuf,
    /// The layer blob the zTOC describes.
    layer: PathBuf,
    /// Path of the file inside the layer (e.g. usr/bin/python3).
    path: String,
    /// Write the file here instead of standard output.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub fn run(cmd: ZtocCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ZtocCommand::Build(args) => build(args),
        ZtocCommand::Info(args) => info(args),
        ZtocCommand::Ls(args) => ls(args),
        ZtocCommand::Extract(args) => extract(args),
    }
}

fn load(path: &Path) -> anyhow::Result<(Ztoc, String)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read zTOC {}", path.display()))?;
    let digest = sha256(&bytes);
    let ztoc = Ztoc::from_bytes(&bytes)
        .with_context(|| format!("{} is not a usable zTOC", path.display()))?;
    Ok((ztoc, digest))
}

fn sha256(bytes: &[u8]) -> String {
    hex_digest(&Sha256::digest(bytes))
}

fn hex_digest(hash: &[u8]) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let file = File::open(&args.layer)
        .with_context(|| format!("cannot open layer {}", args.layer.display()))?;
    let options = BuildOptions {
        span_size: args.span_size,
        build_tool_identifier: args.build_tool_identifier,
        compression: match args.compression {
            CompressionArg::Auto => None,
            CompressionArg::Gzip => Some(Compression::Gzip),
            CompressionArg::Zstd => Some(Compression::Zstd),
            CompressionArg::Uncompressed => Some(Compression::Uncompressed),
        },
        ..BuildOptions::default()
    };
    let output = args.output.unwrap_or_else(|| {
        let mut name = args.layer.clone().into_os_string();
        name.push(".ztoc");
        PathBuf::from(name)
    });
    let started = Instant::now();
    // Streamed: memory stays flat however large the layer; spill files go next to the output.
    let (built, digest) = write_atomically(&output, |out, dir| {
        hermes_ztoc::build_to(file, &options, dir, out)
            .with_context(|| format!("cannot index layer {}", args.layer.display()))
    })?;
    let elapsed = started.elapsed();
    let secs = elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "indexed {} ({}, {}): {} entries, {} spans of {} → {} ({}) in {:.2}s, {}/s",
        args.layer.display(),
        built.compression,
        human(built.compressed_archive_size),
        built.entries,
        built.span_count,
        human(args.span_size),
        output.display(),
        human(built.ztoc_size),
        secs,
        human((built.compressed_archive_size as f64 / secs) as u64),
    );
    if !built.soci_compatible {
        eprintln!(
            "note: zTOCs of zstd layers or with sparse files are a Hermes extension; soci-snapshotter cannot serve them"
        );
    }
    println!("{digest}");
    Ok(ExitCode::SUCCESS)
}

/// Hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Temp file in the same directory, written by `write` (given the directory for its own spill
/// files), fsync, rename: readers never see a partial zTOC. Returns the digest of what was
/// written with what `write` returned.
fn write_atomically<T>(
    path: &Path,
    write: impl FnOnce(&mut dyn Write, &Path) -> anyhow::Result<T>,
) -> anyhow::Result<(T, String)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let cannot = || format!("cannot write {}", path.display());
    let result = (|| -> anyhow::Result<(T, String)> {
        let mut out = Hashing {
            inner: BufWriter::new(File::create(&tmp).with_context(cannot)?),
            hash: Sha256::new(),
        };
        let value = write(&mut out, dir)?;
        let digest = hex_digest(&out.hash.finalize());
        let f = out
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(cannot)?;
        (|| -> io::Result<()> {
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            File::open(dir)?.sync_all()
        })()
        .with_context(cannot)?;
        Ok((value, digest))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let (ztoc, digest) = load(&args.ztoc)?;
    let files = ztoc
        .entries()
        .iter()
        .filter(|e| e.kind == EntryKind::Reg)
        .count();
    if args.json {
        let value = serde_json::json!({
            "digest": digest,
            "version": ztoc.version(),
            "buildToolIdentifier": ztoc.build_tool_identifier(),
            "compression": ztoc.compression().as_str(),
            "sociCompatible": ztoc.is_soci_compatible(),
            "compressedArchiveSize": ztoc.compressed_archive_size(),
            "uncompressedArchiveSize": ztoc.uncompressed_archive_size(),
            "spanSize": ztoc.span_size(),
            "spanCount": ztoc.span_count(),
            "entryCount": ztoc.entries().len(),
            "regularFiles": files,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let mut out = io::stdout().lock();
        writeln!(out, "digest:              {digest}")?;
        writeln!(out, "version:             {}", ztoc.version())?;
        writeln!(out, "build tool:          {}", ztoc.build_tool_identifier())?;
        writeln!(out, "compression:         {}", ztoc.compression())?;
        writeln!(
            out,
            "compressed size:     {} ({})",
            ztoc.compressed_archive_size(),
            human(ztoc.compressed_archive_size())
        )?;
        writeln!(
            out,
            "uncompressed size:   {} ({})",
            ztoc.uncompressed_archive_size(),
            human(ztoc.uncompressed_archive_size())
        )?;
        writeln!(
            out,
            "span size:           {} ({})",
            ztoc.span_size(),
            human(ztoc.span_size())
        )?;
        writeln!(out, "spans:               {}", ztoc.span_count())?;
        writeln!(
            out,
            "entries:             {} ({files} regular files)",
            ztoc.entries().len()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn mode_string(kind: EntryKind, mode: i64) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind.type_char());
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o40, 'r'),
        (0o20, 'w'),
        (0o10, 'x'),
        (0o4, 'r'),
        (0o2, 'w'),
        (0o1, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        s.push(match (special, set, i) {
            (true, true, 8) => 't',
            (true, false, 8) => 'T',
            (true, true, _) => 's',
            (true, false, _) => 'S',
            (false, true, _) => *c,
            (false, false, _) => '-',
        });
    }
    s
}

fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let (ztoc, _) = load(&args.ztoc)?;
    let mut out = BufWriter::new(io::stdout().lock());
    for e in ztoc.entries() {
        let owner = if e.uname.is_empty() {
            e.uid.to_string()
        } else {
            String::from_utf8_lossy(&e.uname).into_owned()
        };
        let group = if e.gname.is_empty() {
            e.gid.to_string()
        } else {
            String::from_utf8_lossy(&e.gname).into_owned()
        };
        let size = match e.kind {
            EntryKind::Char | EntryKind::Block => format!("{},{}", e.devmajor, e.devminor),
            // A sparse file's full size, as `tar tv` shows it (its entry covers the packed data).
            _ => match e.sparse() {
                Some(Ok(map)) => map.size().to_string(),
                _ => e.size.to_string(),
            },
        };
        // "2023-11-14T22:13:20.25Z" → "2023-11-14 22:13"
        let time = String::from_utf8_lossy(&e.mod_time);
        let time = time
            .get(..16)
            .map(|t| t.replacen('T', " ", 1))
            .unwrap_or_else(|| time.to_string());
        write!(
            out,
            "{} {owner}/{group} {size:>9} {time} {}",
            mode_string(e.kind, e.mode),
            e.display_name()
        )?;
        match e.kind {
            EntryKind::Symlink => write!(out, " -> {}", String::from_utf8_lossy(&e.linkname))?,
            EntryKind::Hardlink => {
                write!(out, " link to {}", String::from_utf8_lossy(&e.linkname))?
            }
            _ => {}
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn extract(args: ExtractArgs) -> anyhow::Result<ExitCode> {
    let (ztoc, _) = load(&args.ztoc)?;
    let layer = File::open(&args.layer)
        .with_context(|| format!("cannot open layer {}", args.layer.display()))?;
    let size = layer.metadata()?.len();
    if size != ztoc.compressed_archive_size() {
        bail!(
            "layer {} is {size} bytes but the zTOC describes a {}-byte layer: wrong layer?",
            args.layer.display(),
            ztoc.compressed_archive_size()
        );
    }
    let reader = CountingReader::new(&layer);
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(io::stdout().lock())),
    };
    ztoc.extract(&reader, &args.path, &mut out)
        .with_context(|| {
            format!(
                "cannot extract {:?} from {}",
                args.path,
                args.layer.display()
            )
        })?;
    out.flush()?;
    eprintln!(
        "read {} compressed bytes in {} request(s), {:.2}% of the {} layer",
        reader.bytes(),
        reader.requests(),
        100.0 * reader.bytes() as f64 / size.max(1) as f64,
        human(size)
    );
    Ok(ExitCode::SUCCESS)
}
