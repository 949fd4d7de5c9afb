//! The CPU backend: the model's math on host memory, parallel over rayon's threads.

mod linear;
pub mod ops;
pub mod order;
mod topk;

pub use linear::{decode_row, linear, linear_plain, linear_plain_rows};
pub use order::Numerics;
pub use topk::top_k;

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::Result;
use crate::model::{Model, SeqInput};
use crate::state::SeqState;

/// Runs a [`Model`] on the CPU.
pub struct CpuBackend {
    /// The weights, shareable between backends of other [`Numerics`].
    pub model: Arc<Model>,
    /// The summation orders of its products.
    pub numerics: Numerics,
}

impl CpuBackend {
    /// A batch-invariant backend over `model`.
    pub fn new(model: Model) -> Self {
        CpuBackend {
            model: Arc::new(model),
            numerics: Numerics::default(),
        }
    }

    /// A backend over the same weights with other summation orders.
    pub fn with_numerics(&self, numerics: Numerics) -> Self {
        CpuBackend {
            model: Arc::clone(&self.model),
            numerics,
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }
    fn config(&self) -> &Config {
        &self.model.cfg
    }
    fn new_state(&self) -> SeqState {
        self.model.new_state()
    }
    fn forward(&self, inputs: &mut [SeqInput]) -> Result<Vec<f32>> {
        self.model.forward(inputs, self.numerics)
    }
    fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        self.model.logits(hidden, self.numerics)
    }
    fn new_mtp_state(&self, i: usize) -> SeqState {
        self.model.new_mtp_state(i)
    }
    fn mtp_forward(&self, i: usize, hidden: &[f32], inputs: &mut [SeqInput]) -> Result<Vec<f32>> {
        self.model.mtp_forward(i, hidden, inputs, self.numerics)
    }
}
