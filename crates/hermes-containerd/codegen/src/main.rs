//! Generates the containerd and CRI client code committed under `src/generated/`.
use std::path::PathBuf;

/// containerd services whose clients Hermes uses (paths under `proto/containerd/services/`).
const CONTAINERD_SERVICES: &[&str] = &[
    "containers/v1/containers.proto",
    "content/v1/content.proto",
    "diff/v1/diff.proto",
    "events/v1/events.proto",
    "images/v1/images.proto",
    "leases/v1/leases.proto",
    "namespaces/v1/namespace.proto",
    "snapshots/v1/snapshots.proto",
    "tasks/v1/tasks.proto",
    "version/v1/version.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let proto = crate_dir.join("proto");
    let out = crate_dir.join("src/generated");
    std::fs::create_dir_all(&out)?;
    let mut files: Vec<PathBuf> = CONTAINERD_SERVICES
        .iter()
        .map(|f| proto.join("containerd/services").join(f))
        .collect();
    files.push(proto.join("cri/runtime/v1/api.proto"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .build_transport(true)
        .out_dir(&out)
        .compile_protos(&files, &[proto])?;
    println!("wrote {}", out.display());
    Ok(())
}
