//! Generates the containerd and CRI code committed under `src/generated/`: message types and
//! clients for every service below, and a server only for the services Hermes serves.
use std::path::PathBuf;

use prost_build::{Service, ServiceGenerator};

/// containerd services Hermes calls (paths under `proto/containerd/services/`).
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

/// Services Hermes also serves (`package.Service`): the snapshotter is containerd's proxy plugin.
/// Only these get server code; servers for the rest would only cost build time.
const SERVED: &[&str] = &["containerd.services.snapshots.v1.Snapshots"];

/// Hands each service to tonic's generator with or without a server, as [`SERVED`] says.
struct ServersFor {
    with_server: Box<dyn ServiceGenerator>,
    client_only: Box<dyn ServiceGenerator>,
}

impl ServiceGenerator for ServersFor {
    fn generate(&mut self, service: Service, buf: &mut String) {
        let name = format!("{}.{}", service.package, service.proto_name);
        if SERVED.contains(&name.as_str()) {
            self.with_server.generate(service, buf);
        } else {
            self.client_only.generate(service, buf);
        }
    }
}

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

    let tonic = |server: bool| {
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(server)
            .build_transport(true)
            .service_generator()
    };
    let mut config = prost_build::Config::new();
    config.service_generator(Box::new(ServersFor {
        with_server: tonic(true),
        client_only: tonic(false),
    }));
    // With neither clients nor servers asked for here, tonic keeps the generator set above and
    // only adds its message settings.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&out)
        .compile_with_config(config, &files, &[proto])?;
    println!("wrote {}", out.display());
    Ok(())
}
