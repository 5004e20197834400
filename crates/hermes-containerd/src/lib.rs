//! A thin client for containerd's gRPC API (v1.6) and the Kubernetes CRI v1 API, over a unix socket.
//!
//! - [`api`] is the code generated from containerd's and Kubernetes' `.proto` files (vendored under
//!   `proto/`, generated code committed under `src/generated/`; see the crate README).
//! - [`connect_unix`] opens a gRPC channel to a unix socket; [`Containerd`] wraps it with the
//!   namespace (and optionally lease) metadata containerd expects on every call and hands out
//!   typed service clients.
//! - A small typed layer on top keeps gRPC types out of callers where that reads better:
//!   [`Containerd::list_running_containers`] (what the controller's standalone mode watches), and
//!   [`Cri`], a kubelet's container start through the CRI.
//!
//! It deliberately holds no Hermes policy: deciding what to pull, index or mount lives elsewhere.
#![warn(missing_docs)]

mod client;
mod cri;
mod error;
mod ops;
mod platform;
mod pull;

/// Code generated from containerd's vendored v1.6 API protos and the CRI v1 `api.proto` (clients
/// only). Package paths mirror the protobuf packages.
#[rustfmt::skip]
#[allow(missing_docs, clippy::all, rust_2018_idioms, missing_debug_implementations)]
pub mod api {
    /// Package `containerd`.
    pub mod containerd {
        /// `containerd.types`: descriptors, mounts, platforms, metrics.
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
                /// `containerd.services.snapshots.v1`.
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
    /// Package `runtime`: the Kubernetes Container Runtime Interface.
    pub mod runtime {
        /// `runtime.v1`: `RuntimeService` and `ImageService`, as a kubelet calls them.
        pub mod v1 {
            include!("generated/runtime.v1.rs");
        }
    }
}

pub use client::{
    Containerd, LEASE_HEADER, Metadata, NAMESPACE_HEADER, RunningContainer, Service, Version,
    connect_unix,
};
pub use cri::{ContainerState, ContainerStatus, Cri, Pod, log_lines};
pub use error::{Error, Result};
pub use hermes_oci::manifest::Platform;
pub use ops::{BlobRef, Chunks, Written};
pub use platform::manifest_for_platform;
pub use pull::{
    LABEL_CRI_IMAGE_LAYERS, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF, LABEL_UNCOMPRESSED, LayerOutcome, LayerReport, PullOptions, PullReport,
    chain_ids, diff_ids, manifest_gc_labels, pull, snapshot_labels,
};
