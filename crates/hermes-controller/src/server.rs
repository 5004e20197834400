//! The node API's listening side, set up the same way by both adapters: the bound TCP socket,
//! the bearer token nodes must send and the TLS configuration.
//!
//! The token is passed in already read (with the node's token-file reader, so the controller
//! and the node refuse the same files); this module does not read it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{self, NodeApi};
use crate::{Error, Result};

/// Where and how the node API is served.
#[derive(Debug)]
pub struct NodeApiServer {
    listener: TcpListener,
    token: Option<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl NodeApiServer {
    /// Listen on `listen` (`host:port`; port 0 picks one), requiring `token` from nodes if
    /// given, over TLS with the PEM certificate chain and key `tls` if given.
    pub async fn bind(
        listen: &str,
        token: Option<String>,
        tls: Option<(&Path, &Path)>,
    ) -> Result<Self> {
        let tls = tls
            .map(|(cert, key)| crate::tls::server_config(cert, key))
            .transpose()?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Listen {
                address: listen.to_owned(),
                source,
            })?;
        Ok(Self {
            listener,
            token,
            tls,
        })
    }

    /// The address bound (the port chosen, when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The bearer token nodes must send, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Serve `api` until `shutdown` completes (over TLS when configured).
    pub async fn serve(
        self,
        api: NodeApi,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        match self.tls {
            Some(tls) => api::serve_tls(self.listener, tls, api, shutdown).await,
            None => api::serve(self.listener, api, shutdown).await,
        }
    }
}
