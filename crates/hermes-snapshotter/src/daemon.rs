//! `hermes node`: the snapshotter on its socket with lazy layers from the index sources,
//! restart recovery before the socket opens, and the metrics endpoint.
//!
//! Stopping the daemon (or killing it) leaves the lazy layers mounted: their servers are
//! separate processes, so running containers keep their files, and the next start adopts them.
//! [`NodeLayers::stop_all`] takes everything down explicitly.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use hermes_oci::{Client, Store};
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::NodeConfig;
use crate::cri_proxy::{ImageProxy, OnCredentials, PullLog, serve_cri_proxy};
use crate::node_layers::{NodeLayers, NodeLayersOptions, Recovery, ServerCommand};
use crate::sources::IndexSources;
use crate::{Error, Result, ServerHandle, Snapshots, serve};

/// A running node daemon.
#[derive(Debug)]
pub struct Daemon {
    snapshots: Arc<Snapshots>,
    layers: Arc<NodeLayers>,
    grpc: ServerHandle,
    cri_proxy: Option<ServerHandle>,
    pulls: PullLog,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    traces: JoinHandle<()>,
    recovery: Recovery,
}

impl Daemon {
    /// Opens the state under `config.root`, recovers lazy layers, and starts serving.
    /// `server` starts layer servers; `client` reads registries.
    pub async fn start(config: &NodeConfig, server: ServerCommand, client: Client) -> Result<Self> {
        let root = &config.root;
        crate::private::private_dir(root).map_err(Error::io("create root", root))?;
        let store = Store::open(root.join("ztocs"))?;
        let pulls = PullLog::default();
        let mut sources = IndexSources::new(
            store,
            config.controller.as_ref(),
            config.soci_from_registry.then(|| client.clone()),
            tokio::runtime::Handle::current(),
        )?;
        if let Some(name) = &config.node_name {
            sources = sources.with_node_name(name);
        }
        let layers = Arc::new(NodeLayers::new(
            sources,
            NodeLayersOptions {
                dir: root.join("layers"),
                server,
                background: config.background_fetch,
                mount_timeout: config.mount_timeout(),
                eager_timeout: config.eager_timeout(),
                cache_size: config.cache_size,
                trace_window: (config.controller.is_some() && config.trace_window_secs > 0)
                    .then(|| std::time::Duration::from_secs(config.trace_window_secs)),
                replay: config.controller.is_some() && config.trace_window_secs > 0,
                pull_credentials: client.options().pull_credentials.clone(),
                pull_log: pulls.clone(),
            },
        ));
        let snapshots = {
            let root = root.clone();
            let remote = layers.clone();
            tokio::task::spawn_blocking(move || Snapshots::open(root, remote))
                .await
                .map_err(Error::Task)??
        };
        let snapshots = Arc::new(snapshots);
        let recovery = {
            let (layers, snapshots) = (layers.clone(), snapshots.clone());
            tokio::task::spawn_blocking(move || layers.recover(&snapshots))
                .await
                .map_err(Error::Task)??
        };
        let grpc = serve(&config.socket, snapshots.clone()).await?;
        let cri_proxy = match &config.cri_proxy {
            Some(socket) => {
                let feeds = layers.clone();
                let proxy = ImageProxy::new(
                    &config.containerd,
                    client.options().pull_credentials.clone(),
                    pulls.clone(),
                )
                .on_credentials(OnCredentials(Arc::new(move || feeds.refresh_credentials())));
                Some(serve_cri_proxy(socket, proxy).await?)
            }
            None => None,
        };
        let metrics = match config.metrics {
            Some(addr) => Some(serve_metrics(addr, snapshots.clone(), layers.clone()).await?),
            None => None,
        };
        let traces = {
            let layers = layers.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    let layers = layers.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        layers.report_traces();
                        layers.report_pulls();
                    })
                    .await;
                }
            })
        };
        info!(root = %root.display(), socket = %config.socket.display(),
            controller = config.controller.as_ref().map(|c| c.url.as_str()).unwrap_or("none"),
            soci_from_registry = config.soci_from_registry, "node daemon ready");
        Ok(Self {
            snapshots,
            layers,
            grpc,
            cri_proxy,
            pulls,
            metrics,
            traces,
            recovery,
        })
    }

    /// The pulls the CRI proxy saw (empty without one).
    pub fn pulls(&self) -> &PullLog {
        &self.pulls
    }

    /// What restart recovery did.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Where metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(a, _)| *a)
    }

    /// The snapshot core.
    pub fn snapshots(&self) -> &Arc<Snapshots> {
        &self.snapshots
    }

    /// The lazy layers.
    pub fn layers(&self) -> &Arc<NodeLayers> {
        &self.layers
    }

    /// Stops serving; lazy layers stay mounted.
    pub async fn shutdown(self) -> Result<()> {
        if let Some((_, task)) = self.metrics {
            task.abort();
        }
        self.traces.abort();
        if let Some(proxy) = self.cri_proxy {
            proxy.shutdown().await?;
        }
        self.grpc.shutdown().await
    }
}

async fn serve_metrics(
    addr: SocketAddr,
    snapshots: Arc<Snapshots>,
    layers: Arc<NodeLayers>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Metrics { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Metrics { addr, source })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let (snapshots, layers) = (snapshots.clone(), layers.clone());
                async move {
                    let body = tokio::task::spawn_blocking(move || {
                        crate::metrics::render(&snapshots, &layers)
                    })
                    .await
                    .unwrap_or_default();
                    (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
    info!(addr = %local, "metrics listening");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((local, task))
}
