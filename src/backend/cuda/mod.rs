//! The CUDA device (in progress: nothing can be constructed yet).

use crate::error::{Error, Result};
use crate::state::SeqState;

/// Number of CUDA devices present.
pub fn device_count() -> usize {
    0
}

/// A CUDA device.
pub enum Cuda {}

impl Cuda {
    /// Opens device `n`.
    pub fn new(n: usize) -> Result<Runner> {
        Err(Error::Device(format!(
            "cuda:{n}: the CUDA backend is not built yet"
        )))
    }
}

/// Placeholder.
pub type Runner = crate::backend::cpu::Cpu;

/// A sequence's state on a CUDA device.
pub enum CudaSeq {}
/// A mark of a [`CudaSeq`].
pub enum CudaMark {}
/// Rows on a CUDA device.
pub enum Tensor {}

impl Tensor {
    /// Rows.
    pub fn rows(&self) -> usize {
        match *self {}
    }
}

impl CudaSeq {
    /// Position.
    pub fn pos(&self) -> usize {
        match *self {}
    }
    /// Prompt end.
    pub fn prompt_end(&self) -> usize {
        match *self {}
    }
    /// Sets the prompt end.
    pub fn set_prompt_end(&mut self, _: usize) {
        match *self {}
    }
    /// Bytes.
    pub fn bytes(&self) -> usize {
        match *self {}
    }
    /// Advances.
    pub fn advance(&mut self, _: usize) {
        match *self {}
    }
    /// Marks.
    pub fn mark(&self) -> Result<CudaMark> {
        match *self {}
    }
    /// Rewinds.
    pub fn rewind(&mut self, _: &CudaMark) -> Result<()> {
        match *self {}
    }
    /// Clones.
    pub fn try_clone(&self) -> Result<CudaSeq> {
        match *self {}
    }
    /// To host.
    pub fn to_host(&self) -> Result<SeqState> {
        match *self {}
    }
}
