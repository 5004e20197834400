//! Test images from generated file trees: [`TestImage`] builds layers (tar+gzip or plain tar), a
//! config with the right `diff_ids` and an OCI manifest, writes them as an OCI image layout and pushes
//! them with the real `skopeo`. It returns what it wrote, so tests can compare what they read back.
//!
//! Besides files, directories, symlinks, hard links and whiteouts it writes the odd entries that
//! real layers carry and that unpackers must agree on: a root entry (`./`, `/`), a PAX global
//! header, GNU sparse files in each format. It does not cover devices or xattrs; the format
//! crates test those with their own fixtures.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::probe::find_program;
use crate::{Error, Result};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_GZIP_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const LAYER_TAR_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Builder of a single-platform image; every call adds to the current (last) layer.
///
/// ```no_run
/// # fn main() -> hermes_testkit::Result<()> {
/// use hermes_testkit::{Registry, TestImage};
/// let registry = Registry::start()?;
/// let pushed = TestImage::new()
///     .file("etc/hello", b"hello\n".to_vec())
///     .dir("usr/bin")
///     .symlink("bin", "usr/bin")
///     .layer()
///     .whiteout("etc/hello")
///     .push(&registry.host(), "demo:v1")?;
/// assert_eq!(pushed.layers.len(), 2);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TestImage {
    layers: Vec<LayerSpec>,
    os: String,
    architecture: String,
    entrypoint: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct LayerSpec {
    entries: Vec<Entry>,
    uncompressed: bool,
}

#[derive(Debug, Clone)]
enum Entry {
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Dir {
        path: String,
    },
    Symlink {
        path: String,
        target: String,
    },
    Whiteout {
        path: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
    RootDir {
        name: String,
    },
    GlobalHeader {
        comment: String,
    },
    Sparse {
        path: String,
        size: u64,
        fragments: Vec<(u64, Vec<u8>)>,
        format: SparseFormat,
    },
}

/// How [`TestImage::sparse_file`] writes a sparse file (GNU's formats, as Go's reader knows them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseFormat {
    /// PAX format 0.0: `GNU.sparse.offset` / `GNU.sparse.numbytes` record pairs.
    Pax00,
    /// PAX format 0.1: a `GNU.sparse.map` record.
    Pax01,
    /// PAX format 1.0 (GNU tar's `--format=posix --sparse`): the map at the start of the data.
    Pax10,
    /// The old GNU type `'S'` (GNU tar's `--format=gnu --sparse`): the map in the header.
    OldGnu,
}

/// One layer as written and pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// `sha256:…` of the blob (compressed if gzip).
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// OCI media type (`…tar+gzip` or `…tar`).
    pub media_type: String,
    /// `sha256:…` of the uncompressed tar.
    pub diff_id: String,
    /// Regular files added with [`TestImage::file`] / [`TestImage::big_file`], by path.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// An image as written to a layout or pushed to a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// Where it is: `HOST/REPO:TAG` after a push, `HOST/REPO@DIGEST` for a platform of an index,
    /// `oci:DIR:TAG` for a layout.
    pub reference: String,
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// `sha256:…` of the config.
    pub config_digest: String,
    /// Platform OS.
    pub os: String,
    /// Platform architecture.
    pub architecture: String,
    /// The layers, base first.
    pub layers: Vec<LayerInfo>,
}

/// A multi-platform image (OCI image index) as pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedIndex {
    /// `HOST/REPO:TAG`.
    pub reference: String,
    /// `sha256:…` of the image index.
    pub index_digest: String,
    /// One entry per platform, in the order given.
    pub manifests: Vec<PushedImage>,
}

/// The serialized parts of one image.
struct Built {
    manifest: Vec<u8>,
    config: Vec<u8>,
    blobs: Vec<Vec<u8>>,
    info: PushedImage,
}

impl Default for TestImage {
    fn default() -> Self {
        Self::new()
    }
}

impl TestImage {
    /// An image with one empty, gzip-compressed layer, for `linux/amd64`.
    pub fn new() -> TestImage {
        TestImage {
            layers: vec![LayerSpec::default()],
            os: "linux".into(),
            architecture: "amd64".into(),
            entrypoint: Vec::new(),
        }
    }

    fn current(&mut self) -> &mut LayerSpec {
        if self.layers.is_empty() {
            self.layers.push(LayerSpec::default());
        }
        let last = self.layers.len() - 1;
        &mut self.layers[last]
    }

    fn add(mut self, entry: Entry) -> TestImage {
        self.current().entries.push(entry);
        self
    }

    /// Adds a regular file (mode 0644) with these contents.
    pub fn file(self, path: &str, data: impl Into<Vec<u8>>) -> TestImage {
        self.add(Entry::File {
            path: path.to_owned(),
            data: data.into(),
            mode: 0o644,
        })
    }

    /// Adds an executable regular file (mode 0755) with these contents.
    pub fn executable(self, path: &str, data: impl Into<Vec<u8>>) -> TestImage {
        self.add(Entry::File {
            path: path.to_owned(),
            data: data.into(),
            mode: 0o755,
        })
    }

    /// Sets the config's `Entrypoint` (what a container of the image runs).
    pub fn entrypoint(mut self, args: &[&str]) -> TestImage {
        self.entrypoint = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Adds a file of `mib` MiB of deterministic, roughly half-compressible content.
    pub fn big_file(self, path: &str, mib: u64) -> TestImage {
        let data = semi_compressible(path, mib * 1024 * 1024);
        self.file(path, data)
    }

    /// Adds a directory (mode 0755).
    pub fn dir(self, path: &str) -> TestImage {
        self.add(Entry::Dir {
            path: path.to_owned(),
        })
    }

    /// Adds a symbolic link at `path` pointing to `target` (`symlink("bin", "usr/bin")` is
    /// `bin -> usr/bin`).
    pub fn symlink(self, path: &str, target: &str) -> TestImage {
        self.add(Entry::Symlink {
            path: path.to_owned(),
            target: target.to_owned(),
        })
    }

    /// Adds an OCI whiteout for `path` (an empty file `DIR/.wh.NAME`), deleting it from lower layers.
    pub fn whiteout(self, path: &str) -> TestImage {
        self.add(Entry::Whiteout {
            path: path.to_owned(),
        })
    }

    /// Adds a hard link at `path` to the earlier entry `target`.
    pub fn hardlink(self, path: &str, target: &str) -> TestImage {
        self.add(Entry::Hardlink {
            path: path.to_owned(),
            target: target.to_owned(),
        })
    }

    /// Adds a directory entry (mode 0700) for the layer root itself, named exactly `name`
    /// (`"./"`, `"/"`), as umoci and `tar -C dir .` write it.
    pub fn root_entry(self, name: &str) -> TestImage {
        self.add(Entry::RootDir {
            name: name.to_owned(),
        })
    }

    /// Adds a PAX global header (type `'g'`, named `pax_global_header`) with a `comment` record,
    /// as `git archive` writes first.
    pub fn global_header(self, comment: &str) -> TestImage {
        self.add(Entry::GlobalHeader {
            comment: comment.to_owned(),
        })
    }

    /// Adds a sparse file of `size` bytes: data at each (offset, bytes) of `fragments` (in
    /// order, not overlapping), zeros elsewhere.
    pub fn sparse_file(
        self,
        path: &str,
        size: u64,
        fragments: &[(u64, &[u8])],
        format: SparseFormat,
    ) -> TestImage {
        self.add(Entry::Sparse {
            path: path.to_owned(),
            size,
            fragments: fragments.iter().map(|(at, d)| (*at, d.to_vec())).collect(),
            format,
        })
    }

    /// Starts a new layer; later calls add to it.
    pub fn layer(mut self) -> TestImage {
        self.layers.push(LayerSpec::default());
        self
    }

    /// Stores the current layer as a plain tar instead of tar+gzip.
    pub fn uncompressed(mut self) -> TestImage {
        self.current().uncompressed = true;
        self
    }

    /// Starts a new layer holding one file `big/data-N.bin` (N = layer index) of `mib` MiB of
    /// semi-compressible content.
    pub fn big_layer(self, mib: u64) -> TestImage {
        let image = self.layer();
        let path = format!("big/data-{}.bin", image.layers.len() - 1);
        image.big_file(&path, mib)
    }

    /// Sets the platform (`"linux"`, `"amd64"` by default).
    pub fn platform(mut self, os: &str, architecture: &str) -> TestImage {
        self.os = os.to_owned();
        self.architecture = architecture.to_owned();
        self
    }

    /// Writes the image as an OCI image layout in `dir` (created if missing), tagged `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<PushedImage> {
        let built = self.build()?;
        create_layout(dir)?;
        write_image_blobs(dir, &built)?;
        let descriptor = json!({
            "mediaType": MANIFEST_TYPE,
            "digest": built.info.manifest_digest,
            "size": built.manifest.len(),
            "annotations": { REF_NAME: tag },
        });
        write_index_json(dir, descriptor)?;
        Ok(PushedImage {
            reference: format!("oci:{}:{tag}", dir.display()),
            ..built.info
        })
    }

    /// Pushes the image anonymously to `registry_host` (`127.0.0.1:PORT`) as `reference`
    /// (`REPO:TAG`) with `skopeo copy`.
    pub fn push(&self, registry_host: &str, reference: &str) -> Result<PushedImage> {
        self.push_inner(registry_host, reference, None)
    }

    /// Pushes like [`TestImage::push`] with registry credentials.
    pub fn push_with_creds(
        &self,
        registry_host: &str,
        reference: &str,
        user: &str,
        password: &str,
    ) -> Result<PushedImage> {
        self.push_inner(registry_host, reference, Some((user, password)))
    }

    fn push_inner(
        &self,
        host: &str,
        reference: &str,
        creds: Option<(&str, &str)>,
    ) -> Result<PushedImage> {
        let (_, tag) = split_reference(reference)?;
        let dir = layout_tempdir()?;
        let layout = self.write_layout(dir.path(), tag)?;
        let digest = skopeo_copy(dir.path(), tag, host, reference, creds, false)?;
        if digest != layout.manifest_digest {
            return Err(Error::InvalidImage {
                reason: format!(
                    "skopeo rewrote the manifest ({} became {digest}); the testkit's layout is not what a registry keeps",
                    layout.manifest_digest
                ),
            });
        }
        Ok(PushedImage {
            reference: format!("{host}/{reference}"),
            ..layout
        })
    }

    /// Pushes several single-platform images as one OCI image index (`skopeo copy --all`), in the
    /// order given. Give each image a distinct [`TestImage::platform`].
    pub fn push_multi_platform(
        images: &[TestImage],
        registry_host: &str,
        reference: &str,
        creds: Option<(&str, &str)>,
    ) -> Result<PushedIndex> {
        let (repo, tag) = split_reference(reference)?;
        if images.is_empty() {
            return Err(Error::InvalidImage {
                reason: "an image index needs at least one image".into(),
            });
        }
        let dir = layout_tempdir()?;
        create_layout(dir.path())?;
        let mut manifests = Vec::new();
        let mut descriptors = Vec::new();
        for image in images {
            let built = image.build()?;
            write_image_blobs(dir.path(), &built)?;
            descriptors.push(json!({
                "mediaType": MANIFEST_TYPE,
                "digest": built.info.manifest_digest,
                "size": built.manifest.len(),
                "platform": { "os": built.info.os, "architecture": built.info.architecture },
            }));
            let reference = format!("{registry_host}/{repo}@{}", built.info.manifest_digest);
            manifests.push(PushedImage {
                reference,
                ..built.info
            });
        }
        let index = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": descriptors,
        }));
        let index_digest = write_blob(dir.path(), &index)?;
        write_index_json(
            dir.path(),
            json!({
                "mediaType": INDEX_TYPE,
                "digest": index_digest,
                "size": index.len(),
                "annotations": { REF_NAME: tag },
            }),
        )?;
        let pushed = skopeo_copy(dir.path(), tag, registry_host, reference, creds, true)?;
        if pushed != index_digest {
            return Err(Error::InvalidImage {
                reason: format!("skopeo rewrote the image index ({index_digest} became {pushed})"),
            });
        }
        Ok(PushedIndex {
            reference: format!("{registry_host}/{reference}"),
            index_digest,
            manifests,
        })
    }

    fn build(&self) -> Result<Built> {
        let mut blobs = Vec::new();
        let mut layers = Vec::new();
        for spec in &self.layers {
            let tar = layer_tar(&spec.entries)?;
            let diff_id = sha256(&tar);
            let (blob, media_type) = if spec.uncompressed {
                (tar, LAYER_TAR_TYPE)
            } else {
                (gzip(&tar)?, LAYER_GZIP_TYPE)
            };
            let files = spec
                .entries
                .iter()
                .filter_map(|entry| match entry {
                    Entry::File { path, data, .. } => Some((path.clone(), data.clone())),
                    Entry::Sparse {
                        path,
                        size,
                        fragments,
                        ..
                    } => {
                        let mut data = vec![0; *size as usize];
                        for (at, bytes) in fragments {
                            data[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
                        }
                        Some((path.clone(), data))
                    }
                    _ => None,
                })
                .collect();
            layers.push(LayerInfo {
                digest: sha256(&blob),
                size: blob.len() as u64,
                media_type: media_type.to_owned(),
                diff_id,
                files,
            });
            blobs.push(blob);
        }
        let config = to_json(&json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": self.architecture,
            "os": self.os,
            "config": if self.entrypoint.is_empty() { json!({}) } else { json!({ "Entrypoint": self.entrypoint }) },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.as_str()).collect::<Vec<_>>(),
            },
            "history": layers.iter().map(|_| json!({ "created_by": "hermes-testkit" })).collect::<Vec<_>>(),
        }));
        let config_digest = sha256(&config);
        let manifest = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": { "mediaType": CONFIG_TYPE, "digest": config_digest, "size": config.len() },
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type,
                "digest": l.digest,
                "size": l.size,
            })).collect::<Vec<_>>(),
        }));
        let info = PushedImage {
            reference: String::new(),
            manifest_digest: sha256(&manifest),
            config_digest,
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            layers,
        };
        Ok(Built {
            manifest,
            config,
            blobs,
            info,
        })
    }
}

fn split_reference(reference: &str) -> Result<(&str, &str)> {
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !repo.is_empty() && !tag.is_empty() && !tag.contains('/') => {
            Ok((repo, tag))
        }
        _ => Err(Error::BadReference {
            reference: reference.to_owned(),
        }),
    }
}

fn layout_tempdir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("hermes-testkit-image-")
        .tempdir()
        .map_err(Error::os("create a temp dir for an image layout"))
}

/// Runs `skopeo copy` from the layout to the registry and returns the pushed manifest's digest.
fn skopeo_copy(
    layout: &Path,
    tag: &str,
    host: &str,
    reference: &str,
    creds: Option<(&str, &str)>,
    all: bool,
) -> Result<String> {
    let program = find_program("skopeo", "apt-get install skopeo")?;
    let digest_file = layout.join("pushed-digest");
    let mut command = Command::new(&program);
    // No user auth file: only the credentials given here count.
    command.env("REGISTRY_AUTH_FILE", layout.join("no-auth.json"));
    // `--preserve-digests`: without it skopeo gzips plain-tar layers on the way to a registry.
    command.args([
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]);
    if all {
        command.arg("--all");
    }
    if let Some((user, password)) = creds {
        command.arg(format!("--dest-creds={user}:{password}"));
    }
    command
        .arg("--digestfile")
        .arg(&digest_file)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{host}/{reference}"));
    let output = command.output().map_err(Error::io("run", &program))?;
    if !output.status.success() {
        return Err(Error::Command {
            command: format!(
                "skopeo copy{} oci:{}:{tag} docker://{host}/{reference}",
                if all { " --all" } else { "" },
                layout.display()
            ),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let digest = std::fs::read_to_string(&digest_file).map_err(Error::io("read", &digest_file))?;
    Ok(digest.trim().to_owned())
}

fn create_layout(dir: &Path) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(Error::io("create", &blobs))?;
    let marker = dir.join("oci-layout");
    std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(Error::io("write", &marker))
}

fn write_image_blobs(dir: &Path, built: &Built) -> Result<()> {
    for blob in &built.blobs {
        write_blob(dir, blob)?;
    }
    write_blob(dir, &built.config)?;
    write_blob(dir, &built.manifest)?;
    Ok(())
}

fn write_index_json(dir: &Path, descriptor: serde_json::Value) -> Result<()> {
    let index = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [descriptor],
    }));
    let path = dir.join("index.json");
    std::fs::write(&path, index).map_err(Error::io("write", &path))
}

/// Writes a blob under `blobs/sha256/` and returns its digest.
fn write_blob(dir: &Path, data: &[u8]) -> Result<String> {
    let digest = sha256(data);
    let path = dir
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::write(&path, data).map_err(Error::io("write", &path))?;
    Ok(digest)
}

fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let tar_error = |source| Error::Os {
        action: "build a layer tar in memory",
        source,
    };
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match entry {
            Entry::File { path, data, mode } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder
                    .append_data(&mut header, path, data.as_slice())
                    .map_err(tar_error)?;
            }
            Entry::Dir { path } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .map_err(tar_error)?;
            }
            Entry::Symlink { path, target } | Entry::Hardlink { path, target } => {
                let (kind, mode) = match entry {
                    Entry::Symlink { .. } => (tar::EntryType::Symlink, 0o777),
                    _ => (tar::EntryType::Link, 0o644),
                };
                header.set_entry_type(kind);
                header.set_mode(mode);
                header.set_size(0);
                builder
                    .append_link(&mut header, path, target)
                    .map_err(tar_error)?;
            }
            Entry::Whiteout { path } => {
                let (parent, name) = match path.trim_end_matches('/').rsplit_once('/') {
                    Some((parent, name)) => (format!("{parent}/"), name),
                    None => (String::new(), path.as_str()),
                };
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(0);
                let whiteout = format!("{parent}.wh.{name}");
                builder
                    .append_data(&mut header, whiteout, std::io::empty())
                    .map_err(tar_error)?;
            }
            Entry::RootDir { name } => {
                let h = raw_header(name.as_bytes(), b'5', 0o700, 0)?;
                builder.append(&h, std::io::empty()).map_err(tar_error)?;
            }
            Entry::GlobalHeader { comment } => {
                let records = pax_record("comment", comment);
                let h = raw_header(b"pax_global_header", b'g', 0o644, records.len() as u64)?;
                builder.append(&h, records.as_slice()).map_err(tar_error)?;
            }
            Entry::Sparse {
                path,
                size,
                fragments,
                format,
            } => {
                for (h, data) in sparse_entry(path, *size, fragments, *format)? {
                    builder.append(&h, data.as_slice()).map_err(tar_error)?;
                }
            }
        }
    }
    builder.into_inner().map_err(tar_error)
}

/// A ustar header with a raw name (no checks or normalisation by the `tar` crate).
fn raw_header(name: &[u8], typeflag: u8, mode: u32, size: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    let field = &mut h.as_old_mut().name;
    if name.len() > field.len() {
        return Err(Error::InvalidImage {
            reason: format!(
                "{:?} is too long for a raw tar name",
                String::from_utf8_lossy(name)
            ),
        });
    }
    field[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::new(typeflag));
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    Ok(h)
}

/// One PAX record, `"LEN key=value\n"`, where LEN counts its own digits.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len != body.len() + len.to_string().len() {
        len = body.len() + len.to_string().len();
    }
    format!("{len}{body}").into_bytes()
}

/// The headers and data blocks of a sparse file in `format`.
fn sparse_entry(
    path: &str,
    size: u64,
    fragments: &[(u64, Vec<u8>)],
    format: SparseFormat,
) -> Result<Vec<(tar::Header, Vec<u8>)>> {
    let packed: Vec<u8> = fragments
        .iter()
        .flat_map(|(_, d)| d.iter().copied())
        .collect();
    let count = fragments.len().to_string();
    let mut records = Vec::new();
    let (name, data) = match format {
        SparseFormat::OldGnu => {
            if fragments.len() > 4 {
                return Err(Error::InvalidImage {
                    reason: "the old GNU sparse writer here holds at most 4 fragments".into(),
                });
            }
            if path.len() > 100 {
                return Err(Error::InvalidImage {
                    reason: format!("{path:?} is too long for an old GNU sparse header"),
                });
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::GNUSparse);
            h.set_mode(0o644);
            h.set_size(packed.len() as u64);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            let octal = |field: &mut [u8; 12], n: u64| {
                field.copy_from_slice(format!("{n:011o}\0").as_bytes());
            };
            if let Some(gnu) = h.as_gnu_mut() {
                gnu.name[..path.len()].copy_from_slice(path.as_bytes());
                for (slot, (at, bytes)) in gnu.sparse.iter_mut().zip(fragments) {
                    octal(&mut slot.offset, *at);
                    octal(&mut slot.numbytes, bytes.len() as u64);
                }
                octal(&mut gnu.realsize, size);
            }
            h.set_cksum();
            return Ok(vec![(h, packed)]);
        }
        SparseFormat::Pax00 => {
            records.extend(pax_record("GNU.sparse.size", &size.to_string()));
            records.extend(pax_record("GNU.sparse.numblocks", &count));
            for (at, bytes) in fragments {
                records.extend(pax_record("GNU.sparse.offset", &at.to_string()));
                records.extend(pax_record("GNU.sparse.numbytes", &bytes.len().to_string()));
            }
            (path.to_owned(), packed)
        }
        SparseFormat::Pax01 => {
            let map: Vec<String> = fragments
                .iter()
                .flat_map(|(at, d)| [at.to_string(), d.len().to_string()])
                .collect();
            records.extend(pax_record("GNU.sparse.major", "0"));
            records.extend(pax_record("GNU.sparse.minor", "1"));
            records.extend(pax_record("GNU.sparse.name", path));
            records.extend(pax_record("GNU.sparse.size", &size.to_string()));
            records.extend(pax_record("GNU.sparse.numblocks", &count));
            records.extend(pax_record("GNU.sparse.map", &map.join(",")));
            (format!("GNUSparseFile.0/{path}"), packed)
        }
        SparseFormat::Pax10 => {
            records.extend(pax_record("GNU.sparse.major", "1"));
            records.extend(pax_record("GNU.sparse.minor", "0"));
            records.extend(pax_record("GNU.sparse.name", path));
            records.extend(pax_record("GNU.sparse.realsize", &size.to_string()));
            let mut data = format!("{count}\n").into_bytes();
            for (at, bytes) in fragments {
                data.extend(format!("{at}\n{}\n", bytes.len()).into_bytes());
            }
            data.resize(data.len().next_multiple_of(512), 0);
            data.extend_from_slice(&packed);
            (format!("GNUSparseFile.0/{path}"), data)
        }
    };
    let pax = raw_header(b"PaxHeaders/sparse", b'x', 0o644, records.len() as u64)?;
    let file = raw_header(name.as_bytes(), b'0', 0o644, data.len() as u64)?;
    Ok(vec![(pax, records), (file, data)])
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let gzip_error = |source| Error::Os {
        action: "gzip a layer in memory",
        source,
    };
    encoder.write_all(data).map_err(gzip_error)?;
    encoder.finish().map_err(gzip_error)
}

/// Deterministic bytes (seeded by `seed`) in 4 KiB blocks: half pseudo-random, half repeated text,
/// so gzip shrinks them to about half — like real binaries, unlike zeros or noise.
fn semi_compressible(seed: &str, len: u64) -> Vec<u8> {
    let mut state = seed.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut out = Vec::with_capacity(len as usize);
    let mut block = 0u64;
    while (out.len() as u64) < len {
        for _ in 0..256 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
        let text = format!("hermes-testkit block {block:010} of {seed}\n");
        while out.len() % 4096 != 0 {
            let take = (4096 - out.len() % 4096).min(text.len());
            out.extend_from_slice(&text.as_bytes()[..take]);
        }
        block += 1;
    }
    out.truncate(len as usize);
    out
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

fn to_json(value: &serde_json::Value) -> Vec<u8> {
    // Serializing a `Value` to memory cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semi_compressible_content_is_deterministic_and_compresses_to_about_half() {
        let data = semi_compressible("x", 1 << 20);
        assert_eq!(data.len(), 1 << 20);
        assert_eq!(data, semi_compressible("x", 1 << 20));
        let ratio = gzip(&data).unwrap().len() as f64 / data.len() as f64;
        assert!((0.3..0.8).contains(&ratio), "gzip ratio {ratio}");
    }

    #[test]
    fn references_need_a_repository_and_a_tag() {
        assert_eq!(split_reference("a/b:v1").unwrap(), ("a/b", "v1"));
        assert!(split_reference("a/b").is_err());
        assert!(split_reference(":v1").is_err());
    }
}
