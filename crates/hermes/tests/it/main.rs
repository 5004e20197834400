//! The `hermes` binary end to end: real processes, real files.

/// Defines a test once and runs it on each containerd ([`hermes_testkit::Flavour`]):
/// `on_each_containerd! { fn name(flavour) { … } }` makes a module `name` with the tests
/// `containerd_1_6` and `containerd_2`, each calling the body with its flavour (so
/// `cargo test -- containerd_2` runs the 2.x half). An `async fn` body runs on a 2-thread tokio
/// runtime.
macro_rules! on_each_containerd {
    ($(#[$attr:meta])* fn $name:ident($flavour:ident) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($flavour: hermes_testkit::Flavour) $body

            #[test]
            fn containerd_1_6() {
                body(hermes_testkit::Flavour::V1_6)
            }

            #[test]
            fn containerd_2() {
                body(hermes_testkit::Flavour::V2)
            }
        }
    };
    ($(#[$attr:meta])* async fn $name:ident($flavour:ident) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($flavour: hermes_testkit::Flavour) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn containerd_1_6() {
                body(hermes_testkit::Flavour::V1_6).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn containerd_2() {
                body(hermes_testkit::Flavour::V2).await
            }
        }
    };
}

mod controller;
mod cri;
mod cri_proxy;
mod index;
mod kube;
mod kube_node;
mod layer;
mod modules;
mod node;
mod node_api;
mod pull;
mod ztoc;
