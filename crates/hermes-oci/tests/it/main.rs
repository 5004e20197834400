//! hermes-oci against real parts: Debian's docker-registry, skopeo, and the testkit's
//! fault-injecting proxy.

mod bad_input;
mod faults;
mod hostile;
mod mirrors;
mod registry;
mod support;
