//! containerd's v1.6 gRPC API and the Kubernetes CRI v1 API, as Rust code generated once for
//! every Hermes crate that speaks them: `hermes-containerd` calls containerd through the clients,
//! `hermes-snapshotter` serves the snapshots API to containerd through its server.
//!
//! The `.proto` files are vendored under `proto/` and the generated code is committed under
//! `src/generated/`, so builds need no `protoc`; `codegen/` regenerates it (see the README).
//! Every service has a client (with tonic's transport); only the services Hermes serves
//! (`containerd.services.snapshots.v1.Snapshots`) have a server. Module paths mirror the
//! protobuf packages.
//!
//! Nothing here but generated code: typed calls, errors and policy live in the crates above.
#![warn(missing_docs)]

/// Package `containerd`: containerd's own API.
#[rustfmt::skip]
#[allow(missing_docs, clippy::all, rust_2018_idioms, missing_debug_implementations)]
pub mod containerd {
    /// `containerd.types`: descriptors, mounts, metrics.
    pub mod types {
        include!("generated/containerd.types.rs");
    }
    /// `containerd.v1`.
    pub mod v1 {
        /// `containerd.v1.types`: task process status.
        pub mod types {
            include!("generated/containerd.v1.types.rs");
        }
    }
    /// `containerd.services`.
    pub mod services {
        /// `containerd.services.containers`.
        pub mod containers {
            /// `containerd.services.containers.v1`.
            pub mod v1 {
                include!("generated/containerd.services.containers.v1.rs");
            }
        }
        /// `containerd.services.content`.
        pub mod content {
            /// `containerd.services.content.v1`.
            pub mod v1 {
                include!("generated/containerd.services.content.v1.rs");
            }
        }
        /// `containerd.services.diff`.
        pub mod diff {
            /// `containerd.services.diff.v1`.
            pub mod v1 {
                include!("generated/containerd.services.diff.v1.rs");
            }
        }
        /// `containerd.services.events`.
        pub mod events {
            /// `containerd.services.events.v1`.
            pub mod v1 {
                include!("generated/containerd.services.events.v1.rs");
            }
        }
        /// `containerd.services.images`.
        pub mod images {
            /// `containerd.services.images.v1`.
            pub mod v1 {
                include!("generated/containerd.services.images.v1.rs");
            }
        }
        /// `containerd.services.leases`.
        pub mod leases {
            /// `containerd.services.leases.v1`.
            pub mod v1 {
                include!("generated/containerd.services.leases.v1.rs");
            }
        }
        /// `containerd.services.namespaces`.
        pub mod namespaces {
            /// `containerd.services.namespaces.v1`.
            pub mod v1 {
                include!("generated/containerd.services.namespaces.v1.rs");
            }
        }
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: client and server (`snapshots_server`).
            pub mod v1 {
                include!("generated/containerd.services.snapshots.v1.rs");
            }
        }
        /// `containerd.services.tasks`.
        pub mod tasks {
            /// `containerd.services.tasks.v1`.
            pub mod v1 {
                include!("generated/containerd.services.tasks.v1.rs");
            }
        }
        /// `containerd.services.version`.
        pub mod version {
            /// `containerd.services.version.v1`.
            pub mod v1 {
                include!("generated/containerd.services.version.v1.rs");
            }
        }
    }
}

/// Package `runtime`: the Kubernetes Container Runtime Interface, which containerd serves on
/// its own socket.
#[rustfmt::skip]
#[allow(missing_docs, clippy::all, rust_2018_idioms, missing_debug_implementations)]
pub mod runtime {
    /// `runtime.v1`: `RuntimeService` and `ImageService`, as a kubelet calls them.
    pub mod v1 {
        include!("generated/runtime.v1.rs");
    }
}
