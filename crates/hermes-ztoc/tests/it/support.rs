//! Shared helpers: test data paths and tar-walking with the `tar` crate as an independent reader.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use hermes_ztoc::{BuildOptions, Compression, Ztoc};

pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

pub fn read(name: &str) -> Vec<u8> {
    std::fs::read(data(name)).unwrap_or_else(|e| panic!("reading test data {name}: {e}"))
}

pub fn options(span_size: u64) -> BuildOptions {
    BuildOptions {
        span_size,
        ..BuildOptions::default()
    }
}

/// Decompress a layer with independent decoders (flate2, zstd) to its tar bytes.
pub fn decompress(layer: &[u8]) -> Vec<u8> {
    let mut tar = Vec::new();
    match hermes_ztoc::detect(layer) {
        Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(layer)
                .read_to_end(&mut tar)
                .expect("gunzip");
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(layer)
                .expect("zstd")
                .read_to_end(&mut tar)
                .expect("unzstd");
        }
        Compression::Uncompressed => tar.extend_from_slice(layer),
    }
    tar
}

/// Regular files in a tar as the `tar` crate reads them: path (cleaned) → contents.
/// Later entries replace earlier ones, as when unpacking.
pub fn tar_files(tar_bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut body = Vec::new();
        entry.read_to_end(&mut body).expect("tar body");
        let clean = hermes_ztoc::clean_path(path.as_bytes())
            .flatten()
            .expect("safe path");
        files.insert(String::from_utf8_lossy(&clean).into_owned(), body);
    }
    files
}

/// Extract every regular file of `tar_bytes` through `ztoc` from `layer` and compare.
/// Returns (files checked, compressed bytes read in total).
pub fn check_every_file(ztoc: &Ztoc, layer: &[u8], tar_bytes: &[u8]) -> (usize, u64) {
    let files = tar_files(tar_bytes);
    let mut read = 0;
    for (path, want) in &files {
        let mut got = Vec::new();
        read += ztoc
            .extract(layer, path, &mut got)
            .unwrap_or_else(|e| panic!("extract {path}: {e}"));
        assert!(
            got == *want,
            "{path}: extracted {} bytes differ from the tar's {} bytes",
            got.len(),
            want.len()
        );
    }
    (files.len(), read)
}

/// The zTOC [`hermes_ztoc::build_to`] streams out for `layer`, checking that its spill files
/// left nothing behind; `Err` is the build's error.
pub fn streamed(layer: &[u8], options: &BuildOptions) -> hermes_ztoc::Result<Vec<u8>> {
    let spill = tempfile::tempdir().expect("spill dir");
    let mut out = Vec::new();
    let built = hermes_ztoc::build_to(layer, options, spill.path(), &mut out);
    let left: Vec<_> = std::fs::read_dir(spill.path())
        .expect("spill dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "spill files left behind: {left:?}");
    let built = built?;
    assert_eq!(built.ztoc_size, out.len() as u64, "reported zTOC size");
    Ok(out)
}
