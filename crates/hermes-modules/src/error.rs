//! The crate's one error type.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where directives came from; every error names it together with the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The standard output of a loader script.
    Script(PathBuf),
    /// The `modules:` list of a static configuration file.
    StaticFile(PathBuf),
    /// The `HERMES_MODULES` environment variable (entries are numbered like lines).
    EnvVar,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Script(p) => write!(f, "loader script {} output", p.display()),
            Origin::StaticFile(p) => write!(f, "static config {}", p.display()),
            Origin::EnvVar => f.write_str("HERMES_MODULES entry"),
        }
    }
}

/// Where a directive is: its origin, 1-based line (or entry) number and trimmed text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    /// Where the line came from.
    pub origin: Origin,
    /// 1-based line (or entry) number.
    pub line: usize,
    /// The line as written (trimmed).
    pub text: String,
}

impl At {
    /// A boxed location (boxed to keep [`Error`] small).
    pub fn new(origin: &Origin, line: usize, text: &str) -> Box<Self> {
        Box::new(Self {
            origin: origin.clone(),
            line,
            text: text.to_owned(),
        })
    }
}

/// Why a directive line is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxProblem {
    /// The first field is not `module=NAME`.
    #[error("expected `module=NAME` as the first field")]
    MissingModule,
    /// A field has no `=`.
    #[error("field `{field}` is not KEY=VALUE")]
    NotKeyValue {
        /// The offending field.
        field: String,
    },
    /// A field has an empty key or value.
    #[error("field `{field}` has an empty key or value")]
    Empty {
        /// The offending field.
        field: String,
    },
    /// A key appears twice on the same line.
    #[error("key `{key}` appears more than once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// A module, profile or key name has characters outside `[A-Za-z0-9._-]`.
    #[error("`{name}` is not a valid name (letters, digits, `.`, `_`, `-`)")]
    BadName {
        /// The offending name.
        name: String,
    },
    /// `module=` appears again after the first field.
    #[error("`module=` may appear only once, as the first field")]
    ModuleTwice,
}

/// Everything that can fail in the installer and the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directive line could not be parsed.
    #[error("{} line {}: malformed directive `{}`: {problem}", at.origin, at.line, at.text)]
    Malformed {
        /// Where the directive is.
        at: Box<At>,
        /// What is wrong with it.
        problem: SyntaxProblem,
    },
    /// A directive names a module that is not built in.
    #[error("{} line {}: unknown module `{module}` in `{}` (known: {known})", at.origin, at.line, at.text)]
    UnknownModule {
        /// Where the directive is.
        at: Box<At>,
        /// The unknown name.
        module: String,
        /// The known module names, comma separated.
        known: String,
    },
    /// A directive names a tuning profile that does not exist.
    #[error("{} line {}: unknown profile `{profile}` in `{}` (known: {known})", at.origin, at.line, at.text)]
    UnknownProfile {
        /// Where the directive is.
        at: Box<At>,
        /// The unknown profile.
        profile: String,
        /// The known profile names, comma separated.
        known: String,
    },
    /// A directive sets a key that is not a profile setting.
    #[error("{} line {}: unknown setting `{key}` in `{}` (known: {known})", at.origin, at.line, at.text)]
    UnknownSetting {
        /// Where the directive is.
        at: Box<At>,
        /// The unknown key.
        key: String,
        /// The settings a directive may override.
        known: String,
    },
    /// A directive sets a profile setting to a value of the wrong type or range.
    #[error("{} line {}: invalid value `{value}` for `{key}` in `{}`: {expected}", at.origin, at.line, at.text)]
    InvalidSetting {
        /// Where the directive is.
        at: Box<At>,
        /// The setting.
        key: String,
        /// The rejected value.
        value: String,
        /// What the value should look like.
        expected: &'static str,
    },
    /// The same module is requested twice with different configurations.
    #[error(
        "{} line {}: `{}` conflicts with line {first_line} `{first_text}`: \
         module `{module}` is requested twice with different configurations",
        at.origin, at.line, at.text
    )]
    ConflictingDuplicate {
        /// Where the later directive is.
        at: Box<At>,
        /// 1-based number of the first line.
        first_line: usize,
        /// The first line.
        first_text: String,
        /// The module requested twice.
        module: String,
    },
    /// The loader script could not be started.
    #[error("cannot run loader script {script} with {shell}")]
    ScriptSpawn {
        /// The script.
        script: PathBuf,
        /// The shell used.
        shell: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The loader script exited unsuccessfully.
    #[error("loader script {script} failed ({status}); its stderr: {stderr}")]
    ScriptFailed {
        /// The script.
        script: PathBuf,
        /// The exit status as printed by the OS (`exit status: 3`, `signal: 9`).
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// The loader script ran longer than the timeout; its process group was killed.
    #[error(
        "loader script {script} did not finish within {timeout:?} and was killed; \
         raise --script-timeout or fix the script"
    )]
    ScriptTimeout {
        /// The script.
        script: PathBuf,
        /// The timeout.
        timeout: Duration,
    },
    /// The loader script wrote more than the output limit; its process group was killed.
    #[error(
        "loader script {script} wrote more than {limit} bytes of output (at line {line}: `{text}`); \
         directives are one short line each"
    )]
    ScriptOutputTooLarge {
        /// The script.
        script: PathBuf,
        /// The limit in bytes.
        limit: usize,
        /// The line being written when the limit was crossed (1-based).
        line: usize,
        /// The start of that line.
        text: String,
    },
    /// Waiting for or reading from the loader script failed.
    #[error("lost track of loader script {script}")]
    ScriptIo {
        /// The script.
        script: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration file (static modules or profiles) could not be read.
    #[error("cannot read {path}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration file is not valid YAML for its schema.
    #[error("invalid configuration file {path}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// The cause (names the key, line and column).
        source: Box<serde_saphyr::Error>,
    },
    /// A profile in a profiles file is inconsistent.
    #[error("profile `{profile}`: {problem}")]
    InvalidProfile {
        /// The profile.
        profile: String,
        /// What is wrong.
        problem: String,
    },
    /// The state file could not be read.
    #[error("cannot read state file {path}")]
    StateRead {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file could not be written.
    #[error("cannot write state file {path}")]
    StateWrite {
        /// The state file (or its temporary sibling).
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file exists but is not a plan; run `resolve` to create it.
    #[error("state file {path} is not a module plan; run `hermes modules resolve` first")]
    StateCorrupt {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Another live supervisor already runs the plan of this state file.
    #[error(
        "the modules of {state} are already supervised by pid {pid}; \
         each module is loaded once per plan (stop that supervisor first)"
    )]
    AlreadyRunning {
        /// The state file.
        state: PathBuf,
        /// The running supervisor.
        pid: u32,
    },
    /// A target process could not be observed.
    #[error("cannot read {path}")]
    Proc {
        /// The `/proc` or cgroup file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A `/proc` or cgroup file did not have the expected format.
    #[error("unexpected format in {path}: {what}")]
    ProcFormat {
        /// The file.
        path: PathBuf,
        /// What was missing or malformed.
        what: String,
    },
    /// The metrics endpoint could not be bound.
    #[error("cannot listen for /metrics on {addr}")]
    MetricsBind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A report file could not be written.
    #[error("cannot write report {path}")]
    Report {
        /// The report file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A supervisor or server thread could not be started.
    #[error("cannot start thread {name}")]
    Thread {
        /// The thread's name.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Installing the signal handlers failed.
    #[error("cannot install SIGTERM/SIGINT handlers")]
    Signals {
        /// The cause.
        source: std::io::Error,
    },
    /// Writing the supervisor's output (its start and stop lines) failed.
    #[error("cannot write to stdout")]
    Stdout {
        /// The cause.
        source: std::io::Error,
    },
}

// The binary converts with `anyhow` (`?`), which needs `Send + Sync + 'static`.
const _: fn() = || {
    fn check<T: std::error::Error + Send + Sync + 'static>() {}
    check::<Error>();
};
