//! Writes the hand-made seeds of every fuzz target to `fuzz/corpus/TARGET/seed-*` (the fuzzer's
//! own finds, minimised, sit beside them): `cargo run -p hermes-fuzz --example seeds`.
//!
//! Seeds are small on purpose: the fuzzer mutates them millions of times, and the corpus is
//! committed. A gzip zTOC carries a 32 KiB window per checkpoint, so there is one, with one span.

use std::io::Write;
use std::path::Path;

use hermes_ztoc::{BuildOptions, Compression};

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)
    };

    let layers = [("small", small_tar()), ("links", links_tar())];
    for (name, tar) in &layers {
        // The small layer only as plain tar: its encoded forms add no coverage to the links
        // layer's (and gzip zTOCs weigh 33 KiB each: one is enough).
        let modes: &[(u8, &str)] = if *name == "small" {
            &[(1, "plain")]
        } else {
            &[(1, "plain"), (2, "gzip"), (3, "members"), (4, "zstd")]
        };
        for &(mode, mode_name) in modes {
            // Chunks and spans of 512 B: several spans even in a small layer.
            write(
                "tar",
                &format!("{name}-{mode_name}"),
                &[&[mode, 0][..], tar].concat(),
            )?;
        }
        for (encoding, compression, span) in [
            ("plain", Compression::Uncompressed, 1024),
            ("zstd", Compression::Zstd, 512),
            ("gzip", Compression::Gzip, 1 << 20),
        ] {
            if *name == "small" && compression == Compression::Gzip {
                continue;
            }
            let blob = match compression {
                Compression::Gzip => gzip(tar),
                Compression::Zstd => zstd_frames(tar, 512),
                Compression::Uncompressed => tar.clone(),
            };
            let options = BuildOptions {
                span_size: span,
                compression: Some(compression),
                ..BuildOptions::default()
            };
            let ztoc = hermes_ztoc::build(blob.as_slice(), &options)
                .expect("build a seed zTOC")
                .to_bytes();
            let len = u32::try_from(ztoc.len()).expect("small zTOC");
            write(
                "ztoc",
                &format!("{name}-{encoding}"),
                &[&len.to_le_bytes()[..], &ztoc, &blob].concat(),
            )?;
        }
    }
    write(
        "tar",
        "raw-gzip",
        &[&[0u8, 0][..], &gzip(&small_tar())].concat(),
    )?;

    let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest('a'), "size": 7023 },
        "layers": [
            { "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest('b'), "size": 32654 },
            { "mediaType": "application/vnd.docker.image.rootfs.diff.tar", "digest": digest('c'), "size": 16724,
              "annotations": { "com.amazon.soci.image-layer-digest": digest('d') } }
        ],
        "annotations": { "com.amazon.soci.index-digest": digest('e') }
    });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest('f'), "size": 7143,
              "platform": { "architecture": "arm64", "os": "linux", "variant": "v8", "os.features": ["x"] } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest('0'), "size": 7682,
              "artifactType": "application/vnd.amazon.soci.index.v2+json",
              "subject": { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest('1'), "size": 1 } }
        ]
    });
    write(
        "oci",
        "manifest.json",
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    write("oci", "index.json", &serde_json::to_vec_pretty(&index)?)?;
    write(
        "oci",
        "reference",
        format!("localhost:5000/ml/serve:v1.2@{}", digest('9')).as_bytes(),
    )?;
    write(
        "oci",
        "challenge",
        br#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
    )?;
    write("oci", "platform", b"linux/arm64/v8")?;

    let node_toml = std::fs::read(root.join("../../deploy/containerd/node.toml"))?;
    write("node_config", "node.toml", &node_toml)?;
    write(
        "node_config",
        "node.yaml",
        b"root: /var/lib/hermes/node\ncache_size: 512MiB\nmetrics: \"127.0.0.1:9465\"\ncontroller:\n  url: https://c:8443\n  timeout_ms: 500\n",
    )?;

    write(
        "directive",
        "script",
        b"# chosen by the loader\nmodule=mem-profiler,config=prod-tunings\n\n module = mem-tracer , config=staging-tunings, window=20\nmodule=mem-logger\n",
    )?;
    write("directive", "env", b"mem-profiler:prod-tunings,mem-logger")?;

    let review = |namespace: &str, pod: serde_json::Value| {
        serde_json::to_vec_pretty(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "namespace": namespace,
                "operation": "CREATE",
                "object": pod
            }
        }))
    };
    write(
        "admission",
        "ml-pod.json",
        &review(
            "ml",
            serde_json::json!({
                "metadata": { "name": "t", "labels": { "app": "trainer", "tier": "gpu", "team": "a" },
                              "annotations": { "x": "y" } },
                "spec": { "containers": [{ "name": "app", "image": "app:1" }],
                          "initContainers": [{ "name": "setup", "image": "busybox" }],
                          "volumes": [], "shareProcessNamespace": false }
            }),
        )?,
    )?;
    write(
        "admission",
        "batch-pod.json",
        &review(
            "batch",
            serde_json::json!({
                "metadata": { "generateName": "job-" },
                "spec": { "containers": [{ "name": "job", "image": "job:1" }] }
            }),
        )?,
    )?;
    write(
        "admission",
        "profiled-pod.json",
        &review(
            "any",
            serde_json::json!({
                "metadata": { "labels": { "hermes.dev/profile": "on" } },
                "spec": { "containers": [] }
            }),
        )?,
    )?;
    Ok(())
}

fn small_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "etc/", &[][..]).expect("tar");
    for (name, body) in [
        ("etc/hostname", &b"hermes\n"[..]),
        ("etc/big", &[b'x'; 1500][..]),
        ("empty", &[][..]),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, name, body).expect("tar");
    }
    b.into_inner().expect("tar")
}

/// Symlink, hardlink, a PAX xattr, a GNU long name and a whiteout.
fn links_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(5);
    b.append_data(&mut h, format!("d/{}", "n".repeat(120)), &b"long\n"[..])
        .expect("tar");
    b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])
        .expect("tar");
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(3);
    b.append_data(&mut h, "f", &b"abc"[..]).expect("tar");
    for (kind, name, target) in [
        (tar::EntryType::Symlink, "s", "f"),
        (tar::EntryType::Link, "h", "f"),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(0);
        b.append_link(&mut h, name, target).expect("tar");
    }
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    b.append_data(&mut h, "d/.wh.gone", &[][..]).expect("tar");
    b.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

fn zstd_frames(data: &[u8], chunk: usize) -> Vec<u8> {
    data.chunks(chunk)
        .flat_map(|c| zstd::bulk::compress(c, 1).expect("zstd"))
        .collect()
}
