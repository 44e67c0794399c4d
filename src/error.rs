//! The library's error type: every failure names the file (or input) and the problem.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the library. Errors about files carry the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are malformed (truncated, corrupt, inconsistent).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// Well-formed input that engram does not support (architecture, tensor type, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Shapes or sizes that do not agree with each other or with the model.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Bad user input: over-long prompt, NaN parameter, empty batch, ...
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// A GPU backend failure: no usable device, a kernel that does not compile, a failed launch.
    #[error("device: {0}")]
    Device(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    pub fn format(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().to_path_buf(), message: message.into() }
    }
}
