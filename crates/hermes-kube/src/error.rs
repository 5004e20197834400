//! The Kubernetes adapter's errors.

/// What went wrong in the Kubernetes adapter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {action}")]
    Kube {
        /// What the adapter was doing (`patch HermesImage sha256-…/status`).
        action: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// A value could not be written as YAML.
    #[error("cannot write {what} as YAML: {reason}")]
    Yaml {
        /// What was written.
        what: String,
        /// The serializer's message.
        reason: String,
    },
    /// The controller core's engine could not be set up (store, reports, registry client).
    #[error("controller engine")]
    Engine(#[source] Box<hermes_controller::Error>),
    /// No identity for the Lease: none given, no `HOSTNAME`, no host name.
    #[error(
        "cannot tell this replica's Lease identity: pass --identity or set POD_NAME (the pod name, from the downward API)"
    )]
    NoIdentity,
    /// Leader election failed.
    #[error("leader election on Lease {namespace}/{name}")]
    Lease {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// The lease manager's error.
        #[source]
        source: Box<kube_lease_manager::LeaseManagerError>,
    },
    /// A HermesPolicy directory or file could not be read (the admission webhook's policies).
    #[error("cannot read {path}")]
    PolicyRead {
        /// The directory or file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A HermesPolicy file is not valid YAML for its schema.
    #[error("invalid HermesPolicy file {path}")]
    PolicyParse {
        /// The file.
        path: std::path::PathBuf,
        /// The cause (names the key, line and column).
        source: Box<serde_saphyr::Error>,
    },
    /// The webhook's TLS certificate or key could not be loaded.
    #[error(
        "cannot load the webhook's TLS {what} from {path}: give a PEM certificate chain and its private key"
    )]
    Tls {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The API server's `/version` has no numeric major and minor version.
    #[error(
        "the API server reports version {major:?}.{minor:?}, not numbers: pass --sidecar-mode native or container"
    )]
    ServerVersion {
        /// Its `major`.
        major: String,
        /// Its `minor`.
        minor: String,
    },
    /// The webhook could not listen on its address.
    #[error("cannot listen on {addr} for the admission webhook")]
    WebhookBind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap a client error with what the adapter was doing.
    pub(crate) fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube {
            action,
            source: Box::new(source),
        }
    }
}
