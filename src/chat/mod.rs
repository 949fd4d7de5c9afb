//! The V4 chat format: OpenAI requests to prompts, completions back to messages.

pub mod encode;
pub mod json;
pub mod parse;
pub mod request;
pub mod tokens;

pub use encode::{encode, Effort, EncodeError, Message, Options, ThinkingMode};
