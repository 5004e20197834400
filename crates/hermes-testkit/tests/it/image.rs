//! TestImage: the OCI layout it writes is self-consistent, and what it pushes reads back
//! byte-identical.

use std::collections::BTreeMap;
use std::io::Read;

use hermes_testkit::{Registry, TestImage};

use crate::support::{OCI_MANIFEST, get, request, sha256, skopeo_inspect_raw};

fn sample() -> TestImage {
    TestImage::new()
        .file("etc/hello", "hello\n")
        .dir("usr/bin")
        .file("usr/bin/tool", vec![7u8; 10_000])
        .symlink("bin", "usr/bin")
        .layer()
        .uncompressed()
        .whiteout("etc/hello")
        .file("etc/new", "new\n")
        .platform("linux", "arm64")
}

/// (path, entry type, link target, contents) of every tar entry.
fn tar_entries(tar: &[u8]) -> Vec<(String, tar::EntryType, Option<String>, Vec<u8>)> {
    let mut archive = tar::Archive::new(tar);
    archive
        .entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let kind = entry.header().entry_type();
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            (path, kind, link, data)
        })
        .collect()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn read_json(path: std::path::PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn layout_has_a_manifest_a_config_with_diff_ids_and_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let image = sample().write_layout(dir.path(), "t1").unwrap();
    assert_eq!(image.reference, format!("oci:{}:t1", dir.path().display()));
    assert_eq!(
        (image.os.as_str(), image.architecture.as_str()),
        ("linux", "arm64")
    );
    let blob = |digest: &str| {
        dir.path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };

    assert_eq!(
        read_json(dir.path().join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let index = read_json(dir.path().join("index.json"));
    assert_eq!(
        index["manifests"][0]["digest"],
        image.manifest_digest.as_str()
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "t1"
    );

    let manifest_bytes = std::fs::read(blob(&image.manifest_digest)).unwrap();
    assert_eq!(sha256(&manifest_bytes), image.manifest_digest);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    assert_eq!(manifest["config"]["digest"], image.config_digest.as_str());
    let config = read_json(blob(&image.config_digest));
    assert_eq!(config["architecture"], "arm64");

    assert_eq!(image.layers.len(), 2);
    let mut tars = Vec::new();
    for (i, layer) in image.layers.iter().enumerate() {
        let data = std::fs::read(blob(&layer.digest)).unwrap();
        assert_eq!(sha256(&data), layer.digest);
        assert_eq!(data.len() as u64, layer.size);
        assert_eq!(manifest["layers"][i]["digest"], layer.digest.as_str());
        assert_eq!(
            manifest["layers"][i]["mediaType"],
            layer.media_type.as_str()
        );
        let tar = if layer.media_type.ends_with("+gzip") {
            gunzip(&data)
        } else {
            data
        };
        assert_eq!(
            sha256(&tar),
            layer.diff_id,
            "diff_id is the sha256 of the uncompressed tar"
        );
        assert_eq!(config["rootfs"]["diff_ids"][i], layer.diff_id.as_str());
        tars.push(tar);
    }
    assert_eq!(
        image.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        image.layers[1].media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );

    let base = tar_entries(&tars[0]);
    let names: Vec<(&str, tar::EntryType)> =
        base.iter().map(|(p, k, _, _)| (p.as_str(), *k)).collect();
    assert_eq!(
        names,
        [
            ("etc/hello", tar::EntryType::Regular),
            ("usr/bin", tar::EntryType::Directory),
            ("usr/bin/tool", tar::EntryType::Regular),
            ("bin", tar::EntryType::Symlink),
        ]
    );
    assert_eq!(base[3].2.as_deref(), Some("usr/bin"));
    let files: BTreeMap<String, Vec<u8>> = base
        .into_iter()
        .filter(|(_, k, _, _)| *k == tar::EntryType::Regular)
        .map(|(p, _, _, d)| (p, d))
        .collect();
    assert_eq!(files, image.layers[0].files);

    let upper: Vec<String> = tar_entries(&tars[1]).into_iter().map(|(p, ..)| p).collect();
    assert_eq!(upper, ["etc/.wh.hello", "etc/new"]);
}

#[test]
fn big_layers_are_generated_and_semi_compressible() {
    let dir = tempfile::tempdir().unwrap();
    let image = TestImage::new()
        .file("small", "x")
        .big_layer(4)
        .write_layout(dir.path(), "big")
        .unwrap();
    let big = &image.layers[1];
    assert_eq!(big.files["big/data-1.bin"].len(), 4 << 20);
    assert!(
        big.size > 1 << 20 && big.size < 3 << 20,
        "gzip of 4 MiB semi-compressible data is {} bytes",
        big.size
    );
}

#[test]
fn pushed_image_reads_back_byte_identical() {
    let registry = Registry::start().unwrap();
    let pushed = sample().push(&registry.host(), "sample:v1").unwrap();
    let manifest = request(
        registry.addr(),
        "GET",
        "/v2/sample/manifests/v1",
        &[("Accept", OCI_MANIFEST)],
    )
    .unwrap();
    assert_eq!(manifest.status, 200);
    assert_eq!(sha256(&manifest.body), pushed.manifest_digest);
    assert_eq!(
        manifest.header("docker-content-digest"),
        Some(pushed.manifest_digest.as_str())
    );
    for layer in &pushed.layers {
        let blob = get(
            registry.addr(),
            &format!("/v2/sample/blobs/{}", layer.digest),
        );
        assert_eq!(sha256(&blob.body), layer.digest);
    }
    let config = get(
        registry.addr(),
        &format!("/v2/sample/blobs/{}", pushed.config_digest),
    );
    assert_eq!(sha256(&config.body), pushed.config_digest);
}

#[test]
fn multi_platform_push_creates_an_image_index() {
    let registry = Registry::start().unwrap();
    let amd64 = TestImage::new()
        .file("arch", "amd64")
        .platform("linux", "amd64");
    let arm64 = TestImage::new()
        .file("arch", "arm64")
        .platform("linux", "arm64");
    let pushed =
        TestImage::push_multi_platform(&[amd64, arm64], &registry.host(), "multi:v1", None)
            .unwrap();
    assert_eq!(pushed.reference, format!("{}/multi:v1", registry.host()));

    let raw = skopeo_inspect_raw(&pushed.reference, None);
    assert_eq!(sha256(&raw), pushed.index_digest);
    let index: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let platforms: Vec<(&str, &str)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(platforms, [("linux", "amd64"), ("linux", "arm64")]);

    for image in &pushed.manifests {
        let raw = skopeo_inspect_raw(&image.reference, None);
        assert_eq!(sha256(&raw), image.manifest_digest);
        let layer = get(
            registry.addr(),
            &format!("/v2/multi/blobs/{}", image.layers[0].digest),
        );
        assert_eq!(sha256(&layer.body), image.layers[0].digest);
        assert_eq!(image.layers[0].files["arch"], image.architecture.as_bytes());
    }
}
