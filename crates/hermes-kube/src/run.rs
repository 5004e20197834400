//! The Kubernetes mode put together, as the binary starts it: the artifact store, the node API
//! every replica serves, and the leader-elected [`controller`](crate::controller) loop.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hermes_controller::api::NodeApi;
use hermes_controller::engine::EngineOptions;
use hermes_controller::mirror::Mirror;
use hermes_controller::policy::DEFAULT_SPAN_SIZE;
use hermes_controller::server::NodeApiServer;
use hermes_oci::{ClientOptions, Store};
use tokio::sync::Notify;

use crate::controller::{self, ControllerOptions, EngineSetup};
use crate::{Error, Result};

/// What the Kubernetes mode needs.
#[derive(Debug)]
pub struct Config {
    /// This replica's identity in the Lease (the pod name); `None`: `$HOSTNAME`, else the
    /// kernel's host name (a pod's host name is its name).
    pub identity: Option<String>,
    /// Lease, resync and field manager settings; its `identity` is replaced by the one above.
    pub controller: ControllerOptions,
    /// Engine timing and limits.
    pub engine: EngineOptions,
    /// The artifact store directory (image reports under `reports/`).
    pub data: PathBuf,
    /// The node API's socket, token and TLS.
    pub server: NodeApiServer,
    /// Registry client settings.
    pub client: ClientOptions,
    /// The store repository the leader publishes to and every replica copies from.
    pub mirror: Option<Mirror>,
    /// How often a replica that is not leading copies the store repository.
    pub sync_every: Duration,
}

/// Run the Kubernetes mode until `shutdown` completes: serve the node API from the store,
/// take part in the leader election, lead while elected.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let identity = lease_identity(config.identity, std::env::var("HOSTNAME").ok(), host_name())?;
    let store = Store::open(&config.data).map_err(|source| {
        Error::Engine(Box::new(hermes_controller::Error::Oci {
            action: "open the artifact store",
            subject: config.data.display().to_string(),
            source: Box::new(source),
        }))
    })?;
    let client = kube::Client::try_default()
        .await
        .map_err(Error::kube("configure a client (in-cluster or KUBECONFIG)"))?;

    let (misses_tx, mut misses) = tokio::sync::mpsc::channel(256);
    let api = NodeApi::new(
        store.clone(),
        config.server.token().map(str::to_owned),
        vec![DEFAULT_SPAN_SIZE],
        misses_tx,
    );
    // Only the leader takes pull reports (see `controller`); until a term starts, another
    // replica does.
    api.set_pull_reports(hermes_controller::api::PullSink::Elsewhere);
    let stop_api = Arc::new(Notify::new());
    let server = tokio::spawn({
        let stop = stop_api.clone();
        config
            .server
            .serve(api.clone(), async move { stop.notified().await })
    });
    // In a cluster the pod watch sees every running image; misses are only logged.
    tokio::spawn(async move {
        while let Some(miss) = misses.recv().await {
            tracing::debug!(?miss, "node reported a miss");
        }
    });
    api.set_ready(true);

    let setup = EngineSetup {
        options: config.engine,
        store,
        reports: Some(config.data.join("reports")),
        client: config.client,
        api,
        mirror: config.mirror,
        sync_every: config.sync_every,
    };
    let options = ControllerOptions {
        identity,
        ..config.controller
    };
    let result = controller::run(client, &setup, options, shutdown).await;
    stop_api.notify_one();
    let _ = server.await;
    result
}

/// The first non-empty of the identity given, `$HOSTNAME` and the kernel's host name: never a
/// made-up constant, which two replicas would share and both lead with.
fn lease_identity(
    given: Option<String>,
    hostname_env: Option<String>,
    host_name: Option<String>,
) -> Result<String> {
    [given, hostname_env, host_name]
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .ok_or(Error::NoIdentity)
}

/// The kernel's host name (`uname -n`), if it has one.
fn host_name() -> Option<String> {
    let uname = rustix::system::uname();
    uname.nodename().to_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn the_lease_identity_is_the_pod_name_then_hostname_then_the_host_name() {
        let id = |a, b, c| lease_identity(a, b, c).ok();
        assert_eq!(id(some("pod-0"), some("h"), some("u")), some("pod-0"));
        assert_eq!(id(None, some("h"), some("u")), some("h"));
        assert_eq!(
            id(some(" "), some(""), some("u")),
            some("u"),
            "empty ones skipped"
        );
    }

    #[test]
    fn no_identity_is_an_error_not_a_shared_constant() {
        assert!(matches!(
            lease_identity(None, some(""), None),
            Err(Error::NoIdentity)
        ));
    }
}
