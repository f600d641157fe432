//! The worker's errors. A function's own failure is not among them: that is an
//! [`InvokeError`](crate::sandbox::InvokeError), a result the caller receives, while these
//! are failures of the worker itself or of what it was handed.

use std::path::PathBuf;

/// What went wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The module's bytes do not hash to the sha256 it was announced with.
    #[error("module hash mismatch: expected {expected}, the bytes hash to {actual}")]
    HashMismatch {
        /// The announced sha256 (hex).
        expected: String,
        /// The sha256 of the received bytes (hex).
        actual: String,
    },
    /// The bytes are not a valid WebAssembly module, or use what the sandbox does not offer.
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// The module has no `_start` function taking and returning nothing (not a WASI command).
    #[error(
        "the module exports no `_start` function of type () -> (); build it as a WASI command (a `fn main` for wasm32-wasip1)"
    )]
    MissingStart,
    /// The sandbox could not be set up with the node's configuration.
    #[error("sandbox configuration: {0}")]
    Config(String),
    /// Reading or writing the worker's data directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The identity file exists but is not a key this worker can use.
    #[error("identity file {path} is unusable: {reason}; move it away to make a new identity")]
    Identity {
        /// The key file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The control plane refused or dropped the worker.
    #[error("control plane: {0}")]
    Control(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// The worker's result type.
pub type Result<T> = std::result::Result<T, Error>;
