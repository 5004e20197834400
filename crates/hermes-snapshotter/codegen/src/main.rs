//! Generates the containerd snapshots API code committed under `src/generated/`.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let proto = crate_dir.join("proto");
    let out = crate_dir.join("src/generated");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .out_dir(&out)
        .compile_protos(
            &[proto.join("containerd/services/snapshots/v1/snapshots.proto")],
            &[proto],
        )?;
    println!("wrote {}", out.display());
    Ok(())
}
