//! hadal: an inference engine for the DeepSeek V4 family.
//!
//! Layout, in the order data flows: [`config`] and [`checkpoint`] read a released checkpoint;
//! [`quant`] and [`weights`] hold its FP8/FP4/BF16 formats; [`model`] is the forward pass, one
//! file per component; [`state`] is the per-sequence decode state; [`backend`] runs it on a
//! device (the CPU, or a CUDA GPU); [`inspect`], [`score`] and [`bench`] are the CLI's reports.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod error;
pub mod generate;
pub mod inspect;
pub mod model;
pub mod quant;
pub mod score;
pub mod server;
pub mod session;
pub mod state;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
