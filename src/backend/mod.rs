//! Devices that run the model.
//!
//! [`Backend`] is the interface the CLI (and later the server) drives: it owns the weights in
//! whatever form its device wants and advances plain-value [`SeqState`]s, so a state produced by
//! one backend can be saved, restored or handed to another.

pub mod cpu;

use crate::config::Config;
use crate::error::Result;
use crate::model::SeqInput;
use crate::state::SeqState;

/// A device able to run DeepSeek V4.
pub trait Backend: Send + Sync {
    /// Short name of the device.
    fn name(&self) -> &str;
    /// The model's configuration.
    fn config(&self) -> &Config;
    /// A fresh state for one sequence.
    fn new_state(&self) -> SeqState;
    /// Runs the main blocks over a batch of sequence chunks, advancing their states; returns the
    /// final residual stream (`T x hc_mult x hidden_size`).
    fn forward(&self, inputs: &mut [SeqInput]) -> Result<Vec<f32>>;
    /// Logits (`T x vocab_size`) of final-stream rows.
    fn logits(&self, hidden: &[f32]) -> Vec<f32>;
    /// A fresh state for MTP block `i`.
    fn new_mtp_state(&self, i: usize) -> SeqState;
    /// MTP block `i`: final-stream rows and the tokens that follow them in, logits of the token
    /// after those out.
    fn mtp_forward(&self, i: usize, hidden: &[f32], inputs: &mut [SeqInput]) -> Result<Vec<f32>>;
}
