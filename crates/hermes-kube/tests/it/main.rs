//! Integration tests of the Kubernetes adapter against a real kube-apiserver v1.20 (built from
//! Debian's source package by `scripts/kube-apiserver.sh`) and a real docker-registry.

mod apiserver;
mod cluster;
mod controller;
mod crds;
mod leader;
mod manifests;
mod webhook;
