//! The engine's error type: every message names the offending file, key, tensor or value.

use std::path::PathBuf;

/// Errors raised while loading a checkpoint or running the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },
    /// `config.json` is malformed, describes another model, or uses unsupported features.
    #[error("config: {0}")]
    Config(String),
    /// A safetensors file is malformed, or a tensor is missing, extra, of the wrong dtype or
    /// shape, or truncated.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A request that the model cannot serve (bad token id, context overflow, ...).
    #[error("input: {0}")]
    Input(String),
    /// The device is missing, refused a call, or failed (driver, compiler, launch).
    #[error("device: {0}")]
    Device(String),
    /// The device has no room for the weights, a sequence's state or a step's activations.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// A saved decode state is truncated, corrupt, of another model or of another format.
    #[error("{}: {reason}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
