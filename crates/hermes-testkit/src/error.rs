//! The one error type of the testkit.

use std::path::PathBuf;

/// Result with the testkit's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong while starting a part or building an image.
///
/// `Debug` prints the same text as `Display` (plus causes), so that `.unwrap()` in a test shows a
/// readable message.
#[derive(thiserror::Error)]
pub enum Error {
    /// A program the testkit runs is not installed.
    #[error("{program} not found: {install}")]
    MissingProgram {
        /// The program that was looked for.
        program: &'static str,
        /// How to install it.
        install: &'static str,
    },
    /// A file or directory operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A network or process operation without a path failed.
    #[error("{action}")]
    Os {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The registry process did not become ready.
    #[error("docker-registry did not start ({reason}); its log ({log_path}):\n{log}")]
    RegistryStart {
        /// Why startup is considered failed.
        reason: String,
        /// Where the log is.
        log_path: PathBuf,
        /// The log's contents.
        log: String,
    },
    /// containerd did not become ready.
    #[error("containerd did not start ({reason}); its log ({log_path}):\n{log}")]
    ContainerdStart {
        /// Why startup is considered failed.
        reason: String,
        /// Where the log is.
        log_path: PathBuf,
        /// The log's contents.
        log: String,
    },
    /// containerd 2.x was asked for and is not there.
    #[error(
        "containerd 2.x is not available ({reason}): run `bash scripts/containerd2.sh fetch` \
         (or set HERMES_CONTAINERD2_BIN to a directory with containerd, containerd-shim-runc-v2 and ctr)"
    )]
    Containerd2Missing {
        /// What was missing.
        reason: String,
    },
    /// A containerd feature was asked of a containerd that lacks it.
    #[error("{flavour} has no {feature}: use containerd 2")]
    Unsupported {
        /// The feature.
        feature: &'static str,
        /// The containerd asked.
        flavour: String,
    },
    /// An external command exited unsuccessfully.
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// An image reference was not `REPO:TAG`.
    #[error("image reference {reference:?} is not REPO:TAG")]
    BadReference {
        /// The reference given.
        reference: String,
    },
    /// A builder was used in a way that cannot produce an image.
    #[error("invalid test image: {reason}")]
    InvalidImage {
        /// What is wrong.
        reason: String,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hermes_node_api::error_chain(self))
    }
}

impl Error {
    pub(crate) fn os(action: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Error::Os { action, source }
    }

    pub(crate) fn io(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}
